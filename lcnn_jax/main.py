"""The main job: ``python -m lcnn_jax.main --config configs/X.py --workdir DIR [--mode train|eval|benchmark]``.

``train`` (the default) trains and evaluates, resuming from the latest checkpoint in DIR when there is one;
``eval`` is the original's ``-testOnly`` (top-1/top-5 of the latest checkpoint, or ``--config.restore=PATH``);
``benchmark`` is the original's ``-benchmark`` (the per-layer multiplication table of the checkpoint).
``--print_config`` prints the resolved config; docs/config.md explains every key. Ctrl-C or SIGTERM saves a
checkpoint and stops; the same command resumes. Logs show lcnn_jax's lines and warnings; ``--verbosity=0`` adds
every library's INFO lines, ``--verbosity=1`` debug lines.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
from absl import flags, logging
from ml_collections import config_flags

from lcnn_jax import checkpoint, cli, config as config_lib, data, inspection, train

USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError, train.TrainingError)  # exit 2, no traceback


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "A config file (configs/quickstart.py) or a preset's name "
                                  "(quickstart, alexnet:fast, ...: docs/config.md).", flag_values=flag_values,
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, config.json, metrics.jsonl and TensorBoard files go.",
                      flag_values=flag_values)
  flags.DEFINE_enum("mode", "train", ["train", "eval", "benchmark"], "What to do with the run.",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-process runs (with --num_processes and --process_id); "
                      "unset, jax.distributed is initialised only where a cluster is detected (SLURM, TPU pods).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", flag_values=flag_values)
  flags.DEFINE_bool("print_config", False, "Print the resolved config (the file with its --config.KEY=VALUE "
                    "overrides) and exit; needs no --workdir.", flag_values=flag_values)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts jax.distributed when this is one of several processes; a no-op for a single process."""
  if coordinator_address:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command on its parsed flags (``flag_values``): trains, evaluates or benchmarks; raises
  :class:`cli.UsageError` (or one of :data:`USER_ERRORS`) for a user mistake."""
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: options are --flag=value (see --help).")
  config, workdir, mode = flag_values.config, flag_values.workdir, flag_values.mode
  if flag_values.print_config:
    print(config)
    return
  if not workdir:
    raise cli.UsageError("--workdir is missing: pass the directory where the run's checkpoints and logs go "
                         "(created if new; an existing run there is resumed).")
  if mode != "train" and not config.restore and not os.path.isdir(workdir):
    raise cli.UsageError(f"--workdir {workdir} does not exist: --mode {mode} reads the checkpoints of a "
                         "training run; pass its --workdir (or --config.restore=RUN/checkpoints/STEP).")
  initialize_distributed(flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id)
  config_lib.validate(config)
  if mode != "train":  # a directory that is not a run is named before anything is computed or written there
    checkpoint.resolve_step_dir(config.restore or workdir)
  if config.data.dir and not data.get_source(config.data.name).reads_files:
    logging.warning("data.dir=%s is ignored: data.name=%s reads no files (data.dir is for %s).", config.data.dir,
                    config.data.name, ", ".join(data.source_names(lambda source: source.reads_files)))
  if mode == "train":
    with cli.no_empty_dir_left(workdir):
      cli.check_output_dir(workdir, "--workdir")
      metrics = train.train_and_evaluate(config, workdir)
    step = int(os.path.basename(checkpoint.resolve_step_dir(workdir)))  # the step the run ended at
    report(workdir, metrics | {"step": step})
  elif mode == "eval":
    metrics = train.evaluate_checkpoint(config, workdir)
    print(eval_line(metrics))
  else:
    print(inspection.checkpoint_report(config.restore or workdir))

def eval_line(metrics: dict) -> str:
  """The evaluation (``step``, ``top1``, ``top5``, ``loss``, ``count``) as the end of training and ``--mode eval``
  print it."""
  return (f"step {metrics['step']}: eval top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
          f"loss {metrics['loss']:.4f}  ({metrics['count']} images)")


def report(workdir: str, metrics: dict) -> None:
  """Prints the final evaluation and the per-layer multiplications with the speedup over the CNN baseline."""
  print(eval_line(metrics))
  print(inspection.checkpoint_report(workdir))


def run() -> None:
  """Entry point: user mistakes end in one paragraph with exit code 2, Ctrl-C/SIGTERM in a resumable stop."""
  define_flags()
  cli.run(main, user_errors=USER_ERRORS)


if __name__ == "__main__":
  run()
