"""Few-shot learning (paper §4.3): novel classes from n examples each, every arm starting from its base run.

    python -m lcnn_jax.experiments.few_shot --workdir runs/few_shot \\
        [--config configs/experiments/few_shot.py] [--ns 1,2,5,10,50] [--base_classes 0,1,2,3,4] \\
        [--novel_classes 5,6,7,8,9] [--seeds 0,1,2,3,4] [--base_seeds 0,1,2] \\
        [--learning_rates 0.003,0.01,0.03,0.1] [--novel_steps 25,50,100,200] [--tune_seeds 0,1]

1. **Base runs**, once per base seed B in ``WORKDIR/base<B>/``: ``base_lcnn`` and ``base_cnn`` learn the base
   classes from all their training images with the config's recipe (its sparsity, e.g. a target speedup, is the
   base LCNN's operating point). Their top-1 on the base classes is reported beside the arms.
2. **Novel runs**, for each base seed B, novel seed S and n, in ``WORKDIR/base<B>/seed<S>/<arm>_n<n>``: the
   novel classes from n training images of each, drawn at random with seed S (``data.examples_seed``; the same
   images for every arm and base seed, so arms compare paired), evaluated on every test image of the novel
   classes. Every arm starts from its base run's weights for every layer but the classifier (a new one, seeded
   by S):

   * ``lcnn-coefficients``: dictionaries frozen; coefficients P, the new classifier (and biases, BatchNorm)
     trained — the paper's setting;
   * ``lcnn-all``: everything trained;
   * ``cnn-whole``: the CNN fine-tuned whole;
   * ``cnn-last``: the CNN with only its classifier trained (``train.train_only``).

   The LCNN arms keep the base run's operating point: no target speedup in the novel phase, the sparsity rule
   and strength of ``--novel_rule``/``--novel_strength`` (default: the original's threshold rule at λ = 0, under
   which a zero of P has no gradient and stays zero, so the count can only fall), and the table states the count
   each arm ends at.
3. **Learning rate and steps, chosen per n on the base classes**, the same rule for every arm: the base classes
   split into pseudo-base (the first half) and pseudo-novel (the rest); ``WORKDIR/tune/`` holds the pseudo-base
   runs (first base seed) and, per n, arm, learning rate and tuning seed, a novel run on the pseudo-novel classes
   (n random images each) evaluated on their test images at every ``--novel_steps`` count (a constant learning
   rate, so the accuracy at step t is that of a t-step run). Each (n, arm) takes the (learning rate, steps) of the
   best mean top-1 over the tuning seeds (ties: fewer steps, then the smaller rate). The novel classes' test
   images are never seen before the final runs. One learning rate and one step count skip the tuning.

The report gives mean ± std over the (base seed, novel seed) pairs per arm and n, and the paired comparison:
per pair, each LCNN arm minus each CNN arm, mean ± std of those differences. Its first lines state the scale.
Every run is a resumable point under the workdir. Writes ``few_shot.json``, ``few_shot.md`` and ``few_shot.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from lcnn_jax import cli, config as config_lib, models
from lcnn_jax.experiments import common

DEFAULT_CONFIG = os.path.join(config_lib.preset_dir(), "experiments", "few_shot.py")
ARMS = {"lcnn-coefficients": "LCNN: base weights, dictionaries frozen, P and classifier trained",
        "lcnn-all": "LCNN: base weights, everything trained",
        "cnn-whole": "CNN: base weights, whole net trained",
        "cnn-last": "CNN: base weights, last layer trained"}
LCNN_ARMS = ("lcnn-coefficients", "lcnn-all")
CNN_ARMS = ("cnn-whole", "cnn-last")
NOVEL_RULES = config_lib.SPARSITY_RULES


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What the novel phase does, the same for every arm (the module docstring's steps 2 and 3)."""
  ns: tuple[int, ...] = (1, 2, 5, 10, 50)
  base_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
  novel_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # novel runs: classifier, batch order, and which n images
  base_seeds: tuple[int, ...] = (0, 1, 2)
  learning_rates: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)  # constant, chosen per n and arm
  steps: tuple[int, ...] = (25, 50, 100, 200)  # chosen per n and arm
  tune_seeds: tuple[int, ...] = (0, 1)
  batch_size: int = 0  # 0: the config's train.batch_size
  rule: str = "threshold"  # the novel LCNN's sparsity rule; no target speedup
  strength: float = 0.0  # the novel LCNN's λ
  classifier: str = "classifier"  # the classifier's parameter path: new in every arm, cnn-last trains it alone
  arms: tuple[str, ...] = tuple(ARMS)

  def check(self) -> None:
    """Raises ValueError naming the first setting that cannot make a few-shot experiment."""
    if set(self.base_classes) & set(self.novel_classes):
      raise ValueError(f"base classes {self.base_classes} and novel classes {self.novel_classes} overlap: "
                       "few-shot learning needs classes the base runs never saw.")
    if self.tuned and len(self.base_classes) < 2:
      raise ValueError(f"--base_classes={','.join(map(str, self.base_classes))}: choosing the learning rate and "
                       "steps needs at least 2 base classes (pseudo-base and pseudo-novel); give more, or one "
                       "--learning_rates and one --novel_steps value.")
    unknown = [arm for arm in self.arms if arm not in ARMS]
    if unknown or not self.arms:
      raise ValueError(f"--arms={','.join(self.arms)}: expected some of {', '.join(ARMS)}.")
    if self.rule not in NOVEL_RULES or self.strength < 0:
      raise ValueError(f"--novel_rule={self.rule!r}, --novel_strength={self.strength}: expected a rule of "
                       f"{NOVEL_RULES} and a strength >= 0.")
    if min(self.ns) <= 0 or min(self.steps) <= 0 or min(self.learning_rates) <= 0:
      raise ValueError(f"--ns={self.ns}, --novel_steps={self.steps}, --learning_rates={self.learning_rates}: "
                       "each must be > 0.")

  @property
  def tuned(self) -> bool:
    """Whether a (learning rate, steps) is chosen from more than one."""
    return len(self.learning_rates) * len(self.steps) > 1

  @property
  def tuning_classes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(pseudo-base, pseudo-novel): the first half of the base classes (rounded up) and the rest."""
    half = math.ceil(len(self.base_classes) / 2)
    return self.base_classes[:half], self.base_classes[half:]


# ------------------------------------------------------------------------------------------------ configs


def base_config(config: ml_collections.ConfigDict, classes: Sequence[int], cnn: bool) -> ml_collections.ConfigDict:
  """The run on the base classes: the LCNN of ``config`` or its CNN baseline."""
  overrides = {"data.classes": tuple(classes)}
  if cnn:
    overrides.update({"model.name": models.baseline_config(config.model).name, "sparsity.strength": 0.0,
                      "sparsity.target_speedup": 0.0, "sparsity.target_density": 0.0})
  return common.derive(config, **overrides)


def novel_config(config: ml_collections.ConfigDict, classes: Sequence[int], n: int, *, arm: str, seed: int,
                 learning_rate: float, steps: int, eval_every: int, protocol: Protocol) -> ml_collections.ConfigDict:
  """The run of ``arm`` on ``classes`` with n images each, drawn with ``seed`` (also the run's seed):
  ``steps`` steps at a constant ``learning_rate``, evaluated every ``eval_every`` and at the end."""
  cnn = arm in CNN_ARMS
  overrides = {"seed": seed, "data.examples_per_class": n, "data.examples_seed": seed, "train.num_steps": steps,
               "train.eval_every": eval_every, "train.log_every": max(1, min(config.train.log_every, eval_every)),
               "train.checkpoint_every": steps, "train.lr_schedule": "constant",
               "train.learning_rate": learning_rate, "train.warmup_steps": 0}
  if protocol.batch_size:
    overrides["train.batch_size"] = protocol.batch_size
  if not cnn:  # the base run's operating point, without steering
    overrides.update({"sparsity.rule": protocol.rule, "sparsity.strength": protocol.strength,
                      "sparsity.target_speedup": 0.0, "sparsity.target_density": 0.0,
                      "train.freeze_dictionaries": arm == "lcnn-coefficients"})
  if arm == "cnn-last":
    overrides["train.train_only"] = protocol.classifier
  return common.derive(base_config(config, classes, cnn), **overrides)


# ------------------------------------------------------------------------------------------------ runs


def run_bases(config: ml_collections.ConfigDict, directory: str, classes: Sequence[int],
              seed: int) -> dict[str, dict[str, Any]]:
  """The base LCNN and CNN on ``classes`` with ``seed``, in ``directory/base_lcnn`` and ``directory/base_cnn``."""
  config = common.with_seed(config, seed)
  return {model: common.run_point(base_config(config, classes, cnn=model == "cnn"),
                                  os.path.join(directory, f"base_{model}"))
          for model in ("lcnn", "cnn")}


def run_arm(config: ml_collections.ConfigDict, bases_dir: str, directory: str, classes: Sequence[int], n: int,
            arm: str, seed: int, learning_rate: float, steps: int, eval_every: int,
            protocol: Protocol) -> dict[str, Any]:
  """One novel run of ``arm`` in ``directory/<arm>_n<n>``, started from the base run in ``bases_dir``."""
  base = os.path.join(bases_dir, "base_cnn" if arm in CNN_ARMS else "base_lcnn")
  return common.run_point(
      novel_config(config, classes, n, arm=arm, seed=seed, learning_rate=learning_rate, steps=steps,
                   eval_every=eval_every, protocol=protocol),
      os.path.join(directory, f"{arm}_n{n}"),
      prepare=functools.partial(_copy_all_but_classifier, base, protocol.classifier))


def _copy_all_but_classifier(base_workdir: str, classifier: str, model) -> None:
  common.copy_matching_weights(base_workdir, model, exclude=(classifier,))


def choose_hyperparameters(config: ml_collections.ConfigDict, workdir: str,
                           protocol: Protocol) -> dict[int, dict[str, dict[str, Any]]]:
  """{n: {arm: {'learning_rate', 'steps', 'top1'}}}: per n and arm, the (learning rate, steps) of the best mean
  top-1 over the tuning seeds on the pseudo-novel classes (module docstring, step 3); ``top1`` None when there is
  nothing to choose. An n whose tuning runs are not all finished (``--finished_only``) is left out."""
  if not protocol.tuned:
    only = {"learning_rate": protocol.learning_rates[0], "steps": protocol.steps[0], "top1": None}
    return {n: {arm: dict(only) for arm in protocol.arms} for n in protocol.ns}
  pseudo_base, pseudo_novel = protocol.tuning_classes
  tune_dir = os.path.join(workdir, "tune")
  try:
    run_bases(config, tune_dir, pseudo_base, protocol.base_seeds[0])
  except common.NotFinished:
    logging.warning("Few-shot tuning: the pseudo-base runs are not finished; every n left out.")
    return {}
  longest, every = max(protocol.steps), math.gcd(*protocol.steps)
  chosen = {}
  for n in protocol.ns:
    try:
      chosen[n] = {arm: _best(config, tune_dir, pseudo_novel, n, arm, longest, every, protocol)
                   for arm in protocol.arms}
    except common.NotFinished:
      logging.warning("Few-shot tuning of n=%d is not finished; n=%d left out.", n, n)
  return chosen


def _best(config, tune_dir, classes, n, arm, longest, every, protocol) -> dict[str, Any]:
  """The best (learning rate, steps) of one n and arm on the pseudo-novel classes."""
  candidates = []
  for learning_rate in sorted(protocol.learning_rates):
    curves = [run_arm(config, tune_dir, os.path.join(tune_dir, f"seed{seed}", f"lr{learning_rate:g}"), classes, n,
                      arm, seed, learning_rate, longest, every, protocol)["curve"]
              for seed in protocol.tune_seeds]
    for steps in protocol.steps:
      top1 = [next(point["top1"] for point in curve if point["step"] == steps) for curve in curves]
      candidates.append((sum(top1) / len(top1), -steps, -learning_rate))
  top1, steps, learning_rate = max(candidates)
  return {"learning_rate": -learning_rate, "steps": -steps, "top1": top1}


def pair_name(base_seed: int, seed: int) -> str:
  """How a (base seed, novel seed) pair is named in the report: 'base0/seed3'."""
  return f"base{base_seed}/seed{seed}"


def run_few_shot(config: ml_collections.ConfigDict, workdir: str, protocol: Protocol) -> dict[str, Any]:
  """Trains (or reads back) the base runs, the tuning and every novel run; returns ``{'rows', 'per_pair',
  'bases', 'base_rows', 'chosen'}``: the mean ± std rows by n (:func:`common.aggregate` over the pairs, with
  each arm's ``<arm>_top1``, ``_top5``, ``_speedup`` and the paired ``<lcnn arm>_minus_<cnn arm>``), each
  pair's rows, the base results per base seed, their mean ± std by model, and the chosen hyperparameters."""
  protocol.check()
  os.makedirs(workdir, exist_ok=True)
  config = common.dataset_statistics(config, cache_dir=workdir)  # one normalisation for every subset
  bases = {}
  for base_seed in protocol.base_seeds:
    try:
      bases[base_seed] = run_bases(config, os.path.join(workdir, f"base{base_seed}"), protocol.base_classes,
                                   base_seed)
    except common.NotFinished:
      logging.warning("Few-shot base runs of base seed %d are not finished; left out.", base_seed)
  chosen = choose_hyperparameters(config, workdir, protocol)
  per_pair = {}
  for base_seed in bases:
    bases_dir = os.path.join(workdir, f"base{base_seed}")
    for seed in protocol.seeds:
      rows = []
      for n in (n for n in protocol.ns if n in chosen):
        try:
          results = {arm: run_arm(config, bases_dir, common.seed_workdir(bases_dir, seed), protocol.novel_classes,
                                  n, arm, seed, chosen[n][arm]["learning_rate"], chosen[n][arm]["steps"],
                                  chosen[n][arm]["steps"], protocol)
                     for arm in protocol.arms}
        except common.NotFinished:
          logging.warning("Few-shot n=%d of %s is not finished; left out.", n, pair_name(base_seed, seed))
          continue
        rows.append(_pair_row(n, results))
      if rows:
        per_pair[pair_name(base_seed, seed)] = rows
  if not per_pair:
    raise ValueError(f"{workdir}: no finished few-shot run for base seeds {list(protocol.base_seeds)} and seeds "
                     f"{list(protocol.seeds)}; run without --finished_only.")
  fields = [field for field in dict.fromkeys(k for rows in per_pair.values() for row in rows for k in row)
            if field != "n"]
  base_rows = common.aggregate({seed: [{"model": model, **{k: result[k] for k in ("top1", "speedup")}}
                                       for model, result in models_.items()] for seed, models_ in bases.items()},
                               "model", ("top1", "speedup"))
  return {"rows": common.aggregate(per_pair, "n", fields), "per_pair": per_pair,
          "bases": {seed: {model: {k: result[k] for k in ("top1", "top5", "speedup", "multiplications")}
                           for model, result in models_.items()} for seed, models_ in bases.items()},
          "base_rows": base_rows, "chosen": chosen}


def _pair_row(n: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """One pair's row of one n: each arm's top-1, top-5 and counted speedup, and each LCNN arm − CNN arm."""
  row = {"n": n}
  for arm, result in results.items():
    row.update({f"{arm}_top1": result["top1"], f"{arm}_top5": result["top5"], f"{arm}_speedup": result["speedup"]})
  for lcnn in (arm for arm in LCNN_ARMS if arm in results):
    for cnn in (arm for arm in CNN_ARMS if arm in results):
      row[f"{lcnn}_minus_{cnn}"] = results[lcnn]["top1"] - results[cnn]["top1"]
  return row


# ------------------------------------------------------------------------------------------------ report


def scale_lines(config: ml_collections.ConfigDict, workdir: str, protocol: Protocol, pairs: int) -> list[str]:
  """The report's first lines: the base runs' scale, the novel runs', the seeds and the novel-phase sparsity."""
  base = common.run_scale(base_config(config, protocol.base_classes, cnn=False), workdir)
  batch = protocol.batch_size or config.train.batch_size
  pseudo_base, pseudo_novel = protocol.tuning_classes
  rates = ", ".join(f"{rate:g}" for rate in protocol.learning_rates)
  steps = ", ".join(map(str, protocol.steps))
  tuning = (f"learning rate and steps chosen per n and arm from {{{rates}}} × {{{steps}}}"
            f" on base classes {list(pseudo_novel)} as pseudo-novel (pseudo-base {list(pseudo_base)}), tuning seeds "
            f"{list(protocol.tune_seeds)}" if protocol.tuned else
            f"learning rate {rates} and {protocol.steps[0]} steps for every n (no tuning)")
  return [common.describe_scale(f"Base runs (classes {list(protocol.base_classes)})", base) + ".",
          f"Novel runs (classes {list(protocol.novel_classes)}): n ∈ {{{', '.join(map(str, protocol.ns))}}} "
          f"images per class drawn at random per seed, batch {batch}, constant {tuning}.",
          f"Seeds: {len(protocol.seeds)} novel × {len(protocol.base_seeds)} base ({pairs} pair"
          f"{'s' if pairs != 1 else ''} finished).",
          f"Novel-phase sparsity of the LCNN arms: rule {protocol.rule}, strength {protocol.strength:g}, no target "
          "speedup (the base run's operating point; the speedup each arm ends at is in the last table)."]


def few_shot_report(config: ml_collections.ConfigDict, workdir: str,
                    protocol: Protocol) -> tuple[str, dict[str, Any]]:
  """Runs (or reads back) the experiment; writes ``few_shot.json`` and ``few_shot.md`` and returns the markdown
  and :func:`run_few_shot`'s result."""
  os.makedirs(workdir, exist_ok=True)
  config = common.dataset_statistics(config, cache_dir=workdir)  # one normalisation for every subset
  result = run_few_shot(config, workdir, protocol)
  rows, arms = result["rows"], list(protocol.arms)
  accuracy = [f"{arm}_top1" for arm in arms]
  differences = [f"{lcnn}_minus_{cnn}" for lcnn in LCNN_ARMS for cnn in CNN_ARMS if lcnn in arms and cnn in arms]
  speedups = [f"{arm}_speedup" for arm in arms if arm in LCNN_ARMS]
  cells = common.mean_std_rows(rows, accuracy + differences + speedups, percent=accuracy + differences)
  label = lambda field: field.replace("_top1", "").replace("_minus_", " − ").replace("_speedup", " speedup")
  relabelled = [{"n": row["n"], "pairs": row["seeds"],
                 **{label(k): row[k] for k in row if k in accuracy + differences + speedups}} for row in cells]
  for row in relabelled:
    for arm in arms:
      chosen = result["chosen"][row["n"]][arm]
      row[f"{arm} lr / steps"] = f"{chosen['learning_rate']:g} / {chosen['steps']}"
  base_cells = common.mean_std_rows(result["base_rows"], ("top1", "speedup"), percent=("top1",))
  lines = scale_lines(config, workdir, protocol, len(result["per_pair"])) + [
      "", "Base runs on the base classes (top-1 in %, mean ± std over base seeds; counted speedup over the CNN):", "",
      common.markdown_table(base_cells, ("model", "seeds", "top1", "speedup")),
      "Novel classes, top-1 in % (mean ± std over the (base seed, novel seed) pairs):", "",
      common.markdown_table(relabelled, ["n", "pairs", *map(label, accuracy)])]
  if differences:
    lines += ["Paired per (base seed, novel seed): LCNN arm − CNN arm, top-1 points (mean ± std of the "
              "differences):", "", common.markdown_table(relabelled, ["n", "pairs", *map(label, differences)])]
  lines += ["Counted speedup the LCNN arms end at, and the learning rate / steps chosen for each arm:", "",
            common.markdown_table(relabelled, ["n", *map(label, speedups), *(f"{arm} lr / steps" for arm in arms)])]
  markdown = "\n".join(lines)
  common.write_report(workdir, "few_shot", {
      "protocol": dataclasses.asdict(protocol), "scale": lines[:4], "rows": rows, "per_pair": result["per_pair"],
      "bases": {str(seed): value for seed, value in result["bases"].items()}, "base_rows": result["base_rows"],
      "chosen": {str(n): value for n, value in result["chosen"].items()}, "config": config.to_dict()}, markdown)
  return markdown, result


def plot_few_shot(rows: Sequence[dict[str, Any]], filename: str, title: str,
                  arms: Sequence[str] = tuple(ARMS)) -> None:
  """Novel-class top-1 against examples per class, one line per arm, mean ± std over the pairs."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ns = [row["n"] for row in rows]
  styles = {"lcnn-coefficients": "o-", "lcnn-all": "D-", "cnn-whole": "s--", "cnn-last": "^:"}
  for arm in arms:
    if not all(f"{arm}_top1" in row for row in rows):
      continue
    ax.errorbar(ns, [100 * row[f"{arm}_top1"] for row in rows],
                yerr=[100 * row.get(f"{arm}_top1_std", 0.0) for row in rows], fmt=styles[arm], capsize=3,
                label=f"{ARMS[arm]} ({max(len(row.get('seeds', ())) for row in rows) or 1} pairs)")
  ax.set_xscale("log")
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("training examples per novel class")
  ax.set_ylabel("novel-class top-1 accuracy (%)")
  common.save_figure(fig, [ax], filename, title=title)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so the experiment modules import
  side by side."""
  default = Protocol()
  listed = lambda values: [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run config of the base runs.",
                                  flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The experiment's directory (one subdirectory per run).",
                      flag_values=flag_values)
  flags.DEFINE_bool("print_config", False, common.PRINT_CONFIG_HELP, flag_values=flag_values)
  flags.DEFINE_list("ns", listed(default.ns), "Training examples per novel class.", flag_values=flag_values)
  flags.DEFINE_list("base_classes", listed(default.base_classes), "Class indices learned first.",
                    flag_values=flag_values)
  flags.DEFINE_list("novel_classes", listed(default.novel_classes), "Class indices learned from few examples.",
                    flag_values=flag_values)
  flags.DEFINE_list("seeds", listed(default.seeds), "Seeds of the novel runs: each draws its own n images per class "
                    "and seeds the new classifier and the batch order.", flag_values=flag_values)
  flags.DEFINE_list("base_seeds", listed(default.base_seeds), "Seeds of the base runs (each in WORKDIR/base<B>); "
                    "every novel seed runs from each. At least 3 at full scale; a reduced run may pass one.",
                    flag_values=flag_values)
  flags.DEFINE_list("learning_rates", listed(default.learning_rates),
                    "Constant learning rates the tuning chooses from, per n and arm.", flag_values=flag_values)
  flags.DEFINE_list("novel_steps", listed(default.steps), "Step counts the tuning chooses from, per n and arm (one "
                    "value and one learning rate: no tuning).", flag_values=flag_values)
  flags.DEFINE_list("tune_seeds", listed(default.tune_seeds),
                    "Seeds of the tuning runs on the pseudo-novel base classes.", flag_values=flag_values)
  flags.DEFINE_integer("novel_batch_size", 0, "Batch size of the novel runs (0: the config's train.batch_size, as "
                       "the base runs).", flag_values=flag_values)
  flags.DEFINE_enum("novel_rule", default.rule, NOVEL_RULES,
                    "Sparsity rule of the novel LCNN runs (threshold: a zero of P stays zero).",
                    flag_values=flag_values)
  flags.DEFINE_float("novel_strength", default.strength,
                     "Sparsity strength λ of the novel LCNN runs (no target speedup).", flag_values=flag_values)
  flags.DEFINE_string("classifier", default.classifier, "Parameter path of the classifier: new in every arm, the "
                      "only layer cnn-last trains (ResNet: fc; AlexNet: fc8).", flag_values=flag_values)
  flags.DEFINE_list("arms", list(ARMS), f"The arms to run, some of {', '.join(ARMS)}.", flag_values=flag_values)
  flags.DEFINE_bool("finished_only", False, "Train nothing: report the finished runs only (an n whose arms are not "
                    "all finished is left out).", flag_values=flag_values)


def protocol_from_flags(flag_values: flags.FlagValues) -> Protocol:
  """The :class:`Protocol` of the command's parsed flags."""
  integers = lambda name: tuple(int(v) for v in flag_values[name].value)
  return Protocol(ns=integers("ns"), base_classes=integers("base_classes"),
                  novel_classes=integers("novel_classes"), seeds=tuple(common.parse_seeds(flag_values.seeds)),
                  base_seeds=tuple(common.parse_seeds(flag_values.base_seeds, "--base_seeds")),
                  learning_rates=tuple(float(v) for v in flag_values.learning_rates), steps=integers("novel_steps"),
                  tune_seeds=tuple(common.parse_seeds(flag_values.tune_seeds, "--tune_seeds")),
                  batch_size=flag_values.novel_batch_size, rule=flag_values.novel_rule,
                  strength=flag_values.novel_strength, classifier=flag_values.classifier,
                  arms=tuple(flag_values.arms))


def report(flag_values: flags.FlagValues) -> None:
  """Runs (or reads back) the experiment of the parsed flags; writes and prints its tables and plot."""
  config, workdir, protocol = flag_values.config, flag_values.workdir, protocol_from_flags(flag_values)
  markdown, result = few_shot_report(config, workdir, protocol)
  plot_few_shot(result["rows"], os.path.join(workdir, "few_shot.png"),
                f"{config.model.name} on {config.data.name}: few-shot learning of novel classes", protocol.arms)
  print(markdown)  # the command's output


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``python -m lcnn_jax.experiments.few_shot`` on its parsed flags (``flag_values``)."""
  common.main(argv, flag_values, report)


if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=common.USER_ERRORS)
