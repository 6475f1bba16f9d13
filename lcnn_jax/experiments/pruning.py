"""Gradual magnitude pruning of a CNN to a multiplication budget: what a user would pick instead of an LCNN.

The spectrum (:mod:`lcnn_jax.experiments.spectrum`) trains, beside each LCNN point, the CNN pruned to the
multiplications that LCNN counts. Both counts come from :mod:`lcnn_jax.counting` (the counter of
``python -m lcnn_jax.flops``), which does not count a kernel weight that is exactly zero, as it does not count a
zero of P.

The schedule is Zhu & Gupta's ("To prune, or not to prune", 2017), applied to every convolution and dense kernel
alike: kernel l keeps its ``keep_l`` largest weights in magnitude at the end, and before that

    kept_l(t) = keep_l + ⌊(size_l − keep_l) · (1 − t / end)³⌋,

recomputed every ``every`` steps from the weights still kept (a pruned weight never comes back), then held fixed:
a pruned weight is set to 0 after every update, the kept ones train. ``end`` is ``sparsity.project_at`` of the
run's steps, where the LCNN it is compared with projects P onto its budget, so both have the same phases (reach
the operating point, then fine-tune for the rest of the same number of steps). Every kernel keeps the same
fraction, ``keep_l = max(1, ⌊d · size_l⌋)`` with d = budget / (the unpruned count), so the count ends at the
budget or just below it (one weight's output positions per kernel, at most).

The trainer's training rows keep the unpruned count (their speedup is the LCNN's budget arithmetic, which a CNN
has no P for); the evaluation rows, and so a point's result, are counted on the pruned kernels.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcnn_jax import counting, sparsity, train


def kernel_costs(model: nnx.Module, input_shape) -> dict[str, int]:
  """Path of each convolution and dense kernel ('conv2/kernel') -> the multiplications one non-zero weight of it
  costs (the output positions it is used at; summed over the calls of a layer called more than once)."""
  costs = collections.Counter()
  for row in counting.count_multiplications(model, input_shape).rows:
    if row.kind in ("conv", "linear"):
      costs[f"{row.path}/kernel" if row.path else "kernel"] += math.prod(row.output_shape) // row.kernel_shape[-1]
  return dict(costs)


def kernel_sizes(model: nnx.Module, paths) -> dict[str, int]:
  """Path -> number of weights of each kernel in ``paths``."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {sparsity.path_string(kp): leaf.size for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
          if sparsity.path_string(kp) in paths}


def final_keep(costs: Mapping[str, int], sizes: Mapping[str, int], budget: float) -> dict[str, int]:
  """The weights each kernel keeps at the end: the same fraction d of every kernel, at least one, such that
  Σ cost · kept ≤ ``budget`` (up to that one weight). Raises ValueError for a budget the pruning cannot meet."""
  full = sum(costs[path] * sizes[path] for path in costs)
  least = sum(costs.values())
  if not least <= budget < full:
    raise ValueError(f"A pruning budget of {budget:,.0f} multiplications is out of reach: the CNN counts {full:,} "
                     f"unpruned and at least {least:,} with one weight per kernel.")
  fraction = budget / full
  return {path: max(1, math.floor(fraction * sizes[path])) for path in costs}


class PruneState(NamedTuple):
  """The pruning's state, part of the optimizer state (and so of every checkpoint)."""
  step: jax.Array  # int32 (): updates so far
  mask: Any  # per leaf: bool kernel-shaped on pruned kernels (True = kept), () else
  inner: Any  # the state of the wrapped optimizer


def magnitude_pruning(tx: optax.GradientTransformation, keep: Mapping[str, int], sizes: Mapping[str, int], *,
                      end: int, every: int) -> optax.GradientTransformation:
  """Wraps ``tx`` so that each kernel in ``keep`` is pruned to ``keep[path]`` weights by step ``end``, every
  ``every`` steps on the cubic schedule (module docstring), and held there."""

  # kept_l(t) for t = 0..end, in exact integer arithmetic: (size − keep) · (end − t)³ // end³.
  schedule = {path: jnp.asarray([keep[path] + (sizes[path] - keep[path]) * (end - t) ** 3 // end ** 3
                                 for t in range(end + 1)], jnp.int32) for path in keep}

  def kept_at(step, path):
    return schedule[path][jnp.minimum(step, end)]

  def prune(step, params, mask):
    def leaf(keypath, p, kept):
      path = sparsity.path_string(keypath)
      if path not in keep:
        return kept
      magnitude = jnp.abs(jnp.where(kept, p, 0)).ravel()  # (size,): a pruned weight ranks last
      cutoff = jnp.sort(magnitude)[sizes[path] - kept_at(step, path)]  # the smallest magnitude kept
      return kept & (jnp.abs(p) >= cutoff)
    return jax.tree_util.tree_map_with_path(leaf, params, mask)

  def init_fn(params):
    mask = jax.tree_util.tree_map_with_path(
        lambda kp, p: jnp.ones(p.shape, bool) if sparsity.path_string(kp) in keep else jnp.ones([], bool), params)
    return PruneState(step=jnp.zeros([], jnp.int32), mask=mask, inner=tx.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("magnitude_pruning needs the parameters: call tx.update(grads, state, params).")
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    step = state.step + 1
    pruning = (step <= end) & ((step % every == 0) | (step == end))
    mask = jax.lax.cond(pruning, lambda tree: prune(step, tree, state.mask), lambda _: state.mask, new_params)
    new_params = jax.tree.map(lambda p, kept: jnp.where(kept, p, jnp.zeros_like(p)), new_params, mask)
    updates = jax.tree.map(lambda new, old, u: (new - old).astype(u.dtype), new_params, params, updates)
    return updates, PruneState(step=step, mask=mask, inner=inner)

  return optax.GradientTransformation(init_fn, update_fn)


PRUNING_EVENTS = 100  # The schedule recomputes the masks this many times (Zhu & Gupta's Δt = end / 100).


def to_budget(budget: float, end_fraction: float) -> train.OptimizerWrapper:
  """The ``wrap_optimizer`` of a CNN run (``train.train_and_evaluate``) pruned to ``budget`` counted
  multiplications by ``end_fraction`` of its steps."""

  def wrap(tx, model, total_steps, input_shape):
    costs = kernel_costs(model, input_shape)
    sizes = kernel_sizes(model, costs)
    end = min(max(1, round(end_fraction * total_steps)), total_steps)
    return magnitude_pruning(tx, final_keep(costs, sizes, budget), sizes, end=end,
                             every=max(1, end // PRUNING_EVENTS))

  return wrap


def setup(budget: float, end_fraction: float) -> dict[str, Any]:
  """What :func:`to_budget` does, as a point's result records it (``common.run_point``'s ``setup``)."""
  return {"pruning": "gradual magnitude (Zhu & Gupta 2017), every kernel to the same fraction",
          "budget_multiplications": float(budget), "end_fraction": float(end_fraction),
          "events": PRUNING_EVENTS}
