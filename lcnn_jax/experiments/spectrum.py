"""The paper's Figure 3 for any dataset: top-1 accuracy against speedup as dictionary size and sparsity vary.

    python -m lcnn_jax.experiments.spectrum --workdir runs/spectrum \\
        [--config configs/experiments/spectrum.py] [--sizes 2,4,8,16] [--strengths 3,30]

Every (dictionary size, sparsity strength) pair is one LCNN run, plus the CNN baseline, each in
``WORKDIR/<point>/`` (resumable; a rerun skips finished points). The speedup is the multiplication count's
(REFERENCE §6, from the final checkpoint) and, with ``--wall_clock``, the measured one: the inference
benchmark (:mod:`lcnn_jax.bench`) times the exported LCNN (backends chosen per layer) against its dense CNN at
``--bench_batch``. Writes ``spectrum.json``, ``spectrum.md`` and ``spectrum.png`` in the workdir.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lcnn_jax import models
from lcnn_jax.experiments import common

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "experiments", "spectrum.py")
COLUMNS = ("point", "dictionary_size", "strength", "top1", "top5", "density", "speedup", "wall_speedup",
           "multiplications")


def point_name(size: int | None, strength: float | None) -> str:
  """'cnn' for the baseline, else 'k8_s10' (strength with '.' as 'p': 'k8_s0p3')."""
  if size is None:
    return "cnn"
  return f"k{size}_s{strength:g}".replace(".", "p")


def point_config(config: ml_collections.ConfigDict, size: int | None, strength: float | None,
                 size_keys: Sequence[str]) -> ml_collections.ConfigDict:
  """The CNN baseline's config (``size`` None) or the LCNN's with every ``size_keys`` model key set to ``size``."""
  if size is None:
    return common.derive(config, **{"model.name": models.baseline_config(config.model).name,
                                     "sparsity.strength": 0.0})
  overrides = {f"model.{key}": size for key in size_keys}
  if "pool_size" in size_keys:
    overrides["model.pool_sizes"] = None  # pool_size applies to every layer after the first
  return common.derive(config, **overrides, **{"sparsity.strength": strength})


def measure_wall_clock(workdir: str, batch: int, seconds: float) -> dict[str, Any]:
  """The inference benchmark on the point's checkpoint, cached in ``WORKDIR/wall_clock_b<batch>.json``."""
  path = os.path.join(workdir, f"wall_clock_b{batch}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from lcnn_jax import bench  # the inference stack is only needed here
  result = bench.run(os.path.basename(workdir), "checkpoint", batch, checkpoint=workdir, seconds=seconds)
  auto = next(row for row in result["rows"] if row["backend"] == "auto")
  measured = {"wall_speedup": auto["wall_speedup"], "dense_ms": auto["dense_ms"], "lcnn_ms": auto["lcnn_ms"],
              "batch": batch, "device": result["device"], "backends": result["auto_backends"],
              "per_backend": {row["backend"]: row["wall_speedup"] for row in result["rows"]}}
  with open(path, "w") as f:
    json.dump(measured, f, indent=2)
  return measured


def run_spectrum(config: ml_collections.ConfigDict, workdir: str, *, sizes: Sequence[int],
                 strengths: Sequence[float], size_keys: Sequence[str] = ("pool_size",), baseline: bool = True,
                 wall_clock: bool = False, bench_batch: int = 1, bench_seconds: float = 3.0) -> list[dict[str, Any]]:
  """Trains (or reads back) every point and returns the table's rows, the CNN first."""
  points = ([(None, None)] if baseline else []) + [(k, s) for k in sizes for s in strengths]
  rows = []
  for size, strength in points:
    name = point_name(size, strength)
    point_dir = os.path.join(workdir, name)
    logging.info("Spectrum point %s (%d of %d).", name, len(rows) + 1, len(points))
    result = common.run_point(point_config(config, size, strength, size_keys), point_dir)
    row = {"point": name, "dictionary_size": size if size is not None else "-",
           "strength": strength if strength is not None else "-", "top1": result["top1"], "top5": result["top5"],
           "speedup": result["speedup"], "multiplications": result["multiplications"],
           "density": result["density"] if result["density"] is not None else "-"}
    if wall_clock:
      row["wall_speedup"] = 1.0 if size is None else measure_wall_clock(point_dir, bench_batch,
                                                                        bench_seconds)["wall_speedup"]
    rows.append(row)
  return rows


def plot_spectrum(rows: Sequence[dict[str, Any]], filename: str, title: str, bench_batch: int = 1) -> None:
  """Top-1 against multiplication speedup (and measured speedup when present), one line per strength."""
  plt = common.pyplot()
  panels = [("speedup", "speedup in multiplications (×)")]
  if any("wall_speedup" in row for row in rows):
    panels.append(("wall_speedup", f"measured wall-clock speedup at batch {bench_batch} (×)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  lcnn = [row for row in rows if row["point"] != "cnn"]
  for ax, (key, label) in zip(axes[0], panels):
    for strength in sorted({row["strength"] for row in lcnn}):
      line = sorted((row for row in lcnn if row["strength"] == strength), key=lambda row: row["dictionary_size"])
      ax.plot([row[key] for row in line], [100 * row["top1"] for row in line], "o-",
              label=f"LCNN, strength {strength:g}")
      for row in line:
        ax.annotate(f"k={row['dictionary_size']}", (row[key], 100 * row["top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    for row in rows:
      if row["point"] == "cnn":
        ax.plot([row[key]] if key in row else [1.0], [100 * row["top1"]], "k*", markersize=12, label="CNN")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
  common.save_figure(fig, list(axes[0]), filename, suptitle=title)


def define_flags() -> types.SimpleNamespace:
  """The command's flags (defined only when it runs, so the experiment modules import side by side)."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run config every point starts from."),
      workdir=flags.DEFINE_string("workdir", None, "The experiment's directory (one subdirectory per point).",
                                  required=True),
      sizes=flags.DEFINE_list("sizes", ["2", "4", "8", "16"], "Dictionary sizes."),
      strengths=flags.DEFINE_list("strengths", ["3", "30"], "Sparsity strengths (the original's lambda)."),
      size_keys=flags.DEFINE_list("size_keys", ["pool_size"],
                                  "config.model keys set to each size (ResNet-LCNN: pool1,pool2,pool3,pool4)."),
      baseline=flags.DEFINE_bool("baseline", True, "Also train the CNN baseline."),
      wall_clock=flags.DEFINE_bool("wall_clock", True,
                                   "Measure the wall-clock speedup with the inference benchmark."),
      bench_batch=flags.DEFINE_integer("bench_batch", 1, "Batch size of the wall-clock measurement."),
      bench_seconds=flags.DEFINE_float("bench_seconds", 3.0, "Seconds of timing per point."))


def main(argv: Sequence[str], flag: types.SimpleNamespace) -> None:
  del argv
  workdir = flag.workdir.value
  os.makedirs(workdir, exist_ok=True)
  rows = run_spectrum(flag.config.value, workdir, sizes=[int(k) for k in flag.sizes.value],
                      strengths=[float(s) for s in flag.strengths.value], size_keys=flag.size_keys.value,
                      baseline=flag.baseline.value, wall_clock=flag.wall_clock.value, bench_batch=flag.bench_batch.value,
                      bench_seconds=flag.bench_seconds.value)
  table = common.write_report(workdir, "spectrum", rows, COLUMNS, {"config": flag.config.value.to_dict()})
  plot_spectrum(rows, os.path.join(workdir, "spectrum.png"),
                f"{flag.config.value.model.name} on {flag.config.value.data.name}: accuracy vs speedup",
                flag.bench_batch.value)
  print(table)  # the command's output


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
