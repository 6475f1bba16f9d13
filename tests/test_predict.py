"""The prediction command on real files: many files and directories, a bad file reported and skipped, --json,
a pixel limit, a --model that is not an export, and --describe."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lcnn_jax import inference, models
from lcnn_jax import config as config_lib
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESSING = {"image_size": 8, "resize_size": 8, "channels": 1, "mean": [0.3], "std": [0.4], "dataset": "digits"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = config_lib.default_config().model
  config.update(dict(name="digits-lcnn", width=8))
  model = models.create_model(config, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  path = tmp_path_factory.mktemp("model") / "digits.npz"
  inference.save(inference.inference_model(model, (8, 8, 1), backends="dense", class_names=list("abcdefghij"),
                                           preprocessing=PREPROCESSING), path)
  return path


def predict(*args):
  return subprocess.run([sys.executable, "-m", "lcnn_jax.inference.predict", *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


def test_files_and_directories_with_a_bad_file_reported_skipped_and_json(tmp_path, exported, rng):
  photos = tmp_path / "photos"
  (photos / "more").mkdir(parents=True)
  for path in (tmp_path / "a.png", photos / "b.png", photos / "more" / "c.jpg"):
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(path)
  (photos / "notes.txt").write_text("not an image, and skipped by the directory walk")
  (photos / "broken.png").write_bytes(b"not an image")
  done = predict("--model", exported, "--json", "--top=3", tmp_path / "a.png", photos)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
  assert done.stderr.count("broken.png") == 1 and "1 of 4 image files could not be read" in done.stderr
  entries = json.loads(done.stdout)
  assert [os.path.basename(e["image"]) for e in entries] == ["a.png", "b.png", "broken.png", "c.jpg"]
  assert set(entries[2]) == {"image", "error"} and "broken.png" in entries[2]["error"]
  for entry in entries[:2] + entries[3:]:
    assert set(entry) == {"image", "top"}
    assert [set(t) for t in entry["top"]] == [{"index", "class", "probability"}] * 3
    assert entry["top"][0]["class"] == "abcdefghij"[entry["top"][0]["index"]]
    assert entry["top"][0]["probability"] >= entry["top"][1]["probability"] >= entry["top"][2]["probability"]

  text = predict("--model", exported, tmp_path / "a.png")
  assert text.returncode == 0 and text.stdout.splitlines()[0].endswith("a.png") and len(text.stdout.splitlines()) == 6
  assert text.stderr == ""  # quiet: nothing but the predictions


def test_an_image_above_the_pixel_limit_is_refused_with_our_message(tmp_path, exported, rng):
  Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(tmp_path / "big.png")
  done = predict("--model", exported, "--max_pixels=1000", tmp_path / "big.png")
  assert done.returncode == 1 and "50x40 is 2,000 pixels, above the --max_pixels limit of 1,000" in done.stderr
  assert "DecompressionBomb" not in done.stderr and "Traceback" not in done.stderr


def test_a_model_that_is_not_an_export_says_so_and_never_suggests_pickles(tmp_path):
  text = tmp_path / "model.npz"
  text.write_text("hello")
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, header=np.array([{"a": 1}], dtype=object))
  for model in (text, pickled, tmp_path / "missing.npz"):
    done = predict("--model", model, "x.png")
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("error:") == 1
    assert str(model) in done.stderr and "allow_pickle" not in done.stderr
  assert "not a model exported by lcnn_jax" in done.stderr or "no such file" in done.stderr


def test_describe_says_what_input_the_model_expects(exported):
  done = predict("--model", exported, "--describe")
  assert done.returncode == 0, done.stderr
  assert "8x8 pixels, 1 channel (grey)" in done.stdout and "white (bright) strokes on a black background" in done.stdout
  assert "classes: 10" in done.stdout


def test_help():
  for flag in ("--help", "-h"):
    done = predict(flag)
    assert done.returncode == 0 and "--describe" in done.stdout and "--json" in done.stdout
