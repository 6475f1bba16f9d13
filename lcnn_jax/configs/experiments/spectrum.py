"""The speed/accuracy spectrum on the embedded digits (``python -m lcnn_jax.experiments.spectrum``).

The quickstart digits LCNN, shortened to 8 epochs per point so that the CNN and eight LCNN points train in
about ten minutes on 2 CPU cores. The experiment sets ``model.dictionary.convs`` and ``sparsity.strength`` per point.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The quickstart run, shortened for the spectrum experiment."""
  c = config_lib.load("quickstart")
  c.train.epochs = 8
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  return c
