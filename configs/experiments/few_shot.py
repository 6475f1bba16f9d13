"""Few-shot learning on the embedded digits (``python -m lcnn_jax.experiments.few_shot``).

Base runs learn digits 0-4 with the quickstart recipe; novel runs learn digits 5-9 from n training images each.
The experiment sets ``data.classes``, ``data.examples_per_class``, the run lengths and the transfer keys.
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
  c.train.epochs = 15
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  return c
