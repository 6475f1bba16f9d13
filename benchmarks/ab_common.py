"""What the A/B drivers in benchmarks/ share: a revision's lookup_kernel.h renamed to link beside this checkout's,
the compile command for a driver against both, and the one-paragraph error with exit code 2."""
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "lcnn_jax/inference/lookup_kernel.h"


def fail(message: str) -> None:
  """One error paragraph on stderr, exit code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def base_header(revision: str) -> str:
  """The kernel header of ``revision``, its namespace and include guard renamed so that both versions link."""
  try:
    text = subprocess.run(["git", "-C", REPO, "show", f"{revision}:{HEADER}"], capture_output=True, text=True,
                          check=True).stdout
  except (OSError, subprocess.CalledProcessError) as error:
    fail(f"--base {revision!r}: git cannot show {HEADER} there "
         f"({(getattr(error, 'stderr', '') or str(error)).strip()}). Name a commit of this repository, in a git checkout.")
  text = text.replace("LCNN_JAX_INFERENCE_LOOKUP_KERNEL_H_", "LCNN_JAX_BASE_LOOKUP_KERNEL_H_")
  return re.sub(r"^namespace lcnn \{", "namespace lcnn_base {", text, count=1, flags=re.M)


def build_driver(driver: str, revision: str, directory: str):
  """Compiles ``driver`` (a .cc in benchmarks/) against this checkout's header and ``revision``'s, for the
  kernel's build target (``LCNN_JAX_KERNEL_ARCH``, default native); returns (binary path, the machine's
  description). Prints the machine line and the command."""
  sys.path.insert(0, REPO)
  from lcnn_jax.inference import kernels, machine  # pylint: disable=import-outside-toplevel

  described = machine.describe()
  print(described.line(), flush=True)
  with open(os.path.join(directory, "base.h"), "w") as f:
    f.write(base_header(revision))
  binary = os.path.join(directory, os.path.splitext(os.path.basename(driver))[0])
  command = [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", *kernels.target_flags(), f"-I{directory}",
             '-DBASE_HEADER="base.h"', os.path.join(REPO, "benchmarks", driver), "-o", binary, "-lpthread"]
  print(" ".join(command), flush=True)
  if subprocess.run(command).returncode != 0:
    fail(f"the driver did not compile against --base {revision} (its header may predate an entry point the "
         "driver calls); pick a later revision.")
  return binary, described


def write_json(path: str | None, described, revision: str, rounds: int, rows: list) -> None:
  """Writes the table's ``rows`` to ``path`` (nothing when None) with the machine, the base revision and the
  rounds."""
  if path:
    resolved = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", revision], capture_output=True,
                              text=True).stdout.strip()  # HEAD and branch names move: keep the commit
    with open(path, "w") as f:
      json.dump({"machine": described.as_dict(), "base": resolved or revision, "rounds": rounds, "rows": rows}, f,
                indent=1)


def print_changes(heading: str, medians: dict, notes: dict | None = None) -> list:
  """Prints each variant's median ms and its change against the first; returns the rows."""
  first = next(iter(medians.values()))
  print(f"\n{heading:>16} {'ms':>8} {'change':>7}")
  rows = []
  for name, ms in medians.items():
    note = (notes or {}).get(name, "")
    rows.append({"variant": name, "ms": ms, "change": ms / first - 1})
    print(f"{name:>16} {ms:>8.3f} {ms / first - 1:>+7.1%}{'  ' + note if note else ''}")
  return rows


def add_model_arguments(parser) -> None:
  """The options of a whole-model A/B: the bench model, its batch, the time budget, the seed and --json."""
  parser.add_argument("--model", default="alexnet", choices=("alexnet", "resnet18"))
  parser.add_argument("--preset", default="fast", choices=("fast", "accurate"))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seconds", type=float, default=40.0, help="time budget of the timed rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="write the table here as JSON")


def bench_model(args):
  """The model of ``python -m lcnn_jax.bench`` for ``args`` (see :func:`add_model_arguments`), built and tuned
  once, and its images; prints the machine and the backends chosen. Returns (setup, images, the machine)."""
  if args.batch < 1 or args.seconds <= 0:
    fail(f"--batch {args.batch} / --seconds {args.seconds}: expected a batch >= 1 and a positive time.")
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lcnn_jax import bench  # pylint: disable=import-outside-toplevel
  from lcnn_jax.inference import kernels, machine  # pylint: disable=import-outside-toplevel

  described = machine.describe()
  print(described.line(), flush=True)
  try:
    kernels.ensure_kernel()
  except kernels.KernelUnavailable as error:
    fail(f"the lookup kernel is not available here: {error}")
  print(f"Building and tuning {args.model} {args.preset} at batch {args.batch} ...", flush=True)
  setup = bench.build(args.model, args.preset, args.batch, None, args.seed)
  print(f"backends: {setup.lcnn.backends}; one call: {setup.lcnn.chain is not None}", flush=True)
  images = jax.numpy.asarray(np.random.default_rng(args.seed).standard_normal(
      (args.batch, *setup.lcnn.input_shape), np.float32))
  return setup, images, described


def check_equal_logits(logits: dict) -> None:
  """Fails unless every variant's logits equal the first's to float32 rounding."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  (first, reference), *others = logits.items()
  for name, value in others:
    if not np.allclose(value, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max())):
      fail(f"the logits of {name} differ from those of {first} by {float(np.abs(value - reference).max()):.3g}.")


def write_model_json(path: str | None, described, args, setup, rows: list) -> None:
  """Writes a whole-model A/B's ``rows`` to ``path`` (nothing when None) with the machine, the model and the
  time budget."""
  if path:
    with open(path, "w") as f:
      json.dump({"machine": described.as_dict(), "model": args.model, "preset": args.preset, "batch": args.batch,
                 "backends": setup.lcnn.backends, "one_call": setup.lcnn.chain is not None,
                 "seconds": args.seconds, "rows": rows}, f, indent=1)
