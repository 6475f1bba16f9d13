"""Checkpoints: a run's step restores from any of its paths into a rebuilt model, and misuse is named."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import checkpoint, data, train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
  """The workdir of a tiny run checkpointed at steps 2 and 4, and its model at step 4 as training left it."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(train=dict(num_steps=4, checkpoint_every=2, eval_every=4))
  train.train_and_evaluate(config, workdir)
  return workdir


def pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def test_a_step_restores_alike_from_the_workdir_the_checkpoints_directory_and_the_step(run, tiny_config):
  expected, config, step = checkpoint.restore_model(run)
  assert step == 4 and config.model.name == "digits-lcnn"
  info = data.dataset_info(config.data)
  for path in (run, f"{run}/checkpoints", f"{run}/checkpoints/4"):
    model = train.create_model(tiny_config(), info)
    assert checkpoint.restore_step(model, path) == 4
    jax.tree.map(np.testing.assert_array_equal, pure(model), pure(expected))
  earlier, _, step = checkpoint.restore_model(run, step=2)
  assert step == 2
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pure(earlier)),
                                                       jax.tree.leaves(pure(expected))))


def test_run_info_round_trips_and_completes_an_older_config_with_todays_defaults(tmp_path, tiny_config):
  config = tiny_config(train=dict(num_steps=3))
  checkpoint.save_run_info(str(tmp_path), config, {"num_classes": 10, "image_shape": [8, 8, 1]})
  saved = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
  del saved["config"]["train"]["num_steps"], saved["config"]["sparsity"]  # as written by an older version
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  loaded, dataset = checkpoint.load_run_info(str(tmp_path))
  assert dataset == {"num_classes": 10, "image_shape": [8, 8, 1]}
  assert loaded.model.to_dict() == config.model.to_dict()
  assert loaded.train.num_steps == 0 and loaded.sparsity.rule == "prox"  # the defaults


def test_a_missing_step_lists_the_steps_there_and_a_non_run_is_named(run, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match=r"No step 3 .*\[2, 4\]"):
    checkpoint.resolve_step_dir(run, 3)
  with pytest.raises(checkpoint.CheckpointError, match="expected .*checkpoints/<step>/params"):
    checkpoint.resolve_step_dir(str(tmp_path))
  (tmp_path / checkpoint.CONFIG_FILE).write_text('{"something": "else"}')
  with pytest.raises(checkpoint.CheckpointError, match="needs 'config' and 'dataset'"):
    checkpoint.load_run_info(str(tmp_path))


def test_checkpoint_of_another_model_is_refused_naming_the_mismatch(run, tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  other = tiny_config(train=dict(num_steps=6))
  other.model.dictionary.convs = 6
  with pytest.raises(checkpoint.CheckpointError, match="another model.*conv2/coefficients"):
    train.train_and_evaluate(other, workdir)


def test_a_model_saved_alone_restores_and_the_trainer_refuses_to_resume_it(tmp_path, tiny_config):
  config = tiny_config()
  info = data.dataset_info(config.data)
  model = train.create_model(config, info)
  workdir = str(tmp_path)
  checkpoint.save_run_info(workdir, config, train.dataset_facts(info))
  checkpoint.save_model(workdir, model, step=0, imported_from="elsewhere.t7")
  restored, _, step = checkpoint.restore_model(workdir)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, pure(restored), pure(model))
  with pytest.raises(checkpoint.CheckpointError, match="imported from elsewhere.t7.*--config.train.init_from"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(tmp_path / checkpoint.CHECKPOINT_DIR)) == ["0"]  # kept, not set aside as damaged
