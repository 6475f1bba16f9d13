"""One command that checks and measures lcnn_jax on whatever accelerator is here, in one prepared run.

    python -m lcnn_jax.devicecheck --out DIR [--smoke] [--parts tests,train,pipeline,inference] [--budget_s S]

Parts, in this order (each records its status, seconds and, when it cannot run, why):

* ``tests``: pytest on the modules that exercise the device (the layers, the train step with accumulated
  pieces, every inference backend and the Pallas kernel against the dense reference), in a child process that
  sees the same device at float32 matmul precision (``JAX_DEFAULT_MATMUL_PRECISION=highest``) and allocates GPU
  memory as it goes (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), before this process touches the device.
* ``train``: training images/s (:func:`lcnn_jax.throughput.compute_images_per_second`) of AlexNet and
  AlexNet-LCNN fast, ResNet-18 and ResNet-18-LCNN fast, on synthetic 224×224 batches of 256 in bfloat16; then,
  while time is left, the ResNets at larger batches until one does not fit.
* ``pipeline``: images/s of the JPEG training pipeline with one grain worker per host core
  (:func:`lcnn_jax.throughput.pipeline_images_per_second`, random 500×375 JPEGs): seconds, so before the
  longest part.
* ``inference``: :func:`lcnn_jax.bench.run` at batch 1 and 256: the dense CNN, the LCNN on every available
  backend and on the ``auto`` mix (AlexNet-LCNN fast, then ResNet-18-LCNN fast while time is left).

It writes ``DIR/devicecheck.json`` (``machine``: the host, as :func:`lcnn_jax.inference.machine.describe`
gives it, ``cpu``, ``kernel_arch``, ``march``, ``l1_bytes``, ``l2_bytes``, ``l3_bytes`` and ``cores``; ``rows``: one
per measurement, with ``part``, ``model``, ``backend``, ``batch``, ``images_per_s`` and ``ms``; ``parts``;
``targets``), ``DIR/devicecheck.md`` and ``DIR/tests.log``, rewriting the JSON after every part so that a run cut
short keeps what it measured, and prints a short table last, under the machine's line. Sizes fit about 8 minutes
on one H200 (``--budget_s``: a part or step that would start after the budget is skipped, saying so). It never
changes device settings.

``--smoke`` runs the same code paths at tiny sizes (AlexNet 64×64 and ResNet 32×32 training at batch 4,
AlexNet inference at batch 1 and 2, the Pallas kernel interpreted) on a CPU: about 2.5 minutes of CPU time.

Only jax, numpy and absl are imported up front, so the command starts on an image without ml_collections, grain,
tensorboardX or tensorflow-datasets; each part imports what it needs and is skipped, naming the missing package,
when that is not installed (see docs/accelerators.md for installing carried wheels).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
from absl import app, flags, logging

from lcnn_jax.inference import machine

PARTS = ("tests", "train", "pipeline", "inference")
FAMILIES = ("alexnet", "resnet18")

@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each part measures, and how long it may take."""
  budget_s: float
  tests: tuple[str, ...]
  tests_timeout_s: float
  train_image_size: dict[str, int]
  train_batch: int
  train_steps: int
  probe_batches: tuple[int, ...]  # larger training batches tried while time is left
  inference_families: tuple[str, ...]
  inference_batches: tuple[int, ...]
  inference_seconds: float
  inference_step_s: float  # what one inference step (a family at a batch size) needs of the budget to start
  pipeline_batch: int
  pipeline_steps: int
  pipeline_images: int
  pipeline_workers: int


DEVICE_TESTS = (
    "tests/test_layers.py",
    "tests/test_pallas.py",
    "tests/test_inference.py::test_backend_equals_dense_conv_with_reconstructed_kernel",
    "tests/test_inference.py::test_exported_logits_equal_eval_mode_logits",
    "tests/test_train.py::test_gradient_accumulation_equals_the_full_batch_without_batchnorm",
)

FULL = Sizes(budget_s=450, tests=DEVICE_TESTS, tests_timeout_s=120,
             train_image_size={"alexnet": 224, "resnet18": 224}, train_batch=256, train_steps=10,
             probe_batches=(512, 1024), inference_families=FAMILIES, inference_batches=(1, 256), inference_seconds=3.0,
             inference_step_s=100,
             pipeline_batch=256, pipeline_steps=4, pipeline_images=512, pipeline_workers=os.cpu_count() or 1)

SMOKE = Sizes(budget_s=270, tests=("tests/test_pallas.py::test_pallas_lookups_equal_dense_conv_with_reconstructed_kernel",),
              tests_timeout_s=90, train_image_size={"alexnet": 64, "resnet18": 32}, train_batch=4, train_steps=1,
              probe_batches=(), inference_families=("alexnet",), inference_batches=(1, 2), inference_seconds=0.5,
              inference_step_s=60,
              pipeline_batch=8, pipeline_steps=2, pipeline_images=24, pipeline_workers=1)

TRAINED = {"alexnet": ("alexnet", "alexnet-lcnn-fast"), "resnet18": ("resnet18", "resnet18-lcnn-fast")}
"""The row names of each family's CNN and LCNN."""


class Skipped(Exception):
  """A part or step that cannot run here; the message says why."""


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a parent package missing, or a finder refusing the name
    return False


def require(*modules: str) -> None:
  """Raises :class:`Skipped` naming the modules that are not installed."""
  missing = [m for m in modules if not _installed(m)]
  if missing:
    raise Skipped(f"needs {', '.join(missing)}, not installed here (docs/accelerators.md: installing carried "
                  "wheels)")


class Run:
  """The rows, part statuses and clock of one check; written to ``out`` after every part."""

  def __init__(self, out: str, sizes: Sizes, smoke: bool, families: tuple[str, ...] = FAMILIES):
    self.out, self.sizes, self.smoke, self.families = out, sizes, smoke, tuple(families)
    self.start = time.monotonic()
    self.rows: list[dict[str, Any]] = []
    self.parts: dict[str, dict[str, Any]] = {}
    self.device = "not yet initialised"

  def left(self) -> float:
    """Seconds of the budget left."""
    return self.sizes.budget_s - (time.monotonic() - self.start)

  def ensure_time(self, seconds: float, what: str) -> None:
    """Raises :class:`Skipped` when less than ``seconds`` of the budget is left for ``what``."""
    if self.left() < seconds:
      raise Skipped(f"{what}: {max(self.left(), 0):.0f} s of the {self.sizes.budget_s:.0f} s budget left")

  def add(self, **row) -> None:
    """Records one measurement, completing ``ms`` from ``images_per_s`` or the reverse."""
    if row.get("images_per_s") and not row.get("ms"):
      row["ms"] = 1e3 * row["batch"] / row["images_per_s"]
    elif row.get("ms") and not row.get("images_per_s"):
      row["images_per_s"] = 1e3 * row["batch"] / row["ms"]
    self.rows.append(row)
    logging.info("%s", _row_line(row))

  def part(self, name: str, fn: Callable[["Run"], dict | None]) -> None:
    """Runs one part, recording ok / skipped / failed, its seconds and its notes."""
    begin = time.monotonic()
    try:
      self.ensure_time(10, name)
      notes = fn(self) or {}
      status = "ok" if not notes.get("skipped_steps") else "partial"
      record = {"status": status, **notes}
    except Skipped as e:
      record = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # a failed part is reported; the others still run
      logging.exception("Part %s failed.", name)
      message = str(e).strip().splitlines()
      record = {"status": "failed", "reason": f"{type(e).__name__}: {message[-1] if message else ''}"}
    record["seconds"] = round(time.monotonic() - begin, 1)
    self.parts[name] = record
    self.write()

  def result(self) -> dict[str, Any]:
    """The report as written to devicecheck.json."""
    return {"device": self.device, "machine": machine.describe().as_dict(), "smoke": self.smoke,
            "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host_cpus": os.cpu_count(), "elapsed_s": round(time.monotonic() - self.start, 1),
            "command": " ".join(["python -m lcnn_jax.devicecheck", *sys.argv[1:]]), "parts": self.parts,
            "rows": self.rows, "targets": targets(self.rows)}

  def write(self) -> None:
    """Writes devicecheck.json and devicecheck.md, each replaced whole (never left half-written)."""
    result = self.result()
    for name, text in (("devicecheck.json", json.dumps(result, indent=1)), ("devicecheck.md", markdown(result))):
      partial = os.path.join(self.out, f".{name}.partial")
      with open(partial, "w") as f:
        f.write(text + "\n")
      os.replace(partial, os.path.join(self.out, name))


# Parts --------------------------------------------------------------------------------------------------------


def repository_root() -> str:
  """The checkout this module runs from (where ``tests/`` is)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tests(run: Run) -> dict:
  """pytest on the device-exercising tests, in a child process on the same device."""
  require("pytest", "ml_collections", "optax", "orbax.checkpoint")  # tests/conftest.py reads the configs
  root = repository_root()
  missing = [t for t in run.sizes.tests if not os.path.exists(os.path.join(root, t.split("::")[0]))]
  if missing:
    raise Skipped(f"the tests {missing} are not in {root}: run from a source checkout")
  # The child picks the same default device (JAX_PLATFORMS as here, unset meaning the accelerator), computes
  # float32 matmuls in float32 as the tests' tolerances assume, and takes GPU memory only as it needs it.
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
         "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  timeout = min(run.sizes.tests_timeout_s, max(run.left() - 30, 10))
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *run.sizes.tests]
  try:
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    output, code = done.stdout + done.stderr, done.returncode
  except subprocess.TimeoutExpired as e:
    output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    output, code = output + f"\n(stopped after {timeout:.0f} s)", None
  with open(os.path.join(run.out, "tests.log"), "w") as f:
    f.write(" ".join(command) + "\n" + output)
  counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", output)}
  notes = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
           + counts.get("errors", 0), "skipped": counts.get("skipped", 0), "log": "tests.log"}
  if code is None:
    raise RuntimeError(f"the tests did not finish in {timeout:.0f} s ({notes['passed']} passed so far); see "
                       "tests.log")
  if code != 0:
    raise RuntimeError(f"{notes['failed']} of the device tests failed (pytest exit {code}); see tests.log")
  return notes


def _preset(family: str, image_size: int):
  from lcnn_jax import bench  # needs ml_collections (the configs)
  config = bench.preset_config(family, "fast")
  config.train.compute_dtype = "bfloat16"
  config.data.image_size = image_size
  config.data.num_classes = 1000
  return config


def _out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def run_train(run: Run) -> dict:
  """Training images/s of each family's CNN and LCNN in bfloat16, then larger batches while time is left."""
  require("ml_collections", "optax", "orbax.checkpoint")
  from lcnn_jax import models, throughput  # pylint: disable=g-import-not-at-top
  sizes, skipped = run.sizes, []
  configs = {}
  for family in run.families:
    config = _preset(family, sizes.train_image_size[family])
    configs[family] = [(name, model_config) for name, model_config in
                       zip(TRAINED[family], (models.baseline_config(config.model), config.model))]
    for name, model_config in configs[family]:
      try:
        run.ensure_time(45, f"training {name}")
      except Skipped as e:
        skipped.append(str(e))
        continue
      images_per_s = throughput.compute_images_per_second(config, model_config, sizes.train_batch, sizes.train_steps)
      run.add(part="train", model=name, backend="xla", dtype="bfloat16", batch=sizes.train_batch,
              image_size=sizes.train_image_size[family], images_per_s=images_per_s)
      run.write()
  for family in [f for f in run.families if f == "resnet18"]:
    config = _preset(family, sizes.train_image_size[family])
    for name, model_config in configs[family]:
      for batch in sizes.probe_batches:
        if run.left() < 120:
          skipped.append(f"larger batches of {name}: under 120 s of the budget left")
          break
        try:
          images_per_s = throughput.compute_images_per_second(config, model_config, batch, sizes.train_steps)
        except Exception as e:  # pylint: disable=broad-except
          if not _out_of_memory(e):
            raise
          run.add(part="train", model=name, backend="xla", dtype="bfloat16", batch=batch, probe=True,
                  image_size=sizes.train_image_size[family], images_per_s=None, note="out of memory")
          break
        run.add(part="train", model=name, backend="xla", dtype="bfloat16", batch=batch, probe=True,
                image_size=sizes.train_image_size[family], images_per_s=images_per_s)
        run.write()
  return {"skipped_steps": skipped} if skipped else {}


def run_inference(run: Run) -> dict:
  """The inference benchmark (dense CNN, LCNN on every backend and on ``auto``) at each batch size."""
  require("ml_collections")
  from lcnn_jax import bench  # pylint: disable=g-import-not-at-top
  skipped = []
  for family in [f for f in run.sizes.inference_families if f in run.families]:
    cnn, lcnn = TRAINED[family]
    for batch in run.sizes.inference_batches:
      try:
        run.ensure_time(run.sizes.inference_step_s, f"inference of {lcnn} at batch {batch}")
      except Skipped as e:
        skipped.append(str(e))
        continue
      result = bench.run(family, "fast", batch, seconds=run.sizes.inference_seconds)
      run.add(part="inference", model=cnn, backend="xla-dense", dtype="float32", batch=batch,
              ms=result["rows"][0]["dense_ms"])
      for row in result["rows"]:
        run.add(part="inference", model=lcnn, backend=row["backend"], dtype="float32", batch=batch,
                ms=row["lcnn_ms"], speedup=row["wall_speedup"], count_speedup=row["count_speedup"],
                **({"auto_backends": result["auto_backends"]} if row["backend"] == "auto" else {}))
      run.write()
  return {"skipped_steps": skipped} if skipped else {}


def run_pipeline(run: Run) -> dict:
  """Images/s of the JPEG training pipeline with one worker process per host core."""
  require("ml_collections", "grain", "PIL")
  from lcnn_jax import throughput  # pylint: disable=g-import-not-at-top
  sizes = run.sizes
  with tempfile.TemporaryDirectory() as folder:
    throughput.write_jpeg_folder(folder, sizes.pipeline_images)
    images_per_s = throughput.pipeline_images_per_second(folder, sizes.pipeline_batch, sizes.pipeline_steps,
                                                         sizes.pipeline_workers)
  run.add(part="pipeline", model="-", backend=f"grain, {sizes.pipeline_workers} workers", dtype="float32",
          batch=sizes.pipeline_batch, images_per_s=images_per_s)
  return {"workers": sizes.pipeline_workers}


RUNNERS = {"tests": run_tests, "train": run_train, "pipeline": run_pipeline, "inference": run_inference}


# Targets and reports ------------------------------------------------------------------------------------------


def _find(rows, **match) -> dict | None:
  for row in rows:
    if all(row.get(k) == v for k, v in match.items()) and not row.get("probe") and row.get("images_per_s"):
      return row
  return None


def targets(rows: list[dict]) -> list[dict]:
  """The issue's targets for one H200, each with the measured value and whether it is met (None: not measured)."""
  out = []

  def add(name, value, goal):
    out.append({"target": name, "value": value, "goal": goal, "met": None if value is None else value >= goal})

  resnet = _find(rows, part="train", model="resnet18")
  add("ResNet-18 bfloat16 training images/s", resnet and resnet["images_per_s"], 8000.0)
  for cnn, lcnn in TRAINED.values():
    a, b = _find(rows, part="train", model=cnn), _find(rows, part="train", model=lcnn)
    add(f"{lcnn} training images/s / {cnn}'s", a and b and b["images_per_s"] / a["images_per_s"], 1.0)
  for batch, goal in ((1, 2.0), (256, 1.0)):
    dense = _find(rows, part="inference", model="alexnet", batch=batch)
    auto = _find(rows, part="inference", model="alexnet-lcnn-fast", backend="auto", batch=batch)
    add(f"alexnet-lcnn-fast inference (auto) speedup over dense XLA at batch {batch}",
        dense and auto and dense["ms"] / auto["ms"], goal)
  return out


def _number(value, digits=1) -> str:
  return "-" if value is None else f"{value:,.{digits}f}"


def _row_line(r: dict) -> str:
  """One measurement as a line of :func:`table` (also the progress line printed as it is taken)."""
  return (f"{r['part']:<10} {r['model']:<20} {r['backend']:<18} {r['batch']:>6} "
          f"{_number(r.get('images_per_s')):>11} {_number(r.get('ms'), 3):>10}"
          + (f"  {r['note']}" if r.get("note") else ""))


def table(rows: list[dict]) -> str:
  """Rows as fixed-width text."""
  lines = [f"{'part':<10} {'model':<20} {'backend':<18} {'batch':>6} {'images/s':>11} {'ms':>10}"]
  lines += [_row_line(r) for r in rows]
  return "\n".join(lines)


def markdown(result: dict) -> str:
  """The report: device, parts, measurements, targets."""
  lines = [f"# devicecheck: {result['device']}", "",
           f"`{result['command']}` on {result['date']}, {result['elapsed_s']} s, jax {result['jax']}, "
           f"{result['host_cpus']} host CPUs{' (smoke sizes)' if result['smoke'] else ''}.", "",
           f"Host: {machine.Machine(**result['machine']).line()}.", "",
           "| part | status | seconds | notes |", "|---|---|---|---|"]
  for name, part in result["parts"].items():
    notes = {k: v for k, v in part.items() if k not in ("status", "seconds")}
    lines.append(f"| {name} | {part['status']} | {part['seconds']} | {json.dumps(notes) if notes else ''} |")
  lines += ["", "| part | model | backend | batch | images/s | ms | speedup |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['part']} | {r['model']} | {r['backend']} | {r['batch']} | {_number(r.get('images_per_s'))} "
                 f"| {_number(r.get('ms'), 3)} | {_number(r.get('speedup'), 2)}{' ' + r['note'] if r.get('note') else ''} |")
  lines += ["", "| target (one H200) | value | goal | met |", "|---|---|---|---|"]
  for t in result["targets"]:
    met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
    lines.append(f"| {t['target']} | {_number(t['value'], 2)} | {t['goal']:g} | {met} |")
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none."""
  flags.DEFINE_string("out", None, "Directory for devicecheck.json, devicecheck.md and tests.log (created if "
                      "needed).", flag_values=flag_values)
  flags.DEFINE_bool("smoke", False, "Tiny sizes, same code paths: a CPU check of the command itself (under 5 min).",
                    flag_values=flag_values)
  flags.DEFINE_list("parts", list(PARTS), f"Parts to run, a subset of {','.join(PARTS)}.", flag_values=flag_values)
  flags.DEFINE_list("families", list(FAMILIES), f"Networks to train and benchmark, a subset of "
                    f"{','.join(FAMILIES)}.", flag_values=flag_values)
  flags.DEFINE_float("budget_s", None, "Seconds for the whole run; steps that would start later are skipped "
                     "(default: 450, or 270 with --smoke).", flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """The command on its parsed flags (``flag_values``): a usage mistake is one ``error:`` line and status 2; 1 when
  a part failed."""
  if len(argv) > 1:
    sys.stderr.write(f"error: unexpected arguments {argv[1:]}: every option is a --flag (see --help)\n")
    return 2
  bad = sorted(set(flag_values.parts) - set(PARTS)) or sorted(set(flag_values.families) - set(FAMILIES))
  if bad or not flag_values.out:
    sys.stderr.write(f"error: --parts must be among {','.join(PARTS)} and --families among {','.join(FAMILIES)} "
                     f"(got {bad})\n" if bad else "error: --out DIR is required (where the report is written)\n")
    return 2
  if os.path.exists(flag_values.out) and not os.path.isdir(flag_values.out):
    sys.stderr.write(f"error: --out={flag_values.out} is a file; give a directory for devicecheck.json and .md\n")
    return 2
  os.makedirs(flag_values.out, exist_ok=True)
  sizes = SMOKE if flag_values.smoke else FULL
  if flag_values.budget_s is not None:
    sizes = dataclasses.replace(sizes, budget_s=flag_values.budget_s)
  run = Run(flag_values.out, sizes, flag_values.smoke, flag_values.families)
  if "tests" in flag_values.parts:  # first: the child process then has the device to itself
    run.part("tests", run_tests)
  device = jax.devices()[0]
  run.device = f"{jax.device_count()} x {device.platform}:{device.device_kind}"
  if flag_values.smoke and jax.default_backend() != "gpu":
    from lcnn_jax.inference import pallas_lookup  # pylint: disable=g-import-not-at-top
    os.environ[pallas_lookup.INTERPRET_ENV] = "1"  # the Pallas rows, interpreted
  if jax.default_backend() == "cpu":
    from lcnn_jax.inference import allocator  # pylint: disable=g-import-not-at-top
    allocator.reuse_freed_memory()  # as the benchmark command does on a CPU
  for name in PARTS[1:]:
    if name in flag_values.parts:
      run.part(name, RUNNERS[name])
  run.write()
  result = run.result()
  status = ", ".join(f"{name} {part['status']}" for name, part in result["parts"].items())
  sys.stdout.write(f"\n{result['device']}, {result['elapsed_s']} s: {status}; report in "
                   f"{flag_values.out}/devicecheck.md\n")
  for name, part in result["parts"].items():
    for reason in [part["reason"]] if part.get("reason") else part.get("skipped_steps", []):
      sys.stdout.write(f"  {name} {part['status']}: {reason}\n")
  sys.stdout.write(f"{machine.describe().line()}\n{table(run.rows)}\n")
  return 1 if any(part["status"] == "failed" for part in result["parts"].values()) else 0


def run_command() -> None:
  """The command line, on absl's global flags: through :func:`lcnn_jax.cli.run` (flag mistakes in one paragraph,
  exit code 2) where its dependencies are installed, else through ``absl.app.run`` alone (an image without
  ml_collections)."""
  define_flags()
  try:
    from lcnn_jax import cli  # pylint: disable=g-import-not-at-top
  except ImportError:
    app.run(main, flags_parser=_parse_flags)
  else:
    cli.run(main)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, a mistake answered in one line with exit code 2 (as :func:`lcnn_jax.cli.run` does)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}; see --help for the flags\n")
    sys.exit(2)


if __name__ == "__main__":
  run_command()
