"""Counting multiplications per layer, as the original's ``-benchmark`` mode does (REFERENCE §6).

    python -m lcnn_jax.flops (--workdir RUN [--step N] | --config configs/X.py) [--json] [--plot FILE.png]

One image, eval mode. Only multiplications count; BatchNorm, ReLU, pooling, dropout and additions are free.

* convolution: (elements of the output) × (m_in · kh · kw) (per group)
* linear: (elements of the output) × m_in
* lookup convolution: (elements of S over the *padded* input, k · H_p · W_p) × m_in
  + (elements of the output) × (k · kh · kw) × density(P) = … + H_out · W_out × nnz(P)
* lookup dense: k · m_in + n_out · k · density(P) = k · m_in + nnz(P)

So a lookup layer costs a fixed part (its dictionary stage) plus ``cost_per_nonzero`` (the output positions
each non-zero of P is used at) times nnz(P); :mod:`lcnn_jax.operating_point` steers training by this sum.

The counter works on any NNX model: it runs the model once on an abstract input of one example
(``jax.eval_shape``, nothing is computed) and records the shapes each ``nnx.Conv``, ``nnx.Linear``,
:class:`~lcnn_jax.layers.LookupConv` and :class:`~lcnn_jax.layers.LookupDense` sees, so a CNN and its LCNN
are counted by the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcnn_jax import layers
from lcnn_jax import lookups as lookups_lib


@dataclasses.dataclass(frozen=True)
class LayerCount:
  """The multiplications of one layer for one image."""
  path: str
  kind: str  # conv | linear | lookup_conv | lookup_dense
  input_shape: tuple[int, ...]  # one example, without the batch axis
  output_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]  # (kh, kw, in, out) / (in, out); P's shape for lookup layers
  dictionary_size: int | None  # None for dense layers
  density: float  # nnz(P) / size(P); 1.0 for dense layers
  multiplications: int
  dictionary_multiplications: int  # the lookup layer's dictionary stage; 0 for dense layers
  cost_per_nonzero: int = 0  # lookup layers: multiplications per non-zero of P (output positions); 0 for dense


@dataclasses.dataclass(frozen=True)
class MultiplicationCount:
  """Per-layer counts in forward order and their total."""
  rows: tuple[LayerCount, ...]

  @property
  def total(self) -> int:
    return sum(row.multiplications for row in self.rows)

  def speedup_over(self, baseline: "MultiplicationCount") -> float:
    """count(baseline) / count(self), the paper's speedup."""
    return baseline.total / self.total if self.total else math.inf

  def table(self) -> str:
    """A fixed-width table of the rows, with each layer's share of the total and the total."""
    header = f"{'layer':<28} {'kind':<12} {'output':<16} {'dict':>5} {'density':>8} {'mults':>15} {'share':>6}"
    lines = [header, "-" * len(header)]
    total = self.total or 1
    for row in self.rows:
      lines.append(
          f"{row.path or '(model)':<28} {row.kind:<12} {'x'.join(map(str, row.output_shape)):<16} "
          f"{row.dictionary_size if row.dictionary_size is not None else '-':>5} {row.density:>8.4f} "
          f"{row.multiplications:>15,} {100 * row.multiplications / total:>5.1f}%")
    lines.append("-" * len(header))
    lines.append(f"{'total':<28} {'':<12} {'':<16} {'':>5} {'':>8} {self.total:>15,}")
    return "\n".join(lines)


def density(coefficients: jax.Array | np.ndarray) -> float:
  """nnz(P) / size(P) of already thresholded coefficients."""
  p = np.asarray(coefficients)
  return float(np.count_nonzero(p)) / p.size if p.size else 0.0


def _count_layer(path: str, module: nnx.Module, x_shape: Sequence[int], y_shape: Sequence[int]) -> LayerCount:
  out_elements = math.prod(y_shape[1:])
  in_shape, out_shape = tuple(x_shape[1:]), tuple(y_shape[1:])
  if isinstance(module, (layers.LookupConv, layers.LookupDense)):
    p = np.asarray(module.thresholded_coefficients())
    spatial = tuple(x_shape[1:-1])  # () for flat features
    padding = module.padding if isinstance(module, layers.LookupConv) else (0,) * len(spatial)
    cost = lookups_lib.multiplications(nonzeros=int(np.count_nonzero(p)), dictionary_size=module.dictionary_size,
                                       in_features=module.in_features,
                                       padded_size=[s + 2 * q for s, q in zip(spatial, padding)],
                                       output_size=y_shape[1:-1])
    kind = "lookup_conv" if isinstance(module, layers.LookupConv) else "lookup_dense"
    return LayerCount(path, kind, in_shape, out_shape, tuple(module.coefficients.shape), module.dictionary_size,
                      density(p), cost.total, cost.dictionary, cost.per_nonzero)
  kernel_shape = tuple(module.kernel.shape)
  if isinstance(module, nnx.Conv):
    # kernel (kh, kw, in / groups, out): each output element costs in/groups · kh · kw.
    per_output = math.prod(kernel_shape[:-1])
    return LayerCount(path, "conv", in_shape, out_shape, kernel_shape, None, 1.0, out_elements * per_output, 0)
  return LayerCount(path, "linear", in_shape, out_shape, kernel_shape, None, 1.0,
                    out_elements * kernel_shape[0], 0)


_COUNTED = (layers.LookupConv, layers.LookupDense, nnx.Conv, nnx.Linear)


def _recording(paths: dict[int, str], records: list):
  """Wraps the counted classes' ``__call__`` so each call appends (path, module, input, output shapes)."""

  def make_wrapper(original):
    def wrapper(module, x, *args, **kwargs):
      y = original(module, x, *args, **kwargs)
      if id(module) in paths:
        records.append((paths[id(module)], module, tuple(x.shape), tuple(y.shape)))
      return y
    return wrapper

  return layers.replaced_calls(_COUNTED, make_wrapper)


def module_paths(model: nnx.Module) -> dict[int, str]:
  """id(module) -> 'a/b/0' path of each counted layer in the model."""
  return {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(model)
          if isinstance(m, _COUNTED)}


def count_multiplications(model: nnx.Module, input_shape: Sequence[int]) -> MultiplicationCount:
  """Counts the multiplications of one forward pass of one example of shape ``input_shape``.

  Args:
    model: any NNX model whose convolutions and dense layers are ``nnx.Conv``/``nnx.Linear`` or lookup layers.
      It is evaluated in eval mode (a view; the model itself is not changed).
    input_shape: one example's shape without the batch axis, e.g. (224, 224, 3).
  Returns:
    A :class:`MultiplicationCount` with one row per layer call, in the order the forward pass calls them.
  """
  eval_model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
  paths = module_paths(eval_model)
  records: list = []
  spec = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with _recording(paths, records):
    jax.eval_shape(lambda x: eval_model(x), spec)
  # Densities need P's values, which are concrete on the modules themselves.
  return MultiplicationCount(tuple(_count_layer(path, m, xs, ys) for path, m, xs, ys in records))


def stored_parameters(model: nnx.Module) -> int:
  """Parameters a deployed model stores: dictionaries, non-zeros of P, biases, and every dense layer whole.

  The original's memory column; BatchNorm statistics are left out (they fold into the layers before them).
  """
  total = 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable[...])
    if isinstance(variable, layers.Coefficients):
      threshold = _owner(model, path).threshold
      total += int(np.count_nonzero(np.abs(value) > threshold))
    else:
      total += value.size
  return total


VALUE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
"""Bytes per stored weight at each precision of ``python -m lcnn_jax.inference.exporter --precision``."""


def stored_bytes(model: nnx.Module, precision: str = "float32") -> int:
  """Bytes a deployed model stores with its weights (dictionaries, non-zeros of P, dense kernels) in
  ``precision``: each non-zero of P with its index (uint8/uint16/int32, the narrowest for kh·kw·k positions) and
  each output's start (int32); int8 weights with a float32 scale per output channel; 1-D parameters in float32."""
  size = VALUE_BYTES[precision]
  total = 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable[...])
    scales = 4 * value.shape[-1] if precision == "int8" else 0
    if isinstance(variable, layers.Coefficients):
      nnz = int(np.count_nonzero(np.abs(value) > _owner(model, path).threshold))
      positions = value.size // value.shape[-1]
      index = 1 if positions <= 1 << 8 else 2 if positions <= 1 << 16 else 4
      total += nnz * (size + index) + 4 * (value.shape[-1] + 1) + scales
    elif value.ndim >= 2:
      total += value.size * size + scales
    else:
      total += 4 * value.size
  return total


def _owner(model: nnx.Module, path) -> nnx.Module:
  module = model
  for part in path[:-1]:
    module = module[part] if isinstance(part, int) else getattr(module, part)
  return module


def baseline_count(model_config, num_classes: int, input_shape: Sequence[int]) -> MultiplicationCount:
  """Multiplications of the dense CNN the paper compares ``model_config`` with (AlexNet-LCNN vs ``alexnet``...)."""
  from lcnn_jax import models
  baseline = models.create_model(models.baseline_config(model_config), num_classes=num_classes,
                                 input_shape=tuple(input_shape), rngs=nnx.Rngs(0))
  return count_multiplications(baseline, input_shape)


def checkpoint_report(path: str, step: int | None = None) -> str:
  """The per-layer table of a run's checkpoint, its CNN baseline's total, the speedup and parameters stored."""
  from lcnn_jax import checkpoint
  model, config, restored_step = checkpoint.restore_model(path, step)
  _, dataset = checkpoint.load_run_info(path)
  input_shape = tuple(dataset["image_shape"])
  count = count_multiplications(model, input_shape)
  baseline = baseline_count(config.model, dataset["num_classes"], input_shape)
  return "\n".join([
      f"{config.model.name} at step {restored_step} on {'x'.join(map(str, input_shape))} inputs",
      count.table(),
      f"baseline ({baseline.rows and _baseline_name(config.model)}): {baseline.total:,} multiplications",
      f"speedup: {count.speedup_over(baseline):.2f}x    parameters stored: {stored_parameters(model):,}"])


def _baseline_name(model_config) -> str:
  from lcnn_jax import models
  return models.baseline_config(model_config).name


# ------------------------------------------------------------------------------------------------ inspection
#
# python -m lcnn_jax.flops --workdir DIR [--step N] [--json] [--plot FILE.png]
# python -m lcnn_jax.flops --config configs/X.py                (an untrained model, no data needed)


def input_facts(config) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, one image's (h, w, c)) that ``config.data`` implies, read from the config alone, no data.

  digits: 10 classes of 8×8×1 (``image_size`` upsamples); idx, fashion_mnist: ``data.num_classes`` or 10 classes
  of 28×28×1; folder, tfds and synthetic: ``data.num_classes`` or 1000 classes of ``image_size`` (or 224) square
  RGB images.
  """
  data = config.data
  if data.name == "digits":
    size = data.image_size or 8
    return 10, (size, size, 1)
  if data.name in ("idx", "fashion_mnist"):
    size = data.image_size or 28
    return data.num_classes or 10, (size, size, 1)
  if data.name in ("folder", "synthetic") or data.name.startswith("tfds:"):
    size = data.image_size or 224
    return data.num_classes or 1000, (size, size, 3)
  raise ValueError(f"data.name={data.name!r}: expected digits, idx, fashion_mnist, folder, tfds:<name> or synthetic.")


def inspect_model(model: nnx.Module, model_config, num_classes: int, input_shape: Sequence[int],
                  step: int | None = None) -> dict:
  """The inspection of ``model`` as a JSON-ready dict: its per-layer counts beside its CNN baseline's.

  Keys: model, baseline, step, input_shape, layers (path, kind, input/output/kernel shape, dictionary_size,
  density, multiplications, dictionary_multiplications, share of the total, baseline_multiplications of the
  baseline's layer of the same path or None), total_multiplications, baseline_multiplications, speedup,
  parameters_stored (dictionaries + non-zeros of P + biases + dense layers) and baseline_parameters_stored,
  bytes_stored and baseline_bytes_stored (per precision, :func:`stored_bytes`).
  """
  from lcnn_jax import models
  input_shape = tuple(int(n) for n in input_shape)
  count = count_multiplications(model, input_shape)
  baseline_config = models.baseline_config(model_config)
  baseline_model = models.create_model(baseline_config, num_classes=num_classes, input_shape=input_shape,
                                       rngs=nnx.Rngs(0))
  baseline = count_multiplications(baseline_model, input_shape)
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
      "model": model_config.name, "baseline": baseline_config.name, "step": step,
      "input_shape": list(input_shape), "num_classes": num_classes, "layers": rows,
      "total_multiplications": total, "baseline_multiplications": baseline.total,
      "speedup": count.speedup_over(baseline),
      "parameters_stored": stored_parameters(model), "baseline_parameters_stored": stored_parameters(baseline_model),
      "bytes_stored": {p: stored_bytes(model, p) for p in VALUE_BYTES},
      "baseline_bytes_stored": {p: stored_bytes(baseline_model, p) for p in VALUE_BYTES},
  }


def inspect_run(workdir: str | None = None, step: int | None = None, config=None) -> dict:
  """:func:`inspect_model` of a run's checkpoint, or of an untrained ``config`` when ``workdir`` is None.

  With both, the checkpoint is loaded into ``config``'s model, and a checkpoint of another model raises
  :class:`~lcnn_jax.checkpoint.CheckpointError` naming the parameters that differ. Needs neither the training
  data nor an accelerator, and restores whatever topology wrote the checkpoint onto this host's first device.
  """
  from lcnn_jax import checkpoint, models
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
  from lcnn_jax import checkpoint
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
                                         f"{report['baseline_bytes_stored'][p] / 1e6:.3f})" for p in VALUE_BYTES)]
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


def define_flags(flag_values=None) -> None:
  """The command's flags, on ``flag_values`` (absl's global flags by default); importing this module defines none,
  so it never clashes with another command's."""
  from absl import flags
  from ml_collections import config_flags
  flag_values = flags.FLAGS if flag_values is None else flag_values
  config_flags.DEFINE_config_file("config", None, "A config file (configs/X.py): with --workdir, the model to "
                                  "load the checkpoint into; alone, an untrained model to count.",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "The --workdir of a training run.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "The checkpoint step; the latest when unset.", flag_values=flag_values)
  flags.DEFINE_boolean("json", False, "Print the inspection as one JSON object.", flag_values=flag_values)
  flags.DEFINE_string("plot", None, "Write a PNG of per-layer CNN vs LCNN multiplications and densities.",
                      flag_values=flag_values)


def main(argv: Sequence[str], flag_values=None) -> None:
  """The ``python -m lcnn_jax.flops`` command, on its parsed flags (``flag_values``, absl's global flags by
  default); raises :class:`~lcnn_jax.cli.UsageError` for a user mistake."""
  from absl import flags
  from lcnn_jax import checkpoint, cli, config as config_lib
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {list(argv[1:])}; see --help for the flags.")
  if flag_values.step is not None and flag_values.workdir is None:
    raise cli.UsageError(f"--step={flag_values.step} needs --workdir: an untrained --config has no steps.")
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


if __name__ == "__main__":
  from lcnn_jax import cli
  define_flags()
  cli.run(main)
