"""Training throughput: images/s of the CNN baseline vs the LCNN, compute only and through the JPEG pipeline.

    python -m lcnn_jax.throughput --config configs/alexnet_fast.py --batch 16 --steps 5 [--jpeg_dir DIR] [--json]

*compute*: the jitted train step (forward, backward, SGD with the sparsity rule) on one synthetic
ImageNet-shaped batch already on the device; the median over ``--steps`` timed steps after two warm-up steps.
*pipeline*: the grain input pipeline alone over a folder of JPEGs (``--jpeg_dir``, or a generated folder of
``--jpeg_images`` random 500×375 JPEGs), decoding, resizing, cropping and flipping as the trainer does.

The table's first line names the machine (:func:`lcnn_jax.inference.machine.describe`); ``--json`` prints
``{"machine": {"cpu", "kernel_arch", "march", "l1_bytes", "l2_bytes", "l3_bytes", "cores"}, "device", "devices",
"rows": [{"model", "role", "measure", "batch", "images_per_second"}, ...]}``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from lcnn_jax import cli, config as config_lib, data, models, operating_point, optimizer, sparsity, train
from lcnn_jax.inference import machine

USER_ERRORS = (ValueError, FileNotFoundError)  # exit 2, no traceback


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so it never clashes with
  another command's (``lcnn_jax.devicecheck`` imports it beside ``lcnn_jax.main``)."""
  config_flags.DEFINE_config_file("config", None, "A model config, e.g. configs/alexnet_fast.py.",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_integer("batch", 16, "Global batch size.", flag_values=flag_values)
  flags.DEFINE_integer("steps", 5, "Timed steps (after two warm-up steps).", flag_values=flag_values)
  flags.DEFINE_string("jpeg_dir", "", "An ImageNet-style folder for the pipeline measurement; empty: generate one.",
                      flag_values=flag_values)
  flags.DEFINE_integer("jpeg_images", 256, "Images in the generated JPEG folder.", flag_values=flag_values)
  flags.DEFINE_integer("workers", 0, "grain worker processes for the pipeline measurement.", flag_values=flag_values)
  flags.DEFINE_bool("json", False, "Print the results as JSON.", flag_values=flag_values)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)

def _operating_point_budget(config, model: nnx.Module, input_shape) -> operating_point.Budget | None:
  """The budget of ``model`` (built from ``config``) when it can be trained to the config's target; None for a CNN
  (it has none) and, with a warning, for a size the config was not written for (e.g. a smoke run's small images)."""
  if not sparsity.lookup_layers(model):
    return None
  budget = operating_point.budget_for(model, config.model, input_shape)
  try:
    operating_point.target_from_config(config.sparsity, budget)
  except ValueError as e:
    logging.warning("Timing %s without its operating point: %s", config.model.name, e)
    return None
  return budget


def compute_images_per_second(config, model_config, batch_size: int, steps: int) -> float:
  """Median images/s of the train step of ``model_config`` on a synthetic batch of ``batch_size``."""
  num_classes, image_shape = data.get_source("synthetic").input_facts(config.data)
  info = data.DatasetInfo(name="synthetic", num_classes=num_classes, image_shape=image_shape, num_train=batch_size,
                          num_eval=0, class_names=None, mean=(0.0,) * 3, std=(1.0,) * 3)
  run_config = config.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.model = model_config
  model = train.create_model(run_config, info)
  budget = None  # built once: the reachability check and the steered update share it
  if run_config.sparsity.target_speedup or run_config.sparsity.target_density:
    budget = _operating_point_budget(run_config, model, info.image_shape)
    if budget is None:
      with run_config.unlocked():
        run_config.sparsity.target_speedup = run_config.sparsity.target_density = 0.0
  tx, rule, _ = optimizer.make_optimizer(run_config, model, steps_per_epoch=1000, total_steps=1000,
                                         input_shape=info.image_shape, budget=budget)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mesh = train.make_mesh()
  state = jax.device_put(train.TrainState(step=jnp.zeros([], jnp.int32), params=params, rest=rest,
                                          opt_state=tx.init(params)), NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  batch = train.global_batch({"image": rng.normal(size=(batch_size, *image_shape)).astype(np.float32),
                              "label": rng.integers(0, info.num_classes, batch_size).astype(np.int32)},
                             NamedSharding(mesh, P(train.DATA_AXIS)))
  thresholds = sparsity.coefficient_thresholds(model) if rule.persist_threshold else None
  step = jax.jit(lambda s, b: train.train_step(graphdef, s, b, tx=tx, thresholds=thresholds,
                                               pieces=config.train.break_batch), donate_argnums=(0,))
  times = []
  with jax.set_mesh(mesh):
    for i in range(steps + 2):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics["loss"])
      if i >= 2:
        times.append(time.perf_counter() - start)
  return batch_size / statistics.median(times)


def write_jpeg_folder(root: str, images: int, classes: int = 8) -> None:
  """An ImageNet-style folder of random 500×375 JPEGs (train and val), for the pipeline measurement."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, count in (("train", images), ("val", classes)):
    for i in range(count):
      folder = os.path.join(root, split, f"n{i % classes:08d}")
      os.makedirs(folder, exist_ok=True)
      pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, f"{i}.JPEG"), quality=90)


def pipeline_images_per_second(jpeg_dir: str, batch_size: int, steps: int, workers: int) -> float:
  """Median images/s of the training input pipeline over a JPEG folder."""
  config = config_lib.default_config()
  config.data.name, config.data.dir, config.data.num_workers = "folder", jpeg_dir, workers
  config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  info = data.dataset_info(config.data)
  iterator = data.make_train_iterator(config.data, info, global_batch_size=batch_size, seed=0, process_index=0,
                                      process_count=1)
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    next(iterator)
    if i >= 2:
      times.append(time.perf_counter() - start)
  if hasattr(iterator, "close"):
    iterator.close()
  return batch_size / statistics.median(times)


def format_table(result: dict) -> str:
  """The measurements as fixed-width text, under the machine's line."""
  lines = [machine.Machine(**result["machine"]).line(),
           f"{'model':<16} {'role':<6} {'measure':<14} {'batch':>6} {'images/s':>10}   ({result['device']})"]
  lines += [f"{row['model']:<16} {row['role']:<6} {row['measure']:<14} {row['batch']:>6} "
            f"{row['images_per_second']:>10.1f}" for row in result["rows"]]
  return "\n".join(lines)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command on its parsed flags (``flag_values``): prints the training and input pipeline's images/s."""
  del argv
  config, batch, steps = flag_values.config, flag_values.batch, flag_values.steps
  lcnn_config = config.model
  baseline_config = models.baseline_config(config.model)
  rows = []
  for label, model_config in (("cnn", baseline_config), ("lcnn", lcnn_config)):
    rows.append({"model": model_config.name, "role": label, "measure": "compute", "batch": batch,
                 "images_per_second": compute_images_per_second(config, model_config, batch, steps)})
  with tempfile.TemporaryDirectory() as generated:
    jpeg_dir = flag_values.jpeg_dir or generated
    if not flag_values.jpeg_dir:
      write_jpeg_folder(generated, flag_values.jpeg_images)
    rows.append({"model": "-", "role": "input", "measure": "jpeg_pipeline", "batch": batch,
                 "images_per_second": pipeline_images_per_second(jpeg_dir, batch, steps, flag_values.workers)})
  result = {"machine": machine.describe().as_dict(), "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "rows": rows}
  print(json.dumps(result) if flag_values.json else format_table(result))


if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=USER_ERRORS)
