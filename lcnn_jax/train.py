"""Training and evaluation: one mesh over all devices, data-parallel SGD with the sparsity rule on P.

``train_and_evaluate(config, workdir)`` is the main job. Parameters are replicated, each batch is sharded over
the ``data`` axis of a mesh that spans every device of every process, and each process feeds its own shard.
The step is functional: the model is split once into its graph definition, its parameters (``nnx.Param``) and
the rest (BatchNorm statistics, dropout RNG state), and each step merges them, runs the pieces of the batch
(``train.break_batch``), and applies one optimizer update.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import flax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lcnn_jax import checkpoint, cli, config as config_lib, counting, data, layers, models, optimizer as optimizer_lib
from lcnn_jax import operating_point, sparsity
from lcnn_jax import logger as logger_lib

DATA_AXIS = "data"


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, a bad resume); the message says why and what to do."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; ``params`` and ``rest`` are nnx.State of the model's split."""
  step: jax.Array  # int32 ()
  params: Any
  rest: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------------ model


def set_compute_dtype(model: nnx.Module, dtype) -> None:
  """Runs convolutions, dense and lookup layers in ``dtype``, and has BatchNorm return ``dtype`` so activations
  stay in it between layers. Parameters stay float32; BatchNorm computes its statistics in float32 and keeps its
  running statistics in float32."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.Conv, nnx.Linear, nnx.BatchNorm, *layers.LOOKUP_LAYERS)):
      module.dtype = dtype


def dataset_facts(info: data.DatasetInfo) -> dict[str, Any]:
  """What a tool needs of the dataset to rebuild the model and read its outputs, saved in config.json."""
  return {"name": info.name, "num_classes": info.num_classes, "image_shape": list(info.image_shape),
          "class_names": info.class_names, "mean": list(info.mean), "std": list(info.std),
          "num_train": info.num_train, "num_eval": info.num_eval, "preprocessing": info.preprocessing()}


def create_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> nnx.Module:
  """The configured model for the dataset's classes and image shape, seeded from ``config.seed``."""
  model = models.create_model(config.model, num_classes=info.num_classes, input_shape=info.image_shape,
                              rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
  if config.train.compute_dtype != "float32":
    set_compute_dtype(model, jnp.dtype(config.train.compute_dtype))
  return model


# ------------------------------------------------------------------------------------------------ steps


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits."""
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(graphdef, state: TrainState, batch: dict, *, tx: optax.GradientTransformation,
               thresholds: dict[str, float] | None, pieces: int, piece_sharding=None):
  """One update on one global batch, accumulated over ``pieces`` sequential pieces.

  ``thresholds`` (the original rule) first zeroes |P| ≤ τ in the stored parameters. BatchNorm sees each
  piece on its own and its running statistics advance once per piece, as in the original's ``-breakBatch``.
  Returns the new state and the step's mean loss and top-1 accuracy.
  """
  params = state.params
  if thresholds:
    params = sparsity.threshold_state(params, thresholds)

  def split_pieces(x):
    # Piece i holds rows i, i + pieces, ...: each device keeps its share of every piece.
    x = x.reshape(x.shape[0] // pieces, pieces, *x.shape[1:]).swapaxes(0, 1)
    if piece_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, piece_sharding(x.ndim))
    return x

  def piece_loss(params, rest, images, labels):
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables at this trace level
    logits = model(images)
    loss = cross_entropy(logits, labels).mean()
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, (new_rest, topk_correct(logits, labels, 1).mean())

  grad_fn = jax.value_and_grad(piece_loss, has_aux=True)

  def accumulate(carry, piece):
    grads, rest, loss, top1 = carry
    (piece_loss_value, (rest, piece_top1)), piece_grads = grad_fn(params, rest, *piece)
    grads = jax.tree.map(jnp.add, grads, piece_grads)
    return (grads, rest, loss + piece_loss_value, top1 + piece_top1), None

  carry = (jax.tree.map(jnp.zeros_like, params), state.rest, jnp.zeros([]), jnp.zeros([]))
  images, labels = split_pieces(batch["image"]), split_pieces(batch["label"])
  if jax.default_backend() == "cpu":
    # XLA:CPU runs convolutions inside a while loop about ten times slower: unroll the pieces instead.
    for i in range(pieces):
      carry, _ = accumulate(carry, (images[i], labels[i]))
  else:
    # On accelerators a scan keeps one piece's activations alive at a time, which is what pieces are for.
    carry, _ = jax.lax.scan(accumulate, carry, (images, labels))
  grads, rest, loss, top1 = carry
  grads = jax.tree.map(lambda g: g / pieces, grads)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
  return new_state, {"loss": loss / pieces, "top1": top1 / pieces}


def eval_step(eval_graphdef, params, rest, batch: dict) -> dict[str, jax.Array]:
  """Sums over the real (mask True) examples of one batch: loss, top-1 and top-5 hits, and the count."""
  model = nnx.merge(eval_graphdef, params, rest)
  logits = model(batch["image"])
  mask = batch["mask"].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
          "top5": jnp.sum(topk_correct(logits, batch["label"], k) * mask),
          "count": jnp.sum(mask)}


def layer_densities(params, thresholds: dict[str, float]) -> tuple[dict[str, jax.Array], jax.Array]:
  """Density of thresholded P per lookup layer path ('conv2', ...) and over all of them, on device."""
  nonzeros, sizes = {}, {}
  for keypath, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = sparsity.path_string(keypath)
    if path in thresholds:
      layer = path.rsplit("/", 1)[0]
      nonzeros[layer], sizes[layer] = jnp.sum(jnp.abs(p) > thresholds[path]), p.size
  if not sizes:
    return {}, jnp.ones([])
  mean = sum(nonzeros.values()) / sum(sizes.values())
  return {layer: nonzeros[layer] / sizes[layer] for layer in nonzeros}, mean


# ------------------------------------------------------------------------------------------------ sharding


def make_mesh() -> jax.sharding.Mesh:
  """A one-axis mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Per-process batches -> one global array per key, sharded over the data axis."""
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in local.items()}


class DevicePrefetch:
  """The batches of a host iterator, put on the devices ``size`` steps ahead, so that each transfer overlaps the
  steps before it. Checkpoints see the position after the last batch *taken*, not the last one read ahead:
  ``get_state()`` is the host iterator's state recorded when that batch was read (as JSON bytes, the form
  grain's checkpoint handler stores for iterators that are not its own)."""

  def __init__(self, iterator, put, size: int = 2):
    self.iterator, self.put = iterator, put
    self.state = iterator.get_state()
    self.queue = collections.deque()
    for _ in range(size):
      self._read()

  def _read(self) -> None:
    batch = self.put(next(self.iterator))  # dispatched: the transfer runs while the device computes
    self.queue.append((batch, self.iterator.get_state()))

  def __iter__(self):
    return self

  def __next__(self):
    self._read()
    batch, self.state = self.queue.popleft()
    return batch

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()


def replicate(tree, sharding: NamedSharding):
  """Host values, identical on every process, as arrays replicated over ``sharding``'s mesh (any process count)."""
  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree.map(put, tree)


def host_local(tree):
  """A NumPy copy of a tree of replicated (possibly multi-process) arrays; PRNG keys stay on this host's device."""
  def local(x):
    if not isinstance(x, jax.Array):
      return x
    shard = x.addressable_data(0)
    return shard if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(shard)
  return jax.tree.map(local, tree)


# ------------------------------------------------------------------------------------------------ loop


@dataclasses.dataclass(frozen=True)
class Plan:
  """How long the run is and how often it logs, evaluates and saves."""
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  log_every: int
  checkpoint_every: int


def make_plan(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> Plan:
  steps_per_epoch = config.train.steps_per_epoch or max(1, info.num_train // config.train.batch_size)
  total = config.train.num_steps or config.train.epochs * steps_per_epoch
  if total <= 0:
    raise ValueError(f"train.epochs={config.train.epochs}, train.num_steps={config.train.num_steps}: "
                     "the run has no steps; set one of them > 0.")
  return Plan(steps_per_epoch=steps_per_epoch, total_steps=total,
              eval_every=config.train.eval_every or steps_per_epoch,
              log_every=max(1, config.train.log_every),
              checkpoint_every=max(1, config.train.checkpoint_every))


class Evaluator:
  """Evaluates on the validation split: every image exactly once, the last batch padded and masked."""

  def __init__(self, config, info, model, mesh):
    self.config, self.info = config, info
    self.batch_size = config.train.eval_batch_size or config.train.batch_size
    if self.batch_size % jax.device_count():
      raise ValueError(f"eval batch size {self.batch_size} must be divisible by the {jax.device_count()} devices; "
                       "set train.eval_batch_size.")
    self.sharding = NamedSharding(mesh, P(DATA_AXIS))
    self.graphdef = nnx.graphdef(layers.eval_view(model))
    self._step = jax.jit(functools.partial(eval_step, self.graphdef))

  def __call__(self, params, rest) -> dict[str, float]:
    totals = None
    for local in data.make_eval_iterator(self.config.data, self.info, global_batch_size=self.batch_size,
                                         process_index=jax.process_index(), process_count=jax.process_count()):
      sums = self._step(params, rest, global_batch(local, self.sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise TrainingError(f"The validation split of data.name={self.config.data.name!r} yielded no batch.")
    totals = jax.tree.map(float, host_local(totals))
    count = totals.pop("count")
    logging.vlog(1, "Evaluated %d validation images (of %d).", count, self.info.num_eval)
    return {name: value / count for name, value in totals.items()} | {"count": int(count)}


def count_model(model: nnx.Module, params, rest, graphdef, input_shape) -> counting.MultiplicationCount:
  """Multiplications per layer with the current (host-local) parameters."""
  return counting.count_multiplications(nnx.merge(graphdef, host_local(params), host_local(rest)), input_shape)


def _check_finite(step: int, loss: float, last_saved: int | None, workdir: str) -> None:
  if not math.isfinite(loss):
    saved = (f"the last good checkpoint, step {last_saved}, is kept in {workdir}/checkpoints"
             if last_saved is not None else "no checkpoint had been written yet")
    raise TrainingError(
        f"Loss became {loss} at step {step}; training stopped and {saved}. Lower train.learning_rate, check the "
        "data (data.mean/data.std), or resume from that checkpoint with another config.")


OptimizerWrapper = Callable[[optax.GradientTransformation, nnx.Module, int, tuple[int, ...]],
                            optax.GradientTransformation]
"""(the configured update, the model, the run's total steps, one image's shape) -> the update the run takes."""


Prepare = Callable[[nnx.Module], None]
"""Changes a freshly built model before step 0 (an experiment's chosen weights: copied, transferred)."""


@dataclasses.dataclass
class Run:
  """The pieces of a run at its start, built once by :func:`init_run` (flax's ``create_train_state``); the loop
  (:func:`train_and_evaluate`) runs them."""
  config: ml_collections.ConfigDict
  info: data.DatasetInfo
  plan: Plan
  mesh: jax.sharding.Mesh
  model: nnx.Module  # the configured model as built; ``state`` holds the run's values
  graphdef: Any  # the model's graph definition, split from its params and the rest
  state: TrainState  # replicated over ``mesh``: the fresh (or prepared) start, or the latest checkpoint's
  step: int  # the step ``state`` is at
  tx: optax.GradientTransformation  # the whole update (the configured one, wrapped by ``wrap_optimizer``)
  rule: sparsity.SparsityRule
  learning_rate: optax.Schedule
  thresholds: dict[str, float]  # coefficient leaf path -> τ
  budget: operating_point.Budget  # the counted multiplications against the CNN baseline, built once
  train_iter: Any  # the training data iterator, at ``step``'s position
  checkpointer: checkpoint.Checkpointer

  def close(self) -> None:
    """Closes the checkpointer (every save has finished by then)."""
    self.checkpointer.close()


def init_run(config: ml_collections.ConfigDict, workdir: str, prepare: Prepare | None = None, *,
             wrap_optimizer: OptimizerWrapper | None = None) -> Run:
  """Starts (or resumes) the run of ``config`` in ``workdir``: the one place a run's pieces are built.

  Builds the dataset facts, the plan, the mesh, the model (with ``train.init_from``'s dictionaries), its budget of
  multiplications, the update and the data iterator; restores the latest checkpoint of ``workdir`` when there is
  one, and writes ``config.json`` once the checkpoints are known to be this run's.

  Args:
    config: the run's full config (validated here).
    workdir: the run's directory (created if new).
    prepare: when given and ``workdir`` has no checkpoint yet, changes the freshly built model before step 0 (after
      ``train.init_from``, which it may override), and the prepared start is saved as step 0, so that the run
      resumes from it as from any checkpoint; ignored when there is a checkpoint to resume.
    wrap_optimizer: wraps the configured update (an experiment's schedule the config has no key for, e.g. the
      magnitude pruning of :mod:`lcnn_jax.experiments.pruning`); a run started with one resumes only with the same.
  Returns:
    The :class:`Run`, at step 0 or at the restored step; :meth:`Run.close` releases its checkpointer.
  Raises:
    ValueError: batch sizes the devices cannot share, a run of no steps, a target the model cannot reach.
    checkpoint.CheckpointError: ``workdir`` holds checkpoints of another model or optimizer, or none restores.
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  info = data.dataset_info(config.data, cache_dir=workdir)
  if config.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the "
                     f"{jax.process_count()} processes.")
  if (config.train.batch_size // config.train.break_batch) % jax.device_count():
    raise ValueError(f"train.batch_size / train.break_batch = {config.train.batch_size // config.train.break_batch} "
                     f"must be divisible by the {jax.device_count()} devices.")
  plan = make_plan(config, info)
  mesh = make_mesh()

  model = create_model(config, info)
  if config.train.init_from:
    checkpoint.transfer_dictionaries_from(config.train.init_from, model)
  prepared = prepare is not None and checkpoint.latest_step(workdir) is None
  if prepared:
    prepare(model)
  budget = operating_point.budget_for(model, config.model, info.image_shape)
  tx, rule, learning_rate = optimizer_lib.make_optimizer(config, model, plan.steps_per_epoch, plan.total_steps,
                                                         budget=budget)
  if wrap_optimizer is not None:
    tx = wrap_optimizer(tx, model, plan.total_steps, info.image_shape)
  thresholds = sparsity.coefficient_thresholds(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
  state = replicate(state, NamedSharding(mesh, P()))

  train_iter = data.make_train_iterator(config.data, info, global_batch_size=config.train.batch_size,
                                        seed=config.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  restored = checkpointer.restore_latest(state, train_iter)
  checkpoint.save_run_info(workdir, config, dataset_facts(info))  # once the checkpoints are known to be this run's
  step = 0
  if restored is not None:
    state, step = restored, int(host_local(restored.step))
    logging.info("Resumed from step %d in %s.", step, checkpointer.directory)
  elif prepared:
    checkpointer.save(state, train_iter)
    logging.info("Wrote the prepared start of %s (step 0).", workdir)
  return Run(config=config, info=info, plan=plan, mesh=mesh, model=model, graphdef=graphdef, state=state, step=step,
             tx=tx, rule=rule, learning_rate=learning_rate, thresholds=thresholds, budget=budget,
             train_iter=train_iter, checkpointer=checkpointer)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, prepare: Prepare | None = None,
                       wrap_optimizer: OptimizerWrapper | None = None) -> dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint; returns the final eval metrics.

  The run starts in :func:`init_run` (``prepare`` and ``wrap_optimizer`` are its); this is the loop: steps, logs,
  evaluations and checkpoints, until the plan's last step or a stop signal (saved, then :class:`cli.Interrupted`).
  """
  run = init_run(config, workdir, prepare, wrap_optimizer=wrap_optimizer)
  plan, mesh, info, budget, manager = run.plan, run.mesh, run.info, run.budget, run.checkpointer
  state, step = run.state, run.step
  log = logger_lib.MetricsLogger(workdir, enabled=jax.process_index() == 0, resume_step=step)
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  batches = DevicePrefetch(run.train_iter, lambda local: global_batch(local, batch_sharding))

  step_fn = jax.jit(
      functools.partial(train_step, run.graphdef, tx=run.tx,
                        thresholds=run.thresholds if run.rule.persist_threshold else None,
                        pieces=config.train.break_batch,
                        piece_sharding=lambda ndim: NamedSharding(mesh, P(None, DATA_AXIS, *([None] * (ndim - 2))))),
      donate_argnums=(0,))
  densities_fn = jax.jit(functools.partial(layer_densities, thresholds=run.thresholds))
  count_fn = jax.jit(budget.count)
  evaluator = Evaluator(config, info, run.model, mesh)

  def evaluate(step):
    metrics = evaluator(state.params, state.rest)
    count = count_model(run.model, state.params, state.rest, run.graphdef, info.image_shape)
    per_layer = collections.Counter()
    for row in count.rows:
      per_layer[row.path] += row.multiplications
    log.eval(step, metrics, multiplications=count.total, baseline_multiplications=budget.baseline,
             layer_multiplications=dict(per_layer))
    return metrics

  last_saved = manager.latest_step()
  progress = logger_lib.Progress(plan.total_steps, initial=step, enabled=jax.process_index() == 0)
  metrics = None
  window_start, window_images = time.perf_counter(), 0
  with jax.set_mesh(mesh), cli.StopSignals() as stop:
    while step < plan.total_steps:
      batch = next(batches)
      state, step_metrics = step_fn(state, batch)
      window_images += config.train.batch_size
      step += 1
      if step % plan.log_every == 0 or step == plan.total_steps:
        loss = float(host_local(step_metrics["loss"]))
        _check_finite(step, loss, last_saved, workdir)
        densities, mean_density = host_local(densities_fn(state.params))
        elapsed = time.perf_counter() - window_start
        row = {"loss": loss, "top1": float(host_local(step_metrics["top1"])),
               "learning_rate": float(run.learning_rate(step - 1)), "images_per_second": window_images / elapsed,
               "density": float(mean_density),
               "speedup": budget.speedup(float(host_local(count_fn(state.params)))),
               "strength": operating_point.strength_of(state.opt_state) or config.sparsity.strength}
        log.train(step, row, {k: float(v) for k, v in densities.items()})
        progress.update(step, row)
        window_start, window_images = time.perf_counter(), 0
      if step % plan.eval_every == 0 or step == plan.total_steps:
        metrics = evaluate(step)
      if step % plan.checkpoint_every == 0 or step == plan.total_steps or stop.signum:
        if step % plan.log_every:  # a checkpoint is only ever written after a finite loss
          _check_finite(step, float(host_local(step_metrics["loss"])), last_saved, workdir)
        manager.save(state, batches)
        last_saved = step
      if stop.signum:  # Ctrl-C or SIGTERM (a scheduler's preemption): saved above, with the data iterator
        progress.close()
        run.close()
        log.close()
        raise cli.Interrupted(f"interrupted at step {step}; rerun the same command to resume", stop.signum)
  progress.close()
  run.close()
  if metrics is None:  # resumed at the end: evaluate what was restored
    metrics = evaluate(step)
  log.close()
  return metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """The original's ``-testOnly``: top-1/top-5 of the latest checkpoint in ``workdir`` or ``config.restore``."""
  info = data.dataset_info(config.data, cache_dir=workdir)
  model = create_model(config, info)
  step = checkpoint.restore_step(model, config.restore or workdir)
  mesh = make_mesh()
  _, params, rest = nnx.split(model, nnx.Param, ...)
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    metrics = Evaluator(config, info, model, mesh)(replicate(params, replicated), replicate(rest, replicated))
  logging.debug("Step %d: top-1 %.4f, top-5 %.4f, loss %.4f over %d images.", step, metrics["top1"],
                metrics["top5"], metrics["loss"], metrics["count"])
  return metrics | {"step": step}
