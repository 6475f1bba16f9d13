"""The IDX sources (``idx``, ``fashion_mnist``) on tiny IDX files written here: the package is never needed."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lcnn_jax import checkpoint, config as config_lib, data, models, train
from lcnn_jax.data import pipeline, sources
from lcnn_jax.inference import exporter, predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPE_BYTES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
  """``array`` in the IDX format, written independently of the reader: header, then big-endian data."""
  big = array.astype(array.dtype.newbyteorder(">"))
  header = bytes([0, 0, TYPE_BYTES[big.dtype], array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + big.tobytes()


def write_idx(path, array: np.ndarray) -> None:
  content = idx_bytes(array)
  with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
    f.write(content)


def write_dataset(directory, rng, *, size=28, num_train=40, num_eval=12, num_classes=10, gz=(True, False)):
  """The four standard files, train ones .gz when gz[0], t10k ones when gz[1]; returns the arrays."""
  directory.mkdir(exist_ok=True)
  arrays = {}
  for split, n, compressed in (("train", num_train, gz[0]), ("t10k", num_eval, gz[1])):
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    rng.shuffle(labels)
    suffix = ".gz" if compressed else ""
    write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    arrays[split] = (images, labels)
  return arrays


def data_config(**overrides) -> ml_collections.ConfigDict:
  config = config_lib.default_config().data
  config.update(overrides)
  return config


@pytest.fixture(autouse=True)
def _fresh_sources():
  pipeline._open_cached.cache_clear()  # pylint: disable=protected-access
  yield
  pipeline._open_cached.cache_clear()  # pylint: disable=protected-access


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_gives_back_the_array_of_any_idx_type(tmp_path, rng, dtype, suffix):
  array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
  path = str(tmp_path / f"a{suffix}")
  write_idx(path, array)
  read = sources.read_idx(path)
  assert read.shape == (3, 4, 5) and read.dtype.isnative and read.dtype == np.dtype(dtype).newbyteorder("=")
  np.testing.assert_array_equal(read, array)


def test_idx_source_reads_plain_and_gz_files_and_evaluates_every_image_as_stored(tmp_path, rng):
  arrays = write_dataset(tmp_path / "mnist", rng, num_classes=7)
  config = data_config(name="idx", dir=str(tmp_path / "mnist"))
  info = data.dataset_info(config, cache_dir=str(tmp_path / "run"))
  assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (7, (28, 28, 1), 40, 12)
  assert info.class_names == [str(c) for c in range(7)]
  train_images = arrays["train"][0].astype(np.float64) / 255
  np.testing.assert_allclose(info.mean, [train_images.mean()], rtol=1e-6)
  np.testing.assert_allclose(info.std, [train_images.std()], rtol=1e-6)
  batches = list(data.make_eval_iterator(config, info, global_batch_size=5))
  images = np.concatenate([b["image"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
  labels = np.concatenate([b["label"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
  expected = (arrays["t10k"][0][..., None] / 255 - info.mean[0]) / info.std[0]
  np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, arrays["t10k"][1])


def _training_windows(config, info, arrays, count=80):
  """Per training example, the (dy, dx, mirrored) that maps its stored image to the delivered one."""
  iterator = data.make_train_iterator(config, info, global_batch_size=count, seed=3)
  batch = next(iterator)
  iterator.close()
  stored = arrays["train"][0]
  padded = np.pad(stored, ((0, 0), (2, 2), (2, 2)))
  found = []
  for image, label in zip(batch["image"], batch["label"]):
    pixels = np.rint((image[..., 0] * info.std[0] + info.mean[0]) * 255).astype(np.int64)
    matches = [(dy - 2, dx - 2, mirrored) for i in np.flatnonzero(arrays["train"][1] == label)
               for dy in range(5) for dx in range(5) for mirrored in (False, True)
               if np.array_equal((padded[i, dy:dy + 28, dx:dx + 28])[:, ::-1 if mirrored else 1], pixels)]
    assert matches, "a training image is not a shift of at most 2 pixels of a stored one"
    found.append(matches[0])
  return found


@pytest.mark.parametrize("name, flip, mirrors", [("idx", None, False), ("fashion_mnist", None, True),
                                                 ("idx", True, True), ("fashion_mnist", False, False)])
def test_training_images_are_shifts_of_up_to_two_pixels_mirrored_only_for_clothing(tmp_path, rng, name, flip,
                                                                                    mirrors):
  arrays = write_dataset(tmp_path / "d", rng, num_train=20)
  config = data_config(name=name, dir=str(tmp_path / "d"), flip=flip, mean=(0.5,), std=(0.25,))
  info = data.dataset_info(config)
  windows = _training_windows(config, info, arrays)
  assert any(m for _, _, m in windows) == mirrors
  assert len({(dy, dx) for dy, dx, _ in windows}) > 5  # the shifts vary


def test_fashion_mnist_names_its_classes_and_rejects_labels_beyond_ten(tmp_path, rng):
  write_dataset(tmp_path / "fashion", rng)
  info = data.dataset_info(data_config(name="fashion_mnist", dir=str(tmp_path / "fashion"), mean=(0.5,),
                                       std=(0.25,)))
  assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
  write_dataset(tmp_path / "letters", rng, num_classes=12)
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz holds label 11; expected labels 0\.\.9"):
    sources.open_fashion_mnist(str(tmp_path / "letters"))


def test_missing_files_name_the_directory_the_files_and_both_ways_to_get_them(tmp_path, rng, monkeypatch):
  monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError) as error:
    data.dataset_info(data_config(name="fashion_mnist"))
  message = str(error.value)
  assert f"{tmp_path / 'absent'} does not exist" in message
  for expected in (*sources.IDX_FILES, "apt-get install dataset-fashion-mnist", sources.FASHION_MNIST_URL,
                   "--config.data.dir"):
    assert expected in message
  write_dataset(tmp_path / "partial", rng)
  os.remove(tmp_path / "partial" / "t10k-labels-idx1-ubyte")
  with pytest.raises(FileNotFoundError, match=r"partial lacks t10k-labels-idx1-ubyte\[\.gz\]"):
    sources.open_idx(str(tmp_path / "partial"))
  with pytest.raises(ValueError, match=r"data.name='idx' needs data.dir"):
    data.dataset_info(data_config(name="idx"))


def _damaged(directory, rng, name, content: bytes):
  write_dataset(directory, rng, gz=(False, False))
  with open(directory / name, "wb") as f:
    f.write(content)
  return str(directory / name)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-7], r"is truncated: shape \(40, 28, 28\) of uint8 needs 31376 bytes, the file holds 31369"),
    (lambda b: b + b"\0", r"longer than its header says \(trailing bytes\)"),
    (lambda b: b[:6], r"truncated inside its header"),
    (lambda b: b[:2], r"shorter than the 4-byte magic number"),
    (lambda b: b"\x1f\x8b" + b[2:], r"not an IDX magic number"),
])
def test_damaged_files_are_named_with_what_is_wrong(tmp_path, rng, damage, message):
  images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
  path = _damaged(tmp_path / "d", rng, "train-images-idx3-ubyte", damage(idx_bytes(images)))
  with pytest.raises(ValueError, match=message) as error:
    sources.open_idx(str(tmp_path / "d"))
  assert path in str(error.value)


def test_truncated_gz_and_disagreeing_files_are_named(tmp_path, rng):
  gz = gzip.compress(idx_bytes(rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)))
  path = _damaged(tmp_path / "a", rng, "t10k-images-idx3-ubyte.gz", gz[:len(gz) // 2])
  os.remove(tmp_path / "a" / "t10k-images-idx3-ubyte")
  with pytest.raises(ValueError, match=rf"IDX file {path} cannot be read \(EOFError"):
    sources.open_idx(str(tmp_path / "a"))
  path = _damaged(tmp_path / "b", rng, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)))
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte and .*t10k-labels-idx1-ubyte disagree: 12 "
                                       r"images but 11 labels"):
    sources.open_idx(str(tmp_path / "b"))
  _damaged(tmp_path / "c", rng, "train-labels-idx1-ubyte", idx_bytes(np.zeros((40, 2), np.uint8)))
  with pytest.raises(ValueError, match=r"holds uint8 of shape \(40, 2\); labels should be uint8 \(count,\)"):
    sources.open_idx(str(tmp_path / "c"))


def test_idx_config_mistakes_name_the_key():
  with pytest.raises(ValueError, match=r"data.train_split='train'.*reads the fixed train and t10k files"):
    data.validate_config(data_config(name="idx", dir="x", train_split="train"))
  with pytest.raises(ValueError, match=r"data.flip=True: only the sources \('fashion_mnist', 'idx'\) take it"):
    data.validate_config(data_config(name="digits", flip=True))


def test_a_missing_dataset_stops_the_main_job_with_exit_2_and_no_traceback(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "lcnn_jax.main", "--config", os.path.join(REPO, "configs", "fashion_mnist.py"),
       "--workdir", str(tmp_path / "run"), f"--config.data.dir={tmp_path / 'nowhere'}"],
      capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 2, done.stderr[-2000:]
  assert "apt-get install dataset-fashion-mnist" in done.stderr and "Traceback" not in done.stderr


def test_exported_run_predicts_png_files_of_the_dataset_exactly_as_evaluation_scores_them(tmp_path, rng):
  arrays = write_dataset(tmp_path / "fashion", rng, num_train=24, num_eval=6)
  config = config_lib.default_config()
  config.model.name, config.model.width, config.model.dictionary.convs = "mnist-lcnn", 4, 3
  config.model.dictionary.first = 1
  config.data.name, config.data.dir = "fashion_mnist", str(tmp_path / "fashion")
  config.train.update(batch_size=8, num_steps=3, checkpoint_every=3, log_every=3, eval_every=3,
                      lr_schedule="constant", learning_rate=0.05)
  config.sparsity.strength = 1.0
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir)
  exported = exporter.export(workdir, tmp_path / "model.npz", backends="dense")
  assert exported.preprocessing["image_size"] == exported.preprocessing["resize_size"] == 28
  paths = []
  for i, image in enumerate(arrays["t10k"][0]):
    paths.append(str(tmp_path / f"test{i}.png"))
    Image.fromarray(image).save(paths[-1])
  info = data.dataset_info(config.data, cache_dir=workdir)
  batch = next(data.make_eval_iterator(config.data, info, global_batch_size=6))
  loaded = exporter.load(tmp_path / "model.npz")
  np.testing.assert_array_equal(predict.load_images(paths, loaded), batch["image"])  # the same inputs, bit for bit
  model, _, _ = checkpoint.restore_model(workdir)
  model.eval()
  expected = np.asarray(model(batch["image"]))
  np.testing.assert_allclose(np.asarray(loaded(predict.load_images(paths, loaded))), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  assert metrics["top1"] == pytest.approx(np.mean(expected.argmax(-1) == arrays["t10k"][1]))
  top = predict.predict(loaded, paths, k=1)
  assert [row[0][0] for row in top] == [sources.FASHION_MNIST_CLASSES[i] for i in expected.argmax(-1)]


def _experiment_config(name, directory):
  """configs/experiments/<name>.py on the tiny files, shrunk to a few steps of a narrow net."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.data.name == "fashion_mnist" and config.model.name == "mnist-lcnn"
  config.data.dir = str(directory)
  config.model.width = 4
  config.train.update(batch_size=8, num_steps=2, checkpoint_every=2, log_every=1, eval_every=2, warmup_steps=0)
  return config


def test_the_experiment_configs_train_fashion_mnist_subsets_and_deepen_the_28x28_lcnn(tmp_path, rng):
  from lcnn_jax.experiments import common, few_iteration, few_shot, spectrum
  write_dataset(tmp_path / "fashion", rng, num_train=30, num_eval=10)
  point = spectrum.point_config(_experiment_config("spectrum_fashion", tmp_path / "fashion"), 2, 3.0,
                                 ["convs"])
  assert (point.model.dictionary.convs, point.sparsity.strength) == (2, 3.0)
  config_lib.validate(point)
  shot = _experiment_config("few_shot_fashion", tmp_path / "fashion")
  novel = few_shot.novel_config(shot, [5, 6, 7, 8, 9], 1, arm="lcnn-coefficients", seed=0, learning_rate=0.01,
                                steps=2, eval_every=2, protocol=few_shot.Protocol())
  info = data.dataset_info(novel.data, cache_dir=str(tmp_path / "novel"))
  assert (info.num_train, info.num_eval, info.class_names) == (5, 5, list(sources.FASHION_MNIST_CLASSES[5:]))
  deep = _experiment_config("few_iteration_fashion", tmp_path / "fashion")
  deep_config = few_iteration.deep_config(deep, "model.convs_per_stage", 3, 2, 2, arm="deep_lcnn_transfer",
                                          strength=0.0)
  deep.model.convs_per_stage = 2  # the shallow net of the documented command
  nets = [models.create_model(c.model, num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
          for c in (deep, deep_config)]
  mapping = common.map_dictionaries(*nets)
  assert mapping["conv3_3"] == "conv3_2" and mapping["conv2"] == "conv2"
  assert nets[1](rng.standard_normal((2, 28, 28, 1)).astype(np.float32)).shape == (2, 10)


def test_fashion_configs_count_the_28x28_nets_without_data():
  from lcnn_jax import flops, inspection
  import importlib.util
  spec = importlib.util.spec_from_file_location("fm", os.path.join(REPO, "configs", "fashion_mnist.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  num_classes, input_shape = inspection.input_facts(config)
  assert (num_classes, input_shape) == (10, (28, 28, 1))
  model = models.create_model(config.model, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0))
  # conv1 at 28×28, conv2 at 14×14, conv3 at 7×7 (3×3 kernels), then the classifier on every pixel of conv3's map.
  expected = 28 * 28 * 9 * 1 * 32 + 14 * 14 * 9 * 32 * 64 + 7 * 7 * 9 * 64 * 128 + 7 * 7 * 128 * 10
  assert flops.count_multiplications(model, input_shape).total == expected
