"""Operating points on request: training that ends at a chosen speedup (or density of P) by construction.

The counted multiplications of an LCNN (:mod:`lcnn_jax.counting`) are affine in the non-zeros of its P:

    count(P) = fixed + Σ_layers cost_per_nonzero(layer) · nnz(P_layer)

where ``fixed`` is every dictionary stage and every dense layer, and a layer's ``cost_per_nonzero`` is the
output positions each non-zero is used at (H_out · W_out for a lookup convolution, 1 for a lookup dense
layer). A target speedup T over the CNN baseline's B multiplications is the budget
``Σ cost · nnz ≤ B / T − fixed``; it is reachable when ``fixed < B / T < count(every P dense)``, i.e. for
``B / count(dense P) < T < B / fixed``. A target density d of P is the budget ``Σ nnz ≤ d · Σ size`` (cost 1).

:func:`steer` reaches the budget in three phases of one run of ``total_steps``:

1. **Steering** (steps < ``project_at · total_steps``): the L1 strength λ of the sparsity rule (either rule,
   :mod:`lcnn_jax.sparsity`) follows an integral controller on the measured weighted count N_t = Σ w · nnz:
   log λ ← log λ + gain · clip(log(N_t / R_t), −1, 1), where the reference R_t falls geometrically (linearly
   in log N) from the starting count to the budget and reaches it at ``REFERENCE_END`` of the phase; the gain
   lets λ change at most e-fold in ``RESPONSE`` of the reference's steps, and λ never exceeds
   ``MAX_STEP`` · (1 − momentum) / lr_t, where the L1 term's steady step through momentum, lr·λ·τ/(1 − momentum),
   reaches ``MAX_STEP`` thresholds τ: beyond it the original rule stops sparsifying (its entries jump over the
   band |P| ≤ τ where they die instead of landing in it; measured on the digits, λ = 30 at lr 0.1 made P no
   sparser than λ = 10, and λ wound up without bound), so a larger λ only harms. The L1 term is applied only while
   N_t > R_t, so the count approaches the budget from above and an overshoot stops at once, but for the L1
   term still in the momentum buffer (under ``threshold`` a zero never grows back).
2. **Projection** (at ``project_at · total_steps``): the exact projection onto the budget. P's entries are
   ranked by |P| / τ of their layer (the order in which the L1 step, which shrinks every layer by lr·λ·τ·a,
   would remove them next) and kept from the largest down while their summed cost fits the budget; a
   bisection on the cut-off finds that prefix inside the jitted step.
3. **Fine-tuning** (the rest): λ = 0 and the kept set is fixed: pruned entries stay 0, kept entries train
   freely but are held at |P| ≥ (1 + ``KEEP_MARGIN``) · τ, so none falls under the threshold. The count of
   every later checkpoint is therefore the budget, up to one entry's cost.

The controller's state (λ, the counts, the kept set) is part of the optimizer state, so checkpoints carry it
and a resumed run continues exactly where the interrupted one was. The count is computed from the replicated
parameters inside the step, the same on every process.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from lcnn_jax import counting, layers, sparsity

REFERENCE_END = 0.8  # The reference reaches the budget at this fraction of the steering phase.
KEEP_MARGIN = 0.01  # Kept entries stay at |P| >= (1 + KEEP_MARGIN) · τ during fine-tuning.
RESPONSE = 0.05  # λ changes at most e-fold in this fraction of the reference's steps.
MAX_STEP = 10.0  # λ ≤ MAX_STEP · (1 − momentum) / lr: the L1 step through momentum stays ≤ MAX_STEP · τ.
MAX_LOG_RANGE = 12.0  # λ stays within e^±12 of its starting value.
BISECTION_STEPS = 64


@dataclasses.dataclass(frozen=True)
class Budget:
  """A model's counted multiplications as ``fixed + Σ cost · nnz`` and its CNN baseline's count."""
  baseline: int  # multiplications of the CNN baseline
  fixed: int  # dictionary stages and dense layers
  costs: Mapping[str, int]  # coefficient leaf path ('conv2/coefficients') -> multiplications per non-zero
  sizes: Mapping[str, int]  # coefficient leaf path -> size of P
  thresholds: Mapping[str, float]  # coefficient leaf path -> τ

  @property
  def dense_count(self) -> int:
    """The count with every entry of every P non-zero."""
    return self.fixed + sum(self.costs[path] * self.sizes[path] for path in self.costs)

  @property
  def max_speedup(self) -> float:
    """The speedup with every P empty: the dictionaries and dense layers alone."""
    return self.baseline / self.fixed if self.fixed else math.inf

  @property
  def min_speedup(self) -> float:
    """The speedup with every P dense."""
    return self.baseline / self.dense_count

  def speedup(self, count: float) -> float:
    """The baseline's multiplications over ``count`` (inf for a count of 0)."""
    return self.baseline / count if count else math.inf

  def nonzero_costs(self, params) -> jax.Array:
    """Σ cost · nnz(thresholded P) of a parameter tree, float32 on device (jit-friendly)."""
    return measure(params, self.costs, self.thresholds)

  def count(self, params) -> jax.Array:
    """The counted multiplications of a parameter tree, float32 on device."""
    return self.fixed + self.nonzero_costs(params)


def budget_for(model: nnx.Module, model_config, input_shape) -> Budget:
  """The :class:`Budget` of ``model`` on one example of ``input_shape`` against its CNN baseline."""
  outputs = jax.eval_shape(layers.eval_view(model), jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  count = counting.count_multiplications(model, input_shape)
  baseline_total = counting.baseline_count(model_config, outputs.shape[-1], input_shape).total
  thresholds = sparsity.coefficient_thresholds(model)
  sizes = {f"{path}/coefficients" if path else "coefficients": layer.coefficients.size
           for path, layer in sparsity.lookup_layers(model)}
  costs = {path: 0 for path in thresholds}
  fixed = 0
  for row in count.rows:
    if row.cost_per_nonzero:
      path = f"{row.path}/coefficients" if row.path else "coefficients"
      costs[path] += row.cost_per_nonzero  # a layer called twice counts twice
      fixed += row.dictionary_multiplications
    else:
      fixed += row.multiplications
  return Budget(baseline=baseline_total, fixed=fixed, costs=costs, sizes=sizes, thresholds=thresholds)


def measure(params, weights: Mapping[str, float], thresholds: Mapping[str, float]) -> jax.Array:
  """Σ_path weights[path] · nnz(|P| > τ) over the coefficient leaves of ``params``, float32 ()."""
  total = jnp.zeros([], jnp.float32)
  for keypath, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = sparsity.path_string(keypath)
    if path in weights and weights[path]:
      total += weights[path] * jnp.sum(jnp.abs(p) > thresholds[path]).astype(jnp.float32)
  return total


@dataclasses.dataclass(frozen=True)
class Target:
  """What :func:`steer` aims at: Σ weights · nnz ≤ budget."""
  weights: Mapping[str, float]  # coefficient leaf path -> weight of one non-zero
  budget: float
  description: str  # '10x speedup', 'density 0.05'


def target_from_config(sparsity_config, budget: Budget) -> Target | None:
  """The :class:`Target` of ``config.sparsity`` (None when neither target is set), checked against ``budget``.

  Raises ValueError naming the reachable range when the target cannot be met by this architecture.
  """
  speedup, density = sparsity_config.target_speedup, sparsity_config.target_density
  if speedup and density:
    raise ValueError(f"sparsity.target_speedup={speedup} and sparsity.target_density={density}: set one of them.")
  if speedup:
    reachable = (f"this model reaches {budget.min_speedup:.2f}x with every P dense and at most "
                 f"{budget.max_speedup:.2f}x (its dictionary stages and dense layers alone cost "
                 f"{budget.fixed:,} of the baseline's {budget.baseline:,} multiplications)")
    if speedup <= 1:
      raise ValueError(f"sparsity.target_speedup={speedup}: a target must be a speedup > 1 over the CNN "
                       f"baseline; {reachable}. Pass a target between those two.")
    if speedup >= budget.max_speedup:
      raise ValueError(f"sparsity.target_speedup={speedup} is unreachable: {reachable}. Pass a target below "
                       f"{budget.max_speedup:.2f}, or use smaller dictionaries (model.*pool*).")
    if speedup <= budget.min_speedup:
      raise ValueError(f"sparsity.target_speedup={speedup} needs no sparsity: {reachable}. Pass a target above "
                       f"{budget.min_speedup:.2f}, or 0 to train with the plain sparsity.strength.")
    return Target(weights=dict(budget.costs), budget=budget.baseline / speedup - budget.fixed,
                  description=f"{speedup:g}x speedup")
  if density:
    if not 0 < density < 1:
      raise ValueError(f"sparsity.target_density={density}: must be in (0, 1), the fraction of P's entries kept.")
    if not budget.sizes:
      raise ValueError("sparsity.target_density is set but the model has no lookup layers (no P to make sparse).")
    return Target(weights={path: 1.0 for path in budget.sizes}, budget=density * sum(budget.sizes.values()),
                  description=f"density {density:g}")
  return None


def project(params, weights: Mapping[str, float], thresholds: Mapping[str, float], budget: float):
  """The exact projection onto ``Σ weights · nnz ≤ budget``: a tree like ``params``, True where P is kept.

  Entries are ranked by |P| / τ of their layer and kept largest first while their summed weights fit; the
  cut-off is found by bisection (jit-friendly, no sort). Leaves other than P get a scalar True.
  """
  leaves = [(sparsity.path_string(kp), p) for kp, p in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = [(path, p) for path, p in leaves if path in thresholds]

  def weight_above(cutoff):
    return sum(weights.get(path, 0.0) * jnp.sum(jnp.abs(p) / thresholds[path] > cutoff).astype(jnp.float32)
               for path, p in leaves)

  def bisect(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    fits = weight_above(middle) <= budget  # high always fits: nothing is above the largest score
    return jnp.where(fits, low, middle), jnp.where(fits, middle, high)

  high = jnp.max(jnp.stack([jnp.max(jnp.abs(p)) / thresholds[path] for path, p in leaves]))
  _, cutoff = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (jnp.zeros([], jnp.float32), high))
  return jax.tree_util.tree_map_with_path(
      lambda kp, p: (jnp.abs(p) / thresholds[sparsity.path_string(kp)] > cutoff
                     if sparsity.path_string(kp) in thresholds else jnp.ones([], bool)), params)


class SteerState(NamedTuple):
  """The controller's state, part of the optimizer state (and so of every checkpoint)."""
  step: jax.Array  # int32 (): updates so far
  log_strength: jax.Array  # float32 (): log λ
  start: jax.Array  # float32 (): Σ w · nnz of the initial parameters, where the reference starts
  measured: jax.Array  # float32 (): Σ w · nnz after the last update
  keep: Any  # per leaf: bool P-shaped kept set on coefficient leaves (all True before the projection); () else
  inner: Any  # the state of the steered optimizer


def strength_of(opt_state) -> float | None:
  """λ of a steered optimizer state (host side), None for an optimizer without :func:`steer`."""
  if isinstance(opt_state, SteerState):
    return float(math.exp(float(jax.device_get(_local(opt_state.log_strength)))))
  return None


def _local(x):
  return x.addressable_data(0) if isinstance(x, jax.Array) else x


def steer(build: Callable[[jax.Array], optax.GradientTransformation], target: Target,
          thresholds: Mapping[str, float], *, initial_strength: float, total_steps: int,
          project_at: float, learning_rate: float | optax.Schedule = 0.0,
          momentum: float = 0.0) -> optax.GradientTransformation:
  """Wraps the optimizer ``build(λ)`` so that training ends at ``target`` (module docstring).

  Args:
    build: the full update for an L1 strength λ (a float32 scalar array); its state must not depend on λ.
    target: what to reach (:func:`target_from_config`).
    thresholds: τ per coefficient leaf path (:func:`lcnn_jax.sparsity.coefficient_thresholds`).
    initial_strength: λ at the first step (``sparsity.strength``; 1.0 when that is 0).
    total_steps: the run's steps.
    project_at: the fraction of ``total_steps`` after which P is projected onto the budget and fine-tuned.
    learning_rate, momentum: the gradient step's, which bound λ (``MAX_STEP``); a learning rate of 0 leaves
      λ unbounded.
  """
  project_step = min(max(1, int(round(project_at * total_steps))), total_steps)
  reference_steps = max(1, int(round(REFERENCE_END * project_step)))
  gain = 1.0 / max(1.0, RESPONSE * reference_steps)
  log_initial = math.log(initial_strength)
  budget = max(float(target.budget), 1.0)
  logging.info("Operating point %s: λ steered from %g, P projected onto the budget after step %d of %d.",
               target.description, initial_strength, project_step, total_steps)

  def is_coefficient(keypath) -> bool:
    return sparsity.path_string(keypath) in thresholds

  def reference(step, start):
    progress = jnp.clip(step.astype(jnp.float32) / reference_steps, 0.0, 1.0)
    return jnp.exp(jnp.log(start) + progress * (jnp.log(budget) - jnp.log(start)))

  def init_fn(params):
    inner = build(jnp.asarray(initial_strength, jnp.float32)).init(params)
    start = jnp.maximum(measure(params, target.weights, thresholds), budget)
    keep = jax.tree_util.tree_map_with_path(
        lambda kp, p: jnp.ones(p.shape, bool) if is_coefficient(kp) else jnp.ones([], bool), params)
    return SteerState(step=jnp.zeros([], jnp.int32), log_strength=jnp.asarray(log_initial, jnp.float32),
                      start=start, measured=measure(params, target.weights, thresholds), keep=keep, inner=inner)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("steer needs the parameters: call tx.update(grads, state, params).")
    steering = state.step < project_step
    strength = jnp.where(steering & (state.measured > reference(state.step, state.start)),
                         jnp.exp(state.log_strength), 0.0)
    updates, inner = build(strength).update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    step = state.step + 1
    keep = jax.lax.cond(step == project_step, lambda tree: project(tree, target.weights, thresholds, budget),
                        lambda _: state.keep, new_params)

    def hold(keypath, p, kept):
      if not is_coefficient(keypath):
        return p
      floor = (1.0 + KEEP_MARGIN) * thresholds[sparsity.path_string(keypath)]
      held = jnp.where(p < 0, -1.0, 1.0).astype(p.dtype) * jnp.maximum(jnp.abs(p), floor)
      return jnp.where(kept, held, jnp.zeros_like(p))

    new_params = jax.lax.cond(
        step >= project_step, lambda tree: jax.tree_util.tree_map_with_path(hold, tree, keep),
        lambda tree: tree, new_params)
    updates = jax.tree.map(lambda new, old, u: (new - old).astype(u.dtype), new_params, params, updates)
    measured = measure(new_params, target.weights, thresholds)
    error = jnp.clip(jnp.log(jnp.maximum(measured, 1.0)) - jnp.log(reference(step, state.start)), -1.0, 1.0)
    lr = learning_rate(step) if callable(learning_rate) else jnp.asarray(learning_rate, jnp.float32)
    ceiling = jnp.where(lr > 0, jnp.log(MAX_STEP * (1.0 - momentum) / jnp.maximum(lr, 1e-30)), jnp.inf)
    steered = jnp.clip(state.log_strength + gain * error, log_initial - MAX_LOG_RANGE,
                       jnp.minimum(log_initial + MAX_LOG_RANGE, ceiling))
    log_strength = jnp.where(steering, steered, state.log_strength)  # frozen once P is projected
    return updates, SteerState(step=step, log_strength=log_strength, start=state.start, measured=measured,
                               keep=keep, inner=inner)

  return optax.GradientTransformation(init_fn, update_fn)
