"""The trainer: loss falls, resume is exact, sharding and accumulation change nothing, errors are clear."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import checkpoint, counting, data, layers, logger, operating_point, train


def final_params(workdir):
  model, _, step = checkpoint.restore_model(workdir)
  return step, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def test_short_training_run_lowers_the_loss_and_writes_metrics(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=60, eval_every=60, checkpoint_every=60))
  config.model.width, config.model.dropout = 16, 0.0
  metrics = train.train_and_evaluate(config, str(tmp_path))
  rows = logger.read_metrics(str(tmp_path))
  train_rows = [r for r in rows if r["split"] == "train"]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3
  eval_rows = [r for r in rows if r["split"] == "eval"]
  assert len(eval_rows) == 1 and eval_rows[0]["count"] == 360
  for key in ("top1", "top5", "loss"):
    assert key in eval_rows[0]
  assert 0 <= eval_rows[0]["top1"] <= eval_rows[0]["top5"] <= 1
  assert metrics["top1"] == eval_rows[0]["top1"] > 0.5  # well above chance (0.1) after 60 steps
  assert 0 < train_rows[-1]["density"] < 1
  assert os.listdir(tmp_path / "tensorboard")
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["dataset"]["num_classes"] == 10 and saved["config"]["model"]["name"] == "digits-lcnn"


@pytest.mark.parametrize("rule", ["prox", "threshold"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, rule, tiny_config):
  config = tiny_config()
  config.sparsity.rule = rule
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  half = tiny_config(train=dict(num_steps=4))
  half.sparsity.rule = rule
  train.train_and_evaluate(half, str(tmp_path / "resumed"))  # stops at step 4 with a checkpoint
  train.train_and_evaluate(config, str(tmp_path / "resumed"))  # the same command again: resumes at 4
  step_a, whole = final_params(str(tmp_path / "whole"))
  step_b, resumed = final_params(str(tmp_path / "resumed"))
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, whole, resumed)
  losses = lambda d: [(r["step"], r["loss"]) for r in logger.read_metrics(str(tmp_path / d)) if r["split"] == "train"]
  assert losses("whole") == losses("resumed")


def test_init_run_builds_the_pieces_once_prepares_a_fresh_start_and_resumes_the_latest_step(tmp_path, tiny_config,
                                                                                               monkeypatch):
  config = tiny_config(train=dict(num_steps=2, checkpoint_every=2, eval_every=2), sparsity=dict(target_speedup=5.0))
  calls = []  # the budget and the CNN baseline, once per start (the steered update and the loop share them)
  for module, name in ((operating_point, "budget_for"), (counting, "baseline_model")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))

  def prepare(model):  # an experiment's chosen start
    model.classifier.bias[...] = jnp.full(model.classifier.bias.shape, 3.0)

  workdir = str(tmp_path)
  run = train.init_run(config, workdir, prepare)
  run.close()
  assert calls == ["budget_for", "baseline_model"]
  assert run.step == 0 and int(train.host_local(run.state.step)) == 0 and run.plan.total_steps == 2
  assert run.budget.baseline == counting.baseline_count(config.model, 10, (8, 8, 1)).total
  assert set(run.budget.thresholds) == set(run.thresholds) and run.info.num_classes == 10
  np.testing.assert_array_equal(nnx.to_pure_dict(train.host_local(run.state.params))["classifier"]["bias"], 3.0)
  assert checkpoint.latest_step(workdir) == 0  # the prepared start is on disk: the run resumes from it
  np.testing.assert_array_equal(checkpoint.restore_model(workdir, step=0)[0].classifier.bias[...], 3.0)
  train.train_and_evaluate(config, workdir)
  prepared = []
  run = train.init_run(config, workdir, prepared.append)
  run.close()
  assert run.step == 2 and not prepared  # a run with a checkpoint resumes it; prepare is for a fresh start
  _, final = final_params(workdir)
  np.testing.assert_array_equal(nnx.to_pure_dict(train.host_local(run.state.params))["classifier"]["bias"],
                                final["classifier"]["bias"])


class NoNormNet(nnx.Module):
  """A net without BatchNorm or dropout, so a batch and its pieces give the same gradient."""

  def __init__(self, rngs):
    self.conv = layers.LookupConv(1, 8, 3, dictionary_size=1, padding=1, rngs=rngs)
    self.head = layers.LookupDense(8, 10, dictionary_size=4, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


def one_step(model, batch, pieces, mesh=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.trace(0.9), optax.scale(-0.1))
  state = train.TrainState(step=jnp.zeros([], jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  new_state, metrics = jax.jit(lambda s, b: train.train_step(graphdef, s, b, tx=tx, thresholds=None,
                                                             pieces=pieces))(state, batch)
  return nnx.to_pure_dict(new_state.params), float(metrics["loss"])


def test_gradient_accumulation_equals_the_full_batch_without_batchnorm(rng):
  batch = {"image": jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  full, full_loss = one_step(NoNormNet(nnx.Rngs(0)), batch, pieces=1)
  pieced, pieced_loss = one_step(NoNormNet(nnx.Rngs(0)), batch, pieces=4)
  assert pieced_loss == pytest.approx(full_loss, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), full, pieced)


SHARDED_SCRIPT = r"""
import jax
jax.config.update("jax_num_cpu_devices", 8)
import json, numpy as np, optax, jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lcnn_jax import config as config_lib, models, train

config = config_lib.default_config("digits-lcnn")
config.model.width, config.model.dictionary.first, config.model.dictionary.convs = 8, 1, 4
rng = np.random.default_rng(0)
batch = {"image": rng.normal(size=(32, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, 32).astype(np.int32)}
results = {}
for n in (1, 8):
  model = models.create_model(config.model, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.trace(0.9), optax.scale(-0.1))
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  state = jax.device_put(train.TrainState(step=jnp.zeros([], jnp.int32), params=params, rest=rest,
                                          opt_state=tx.init(params)), NamedSharding(mesh, P()))
  sharded = train.global_batch(batch, NamedSharding(mesh, P("data")))
  assert len(sharded["image"].sharding.device_set) == n
  step = jax.jit(lambda s, b: train.train_step(graphdef, s, b, tx=tx, thresholds=None, pieces=2,
      piece_sharding=lambda nd: NamedSharding(mesh, P(None, "data", *[None] * (nd - 2)))))
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, sharded)
  results[n] = {"loss": float(metrics["loss"]),
                "params": [np.asarray(x).tolist() for x in jax.tree.leaves(new_state.params)]}
print(json.dumps(results))
"""


def test_eight_device_sharded_step_equals_one_device():
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert results["8"]["loss"] == pytest.approx(results["1"]["loss"], rel=1e-5)
  for a, b in zip(results["1"]["params"], results["8"]["params"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=8, checkpoint_every=2, log_every=2))
  train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 8
  bad = tiny_config(train=dict(num_steps=12, checkpoint_every=2, log_every=2, learning_rate=float("nan")))
  with pytest.raises(train.TrainingError, match="at step 10.*step 8"):
    train.train_and_evaluate(bad, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 8
  step, params = final_params(str(tmp_path))
  assert step == 8 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_init_from_with_frozen_dictionaries_trains_only_the_rest(tmp_path, tiny_config):
  source = str(tmp_path / "source")
  train.train_and_evaluate(tiny_config(train=dict(num_steps=4, checkpoint_every=4, eval_every=4)), source)
  source_model, _, _ = checkpoint.restore_model(source)
  target = tiny_config(train=dict(num_steps=4, checkpoint_every=4, eval_every=4, freeze_dictionaries=True,
                                  init_from=source))
  target.seed = 7  # a different initialisation: only the transferred dictionaries agree
  train.train_and_evaluate(target, str(tmp_path / "target"))
  model, _, _ = checkpoint.restore_model(str(tmp_path / "target"))
  initial = train.create_model(target, data.dataset_info(target.data))
  for path in ("conv1", "conv2", "conv3"):
    np.testing.assert_array_equal(getattr(model, path).dictionary[...], getattr(source_model, path).dictionary[...])
    assert not np.array_equal(getattr(model, path).coefficients[...], getattr(initial, path).coefficients[...])


def test_bfloat16_compute_trains_with_float32_parameters(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=2, checkpoint_every=2, eval_every=2, log_every=1,
                                  compute_dtype="bfloat16"))
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  model, _, _ = checkpoint.restore_model(str(tmp_path))
  assert model.conv2.coefficients[...].dtype == jnp.float32
  info = data.dataset_info(config.data)
  assert train.create_model(config, info).conv2.dtype == jnp.bfloat16


def test_bfloat16_activations_keep_float32_batch_norm_statistics(rng, tiny_config):
  config = tiny_config(train=dict(compute_dtype="bfloat16"))
  model = train.create_model(config, data.dataset_info(config.data))
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  before = np.asarray(model.bn1.mean[...])
  assert model.bn1(model.conv1(x)).dtype == jnp.bfloat16  # activations stay bfloat16 between layers
  assert model.bn1.mean[...].dtype == jnp.float32 and model.bn1.var[...].dtype == jnp.float32
  assert not np.array_equal(np.asarray(model.bn1.mean[...]), before)


class _CountingIterator:
  """Yields 0, 1, 2, ...; its state is the next value."""

  def __init__(self):
    self.next_value = 0

  def __next__(self):
    self.next_value += 1
    return self.next_value - 1

  def get_state(self):
    return {"next": self.next_value}


def test_device_prefetch_reads_ahead_but_checkpoints_the_position_of_the_batches_taken():
  iterator = _CountingIterator()
  batches = train.DevicePrefetch(iterator, lambda b: jnp.asarray([b]), size=2)
  assert iterator.next_value == 2 and json.loads(batches.get_state()) == {"next": 0}
  assert [int(next(batches)[0]) for _ in range(3)] == [0, 1, 2]
  assert iterator.next_value == 5  # two batches on the device ahead of the step
  assert json.loads(batches.get_state()) == {"next": 3}  # a resume continues with batch 3
