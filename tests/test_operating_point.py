"""Operating points on request: the count as a function of P, the projection, the controller, and the runs."""

import os
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
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")


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
  assert os.listdir(tmp_path / "tensorboard")


class Crash(Exception):
  pass


def test_a_crash_and_rerun_with_a_target_reproduce_the_uninterrupted_run_exactly(tmp_path, monkeypatch,
                                                                                 tiny_config):
  # 8 steps, projection after step 5: the run dies before saving step 6 and resumes from step 4, across the
  # projection; the controller's state comes back from the checkpoint.
  config = tiny_config(sparsity=dict(target_speedup=12.0, rule="threshold"), train=dict(checkpoint_every=2))
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  save = train.checkpoint.Checkpointer.save

  def save_or_crash(self, state, data_iter):
    if int(train.host_local(state.step)) == 6:
      raise Crash()
    save(self, state, data_iter)

  monkeypatch.setattr(train.checkpoint.Checkpointer, "save", save_or_crash)
  with pytest.raises(Crash):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(train.checkpoint.Checkpointer, "save", save)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))

  def final(workdir):
    model, _, step = train.checkpoint.restore_model(workdir)
    return step, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  (step_a, whole), (step_b, resumed) = final(str(tmp_path / "whole")), final(str(tmp_path / "resumed"))
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, whole, resumed)
  points = lambda d: [(r["step"], r["loss"], r["speedup"], r["strength"])
                      for r in logger.read_metrics(str(tmp_path / d)) if r["split"] == "train"]
  assert points("whole") == points("resumed")


def test_spectrum_sweeps_target_speedups_and_skips_unreachable_ones(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=6, checkpoint_every=6, eval_every=6))
  rows = spectrum.run_spectrum(config, str(tmp_path), sizes=[2], targets=[8.0, 1000.0], baseline=False)
  assert [row["point"] for row in rows] == ["k2_t8"]
  assert rows[0]["target"] == 8.0 and rows[0]["speedup"] == pytest.approx(8.0, rel=0.03)
  assert rows[0]["strength"] > 0
  assert not os.path.exists(tmp_path / "k2_t1000")
  spectrum.plot_spectrum(rows, str(tmp_path / "spectrum.png"), "tiny")
  assert os.path.getsize(tmp_path / "spectrum.png") > 0
