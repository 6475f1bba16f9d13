"""Operating points on request: the count as a function of P, the projection, the controller, and the runs."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import config as config_lib, flops, inspection, logger, models, operating_point, sparsity, train
from lcnn_jax.experiments import spectrum

from helpers import kill_9_when_saving

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(tiny_config, seed=0):
  return models.create_model(tiny_config().model, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(seed))


def test_budget_count_equals_the_flops_counter_at_any_sparsity(rng, tiny_config):
  model = tiny_model(tiny_config)
  for _, layer in sparsity.lookup_layers(model):  # about half of each P under its threshold
    p = np.asarray(layer.coefficients[...])
    layer.coefficients[...] = jnp.asarray(np.where(rng.random(p.shape) < 0.5, 0.5 * layer.threshold, p))
  budget = operating_point.budget_for(model, tiny_config().model, (8, 8, 1))
  count = flops.count_multiplications(model, (8, 8, 1))
  params = nnx.state(model, nnx.Param)
  assert float(budget.count(params)) == count.total
  baseline = flops.baseline_count(tiny_config().model, 10, (8, 8, 1))
  assert budget.baseline == baseline.total
  assert budget.fixed == sum(row.dictionary_multiplications if row.cost_per_nonzero else row.multiplications
                             for row in count.rows)
  assert budget.max_speedup == pytest.approx(baseline.total / budget.fixed)
  assert budget.min_speedup < count.speedup_over(baseline) < budget.max_speedup


def test_projection_keeps_the_largest_p_over_tau_that_fit_the_budget(rng):
  thresholds = {"a/coefficients": 0.01, "b/coefficients": 0.03}
  weights = {"a/coefficients": 3.0, "b/coefficients": 7.0}
  params = {"a": {"coefficients": jnp.asarray(rng.normal(size=(40,)) * 0.05, jnp.float32)},
            "b": {"coefficients": jnp.asarray(rng.normal(size=(5, 6)) * 0.1, jnp.float32)},
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  budget = 100.0
  keep = jax.jit(lambda p: operating_point.project(p, weights, thresholds, budget))(params)
  # The reference: every entry's |P| / τ in float64, taken largest first while the summed cost fits.
  scores = np.concatenate([np.abs(np.asarray(params["a"]["coefficients"], np.float64)) / 0.01,
                           np.abs(np.asarray(params["b"]["coefficients"], np.float64)).ravel() / 0.03])
  costs = np.concatenate([np.full(40, 3.0), np.full(30, 7.0)])
  order = np.argsort(-scores)
  kept = order[:np.searchsorted(np.cumsum(costs[order]), budget, side="right")]
  expected = np.zeros(70, bool)
  expected[kept] = True
  np.testing.assert_array_equal(np.concatenate([keep["a"]["coefficients"], np.ravel(keep["b"]["coefficients"])]),
                                expected)
  assert costs[expected].sum() <= budget < costs[expected].sum() + 7


def test_steer_ends_at_the_budget_with_kept_entries_above_the_threshold(rng):
  thresholds = {"a/coefficients": 0.01, "b/coefficients": 0.02}
  weights = {"a/coefficients": 2.0, "b/coefficients": 5.0}
  goal = {"a": {"coefficients": jnp.asarray(rng.normal(size=(200,)) * 0.2, jnp.float32)},
          "b": {"coefficients": jnp.asarray(rng.normal(size=(100,)) * 0.2, jnp.float32)}}
  params = jax.tree.map(lambda g: g + 0.05, goal)

  def build(strength):
    rule = {path: strength * tau for path, tau in thresholds.items()}
    return optax.chain(optax.trace(decay=0.9), optax.scale_by_learning_rate(0.05),
                       sparsity.prox_l1(rule, 0.05, momentum=0.9))

  target = operating_point.Target(weights=weights, budget=300.0, description="test")
  tx = operating_point.steer(build, target, thresholds, initial_strength=1.0, total_steps=200, project_at=0.6)
  state = tx.init(params)
  assert float(state.measured) == sum(weights[f"{n}/coefficients"] * np.sum(np.abs(params[n]["coefficients"]) > tau)
                                     for n, tau in (("a", 0.01), ("b", 0.02)))

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p, g: p - g, params, goal)  # pulls P towards the goal: L1 alone makes it sparse
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  measured = []
  for _ in range(200):
    params, state = step(params, state)
    measured.append(float(state.measured))
    if int(state.step) == 120:
      kept_at_projection = jax.tree.map(np.asarray, state.keep)
  assert 300 - 5 <= measured[-1] <= 300
  assert measured[119:] == [measured[119]] * 81  # fixed from the projection on
  assert max(measured[:100]) > 300  # steered down from above
  np.testing.assert_array_equal(jax.tree.map(np.asarray, state.keep)["a"]["coefficients"],
                                kept_at_projection["a"]["coefficients"])
  for name, tau in (("a", 0.01), ("b", 0.02)):
    p, kept = np.asarray(params[name]["coefficients"]), np.asarray(state.keep[name]["coefficients"])
    assert np.all(p[~kept] == 0) and np.all(np.abs(p[kept]) >= 1.01 * tau * (1 - 1e-6))


def test_targets_out_of_reach_name_the_reachable_speedups(tiny_config):
  model = tiny_model(tiny_config)
  budget = operating_point.budget_for(model, tiny_config().model, (8, 8, 1))
  largest = f"{budget.max_speedup:.2f}x"
  for target in (0.5, 1.0, budget.max_speedup, 2 * budget.max_speedup, 0.9 * budget.min_speedup):
    c = tiny_config(sparsity=dict(target_speedup=target))
    with pytest.raises(ValueError, match=f"target_speedup={target}.*at most {largest}"):
      operating_point.target_from_config(c.sparsity, budget)
  reachable = operating_point.target_from_config(
      tiny_config(sparsity=dict(target_speedup=budget.max_speedup / 2)).sparsity, budget)
  assert reachable.budget == pytest.approx(budget.baseline / (budget.max_speedup / 2) - budget.fixed)
  by_density = operating_point.target_from_config(tiny_config(sparsity=dict(target_density=0.1)).sparsity, budget)
  assert by_density.budget == pytest.approx(0.1 * sum(budget.sizes.values()))
  with pytest.raises(ValueError, match="set one of them"):
    config_lib.validate(tiny_config(sparsity=dict(target_density=0.1, target_speedup=5.0)))


def test_main_stops_at_start_on_an_unreachable_target_with_exit_code_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "lcnn_jax.main", "--config", os.path.join(REPO, "configs", "quickstart.py"),
       "--workdir", str(tmp_path / "w"), "--config.sparsity.target_speedup=100"],
      capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2
  assert "target_speedup=100.0 is unreachable" in result.stderr and "at most 5" in result.stderr
  assert "Traceback" not in result.stderr
  # Nothing of the run: no checkpoint, config.json, metrics or TensorBoard files; only the dataset's statistics,
  # cached for the corrected rerun.
  assert set(os.listdir(tmp_path / "w")) <= {"data_stats.json"}


def tensorboard_scalars(workdir):
  """tag -> [(step, value)] of every scalar in ``workdir/tensorboard``'s event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  directory = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # length (8 bytes), its CRC (4), the record, its CRC (4)
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.mark.parametrize("rule, train_overrides", [
    ("prox", {"compute_dtype": "bfloat16"}),
    ("threshold", {"break_batch": 2}),
])
def test_training_ends_at_the_target_speedup(tmp_path, rule, train_overrides, tiny_config):
  config = tiny_config(train=dict(num_steps=30, eval_every=30, checkpoint_every=30, **train_overrides),
                       sparsity=dict(rule=rule, target_speedup=12.0))
  train.train_and_evaluate(config, str(tmp_path))
  report = inspection.inspect_run(str(tmp_path))
  assert report["speedup"] == pytest.approx(12.0, rel=0.03)
  rows = [row for row in logger.read_metrics(str(tmp_path)) if row["split"] == "train"]
  assert rows[0]["speedup"] < rows[-1]["speedup"] == pytest.approx(report["speedup"])
  assert all(row["strength"] > 0 for row in rows)
  assert len({row["strength"] for row in rows}) > 1  # steered, not the configured 1.0 throughout
  scalars = tensorboard_scalars(str(tmp_path))
  for name in ("speedup", "strength"):
    assert [value for _, value in scalars[f"train/{name}"]] == pytest.approx([row[name] for row in rows])


def test_training_ends_at_the_target_density(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=20, eval_every=20, checkpoint_every=20),
                       sparsity=dict(target_density=0.2))
  train.train_and_evaluate(config, str(tmp_path))
  model, _, _ = train.checkpoint.restore_model(str(tmp_path))
  report = sparsity.sparsity_report(model)
  kept, size = sum(r.nonzeros for r in report), sum(r.size for r in report)
  assert int(0.2 * size) - 1 <= kept <= 0.2 * size


# configs/quickstart.py made as small as the tests' tiny run, steered to 12x under the original rule: 8 steps,
# checkpoints every 2, P projected after step 5. Dropout is off: a mask is drawn per position in the global
# batch, and 2 processes order the same 32 images differently.
TINY_TARGET = {"model.width": 8, "model.dictionary.convs": 4, "model.dropout": 0.0, "train.batch_size": 32,
               "train.num_steps": 8, "train.lr_schedule": "constant", "train.learning_rate": 0.05,
               "train.checkpoint_every": 2, "train.log_every": 1, "train.eval_every": 8,
               "train.eval_batch_size": 360, "sparsity.rule": "threshold", "sparsity.strength": 1.0,
               "sparsity.target_speedup": 12.0}
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
TINY_FLAGS = [f"--config.{key}={value}" for key, value in TINY_TARGET.items()]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def tiny_target_config():
  """The config that ``--config configs/quickstart.py`` with :data:`TINY_FLAGS` gives."""
  config = config_lib.load(QUICKSTART)
  for key, value in TINY_TARGET.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The tiny targeted run, trained in one piece by one process."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train.train_and_evaluate(tiny_target_config(), workdir)
  return workdir


def final_params(workdir):
  model, _, step = train.checkpoint.restore_model(workdir)
  return step, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def train_points(workdir):
  return [(r["step"], r["loss"], r["speedup"], r["strength"])
          for r in logger.read_metrics(workdir) if r["split"] == "train"]


def test_kill_9_and_rerun_with_a_target_reproduce_the_uninterrupted_run_exactly(tmp_path, uninterrupted):
  # The rerun resumes from step 4, before the projection: the controller's state (λ, the counts, the kept set)
  # must come back from the checkpoint for the projection and the fine-tuning to repeat bit for bit.
  killed = str(tmp_path / "killed")
  command = ["--config", QUICKSTART, "--workdir", killed, *TINY_FLAGS]
  # steps 5 (the projection) and 6 computed, only steps 2 and 4 on disk
  kill_9_when_saving(6, tmp_path / "at_step_6", command, cwd=REPO)
  rerun = subprocess.run([sys.executable, "-m", "lcnn_jax.main", *command], capture_output=True, text=True,
                         cwd=REPO, env=ENV, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Resumed from step 4" in rerun.stderr

  (step_a, whole), (step_b, resumed) = final_params(uninterrupted), final_params(killed)
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, whole, resumed)
  assert train_points(killed) == train_points(uninterrupted)
  _, _, speedup, strength = train_points(killed)[-1]  # the progress line shows them too
  assert "train step 8/8: " in rerun.stderr and f"speedup {speedup:.1f}x strength {strength:.3g}" in rerun.stderr
  assert inspection.inspect_run(killed)["speedup"] == pytest.approx(12.0, rel=0.03)


def test_two_processes_with_a_target_equal_one_process(tmp_path, uninterrupted):
  # launch/local.sh: 2 processes of one jax.distributed job, one CPU device each, each feeding half the batch.
  # The count that steers λ is taken from the parameters replicated over both processes' devices.
  two = str(tmp_path / "two")
  done = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "2", "--config", QUICKSTART,
                         "--workdir", two, *TINY_FLAGS], capture_output=True, text=True, cwd=REPO, env=ENV,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "All 2 processes finished" in done.stderr
  assert "Process 1 of 2, 1 local / 2 global devices" in (tmp_path / "two" / "logs" / "process_1.log").read_text()
  one_points, two_points = train_points(uninterrupted), train_points(two)
  assert [p[0] for p in two_points] == [p[0] for p in one_points] == list(range(1, 9))
  for (_, *one), (_, *two_) in zip(one_points, two_points):
    assert two_ == pytest.approx(one, rel=1e-4)
  assert inspection.inspect_run(two)["speedup"] == pytest.approx(inspection.inspect_run(uninterrupted)["speedup"])
  assert inspection.inspect_run(two)["speedup"] == pytest.approx(12.0, rel=0.03)


def test_a_run_with_another_optimizer_refuses_the_checkpoints_and_leaves_them_as_they_were(tmp_path, uninterrupted):
  # The targeted run's state holds the controller's; without the target, or under prox (which keeps an L1
  # trace), the configured optimizer's state differs: one clear error, no step set aside as damaged.
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  run_info = open(os.path.join(workdir, "config.json")).read()
  for change in ({"target_speedup": 0.0}, {"rule": "prox"}):
    config = tiny_target_config()
    config.sparsity.update(change)
    with pytest.raises(train.checkpoint.CheckpointError, match="another optimizer.*sparsity.rule"):
      train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert open(os.path.join(workdir, "config.json")).read() == run_info


def test_spectrum_sweeps_target_speedups_and_skips_unreachable_ones(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=6, checkpoint_every=6, eval_every=6))
  rows = spectrum.run_spectrum(config, str(tmp_path), sizes=[2], targets=[8.0, 1000.0], baseline=False,
                                pruning=False)  # the pruning arm has tests of its own (test_experiments)
  assert [row["point"] for row in rows] == ["k2_t8"]
  assert rows[0]["target"] == 8.0 and rows[0]["speedup"] == pytest.approx(8.0, rel=0.03)
  assert rows[0]["strength"] > 0
  assert not os.path.exists(tmp_path / "k2_t1000")
  spectrum.plot_spectrum(rows, str(tmp_path / "spectrum.png"), "tiny")
  assert os.path.getsize(tmp_path / "spectrum.png") > 0
