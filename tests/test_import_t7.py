"""``lcnn_jax.import_t7``: the original's Torch7 models become runs whose logits are Torch's, read by every tool.

The files are written by ``tests/t7_writer.py`` with the structure of the original's ``models/alexnet-lcnn.lua``
at a small size (95×95 inputs, dictionaries of 3–8 atoms, 10 classes) and a large initial sparsity (0.3), so
about 30% of every P lies at or below its threshold τ in the file and only the threshold makes the logits right.
"""

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("torchfile", reason="the t7 extra (pip install 'lcnn-jax[t7]') reads .t7 files")

from lcnn_jax import bench, checkpoint, cli, import_t7, inspection, layers, train  # noqa: E402
from lcnn_jax.inference import exporter  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import t7_writer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 95  # conv1 23, pool 11, pool 5, pool 2: fc6 is a 2×2 lookup convolution
SIZES = {"num_classes": 10, "map_size": 2, "first_pool": 3, "pool_sizes": (5, 6, 7, 8), "fc_pool": 8,
         "initial_sparsity": 0.3}
CLASSES = t7_writer.EXAMPLE_CLASSES  # the file's output order, not sorted
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TENSOR_TYPES = ("torch.CudaTensor", "torch.FloatTensor", "torch.DoubleTensor")
NN_SPELLINGS = {"cudnn.ReLU": "nn.ReLU", "nn.SpatialMaxPooling": "cudnn.SpatialMaxPooling",
                "nn.SpatialBatchNormalization": "cudnn.SpatialBatchNormalization", "nn.View": "nn.Reshape",
                "nn.LogSoftMax": "cudnn.LogSoftMax", "cudnn.SpatialConvolution": "nn.SpatialConvolution"}


def tree_of(seed: str, tensor_type: str = "torch.CudaTensor", **overrides):
  rng = np.random.default_rng(zlib.crc32(seed.encode()))
  return t7_writer.alexnet_lcnn(rng, t7_writer.Factory(tensor_type), **(SIZES | overrides))


def torch_logits(tree, images: np.ndarray) -> np.ndarray:
  """The original's forward in float64 up to its LogSoftMax, on NHWC images."""
  features, classifier = tree["modules"]
  assert classifier["modules"][-1].typename in ("nn.LogSoftMax", "cudnn.LogSoftMax")
  body = t7_writer.Factory().sequential([features, t7_writer.Factory().sequential(classifier["modules"][:-1])])
  return t7_writer.forward(body, images.transpose(0, 3, 1, 2).astype(np.float64))


def logits_of(model, images: np.ndarray) -> np.ndarray:
  return np.asarray(layers.eval_view(model)(images.astype(np.float32)), np.float64)


def assert_logits_close(got: np.ndarray, expected: np.ndarray) -> None:
  assert np.std(expected) > 0.5  # the test inputs give informative logits, not zeros
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A CUDA-tagged file with a classes .t7 and a mean/std .t7, imported as a run by the command's function."""
  directory = tmp_path_factory.mktemp("t7")
  tree = tree_of("imported")
  paths = {name: str(directory / f"{name}.t7") for name in ("model", "classes", "meanstd")}
  t7_writer.write(paths["model"], tree)
  t7_writer.write(paths["classes"], t7_writer.Module("dataLoader", classes=CLASSES, sampleSize=[3, 224, 224]))
  t7_writer.write(paths["meanstd"], {"mean": MEAN, "std": STD})
  workdir = str(directory / "run")
  summary = import_t7.import_run(paths["model"], workdir, image_size=IMAGE_SIZE, classes=paths["classes"],
                                 meanstd=paths["meanstd"])
  return {"tree": tree, "workdir": workdir, "summary": summary, **paths}


@pytest.mark.parametrize("tensor_type", TENSOR_TYPES)
def test_imported_logits_equal_torch_forward_in_float64(tmp_path, rng, tensor_type):
  tree = tree_of("logits", tensor_type)
  path = str(tmp_path / "model.t7")
  t7_writer.write(path, tree)
  model, config, names = import_t7.import_model(path, image_size=IMAGE_SIZE)
  assert names is None
  assert config.model.name == "alexnet-lcnn" and config.model.dictionary.first == 3
  assert tuple(config.model.dictionary.convs) == (5, 6, 7, 8) and config.model.dictionary.fc == 8
  assert config.model.dictionary.classifier == 0
  assert config.model.initial_sparsity == pytest.approx(0.3)
  assert (config.sparsity.rule, config.sparsity.strength) == ("threshold", 1.0)  # the file's lambda
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  assert_logits_close(logits_of(model, images), torch_logits(tree, images))


def test_cnn_baseline_file_with_nested_blocks_and_spatial_dropout(tmp_path):
  rng = np.random.default_rng(zlib.crc32(b"cnn"))
  tree = t7_writer.alexnet(rng, t7_writer.Factory("torch.CudaTensor", grad_buffers=False), num_classes=10,
                           map_size=1)
  path = str(tmp_path / "alexnet.t7")
  t7_writer.write(path, tree)
  model, config, _ = import_t7.import_model(path, image_size=63)  # the smallest AlexNet input: fc6 is 1×1
  assert config.model.name == "alexnet" and config.sparsity.strength == 0.0
  images = rng.normal(size=(2, 63, 63, 3))
  assert_logits_close(logits_of(model, images), torch_logits(tree, images))


def test_threshold_of_the_file_is_applied_on_every_forward(tmp_path, rng):
  tree = tree_of("threshold")
  path = str(tmp_path / "model.t7")
  t7_writer.write(path, tree)
  model, _, _ = import_t7.import_model(path, image_size=IMAGE_SIZE)
  conv2 = tree["modules"][0]["modules"][4]
  p = conv2["alignconv"]["weight"].array  # (n, k, kh, kw), Torch's layout
  below = (p != 0) & (np.abs(p) <= conv2["sparseTh"])
  assert 0.2 < below.mean() < 0.4  # stored non-zero in the file, zero in the original's forward
  ours = np.asarray(model.conv2.thresholded_coefficients()).transpose(3, 2, 0, 1)  # HWIO -> OIHW
  np.testing.assert_array_equal(ours == 0, below)
  np.testing.assert_array_equal(ours[~below], p[~below])
  # Without the threshold the logits would differ: the reference with P unthresholded is far from ours.
  conv2.fields["sparseTh"] = 0.0
  images = rng.normal(size=(1, IMAGE_SIZE, IMAGE_SIZE, 3))
  unthresholded = torch_logits(tree, images)
  assert np.abs(logits_of(model, images) - unthresholded).max() > 1e-2 * np.abs(unthresholded).max()


@pytest.mark.parametrize("dropout", [("nn.SpatialDropout", False), ("nn.Dropout", False)])
def test_dropout_that_scales_at_evaluation_is_folded_into_the_next_layer(tmp_path, rng, dropout):
  tree = tree_of("dropout", dropout=dropout)
  path = str(tmp_path / "model.t7")
  t7_writer.write(path, tree)
  model, _, _ = import_t7.import_model(path, image_size=IMAGE_SIZE)
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  assert_logits_close(logits_of(model, images), torch_logits(tree, images))


def test_other_spellings_of_each_module_inside_a_data_parallel_table(tmp_path, rng):
  """The nn/cudnn spelling the other tests do not write, an nn.SpatialConvolutionMM fc8 with its flattened
  (out, in·kh·kw) weight, CUDA doubles, the model saved inside an nn.DataParallelTable of two replicas."""
  tree = tree_of("spellings", "torch.CudaDoubleTensor")
  features, classifier = tree["modules"]
  for module in features["modules"] + classifier["modules"]:
    module.typename = NN_SPELLINGS.get(module.typename, module.typename)
    for inner in ("poolconv", "alignconv"):
      if module[inner] is not None:
        module[inner].typename = NN_SPELLINGS[module[inner].typename]
  fc8 = classifier["modules"][8]
  assert fc8.typename == "nn.SpatialConvolution"
  fc8.typename = "nn.SpatialConvolutionMM"
  fc8.fields["weight"] = t7_writer.Tensor(fc8["weight"].array.reshape(10, 4096), "torch.CudaDoubleTensor")
  path = str(tmp_path / "model.t7")
  t7_writer.write(path, t7_writer.Module("nn.DataParallelTable", modules=[tree, tree_of("replica")], dimension=1,
                                         gpuAssignments=[1, 2], train=False))
  model, _, _ = import_t7.import_model(path, image_size=IMAGE_SIZE)
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  assert_logits_close(logits_of(model, images), torch_logits(tree, images))


def test_view_and_linear_classifier(tmp_path, rng):
  tree = tree_of("linear", linear_classifier=True)
  path = str(tmp_path / "model.t7")
  t7_writer.write(path, tree)
  model, _, _ = import_t7.import_model(path, image_size=IMAGE_SIZE)
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  assert_logits_close(logits_of(model, images), torch_logits(tree, images))


def test_run_holds_torch_logits_in_sorted_class_order_and_the_preprocessing(imported, rng):
  model, config, step = checkpoint.restore_model(imported["workdir"])
  _, dataset = checkpoint.load_run_info(imported["workdir"])
  assert step == 0 and config.model.name == "alexnet-lcnn"
  assert dataset["class_names"] == sorted(CLASSES)
  assert dataset["mean"] == MEAN and dataset["std"] == STD
  assert list(config.data.mean) == MEAN and list(config.data.std) == STD
  assert dataset["image_shape"] == [IMAGE_SIZE, IMAGE_SIZE, 3]
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  expected = torch_logits(imported["tree"], images)  # in the file's order, CLASSES
  order = [CLASSES.index(name) for name in dataset["class_names"]]
  assert_logits_close(logits_of(model, images), expected[:, order])
  assert "reordered to sorted names" in imported["summary"]


def test_generated_config_file_reads_the_runs_config(imported):
  path = os.path.join(imported["workdir"], import_t7.CONFIG_FILE)
  spec = importlib.util.spec_from_file_location("imported_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config, _ = checkpoint.load_run_info(imported["workdir"])
  assert module.get_config().to_dict() == config.to_dict()


def test_eval_mode_on_an_image_folder_scores_the_original_forward(imported, tmp_path):
  from PIL import Image
  from lcnn_jax.data import transforms
  rng = np.random.default_rng(zlib.crc32(b"folder"))
  paths, labels = [], []
  for split, count in (("train", 1), ("val", 2)):
    for label, name in enumerate(sorted(CLASSES)):
      os.makedirs(tmp_path / split / name)
      for i in range(count):
        path = str(tmp_path / split / name / f"{i}.JPEG")
        Image.fromarray(rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)).save(path)
        if split == "val":
          paths.append(path)
          labels.append(label)
  spec = importlib.util.spec_from_file_location("imported_config", os.path.join(imported["workdir"], "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dir = str(tmp_path)
  config.train.eval_batch_size = 8  # 20 images: the last batch is padded and masked
  metrics = train.evaluate_checkpoint(config, imported["workdir"])
  # The same images through the original's forward: resize 109, centre crop 95, its mean/std; labels by name.
  transform = transforms.PhotoTransform(IMAGE_SIZE, round(IMAGE_SIZE * 256 / 224), 3)
  normalize = transforms.Normalize(MEAN, STD)
  images = np.stack([normalize(transform.eval(open(path, "rb").read())) for path in paths])
  logits = torch_logits(imported["tree"], images)[:, [CLASSES.index(name) for name in sorted(CLASSES)]]
  log_probabilities = logits - logits.max(1, keepdims=True)
  log_probabilities -= np.log(np.exp(log_probabilities).sum(1, keepdims=True))
  labels = np.array(labels)
  assert metrics["count"] == 20 and metrics["step"] == 0
  assert metrics["loss"] == pytest.approx(-log_probabilities[np.arange(20), labels].mean(), rel=1e-4)
  assert metrics["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))


def export_command(*args):
  """The exit status of ``python -m lcnn_jax.inference.exporter ARGS``, run in this process."""
  return cli.call(exporter.main, exporter.define_flags, ["exporter", *args])


def flops_command(*args):
  """The exit status of ``python -m lcnn_jax.flops ARGS``, run in this process."""
  return cli.call(inspection.main, inspection.define_flags, ["flops", *args])


def bench_command(*args):
  """The exit status of ``python -m lcnn_jax.bench ARGS``, run in this process."""
  return cli.call(bench.main, bench.define_flags, ["bench", *args])


def test_flops_exporter_and_bench_read_the_imported_run(imported, tmp_path, rng):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert flops_command("--workdir", imported["workdir"]) == 0
  report = out.getvalue()
  assert "alexnet-lcnn at step 0 on 95x95x3 inputs" in report and "speedup:" in report
  output = str(tmp_path / "model.npz")
  with contextlib.redirect_stdout(io.StringIO()):
    assert export_command("--workdir", imported["workdir"], "--output", output,
                          "--backends", "dense") == 0
  exported = exporter.load(output)
  assert exported.class_names == sorted(CLASSES)
  assert exported.preprocessing["mean"] == MEAN and exported.preprocessing["std"] == STD
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  order = [CLASSES.index(name) for name in sorted(CLASSES)]
  expected = torch_logits(imported["tree"], images)[:, order]
  got = np.asarray(exported(images.astype(np.float32)), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert bench_command("--checkpoint", imported["workdir"], "--backends", "dense", "--seconds", "0.05",
                         "--json") == 0
  rows = json.loads(out.getvalue())["rows"]
  assert {(row["model"], row["preset"], row["batch"]) for row in rows} == {("alexnet-lcnn", "trained", 1)}
  assert rows[0]["count_speedup"] == pytest.approx(float(report.split("speedup: ")[1].split("x")[0]), rel=1e-3)


def test_mismatch_against_the_config_names_the_module_and_writes_nothing(imported, tmp_path):
  spec = importlib.util.spec_from_file_location("alexnet_fast", os.path.join(REPO, "configs", "alexnet_fast.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()  # conv2..conv5 with 30 atoms; the file has 5, 6, 7, 8
  with pytest.raises(import_t7.T7ImportError, match=r"model.modules\[1\].modules\[1\] .* initial sparsity 0.3 "
                     r"does not fit conv1 .* initial sparsity 0.01 \(model.initial_sparsity\)"):
    import_t7.import_run(imported["model"], str(tmp_path / "run"), config=config, image_size=IMAGE_SIZE,
                         meanstd=imported["meanstd"])
  config.model.initial_sparsity = 0.3
  workdir = str(tmp_path / "run")
  with pytest.raises(import_t7.T7ImportError) as error:
    import_t7.import_run(imported["model"], workdir, config=config, image_size=IMAGE_SIZE,
                         meanstd=imported["meanstd"])
  message = str(error.value)
  assert "model.modules[1].modules[5] (cudnn.PooledSpatialConvolution)" in message
  assert "dictionary 5" in message and "dictionary 30 (model.dictionary.convs)" in message and "conv2" in message
  assert os.listdir(tmp_path) == []  # no run, no temporary directory


def import_command(*args):
  """The exit status of ``python -m lcnn_jax.import_t7 ARGS``, run in this process."""
  return cli.call(import_t7.main, import_t7.define_flags, ["import_t7", *args], user_errors=import_t7.USER_ERRORS)


def test_command_with_the_config_the_file_was_trained_with(imported, tmp_path, rng, capsys):
  workdir = str(tmp_path / "run")
  given = [imported["model"], "--workdir", workdir, "--config", os.path.join(REPO, "configs", "alexnet_fast.py"),
           "--config.model.dictionary.fc=8", "--config.model.initial_sparsity=0.3", "--image_size=95",
           "--mean=0.5,0.5,0.5", "--std=0.25,0.25,0.25"]
  assert import_command(*given, "--config.model.dictionary.convs", "(5,6,7,8)") == 2
  assert "(got 2 files: " + imported["model"] + " (5,6,7,8); give a tuple flag its value after '='" in (
      capsys.readouterr().err)
  assert os.listdir(tmp_path) == []
  assert import_command(*given, "--config.model.dictionary.convs=(5,6,7,8)") == 0
  assert capsys.readouterr().out.startswith(f"{workdir}: alexnet-lcnn from {imported['model']}, 10 classes")
  config, dataset = checkpoint.load_run_info(workdir)
  assert config.sparsity.target_speedup == 37.6  # the preset's own, beside the file's sizes
  assert tuple(config.model.dictionary.convs) == (5, 6, 7, 8) and dataset["mean"] == [0.5] * 3
  model, _, _ = checkpoint.restore_model(workdir)
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  assert_logits_close(logits_of(model, images), torch_logits(imported["tree"], images))  # the file's class order


def test_a_known_module_out_of_place_names_what_was_expected_there(tmp_path):
  tree = tree_of("order")
  features = tree["modules"][0]
  features.fields["modules"] = features["modules"][:3] + [t7_writer.Factory().dropout(0.5)] + features["modules"][3:]
  t7_writer.write(str(tmp_path / "model.t7"), tree)
  with pytest.raises(import_t7.T7ImportError, match=re.escape(
      "model.modules[1].modules[4] (nn.Dropout) does not fit alexnet-lcnn: expected a 3x3/2 SpatialMaxPooling after "
      "model.modules[1].modules[3] (cudnn.ReLU).")):
    import_t7.import_model(str(tmp_path / "model.t7"), image_size=IMAGE_SIZE)


def test_an_existing_run_is_never_written_over(imported, tmp_path, rng):
  workdir = str(tmp_path / "run")
  shutil.copytree(imported["workdir"], workdir)
  before = {os.path.relpath(os.path.join(d, f), workdir): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(workdir) for f in files}
  with pytest.raises(import_t7.T7ImportError, match="already exists and is not empty"):
    import_t7.import_run(imported["model"], workdir, image_size=IMAGE_SIZE, mean=["0.5"] * 3, std=["0.25"] * 3)
  after = {os.path.relpath(os.path.join(d, f), workdir): open(os.path.join(d, f), "rb").read()
           for d, _, files in os.walk(workdir) for f in files}
  assert after == before and os.listdir(tmp_path) == ["run"]
  model, _, _ = checkpoint.restore_model(workdir)  # still the run it was, with the file's normalisation
  assert checkpoint.load_run_info(workdir)[1]["mean"] == MEAN
  images = rng.normal(size=(1, IMAGE_SIZE, IMAGE_SIZE, 3))
  order = [CLASSES.index(name) for name in sorted(CLASSES)]
  assert_logits_close(logits_of(model, images), torch_logits(imported["tree"], images)[:, order])


def test_the_import_writes_its_checkpoint_through_the_checkpoint_module(imported, tmp_path, monkeypatch):
  saved = []
  save_model = checkpoint.save_model
  monkeypatch.setattr(checkpoint, "save_model", lambda *a, **k: saved.append(k) or save_model(*a, **k))
  workdir = str(tmp_path / "run")
  import_t7.import_run(imported["model"], workdir, image_size=IMAGE_SIZE, meanstd=imported["meanstd"])
  assert saved == [{"step": import_t7.IMPORTED_STEP, "imported_from": os.path.abspath(imported["model"])}]
  assert checkpoint.restore_model(workdir)[2] == import_t7.IMPORTED_STEP  # (the trainer refuses to resume it:
  # test_checkpoint's test of save_model)


def test_an_import_interrupted_while_writing_leaves_no_run(imported, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()  # an empty --workdir is accepted, and must stay empty
  written = []

  def interrupt(model, run_dir, image_shape):  # the checkpoint and config.json are on disk by now
    written.extend(sorted(os.listdir(run_dir)))
    raise KeyboardInterrupt

  monkeypatch.setattr(import_t7, "_check_round_trip", interrupt)
  with pytest.raises(KeyboardInterrupt):
    import_t7.import_run(imported["model"], str(workdir), image_size=IMAGE_SIZE, meanstd=imported["meanstd"])
  assert written == ["checkpoints", "config.json", "config.py"]
  assert os.listdir(tmp_path) == ["run"] and os.listdir(workdir) == []  # no temporary directory either
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore_model(str(workdir))


def test_side_file_mistakes_are_clear(imported, tmp_path):
  with pytest.raises(import_t7.T7ImportError, match="--meanstd PATH, or --mean R,G,B --std R,G,B"):
    import_t7.import_run(imported["model"], str(tmp_path / "a"), image_size=IMAGE_SIZE)
  names = tmp_path / "classes.txt"
  names.write_text("\n".join(CLASSES[:9]) + "\n")
  with pytest.raises(import_t7.T7ImportError, match="--classes gives 9 names; the model's classifier "
                     r"model.modules\[2\].modules\[9\] has 10 outputs"):
    import_t7.import_run(imported["model"], str(tmp_path / "b"), image_size=IMAGE_SIZE, classes=str(names),
                         mean=["0.5"] * 3, std=["0.25"] * 3)
  with pytest.raises(import_t7.T7ImportError, match=r"model.modules\[2\].modules\[2\] .* 2x2, .* does not fit fc6 .* "
                     r"6x6, .*; fc6's 6x6 kernel covers the map of 224x224 inputs \(--image_size\)"):
    import_t7.import_run(imported["model"], str(tmp_path / "c"), meanstd=imported["meanstd"])  # 95x95 inputs
  assert sorted(os.listdir(tmp_path)) == ["classes.txt"]


def _command(*args, cwd):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "lcnn_jax.import_t7", *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=300)


def test_command_stops_on_an_unknown_module_with_its_path_and_exit_2(tmp_path):
  tree = tree_of("unknown")
  tree["modules"][0]["modules"][2] = t7_writer.Module("nn.Tanh", train=False)  # conv1's ReLU
  t7_writer.write(str(tmp_path / "model.t7"), tree)
  result = _command("model.t7", "--workdir", "run", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2",
                    cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: model.modules[1].modules[3] is a nn.Tanh, which the importer does not know" in result.stderr
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["model.t7"]


def test_reader_gives_the_writers_tensors_for_cpu_and_cuda_types(tmp_path):
  for tensor_type in (*TENSOR_TYPES, "torch.CudaHalfTensor"):
    tree = tree_of("reader", tensor_type)
    path = str(tmp_path / f"{tensor_type}.t7")
    t7_writer.write(path, tree)
    leaves = import_t7.flatten(import_t7.read_t7(path))
    assert [leaf.path for leaf in leaves][:2] == ["model.modules[1].modules[1]", "model.modules[1].modules[2]"]
    layer = import_t7.read_layer(leaves[0])
    conv1 = tree["modules"][0]["modules"][0]
    np.testing.assert_array_equal(layer.coefficients, conv1["alignconv"]["weight"].array.astype(np.float32))
    np.testing.assert_array_equal(layer.dictionary,
                                  conv1["poolconv"]["weight"].array.reshape(3, 3).astype(np.float32))
    assert layer.threshold == conv1["sparseTh"]
    assert leaves[0].typename == "cudnn.PooledSpatialConvolution" and leaves[0].kind == "lookup"
  # A model saved inside nn.DataParallelTable (replicas on several GPUs) is read from its first replica.
  t7_writer.write(path, t7_writer.Module("nn.DataParallelTable", modules=[tree, tree_of("replica")], train=False))
  wrapped = import_t7.flatten(import_t7.read_t7(path))
  assert [leaf.path for leaf in wrapped] == [leaf.path.replace("model.", "model.modules[1].", 1) for leaf in leaves]
  np.testing.assert_array_equal(import_t7.read_layer(wrapped[0]).coefficients, layer.coefficients)


def test_a_truncated_or_foreign_file_is_an_error_not_garbage(tmp_path):
  path = tmp_path / "model.t7"
  t7_writer.write(str(path), tree_of("truncated"))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # an interrupted download, cut inside a storage
  with pytest.raises(import_t7.T7ImportError, match="ends early .* values ends after .* Fetch the file again"):
    import_t7.read_t7(str(path))
  path.write_bytes(data[:-2])  # cut inside the last number
  with pytest.raises(import_t7.T7ImportError, match="is truncated: it ends early"):
    import_t7.read_t7(str(path))
  path.write_bytes(data + data[:8])  # more than torch.save wrote: a resumed download appended to the file
  with pytest.raises(import_t7.T7ImportError, match=f"goes on for 8 bytes after the object torch.save wrote .*byte "
                     f"{len(data)} of {len(data) + 8}"):
    import_t7.read_t7(str(path))
  path.write_bytes(b"PK\x03\x04 not a Torch7 file")
  with pytest.raises(import_t7.T7ImportError, match="is not a readable Torch7 binary file"):
    import_t7.read_t7(str(path))
  t7_writer.write(str(path), {"weights": t7_writer.Tensor(np.ones(3), "torch.FloatTensor")})
  with pytest.raises(import_t7.T7ImportError, match="model is a Lua table, not a Torch module"):
    import_t7.flatten(import_t7.read_t7(str(path)))


def test_a_file_cut_at_any_of_its_last_32_bytes_is_an_error_and_leaves_no_run(tmp_path, capsys):
  """torchfile takes a string cut short as a shorter string, so a file cut inside its last string (here the last
  module's ``_type``, a table that lists it last) would import; every cut is refused, with exit status 2."""
  import torchfile
  tree = tree_of("cut")
  log_softmax = tree["modules"][1]["modules"][-1]
  log_softmax.fields = {k: v for k, v in log_softmax.fields.items() if k != "_type"} | {
      "_type": log_softmax["_type"]}
  whole = tmp_path / "whole.t7"
  t7_writer.write(str(whole), tree)
  data = whole.read_bytes()
  assert data.endswith(b"_type\x02\x00\x00\x00\x10\x00\x00\x00torch.CudaTensor")  # the file ends in its 16 bytes
  import_t7.read_t7(str(whole))
  path = tmp_path / "model.t7"
  for cut in range(1, 33):
    path.write_bytes(data[:-cut])
    if cut <= 16:
      torchfile.load(str(path))  # torchfile alone reads it, with a shorter last string
    assert import_command(str(path), "--workdir", str(tmp_path / "run"), "--image_size=95", "--mean=0.5,0.5,0.5",
                          "--std=0.25,0.25,0.25") == 2, f"cut {cut}"
    error = capsys.readouterr().err
    assert error.startswith(f"error: {path} is truncated: it ends early (") and error.count("\n") == 1, error
    assert sorted(os.listdir(tmp_path)) == ["model.t7", "whole.t7"]
  path.write_bytes(data[:-1])  # as an installed command: one paragraph, no traceback
  result = _command("model.t7", "--workdir", "run", "--image_size", "95", "--mean", "0.5,0.5,0.5", "--std",
                    "0.25,0.25,0.25", cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("error: model.t7 is truncated: it ends early (16 bytes due at byte "), result.stderr
  assert "Traceback" not in result.stderr and result.stdout == ""
  assert sorted(os.listdir(tmp_path)) == ["model.t7", "whole.t7"]


def test_batch_norm_of_older_files_and_without_affine(tmp_path, rng):
  from flax import nnx
  factory = t7_writer.Factory("torch.FloatTensor")
  var = rng.uniform(0.5, 2.0, 4)
  old = t7_writer.Module("nn.SpatialBatchNormalization", eps=1e-3, affine=False, weight=None, bias=None,
                         running_mean=factory.tensor(rng.normal(size=4)),
                         running_std=factory.tensor(1 / np.sqrt(var + 1e-3)))  # nn before running_var
  path = str(tmp_path / "bn.t7")
  t7_writer.write(path, factory.sequential([old]))
  (leaf,) = import_t7.flatten(import_t7.read_t7(path))
  values = import_t7.batch_norm_values(leaf, nnx.BatchNorm(4, epsilon=1e-3, rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(values["var"], var, rtol=1e-5)
  np.testing.assert_array_equal(values["scale"], np.ones(4))
  np.testing.assert_array_equal(values["bias"], np.zeros(4))
  with pytest.raises(import_t7.T7ImportError, match=r"model.modules\[1\] \(nn.SpatialBatchNormalization\): "
                     "eps=0.001; expected 1e-05"):
    import_t7.batch_norm_values(leaf, nnx.BatchNorm(4, epsilon=1e-5, rngs=nnx.Rngs(0)))


def test_training_in_an_imported_workdir_is_refused_and_the_checkpoint_kept(imported, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(imported["workdir"], workdir)
  with pytest.raises(checkpoint.CheckpointError, match="train.init_from=") as error:
    checkpoint.Checkpointer(workdir).restore_latest(template=None, data_iter=None)
  assert "imported from" in str(error.value)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
