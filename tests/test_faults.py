"""Faults and user mistakes: each ends in a clean recovery or in one clear error naming what was wrong.

Covered elsewhere (not repeated here): resume after a clean stop, NaN loss, a checkpoint of another model and a
misspelt key (tests/test_train.py); corrupt, zero-byte and non-image files and dataset layout errors
(tests/test_data.py). docs/reliability.md lists every fault test and what it proves.
"""

import errno
import importlib.util
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from lcnn_jax import checkpoint, logger, train

from helpers import kill_9_when_saving

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
TINY = {"train.batch_size": 32, "model.width": 8, "train.checkpoint_every": 3, "train.eval_every": 100,
        "train.log_every": 1, "train.eval_batch_size": 120}


def quickstart(num_steps, **overrides):
  """configs/quickstart.py made tiny, as the --config.KEY=VALUE flags of ``flags`` make it."""
  spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in {**TINY, "train.num_steps": num_steps, **overrides}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def flags(num_steps, **overrides):
  return [f"--config.{key}={value}" for key, value in {**TINY, "train.num_steps": num_steps, **overrides}.items()]


def main_command(workdir, *args):
  return [sys.executable, "-m", "lcnn_jax.main", "--config", QUICKSTART, "--workdir", str(workdir), *args]


def run_main(workdir, *args):
  return subprocess.run(main_command(workdir, *args), capture_output=True, text=True, cwd=REPO, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def final_state(workdir):
  model, _, step = checkpoint.restore_model(str(workdir))
  return step, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def train_losses(workdir):
  return [(r["step"], r["loss"]) for r in logger.read_metrics(str(workdir)) if r["split"] == "train"]


def steps_on_disk(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


# ------------------------------------------------------------------------------------------------ crashes

def test_kill_9_mid_training_then_the_same_command_completes_as_if_uninterrupted(tmp_path):
  killed = tmp_path / "killed"
  args = flags(8)
  # steps 4-6 computed and logged, only step 3 on disk
  kill_9_when_saving(6, tmp_path / "at_step_6", ["--config", QUICKSTART, "--workdir", str(killed), *args], cwd=REPO)
  assert steps_on_disk(killed) == [3]
  assert [s for s, _ in train_losses(killed)] == [1, 2, 3, 4, 5, 6]  # logged past the checkpoint, then lost

  rerun = run_main(killed, *args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Resumed from step 3" in rerun.stderr

  whole = tmp_path / "whole"
  train.train_and_evaluate(quickstart(8), str(whole))
  step_a, params_a = final_state(whole)
  step_b, params_b = final_state(killed)
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert train_losses(killed) == train_losses(whole)
  evals = lambda d: [(r["step"], r["loss"], r["top1"]) for r in logger.read_metrics(str(d)) if r["split"] == "eval"]
  assert evals(killed) == evals(whole)


def damage_latest_step(workdir):
  """Trains 6 steps (checkpoints 3 and 6), then leaves step 6's params as a crash while writing them would."""
  train.train_and_evaluate(quickstart(6), str(workdir))
  assert steps_on_disk(workdir) == [3, 6]
  params_dir = workdir / "checkpoints" / "6" / "params"
  for name in ("_METADATA", "manifest.ocdbt"):
    (params_dir / name).unlink()


def test_an_incomplete_step_falls_back_to_the_last_complete_one_with_a_warning(tmp_path, caplog):
  damage_latest_step(tmp_path)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(quickstart(6), str(tmp_path))
  assert re.search(r"step 6 .* (unreadable|could not be restored).*kept it as \S*6\.damaged", caplog.text)
  assert "Resumed from step 3" in caplog.text
  # Nothing already saved was deleted: the damaged step is set aside whole, and step 6 is written anew.
  damaged = tmp_path / "checkpoints" / "6.damaged" / "params"
  assert damaged.is_dir() and any(damaged.iterdir())
  assert steps_on_disk(tmp_path) == [3, 6]


def test_the_step_recomputed_after_a_fallback_is_saved_over_the_damaged_one(tmp_path):
  damage_latest_step(tmp_path)
  train.train_and_evaluate(quickstart(6), str(tmp_path))
  assert final_state(tmp_path)[0] == 6


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  # No small filesystem can be mounted here, so the write of step 6's last item (its JSON metadata, after the
  # arrays are written) fails as a full disk fails it: OSError(ENOSPC) from the file write.
  train.train_and_evaluate(quickstart(3), str(tmp_path))
  save_fn = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def disk_full_at_step_6(self, x, directory):
    if isinstance(x, dict) and x.get("step") == 6:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await save_fn(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_6)
  with pytest.raises(Exception, match="No space left on device"):
    train.train_and_evaluate(quickstart(6), str(tmp_path))
  monkeypatch.undo()
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 3
  step, params = final_state(tmp_path)
  assert step == 3 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  train.train_and_evaluate(quickstart(6), str(tmp_path))  # space freed: the same run resumes from 3
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 6


# ------------------------------------------------------------------------------------------------ user mistakes


@pytest.mark.parametrize("flag,key", [("--config.model.dictionary.convs=-1", "model.dictionary.convs=-1"),
                                      ("--config.model.dictionary.first=0", "model.dictionary.first=0")])
def test_a_dictionary_size_below_one_names_the_key(tmp_path, flag, key):
  # convs=0 is allowed on purpose: it makes conv2/conv3 dense (config.py); the first layer has no dense option.
  done = run_main(tmp_path, flag)
  assert done.returncode == 2
  assert key in done.stderr and "dictionary size" in done.stderr and "Traceback" not in done.stderr
  assert done.stderr.count("error:") == 1 and len(done.stderr.strip().splitlines()) == 1  # printed once
  assert not os.path.exists(tmp_path / "checkpoints")  # rejected before any compute


# ------------------------------------------------------------------------------------------------ no pickle


def test_loading_checkpoints_and_exports_never_unpickles():
  """Checkpoints are orbax (tensorstore arrays + JSON); every np.load of the package refuses pickles."""
  package = os.path.join(REPO, "lcnn_jax")
  for root, _, files in os.walk(package):
    for name in files:
      if not name.endswith(".py"):
        continue
      source = open(os.path.join(root, name)).read()
      where = os.path.relpath(os.path.join(root, name), REPO)
      assert not re.search(r"^\s*(import (c?pickle|dill|cloudpickle|joblib)|from (c?pickle|dill|joblib) )",
                           source, re.M), f"{where} imports a pickle module"
      assert "allow_pickle=True" not in source, f"{where} loads with allow_pickle=True"
      assert not re.search(r"\b(torch\.load|pd\.read_pickle|marshal\.loads?)\(", source), where
