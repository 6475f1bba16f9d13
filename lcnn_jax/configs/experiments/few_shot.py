"""Few-shot learning on the embedded digits (``python -m lcnn_jax.experiments.few_shot``).

Base runs learn digits 0-4 with the quickstart recipe; novel runs learn digits 5-9 from n training images each.
The experiment sets ``data.classes``, ``data.examples_per_class``, the run lengths and the transfer keys.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The quickstart run, shortened for the few-shot experiment."""
  c = config_lib.load("quickstart")
  c.train.epochs = 15
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  return c
