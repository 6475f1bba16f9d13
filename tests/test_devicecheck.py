"""The device check: a slice of its smoke run, its report, its targets and its answers to missing parts."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lcnn_jax import devicecheck
from helpers import assert_describes_a_machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GPU_IMAGE_LACKS = ("grain", "tensorboardX", "tensorflow_datasets", "tensorflow")
"""What a typical GPU image does not have (besides ml_collections)."""

BLOCKER = """
import sys

class _NotInstalled:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    return None

sys.meta_path.insert(0, _NotInstalled())
"""


def _command(*args, missing=(), folder=None):
  """The command in a child process; ``missing`` modules made unimportable there (and in its own children) by a
  sitecustomize written to ``folder``."""
  paths = [ROOT, os.environ.get("PYTHONPATH")]
  if missing:
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=tuple(missing)))
    paths.insert(0, str(folder))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
  return subprocess.run([sys.executable, "-m", "lcnn_jax.devicecheck", *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=600)


def test_smoke_slice_measures_training_and_writes_the_report(tmp_path):
  # On an image without grain, tensorboardX or tensorflow-datasets, as typical GPU images are.
  (tmp_path / "site").mkdir()
  done = _command("--smoke", "--out", str(tmp_path), "--parts", "train", "--families", "resnet18",
                  missing=GPU_IMAGE_LACKS, folder=tmp_path / "site")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "devicecheck.json").read_text())
  assert result["smoke"] and result["parts"]["train"]["status"] == "ok"
  rows = {row["model"]: row for row in result["rows"]}
  assert sorted(rows) == ["resnet18", "resnet18-lcnn-fast"]
  for row in rows.values():
    assert row["part"] == "train" and row["batch"] == devicecheck.SMOKE.train_batch and row["dtype"] == "bfloat16"
    assert row["images_per_s"] > 0 and row["ms"] == pytest.approx(1e3 * row["batch"] / row["images_per_s"])
  goals = {t["target"]: t for t in result["targets"]}
  assert goals["ResNet-18 bfloat16 training images/s"]["value"] == rows["resnet18"]["images_per_s"]
  assert goals["alexnet-lcnn-fast inference (auto) speedup over dense XLA at batch 1"]["met"] is None
  report = (tmp_path / "devicecheck.md").read_text()
  assert "| train | resnet18-lcnn-fast | xla |" in report and "not measured" in report
  line = assert_describes_a_machine(result["machine"])
  assert f"Host: {line}." in report
  printed = done.stdout.strip().splitlines()
  assert printed[-1].startswith("train      resnet18-lcnn-fast")  # the table comes last, under the machine
  assert printed[-4:-2] == [line, devicecheck.table([]).splitlines()[0]]


def test_without_ml_collections_the_command_starts_and_every_part_says_what_it_needs(tmp_path):
  (tmp_path / "site").mkdir()
  done = _command("--smoke", "--out", str(tmp_path / "report"), missing=("ml_collections", *GPU_IMAGE_LACKS),
                  folder=tmp_path / "site")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "report" / "devicecheck.json").read_text())
  assert sorted(result["parts"]) == sorted(devicecheck.PARTS) and result["rows"] == []
  assert_describes_a_machine(result["machine"])  # needs neither ml_collections nor the parts' packages
  for name, part in result["parts"].items():
    assert part["status"] == "skipped" and "ml_collections" in part["reason"], name
  assert "pipeline skipped: needs ml_collections, grain" in done.stdout
  assert done.stdout.strip().splitlines()[-1].startswith("part ")  # the (empty) table still comes last
  done = _command("--out", str(tmp_path / "report"), "--part", "train", missing=("ml_collections",),
                  folder=tmp_path / "site")
  assert done.returncode == 2 and "'part'" in done.stderr and "Traceback" not in done.stderr


def test_usage_mistakes_exit_2_with_the_fix(tmp_path):
  a_file = tmp_path / "report.txt"
  a_file.write_text("keep me")
  done = _command("--out", str(a_file), "--parts", "pipeline")
  assert done.returncode == 2 and "is a file" in done.stderr and a_file.read_text() == "keep me"
  done = _command("--out", str(tmp_path), "--parts", "tests,benchmarks")
  assert done.returncode == 2 and "benchmarks" in done.stderr and "tests,train,pipeline,inference" in done.stderr


def test_a_missing_package_or_an_exhausted_budget_skips_the_part_saying_why(tmp_path, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grain" else find_spec(name, *a))
  run = devicecheck.Run(str(tmp_path), devicecheck.SMOKE, smoke=True)
  run.part("pipeline", devicecheck.run_pipeline)
  assert run.parts["pipeline"]["status"] == "skipped" and "grain" in run.parts["pipeline"]["reason"]
  late = devicecheck.Run(str(tmp_path), dataclasses.replace(devicecheck.SMOKE, budget_s=0), smoke=True)
  late.part("train", devicecheck.run_train)
  assert late.parts["train"]["status"] == "skipped" and "budget" in late.parts["train"]["reason"]
  written = json.loads((tmp_path / "devicecheck.json").read_text())
  assert written["parts"]["train"]["status"] == "skipped"


def test_targets_compare_measurements_with_the_goals_for_one_h200():
  rows = [dict(part="train", model="resnet18", batch=256, images_per_s=9000.0),
          dict(part="train", model="resnet18-lcnn-fast", batch=256, images_per_s=8100.0),
          dict(part="train", model="resnet18", batch=512, images_per_s=1.0, probe=True),
          dict(part="inference", model="alexnet", batch=1, ms=2.0, images_per_s=500.0),
          dict(part="inference", model="alexnet-lcnn-fast", backend="auto", batch=1, ms=0.8, images_per_s=1250.0)]
  goals = {t["target"]: t for t in devicecheck.targets(rows)}
  assert goals["ResNet-18 bfloat16 training images/s"] == dict(
      target="ResNet-18 bfloat16 training images/s", value=9000.0, goal=8000.0, met=True)
  assert goals["resnet18-lcnn-fast training images/s / resnet18's"]["value"] == pytest.approx(0.9)
  assert goals["resnet18-lcnn-fast training images/s / resnet18's"]["met"] is False
  assert goals["alexnet-lcnn-fast inference (auto) speedup over dense XLA at batch 1"]["value"] == pytest.approx(2.5)
  assert goals["alexnet-lcnn-fast inference (auto) speedup over dense XLA at batch 256"]["met"] is None


def test_larger_batches_are_tried_until_one_does_not_fit(tmp_path, monkeypatch):
  from lcnn_jax import throughput

  def measured(config, model_config, batch, steps):  # a device whose memory holds 8 images of ResNet-18
    if batch > 8:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB.")
    return 100.0 * batch

  monkeypatch.setattr(throughput, "compute_images_per_second", measured)
  sizes = dataclasses.replace(devicecheck.SMOKE, probe_batches=(8, 16, 32), budget_s=3600)
  run = devicecheck.Run(str(tmp_path), sizes, smoke=True, families=("resnet18",))
  run.part("train", devicecheck.run_train)
  assert run.parts["train"]["status"] == "ok"
  probes = [(r["model"], r["batch"], r.get("note")) for r in run.rows if r.get("probe")]
  assert probes == [("resnet18", 8, None), ("resnet18", 16, "out of memory"),
                    ("resnet18-lcnn-fast", 8, None), ("resnet18-lcnn-fast", 16, "out of memory")]
  goals = {t["target"]: t for t in devicecheck.targets(run.rows)}
  assert goals["ResNet-18 bfloat16 training images/s"]["value"] == 400.0  # batch 4, not a probe
