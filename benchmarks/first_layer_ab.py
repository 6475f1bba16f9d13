"""A first layer's stages in the lookup kernel, this checkout's lookup_kernel.h against another git revision's,
timed side by side in one process (benchmarks/first_layer_ab.cc: AlexNet's conv1 at the fast point, its
dictionary stage and its pooled lookups, on two threads).

    python benchmarks/first_layer_ab.py --base 5526861 --batches 1,16,32 [--tile_bytes 0,524288] [--rounds 40]
        [--json results.json]

Timed alternately, round by round, so that a slow spell of the machine falls on both versions alike: on the
2-core VMs this project is measured on, the same code timed in two processes differed by up to 30%. The build
target is the kernel's (``LCNN_JAX_KERNEL_ARCH``, default native). Prints a table and, with ``--json``, writes
it with the machine it ran on.
"""
import argparse
import re
import subprocess
import tempfile

from ab_common import build_driver, fail, write_json

DRIVER = "first_layer_ab.cc"
LINE = re.compile(r"^(base|current) batch (\d+) tile (\d+): dictionary ([\d.]+) ms, pooled lookups ([\d.]+) ms, "
                  r"layer ([\d.]+) ms$")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True, help="the git revision to compare against")
  parser.add_argument("--batches", default="1,16,32", help="batch sizes, comma-separated")
  parser.add_argument("--tile_bytes", default="0", help="tile sizes in bytes of S (0: untiled), comma-separated")
  parser.add_argument("--rounds", type=int, default=40, help="timed rounds per batch and tile")
  parser.add_argument("--json", help="write the table here as JSON")
  args = parser.parse_args()
  try:
    batches = [int(b) for b in args.batches.split(",")]
    tiles = [int(t) for t in args.tile_bytes.split(",")]
  except ValueError:
    fail(f"--batches {args.batches!r} / --tile_bytes {args.tile_bytes!r}: expected integers separated by commas, "
         "e.g. --batches 1,16,32.")
  with tempfile.TemporaryDirectory() as tmp:
    binary, described = build_driver(DRIVER, args.base, tmp)
    rows = []
    for batch in batches:
      for tile in tiles:
        run = subprocess.run([binary, str(batch), str(tile), str(args.rounds)], capture_output=True, text=True)
        print(run.stdout, end="", flush=True)
        if run.returncode != 0:
          fail(f"the two versions disagree, or the driver failed:\n{run.stdout}{run.stderr}")
        for match in filter(None, map(LINE.match, run.stdout.splitlines())):
          rows.append({"version": match[1], "batch": int(match[2]), "tile_bytes": int(match[3]),
                       "dictionary_ms": float(match[4]), "pooled_lookups_ms": float(match[5]),
                       "layer_ms": float(match[6])})
  print(f"\n{'batch':>5} {'tile':>8} {'stage':<15} {'base ms':>9} {'current ms':>10} {'change':>7}")
  for batch in batches:
    for tile in tiles:
      base, current = (next(r for r in rows if r["version"] == v and r["batch"] == batch and r["tile_bytes"] == tile)
                       for v in ("base", "current"))
      for stage in ("dictionary_ms", "pooled_lookups_ms", "layer_ms"):
        change = current[stage] / base[stage] - 1
        print(f"{batch:>5} {tile:>8} {stage[:-3]:<15} {base[stage]:>9.3f} {current[stage]:>10.3f} {change:>+7.1%}")
  write_json(args.json, described, args.base, args.rounds, rows)


if __name__ == "__main__":
  main()
