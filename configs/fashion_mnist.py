"""A CNN for Fashion-MNIST (28×28 grey, 10 classes), about 17 CPU-minutes (10 epochs).

    apt-get install dataset-fashion-mnist    # or the four IDX files from the dataset's site, then data.dir
    python -m lcnn_jax.main --config configs/fashion_mnist.py --workdir runs/fm_cnn

The ``mnist`` net: three 3×3 convolutions of width 32/64/128 (BatchNorm, ReLU), 2×2 max-pools after the first
two (28×28 → 14×14 → 7×7), a global average pool, dropout and a linear classifier; 0.1M parameters and 7.4M
multiplications per image. Pooling early puts the wide convolutions on small maps: a training epoch of the
60,000 images costs about a quarter of what the same widths would at 28×28, which is what lets enough epochs
(with ±2 pixel translations and horizontal flips) fit in the time. It is the dense twin of
``configs/fashion_mnist_lcnn.py``; its 10-epoch LCNN twin took 16.7 CPU-minutes (docs/experiments.md).
"""

from lcnn_jax import config as config_lib


def get_config():
  return config_lib.fashion_mnist_config(lcnn=False)
