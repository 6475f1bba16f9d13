"""Inspecting runs (``python -m lcnn_jax.flops``): checkpoint counts equal the live model's, errors are clear."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from lcnn_jax import checkpoint, cli, config as config_lib, flops, inspection, logger, models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


EIGHT_DEVICE_RUN = r"""
import sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from lcnn_jax import checkpoint, train
assert jax.device_count() == 8
config, _ = checkpoint.load_run_info(sys.argv[1])
train.train_and_evaluate(config, sys.argv[1])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config):
  """Workdirs of a tiny run (4 steps with strong sparsity, so P's density falls below its initial value) trained
  on one device (in this process) and on eight (a subprocess, meanwhile, reading the config from its workdir)."""
  config = tiny_config(train=dict(num_steps=4, eval_every=4, log_every=4), sparsity=dict(strength=10.0))
  one, eight = (str(tmp_path_factory.mktemp(name)) for name in ("one_device", "eight_devices"))
  checkpoint.save_run_info(eight, config, {})
  eight_devices = subprocess.Popen([sys.executable, "-c", EIGHT_DEVICE_RUN, eight], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=REPO,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
  train.train_and_evaluate(config, one)
  _, err = eight_devices.communicate()
  assert eight_devices.returncode == 0, err[-3000:]
  return {"one_device_run": one, "eight_device_run": eight}


@pytest.fixture
def one_device_run(runs):
  return runs["one_device_run"]


@pytest.fixture
def eight_device_run(runs):
  return runs["eight_device_run"]


def run_cli(capsys, *args):
  """(exit status, stdout, stderr) of ``python -m lcnn_jax.flops ARGS``, run in this process."""
  status = cli.call(inspection.main, inspection.define_flags, ["lcnn_jax.flops", *args])
  out, err = capsys.readouterr()
  return status, out, err


def read_params(step_dir):
  """The saved params as NumPy arrays, read with orbax alone (no model code, any topology)."""
  path = os.path.abspath(os.path.join(step_dir, "params"))
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def saved_densities(step_dir):
  """density(P) per lookup layer read from the checkpoint's raw arrays, with τ = 0.01 / √(kh·kw·k)."""
  saved = read_params(step_dir)
  densities = {}
  for name, params in saved.items():
    if "coefficients" in params:
      p = np.asarray(params["coefficients"])  # (kh, kw, k, n_out)
      threshold = 0.01 / math.sqrt(p.shape[0] * p.shape[1] * p.shape[2])
      densities[name] = np.count_nonzero(np.abs(p) > threshold) / p.size
  return densities


@pytest.mark.parametrize("run", ["one_device_run", "eight_device_run"])
def test_checkpoint_counts_equal_the_live_models_counts(request, capsys, run, tiny_config):
  workdir = request.getfixturevalue(run)
  status, out, err = run_cli(capsys, "--workdir", workdir, "--json")
  assert status == 0, err
  report = json.loads(out)
  # The trainer counted its live, in-memory model at the last step; the checkpoint must give the same.
  (live,) = [row for row in logger.read_metrics(workdir) if row["split"] == "eval"]
  assert report["step"] == live["step"] == 4
  assert report["total_multiplications"] == live["multiplications"]
  assert report["baseline_multiplications"] == live["baseline_multiplications"]
  assert report["speedup"] == pytest.approx(live["speedup"])
  # Per layer, the densities equal those read from the raw saved arrays by the paper's threshold rule.
  densities = saved_densities(checkpoint.resolve_step_dir(workdir))
  rows = {row["path"]: row for row in report["layers"]}
  assert set(densities) == {"conv1", "conv2", "conv3"}
  for name, density in densities.items():
    assert rows[name]["density"] == pytest.approx(density)
  assert min(densities.values()) < 0.99  # training with strength 10 made P sparser than its init
  assert sum(row["share"] for row in report["layers"]) == pytest.approx(1.0)
  assert [row["baseline_multiplications"] for row in report["layers"]] == [
      row.multiplications for row in flops.baseline_count(tiny_config().model, 10, (8, 8, 1)).rows]


def test_eight_device_checkpoint_restores_to_the_same_counts_as_a_one_device_one(capsys, one_device_run,
                                                                                  eight_device_run):
  one = json.loads(run_cli(capsys, "--workdir", one_device_run, "--json")[1])
  eight = json.loads(run_cli(capsys, "--workdir", eight_device_run, "--json")[1])
  assert [row["path"] for row in one["layers"]] == [row["path"] for row in eight["layers"]]
  assert one["baseline_multiplications"] == eight["baseline_multiplications"]
  assert one["parameters_stored"] > 0 and eight["parameters_stored"] > 0


def test_table_lists_every_layer_and_the_totals(capsys, one_device_run):
  status, out, _ = run_cli(capsys, "--workdir", one_device_run, "--step", "4")
  assert status == 0
  for text in ("digits-lcnn at step 4", "conv1", "conv2", "conv3", "classifier", "lookup_conv", "total",
               "baseline (digits)", "speedup", "parameters stored"):
    assert text in out


def test_stored_parameters_are_dictionaries_nonzeros_of_p_and_biases(capsys, one_device_run):
  report = json.loads(run_cli(capsys, "--workdir", one_device_run, "--json")[1])
  step_dir = checkpoint.resolve_step_dir(one_device_run)
  saved = read_params(step_dir)
  densities = saved_densities(step_dir)
  expected = 0
  for name, params in saved.items():
    for key, value in params.items():
      value = np.asarray(value)
      expected += round(densities[name] * value.size) if key == "coefficients" else value.size
  assert report["parameters_stored"] == expected


def test_untrained_config_needs_no_data_and_counts_the_configured_model(capsys):
  status, out, err = run_cli(capsys, "--config", QUICKSTART, "--config.model.width=8", "--json")
  assert status == 0, err
  report = json.loads(out)
  config = config_lib.default_config("digits-lcnn")
  config.model.width, config.model.dictionary.first, config.model.dictionary.convs = 8, 1, 8
  model = models.create_model(config.model, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(config.seed))
  assert report["step"] is None and report["input_shape"] == [8, 8, 1] and report["num_classes"] == 10
  assert report["total_multiplications"] == flops.count_multiplications(model, (8, 8, 1)).total


@pytest.mark.parametrize("name,image_size,num_classes,expected", [
    ("digits", 0, 0, (10, (8, 8, 1))),
    ("digits", 16, 0, (10, (16, 16, 1))),
    ("folder", 0, 0, (1000, (224, 224, 3))),
    ("tfds:imagenet2012", 160, 0, (1000, (160, 160, 3))),
    ("synthetic", 64, 5, (5, (64, 64, 3))),
])
def test_input_facts_come_from_the_data_section(name, image_size, num_classes, expected):
  config = config_lib.default_config()
  config.data.name, config.data.image_size, config.data.num_classes = name, image_size, num_classes
  assert inspection.input_facts(config) == expected


def test_plot_is_written(capsys, one_device_run, tmp_path):
  png = tmp_path / "layers.png"
  status, _, err = run_cli(capsys, "--workdir", one_device_run, "--plot", str(png))
  assert status == 0, err
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_empty_or_missing_workdir_is_refused(capsys, tmp_path):
  status, _, err = run_cli(capsys, "--workdir", str(tmp_path))
  assert status == 2 and "is empty" in err
  status, _, err = run_cli(capsys, "--workdir", str(tmp_path / "nowhere"))
  assert status == 2 and "does not exist" in err
  status, _, err = run_cli(capsys)
  assert status == 2 and "--workdir" in err
  status, _, err = run_cli(capsys, "--config", QUICKSTART, "--step", "4")
  assert status == 2 and "--step=4 needs --workdir" in err


def test_missing_step_lists_the_steps_there(capsys, one_device_run):
  status, _, err = run_cli(capsys, "--workdir", one_device_run, "--step", "3")
  assert status == 2 and "No step 3" in err and "[4]" in err


def test_incomplete_steps_are_refused(capsys, one_device_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(one_device_run, workdir)
  steps = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(steps, "4"), os.path.join(steps, "6"), ignore=shutil.ignore_patterns("params"))
  status, _, err = run_cli(capsys, "--workdir", workdir, "--step", "6")
  assert status == 2 and "step 6" in err and "no params/" in err
  status, out, _ = run_cli(capsys, "--workdir", workdir, "--json")  # the latest *complete* step
  assert status == 0 and json.loads(out)["step"] == 4
  params = os.path.join(steps, "4", "params")
  shutil.rmtree(params)
  os.makedirs(params)
  status, _, err = run_cli(capsys, "--workdir", workdir, "--step", "4")
  assert status == 2 and "step" in err and "incomplete or damaged" in err


def test_config_of_another_model_is_refused_naming_the_mismatch(capsys, one_device_run):
  status, _, err = run_cli(capsys, "--workdir", one_device_run, "--config", QUICKSTART)
  assert status == 2 and "another model" in err and "different shapes:" in err


def test_misspelt_flag_is_refused(capsys):
  status, _, err = run_cli(capsys, "--config", QUICKSTART, "--config.model.pool_sise=3")
  assert status == 2 and "pool_sise" in err


def test_command_line_module_runs(tmp_path):
  done = subprocess.run([sys.executable, "-m", "lcnn_jax.flops", "--workdir", str(tmp_path)], capture_output=True,
                        text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 2 and "is empty" in done.stderr
