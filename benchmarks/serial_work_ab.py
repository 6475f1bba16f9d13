"""A whole model timed under several values of the kernel's serial-work threshold, side by side in one process:
the work (multiply-adds, or bytes moved) below which a kernel call stays on its calling thread
(``kernels.set_serial_work``).

    python benchmarks/serial_work_ab.py [--model alexnet] [--preset fast] [--batch 1]
        [--values 2097152,262144,65536,16384,0] [--seconds 40] [--json results.json]

The model is built and tuned as ``python -m lcnn_jax.bench`` builds it (random weights at the paper's operating
point), once; each round then calls it once under each value in turn, the threshold set just before the call, so
that a slow spell of the machine falls on every value alike. The logits under each value are checked against the
first's. Prints a table and, with ``--json``, writes it with the machine it ran on.
"""
import argparse
import sys

from ab_common import add_model_arguments, bench_model, check_equal_logits, fail, print_changes, write_model_json


def parse_values(text: str) -> list[int]:
  """``--values``: distinct counts >= 0, in the order given."""
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    fail(f"--values {text!r}: expected comma-separated integers, e.g. 2097152,16384,0.")
  if len(values) < 2 or len(set(values)) != len(values) or min(values) < 0:
    fail(f"--values {text!r}: expected at least two distinct counts >= 0.")
  return values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_model_arguments(parser)
  parser.add_argument("--values", default="2097152,262144,65536,16384,0",
                      help="thresholds to compare (the first is the reference of the 'change' column)")
  args = parser.parse_args()
  values = parse_values(args.values)
  setup, images, described = bench_model(args)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lcnn_jax.inference import kernels, tuning  # pylint: disable=import-outside-toplevel

  default = kernels.set_serial_work()

  def call(value: int):
    kernels.set_serial_work(value)
    return jax.block_until_ready(setup.lcnn(images))

  try:
    check_equal_logits({f"threshold {v}": np.asarray(call(v)) for v in values})
    medians = tuning.interleaved_ms({str(v): lambda v=v: call(v) for v in values}, min_seconds=args.seconds,
                                    max_rounds=sys.maxsize)
  finally:
    kernels.set_serial_work(default)
  rows = print_changes("serial work <", medians, {str(default): "(default)"})
  for row in rows:
    row["serial_work"] = int(row.pop("variant"))
    row["default"] = row["serial_work"] == default
  write_model_json(args.json, described, args, setup, rows)


if __name__ == "__main__":
  main()
