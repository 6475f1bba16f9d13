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


REQUIRE_KERNEL = "LCNN_JAX_REQUIRE_KERNEL"
"""Set to 1 (CI does) to make a test that needs the C++ lookup kernel fail, not skip, where it cannot build."""


def pytest_configure(config):
  config.addinivalue_line("markers", "kernel: needs the C++ lookup kernel (skipped with the reason where it cannot "
                          f"build, failed instead under {REQUIRE_KERNEL}=1)")


ONLY_BACKENDS = "LCNN_JAX_TEST_BACKENDS"
"""A comma-separated list of backends (``lookup``): tests parametrised with another ``backend`` are deselected.
tests/test_kernel_arch.py sets it to run only the kernel's cases against a build for another target."""


def pytest_collection_modifyitems(config, items):
  """Deselects the cases of backends outside ``LCNN_JAX_TEST_BACKENDS`` (``lookup:tile=0`` counts as ``lookup``)."""
  wanted = os.environ.get(ONLY_BACKENDS)
  if not wanted:
    return
  wanted = {name.strip() for name in wanted.split(",")}
  kept, dropped = [], []
  for item in items:
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    outside = isinstance(backend, str) and backend.partition(":")[0] not in wanted
    (dropped if outside else kept).append(item)
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_runtest_setup(item):
  """Skips, with the reason, a test marked ``kernel`` or parametrised with an unavailable ``backend``."""
  callspec = getattr(item, "callspec", None)
  backend = callspec.params.get("backend") if callspec is not None else None
  if item.get_closest_marker("kernel") is not None:
    backend = "lookup"
  if not isinstance(backend, str):
    return
  from lcnn_jax.inference import backends  # here: collecting a test that needs no backend imports no JAX code
  ok, reason = backends.get_backend(backend).available()
  if ok:
    return
  if backend == "lookup" and os.environ.get(REQUIRE_KERNEL) == "1":
    pytest.fail(f"{REQUIRE_KERNEL}=1 and the C++ lookup kernel is unavailable: {reason}", pytrace=False)
  pytest.skip(f"backend {backend!r} unavailable here: {reason}")


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
