"""The fast AlexNet-LCNN's kernel stages at batch 1 besides conv1, this checkout's lookup_kernel.h against another
git revision's, timed side by side in one process (benchmarks/batch1_ab.cc: the dictionary stages of conv2-conv5,
the lookups of conv2 and conv3 (and of conv3 at the accurate point), AlexNet's three max poolings, and fc6's
lookups at the fast and the accurate point stored output by output and in chunks, cold and warm, on two threads).

    python benchmarks/batch1_ab.py --base 20051d8 [--rounds 40] [--json results.json]

Timed alternately, round by round, as benchmarks/first_layer_ab.py does (which has conv1). The build target is
the kernel's (``LCNN_JAX_KERNEL_ARCH``, default native). Prints a table and, with ``--json``, writes it with the
machine it ran on.
"""
import argparse
import re
import subprocess
import tempfile

from ab_common import build_driver, fail, write_json

DRIVER = "batch1_ab.cc"
LINE = re.compile(r"^(base|current) (.+): ([\d.]+) ms$")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True, help="the git revision to compare against")
  parser.add_argument("--rounds", type=int, default=40, help="timed rounds")
  parser.add_argument("--json", help="write the table here as JSON")
  args = parser.parse_args()
  if args.rounds < 1:
    fail(f"--rounds {args.rounds}: expected at least 1.")
  with tempfile.TemporaryDirectory() as tmp:
    binary, described = build_driver(DRIVER, args.base, tmp)
    run = subprocess.run([binary, str(args.rounds)], capture_output=True, text=True)
  print(run.stdout, end="", flush=True)
  if run.returncode != 0:
    fail(f"the two versions disagree, or the driver failed:\n{run.stdout}{run.stderr}")
  times = {}
  for match in filter(None, map(LINE.match, run.stdout.splitlines())):
    times.setdefault(match[2], {})[match[1]] = float(match[3])
  width = max(map(len, times), default=5)
  print(f"\n{'stage':<{width}} {'base ms':>9} {'current ms':>10} {'change':>7}")
  rows = []
  for stage, t in times.items():
    rows.append({"stage": stage, "base_ms": t["base"], "current_ms": t["current"]})
    print(f"{stage:<{width}} {t['base']:>9.4f} {t['current']:>10.4f} {t['current'] / t['base'] - 1:>+7.1%}")
  write_json(args.json, described, args.base, args.rounds, rows)


if __name__ == "__main__":
  main()
