"""Tests of the input pipeline: every source on small data made here, eval coverage, resume, errors."""

from __future__ import annotations

import io
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds
from PIL import Image

from lcnn_jax import data
from lcnn_jax.config import default_config
from lcnn_jax.data import pipeline
from lcnn_jax.data import sources
from lcnn_jax.data import transforms


def _data_config(**overrides):
  config = default_config().data
  for key, value in overrides.items():
    config[key] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for a, b in zip(expected, actual):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def _encoded(array, image_format):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format)
  return buffer.getvalue()


def _random_photo(rng, image_format="JPEG"):
  height, width = rng.integers(20, 41, size=2)
  return _encoded(rng.integers(0, 256, (height, width, 3), np.uint8), image_format)


# ------------------------------------------------------------------ an image folder


FOLDER_CLASSES = ("cat", "dog", "fish")
FOLDER_BAD_TRAIN = 3  # One truncated JPEG, one zero-byte file, one text file named .jpeg.


def _write_folder(root, rng):
  """3 classes × 4 good training images (+ 3 unreadable ones, + 1 ignored .txt); 2 val images each.

  Val images are solid colours, value 40·k + 10 for val image k, so each can be recognised.
  """
  extensions = {"cat": (".jpg", "JPEG"), "dog": (".JPEG", "JPEG"), "fish": (".png", "PNG")}
  for label, name in enumerate(FOLDER_CLASSES):
    train_dir, val_dir = root / "train" / name, root / "val" / name
    train_dir.mkdir(parents=True)
    val_dir.mkdir(parents=True)
    extension, image_format = extensions[name]
    for i in range(4):
      (train_dir / f"img{i}{extension}").write_bytes(_random_photo(rng, image_format))
    for i in range(2):
      k = 2 * label + i
      solid = np.full((24 + 4 * i, 30, 3), 40 * k + 10, np.uint8)
      (val_dir / f"img{i}.png").write_bytes(_encoded(solid, "PNG"))
  good = _random_photo(rng)
  (root / "train" / "cat" / "img2_truncated.jpg").write_bytes(good[:len(good) // 2])
  (root / "train" / "dog" / "img1_empty.jpg").write_bytes(b"")
  (root / "train" / "fish" / "img0_text.jpeg").write_bytes(b"not an image at all\n")
  (root / "train" / "fish" / "notes.txt").write_text("ignored: no image extension\n")
  return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp("imagenet"), np.random.default_rng(0))


def _folder_config(root, **overrides):
  settings = dict(name="folder", dir=str(root), image_size=16, resize_size=20)
  settings.update(overrides)
  return _data_config(**settings)


def test_folder_dataset_info_indexes_images_of_any_extension_case_and_ignores_other_files(
    image_folder, tmp_path):
  info = data.dataset_info(_folder_config(image_folder), cache_dir=str(tmp_path))
  assert info.class_names == list(FOLDER_CLASSES)
  assert info.num_classes == 3
  assert info.num_train == 12 + FOLDER_BAD_TRAIN
  assert info.num_eval == 6
  assert info.image_shape == (16, 16, 3)
  assert len(info.mean) == len(info.std) == 3
  assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)


def test_folder_train_batches_are_normalised_crops_with_labels(image_folder, tmp_path):
  config = _folder_config(image_folder)
  info = data.dataset_info(config, cache_dir=str(tmp_path))
  batch = next(data.make_train_iterator(config, info, global_batch_size=5, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
  assert set(batch["label"]) <= {0, 1, 2}


def test_folder_corrupt_images_are_replaced_counted_and_named_in_a_warning(image_folder, caplog):
  config = _folder_config(image_folder, mean=(0.5,) * 3, std=(0.25,) * 3)
  info = data.dataset_info(config)
  before = data.corrupt_count()
  iterator = data.make_train_iterator(config, info, global_batch_size=5, seed=1)
  with caplog.at_level("WARNING"):
    one_epoch = _take(iterator, 3)  # 15 records, each read once, the 3 unreadable ones replaced.
  assert data.corrupt_count() - before == FOLDER_BAD_TRAIN
  assert all(np.isfinite(b["image"]).all() for b in one_epoch)
  for name in ("img2_truncated.jpg", "img1_empty.jpg", "img0_text.jpeg"):
    assert name in caplog.text


def test_folder_fatal_corrupt_raises_naming_the_file(image_folder):
  config = _folder_config(image_folder, mean=(0.5,) * 3, std=(0.25,) * 3, fatal_corrupt=True)
  info = data.dataset_info(config)
  iterator = data.make_train_iterator(config, info, global_batch_size=5, seed=1)
  with pytest.raises(data.CorruptImageError, match=r"img2_truncated\.jpg|img1_empty\.jpg|img0_text"):
    _take(iterator, 3)


def test_folder_eval_covers_every_val_image_once_in_order(image_folder):
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  config = _folder_config(image_folder, mean=mean, std=std)
  info = data.dataset_info(config)
  batches = list(data.make_eval_iterator(config, info, global_batch_size=4))
  assert len(batches) == 2
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 6 + [False] * 2)
  images = np.concatenate([b["image"] for b in batches])[mask]
  pixels = np.round((images * 0.25 + 0.5) * 255)
  # Val image k of the sorted listing is a solid 40·k + 10: order and identity are both checked.
  np.testing.assert_array_equal(pixels, np.broadcast_to(
      (40 * np.arange(6) + 10)[:, None, None, None], pixels.shape))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask],
                                [0, 0, 1, 1, 2, 2])


def test_unreadable_eval_image_is_masked_and_counted(tmp_path):
  root = _write_folder(tmp_path / "data", np.random.default_rng(1))
  (root / "val" / "dog" / "img1.png").write_bytes(b"")
  config = _folder_config(root, mean=(0.5,) * 3, std=(0.25,) * 3)
  info = data.dataset_info(config)
  before = data.corrupt_count()
  batches = list(data.make_eval_iterator(config, info, global_batch_size=6))
  np.testing.assert_array_equal(batches[0]["mask"], [True, True, True, False, True, True])
  assert data.corrupt_count() - before == 1


def test_mean_std_are_cached_in_cache_dir_and_reused(image_folder, tmp_path):
  config = _folder_config(image_folder)
  info = data.dataset_info(config, cache_dir=str(tmp_path))
  path = tmp_path / pipeline.STATS_FILE
  cached = json.loads(path.read_text())
  assert tuple(cached["mean"]) == info.mean and tuple(cached["std"]) == info.std
  cached["mean"] = [0.125, 0.25, 0.375]  # A value no computation gives: proves the file is read.
  path.write_text(json.dumps(cached))
  assert data.dataset_info(config, cache_dir=str(tmp_path)).mean == (0.125, 0.25, 0.375)
  other = _folder_config(image_folder, image_size=12, resize_size=14)
  assert data.dataset_info(other, cache_dir=str(tmp_path)).mean != (0.125, 0.25, 0.375)


def test_photo_transform_train_is_a_window_of_the_resized_image_maybe_mirrored():
  rng = np.random.default_rng(3)
  array = rng.integers(0, 256, (30, 45, 3), np.uint8)
  encoded = _encoded(array, "PNG")
  transform = transforms.PhotoTransform(image_size=16, resize_size=20, channels=3)
  resized = np.asarray(Image.fromarray(array).resize((30, 20), Image.BILINEAR))  # (20, 30, 3)
  np.testing.assert_array_equal(transform.eval(encoded), resized[2:18, 7:23])
  flips = 0
  for seed in range(40):
    crop = transform.train(encoded, np.random.default_rng(seed))
    windows = [resized[t:t + 16, l:l + 16] for t in range(5) for l in range(15)]
    plain = any(np.array_equal(crop, w) for w in windows)
    mirrored = any(np.array_equal(crop[:, ::-1], w) for w in windows)
    assert plain or mirrored
    flips += mirrored and not plain
  assert 8 <= flips <= 32


# ------------------------------------------------------------------ folder errors


def test_missing_or_unset_folder_stops_with_the_expected_layout(tmp_path):
  with pytest.raises(ValueError, match=r"data\.dir.*DIR/train/<class>/\*\.JPEG.*--config\.data\.dir"):
    data.dataset_info(_folder_config(""))
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=rf"{missing}.*{missing}/train/<class>/\*\.JPEG"):
    data.dataset_info(_folder_config(missing))
  (tmp_path / "train" / "cat").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/val does not exist"):
    data.dataset_info(_folder_config(tmp_path))


def test_empty_class_folder_stops_naming_it(tmp_path):
  root = _write_folder(tmp_path / "data", np.random.default_rng(2))
  for path in (root / "val" / "fish").iterdir():
    path.unlink()
  with pytest.raises(ValueError, match=rf"{root}/val/fish holds no images.*<class>/\*\.JPEG"):
    data.dataset_info(_folder_config(root))


def test_different_train_and_val_classes_stop_naming_them(tmp_path):
  root = _write_folder(tmp_path / "data", np.random.default_rng(2))
  (root / "val" / "fish").rename(root / "val" / "bird")
  with pytest.raises(ValueError, match=r"differ: 1 only in train \['fish'\], 1 only in val \['bird'\]"):
    data.dataset_info(_folder_config(root))


def test_flat_val_folder_stops_with_a_hint(tmp_path):
  root = _write_folder(tmp_path / "data", np.random.default_rng(2))
  for class_dir in list((root / "val").iterdir()):
    for path in class_dir.iterdir():
      path.rename(root / "val" / f"{class_dir.name}_{path.name}")
    class_dir.rmdir()
  with pytest.raises(ValueError, match=r"val has no class folders.*holds 6 images directly"):
    data.dataset_info(_folder_config(root))


def test_bad_config_values_are_rejected_naming_the_key():
  with pytest.raises(ValueError, match=r"data\.name='imagenet'"):
    data.dataset_info(_data_config(name="imagenet"))
  with pytest.raises(ValueError, match=r"data\.resize_size=20 is smaller than data\.image_size=32"):
    data.dataset_info(_data_config(name="synthetic", image_size=32, resize_size=20))
  with pytest.raises(ValueError, match=r"data\.mean=.*give both"):
    data.dataset_info(_data_config(mean=(0.5,)))
  with pytest.raises(ValueError, match=r"expected 1 values each"):
    data.dataset_info(_data_config(mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0)))
  info = data.dataset_info(_data_config())
  with pytest.raises(ValueError, match=r"Global batch size 30 .* divisible by the process count 4"):
    data.make_train_iterator(_data_config(), info, global_batch_size=30, seed=0, process_count=4)


# ------------------------------------------------------------------ TFDS array_record


class LcnnTestImages(tfds.core.GeneratorBasedBuilder):
  """12 train / 5 validation PNGs of varying size, 3 classes (2, 3, 7 train images), no TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  TRAIN_LABELS = (0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 1)
  VALIDATION_LABELS = (2, 0, 1, 0, 2)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.TRAIN_LABELS, 0),
            "validation": self._generate_examples(self.VALIDATION_LABELS, 1)}

  def _generate_examples(self, labels, seed):
    rng = np.random.default_rng(seed)
    for i, label in enumerate(labels):
      # Encoded bytes: encoding an array would need TensorFlow.
      yield i, {"image": _random_photo(rng, "PNG"), "label": label}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  LcnnTestImages(data_dir=str(directory)).download_and_prepare(file_format="array_record")
  return directory


def _tfds_config(directory, **overrides):
  settings = dict(name="tfds:lcnn_test_images", dir=str(directory), image_size=16, resize_size=18)
  settings.update(overrides)
  return _data_config(**settings)


def test_tfds_array_record_source_reads_without_tensorflow(tfds_dir, tmp_path):
  config = _tfds_config(tfds_dir)
  info = data.dataset_info(config, cache_dir=str(tmp_path))
  assert (info.num_classes, info.class_names) == (3, ["red", "green", "blue"])
  assert (info.num_train, info.num_eval, info.image_shape) == (12, 5, (16, 16, 3))
  batch = next(data.make_train_iterator(config, info, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
  batches = list(data.make_eval_iterator(config, info, global_batch_size=4))
  labels = np.concatenate([b["label"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
  records = tfds.data_source("lcnn_test_images", split="validation", data_dir=str(tfds_dir))
  np.testing.assert_array_equal(labels, [records[i]["label"] for i in range(5)])


def test_tfds_balanced_sampling_reads_labels_once_and_caches_them(tfds_dir, tmp_path):
  config = _tfds_config(tfds_dir, balanced=True, mean=(0.5,) * 3, std=(0.25,) * 3)
  info = data.dataset_info(config, cache_dir=str(tmp_path))
  cached = np.load(tmp_path / "labels_lcnn_test_images_train.npy")
  assert sorted(cached) == sorted(LcnnTestImages.TRAIN_LABELS)
  iterator = data.make_train_iterator(config, info, global_batch_size=60, seed=0)
  labels = np.concatenate([b["label"] for b in _take(iterator, 10)])
  fractions = np.bincount(labels, minlength=3) / len(labels)
  np.testing.assert_allclose(fractions, 1 / 3, atol=0.07)  # Unbalanced: 2/12, 3/12, 7/12.


def test_missing_tfds_dataset_names_it_and_how_to_build_it(tmp_path):
  with pytest.raises(ValueError, match=r"'no_such_images' not found in .*tfds build no_such_images"):
    data.dataset_info(_tfds_config(tmp_path, name="tfds:no_such_images"))


def test_unknown_tfds_split_lists_the_splits(tfds_dir):
  with pytest.raises(ValueError, match=r"split 'test'.*\['train', 'validation'\]"):
    data.dataset_info(_tfds_config(tfds_dir, eval_split="test"))


# ------------------------------------------------------------------ digits


def test_digits_split_is_stratified_fixed_and_scaled_to_unit_range():
  splits = sources.open_digits()
  train, evaluation = splits.train, splits.eval
  assert (len(train), len(evaluation)) == (1437, 360)
  assert train.images.shape == (1437, 8, 8, 1) and splits.channels == 1
  all_counts = np.bincount(np.concatenate([train.labels, evaluation.labels]))
  assert abs(np.bincount(evaluation.labels) - 0.2 * all_counts).max() <= 1
  assert train.images.min() == 0 and train.images.max() == 1
  again = sources.open_digits()
  np.testing.assert_array_equal(again.eval.images, evaluation.images)
  # The two splits partition the 1,797 digits.
  everything = sorted(row.tobytes() for row in (sklearn.datasets.load_digits().images / 16.0)
                      .astype(np.float32)[..., None])
  assert sorted(row.tobytes() for row in np.concatenate([train.images, evaluation.images])) == everything


def test_digits_mean_std_are_those_of_the_training_images(tmp_path):
  info = data.dataset_info(_data_config(), cache_dir=str(tmp_path))
  images = sources.open_digits().train.images
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  np.testing.assert_allclose(info.mean, [images.mean()], rtol=1e-6)
  np.testing.assert_allclose(info.std, [images.std()], rtol=1e-6)


def test_digits_training_images_are_shifts_of_at_most_one_pixel_never_mirrored():
  config = _data_config()
  info = data.dataset_info(config)
  batch = next(data.make_train_iterator(config, info, global_batch_size=64, seed=5))
  train = sources.open_digits().train
  padded = np.pad(train.images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifts = np.stack([padded[:, t:t + 8, l:l + 8] for t in range(3) for l in range(3)], 1)
  pixels = batch["image"] * info.std[0] + info.mean[0]
  for image, label in zip(pixels, batch["label"]):
    match = np.abs(shifts - image).max(axis=(2, 3, 4)) < 1e-5  # (records, 9 shifts)
    assert match.any(), "not a ±1 pixel shift of any training digit"
    assert set(train.labels[match.any(1)]) == {label}


def test_digits_upsample_to_image_size():
  config = _data_config(image_size=16)
  info = data.dataset_info(config)
  assert info.image_shape == (16, 16, 1)
  batch = next(data.make_eval_iterator(config, info, global_batch_size=8))
  assert batch["image"].shape == (8, 16, 16, 1)
  digit = sources.open_digits().eval.images[0]
  reference = np.asarray(Image.fromarray(digit[..., 0]).resize((16, 16), Image.BILINEAR))
  np.testing.assert_allclose(batch["image"][0, ..., 0] * info.std[0] + info.mean[0], reference,
                             atol=1e-5)


@pytest.mark.parametrize("process_count,global_batch", [(1, 64), (2, 64), (2, 100)])
def test_eval_covers_every_image_exactly_once_across_processes(process_count, global_batch):
  config = _data_config()
  info = data.dataset_info(config)
  per_process = [list(data.make_eval_iterator(config, info, global_batch_size=global_batch,
                                              process_index=p, process_count=process_count))
                 for p in range(process_count)]
  num_batches = -(-360 // global_batch)
  assert [len(batches) for batches in per_process] == [num_batches] * process_count
  # Global batch i is the concatenation of the processes' batch i.
  merged = [{k: np.concatenate([per_process[p][i][k] for p in range(process_count)])
             for k in ("image", "label", "mask")} for i in range(num_batches)]
  mask = np.concatenate([b["mask"] for b in merged])
  np.testing.assert_array_equal(mask, np.arange(num_batches * global_batch) < 360)
  evaluation = sources.open_digits().eval
  images = np.concatenate([b["image"] for b in merged])[mask]
  np.testing.assert_allclose(images * info.std[0] + info.mean[0], evaluation.images, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in merged])[mask],
                                evaluation.labels)


# ------------------------------------------------------------------ synthetic


def test_synthetic_examples_are_a_function_of_the_index():
  config = _data_config(name="synthetic", image_size=8, num_train=40, num_eval=10, num_classes=5)
  info = data.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes, info.image_shape) == (40, 10, 5, (8, 8, 3))
  source = pipeline._open(config).splits.train
  image, label = source[7]
  np.testing.assert_array_equal(image, source[7][0])
  assert image.dtype == np.uint8 and label == 2
  assert not np.array_equal(image, source[8][0])
  assert not np.array_equal(image, pipeline._open(config).splits.eval[7][0])


def test_processes_read_disjoint_shards_of_each_epoch_and_epochs_reshuffle():
  # With one class per example the label is the example's index.
  config = _data_config(name="synthetic", image_size=4, num_train=64, num_eval=8, num_classes=64)
  info = data.dataset_info(config)
  iterators = [data.make_train_iterator(config, info, global_batch_size=32, seed=3,
                                        process_index=p, process_count=2) for p in range(2)]
  epochs = [np.concatenate([b["label"] for it in iterators for b in _take(it, 2)]) for _ in range(2)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(64))
  assert not np.array_equal(epochs[0], epochs[1])


# ------------------------------------------------------------------ resume, workers, balance


def test_train_iterator_resumes_byte_identically_from_its_state(image_folder):
  config = _folder_config(image_folder, mean=(0.5,) * 3, std=(0.25,) * 3)
  info = data.dataset_info(config)
  iterator = data.make_train_iterator(config, info, global_batch_size=4, seed=7)
  _take(iterator, 5)  # Past the first epoch (15 records) and its unreadable images.
  state = iterator.get_state()
  json.dumps(state)  # grain's orbax handler stores the state as JSON.
  expected = _take(iterator, 6)
  resumed = data.make_train_iterator(config, info, global_batch_size=4, seed=7)
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 6))


def test_train_iterator_resumes_through_an_orbax_checkpoint_manager(tmp_path):
  config = _data_config()
  info = data.dataset_info(config)
  iterator = data.make_train_iterator(config, info, global_batch_size=16, seed=0)
  _take(iterator, 3)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
  expected = _take(iterator, 4)  # Advancing before the save finishes must not change what it holds.
  manager.wait_until_finished()
  resumed = data.make_train_iterator(config, info, global_batch_size=16, seed=0)
  manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(expected, _take(resumed, 4))
  manager.close()


def test_worker_processes_give_the_same_batches_and_count_their_skips(image_folder):
  config = _folder_config(image_folder, mean=(0.5,) * 3, std=(0.25,) * 3)
  info = data.dataset_info(config)
  in_process = _take(data.make_train_iterator(config, info, global_batch_size=5, seed=4), 3)
  in_process_eval = list(data.make_eval_iterator(config, info, global_batch_size=4))
  config.num_workers = 2
  before = data.corrupt_count()
  workers = data.make_train_iterator(config, info, global_batch_size=5, seed=4)
  _assert_batches_equal(in_process, _take(workers, 3))
  assert data.corrupt_count() - before == FOLDER_BAD_TRAIN
  workers.close()
  _assert_batches_equal(in_process_eval,
                        list(data.make_eval_iterator(config, info, global_batch_size=4)))


def test_balanced_sampling_is_uniform_over_classes():
  labels = np.repeat(np.arange(4), [1, 5, 20, 200]).astype(np.int32)
  index = pipeline.ClassIndex(labels)
  rng = np.random.default_rng(0)
  picked = labels[[index.sample(rng) for _ in range(8000)]]
  np.testing.assert_allclose(np.bincount(picked) / 8000, 0.25, atol=0.02)
  members = [index.sample(rng) for _ in range(4000)]
  rare = [m for m in members if labels[m] == 1]
  np.testing.assert_allclose(np.bincount(rare, minlength=6)[1:6] / len(rare), 0.2, atol=0.06)
