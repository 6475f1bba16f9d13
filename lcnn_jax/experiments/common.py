"""What the experiments share: resumable points, starting a run from chosen weights, tables and plots.

An experiment is a set of *points*, each an ordinary training run (``train.train_and_evaluate``) in its own
subdirectory of the experiment's workdir. A finished point leaves ``result.json`` beside its checkpoints; a rerun
reads it and skips the point, and an unfinished one resumes from its latest checkpoint.

A run that must start from weights the trainer cannot load itself (a CNN fine-tuned from another run, an LCNN
whose dictionaries come from a shallower net) gives the trainer a ``prepare`` hook: :func:`lcnn_jax.train.init_run`,
the one place a run starts, applies it to the freshly built model and saves that start as step 0, from which the
run resumes as from any checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from flax import nnx

from lcnn_jax import checkpoint, cli, config as config_lib, data, logger, sparsity, train

RESULT_FILE = "result.json"
CLASSIFIERS = ("classifier", "fc", "fc8")  # The last layer of the digits nets, ResNet and AlexNet.


class ExperimentError(RuntimeError):
  """An experiment cannot go on as asked; the message says why and what to do."""


USER_ERRORS = (ValueError, FileNotFoundError, ExperimentError)  # an experiment command's: exit 2, no traceback


class NotFinished(ExperimentError):
  """Under :func:`finished_only`, a point that has no result yet."""


_FINISHED_ONLY = contextvars.ContextVar("finished_only", default=False)


@contextlib.contextmanager
def finished_only():
  """Inside, :func:`run_point` trains nothing: it reads finished points back and raises :class:`NotFinished`
  for the others, which the experiments leave out of their tables (``--finished_only``: a report of what an
  interrupted experiment has so far)."""
  token = _FINISHED_ONLY.set(True)
  try:
    yield
  finally:
    _FINISHED_ONLY.reset(token)


# ------------------------------------------------------------------------------------------------ configs


PRINT_CONFIG_HELP = ("Print the resolved config every run starts from (the --config file with its "
                     "--config.KEY=VALUE overrides) and exit; needs no --workdir.")


def main(argv: Sequence[str], flag_values: flags.FlagValues, report: Callable[[flags.FlagValues], None]) -> None:
  """An experiment command on its parsed flags (``flag_values``) and command line: prints the config for
  ``--print_config``; otherwise checks that there are no stray arguments and that ``--workdir`` is given and
  writable (:class:`cli.UsageError` if not), then runs ``report(flag_values)`` (under :func:`finished_only` for
  ``--finished_only``)."""
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {list(argv[1:])}: options are --flag=value (see --help).")
  if flag_values.print_config:
    print(flag_values.config)
    return
  if not flag_values.workdir:
    raise cli.UsageError("--workdir is missing: pass the experiment's directory (created if new; the finished runs "
                         "there are reused).")
  cli.check_output_dir(flag_values.workdir, "--workdir")
  with finished_only() if flag_values.finished_only else contextlib.nullcontext():
    report(flag_values)


def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file or preset (``configs/quickstart.py``, ``experiments/spectrum``)."""
  return config_lib.load(path)


def derive(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted-key overrides: ``derive(c, **{'model.dictionary.convs': 4})``."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, key = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    with node.ignore_type():
      node[key] = value
  return config


def dataset_statistics(config: ml_collections.ConfigDict, cache_dir: str) -> ml_collections.ConfigDict:
  """``config`` with ``data.mean``/``data.std`` fixed to those of the whole training split, so that runs on
  subsets of it (few-shot) normalise their images exactly as the run they start from."""
  if config.data.mean is not None:
    return config
  whole = derive(config, **{"data.classes": None, "data.examples_per_class": 0})
  info = data.dataset_info(whole.data, cache_dir=cache_dir)
  return derive(config, **{"data.mean": tuple(info.mean), "data.std": tuple(info.std)})


# ------------------------------------------------------------------------------------------------ points


def read_result(workdir: str) -> dict[str, Any] | None:
  """The result of a finished point, or None."""
  path = os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, default=list)
  os.replace(path + ".tmp", path)  # never a half-written file


def run_point(config: ml_collections.ConfigDict, workdir: str, *,
              prepare: train.Prepare | None = None,
              wrap_optimizer: train.OptimizerWrapper | None = None,
              setup: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains one point (or resumes it) and returns its result; a finished point is read back, not retrained.

  Args:
    config: the run's full config.
    workdir: the point's own directory.
    prepare: when given, changes a freshly built model before step 0 (see :func:`lcnn_jax.train.init_run`);
      ignored when the point already has a checkpoint.
    wrap_optimizer: wraps the run's update (:func:`lcnn_jax.train.init_run`), e.g. magnitude pruning.
    setup: what ``wrap_optimizer`` does that the config does not say (JSON values, e.g. the pruning budget):
      kept in the result and compared, as the config is, when the point is read back.
  Returns:
    ``{'top1', 'top5', 'loss', 'density', 'multiplications', 'baseline_multiplications', 'speedup', 'steps',
    'curve', 'config', 'setup'}`` (``density``: the mean density of P at the last logged step, 1 for a CNN),
    ``curve`` being the point's eval rows ``[{'step', 'top1', 'top5', 'loss'}, ...]``.
  Raises:
    ExperimentError: ``workdir`` holds a finished point of another config or setup.
    NotFinished: under :func:`finished_only`, ``workdir`` has no finished run.
  """
  config_dict = json.loads(json.dumps(config.to_dict(), default=list))
  setup = json.loads(json.dumps(setup)) if setup is not None else None
  done = read_result(workdir)
  if done is not None:
    saved = config_lib.from_dict(done["config"], source=os.path.join(workdir, RESULT_FILE))  # in today's keys
    if json.loads(json.dumps(saved.to_dict(), default=list)) != config_dict or done.get("setup") != setup:
      raise ExperimentError(
          f"{workdir} holds a finished point trained with another config (or setup); move it away (or pass another "
          "--workdir) to run this one.")
    logging.info("Point %s is finished (top-1 %.4f); skipping it.", workdir, done["top1"])
    return done
  if _FINISHED_ONLY.get():
    raise NotFinished(f"{workdir} has no finished run.")
  metrics = train.train_and_evaluate(config, workdir, prepare=prepare, wrap_optimizer=wrap_optimizer)
  rows = logger.read_metrics(workdir)
  evals = [row for row in rows if row["split"] == "eval"]
  trains = [row for row in rows if row["split"] == "train"]
  last = evals[-1]
  result = {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            "density": trains[-1]["density"] if trains else None,
            "multiplications": last["multiplications"], "baseline_multiplications": last["baseline_multiplications"],
            "speedup": last["speedup"], "steps": last["step"],
            "curve": [{k: row[k] for k in ("step", "top1", "top5", "loss")} for row in evals],
            "config": config_dict, "setup": setup}
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, RESULT_FILE), result)
  return result


# ------------------------------------------------------------------------------------------------ weights


def _natural_key(path: str) -> list:
  """'layer2/1/conv10' sorts after 'layer2/1/conv9'."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def copy_matching_weights(source_workdir: str, model: nnx.Module, *,
                          exclude: Sequence[str] = CLASSIFIERS) -> list[str]:
  """Copies the parameters and BatchNorm statistics of ``source_workdir``'s latest checkpoint into ``model``
  wherever path and shape agree, except under the ``exclude`` path prefixes (by default the classifiers of the
  built-in models, whose classes differ); returns the copied paths. "Fine-tuning the usual way" starts here."""
  source, _, _ = checkpoint.restore_model(source_workdir)
  kinds = (nnx.Param, nnx.BatchStat)
  saved = {sparsity.path_string(kp): np.asarray(leaf)
           for kp, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(source, kinds)))[0]}
  state = nnx.state(model, kinds)
  pure = nnx.to_pure_dict(state)
  copied = []

  def take(keypath, leaf):
    path = sparsity.path_string(keypath)
    if any(path == p or path.startswith(p + "/") for p in exclude):
      return leaf
    if path in saved and saved[path].shape == leaf.shape:
      copied.append(path)
      return jnp.asarray(saved[path], leaf.dtype)
    return leaf

  pure = jax.tree_util.tree_map_with_path(take, pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  if not copied:
    raise ExperimentError(f"No parameter of the model has a counterpart of the same shape in {source_workdir}.")
  logging.info("Copied %d parameters and statistics from %s.", len(copied), source_workdir)
  return copied


def map_dictionaries(source: nnx.Module, target: nnx.Module) -> dict[str, str]:
  """Which dictionary of ``source`` each lookup layer of ``target`` takes: the layer of the same path when its
  dictionary has the same shape, else the nearest earlier (in natural path order) source layer whose dictionary
  has that shape — in a deeper net made by repeating layers, the layer it repeats —, else the first one.

  Returns {target layer path: source layer path}; raises ExperimentError naming a target layer whose dictionary
  shape no source layer has.
  """
  sources = sorted(sparsity.lookup_layers(source), key=lambda item: _natural_key(item[0]))
  mapping = {}
  for path, layer in sparsity.lookup_layers(target):
    shape = layer.dictionary.shape
    same = [p for p, m in sources if m.dictionary.shape == shape]
    if not same:
      raise ExperimentError(
          f"Lookup layer {path} has a dictionary of shape {shape}, and no layer of the source net has one of that "
          f"shape ({sorted({tuple(m.dictionary.shape) for _, m in sources})}): give the shallow net a layer of "
          "each input width and dictionary size the deep net uses.")
    earlier = [p for p in same if _natural_key(p) <= _natural_key(path)]
    mapping[path] = path if path in same else (earlier[-1] if earlier else same[0])
  return mapping


def transfer_mapped_dictionaries(source_workdir: str, model: nnx.Module) -> dict[str, str]:
  """Copies into every lookup layer of ``model`` the dictionary :func:`map_dictionaries` picks from the latest
  checkpoint of ``source_workdir``; returns the mapping."""
  source, _, _ = checkpoint.restore_model(source_workdir)
  modules = dict(sparsity.lookup_layers(source))
  mapping = map_dictionaries(source, model)
  for path, layer in sparsity.lookup_layers(model):
    layer.dictionary[...] = modules[mapping[path]].dictionary[...]
  logging.info("Dictionaries from %s: %s", source_workdir, mapping)
  return mapping


# ------------------------------------------------------------------------------------------------ seeds


def parse_seeds(values: Sequence[str], flag: str = "--seeds") -> list[int]:
  """``--seeds 0,1,2`` (or another ``flag``'s list) as distinct integers; raises ValueError naming a bad or
  repeated value."""
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"{flag}={','.join(values)}: expected comma-separated integers, e.g. {flag} 0,1,2.") from None
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"{flag}={','.join(values)}: a seed is repeated; each seed must appear once.")
  if not seeds:
    raise ValueError(f"{flag} is empty: pass at least one seed, e.g. {flag} 0.")
  return seeds


def seed_workdir(workdir: str, seed: int) -> str:
  """Where one seed's runs of a multi-seed experiment live: ``WORKDIR/seed<S>``."""
  return os.path.join(workdir, f"seed{seed}")


def with_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """``config`` with ``seed`` (initialisation, batch order, dropout) set to ``seed``."""
  return derive(config, seed=seed)


def aggregate(rows_by_seed: dict[int, Sequence[dict[str, Any]]], key: str,
              fields: Sequence[str]) -> list[dict[str, Any]]:
  """One row per value of ``key`` over the seeds' rows, in first-seen order: each of ``fields`` that is a
  number in every seed's row becomes its mean, with ``<field>_std`` (the sample standard deviation, ddof = 1;
  0 for one seed) and ``<field>_seeds`` (the per-seed values, in seed order); other values are taken from the
  first seed's row. ``seeds`` lists the seeds the row has (a point skipped for one seed has fewer)."""
  order, groups = [], {}
  for seed, rows in rows_by_seed.items():
    for row in rows:
      if row[key] not in groups:
        order.append(row[key])
        groups[row[key]] = []
      groups[row[key]].append((seed, row))
  out = []
  for value in order:
    seeds = [seed for seed, _ in groups[value]]
    merged = dict(groups[value][0][1])
    merged["seeds"] = seeds
    for field in fields:
      values = [row.get(field) for _, row in groups[value]]
      if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        continue
      array = np.asarray(values, np.float64)
      merged[field] = float(array.mean())
      merged[f"{field}_std"] = float(array.std(ddof=1)) if len(array) > 1 else 0.0
      merged[f"{field}_seeds"] = [float(v) for v in array]
    out.append(merged)
  return out


def mean_std_rows(rows: Sequence[dict[str, Any]], fields: Sequence[str], *, percent: Sequence[str] = ()) -> list[
    dict[str, Any]]:
  """Copies of :func:`aggregate`'s rows for a markdown table: each of ``fields`` with a ``_std`` becomes the
  text 'mean ± std' (in percent, 2 decimals, for the ``percent`` fields; else 3 significant digits), the mean
  alone where one seed gave it."""
  out = []
  for row in rows:
    cells = dict(row)
    for field in fields:
      if f"{field}_std" not in row:
        continue
      mean, std = row[field], row[f"{field}_std"]
      spread = len(row.get(f"{field}_seeds", ())) > 1  # one seed: the value alone, no spread to show
      cells[field] = (f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if spread else "") if field in percent
                      else f"{mean:.3g}" + (f" ± {std:.2g}" if spread else ""))
    if "seeds" in row:
      cells["seeds"] = len(row["seeds"])
    out.append(cells)
  return out


# ------------------------------------------------------------------------------------------------ reports


def format_cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A GitHub markdown table of ``rows`` (dicts) with ``columns`` in that order."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(format_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def report_settings(config: ml_collections.ConfigDict, **flags_of_the_report: Any) -> dict[str, Any]:
  """What makes two reports' seeds comparable (the run config and the command's own settings), as JSON reads them
  back: a report stores it under ``settings``, and :func:`read_earlier_reports` compares it."""
  return json.loads(json.dumps({"config": config.to_dict(), **flags_of_the_report}, default=list))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'config': {'train': {'epochs': 4}}} -> {'config.train.epochs': 4}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def read_earlier_reports(paths: Sequence[str], settings: dict[str, Any]) -> dict[int, Any]:
  """Each seed's results (the report's ``per_seed`` entry) from earlier reports (``<command>.json``) of the same
  experiment, e.g. seeds run on another machine or in an earlier time-boxed session. ``settings``:
  :func:`report_settings` of this run. Raises ValueError naming a file that cannot be read, is no such report,
  was run with other settings, or repeats a seed."""
  per_seed: dict[int, Any] = {}
  for path in paths:
    try:
      with open(path) as f:
        payload = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"--earlier_reports: cannot read {path} ({e}); give the .json report of an earlier run of "
                       "this command.") from None
    if not isinstance(payload, dict) or "per_seed" not in payload or "settings" not in payload:
      raise ValueError(f"--earlier_reports: {path} is not a report of this command with its settings (no "
                       "'per_seed' and 'settings').")
    if payload["settings"] != settings:
      ours, theirs = _flatten(settings), _flatten(payload["settings"])
      differing = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
      raise ValueError(f"--earlier_reports: {path} was run with other settings ({', '.join(differing)} differ); "
                       "only seeds of the same config and flags can be reported together.")
    for seed, result in payload["per_seed"].items():
      if int(seed) in per_seed:
        raise ValueError(f"--earlier_reports: seed {seed} appears in more than one report; give each seed once.")
      per_seed[int(seed)] = result
  return per_seed


EARLIER_REPORTS_HELP = ("Reports (<command>.json) of earlier runs of this command with the same config and flags "
                        "(seeds run on another machine or in an earlier session): their seeds join the report and "
                        "are not run again.")


def write_report(workdir: str, name: str, payload: dict[str, Any], markdown: str) -> str:
  """Writes ``name.json`` (``payload``: every number) and ``name.md`` (``markdown``: the scale and the tables)
  in ``workdir``; returns the markdown."""
  _write_json(os.path.join(workdir, f"{name}.json"), payload)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(markdown)
  return markdown


# ------------------------------------------------------------------------------------------------ scale


def run_scale(config: ml_collections.ConfigDict, cache_dir: str) -> dict[str, Any]:
  """What one run of ``config`` trains on: ``{'scale', 'train_images', 'steps', 'batch_size', 'passes'}``.

  ``scale`` is 'full' when the run reads every training image of its classes (``data.examples_per_class`` 0) for
  the config's schedule in epochs (``train.num_steps`` 0), else 'reduced' (a CI-sized or time-boxed cut)."""
  info = data.dataset_info(config.data, cache_dir=cache_dir)
  steps = train.make_plan(config, info).total_steps
  full = not config.data.examples_per_class and not config.train.num_steps
  return {"scale": "full" if full else "reduced", "train_images": info.num_train, "steps": steps,
          "batch_size": config.train.batch_size, "passes": steps * config.train.batch_size / info.num_train}


def describe_scale(what: str, scale: dict[str, Any]) -> str:
  """One line of a report: '<what>: full scale, 30,000 training images, 2,808 steps of batch 128 (12.0 passes)'."""
  return (f"{what}: {scale['scale']} scale, {scale['train_images']:,} training images, {scale['steps']:,} steps "
          f"of batch {scale['batch_size']} ({scale['passes']:.1f} passes)")


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only, no display)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


def save_figure(fig, axes: Sequence, filename: str, *, title: str | None = None, suptitle: str | None = None) -> None:
  """Grids and legends on ``axes``, the title, then writes ``filename`` and frees the figure."""
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    axes[0].set_title(title)
  if suptitle:
    fig.suptitle(suptitle)
  fig.tight_layout()
  fig.savefig(filename, dpi=120)
  pyplot().close(fig)
