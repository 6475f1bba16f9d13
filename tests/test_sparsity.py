"""The sparsity rules on P: the threshold, the optax proximal step and the original L1-subgradient rule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import layers, sparsity


class TwoLayerNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = layers.LookupConv(3, 8, 3, dictionary_size=4, padding=1, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = layers.LookupDense(8, 5, dictionary_size=3, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(nnx.relu(self.norm(self.conv(x))))
    return self.head(x.mean(axis=(1, 2)))


def test_threshold_is_applied_in_train_and_eval_modes(rng):
  model = TwoLayerNet(nnx.Rngs(0))
  conv = model.conv
  p = np.array(conv.coefficients[...])
  p[..., 0] = conv.threshold * 0.999  # just at or under τ: must act as zero
  p[..., 1] = -conv.threshold  # exactly τ in magnitude: zero too (|P| ≤ τ)
  conv.coefficients[...] = jnp.asarray(p)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  for mode in ("train", "eval"):
    getattr(model, mode)()
    s = jnp.einsum("bhwm,mk->bhwk", jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), conv.dictionary[...])
    masked = np.where(np.abs(p) > conv.threshold, p, 0)
    expected = jax.lax.conv_general_dilated(s, masked, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv(x)[..., :2], np.broadcast_to(conv.bias[...][:2], (2, 5, 5, 2)), atol=1e-6)


def test_gradients_reach_dictionary_and_coefficients_but_not_masked_entries(rng):
  layer = layers.LookupConv(4, 6, 3, dictionary_size=5, padding=1, rngs=nnx.Rngs(1))
  p = np.asarray(layer.coefficients[...])
  p = np.where(rng.random(p.shape) < 0.3, p * 1e-3, p)
  layer.coefficients[...] = jnp.asarray(p)
  masked = np.abs(p) <= layer.threshold
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  g_d, g_p = np.asarray(grads["dictionary"][...]), np.asarray(grads["coefficients"][...])
  assert np.all(np.abs(g_d) > 0)
  assert np.all(g_p[masked] == 0)
  assert np.mean(np.abs(g_p[~masked]) > 0) > 0.99


def test_prox_l1_matches_soft_threshold_formula_and_gives_exact_zeros(rng):
  params = {"a": jnp.asarray(rng.normal(size=(50,)) * 0.1, jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  grads = {"a": jnp.asarray(rng.normal(size=(50,)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  schedule = lambda step: 0.1 / (1.0 + step)  # the prox step must follow the schedule
  tx = optax.chain(optax.sgd(schedule), sparsity.prox_l1({"a": 0.5}, schedule))
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    lr = 0.1 / (1.0 + step)
    moved = np.asarray(params["a"], np.float64) - lr * np.asarray(grads["a"], np.float64)
    expected = np.sign(moved) * np.maximum(np.abs(moved) - lr * 0.5, 0)
    np.testing.assert_allclose(new["a"], expected, rtol=1e-5, atol=1e-7)
    # "b" is not named: a plain SGD step.
    np.testing.assert_allclose(new["b"], params["b"] - lr * grads["b"], rtol=1e-6)
    params = new
  assert np.count_nonzero(np.asarray(params["a"]) == 0.0) > 5  # exact zeros, not merely small values


def test_prox_l1_on_an_nnx_model_touches_coefficients_only():
  model = TwoLayerNet(nnx.Rngs(2))
  rule = sparsity.make_rule(model, "prox", strength=50.0, learning_rate=0.1)
  optimizer = nnx.Optimizer(model, optax.chain(rule.before, optax.sgd(0.1), rule.after), wrt=nnx.Param)
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # a copy
  optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path in ("conv", "head"):
    np.testing.assert_array_equal(after[path]["dictionary"], before[path]["dictionary"])
    np.testing.assert_array_equal(after[path]["bias"], before[path]["bias"])
    p0, p1 = before[path]["coefficients"], np.asarray(after[path]["coefficients"])
    shrink = 0.1 * 50.0 * getattr(model, path).threshold
    np.testing.assert_allclose(p1, np.sign(p0) * np.maximum(np.abs(p0) - shrink, 0), rtol=1e-6, atol=1e-8)
  np.testing.assert_array_equal(after["norm"]["scale"], before["norm"]["scale"])


def l1_only_shrinkage(rule_name, momentum, steps=100, lr=0.01, strength=0.1):
  """How far P = 1 moves in ``steps`` SGD steps with zero loss gradient under ``rule_name`` (L1 alone)."""
  model = layers.LookupDense(2, 3, dictionary_size=4, rngs=nnx.Rngs(0))
  model.coefficients[...] = jnp.ones_like(model.coefficients[...])
  rule = sparsity.make_rule(model, rule_name, strength=strength, learning_rate=lr, momentum=momentum)
  tx = optax.chain(rule.before, optax.trace(decay=momentum), optax.scale_by_learning_rate(lr), rule.after)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  return 1.0 - float(np.mean(params["coefficients"])), model.threshold


def test_one_strength_gives_the_same_l1_path_under_prox_and_threshold():
  # lr 0.01, momentum 0.9, λ 0.1, 100 steps from P = 1: the original passes λ·τ·sign(P) through momentum.
  by_threshold, tau = l1_only_shrinkage("threshold", momentum=0.9)
  by_prox, _ = l1_only_shrinkage("prox", momentum=0.9)
  # The exact trace: Σ_t lr · λ·τ · (1 − 0.9^t) / (1 − 0.9), in float64.
  expected = sum(0.01 * 0.1 * tau * (1 - 0.9 ** t) / 0.1 for t in range(1, 101))
  assert by_threshold == pytest.approx(expected, rel=1e-3)
  assert by_prox == pytest.approx(by_threshold, rel=0.10)
  # Without the momentum correction the proximal step is about (100 − 9) / 100 · 10 ≈ 9× weaker.
  uncorrected, _ = l1_only_shrinkage("prox", momentum=0.0)
  assert by_threshold / uncorrected > 8


def test_prox_trace_follows_a_changing_strength(rng):
  # a_t = m · a_{t−1} + λ_t: with λ switched off, the step keeps shrinking by the decaying trace.
  params = {"p": jnp.asarray(1.0 + rng.random(6), jnp.float32)}
  strengths = [0.3, 0.3, 0.0, 0.0, 0.5]
  trace, p = 0.0, np.asarray(params["p"], np.float64)
  state = sparsity.prox_l1({"p": 0.0}, 0.1, momentum=0.9).init(params)  # the state does not depend on λ
  for strength in strengths:
    tx = sparsity.prox_l1({"p": jnp.asarray(strength, jnp.float32)}, 0.1, momentum=0.9)
    updates, state = tx.update({"p": jnp.zeros(6)}, state, params)
    params = optax.apply_updates(params, updates)
    trace = 0.9 * trace + strength
    p = p - 0.1 * trace
    np.testing.assert_allclose(params["p"], p, rtol=1e-6)


def test_original_rule_reproduces_a_hand_worked_step():
  # One LookupDense with k = 4 atoms and one output: τ = 0.01 / √4 = 0.005.
  model = layers.LookupDense(2, 1, dictionary_size=4, rngs=nnx.Rngs(0))
  model.coefficients[...] = jnp.asarray([[0.5], [-0.002], [0.004], [-0.3]])
  assert model.threshold == pytest.approx(0.005)
  rule = sparsity.make_rule(model, "threshold", strength=2.0, learning_rate=0.1)  # λ·τ = 0.01
  assert rule.persist_threshold
  tx = optax.chain(rule.before, optax.trace(decay=0.9), optax.scale(-0.1))  # Torch SGD, momentum 0.9
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = tx.init(params)
  grad = {"coefficients": jnp.asarray([[0.1], [0.2], [-0.3], [0.4]]),
          "dictionary": jnp.ones((2, 4)), "bias": jnp.ones((1,))}
  thresholds = sparsity.coefficient_thresholds(model)
  # Step 1: the forward pass zeroes |P| ≤ τ in place -> P = [0.5, 0, 0, -0.3];
  # g = [0.1 + 0.01, 0, 0, 0.4 - 0.01] = [0.11, 0, 0, 0.39]; buf = g; P -= 0.1 * buf.
  params = sparsity.threshold_state(params, thresholds)
  updates, state = tx.update(grad, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["coefficients"][:, 0], [0.489, 0.0, 0.0, -0.339], rtol=1e-6)
  # Step 2: buf = 0.9 · [0.11, 0, 0, 0.39] + [0.11, 0, 0, 0.39] = [0.209, 0, 0, 0.741].
  params = sparsity.threshold_state(params, thresholds)
  updates, state = tx.update(grad, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["coefficients"][:, 0], [0.4681, 0.0, 0.0, -0.4131], rtol=1e-6)
  # The dictionary never sees the L1 term: plain SGD steps of 0.1 · 1 and 0.1 · (0.9 + 1).
  np.testing.assert_allclose(params["dictionary"], np.asarray(model.dictionary[...]) - 0.1 * (1 + 1.9), rtol=1e-6)


def test_apply_threshold_persists_zeros_in_place():
  model = TwoLayerNet(nnx.Rngs(4))
  p = np.asarray(model.conv.coefficients[...]).copy()
  p.flat[:10] = model.conv.threshold / 2
  model.conv.coefficients[...] = jnp.asarray(p)
  sparsity.apply_threshold_(model)
  stored = np.asarray(model.conv.coefficients[...])
  assert np.all(stored.flat[:10] == 0)
  np.testing.assert_array_equal(stored, np.where(np.abs(p) > model.conv.threshold, p, 0))


def test_sparsity_report_counts_nonzeros_per_layer():
  model = TwoLayerNet(nnx.Rngs(5))
  p = np.array(model.head.coefficients[...])
  p[:2] = 0.0  # 2 of 3 atoms zero for all 5 outputs
  model.head.coefficients[...] = jnp.asarray(p)
  report = {r.path: r for r in sparsity.sparsity_report(model)}
  assert set(report) == {"conv", "head"}
  head = report["head"]
  assert (head.size, head.nonzeros) == (15, 5)
  assert head.density == pytest.approx(5 / 15)
  assert head.threshold == pytest.approx(0.01 / math.sqrt(3))
  assert report["conv"].size == 3 * 3 * 4 * 8
  assert sparsity.coefficient_thresholds(model) == {"conv/coefficients": model.conv.threshold,
                                                   "head/coefficients": model.head.threshold}


def test_unknown_rule_is_rejected_with_its_name():
  with pytest.raises(ValueError, match="'l0'"):
    sparsity.make_rule(TwoLayerNet(nnx.Rngs(0)), "l0", 1.0, 0.1)
