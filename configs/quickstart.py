"""The embedded default: an LCNN on scikit-learn's handwritten digits, about a minute on 2 CPU cores.

    python -m lcnn_jax.main --config configs/quickstart.py --workdir runs/quickstart

The digits LCNN (three 3×3 lookup convolutions of width 32/64/128 and a dense classifier) trains on the
1,437-image training split with the L1 proximal rule and is evaluated on the 360 held-out images; it ends by
printing its per-layer multiplications and the speedup over its dense twin, ``digits``. conv1 sees one grey
channel, so its one-atom dictionary is exact (k = m = 1).
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.model.name = "digits-lcnn"
  c.model.width = 32
  c.model.first_pool = 1
  c.model.pool_size = 8
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
