"""Few-iteration learning (paper §4.4): a shallow net's dictionaries let a deeper LCNN learn in few iterations.

    python -m lcnn_jax.experiments.few_iteration --workdir runs/few_iteration \\
        [--config configs/experiments/few_iteration.py] [--depth_key model.convs_per_stage] \\
        [--shallow_depth 2] [--deep_depth 4] [--deep_steps 100] [--eval_every 10] [--seeds 0,1,2] \\
        [--deep_strength 0] [--deep_rule prox]

Per seed S, in ``WORKDIR/seed<S>/`` (``config.seed`` = S):

1. ``shallow_lcnn`` trains the LCNN of the config at ``depth_key = shallow_depth`` (the config's recipe, its
   sparsity included: a target speedup there is reached before the comparison starts).
2. Three deep runs (``depth_key = deep_depth``), each ``--deep_steps`` steps evaluated every ``--eval_every``:
   * ``deep_lcnn_transfer``: every lookup layer takes the shallow net's dictionary of the same path, else that of
     the layer it repeats (:func:`common.map_dictionaries`), frozen; only indices and coefficients (with biases
     and BatchNorm) train — the paper's setting;
   * ``deep_lcnn_scratch``: the same deep LCNN from scratch (the same seed, so the same initial P), dictionaries
     trained — the comparison that isolates the transferred dictionaries;
   * ``deep_cnn``: the deep CNN from scratch, for reference.

Both deep LCNNs train at one fixed operating point: no target speedup (no steering during the comparison), the
sparsity rule and strength λ of ``--deep_rule`` (default the config's) and ``--deep_strength`` (default 0: P is
not penalised and both count the speedup of a dense P), taken apart from the shallow run's config. The report
gives top-1 against iterations as mean ± std over the seeds, the per-seed difference transfer − scratch at each
evaluation, and the speedup each run ends at; its first lines state the scale.

On the digits the depths are ``model.convs_per_stage`` (2 → 4: conv1..conv3 each followed by 1 or 3 more of its
width); for ResNet pass ``--depth_key model.depth --shallow_depth 8 --deep_depth 18``. Every run is a resumable
point under the workdir. Writes ``few_iteration.json``, ``few_iteration.md`` and ``few_iteration.png``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from lcnn_jax import cli, config as config_lib, models
from lcnn_jax.experiments import common

DEFAULT_CONFIG = os.path.join(config_lib.preset_dir(), "experiments", "few_iteration.py")
ARMS = {"deep_lcnn_transfer": "LCNN, transferred dictionaries (train I and C)",
        "deep_lcnn_scratch": "LCNN from scratch", "deep_cnn": "CNN from scratch"}
DIFFERENCE = "transfer_minus_scratch"  # per seed: deep_lcnn_transfer − deep_lcnn_scratch top-1


def deep_config(config: ml_collections.ConfigDict, depth_key: str, depth: int, steps: int, eval_every: int, *,
                arm: str, strength: float, rule: str = "") -> ml_collections.ConfigDict:
  """A deep run of ``steps`` steps evaluated every ``eval_every``: the CNN, or an LCNN at the fixed operating point
  of ``rule`` ('' = the config's) and ``strength``, with frozen dictionaries for the transfer arm."""
  overrides = {depth_key: depth, "train.num_steps": steps, "train.eval_every": eval_every,
               "train.checkpoint_every": steps, "train.log_every": max(1, min(config.train.log_every, eval_every)),
               "train.warmup_steps": min(config.train.warmup_steps, steps // 5),
               "train.freeze_dictionaries": arm == "deep_lcnn_transfer",
               "sparsity.target_speedup": 0.0, "sparsity.target_density": 0.0}
  if arm == "deep_cnn":
    overrides.update({"model.name": models.baseline_config(config.model).name, "sparsity.strength": 0.0})
  else:
    overrides.update({"sparsity.strength": strength, "sparsity.rule": rule or config.sparsity.rule})
  return common.derive(config, **overrides)


def run_few_iteration(config: ml_collections.ConfigDict, workdir: str, *, depth_key: str, shallow_depth: int,
                      deep_depth: int, deep_steps: int, eval_every: int, deep_strength: float = 0.0,
                      deep_rule: str = "") -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Trains (or reads back) the shallow run and the deep arms; returns one row per evaluated step (each arm's
  top-1 and :data:`DIFFERENCE`) and a summary (final top-1 and speedup of each run)."""
  os.makedirs(workdir, exist_ok=True)
  shallow_dir = os.path.join(workdir, "shallow_lcnn")
  shallow = common.run_point(common.derive(config, **{depth_key: shallow_depth}), shallow_dir)
  results = {}
  for arm in ARMS:
    logging.info("Few-iteration: %s.", arm)
    transfer = arm == "deep_lcnn_transfer"
    results[arm] = common.run_point(
        deep_config(config, depth_key, deep_depth, deep_steps, eval_every, arm=arm, strength=deep_strength,
                    rule=deep_rule),
        os.path.join(workdir, arm),
        prepare=(lambda model: common.transfer_mapped_dictionaries(shallow_dir, model)) if transfer else None)
  steps = sorted({point["step"] for result in results.values() for point in result["curve"]})
  rows = []
  for step in steps:
    row = {"step": step}
    for arm, result in results.items():
      row[f"{arm}_top1"] = next((p["top1"] for p in result["curve"] if p["step"] == step), "")
    if "" not in (row["deep_lcnn_transfer_top1"], row["deep_lcnn_scratch_top1"]):
      row[DIFFERENCE] = row["deep_lcnn_transfer_top1"] - row["deep_lcnn_scratch_top1"]
    rows.append(row)
  summary = {"shallow_lcnn": {k: shallow[k] for k in ("top1", "top5", "speedup", "steps")},
             **{arm: {k: result[k] for k in ("top1", "top5", "speedup", "steps")} for arm, result in results.items()}}
  return rows, summary


def run_few_iteration_seeds(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int], *,
                            earlier: dict[int, tuple[list, dict]] | None = None, **kwargs: Any
                            ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[int, tuple[list, dict]]]:
  """:func:`run_few_iteration` once per seed in ``WORKDIR/seed<S>`` (``config.seed`` = S); returns the mean ± std
  rows by step (:func:`common.aggregate`), the summary as mean ± std per run, and each seed's rows and summary.
  ``earlier``: seeds' rows and summaries read from earlier reports (:func:`common.read_earlier_reports`); they
  join the report and are not run again."""
  per_seed = dict(earlier or {})
  for seed in seeds:
    if seed in per_seed:
      logging.info("Few-iteration seed %d: read from an earlier report, not run again.", seed)
      continue
    try:
      per_seed[seed] = run_few_iteration(common.with_seed(config, seed), common.seed_workdir(workdir, seed), **kwargs)
    except common.NotFinished as e:  # --finished_only: a seed counts when all its runs are finished
      logging.warning("Few-iteration seed %d left out: %s", seed, e)
  if not per_seed:
    raise ValueError(f"{workdir}: no seed of {list(seeds)} has all its runs finished; run without --finished_only.")
  per_seed = dict(sorted(per_seed.items()))
  fields = [*(f"{arm}_top1" for arm in ARMS), DIFFERENCE]
  rows = common.aggregate({seed: rows for seed, (rows, _) in per_seed.items()}, "step", fields)
  runs = common.aggregate({seed: [{"run": run, **result} for run, result in summary.items()]
                           for seed, (_, summary) in per_seed.items()}, "run", ("top1", "top5", "speedup"))
  summary = {row.pop("run"): row for row in runs}
  return rows, summary, per_seed


def few_iteration_report(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int], *,
                         depth_key: str, shallow_depth: int, earlier_reports: Sequence[str] = (),
                         **kwargs: Any) -> tuple[str, list, dict[str, Any]]:
  """Runs (or reads back) the experiment for ``seeds``; writes ``few_iteration.json`` and ``few_iteration.md``
  (the scale, top-1 against iterations, the paired difference, each run's final top-1 and speedup) and returns
  the markdown, the rows and the summary. The seeds of ``earlier_reports`` (their ``few_iteration.json``, same
  settings) join the report without being run again."""
  settings = common.report_settings(config, depth_key=depth_key, shallow_depth=shallow_depth, **kwargs)
  earlier = {seed: (result["rows"], result["summary"])
             for seed, result in common.read_earlier_reports(earlier_reports, settings).items()}
  rows, summary, per_seed = run_few_iteration_seeds(config, workdir, seeds, earlier=earlier, depth_key=depth_key,
                                                    shallow_depth=shallow_depth, **kwargs)
  shallow = common.run_scale(common.derive(config, **{depth_key: shallow_depth}), workdir)
  deep_steps, strength = kwargs["deep_steps"], kwargs.get("deep_strength", 0.0)
  rule = kwargs.get("deep_rule") or config.sparsity.rule
  lines = [common.describe_scale(f"Shallow LCNN ({depth_key} = {shallow_depth})", shallow) + ".",
           f"Deep runs ({depth_key} = {kwargs['deep_depth']}): {deep_steps:,} steps of batch "
           f"{config.train.batch_size} on the same {shallow['train_images']:,} images, evaluated every "
           f"{kwargs['eval_every']}; both deep LCNNs at a fixed operating point (rule {rule}, strength "
           f"{strength:g}, no target speedup).",
           f"Seeds: {len(per_seed)} ({', '.join(map(str, per_seed))}); every run, the shallow one too, per seed.", ""]
  fields = [f"{arm}_top1" for arm in ARMS]
  lines += ["Top-1 in % against iterations of the deep runs (mean ± std over seeds; the difference transfer − "
            "scratch is paired per seed):", "",
            common.markdown_table(common.mean_std_rows(rows, [*fields, DIFFERENCE], percent=[*fields, DIFFERENCE]),
                                  ["step", "seeds", *fields, DIFFERENCE])]
  runs = [{"run": run, **result} for run, result in summary.items()]
  lines += ["Each run at its end (top-1 in %; counted speedup over its CNN):", "",
            common.markdown_table(common.mean_std_rows(runs, ("top1", "speedup"), percent=("top1",)),
                                  ("run", "seeds", "steps", "top1", "speedup"))]
  markdown = "\n".join(lines)
  common.write_report(workdir, "few_iteration", {
      "scale": lines[:3], "rows": rows, "summary": summary, "seeds": list(per_seed), "config": config.to_dict(),
      "settings": settings,
      "per_seed": {str(s): {"rows": r, "summary": m} for s, (r, m) in per_seed.items()}}, markdown)
  return markdown, rows, summary


def plot_few_iteration(rows: Sequence[dict[str, Any]], summary: dict[str, Any], filename: str, title: str) -> None:
  """Top-1 of each deep run against training iterations; the shallow net's final top-1 as a reference line."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for arm, label in ARMS.items():
    points = [row for row in rows if row.get(f"{arm}_top1", "") != ""]
    if not points:
      continue
    seeds = len(points[0].get("seeds", ())) or 1  # aggregated rows list their seeds; one seed's rows do not
    ax.errorbar([row["step"] for row in points], [100 * row[f"{arm}_top1"] for row in points],
                yerr=[100 * row.get(f"{arm}_top1_std", 0.0) for row in points],
                fmt="o-" if "lcnn" in arm else "s--", capsize=3, markersize=4,
                label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
  shallow = summary["shallow_lcnn"]
  ax.axhline(100 * shallow["top1"], color="gray", linestyle=":",
             label=f"shallow LCNN after {shallow['steps']:g} steps")
  if shallow.get("top1_std"):
    ax.axhspan(100 * (shallow["top1"] - shallow["top1_std"]), 100 * (shallow["top1"] + shallow["top1_std"]),
               color="gray", alpha=0.1)
  ax.set_xlabel("training iterations of the deep net")
  ax.set_ylabel("top-1 accuracy (%)")
  common.save_figure(fig, [ax], filename, title=title)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so the experiment modules import
  side by side."""
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run config of every run.", flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The experiment's directory (one subdirectory per run).",
                      flag_values=flag_values)
  flags.DEFINE_bool("print_config", False, common.PRINT_CONFIG_HELP, flag_values=flag_values)
  flags.DEFINE_string("depth_key", "model.convs_per_stage", "The config key that sets the depth.",
                      flag_values=flag_values)
  flags.DEFINE_integer("shallow_depth", 2, "Depth of the net that learns the dictionaries.", flag_values=flag_values)
  flags.DEFINE_integer("deep_depth", 4, "Depth of the net that reuses them.", flag_values=flag_values)
  flags.DEFINE_integer("deep_steps", 100, "Training steps of each deep run.", flag_values=flag_values)
  flags.DEFINE_integer("eval_every", 10, "Steps between evaluations of the deep runs.", flag_values=flag_values)
  flags.DEFINE_float("deep_strength", 0.0, "Sparsity strength λ of both deep LCNNs, fixed (no target speedup): one "
                     "operating point for the comparison.", flag_values=flag_values)
  flags.DEFINE_enum("deep_rule", "", ["", *config_lib.SPARSITY_RULES],
                    "Sparsity rule of the deep LCNNs ('': the config's).", flag_values=flag_values)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: every run once per seed in WORKDIR/seed<S>, reported as "
                    "mean ± std.", flag_values=flag_values)
  flags.DEFINE_bool("finished_only", False, "Train nothing: report the seeds whose runs are all finished.",
                    flag_values=flag_values)
  flags.DEFINE_list("earlier_reports", [], common.EARLIER_REPORTS_HELP, flag_values=flag_values)


def report(flag_values: flags.FlagValues) -> None:
  """Runs (or reads back) the experiment of the parsed flags; writes and prints its tables and plot."""
  workdir, config = flag_values.workdir, flag_values.config
  shallow, deep, depth_key = flag_values.shallow_depth, flag_values.deep_depth, flag_values.depth_key
  markdown, rows, summary = few_iteration_report(
      config, workdir, common.parse_seeds(flag_values.seeds), depth_key=depth_key, shallow_depth=shallow,
      deep_depth=deep, deep_steps=flag_values.deep_steps, eval_every=flag_values.eval_every,
      deep_strength=flag_values.deep_strength, deep_rule=flag_values.deep_rule,
      earlier_reports=flag_values.earlier_reports)
  plot_few_iteration(rows, summary, os.path.join(workdir, "few_iteration.png"),
                     f"{config.model.name} on {config.data.name}: {depth_key} {shallow} -> {deep}")
  print(markdown)  # the command's output


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``python -m lcnn_jax.experiments.few_iteration`` on its parsed flags (``flag_values``)."""
  common.main(argv, flag_values, report)


if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=common.USER_ERRORS)
