"""Few-iteration learning (paper §4.4): a shallow net's dictionaries let a deeper LCNN learn in few iterations.

    python -m lcnn_jax.experiments.few_iteration --workdir runs/few_iteration \\
        [--config configs/experiments/few_iteration.py] [--depth_key model.convs_per_stage] \\
        [--shallow_depth 2] [--deep_depth 4] [--deep_steps 100] [--eval_every 10]

1. ``shallow_lcnn`` trains the LCNN of the config at ``depth_key = shallow_depth`` (the config's recipe).
2. Three deep runs (``depth_key = deep_depth``), each ``--deep_steps`` steps evaluated every ``--eval_every``:
   * ``deep_lcnn_transfer``: every lookup layer takes the shallow net's dictionary of the same path, else that of
     the layer it repeats (:func:`common.map_dictionaries`), frozen; only indices and coefficients (with biases
     and BatchNorm) train — the paper's setting;
   * ``deep_cnn``: the deep CNN from scratch, the paper's baseline;
   * ``deep_lcnn_scratch`` (``--lcnn_scratch``): the deep LCNN from scratch, which separates the effect of the
     transferred dictionaries from that of the architecture.

With ``--seeds 0,1,2`` every run (the shallow one too) trains once per seed in ``WORKDIR/seed<S>/``, and the
table gives mean ± std over the seeds at each evaluated step.

On the digits the depths are ``model.convs_per_stage`` (2 → 4: conv1..conv3 each followed by 1 or 3 more of its
width); for ResNet pass ``--depth_key model.depth --shallow_depth 8 --deep_depth 18``. Every run is a resumable
point under the workdir. Writes ``few_iteration.json``, ``few_iteration.md`` and ``few_iteration.png``.
"""

from __future__ import annotations

import os
import types
from typing import Any, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from lcnn_jax import config as config_lib, models
from lcnn_jax.experiments import common

DEFAULT_CONFIG = os.path.join(config_lib.preset_dir(), "experiments", "few_iteration.py")
ARMS = {"deep_lcnn_transfer": "LCNN, transferred dictionaries (train I and C)", "deep_cnn": "CNN from scratch",
        "deep_lcnn_scratch": "LCNN from scratch"}


def deep_config(config: ml_collections.ConfigDict, depth_key: str, depth: int, steps: int, eval_every: int, *,
                cnn: bool, frozen: bool) -> ml_collections.ConfigDict:
  """A deep run of ``steps`` steps evaluated every ``eval_every``: CNN, or LCNN with or without frozen dictionaries."""
  overrides = {depth_key: depth, "train.num_steps": steps, "train.eval_every": eval_every,
               "train.checkpoint_every": steps, "train.log_every": max(1, min(config.train.log_every, eval_every)),
               "train.warmup_steps": min(config.train.warmup_steps, steps // 5), "train.freeze_dictionaries": frozen}
  if cnn:
    overrides.update({"model.name": models.baseline_config(config.model).name, "sparsity.strength": 0.0,
                      "sparsity.target_speedup": 0.0, "sparsity.target_density": 0.0})
  return common.derive(config, **overrides)


def run_few_iteration(config: ml_collections.ConfigDict, workdir: str, *, depth_key: str, shallow_depth: int,
                      deep_depth: int, deep_steps: int, eval_every: int,
                      lcnn_scratch: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Trains (or reads back) the shallow run and the deep arms; returns one row per evaluated step and a summary
  (final top-1 and speedup of each run)."""
  os.makedirs(workdir, exist_ok=True)
  shallow_dir = os.path.join(workdir, "shallow_lcnn")
  shallow = common.run_point(common.derive(config, **{depth_key: shallow_depth}), shallow_dir)
  results = {}
  for arm in ARMS:
    if arm == "deep_lcnn_scratch" and not lcnn_scratch:
      continue
    logging.info("Few-iteration: %s.", arm)
    transfer = arm == "deep_lcnn_transfer"
    results[arm] = common.run_point(
        deep_config(config, depth_key, deep_depth, deep_steps, eval_every, cnn=arm == "deep_cnn", frozen=transfer),
        os.path.join(workdir, arm),
        prepare=(lambda model: common.transfer_mapped_dictionaries(shallow_dir, model)) if transfer else None)
  steps = sorted({point["step"] for result in results.values() for point in result["curve"]})
  rows = []
  for step in steps:
    row = {"step": step}
    for arm, result in results.items():
      row[f"{arm}_top1"] = next((p["top1"] for p in result["curve"] if p["step"] == step), "")
    rows.append(row)
  summary = {"shallow_lcnn": {k: shallow[k] for k in ("top1", "top5", "speedup", "steps")},
             **{arm: {k: result[k] for k in ("top1", "top5", "speedup", "steps")} for arm, result in results.items()}}
  return rows, summary


def run_few_iteration_seeds(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int], **kwargs: Any
                            ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[int, tuple[list, dict]]]:
  """:func:`run_few_iteration` once per seed in ``WORKDIR/seed<S>`` (``config.seed`` = S); returns the mean ± std
  rows by step (:func:`common.aggregate`), the summary as mean ± std per run, and each seed's rows and summary."""
  per_seed = {}
  for seed in seeds:
    try:
      per_seed[seed] = run_few_iteration(common.with_seed(config, seed), common.seed_workdir(workdir, seed), **kwargs)
    except common.NotFinished as e:  # --finished_only: a seed counts when all its runs are finished
      logging.warning("Few-iteration seed %d left out: %s", seed, e)
  if not per_seed:
    raise ValueError(f"{workdir}: no seed of {list(seeds)} has all its runs finished; run without --finished_only.")
  fields = sorted({k for rows, _ in per_seed.values() for row in rows for k in row if k.endswith("_top1")})
  rows = common.aggregate({seed: rows for seed, (rows, _) in per_seed.items()}, "step", fields)
  runs = common.aggregate({seed: [{"run": run, **result} for run, result in summary.items()]
                           for seed, (_, summary) in per_seed.items()}, "run", ("top1", "top5", "speedup"))
  summary = {row.pop("run"): row for row in runs}
  return rows, summary, per_seed


def plot_few_iteration(rows: Sequence[dict[str, Any]], summary: dict[str, Any], filename: str, title: str) -> None:
  """Top-1 of each deep run against training iterations; the shallow net's final top-1 as a reference line."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for arm, label in ARMS.items():
    points = [row for row in rows if row.get(f"{arm}_top1", "") != ""]
    style = "o-" if "lcnn" in arm else "s--"
    if any(f"{arm}_top1_std" in row for row in points):  # mean ± std over seeds
      ax.errorbar([row["step"] for row in points], [100 * row[f"{arm}_top1"] for row in points],
                  yerr=[100 * row.get(f"{arm}_top1_std", 0.0) for row in points], fmt=style, capsize=3,
                  markersize=4, label=f"{label} ({len(points[0]['seeds'])} seeds)")
    elif points:
      ax.plot([row["step"] for row in points], [100 * row[f"{arm}_top1"] for row in points], style, label=label,
              markersize=4)
  shallow = summary["shallow_lcnn"]
  ax.axhline(100 * shallow["top1"], color="gray", linestyle=":",
             label=f"shallow LCNN after {shallow['steps']:g} steps")
  if shallow.get("top1_std"):
    ax.axhspan(100 * (shallow["top1"] - shallow["top1_std"]), 100 * (shallow["top1"] + shallow["top1_std"]),
               color="gray", alpha=0.1)
  ax.set_xlabel("training iterations of the deep net")
  ax.set_ylabel("top-1 accuracy (%)")
  common.save_figure(fig, [ax], filename, title=title)


def define_flags() -> types.SimpleNamespace:
  """The command's flags (defined only when it runs, so the experiment modules import side by side)."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run config of every run."),
      workdir=flags.DEFINE_string("workdir", None, "The experiment's directory (one subdirectory per run)."),
      print_config=flags.DEFINE_bool("print_config", False, common.PRINT_CONFIG_HELP),
      depth_key=flags.DEFINE_string("depth_key", "model.convs_per_stage", "The config key that sets the depth."),
      shallow=flags.DEFINE_integer("shallow_depth", 2, "Depth of the net that learns the dictionaries."),
      deep=flags.DEFINE_integer("deep_depth", 4, "Depth of the net that reuses them."),
      deep_steps=flags.DEFINE_integer("deep_steps", 100, "Training steps of each deep run."),
      eval_every=flags.DEFINE_integer("eval_every", 10, "Steps between evaluations of the deep runs."),
      lcnn_scratch=flags.DEFINE_bool("lcnn_scratch", True, "Also train the deep LCNN from scratch."),
      seeds=flags.DEFINE_list("seeds", [], "Seeds, e.g. 0,1,2: every run once per seed in WORKDIR/seed<S>, "
                              "reported as mean ± std. Empty: the config's seed, runs directly in WORKDIR."),
      finished_only=flags.DEFINE_bool("finished_only", False, "Train nothing: report the seeds whose runs are all "
                                      "finished."))


def report(flag: types.SimpleNamespace) -> None:
  """Runs (or reads back) the experiment of the flags; writes and prints its table and plot."""
  workdir, config = flag.workdir.value, flag.config.value
  kwargs = dict(depth_key=flag.depth_key.value, shallow_depth=flag.shallow.value, deep_depth=flag.deep.value,
                deep_steps=flag.deep_steps.value, eval_every=flag.eval_every.value,
                lcnn_scratch=flag.lcnn_scratch.value)
  if flag.seeds.value:
    seeds = common.parse_seeds(flag.seeds.value)
    rows, summary, per_seed = run_few_iteration_seeds(config, workdir, seeds, **kwargs)
    columns = ["step", "seeds", *(f"{arm}_top1" for arm in summary if arm != "shallow_lcnn")]
    table = common.write_report(
        workdir, "few_iteration", rows, columns,
        {"summary": summary, "seeds": seeds, "config": config.to_dict(),
         "per_seed": {str(s): {"rows": r, "summary": m} for s, (r, m) in per_seed.items()}},
        table_rows=common.mean_std_rows(rows, columns[2:], percent=columns[2:]))
  else:
    rows, summary = run_few_iteration(config, workdir, **kwargs)
    columns = ["step", *(f"{arm}_top1" for arm in summary if arm != "shallow_lcnn")]
    table = common.write_report(workdir, "few_iteration", rows, columns,
                                {"summary": summary, "config": config.to_dict()})
  plot_few_iteration(rows, summary, os.path.join(workdir, "few_iteration.png"),
                     f"{config.model.name} on {config.data.name}: {flag.depth_key.value} "
                     f"{flag.shallow.value} -> {flag.deep.value}")
  print(table)  # the command's output
  for name, result in summary.items():
    spread = f" ± {result['top1_std']:.4f} ({len(result['seeds'])} seeds)" if "top1_std" in result else ""
    print(f"{name}: top-1 {result['top1']:.4f}{spread} after {result['steps']:g} steps, {result['speedup']:.1f}x "
          "fewer multiplications than its CNN")


if __name__ == "__main__":
  common.run(define_flags, report)
