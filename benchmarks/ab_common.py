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
    with open(path, "w") as f:
      json.dump({"machine": described.as_dict(), "base": revision, "rounds": rounds, "rows": rows}, f, indent=1)
