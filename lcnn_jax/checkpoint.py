"""Orbax checkpoints of a run, and reading them back with or without the training code's state.

Layout of a workdir::

  WORKDIR/config.json              the run's config and its dataset's shape (classes, image shape, mean/std)
  WORKDIR/checkpoints/<step>/      params/ rest/ opt_state/ data/ meta/  (orbax, one directory per step)

This module writes and reads every checkpoint layout: a training step (:class:`Checkpointer`: the model, the
optimizer state and the data iterator's position) and a model alone (:func:`save_model`: params/ rest/ meta/, a
model imported from elsewhere, which the readers restore and the trainer refuses to resume from).

``params`` and ``rest`` (BatchNorm statistics, dropout RNG state) are saved as plain nested dicts keyed by the
model's attribute paths, so a tool can read them, and a model can be rebuilt from ``config.json`` alone, on any
topology: a checkpoint written by 8 devices or 2 processes restores on one CPU.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from lcnn_jax import config as config_lib, convert, models
from lcnn_jax.sparsity import path_string

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked: missing, incomplete, or of another model."""


# ------------------------------------------------------------------------------------------------ config


def save_run_info(workdir: str, config: ml_collections.ConfigDict, dataset: dict[str, Any]) -> None:
  """Writes ``config.json``: the full config and the dataset facts a model needs (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"config": config.to_dict(), "dataset": dataset}, f, indent=2, default=list)
  os.replace(path + ".tmp", path)  # never leaves a half-written file


def load_run_info(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, dataset facts) from ``workdir/config.json``; the config is completed with today's defaults, and the
  flat dictionary keys of earlier versions are read as today's ``model.dictionary`` (:func:`config_lib.from_dict`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"No {CONFIG_FILE} in {workdir!r}: is it the --workdir of a training run?")
  with open(path) as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError:
      saved = None
  if not isinstance(saved, dict) or not {"config", "dataset"} <= set(saved):
    raise CheckpointError(f"{path} is not the {CONFIG_FILE} of an lcnn_jax run (it needs 'config' and 'dataset'): "
                          f"is {workdir!r} the --workdir of a training run of lcnn_jax?")
  try:
    config = config_lib.from_dict(saved["config"], source=path)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return config, saved["dataset"]


# ------------------------------------------------------------------------------------------------ steps


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory of a workdir (or the directory itself when given one)."""
  nested = os.path.join(path, CHECKPOINT_DIR)
  return nested if os.path.isdir(nested) else path


def _step_of(path: str) -> int | None:
  name = os.path.basename(os.path.normpath(path))
  return int(name) if name.isdigit() else None


def _structure(tree) -> dict[str, tuple[int, ...]]:
  return {path_string(kp): tuple(leaf.shape) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_compatible(saved_params: dict, expected_params: dict, where: str) -> None:
  """Raises CheckpointError naming the parameters that differ between a checkpoint and the model."""
  saved, expected = _structure(saved_params), _structure(expected_params)
  if saved == expected:
    return
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  details = []
  if missing:
    details.append(f"missing from the checkpoint: {missing[:5]}")
  if extra:
    details.append(f"not in the model: {extra[:5]}")
  if reshaped:
    details.append("different shapes: " + ", ".join(f"{k} {saved[k]} vs {expected[k]}" for k in reshaped[:5]))
  raise CheckpointError(
      f"The checkpoint at {where} is of another model than the one configured ({'; '.join(details)}). "
      "Use the config the checkpoint was trained with (its workdir's config.json), or another workdir.")


def check_same_optimizer(saved_opt_state, expected_opt_state, where: str) -> None:
  """Raises CheckpointError when a checkpoint's optimizer state holds other arrays than the configured optimizer's
  (another sparsity rule, a target speedup or density set or unset): training cannot resume from it."""
  shapes = lambda tree: sorted(tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
  saved, expected = shapes(saved_opt_state), shapes(expected_opt_state)
  if saved != expected:
    raise CheckpointError(
        f"The checkpoint at {where} was trained with another optimizer than the one configured (its state holds "
        f"{len(saved)} arrays, this config's {len(expected)}): sparsity.rule and whether sparsity.target_speedup or "
        "target_density is set decide that state. Resume with the config it was trained with (its workdir's "
        "config.json), or train in another workdir.")


def _metadata_tree(step_dir: str, item: str) -> dict:
  """The saved tree of one item of a step (array metadata: shapes and dtypes), read without restoring."""
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.abspath(os.path.join(step_dir, item)))).tree


def _refuse_imported(step_dir: str) -> None:
  """Raises CheckpointError if ``step_dir`` holds an imported model (``lcnn_jax.import_t7``): it has no optimizer
  or data-iterator state, so training cannot resume from it (and must not set it aside as damaged)."""
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return
  if isinstance(meta, dict) and meta.get("imported_from"):
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    raise CheckpointError(
        f"{step_dir} holds a model imported from {meta['imported_from']}, without optimizer or data-iterator "
        f"state, so training cannot resume from it. Evaluate, inspect or export it here; to train from its "
        f"dictionaries use a new workdir with --config.train.init_from={workdir}.")


class Checkpointer:
  """Saves and restores a TrainState and the data iterator under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, data_iter) -> None:
    """Writes ``state`` (a train.TrainState) and the iterator's position; blocks until it is on disk."""
    import grain
    step = int(np.asarray(jax.device_get(state.step.addressable_data(0))))
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
        rest=ocp.args.StandardSave(nnx.to_pure_dict(state.rest)),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave({"step": step, "process_count": jax.process_count()})))
    self.manager.wait_until_finished()

  def restore_latest(self, template, data_iter):
    """The newest complete step restored into ``template``'s structure and shardings, or None if none.

    A step that fails to restore (left incomplete or damaged by a crash) is skipped with a warning, falling back
    to the one before it; nothing on disk is deleted. A checkpoint of another model raises CheckpointError.
    """
    import grain
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      try:
        saved_params = _metadata_tree(step_dir, "params")
      except Exception as e:  # unreadable metadata: an incomplete step
        self._set_aside(step, f"is unreadable ({e})")
        continue
      _refuse_imported(step_dir)
      check_compatible(saved_params, nnx.to_pure_dict(template.params), step_dir)
      try:
        saved_opt_state = _metadata_tree(step_dir, "opt_state")
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, f"is unreadable ({e})")
        continue
      check_same_optimizer(saved_opt_state, template.opt_state, step_dir)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(nnx.to_pure_dict(template.params)),
            rest=ocp.args.StandardRestore(nnx.to_pure_dict(template.rest)),
            opt_state=ocp.args.StandardRestore(template.opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:
        self._set_aside(step, f"could not be restored ({e})")
        continue
      params, rest = template.params, template.rest
      nnx.replace_by_pure_dict(params, restored["params"])
      nnx.replace_by_pure_dict(rest, restored["rest"])
      step_array = jax.make_array_from_process_local_data(template.step.sharding, np.asarray(step, np.int32))
      return template.replace(step=step_array, params=params,
                              rest=rest, opt_state=restored["opt_state"])
    if steps:
      raise CheckpointError(f"None of the checkpoint steps {steps} in {self.directory} could be restored; "
                            "see the warnings above. Move the directory away to start afresh.")
    return None

  def _set_aside(self, step: int, why: str) -> None:
    """Renames a damaged step to ``<step>.damaged`` (kept for inspection, never deleted) so the step can be
    written again when training recomputes it."""
    source = os.path.join(self.directory, str(step))
    target = source + ".damaged"
    suffix = 1
    while os.path.exists(target):
      suffix += 1
      target = f"{source}.damaged{suffix}"
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set aside checkpoint step {step}")
    logging.warning("Checkpoint step %d in %s %s; kept it as %s and falling back to the step before.", step,
                    self.directory, why, target)
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()


def save_model(workdir: str, model: nnx.Module, *, step: int, imported_from: str) -> None:
  """Writes ``model`` alone as step ``step`` of ``workdir``: its params and rest (BatchNorm statistics) as a training
  step stores them, no optimizer or data-iterator state, and ``imported_from`` (where the model came from) in its
  meta. :func:`restore_model` and the other readers restore it; the trainer refuses to resume from it
  (``--config.train.init_from`` starts a run from its dictionaries instead)."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                                  options=ocp.CheckpointManagerOptions(create=True))
  try:
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(params)), rest=ocp.args.StandardSave(nnx.to_pure_dict(rest)),
        meta=ocp.args.JsonSave({"step": step, "process_count": 1, "imported_from": imported_from})))
    manager.wait_until_finished()
  finally:
    manager.close()


# ------------------------------------------------------------------------------------------------ models


def latest_step(workdir: str) -> int | None:
  """The latest checkpoint step of ``workdir`` (complete or not), or None when it has none."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  return max(steps) if steps else None


def resolve_step_dir(path: str, step: int | None = None) -> str:
  """A step directory from a workdir, a checkpoints directory or a step directory; the latest unless ``step``."""
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint path {path!r} does not exist.")
  path = os.path.abspath(path)
  if _step_of(path) is not None and os.path.isdir(os.path.join(path, "params")):
    return path
  directory = checkpoint_dir(path)
  steps = sorted(int(name) for name in os.listdir(directory)
                 if name.isdigit() and os.path.isdir(os.path.join(directory, name, "params")))
  if not steps:
    expected = directory if os.path.basename(directory) == CHECKPOINT_DIR else os.path.join(path, CHECKPOINT_DIR)
    raise CheckpointError(f"No checkpoint in {path!r}: expected {expected}/<step>/params (train first, "
                          "or pass the workdir of a run that saved one).")
  if step is None:
    return os.path.join(directory, str(steps[-1]))
  if step not in steps:
    raise CheckpointError(f"No step {step} in {directory!r}; the steps there are {steps}.")
  return os.path.join(directory, str(step))


def restore_into(model: nnx.Module, step_dir: str) -> None:
  """Loads params and the rest (BatchNorm statistics) of ``step_dir`` into ``model`` on this host's devices."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params_dict, rest_dict = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  try:
    saved = _metadata_tree(step_dir, "params")
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds on a damaged step)
    raise _damaged(step_dir, e) from None
  check_compatible(saved, params_dict, step_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever topology wrote the checkpoint
  on_this_host = lambda tree: jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=here), tree)
  for item, state, tree in (("params", params, params_dict), ("rest", rest, rest_dict)):
    try:
      restored = checkpointer.restore(os.path.join(step_dir, item),
                                      args=ocp.args.PyTreeRestore(tree, restore_args=on_this_host(tree)))
    except Exception as e:  # pylint: disable=broad-except
      raise _damaged(step_dir, e) from None
    nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, params, rest)


def _damaged(step_dir: str, error: Exception) -> CheckpointError:
  """The error for a step that cannot be read, naming the other steps saved beside it."""
  directory, step = os.path.dirname(step_dir), _step_of(step_dir)
  others = sorted(int(name) for name in os.listdir(directory) if name.isdigit() and int(name) != step)
  detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
  fix = (f"use another saved step ({', '.join(map(str, others))}): pass {directory}/<step> "
         "(--config.restore for lcnn_jax.main, --step for the exporter and flops)" if others
         else "no other step is saved there; train again")
  return CheckpointError(f"Checkpoint {step_dir} is incomplete or damaged ({type(error).__name__}: {detail}); "
                         f"{fix}.")


def restore_model(workdir: str, step: int | None = None, *,
                  run_info: tuple[ml_collections.ConfigDict, dict[str, Any]] | None = None,
                  ) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """(model in eval-ready state, its config, the step) from a run's workdir, on this host alone.

  ``run_info`` is the workdir's (config, dataset facts) when the caller has read them already
  (:func:`load_run_info`), so that a command reads ``config.json`` once.
  """
  config, dataset = run_info if run_info is not None else load_run_info(workdir)
  model = models.create_model(config.model, num_classes=dataset["num_classes"],
                              input_shape=tuple(dataset["image_shape"]), rngs=nnx.Rngs(0))
  step_dir = resolve_step_dir(workdir, step)
  restore_into(model, step_dir)
  return model, config, _step_of(step_dir)


def restore_step(model: nnx.Module, path: str) -> int:
  """Loads the checkpoint at ``path`` (a step directory, or the latest step of a checkpoints directory or
  workdir) into ``model`` on this host; returns the step."""
  step_dir = resolve_step_dir(path)
  restore_into(model, step_dir)
  return _step_of(step_dir)


def transfer_dictionaries_from(source: str, model: nnx.Module) -> list[str]:
  """Copies the dictionaries of the run at ``source`` (its workdir or one of its step directories) into
  ``model``, for every lookup layer path the two share; returns those paths."""
  step_dir = resolve_step_dir(source)
  source_model, _, _ = restore_model(os.path.dirname(os.path.dirname(step_dir)), _step_of(step_dir))
  copied = convert.transfer_dictionaries(source_model, model)
  logging.info("Copied %d dictionaries from %s: %s", len(copied), step_dir, ", ".join(copied))
  return copied
