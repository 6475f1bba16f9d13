"""Few-iteration learning on the embedded digits (``python -m lcnn_jax.experiments.few_iteration``).

A shallow digits LCNN (2 convolutions per width) learns dictionaries; a deeper one (4 per width) reuses them and
trains only indices and coefficients, against the deeper CNN from scratch. The experiment sets
``model.convs_per_stage``, the run lengths and the transfer keys.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The quickstart run, shortened for the few-iteration experiment."""
  c = config_lib.load("quickstart")
  c.train.epochs = 10
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 1000
  c.train.log_every = 20
  return c
