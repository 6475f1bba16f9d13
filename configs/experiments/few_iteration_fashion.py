"""Few-iteration learning on Fashion-MNIST (``python -m lcnn_jax.experiments.few_iteration``).

    python -m lcnn_jax.experiments.few_iteration --config configs/experiments/few_iteration_fashion.py \\
        --workdir runs/few_iteration_fashion --shallow_depth 2 --deep_depth 3 --deep_steps 300 --eval_every 50 \\
        [--config.seed=S]

A shallow ``mnist-lcnn`` (two convolutions per width: conv1 and ``conv1_2`` at 28×28, …, 3 epochs) learns
dictionaries; a deeper one (three per width) reuses them (``conv1_3`` takes ``conv1_2``'s, …) and trains only
indices and coefficients, against the deeper CNN and LCNN from scratch, all for the same few steps. The
experiment sets ``model.convs_per_stage``, the run lengths and the transfer keys; the strength is raised for the
shorter run (see ``spectrum_fashion.py``). One seed per command: use ``--config.seed=S`` and one workdir per seed.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.train.epochs = 3
  c.train.warmup_steps = 100
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.sparsity.strength = 1.5
  return c
