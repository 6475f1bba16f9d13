"""The main job: ``python -m lcnn_jax.main --config configs/X.py --workdir DIR [--mode train|eval|benchmark]``.

``train`` (the default) trains and evaluates, resuming from the latest checkpoint in DIR when there is one;
``eval`` is the original's ``-testOnly`` (top-1/top-5 of the latest checkpoint, or ``--config.restore=PATH``);
``benchmark`` is the original's ``-benchmark`` (the per-layer multiplication table of the checkpoint).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file in configs/, e.g. configs/quickstart.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, config.json, metrics.jsonl and TensorBoard files go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "benchmark"], "What to do with the run.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (with --num_processes and --process_id); "
                    "unset, jax.distributed is initialised only where a cluster is detected (SLURM, TPU pods).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Starts jax.distributed when this is one of several processes; a no-op for a single process."""
  import jax
  if FLAGS.coordinator_address:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
  logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  initialize_distributed()
  from lcnn_jax import config as config_lib, train
  config = FLAGS.config
  config_lib.validate(config)
  if FLAGS.mode == "train":
    metrics = train.train_and_evaluate(config, FLAGS.workdir)
    report(FLAGS.workdir, metrics)
  elif FLAGS.mode == "eval":
    metrics = train.evaluate_checkpoint(config, FLAGS.workdir)
    print(json.dumps(metrics))
  else:
    from lcnn_jax import flops
    print(flops.checkpoint_report(config.restore or FLAGS.workdir))


def report(workdir: str, metrics: dict) -> None:
  """Prints the final evaluation and the per-layer multiplications with the speedup over the CNN baseline."""
  from lcnn_jax import flops
  print(f"eval top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  "
        f"({metrics['count']} images)")
  print(flops.checkpoint_report(workdir))


def run() -> None:
  """Entry point that turns user mistakes into one clear line instead of a traceback."""
  from lcnn_jax.checkpoint import CheckpointError
  from lcnn_jax.train import TrainingError
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, CheckpointError, TrainingError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
