"""``python -m lcnn_jax.throughput``: the train step and the JPEG pipeline it times run on real batches; the
step's accelerator paths, checked on the CPU."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import data, models, throughput, train
from lcnn_jax.inference import kernels
from helpers import assert_describes_a_machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_timed_train_step_runs_an_lcnn_and_its_cnn_without_the_cpp_kernel(monkeypatch, tiny_config):
  """As devicecheck times them (bfloat16, accumulated pieces); the C++ kernel is CPU-only, so a GPU run must
  train without it: the trainer must not touch it anywhere."""
  def refuse(*args, **kwargs):
    raise AssertionError("the trainer reached the C++ lookup kernel")

  for name in ("ensure_kernel", "kernel_available", "_call"):
    monkeypatch.setattr(kernels, name, refuse)
  config = tiny_config(data=dict(image_size=8, num_classes=10), train=dict(compute_dtype="bfloat16", break_batch=2))
  for model_config in (config.model, models.baseline_config(config.model)):
    rate = throughput.compute_images_per_second(config, model_config, batch_size=8, steps=1)
    assert math.isfinite(rate) and rate > 0


def test_on_an_accelerator_the_pieces_run_in_a_scan_and_give_the_unrolled_step(monkeypatch, tiny_config, rng):
  config = tiny_config()
  info = data.DatasetInfo(name="synthetic", num_classes=10, image_shape=(8, 8, 1), num_train=16, num_eval=0,
                          class_names=None, mean=(0.0,), std=(1.0,))
  graphdef, params, rest = nnx.split(train.create_model(config, info), nnx.Param, ...)
  tx = optax.chain(optax.trace(0.9), optax.scale(-0.1))
  state = train.TrainState(step=jnp.zeros([], jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  batch = {"image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}

  def traced_step():  # a new function each time: JAX caches traces by function
    return lambda s, b: train.train_step(graphdef, s, b, tx=tx, thresholds=None, pieces=2)

  assert "scan" not in str(jax.make_jaxpr(traced_step())(state, batch))  # the CPU unrolls the pieces
  unrolled = jax.jit(traced_step())(state, batch)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "scan" in str(jax.make_jaxpr(traced_step())(state, batch))
  scanned = jax.jit(traced_step())(state, batch)
  assert float(scanned[1]["loss"]) == pytest.approx(float(unrolled[1]["loss"]), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), scanned[0].params,
               unrolled[0].params)


def test_the_jpeg_folder_is_read_by_the_training_pipeline(tmp_path):
  throughput.write_jpeg_folder(str(tmp_path), images=8, classes=2)
  assert sorted(os.listdir(tmp_path / "train")) == ["n00000000", "n00000001"]
  assert len(os.listdir(tmp_path / "train" / "n00000000")) == 4 and len(os.listdir(tmp_path / "val")) == 2
  rate = throughput.pipeline_images_per_second(str(tmp_path), batch_size=4, steps=1, workers=0)
  assert math.isfinite(rate) and rate > 0


def test_the_command_reports_the_machine_it_measured_on(tmp_path):
  done = subprocess.run([sys.executable, "-m", "lcnn_jax.throughput", "--config", "configs/quickstart.py",
                         "--config.data.image_size=8", "--config.data.num_classes=10", "--batch=4", "--steps=1",
                         "--jpeg_images=8", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert [(row["role"], row["measure"]) for row in result["rows"]] == [
      ("cnn", "compute"), ("lcnn", "compute"), ("input", "jpeg_pipeline")]
  line = assert_describes_a_machine(result["machine"])
  table = throughput.format_table(result).splitlines()  # what the command prints without --json
  assert table[0] == line and table[1].startswith("model ") and len(table) == 2 + len(result["rows"])
