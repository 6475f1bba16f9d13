"""The speed/accuracy spectrum on the embedded digits (``python -m lcnn_jax.experiments.spectrum``).

The quickstart digits LCNN, shortened to 8 epochs per point so that the CNN and eight LCNN points train in
about ten minutes on 2 CPU cores. The experiment sets ``model.pool_size`` and ``sparsity.strength`` per point.
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
  c.train.epochs = 8
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  return c
