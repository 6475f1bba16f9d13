"""Test set-up: every test runs on the CPU, with fresh random inputs from a seed per test."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """A NumPy generator seeded from the test's name, so each test sees its own fresh random values."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


REQUIRE_KERNEL = "LCNN_JAX_REQUIRE_KERNEL"
"""Set to 1 (CI does) to make a test that needs the C++ lookup kernel fail, not skip, where it cannot build."""


def pytest_configure(config):
  config.addinivalue_line("markers", "kernel: needs the C++ lookup kernel (skipped with the reason where it cannot "
                          f"build, failed instead under {REQUIRE_KERNEL}=1)")


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
