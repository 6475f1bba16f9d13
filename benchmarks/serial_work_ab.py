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
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def fail(message: str) -> None:
  """One error paragraph on stderr, exit code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


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
  parser.add_argument("--model", default="alexnet", choices=("alexnet", "resnet18"))
  parser.add_argument("--preset", default="fast", choices=("fast", "accurate"))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--values", default="2097152,262144,65536,16384,0",
                      help="thresholds to compare (the first is the reference of the 'change' column)")
  parser.add_argument("--seconds", type=float, default=40.0, help="time budget of the timed rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="write the table here as JSON")
  args = parser.parse_args()
  values = parse_values(args.values)
  if args.batch < 1 or args.seconds <= 0:
    fail(f"--batch {args.batch} / --seconds {args.seconds}: expected a batch >= 1 and a positive time.")

  import jax  # pylint: disable=import-outside-toplevel
  from lcnn_jax import bench  # pylint: disable=import-outside-toplevel
  from lcnn_jax.inference import kernels, machine  # pylint: disable=import-outside-toplevel

  described = machine.describe()
  print(described.line(), flush=True)
  try:
    default = kernels.set_serial_work()
  except kernels.KernelUnavailable as error:
    fail(f"the lookup kernel is not available here: {error}")
  print(f"Building and tuning {args.model} {args.preset} at batch {args.batch} (threshold {default}) ...", flush=True)
  setup = bench.build(args.model, args.preset, args.batch, None, args.seed)
  model = setup.lcnn
  print(f"backends: {model.backends}; one call: {model.chain is not None}", flush=True)
  images = jax.numpy.asarray(np.random.default_rng(args.seed).standard_normal(
      (args.batch, *model.input_shape), np.float32))

  def call(value: int):
    kernels.set_serial_work(value)
    return np.asarray(jax.block_until_ready(model(images)))

  reference = call(values[0])
  for value in values[1:]:
    logits = call(value)
    if not np.allclose(logits, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max())):
      fail(f"the logits under threshold {value} differ from those under {values[0]} by "
           f"{float(np.abs(logits - reference).max()):.3g}.")
  times = {value: [] for value in values}
  start = time.perf_counter()
  try:
    while time.perf_counter() - start < args.seconds or len(times[values[-1]]) < 5:
      for value in values:
        kernels.set_serial_work(value)
        begin = time.perf_counter()
        jax.block_until_ready(model(images))
        times[value].append(time.perf_counter() - begin)
  finally:
    kernels.set_serial_work(default)
  rounds = len(times[values[-1]])
  base = float(np.median(times[values[0]]))
  rows = []
  print(f"\n{rounds} rounds\n{'serial work <':>14} {'ms':>8} {'change':>7}")
  for value in values:
    ms = float(np.median(times[value])) * 1e3
    rows.append({"serial_work": value, "ms": ms, "change": ms / (base * 1e3) - 1, "default": value == default})
    print(f"{value:>14} {ms:>8.3f} {ms / (base * 1e3) - 1:>+7.1%}{'  (default)' if value == default else ''}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": described.as_dict(), "model": args.model, "preset": args.preset, "batch": args.batch,
                 "backends": model.backends, "one_call": model.chain is not None, "rounds": rounds,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
