"""The embedded default: an LCNN on scikit-learn's handwritten digits, about a minute on 2 CPU cores.

    python -m lcnn_jax.main --config quickstart --workdir runs/quickstart

The digits LCNN (three 3×3 lookup convolutions of width 32/64/128 and a dense classifier) trains on the
1,437-image training split with the L1 proximal rule and is evaluated on the 360 held-out images; it ends by
printing its per-layer multiplications and the speedup over its dense twin, ``digits``. conv1 sees one grey
channel, so its one-atom dictionary is exact (k = m = 1).

λ = ``sparsity.strength`` = 10 weighs as the original's ``-lambda 10`` (the proximal step accounts for momentum,
docs/operating_points.md) and ends near 39× fewer multiplications than the dense twin. For an operating point
chosen in advance, ask for it: ``--config.sparsity.target_speedup=10`` ends at 10.00×.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The quickstart run; the experiments on digits start from it."""
  c = config_lib.default_config("digits-lcnn")
  c.model.width = 32
  c.model.dictionary.first = 1
  c.model.dictionary.convs = 8
  c.model.dropout = 0.2
  c.data.name = "digits"
  c.train.batch_size = 64
  c.train.epochs = 30
  c.train.steps_per_epoch = 0  # one pass over the training split
  c.train.lr_schedule = "cosine"
  c.train.learning_rate = 0.1
  c.train.warmup_steps = 50
  c.train.weight_decay = 5e-4
  c.train.checkpoint_every = 200
  c.train.log_every = 20
  c.train.eval_every = 0  # once per epoch
  c.sparsity.rule = "prox"
  c.sparsity.strength = 10.0
  return c
