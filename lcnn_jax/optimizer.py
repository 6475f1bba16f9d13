"""Learning-rate and weight-decay schedules (REFERENCE §5) and the SGD chain with the sparsity rule.

The original schedules are tables by epoch (1-based, ``epoch = step // steps_per_epoch + 1``); ``-LR`` is a
multiplier on the table. SGD follows Torch: g += wd·w; buf = momentum·buf + g; w −= lr·buf. The ``prox`` rule
is told the momentum so that its L1 step equals the original's L1 term through that buffer
(:mod:`lcnn_jax.sparsity`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lcnn_jax import operating_point, sparsity

# (first epoch, learning rate, weight decay), the original's tables.
ALEXNET_TABLE = ((1, 1e-2, 0.0), (19, 5e-3, 0.0), (30, 1e-3, 0.0), (44, 5e-4, 0.0), (53, 1e-4, 0.0))
RESNET_TABLE = ((1, 0.1, 5e-4), (8, 0.03, 5e-4), (17, 0.01, 0.0), (26, 3e-3, 0.0), (31, 1e-3, 0.0))


def _by_epoch(table: Sequence[tuple[int, float, float]], column: int, steps_per_epoch: int,
              multiplier: float) -> optax.Schedule:
  boundaries = jnp.asarray([(first - 1) * steps_per_epoch for first, *_ in table[1:]])
  values = jnp.asarray([row[column] * multiplier for row in table])

  def schedule(step):
    return values[jnp.sum(step >= boundaries)]
  return schedule


def schedules(train_config: ml_collections.ConfigDict, steps_per_epoch: int,
              total_steps: int) -> tuple[optax.Schedule, optax.Schedule]:
  """(learning rate, weight decay) as functions of the step, from ``config.train``."""
  name, multiplier = train_config.lr_schedule, train_config.learning_rate
  if name in ("alexnet", "resnet"):
    table = ALEXNET_TABLE if name == "alexnet" else RESNET_TABLE
    lr = _by_epoch(table, 1, steps_per_epoch, multiplier)
    wd = _by_epoch(table, 2, steps_per_epoch, 1.0)
  elif name == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, multiplier, max(train_config.warmup_steps, 0),
                                            max(total_steps, train_config.warmup_steps + 1))
    wd = optax.constant_schedule(0.0)
  elif name == "constant":
    lr, wd = optax.constant_schedule(multiplier), optax.constant_schedule(0.0)
  else:
    raise ValueError(f"train.lr_schedule={name!r}: expected alexnet, resnet, cosine or constant.")
  if train_config.weight_decay >= 0:  # An explicit value overrides the schedule's own.
    wd = optax.constant_schedule(train_config.weight_decay)
  return lr, wd


def freeze(paths: Mapping[str, object] | set[str]) -> optax.GradientTransformation:
  """Zeroes the updates of the leaves at ``paths`` (e.g. 'conv2/dictionary'): those parameters stay fixed."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda kp, u: jnp.zeros_like(u) if sparsity.path_string(kp) in paths else u, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def dictionary_paths(model: nnx.Module) -> set[str]:
  """Paths of the dictionary leaves of every lookup layer in ``model``."""
  return {f"{path}/dictionary" if path else "dictionary" for path, _ in sparsity.lookup_layers(model)}


def paths_outside(model: nnx.Module, prefixes: str) -> set[str]:
  """Paths of the parameters of ``model`` under none of the comma-separated path ``prefixes`` (``train.train_only``,
  e.g. 'classifier'); raises ValueError naming a prefix no parameter has."""
  paths = {sparsity.path_string(kp) for kp, _ in
           jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}
  wanted = [p.strip().strip("/") for p in prefixes.split(",") if p.strip()]

  def under(path, prefix):
    return path == prefix or path.startswith(prefix + "/")

  for prefix in wanted:
    if not any(under(path, prefix) for path in paths):
      raise ValueError(f"train.train_only={prefixes!r}: no parameter of the model is under {prefix!r}; "
                       f"expected prefixes of paths such as {sorted(paths)[:4]}.")
  return {path for path in paths if not any(under(path, prefix) for prefix in wanted)}


def make_optimizer(config: ml_collections.ConfigDict, model: nnx.Module, steps_per_epoch: int, total_steps: int,
                   input_shape=None, *, budget: operating_point.Budget | None = None,
                   ) -> tuple[optax.GradientTransformation, sparsity.SparsityRule, optax.Schedule]:
  """The full update: sparsity rule (before), Torch SGD with decayed weights, sparsity rule (after).

  With ``sparsity.target_speedup`` or ``sparsity.target_density`` the update is wrapped in
  :func:`lcnn_jax.operating_point.steer`, which steers the rule's λ and ends at the target; that needs the model's
  ``budget`` (:func:`lcnn_jax.operating_point.budget_for`; built here from ``input_shape``, one example's shape, when
  not given), and raises ValueError for a target the model cannot reach. Returns the transformation, the sparsity rule (the trainer persists the threshold when the rule
  asks) and the learning-rate schedule (for logging).
  """
  lr, wd = schedules(config.train, steps_per_epoch, total_steps)
  momentum = config.train.momentum

  def chain_for(strength):
    rule = sparsity.make_rule(model, config.sparsity.rule, strength, lr, momentum)
    chain = [rule.before, optax.add_decayed_weights(wd), optax.trace(decay=momentum),
             optax.scale_by_learning_rate(lr), rule.after]
    if config.train.freeze_dictionaries:
      chain.append(freeze(dictionary_paths(model)))
    if config.train.train_only:
      chain.append(freeze(paths_outside(model, config.train.train_only)))
    return optax.chain(*chain), rule

  tx, rule = chain_for(config.sparsity.strength)
  if config.sparsity.target_speedup or config.sparsity.target_density:
    if budget is None:
      if input_shape is None:
        raise ValueError("sparsity.target_speedup/target_density need the input shape to count multiplications.")
      budget = operating_point.budget_for(model, config.model, input_shape)
    target = operating_point.target_from_config(config.sparsity, budget)
    tx = operating_point.steer(lambda strength: chain_for(strength)[0], target,
                               sparsity.coefficient_thresholds(model),
                               initial_strength=config.sparsity.strength or 1.0, total_steps=total_steps,
                               project_at=config.sparsity.project_at, learning_rate=lr, momentum=momentum)
  return tx, rule, lr
