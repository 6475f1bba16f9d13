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
