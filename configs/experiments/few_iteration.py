"""Few-iteration learning on the embedded digits (``python -m lcnn_jax.experiments.few_iteration``).

A shallow digits LCNN (2 convolutions per width) learns dictionaries; a deeper one (4 per width) reuses them and
trains only indices and coefficients, against the deeper CNN from scratch. The experiment sets
``model.convs_per_stage``, the run lengths and the transfer keys.
"""

import importlib.util
import os

_QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "quickstart.py")


def _quickstart():
  spec = importlib.util.spec_from_file_location("lcnn_quickstart_config", _QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _quickstart().get_config()
  c.train.epochs = 10
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 1000
  c.train.log_every = 20
  return c
