"""The speed/accuracy spectrum on Fashion-MNIST (``python -m lcnn_jax.experiments.spectrum``).

    python -m lcnn_jax.experiments.spectrum --config configs/experiments/spectrum_fashion.py \\
        --workdir runs/spectrum_fashion --sizes 2,4,8,16 --strengths 0.1,0.4 [--config.seed=S]

``configs/fashion_mnist_lcnn.py`` shortened to 3 epochs per point (1,404 steps), so that the CNN and eight LCNN
points fit in 90 minutes on 2 idle CPU cores; the experiment sets ``model.dictionary.convs`` and ``sparsity.strength``
per point (or, with ``--targets``, the target speedup). The strengths are in the momentum-aware units of
``docs/operating_points.md``; 0.17 is about three times the 10-epoch run's starting strength, for a third of its
steps. One seed per command: run it with ``--config.seed=S`` in one
workdir per seed for error bars.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.train.epochs = 3
  c.train.warmup_steps = 100
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.sparsity.target_speedup = 0.0  # a fixed strength per run, as the digits experiments
  c.sparsity.strength = 0.17  # the experiment sets it per point
  return c
