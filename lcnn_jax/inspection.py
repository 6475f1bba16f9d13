"""Inspecting a run: its checkpoint's multiplications per layer beside its CNN baseline's, as a table, JSON or a plot.

    python -m lcnn_jax.flops --workdir DIR [--step N] [--json] [--plot FILE.png]
    python -m lcnn_jax.flops --config configs/X.py        (an untrained model, no data needed)

The command keeps the counter's old name (``lcnn_jax.flops`` runs :func:`main` with :func:`define_flags`;
``python -m lcnn_jax.inspection`` is the same command); the counting itself is :mod:`lcnn_jax.counting`. Needs
neither the training data nor an accelerator: a checkpoint written by any topology is restored onto this host's
first device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from lcnn_jax import checkpoint, cli, config as config_lib, counting, data, models


def checkpoint_report(path: str, step: int | None = None) -> str:
  """The per-layer table of a run's checkpoint, its CNN baseline's total, the speedup and parameters stored."""
  run_info = checkpoint.load_run_info(path)  # read once
  model, config, restored_step = checkpoint.restore_model(path, step, run_info=run_info)
  _, dataset = run_info
  input_shape = tuple(dataset["image_shape"])
  count = counting.count_multiplications(model, input_shape)
  baseline = counting.baseline_count(config.model, dataset["num_classes"], input_shape)
  return "\n".join([
      f"{config.model.name} at step {restored_step} on {'x'.join(map(str, input_shape))} inputs",
      count.table(),
      f"baseline ({models.baseline_config(config.model).name}): {baseline.total:,} multiplications",
      f"speedup: {count.speedup_over(baseline):.2f}x    parameters stored: {counting.stored_parameters(model):,}"])


def input_facts(config) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, one image's (h, w, c)) that ``config.data`` implies, read from the config alone, no data: its
  source's ``input_facts`` (:class:`lcnn_jax.data.Source`).

  digits: 10 classes of 8×8×1 (``image_size`` upsamples); idx, fashion_mnist: ``data.num_classes`` or 10 classes
  of 28×28×1; folder, tfds and synthetic: ``data.num_classes`` or 1000 classes of ``image_size`` (or 224) square
  RGB images.
  """
  return data.get_source(config.data.name).input_facts(config.data)


def inspect_model(model: nnx.Module, model_config, num_classes: int, input_shape: Sequence[int],
                  step: int | None = None) -> dict:
  """The inspection of ``model`` as a JSON-ready dict: its per-layer counts beside its CNN baseline's.

  Keys: model, baseline, step, input_shape, layers (path, kind, input/output/kernel shape, dictionary_size,
  density, multiplications, dictionary_multiplications, share of the total, baseline_multiplications of the
  baseline's layer of the same path or None), total_multiplications, baseline_multiplications, speedup,
  parameters_stored (dictionaries + non-zeros of P + biases + dense layers) and baseline_parameters_stored,
  bytes_stored and baseline_bytes_stored (per precision, :func:`lcnn_jax.counting.stored_bytes`).
  """
  input_shape = tuple(int(n) for n in input_shape)
  count = counting.count_multiplications(model, input_shape)
  baseline_model = counting.baseline_model(model_config, num_classes, input_shape)
  baseline = counting.count_multiplications(baseline_model, input_shape)
  baseline_by_path = {row.path: row.multiplications for row in baseline.rows}
  total = count.total
  rows = []
  for row in count.rows:
    entry = dataclasses.asdict(row)
    entry.update(input_shape=list(row.input_shape), output_shape=list(row.output_shape),
                 kernel_shape=list(row.kernel_shape), share=row.multiplications / total if total else 0.0,
                 baseline_multiplications=baseline_by_path.get(row.path))
    rows.append(entry)
  return {
      "model": model_config.name, "baseline": models.baseline_config(model_config).name, "step": step,
      "input_shape": list(input_shape), "num_classes": num_classes, "layers": rows,
      "total_multiplications": total, "baseline_multiplications": baseline.total,
      "speedup": count.speedup_over(baseline),
      "parameters_stored": counting.stored_parameters(model),
      "baseline_parameters_stored": counting.stored_parameters(baseline_model),
      "bytes_stored": {p: counting.stored_bytes(model, input_shape, p) for p in counting.VALUE_BYTES},
      "baseline_bytes_stored": {p: counting.stored_bytes(baseline_model, input_shape, p)
                                for p in counting.VALUE_BYTES},
  }


def inspect_run(workdir: str | None = None, step: int | None = None, config=None) -> dict:
  """:func:`inspect_model` of a run's checkpoint, or of an untrained ``config`` when ``workdir`` is None.

  With both, the checkpoint is loaded into ``config``'s model, and a checkpoint of another model raises
  :class:`~lcnn_jax.checkpoint.CheckpointError` naming the parameters that differ. Needs neither the training
  data nor an accelerator, and restores whatever topology wrote the checkpoint onto this host's first device.
  """
  if workdir is None:
    if config is None:
      raise ValueError("Nothing to inspect: pass --workdir of a training run or --config of a model.")
    num_classes, input_shape = input_facts(config)
    model = models.create_model(config.model, num_classes=num_classes, input_shape=input_shape,
                                rngs=nnx.Rngs(config.seed))
    return inspect_model(model, config.model, num_classes, input_shape)
  step_dir = _step_dir(workdir, step)
  saved_config, dataset = checkpoint.load_run_info(workdir)
  config = config if config is not None else saved_config
  num_classes, input_shape = dataset["num_classes"], tuple(dataset["image_shape"])
  model = models.create_model(config.model, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0))
  try:
    checkpoint.restore_into(model, step_dir)
  except checkpoint.CheckpointError:
    raise  # another model: its message already names the mismatch
  except Exception as e:  # orbax's own errors on a half-written or damaged step
    raise checkpoint.CheckpointError(
        f"Checkpoint step {step_dir} could not be read ({type(e).__name__}: {e}): it is incomplete or damaged; "
        "pass --step with another step.") from e
  return inspect_model(model, config.model, num_classes, input_shape, step=int(os.path.basename(step_dir)))


def _step_dir(workdir: str, step: int | None) -> str:
  """checkpoint.resolve_step_dir with the user's likely mistakes named: no workdir, an empty one, a partial step."""
  if not os.path.isdir(workdir):
    raise checkpoint.CheckpointError(f"Workdir {workdir!r} does not exist: pass the --workdir of a training run.")
  if not os.listdir(workdir):
    raise checkpoint.CheckpointError(f"Workdir {workdir!r} is empty: train first (python -m lcnn_jax.main "
                                     "--config ... --workdir ...), or pass --config alone to count an untrained model.")
  if step is not None:
    partial = os.path.join(checkpoint.checkpoint_dir(workdir), str(step))
    if os.path.isdir(partial) and not os.path.isdir(os.path.join(partial, "params")):
      raise checkpoint.CheckpointError(f"Checkpoint step {step} at {partial!r} is incomplete: it has no params/ "
                                       f"(it holds {sorted(os.listdir(partial))}); pass --step with another step.")
  return checkpoint.resolve_step_dir(workdir, step)


def format_inspection(report: dict) -> str:
  """The inspection as a fixed-width table: per layer, then totals, baseline, speedup and parameters stored."""
  shape = lambda s: "x".join(map(str, s))
  header = (f"{'layer':<26} {'kind':<12} {'input':<12} {'output':<12} {'dict':>5} {'density':>8} "
            f"{'mults':>15} {'share':>6} {'CNN mults':>15}")
  lines = [f"{report['model']}" + (f" at step {report['step']}" if report["step"] is not None else " (untrained)")
           + f" on {shape(report['input_shape'])} inputs, {report['num_classes']} classes", header, "-" * len(header)]
  for row in report["layers"]:
    dictionary = row["dictionary_size"] if row["dictionary_size"] is not None else "-"
    cnn = f"{row['baseline_multiplications']:,}" if row["baseline_multiplications"] is not None else "-"
    lines.append(f"{row['path']:<26} {row['kind']:<12} {shape(row['input_shape']):<12} "
                 f"{shape(row['output_shape']):<12} {dictionary:>5} {row['density']:>8.4f} "
                 f"{row['multiplications']:>15,} {100 * row['share']:>5.1f}% {cnn:>15}")
  lines += ["-" * len(header),
            f"{'total':<26} {'':<12} {'':<12} {'':<12} {'':>5} {'':>8} {report['total_multiplications']:>15,} "
            f"{'':>6} {report['baseline_multiplications']:>15,}",
            f"baseline ({report['baseline']}): {report['baseline_multiplications']:,} multiplications",
            f"speedup: {report['speedup']:.2f}x",
            f"parameters stored: {report['parameters_stored']:,} (baseline {report['baseline_parameters_stored']:,})",
            "bytes stored: " + ", ".join(f"{report['bytes_stored'][p] / 1e6:.3f} MB {p} (baseline "
                                         f"{report['baseline_bytes_stored'][p] / 1e6:.3f})"
                                         for p in counting.VALUE_BYTES)]
  return "\n".join(lines)


def plot_inspection(report: dict, filename: str) -> None:
  """Writes a PNG: per-layer multiplications of the CNN baseline and the LCNN (log scale), and density of P."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  rows = report["layers"]
  names = [row["path"] for row in rows]
  x = np.arange(len(rows))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(rows) + 2), 7), sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
  cnn = [row["baseline_multiplications"] or 0 for row in rows]
  lcnn = [row["multiplications"] for row in rows]
  top.bar(x - 0.2, cnn, 0.4, label=f"CNN ({report['baseline']}): {report['baseline_multiplications']:,}",
          color="tab:gray")
  top.bar(x + 0.2, lcnn, 0.4, label=f"LCNN ({report['model']}): {report['total_multiplications']:,}",
          color="tab:blue")
  top.set_yscale("log")
  top.set_ylim(top=30 * max(cnn + lcnn + [1]))  # headroom above the bars for the legend
  top.set_ylabel("multiplications per image")
  step = f"step {report['step']}" if report["step"] is not None else "untrained"
  top.set_title(f"{report['model']} ({step}): {report['speedup']:.2f}x fewer multiplications than "
                f"{report['baseline']}")
  top.legend(loc="best", fontsize="small")
  densities = [row["density"] if row["dictionary_size"] is not None else np.nan for row in rows]
  bottom.bar(x, densities, 0.6, color="tab:orange")
  for i, d in enumerate(densities):
    bottom.text(i, 0.02, "dense" if np.isnan(d) else f"{d:.3f}", ha="center", va="bottom", fontsize="x-small",
                rotation=90)
  bottom.set_ylim(0, 1.05)
  bottom.set_ylabel("density of P")
  bottom.set_xticks(x, names, rotation=45, ha="right", fontsize="small")
  fig.tight_layout()
  fig.savefig(filename, dpi=120)
  plt.close(fig)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values`` (absl's global flags by default); importing this module defines none,
  so it never clashes with another command's."""
  config_flags.DEFINE_config_file("config", None, "A config file (configs/X.py): with --workdir, the model to "
                                  "load the checkpoint into; alone, an untrained model to count.",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "The --workdir of a training run.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "The checkpoint step; the latest when unset.", flag_values=flag_values)
  flags.DEFINE_boolean("json", False, "Print the inspection as one JSON object.", flag_values=flag_values)
  flags.DEFINE_string("plot", None, "Write a PNG of per-layer CNN vs LCNN multiplications and densities.",
                      flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The ``python -m lcnn_jax.flops`` command, on its parsed flags (``flag_values``, absl's global flags by
  default); raises :class:`~lcnn_jax.cli.UsageError` for a user mistake."""
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {list(argv[1:])}; see --help for the flags.")
  if flag_values.step is not None and flag_values.workdir is None:
    raise cli.UsageError(f"--step={flag_values.step} needs --workdir: an untrained --config has no steps.")
  if flag_values.plot:
    cli.check_output_file(flag_values.plot, "--plot")
  try:
    config = flag_values.config
    if config is not None:
      config_lib.validate(config)
    report = inspect_run(flag_values.workdir, flag_values.step, config)
    if flag_values.plot:
      plot_inspection(report, flag_values.plot)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    raise cli.UsageError(str(e)) from None
  sys.stdout.write((json.dumps(report) if flag_values.json else format_inspection(report)) + "\n")


if __name__ == "__main__":  # the same command as python -m lcnn_jax.flops
  define_flags()
  cli.run(main)
