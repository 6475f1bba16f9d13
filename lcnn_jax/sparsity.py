"""Making P sparse: the optax L1 proximal step (the default) and the original's threshold rule (REFERENCE §2).

Both rules act on the coefficients alone, never on the dictionary. Leaves are named by their path in the
model's state, e.g. ``'conv2/coefficients'``; :func:`coefficient_thresholds` lists those paths with each
layer's τ, and the transforms below take per-path strengths so one optimizer chain serves the whole model.

* ``prox``: after the gradient step, P ← sign(P) · max(|P| − lr_t · τ · a_t, 0), which gives exact zeros;
  a_t = momentum · a_{t−1} + λ_t (a_0 = 0) is the momentum trace of the strength (:func:`prox_l1`).
* ``threshold`` (the original): every forward pass first sets P ← 0 where |P| ≤ τ, in place
  (:func:`apply_threshold_`); the gradient of P gets λ · τ · sign(P) added and is zeroed at masked entries
  (:func:`l1_subgradient`).

One meaning of λ under both rules. In the original the L1 term λ·τ·sign(P) joins the gradient *before* Torch's
momentum (buf ← momentum · buf + g; P ← P − lr · buf), so while sign(P) holds, the L1 part of the buffer is
c_t = momentum · c_{t−1} + λ_t · τ and P moves by lr_t · c_t = lr_t · τ · a_t per step: up to 1/(1 − momentum)
times (10× at 0.9) the bare lr · λ · τ. The proximal step shrinks by exactly that amount, the exact trace rather
than its steady state 1/(1 − momentum), so the two rules take the same L1 path from the first step, also when λ
changes from step to step (``sparsity.target_speedup`` steers it). With λ the original's ``-lambda``, both
rules therefore put the same effective L1 weight λ·τ on a layer's coefficients; they still differ where the
original's momentum carries P past zero (it is then masked) and in that only ``prox`` lets a zero grow back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcnn_jax import layers

PerPath = float | Mapping[str, float]


def path_string(keypath) -> str:
  """'conv2/coefficients' for a JAX key path into a pure dict, an nnx.State or a Variable's value."""
  parts = []
  for key in keypath:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":  # nnx.Variable stores its array under `.value`.
        parts.append(key.name)
    else:
      parts.append(str(key))
  return "/".join(parts)


def lookup_layers(model: nnx.Module) -> list[tuple[str, layers.LookupConv | layers.LookupDense]]:
  """(path, layer) of every lookup layer in ``model``, in definition order."""
  return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, layers.LOOKUP_LAYERS)]


def coefficient_thresholds(model: nnx.Module) -> dict[str, float]:
  """Path of each coefficient leaf in the model's state -> its layer's τ."""
  return {f"{path}/coefficients" if path else "coefficients": layer.threshold
          for path, layer in lookup_layers(model)}


def label_coefficients(tree, model: nnx.Module):
  """A tree like ``tree`` with 'coefficients' on P's leaves and 'other' elsewhere, for ``optax.partition``."""
  paths = coefficient_thresholds(model)
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: "coefficients" if path_string(kp) in paths else "other", tree)


def _per_leaf(value: PerPath, keypath):
  """The leaf's value: a float or a scalar array (a steered strength); None for a leaf a mapping leaves out."""
  if isinstance(value, Mapping):
    return value.get(path_string(keypath))
  return value


def _is_zero(weight) -> bool:
  return isinstance(weight, (int, float)) and weight == 0


class ProxL1State(NamedTuple):
  count: jax.Array  # int32 (), the number of updates so far: the learning-rate schedule's step
  trace: Any  # per leaf, float32 (): a_t = momentum · a_{t−1} + strength_t, the L1 weight through momentum


def prox_l1(strength: PerPath, learning_rate: float | optax.Schedule,
            momentum: float = 0.0) -> optax.GradientTransformation:
  """The soft-threshold proximal step of an L1 penalty, applied after the gradient step.

  Place it last in the chain, after the transformation that turns gradients into updates: with p the
  current parameter and u the incoming update it returns u' such that
  p + u' = sign(p + u) · max(|p + u| − lr(step) · a_t, 0), where a_t = momentum · a_{t−1} + strength_t is the
  exact trace an L1 term would have in a heavy-ball buffer (a_t = strength at momentum 0, the textbook step;
  → strength / (1 − momentum) at a constant strength).

  Args:
    strength: the L1 weight, for every leaf (a float) or per leaf path (a mapping, e.g. from
      :func:`coefficient_thresholds`); leaves not in the mapping pass through untouched. Values may be scalar
      arrays that change between updates (a steered strength).
    learning_rate: the learning rate of the gradient step (a float or an optax schedule of the step).
    momentum: the momentum of the gradient step the L1 weight is matched to (0 = the plain proximal step).
  """

  def init_fn(params):
    return ProxL1State(count=jnp.zeros([], jnp.int32),
                       trace=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("prox_l1 needs the parameters: call tx.update(updates, state, params).")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def next_trace(keypath, a):
      weight = _per_leaf(strength, keypath)
      return a if weight is None else (momentum * a + weight).astype(jnp.float32)

    trace = jax.tree_util.tree_map_with_path(next_trace, state.trace)

    def shrink(keypath, u, p, a):
      weight = _per_leaf(strength, keypath)
      if weight is None or (_is_zero(weight) and momentum == 0):
        return u
      moved = p + u
      proximal = jnp.sign(moved) * jnp.maximum(jnp.abs(moved) - lr * a, 0)
      return (proximal - p).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(shrink, updates, params, trace)
    return updates, ProxL1State(count=optax.safe_increment(state.count), trace=trace)

  return optax.GradientTransformation(init_fn, update_fn)


def l1_subgradient(strength: PerPath, thresholds: PerPath) -> optax.GradientTransformation:
  """The original's gradient rule on P: g ← g + strength · sign(P), then g ← 0 where |P| ≤ τ.

  Place it first in the chain, on the raw gradients. ``strength`` is λ·τ per leaf and ``thresholds`` τ per
  leaf (floats for every leaf, or mappings by path; leaves not in ``thresholds`` pass through).
  """

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("l1_subgradient needs the parameters: call tx.update(grads, state, params).")

    def rule(keypath, g, p):
      tau = _per_leaf(thresholds, keypath)
      if tau is None:
        return g
      weight = _per_leaf(strength, keypath)
      weight = 0.0 if weight is None else weight
      return jnp.where(jnp.abs(p) > tau, g + weight * jnp.sign(p), 0).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(rule, grads, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def apply_threshold_(model: nnx.Module) -> None:
  """Sets P ← 0 where |P| ≤ τ in every lookup layer, in place (the original's forward-pass side effect)."""
  for _, layer in lookup_layers(model):
    layer.coefficients[...] = layer.thresholded_coefficients()


@dataclasses.dataclass(frozen=True)
class SparsityRule:
  """The coefficient transformations a trainer places around its gradient step.

  The optimizer is ``optax.chain(rule.before, <gradient step>, rule.after)``; with ``persist_threshold`` the
  trainer calls :func:`apply_threshold_` (or its functional equivalent) before every forward pass.
  """
  name: str
  before: optax.GradientTransformation
  after: optax.GradientTransformation
  persist_threshold: bool


def make_rule(model: nnx.Module, rule: str, strength: float | jax.Array,
              learning_rate: float | optax.Schedule, momentum: float = 0.0) -> SparsityRule:
  """The ``prox`` or ``threshold`` rule for ``model``'s coefficients with the original's λ = ``strength``.

  ``momentum`` is the gradient step's: ``prox`` matches its shrinkage to the L1 term the original passes through
  momentum (module docstring), so one λ means the same under both rules. ``strength`` may be a scalar array.
  """
  thresholds = coefficient_thresholds(model)
  weights = {path: strength * tau for path, tau in thresholds.items()}  # λ·τ per layer
  if rule == "prox":
    return SparsityRule("prox", optax.identity(), prox_l1(weights, learning_rate, momentum),
                        persist_threshold=False)
  if rule == "threshold":
    return SparsityRule("threshold", l1_subgradient(weights, thresholds), optax.identity(), persist_threshold=True)
  raise ValueError(f"sparsity.rule={rule!r}: expected 'prox' (L1 proximal step) or 'threshold' (the original).")


def threshold_state(params, thresholds: Mapping[str, float]):
  """A functional :func:`apply_threshold_`: ``params`` with each named coefficient leaf thresholded."""
  def mask(keypath, p):
    tau = thresholds.get(path_string(keypath))
    return p if tau is None else layers.apply_threshold(p, tau)
  return jax.tree_util.tree_map_with_path(mask, params)


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
  """Sparsity of one lookup layer's P (after the threshold)."""
  path: str
  size: int
  nonzeros: int
  density: float
  threshold: float


def sparsity_report(model: nnx.Module) -> list[LayerSparsity]:
  """Per lookup layer: size and non-zeros of P, density and τ."""
  report = []
  for path, layer in lookup_layers(model):
    p = np.asarray(layer.thresholded_coefficients())
    nonzeros = int(np.count_nonzero(p))
    report.append(LayerSparsity(path, p.size, nonzeros, nonzeros / p.size, layer.threshold))
  return report


def mean_density(model: nnx.Module) -> float:
  """Non-zeros of all lookup layers' P over their total size (1.0 for a model without lookup layers)."""
  report = sparsity_report(model)
  size = sum(r.size for r in report)
  return sum(r.nonzeros for r in report) / size if size else 1.0

