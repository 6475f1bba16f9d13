"""The source registry: a data source registered only here trains, is counted and exports, with no other module
changed; the run saves its preprocessing and the exporter reads it (an older run's is derived from its source)."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from lcnn_jax import data, inspection, train
from lcnn_jax.data import pipeline, registry, sources, transforms
from lcnn_jax.inference import exporter, predict

STORED_SIZE = 12  # The fake source's images are 12×12 RGB PNGs; crops of 8 (their natural size) are trained on.
NATURAL_SIZE = 8
CLASSES = ("red", "green", "blue")


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


class EncodedSource:
  """PNG-encoded records in memory: a bright square of its class's colour on a noisy background."""

  def __init__(self, split: int, count: int):
    rng = np.random.default_rng(split)
    self.labels = (np.arange(count) % len(CLASSES)).astype(np.int32)  # (count,)
    self.records = []
    for label in self.labels:
      image = rng.integers(0, 64, (STORED_SIZE, STORED_SIZE, 3), np.uint8)
      image[3:9, 3:9, label] = 255
      self.records.append(_png(image))

  def __len__(self) -> int:
    return len(self.labels)

  def describe(self, index: int) -> str:
    return f"squares record {index}"

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    return self.records[index], int(self.labels[index])


def open_squares(config: data.SourceConfig) -> sources.Splits:
  return sources.Splits(EncodedSource(0, 48), EncodedSource(1, 12), len(CLASSES), list(CLASSES), channels=3,
                        natural_size=NATURAL_SIZE)


SQUARES = data.Source(
    name="squares", open=open_squares,
    transform=lambda config, splits, image_size, resize_size: transforms.PhotoTransform(image_size, resize_size, 3),
    input_facts=lambda data_config: (len(CLASSES), (data_config.image_size or NATURAL_SIZE,) * 2 + (3,)),
    reads_files=False)


@pytest.fixture
def registered(monkeypatch):
  """Registers the squares source for one test (the registry is restored after it)."""
  monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
  pipeline._open_cached.cache_clear()  # pylint: disable=protected-access
  data.register_source(SQUARES)
  yield SQUARES
  pipeline._open_cached.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def trained_squares(tiny_config, tmp_path_factory):
  """A 4-step run of the digits LCNN on the squares source, trained once for this module: (config, workdir)."""
  config = tiny_config(data={"name": "squares"},
                       train={"num_steps": 4, "batch_size": 8, "eval_every": 4, "eval_batch_size": 12})
  workdir = str(tmp_path_factory.mktemp("squares") / "run")
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    data.register_source(SQUARES)
    train.train_and_evaluate(config, workdir)
  pipeline._open_cached.cache_clear()  # pylint: disable=protected-access
  return config, workdir


@pytest.fixture
def squares_run(registered, trained_squares, tmp_path):
  """A copy of the squares run, with the squares source registered: (config, workdir)."""
  config, workdir = trained_squares
  shutil.copytree(workdir, tmp_path / "run")
  return config, str(tmp_path / "run")


def test_a_source_registered_here_trains_is_counted_and_exports(squares_run, tmp_path):
  config, workdir = squares_run
  with open(os.path.join(workdir, "config.json")) as f:
    dataset = json.load(f)["dataset"]
  assert dataset["name"] == "squares" and dataset["num_eval"] == 12 and dataset["image_shape"] == [8, 8, 3]
  assert dataset["preprocessing"] == {"image_size": 8, "resize_size": 9, "channels": 3, "mean": dataset["mean"],
                                      "std": dataset["std"]}

  untrained = inspection.inspect_run(config=config)
  trained = inspection.inspect_run(workdir)
  assert untrained["input_shape"] == trained["input_shape"] == [8, 8, 3]
  assert untrained["num_classes"] == trained["num_classes"] == 3
  assert trained["total_multiplications"] > 0 and trained["step"] == 4

  exported = exporter.export(workdir, tmp_path / "squares.npz", backends="dense")
  assert exported.preprocessing == dataset["preprocessing"] | {"dataset": "squares"}
  assert exported.class_names == list(CLASSES)
  # A PNG of an eval record, prepared by the prediction command, is the image evaluation scored.
  info = data.dataset_info(config.data, cache_dir=workdir)
  batch = next(iter(data.make_eval_iterator(config.data, info, global_batch_size=12)))
  path = tmp_path / "record0.png"
  path.write_bytes(open_squares(None).eval[0][0])
  np.testing.assert_array_equal(predict.load_image(str(path), exported), batch["image"][0])


def test_the_exporter_reads_the_saved_preprocessing_and_derives_an_older_runs(squares_run, tmp_path):
  _, workdir = squares_run
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["dataset"]["preprocessing"]["resize_size"] = 11  # a value no rule derives: proves the saved one is read
  with open(path, "w") as f:
    json.dump(saved, f)
  assert exporter.export(workdir, backends="dense").preprocessing["resize_size"] == 11
  del saved["dataset"]["preprocessing"]  # a run written before the preprocessing was saved
  with open(path, "w") as f:
    json.dump(saved, f)
  derived = exporter.export(workdir, backends="dense").preprocessing
  assert derived == {"image_size": 8, "resize_size": 9, "channels": 3, "mean": saved["dataset"]["mean"],
                     "std": saved["dataset"]["std"], "dataset": "squares"}


def test_a_registered_source_is_validated_and_named_in_the_errors(registered, tiny_config):
  config = tiny_config(data={"name": "squares"})
  data.validate_config(config.data)
  assert inspection.input_facts(config) == (3, (8, 8, 3))
  assert "squares" in data.source_names()
  with pytest.raises(ValueError, match=r"data.name='circles': expected one of \(.*'squares'.*\)"):
    data.get_source("circles")
  with pytest.raises(ValueError, match=r"data.flip=True: only the sources \('fashion_mnist', 'idx'\) take it"):
    data.validate_config(tiny_config(data={"name": "squares", "flip": True}).data)


@pytest.mark.parametrize("name,found", [("tfds:mnist", "tfds:mnist"), ("tfds:cifar10", "tfds:"), ("tfds:", None),
                                        ("digits", "digits"), ("digit", None)])
def test_a_family_matches_its_datasets_and_a_registered_member_comes_first(name, found):
  source = data.find_source(name)
  assert (source.name if source else None) == found
  if found is None:
    with pytest.raises(ValueError, match=r"expected one of \('digits', 'fashion_mnist', 'folder', 'idx', "
                                         r"'synthetic', 'tfds:<name>'\)"):
      data.get_source(name)


@pytest.mark.parametrize("name,image_size,resize_size,expected", [
    ("digits", 16, 0, 16), ("idx", 0, 0, 28), ("fashion_mnist", 32, 0, 32),  # evaluated whole
    ("folder", 224, 0, 256), ("folder", 224, 300, 300), ("tfds:imagenet2012", 160, 0, 183), ("synthetic", 64, 0, 73)])
def test_an_older_runs_resize_rule_comes_from_its_source(tiny_config, name, image_size, resize_size, expected):
  config = tiny_config(data={"name": name, "resize_size": resize_size})
  channels = 1 if name in ("digits", "idx", "fashion_mnist") else 3
  size = image_size or 28
  dataset = {"name": name, "image_shape": [size, size, channels], "mean": [0.5] * channels,
             "std": [0.25] * channels}
  assert data.preprocessing(config.data, dataset) == {"image_size": size, "resize_size": expected,
                                                       "channels": channels, "mean": [0.5] * channels,
                                                       "std": [0.25] * channels}


def test_grey_sources_state_their_polarity_and_photos_none():
  assert "white (bright) strokes" in data.get_source("digits").polarity
  assert "garment" in data.get_source("tfds:fashion_mnist").polarity
  assert data.get_source("tfds:emnist").polarity is None and data.get_source("folder").polarity is None
