"""Making P sparse: the optax L1 proximal step (the default) and the original's threshold rule (REFERENCE §2).

Both rules act on the coefficients alone, never on the dictionary. Leaves are named by their path in the
model's state, e.g. ``'conv2/coefficients'``; :func:`coefficient_thresholds` lists those paths with each
layer's τ, and the transforms below take per-path strengths so one optimizer chain serves the whole model.

* ``prox``: after the gradient step, P ← sign(P) · max(|P| − lr · λ·τ, 0), which gives exact zeros.
* ``threshold`` (the original): every forward pass first sets P ← 0 where |P| ≤ τ, in place
  (:func:`apply_threshold_`); the gradient of P gets λ · τ · sign(P) added and is zeroed at masked entries
  (:func:`l1_subgradient`).

With λ the original's ``-lambda``, both rules put the same L1 weight λ·τ on a layer's coefficients.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

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


def _per_leaf(value: PerPath, keypath) -> float | None:
  if isinstance(value, Mapping):
    return value.get(path_string(keypath))
  return float(value)


class ProxL1State(NamedTuple):
  count: jax.Array  # int32 (), the number of updates so far: the learning-rate schedule's step


def prox_l1(strength: PerPath, learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
  """The soft-threshold proximal step of an L1 penalty, applied after the gradient step.

  Place it last in the chain, after the transformation that turns gradients into updates: with p the
  current parameter and u the incoming update it returns u' such that
  p + u' = sign(p + u) · max(|p + u| − lr(step) · strength, 0).

  Args:
    strength: the L1 weight, for every leaf (a float) or per leaf path (a mapping, e.g. from
      :func:`coefficient_thresholds`); leaves not in the mapping pass through untouched.
    learning_rate: the learning rate of the gradient step (a float or an optax schedule of the step).
  """

  def init_fn(params):
    del params
    return ProxL1State(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("prox_l1 needs the parameters: call tx.update(updates, state, params).")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def shrink(keypath, u, p):
      weight = _per_leaf(strength, keypath)
      if weight is None or weight == 0:
        return u
      moved = p + u
      proximal = jnp.sign(moved) * jnp.maximum(jnp.abs(moved) - lr * weight, 0)
      return (proximal - p).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(shrink, updates, params)
    return updates, ProxL1State(count=optax.safe_increment(state.count))

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
      weight = _per_leaf(strength, keypath) or 0.0
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


def make_rule(model: nnx.Module, rule: str, strength: float,
              learning_rate: float | optax.Schedule) -> SparsityRule:
  """The ``prox`` or ``threshold`` rule for ``model``'s coefficients with the original's λ = ``strength``."""
  thresholds = coefficient_thresholds(model)
  weights = {path: strength * tau for path, tau in thresholds.items()}  # λ·τ per layer
  if rule == "prox":
    return SparsityRule("prox", optax.identity(), prox_l1(weights, learning_rate), persist_threshold=False)
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

