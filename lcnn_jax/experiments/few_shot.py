"""Few-shot learning (paper §4.3): novel classes from n examples each, reusing dictionaries of base classes.

    python -m lcnn_jax.experiments.few_shot --workdir runs/few_shot \\
        [--config configs/experiments/few_shot.py] [--ns 1,2,4,8,16] [--base_classes 0,1,2,3,4] \\
        [--novel_classes 5,6,7,8,9] [--novel_steps 60]

1. ``base_lcnn`` and ``base_cnn`` learn the base classes from all their training images (the config's recipe).
2. For each n, on the novel classes with the first n training images of each:
   * ``lcnn_n<n>``: the LCNN with ``base_lcnn``'s dictionaries (``train.init_from``), training only the
     coefficients (``train.freeze_dictionaries``), biases and BatchNorm — the paper's setting. With
     ``--lcnn_init=all`` (``lcnn_all_n<n>``) it starts from every weight of ``base_lcnn`` but the classifier,
     dictionaries still frozen;
   * ``cnn_n<n>``: the CNN fine-tuned the usual way: every weight of ``base_cnn`` but the classifier copied,
     all layers trained;
   * ``cnn_last_n<n>`` (``--last_layer``, the default): the same start, only the classifier trained
     (``train.train_only``); the other layers' weights stay the base CNN's (their BatchNorm statistics still
     follow the novel images, as in any training step).
   All run ``--novel_steps`` steps of the config's optimiser and are evaluated on every validation image of the
   novel classes.

With ``--seeds 0,1,2,3,4`` the base runs train once (with the config's seed) and the novel runs once per seed, in
``WORKDIR/seed<S>/`` (so several commands, e.g. ``--seeds 0,1`` and ``--seeds 2,3``, can share one workdir); the
seed changes the novel runs' initialisation (the classifier; for the LCNN also indices
and coefficients), batch order, augmentation and dropout, not which n images each class keeps (the first n).
The table then gives mean ± std over the seeds.

Every run is a resumable point under the workdir. Writes ``few_shot.json``, ``few_shot.md`` and ``few_shot.png``.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from lcnn_jax import config as config_lib, models
from lcnn_jax.experiments import common

DEFAULT_CONFIG = os.path.join(config_lib.preset_dir(), "experiments", "few_shot.py")
LCNN_INITS = ("dictionaries", "all")
COLUMNS = ("n", "lcnn_top1", "cnn_top1", "lcnn_speedup")  # top-5 (in the JSON) says little with few classes
ARMS = ("lcnn", "cnn", "cnn_last")
AGGREGATED = tuple(f"{arm}_{k}" for arm in ARMS for k in ("top1", "top5")) + ("lcnn_speedup",)


def base_config(config: ml_collections.ConfigDict, classes: Sequence[int], cnn: bool) -> ml_collections.ConfigDict:
  """The run on the base classes: the LCNN of ``config`` or its CNN baseline."""
  overrides = {"data.classes": tuple(classes)}
  if cnn:
    overrides.update({"model.name": models.baseline_config(config.model).name, "sparsity.strength": 0.0,
                      "sparsity.target_speedup": 0.0, "sparsity.target_density": 0.0})
  return common.derive(config, **overrides)


def novel_config(config: ml_collections.ConfigDict, classes: Sequence[int], n: int, steps: int, *, cnn: bool,
                 base_workdir: str, train_only: str = "", batch_size: int = 0) -> ml_collections.ConfigDict:
  """The run on the novel classes with n examples each, for ``steps`` steps (of ``batch_size`` images; 0: the
  config's), evaluated once at the end; ``train_only`` (the CNN's classifier path, for last-layer fine-tuning)
  freezes every other parameter."""
  novel = base_config(config, classes, cnn)
  overrides = {"data.examples_per_class": n, "train.num_steps": steps, "train.eval_every": steps,
               "train.log_every": max(1, min(config.train.log_every, steps)),
               "train.checkpoint_every": steps, "train.warmup_steps": min(config.train.warmup_steps, steps // 5)}
  if not cnn:
    overrides.update({"train.init_from": os.path.abspath(base_workdir), "train.freeze_dictionaries": True})
  if train_only:
    overrides["train.train_only"] = train_only
  if batch_size:
    overrides["train.batch_size"] = batch_size
  return common.derive(novel, **overrides)


def run_few_shot(config: ml_collections.ConfigDict, workdir: str, *, ns: Sequence[int],
                 base_classes: Sequence[int], novel_classes: Sequence[int], novel_steps: int,
                 lcnn_init: str = "dictionaries", last_layer: str = "", novel_batch_size: int = 0,
                 novel_workdir: str | None = None,
                 novel_seed: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Trains (or reads back) the base runs and every n; returns the table's rows and the base results.

  ``last_layer`` (the classifier's path, e.g. 'classifier') adds the arm that fine-tunes only it. The novel
  runs take batches of ``novel_batch_size`` (0: the config's) and go to ``novel_workdir`` (default ``workdir``) with ``seed`` = ``novel_seed`` (default the config's).
  """
  if lcnn_init not in LCNN_INITS:
    raise ValueError(f"lcnn_init={lcnn_init!r}: expected one of {LCNN_INITS}.")
  if set(base_classes) & set(novel_classes):
    raise ValueError(f"base classes {tuple(base_classes)} and novel classes {tuple(novel_classes)} overlap: "
                     "few-shot learning needs classes the base runs never saw.")
  os.makedirs(workdir, exist_ok=True)
  config = common.dataset_statistics(config, cache_dir=workdir)  # one normalisation for every subset
  base_lcnn_dir, base_cnn_dir = os.path.join(workdir, "base_lcnn"), os.path.join(workdir, "base_cnn")
  bases = {"lcnn": common.run_point(base_config(config, base_classes, cnn=False), base_lcnn_dir),
           "cnn": common.run_point(base_config(config, base_classes, cnn=True), base_cnn_dir)}
  lcnn_prepare = (functools.partial(_copy_all_but_classifier, base_lcnn_dir) if lcnn_init == "all" else None)
  cnn_prepare = functools.partial(_copy_all_but_classifier, base_cnn_dir)
  novel_dir = workdir if novel_workdir is None else novel_workdir
  novel = config if novel_seed is None else common.with_seed(config, novel_seed)
  rows = []
  for n in ns:
    logging.info("Few-shot: %d examples per novel class (%s).", n, novel_dir)
    try:
      row = _novel_row(novel, novel_dir, n, novel_classes, novel_steps, lcnn_init, last_layer, base_lcnn_dir,
                       base_cnn_dir, lcnn_prepare, cnn_prepare, novel_batch_size)
    except common.NotFinished:
      logging.warning("Few-shot n=%d in %s is not finished; left out.", n, novel_dir)
      continue
    rows.append(row)
  return rows, {name: {k: result[k] for k in ("top1", "top5", "speedup")} for name, result in bases.items()}


def _novel_row(novel, novel_dir, n, novel_classes, novel_steps, lcnn_init, last_layer, base_lcnn_dir, base_cnn_dir,
               lcnn_prepare, cnn_prepare, batch_size) -> dict[str, Any]:
  """The arms of one n: the table's row."""
  lcnn = common.run_point(
      novel_config(novel, novel_classes, n, novel_steps, cnn=False, base_workdir=base_lcnn_dir,
                   batch_size=batch_size),
      os.path.join(novel_dir, f"lcnn_n{n}" if lcnn_init == "dictionaries" else f"lcnn_{lcnn_init}_n{n}"),
      prepare=lcnn_prepare)
  cnn = common.run_point(
      novel_config(novel, novel_classes, n, novel_steps, cnn=True, base_workdir=base_cnn_dir,
                   batch_size=batch_size),
      os.path.join(novel_dir, f"cnn_n{n}"), prepare=cnn_prepare)
  row = {"n": n, "lcnn_top1": lcnn["top1"], "cnn_top1": cnn["top1"], "lcnn_top5": lcnn["top5"],
         "cnn_top5": cnn["top5"], "lcnn_speedup": lcnn["speedup"]}
  if last_layer:
    last = common.run_point(
        novel_config(novel, novel_classes, n, novel_steps, cnn=True, base_workdir=base_cnn_dir,
                     train_only=last_layer, batch_size=batch_size),
        os.path.join(novel_dir, f"cnn_last_n{n}"), prepare=cnn_prepare)
    row.update({"cnn_last_top1": last["top1"], "cnn_last_top5": last["top5"]})
  return row


def run_few_shot_seeds(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int], **kwargs: Any
                       ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[int, list[dict[str, Any]]]]:
  """:func:`run_few_shot` with the base runs trained once (with the config's seed) in ``workdir`` and the novel
  runs once per seed in ``WORKDIR/seed<S>``; returns the mean ± std rows (:func:`common.aggregate` by n), the
  base results and each seed's rows. Commands with different ``seeds`` share the base runs."""
  per_seed, bases = {}, {}
  for seed in seeds:
    rows, bases = run_few_shot(config, workdir, novel_workdir=common.seed_workdir(workdir, seed), novel_seed=seed,
                               **kwargs)
    if rows:  # none when --finished_only finds nothing of this seed
      per_seed[seed] = rows
  if not per_seed:
    raise ValueError(f"{workdir}: no finished few-shot run for seeds {list(seeds)}; run without --finished_only.")
  return common.aggregate(per_seed, "n", AGGREGATED), bases, per_seed


def _copy_all_but_classifier(source_workdir: str, model) -> None:
  common.copy_matching_weights(source_workdir, model)


LCNN_LABELS = {"dictionaries": "LCNN: base dictionaries, train I and C",
               "all": "LCNN: all base weights, train I and C"}


def plot_few_shot(rows: Sequence[dict[str, Any]], filename: str, title: str, lcnn_init: str = "dictionaries") -> None:
  """Novel-class top-1 against examples per class, LCNN and CNN."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  ns = [row["n"] for row in rows]
  arms = [("lcnn", "o-", LCNN_LABELS[lcnn_init]), ("cnn", "s--", "CNN: fine-tuned, whole net"),
          ("cnn_last", "^:", "CNN: fine-tuned, last layer only")]
  for arm, style, label in arms:
    if not all(f"{arm}_top1" in row for row in rows):
      continue
    mean = [100 * row[f"{arm}_top1"] for row in rows]
    if any(f"{arm}_top1_std" in row for row in rows):  # mean ± std over seeds
      ax.errorbar(ns, mean, yerr=[100 * row.get(f"{arm}_top1_std", 0.0) for row in rows], fmt=style, capsize=3,
                  label=f"{label} ({len(rows[0]['seeds'])} seeds)")
    else:
      ax.plot(ns, mean, style, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("training examples per novel class")
  ax.set_ylabel("novel-class top-1 accuracy (%)")
  common.save_figure(fig, [ax], filename, title=title)


def define_flags() -> types.SimpleNamespace:
  """The command's flags (defined only when it runs, so the experiment modules import side by side)."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run config of the base runs."),
      workdir=flags.DEFINE_string("workdir", None, "The experiment's directory (one subdirectory per run)."),
      print_config=flags.DEFINE_bool("print_config", False, common.PRINT_CONFIG_HELP),
      ns=flags.DEFINE_list("ns", ["1", "2", "4", "8", "16"], "Training examples per novel class."),
      base=flags.DEFINE_list("base_classes", ["0", "1", "2", "3", "4"], "Class indices learned first."),
      novel=flags.DEFINE_list("novel_classes", ["5", "6", "7", "8", "9"], "Class indices learned from few examples."),
      novel_steps=flags.DEFINE_integer("novel_steps", 60, "Training steps of each few-shot run."),
      novel_batch_size=flags.DEFINE_integer("novel_batch_size", 0, "Batch size of the few-shot runs (0: the "
                                            "config's train.batch_size, as the base runs)."),
      lcnn_init=flags.DEFINE_enum("lcnn_init", "dictionaries", LCNN_INITS,
                                  "What the few-shot LCNN takes from the base LCNN "
                                  "(dictionaries: the paper's setting)."),
      last_layer=flags.DEFINE_string("last_layer", "classifier",
                                     "Path of the CNN's classifier: also fine-tune only it (cnn_last_n<n>); "
                                     "'' leaves that arm out."),
      seeds=flags.DEFINE_list("seeds", [], "Seeds of the novel runs, e.g. 0,1,2,3,4 (each in WORKDIR/seed<S>; "
                              "the base runs use the config's), reported as mean ± std. Empty: the config's seed."),
      finished_only=flags.DEFINE_bool("finished_only", False, "Train nothing: report the finished runs only "
                                      "(an n whose arms are not all finished is left out)."))


def report(flag: types.SimpleNamespace) -> None:
  """Runs (or reads back) the experiment of the flags; writes and prints its table and plot."""
  workdir = flag.workdir.value
  config = flag.config.value
  kwargs = dict(ns=[int(n) for n in flag.ns.value], base_classes=[int(c) for c in flag.base.value],
                novel_classes=[int(c) for c in flag.novel.value], novel_steps=flag.novel_steps.value,
                lcnn_init=flag.lcnn_init.value, last_layer=flag.last_layer.value,
                novel_batch_size=flag.novel_batch_size.value)
  columns = list(COLUMNS)
  if flag.last_layer.value:
    columns.insert(3, "cnn_last_top1")
  extra = {"lcnn_init": flag.lcnn_init.value, "config": config.to_dict()}
  if flag.seeds.value:
    seeds = common.parse_seeds(flag.seeds.value)
    rows, bases, per_seed = run_few_shot_seeds(config, workdir, seeds, **kwargs)
    table = common.write_report(workdir, "few_shot", rows, ["n", "seeds", *columns[1:]],
                                {"base": bases, "seeds": seeds, "per_seed": {str(s): r for s, r in per_seed.items()},
                                 **extra},
                                table_rows=common.mean_std_rows(rows, AGGREGATED,
                                                                percent=[f for f in AGGREGATED if "top" in f]))
  else:
    rows, bases = run_few_shot(config, workdir, **kwargs)
    table = common.write_report(workdir, "few_shot", rows, columns, {"base": bases, **extra})
  plot_few_shot(rows, os.path.join(workdir, "few_shot.png"),
                f"{config.model.name} on {config.data.name}: few-shot learning of novel classes",
                flag.lcnn_init.value)
  print(f"Base classes: LCNN top-1 {bases['lcnn']['top1']:.4f} ({bases['lcnn']['speedup']:.1f}x fewer "
        f"multiplications), CNN top-1 {bases['cnn']['top1']:.4f}\n{table}")  # the command's output


if __name__ == "__main__":
  common.run(define_flags, report)
