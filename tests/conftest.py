"""Test set-up: every test runs on the CPU, with fresh random inputs from a seed per test, and the tiny run
config that the training, checkpoint and inspection tests share."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import zlib

import numpy as np
import pytest

from lcnn_jax import config as config_lib


@pytest.fixture
def rng(request):
  """A NumPy generator seeded from the test's name, so each test sees its own fresh random values."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make_tiny_config(**sections):
  """The tests' run: a width-8 digits LCNN on the embedded digits, 8 steps of 32 images (about 10 s on a CPU).

  Each keyword names a config section and the keys to change there:
  ``make_tiny_config(train={"num_steps": 4}, sparsity={"strength": 10.0})``.
  """
  c = config_lib.default_config("digits-lcnn")
  c.model.width = 8
  c.model.dictionary.first = 1
  c.model.dictionary.convs = 4
  c.data.name = "digits"
  c.train.batch_size = 32
  c.train.num_steps = 8
  c.train.steps_per_epoch = 4
  c.train.lr_schedule = "constant"
  c.train.learning_rate = 0.05
  c.train.checkpoint_every = 4
  c.train.log_every = 2
  c.train.eval_every = 8
  c.train.eval_batch_size = 360  # the whole digits validation split in one batch
  c.sparsity.strength = 1.0
  for section, values in sections.items():
    c[section].update(values)
  return c


@pytest.fixture(scope="session")
def tiny_config():
  """:func:`make_tiny_config`, the factory of the tests' tiny run config (a fresh ConfigDict per call)."""
  return make_tiny_config
