"""The LCNN twin of ``configs/fashion_mnist.py``: every convolution a lookup layer.

    python -m lcnn_jax.main --config configs/fashion_mnist_lcnn.py --workdir runs/fm_lcnn
    python -m lcnn_jax.flops --workdir runs/fm_lcnn          # counted speedup over the ``mnist`` CNN

The ``mnist-lcnn`` net is the CNN's layout (3×3 convolutions of width 32/64/128 at 28×28, 14×14 and 7×7): conv1
looks up a 1-atom dictionary of its single grey channel (exact, k = m = 1), conv2 and conv3 dictionaries of 8
atoms, trained with the L1 proximal rule; the classifier stays dense (1,280 multiplications). The dictionary
stage of conv2 and conv3 costs 0.11M multiplications per image against the CNN's 7.45M, so a 10× counted speedup
needs about 40% or fewer of the lookup coefficients. Measured (one seed, docs/experiments.md): 87.86% top-1 at
10.6× counted speedup, densities 0.48/0.39/0.28, 16.7 CPU-minutes.

The sparsity is a fixed ``sparsity.strength`` until ``sparsity.target_speedup`` is available: the L1 weight
acts once per step, so it is tied to this schedule (10 epochs of 468 steps at a cosine learning rate of 0.1);
a run with other steps or rates needs another strength.
"""

from lcnn_jax import config as config_lib


def get_config():
  return config_lib.fashion_mnist_config(lcnn=True)
