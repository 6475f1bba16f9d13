"""The speed/accuracy spectrum on Fashion-MNIST (``python -m lcnn_jax.experiments.spectrum``).

    python -m lcnn_jax.experiments.spectrum --config configs/experiments/spectrum_fashion.py \\
        --workdir runs/spectrum_fashion --sizes 2,4,8,16 --strengths 1,4 [--config.seed=S]

``configs/fashion_mnist_lcnn.py`` shortened to 3 epochs per point (1,404 steps), so that the CNN and eight LCNN
points fit in 90 minutes on 2 idle CPU cores; the experiment sets ``model.pool_size`` and ``sparsity.strength``
per point. The L1 step acts once per step: with a third of the full run's steps, a strength about three times
the full run's (0.5) gives it the same pull. One seed per command: run it with ``--config.seed=S`` in one
workdir per seed for error bars.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.train.epochs = 3
  c.train.warmup_steps = 100
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.sparsity.strength = 1.5  # the experiment sets it per point
  return c
