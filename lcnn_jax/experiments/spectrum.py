"""The paper's Figure 3 for any dataset: top-1 accuracy against speedup as dictionary size and sparsity vary.

    python -m lcnn_jax.experiments.spectrum --workdir runs/spectrum \\
        [--config configs/experiments/spectrum.py] [--sizes 2,4,8,16] [--strengths 3,30 | --targets 2,5,10,20,40]
        [--points 16:2.5,8:10,4:40] [--seeds 0,1,2]

Every (dictionary size, sparsity strength) pair is one LCNN run, plus the CNN baseline, each in ``WORKDIR/<point>/``
(resumable; a rerun skips finished points). With ``--targets`` the grid is (dictionary size, target speedup)
instead: each point trains with ``sparsity.target_speedup`` (:mod:`lcnn_jax.operating_point`), so the points land on
the figure's x-axis where asked; a target a dictionary size cannot reach (above what its dictionary stages and dense
layers alone cost, or below its count with every P dense, e.g. 2× for the digits LCNN at k = 8) is skipped with a
warning naming its reachable range. The speedup is the multiplication count's (REFERENCE §6, from the final
checkpoint) and, with ``--wall_clock``, the measured one: the inference benchmark (:mod:`lcnn_jax.bench`) times the
exported LCNN (backends chosen per layer) against its dense CNN at ``--bench_batch``. ``--points`` names the
(dictionary size, target speedup) pairs themselves, for a spectrum that spans sizes (a large dictionary for ~2×,
small ones for the largest speedups). With ``--seeds`` every point trains once per seed in ``WORKDIR/seed<S>/`` and
the table, JSON and plot give mean ± std (sample standard deviation) over the seeds; the JSON keeps each seed's rows
under ``per_seed``.

With ``--pruning`` (the default) each LCNN point is followed by ``prune_<point>``: the CNN trained for the same
steps with gradual magnitude pruning of its convolution and dense kernels to the multiplications that LCNN point
counts, by the same counter (:mod:`lcnn_jax.counting`, which does not count a pruned weight; the schedule is
:mod:`lcnn_jax.experiments.pruning`'s). A second table sets the two against each other per point: top-1 of each
at its counted speedup and the per-seed difference LCNN − pruning. The report's first line states the scale
(full or reduced, training images, steps, seeds). Writes ``spectrum.json``, ``spectrum.md`` and ``spectrum.png``
in the workdir.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags

from lcnn_jax import bench, cli, config as config_lib, inspection, logger, models, operating_point
from lcnn_jax.experiments import common, pruning as pruning_lib

DEFAULT_CONFIG = os.path.join(config_lib.preset_dir(), "experiments", "spectrum.py")

def point_name(size: int | None, strength: float | None, target: float | None = None) -> str:
  """'cnn' for the baseline, else 'k8_s10' or, for a target speedup, 'k8_t10' ('.' as 'p': 'k8_s0p3')."""
  if size is None:
    return "cnn"
  return (f"k{size}_t{target:g}" if target is not None else f"k{size}_s{strength:g}").replace(".", "p")


def check_size_keys(config: ml_collections.ConfigDict, size_keys: Sequence[str]) -> None:
  """Raises ValueError naming a ``size_keys`` entry that is not a key of ``config.model.dictionary``."""
  for key in size_keys:
    if key not in config.model.dictionary:
      raise ValueError(f"--size_keys {key}: {config_lib.unknown_key(f'model.dictionary.{key}', config.model.name)}"
                       f"; --size_keys takes keys of model.dictionary ({', '.join(config.model.dictionary)}).")


def point_config(config: ml_collections.ConfigDict, size: int | None, strength: float | None,
                 size_keys: Sequence[str], target: float | None = None) -> ml_collections.ConfigDict:
  """The CNN baseline's config (``size`` None) or the LCNN's with every ``size_keys`` key of ``model.dictionary`` set
  to ``size``
  and either ``sparsity.strength`` = ``strength`` or ``sparsity.target_speedup`` = ``target``."""
  if size is None:
    return common.derive(config, **{"model.name": models.baseline_config(config.model).name,
                                     "sparsity.strength": 0.0, "sparsity.target_speedup": 0.0,
                                     "sparsity.target_density": 0.0})
  check_size_keys(config, size_keys)
  overrides = {f"model.dictionary.{key}": size for key in size_keys}
  if target is not None:
    overrides["sparsity.target_speedup"] = target
  else:
    overrides["sparsity.strength"] = strength
  return common.derive(config, **overrides)


def unreachable(config: ml_collections.ConfigDict) -> str | None:
  """Why the untrained model of ``config`` cannot reach its ``sparsity.target_speedup`` (None when it can)."""
  num_classes, input_shape = inspection.input_facts(config)
  model = models.create_model(config.model, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0))
  try:
    operating_point.target_from_config(config.sparsity, operating_point.budget_for(model, config.model,
                                                                                   input_shape))
  except ValueError as e:
    return str(e)
  return None


def measure_wall_clock(workdir: str, batch: int, seconds: float) -> dict[str, Any]:
  """The inference benchmark on the point's checkpoint, cached in ``WORKDIR/wall_clock_b<batch>.json``."""
  path = os.path.join(workdir, f"wall_clock_b{batch}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = bench.run(os.path.basename(workdir), "checkpoint", batch, checkpoint=workdir, seconds=seconds)
  auto = next(row for row in result["rows"] if row["backend"] == "auto")
  measured = {"wall_speedup": auto["wall_speedup"], "dense_ms": auto["dense_ms"], "lcnn_ms": auto["lcnn_ms"],
              "batch": batch, "device": result["device"], "backends": result["auto_backends"],
              "per_backend": {row["backend"]: row["wall_speedup"] for row in result["rows"]}}
  with open(path, "w") as f:
    json.dump(measured, f, indent=2)
  return measured


def parse_points(values: Sequence[str]) -> list[tuple[int, float]]:
  """``--points 16:2.5,8:10`` as (dictionary size, target speedup) pairs; ValueError names a malformed one."""
  points = []
  for value in values:
    try:
      size, target = value.split(":")
      points.append((int(size), float(target)))
    except ValueError:
      raise ValueError(f"--points entry {value!r}: expected SIZE:TARGET, e.g. --points 16:2.5,8:10,4:40.") from None
  return points


def run_spectrum(config: ml_collections.ConfigDict, workdir: str, *, sizes: Sequence[int],
                 strengths: Sequence[float] = (), targets: Sequence[float] = (),
                 points: Sequence[tuple[int, float]] = (),
                 size_keys: Sequence[str] = ("convs",), baseline: bool = True, pruning: bool = True,
                 wall_clock: bool = False, bench_batch: int = 1,
                 bench_seconds: float = 3.0) -> list[dict[str, Any]]:
  """Trains (or reads back) every point and returns the table's rows, the CNN first.

  The LCNN points are the (dictionary size, target speedup) pairs ``points`` when given, else ``sizes`` ×
  ``targets`` (target speedups) when ``targets`` is given, else ``sizes`` × ``strengths``; unreachable targets
  are skipped with a warning. With ``pruning``, each LCNN point is followed by ``prune_<point>``: the CNN pruned
  to the multiplications that LCNN counts (:mod:`lcnn_jax.experiments.pruning`), for the same steps. Each row's
  ``arm`` is 'cnn', 'lcnn' or 'pruning'.
  """
  check_size_keys(config, size_keys)  # before any point trains
  grid = ([(k, None, t) for k, t in points] if points
          else [(k, None, t) for k in sizes for t in targets] if targets
          else [(k, s, None) for k in sizes for s in strengths])
  points = ([(None, None, None)] if baseline else []) + grid
  rows = []
  for index, (size, strength, target) in enumerate(points):
    name = point_name(size, strength, target)
    point_dir = os.path.join(workdir, name)
    logging.info("Spectrum point %s (%d of %d).", name, index + 1, len(points))
    run_config = point_config(config, size, strength, size_keys, target)
    if target is not None and not os.path.isdir(point_dir) and (why := unreachable(run_config)):
      logging.warning("Spectrum point %s skipped: %s", name, why)
      continue
    try:
      result = common.run_point(run_config, point_dir)
    except common.NotFinished:
      logging.warning("Spectrum point %s is not finished; left out.", point_dir)
      continue
    if target is not None:  # the steered strength the run ended with
      strength = [row for row in logger.read_metrics(point_dir) if row["split"] == "train"][-1]["strength"]
    row = {"arm": "cnn" if size is None else "lcnn", "point": name,
           "dictionary_size": size if size is not None else "-", "strength": strength if strength is not None else "-",
           "target": target if target is not None else "-", "top1": result["top1"], "top5": result["top5"],
           "speedup": result["speedup"], "multiplications": result["multiplications"],
           "density": result["density"] if result["density"] is not None else "-"}
    if wall_clock:
      row["wall_speedup"] = 1.0 if size is None else measure_wall_clock(point_dir, bench_batch,
                                                                        bench_seconds)["wall_speedup"]
    rows.append(row)
    if pruning and size is not None:
      pruned = run_pruned(config, workdir, name, result["multiplications"])
      if pruned is not None:
        rows.append({**pruned, "target": row["target"]})
  return rows


def run_pruned(config: ml_collections.ConfigDict, workdir: str, lcnn_point: str,
               multiplications: float) -> dict[str, Any] | None:
  """Trains (or reads back) ``prune_<lcnn_point>``, the CNN of ``config`` pruned to ``multiplications``, and
  returns its row (None when it is not finished under ``--finished_only``)."""
  name = f"prune_{lcnn_point}"
  end = config.sparsity.project_at
  try:
    result = common.run_point(point_config(config, None, None, ()), os.path.join(workdir, name),
                              wrap_optimizer=pruning_lib.to_budget(multiplications, end),
                              setup=pruning_lib.setup(multiplications, end))
  except common.NotFinished:
    logging.warning("Spectrum point %s is not finished; left out.", name)
    return None
  return {"arm": "pruning", "point": name, "matches": lcnn_point, "dictionary_size": "-", "strength": "-",
          "top1": result["top1"], "top5": result["top5"], "speedup": result["speedup"],
          "multiplications": result["multiplications"], "density": "-"}


def pruning_comparison(per_seed: Mapping[Any, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
  """One row per LCNN point that has a pruned CNN: both arms' top-1 and counted speedup, and the paired
  difference LCNN − pruning of top-1 per seed (``top1_difference``), as mean ± std (:func:`common.aggregate`)."""
  paired = {}
  for seed, rows in per_seed.items():
    lcnn = {row["point"]: row for row in rows if row["arm"] == "lcnn"}
    paired[seed] = [{"point": row["matches"], "target": row["target"], "lcnn_top1": lcnn[row["matches"]]["top1"],
                     "pruning_top1": row["top1"], "lcnn_speedup": lcnn[row["matches"]]["speedup"],
                     "pruning_speedup": row["speedup"],
                     "top1_difference": lcnn[row["matches"]]["top1"] - row["top1"]}
                    for row in rows if row["arm"] == "pruning" and row["matches"] in lcnn]
  return common.aggregate(paired, "point", COMPARED)


COMPARED = ("lcnn_top1", "pruning_top1", "top1_difference", "lcnn_speedup", "pruning_speedup")


AGGREGATED = ("top1", "top5", "speedup", "wall_speedup", "density", "strength", "multiplications")
COLUMNS = ("point", "dictionary_size", "target", "seeds", "top1", "speedup", "multiplications", "wall_speedup",
                "density", "strength")


def run_spectrum_seeds(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int], *,
                       earlier: dict[int, list[dict[str, Any]]] | None = None,
                       **kwargs: Any) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
  """:func:`run_spectrum` once per seed in ``WORKDIR/seed<S>`` (``config.seed`` = S); returns the points'
  mean ± std rows (:func:`common.aggregate` of :data:`AGGREGATED`) and each seed's own rows. ``earlier``: seeds'
  rows read from earlier reports (:func:`common.read_earlier_reports`); they join and are not run again."""
  per_seed = dict(earlier or {})
  for seed in seeds:
    if seed in per_seed:
      logging.info("Spectrum: seed %d read from an earlier report, not run again.", seed)
      continue
    logging.info("Spectrum: seed %d (%d seeds).", seed, len(seeds))
    rows = run_spectrum(common.with_seed(config, seed), common.seed_workdir(workdir, seed), **kwargs)
    if rows:  # none when --finished_only finds nothing of this seed
      per_seed[seed] = rows
  if not per_seed:
    raise ValueError(f"{workdir}: no finished point for seeds {list(seeds)}; run without --finished_only.")
  per_seed = dict(sorted(per_seed.items()))
  return common.aggregate(per_seed, "point", AGGREGATED), per_seed


def plot_spectrum(rows: Sequence[dict[str, Any]], filename: str, title: str, bench_batch: int = 1) -> None:
  """Top-1 against multiplication speedup (and measured speedup when present), one line per strength."""
  fig, axes = spectrum_figure(rows, bench_batch)
  common.save_figure(fig, axes, filename, suptitle=title)


def spectrum_figure(rows: Sequence[dict[str, Any]], bench_batch: int = 1):
  """The figure of :func:`plot_spectrum` and its panels, not yet written: top-1 in percent against the speedup
  on a log axis labelled 1×, 2×, 5×, 10×, … (3× too within a decade), without the minor labels that collide on a
  panel spanning under a decade, as the wall-clock one does."""
  from matplotlib import ticker
  plt = common.pyplot()
  panels = [("speedup", "speedup in multiplications (×)")]
  if any("wall_speedup" in row for row in rows):
    panels.append(("wall_speedup", f"measured wall-clock speedup at batch {bench_batch} (×)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  lcnn = [row for row in rows if row.get("arm", "lcnn") == "lcnn" and row["point"] != "cnn"]
  pruned = sorted((row for row in rows if row.get("arm") == "pruning"), key=lambda row: row["speedup"])
  by_target = any(row.get("target", "-") != "-" for row in lcnn)
  for ax, (key, label) in zip(axes[0], panels):
    if by_target:  # one line per dictionary size through its targets
      lines = [(f"LCNN, k={size}", sorted((row for row in lcnn if row["dictionary_size"] == size),
                                          key=lambda row: row["target"]), "target", "{:g}x")
               for size in sorted({row["dictionary_size"] for row in lcnn})]
    else:  # one line per strength through the dictionary sizes
      lines = [(f"LCNN, strength {strength:g}", sorted((row for row in lcnn if row["strength"] == strength),
                                                       key=lambda row: row["dictionary_size"]),
                "dictionary_size", "k={}")
               for strength in sorted({row["strength"] for row in lcnn})]
    points = [(row[key], 100 * row["top1"]) for row in lcnn]
    for line_label, line, note_key, note in lines:
      if any("top1_std" in row for row in line):  # mean ± std over seeds, in both directions
        ax.errorbar([row[key] for row in line], [100 * row["top1"] for row in line],
                    yerr=[100 * row.get("top1_std", 0.0) for row in line],
                    xerr=[row.get(f"{key}_std", 0.0) for row in line], fmt="o-", capsize=3, label=line_label)
      else:
        ax.plot([row[key] for row in line], [100 * row["top1"] for row in line], "o-", label=line_label)
      for row in line:  # the note above the point, or below when another point sits just above it
        x, y = row[key], 100 * row["top1"]
        crowded = any(abs(math.log(other_x / x)) < 0.05 and 0 < other_y - y < 3 for other_x, other_y in points)
        ax.annotate(note.format(row[note_key]), (x, y), textcoords="offset points",
                    xytext=(4, -11 if crowded else 4), fontsize=7)
    if pruned and key == "speedup":  # a pruned CNN runs dense kernels: no wall-clock point
      ax.errorbar([row[key] for row in pruned], [100 * row["top1"] for row in pruned],
                  yerr=[100 * row.get("top1_std", 0.0) for row in pruned],
                  xerr=[row.get(f"{key}_std", 0.0) for row in pruned], fmt="s--", color="tab:red", capsize=3,
                  label="CNN, gradual magnitude pruning")
    for row in rows:
      if row["point"] == "cnn":
        ax.plot([row[key]] if key in row else [1.0], [100 * row["top1"]], "k*", markersize=12, label="CNN")
        if "top1_std" in row:  # the CNN's mean as the reference line, its ± std as a band
          ax.axhline(100 * row["top1"], color="k", linestyle=":", linewidth=1)
          ax.axhspan(100 * (row["top1"] - row["top1_std"]), 100 * (row["top1"] + row["top1_std"]), color="k",
                     alpha=0.08, label=f"CNN, ± std over {len(row['seeds'])} seeds")
    ax.set_xscale("log")
    ax.margins(x=0.08)  # room for the last point's note
    low, high = ax.get_xlim()
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0) if high > 10 * low
                                                 else (1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}×"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.PercentFormatter(decimals=0))
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy")
  return fig, list(axes[0])


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so the experiment modules import
  side by side."""
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run config every point starts from.",
                                  flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The experiment's directory (one subdirectory per point).",
                      flag_values=flag_values)
  flags.DEFINE_bool("print_config", False, common.PRINT_CONFIG_HELP, flag_values=flag_values)
  flags.DEFINE_list("sizes", ["2", "4", "8", "16"], "Dictionary sizes.", flag_values=flag_values)
  flags.DEFINE_list("strengths", ["3", "30"], "Sparsity strengths (the original's lambda).", flag_values=flag_values)
  flags.DEFINE_list("targets", [], "Target speedups (sparsity.target_speedup), e.g. 2,5,10,20,40: sweeps "
                    "(dictionary size, target) instead of (dictionary size, strength).", flag_values=flag_values)
  flags.DEFINE_list("points", [], "(dictionary size, target speedup) pairs, e.g. 16:2.5,8:10,4:40: exactly these "
                    "LCNN points instead of a --sizes grid.", flag_values=flag_values)
  flags.DEFINE_list("seeds", [], "Seeds, e.g. 0,1,2: every point once per seed in WORKDIR/seed<S>, reported as "
                    "mean ± std. Empty: the config's seed, points directly in WORKDIR.", flag_values=flag_values)
  flags.DEFINE_bool("finished_only", False, "Train nothing: report the finished points only.",
                    flag_values=flag_values)
  flags.DEFINE_list("earlier_reports", [], common.EARLIER_REPORTS_HELP, flag_values=flag_values)
  flags.DEFINE_list("size_keys", ["convs"], "model.dictionary keys set to each size (ResNet-LCNN: "
                    "stage1,stage2,stage3,stage4).", flag_values=flag_values)
  flags.DEFINE_bool("baseline", True, "Also train the CNN baseline.", flag_values=flag_values)
  flags.DEFINE_bool("pruning", True, "Also train, beside each LCNN point, the CNN pruned by gradual magnitude "
                    "pruning to the multiplications that LCNN counts (prune_<point>).", flag_values=flag_values)
  flags.DEFINE_bool("wall_clock", True, "Measure the wall-clock speedup with the inference benchmark.",
                    flag_values=flag_values)
  flags.DEFINE_integer("bench_batch", 1, "Batch size of the wall-clock measurement.", flag_values=flag_values)
  flags.DEFINE_float("bench_seconds", 3.0, "Seconds of timing per point.", flag_values=flag_values)


def spectrum_report(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int] | None,
                    wall_clock: bool = False, earlier_reports: Sequence[str] = (),
                    **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
  """Runs (or reads back) the spectrum, once per seed in ``WORKDIR/seed<S>`` (``seeds``) or once with the
  config's seed in ``WORKDIR`` (None); writes ``spectrum.json`` and ``spectrum.md`` (the scale, the points,
  and LCNN against pruning at equal multiplications) and returns the markdown and the mean ± std rows. The seeds
  of ``earlier_reports`` (their ``spectrum.json``, same config and settings, no wall clock) join without being
  run again."""
  settings = common.report_settings(config, wall_clock=wall_clock, **kwargs)
  if earlier_reports and (not seeds or wall_clock):
    raise ValueError("--earlier_reports joins seeds: give --seeds, and --nowall_clock (wall-clock speedups measured "
                     "on different machines or at different times cannot be averaged).")
  if seeds:
    earlier = common.read_earlier_reports(earlier_reports, settings)
    rows, per_seed = run_spectrum_seeds(config, workdir, seeds, earlier=earlier, wall_clock=wall_clock, **kwargs)
  else:
    per_seed = {config.seed: run_spectrum(config, workdir, wall_clock=wall_clock, **kwargs)}
    rows = common.aggregate(per_seed, "point", AGGREGATED)
    if not rows:
      raise ValueError(f"{workdir}: no finished point; run without --finished_only.")
  scale = common.run_scale(point_config(config, None, None, ()), workdir)
  seeds_used = sorted({seed for row in rows for seed in row["seeds"]})
  lines = [common.describe_scale("Every point (the CNN, each LCNN, each pruned CNN)", scale)
           + f"; seeds {', '.join(map(str, seeds_used))}.", ""]
  columns = [c for c in COLUMNS if c != "wall_speedup" or wall_clock]
  lines.append(common.markdown_table(common.mean_std_rows(rows, AGGREGATED, percent=("top1", "top5")), columns))
  comparison = pruning_comparison(per_seed)
  if comparison:
    lines += ["LCNN against the CNN pruned to the same counted multiplications (top-1 in %, mean ± std over seeds; "
              "difference: LCNN − pruning, paired per seed):", "",
              common.markdown_table(common.mean_std_rows(comparison, COMPARED, percent=COMPARED[:3]),
                                    ("point", "target", "seeds", *COMPARED))]
  markdown = "\n".join(lines)
  common.write_report(workdir, "spectrum", {"scale": scale, "rows": rows, "pruning_comparison": comparison,
                                            "seeds": seeds_used,
                                            "per_seed": {str(s): r for s, r in per_seed.items()},
                                            "config": config.to_dict(), "settings": settings}, markdown)
  return markdown, rows


def report(flag_values: flags.FlagValues) -> None:
  """Runs (or reads back) the experiment of the parsed flags; writes and prints its tables and plot."""
  workdir = flag_values.workdir  # created by common.main
  config = flag_values.config
  markdown, rows = spectrum_report(
      config, workdir, common.parse_seeds(flag_values.seeds) if flag_values.seeds else None,
      sizes=[int(k) for k in flag_values.sizes], strengths=[float(s) for s in flag_values.strengths],
      targets=[float(t) for t in flag_values.targets], points=parse_points(flag_values.points),
      size_keys=flag_values.size_keys, baseline=flag_values.baseline, pruning=flag_values.pruning,
      wall_clock=flag_values.wall_clock, bench_batch=flag_values.bench_batch, bench_seconds=flag_values.bench_seconds,
      earlier_reports=flag_values.earlier_reports)
  plot_spectrum(rows, os.path.join(workdir, "spectrum.png"),
                f"{config.model.name} on {config.data.name}: accuracy vs speedup", flag_values.bench_batch)
  print(markdown)  # the command's output


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``python -m lcnn_jax.experiments.spectrum`` on its parsed flags (``flag_values``)."""
  common.main(argv, flag_values, report)


if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=common.USER_ERRORS)
