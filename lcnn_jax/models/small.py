"""Digits-sized nets (CNN and LCNN twins) for the embedded 8×8 handwritten digits and other small inputs.

Three 3×3 convolutions of width w, 2w, 4w (Conv → BN → ReLU, a 2×2 max-pool after the second), a global
average pool, dropout and a linear classifier. The LCNN twin makes every convolution a lookup layer
(``model.dictionary``: conv1 with ``first``, conv2/conv3 with ``convs``) and the classifier one when
``classifier`` > 0; otherwise the twins are identical, so their accuracies compare like the paper's rows.

``model.convs_per_stage`` = n > 1 deepens the nets for few-iteration learning: each of conv1, conv2, conv3 is
followed by n − 1 more 3×3 convolutions of its width (``conv1_2``, ``conv1_3``, …, each with its BatchNorm; in
the LCNN with conv2's, conv3's and conv3's dictionary size), the max-pool after the last convolution of width 2w.

The 28×28 twins ``mnist`` and ``mnist-lcnn`` (Fashion-MNIST, MNIST and the rest of the IDX family) are the same
nets with a second max-pool after the last convolution of width w: conv1 runs at 28×28, conv2 at 14×14, conv3 at
7×7, so a training step costs about a quarter of what the digits layout would at 28×28, and the dictionary
stage of each lookup layer runs on the smaller maps.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import ml_collections
from flax import nnx

from lcnn_jax import config as config_lib
from lcnn_jax.models import common


class DigitsNet(nnx.Module):
  """A small CNN, or LCNN where dictionary sizes are > 0.

  Args:
    num_classes: outputs of the classifier.
    input_shape: one example's (height, width, channels); any side of at least 2.
    width: output channels of conv1 (conv2 has twice, conv3 four times as many).
    dictionary_sizes: dictionary sizes of conv1, conv2, conv3 and the classifier (0 = dense).
    dropout: the dropout rate before the classifier.
    convs_per_stage: 3×3 convolutions at each width (1: conv1, conv2, conv3 only).
    pool_after: the stages (0: width w, 1: 2w, 2: 4w) followed by a 2×2 max-pool.
    head: what the classifier reads: ``average`` (conv3's global average, 4w numbers) or ``flatten`` (every
      pixel of conv3's last map, h'·w'·4w numbers: the position of a feature counts).
    initial_sparsity: sets the lookup layers' threshold τ.
    rngs: ``params`` initialises the weights; the model keeps a ``dropout`` stream for its dropout masks.
  """

  def __init__(self, num_classes: int, input_shape: Sequence[int], *, width: int = 32,
               dictionary_sizes: Sequence[int] = (0, 0, 0, 0), dropout: float = 0.5,
               initial_sparsity: float = 0.01, convs_per_stage: int = 1,
               pool_after: Sequence[int] = (1,), head: str = "average", rngs: nnx.Rngs):
    height, image_width, channels = input_shape
    if min(height, image_width) < 2:
      raise ValueError(f"input_shape={tuple(input_shape)}: the digits nets need sides of at least 2 pixels.")
    if width <= 0:
      raise ValueError(f"model.width={width}: must be positive.")
    if convs_per_stage < 1:
      raise ValueError(f"model.convs_per_stage={convs_per_stage}: must be at least 1.")
    if head not in config_lib.HEADS:
      raise ValueError(f"model.head={head!r}: expected one of {config_lib.HEADS}.")
    k1, k2, k3, k_classifier = dictionary_sizes
    self.pool_after, self.head = tuple(pool_after), head
    widths = (width, 2 * width, 4 * width)

    def conv(i, o, size):
      return common.conv(i, o, 3, padding=1, dictionary_size=size, initial_sparsity=initial_sparsity, rngs=rngs)

    self.conv1, self.bn1 = conv(channels, widths[0], k1), common.batch_norm(widths[0], rngs=rngs)
    self.conv2, self.bn2 = conv(widths[0], widths[1], k2), common.batch_norm(widths[1], rngs=rngs)
    self.conv3, self.bn3 = conv(widths[1], widths[2], k3), common.batch_norm(widths[2], rngs=rngs)
    # Deeper nets: conv{s}_2 .. conv{s}_n keep the width of conv{s}; their inputs are as wide as conv{s+1}'s.
    self.stage_names = tuple(tuple([f"{s}"] + [f"{s}_{i}" for i in range(2, convs_per_stage + 1)])
                             for s in (1, 2, 3))
    for (_, *extra), w, k in zip(self.stage_names, widths, (k2, k3, k3)):
      for name in extra:
        setattr(self, f"conv{name}", conv(w, w, k))
        setattr(self, f"bn{name}", common.batch_norm(w, rngs=rngs))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    side = lambda n: functools.reduce(lambda m, _: common.pooled_size(m, 2, 2), self.pool_after, n)
    features = widths[2] * (side(height) * side(image_width) if head == "flatten" else 1)
    self.classifier = common.dense(features, num_classes, dictionary_size=k_classifier,
                                   initial_sparsity=initial_sparsity, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, h, w, c) images -> (batch, num_classes) logits."""
    for stage, names in enumerate(self.stage_names):
      for name in names:  # (batch, 8, 8, w), (batch, 8, 8, 2w), (batch, 4, 4, 4w) for digits
        x = nnx.relu(getattr(self, f"bn{name}")(getattr(self, f"conv{name}")(x)))
      if stage in self.pool_after:
        x = common.max_pool(x, 2, 2)  # digits: (batch, 4, 4, 2w); mnist: (batch, 14, 14, w), (batch, 7, 7, 2w)
    features = x.reshape(x.shape[0], -1) if self.head == "flatten" else common.global_average_pool(x)
    return self.classifier(self.dropout(features))


def digits(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
           rngs: nnx.Rngs) -> DigitsNet:
  """The dense digits CNN, twin of ``digits-lcnn``."""
  return DigitsNet(num_classes, input_shape, width=config.width, dropout=config.dropout,
                   convs_per_stage=config.convs_per_stage, head=config.head, rngs=rngs)


def digits_lcnn(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
                rngs: nnx.Rngs) -> DigitsNet:
  """The digits LCNN: ``model.dictionary`` = {first, convs (one size, or 2: conv2, conv3), classifier}."""
  return _small_lcnn(config, num_classes, input_shape, rngs)


def _small_lcnn(config: ml_collections.ConfigDict, num_classes: int, input_shape: Sequence[int], rngs: nnx.Rngs,
                **net_options) -> DigitsNet:
  """A :class:`DigitsNet` LCNN with ``model.dictionary``'s sizes; ``net_options`` (e.g. ``pool_after``) go to it."""
  k2, k3 = common.conv_dictionaries(config, 2, "conv2, conv3")
  return DigitsNet(num_classes, input_shape, width=config.width,
                   dictionary_sizes=(config.dictionary.first, k2, k3, config.dictionary.classifier),
                   dropout=config.dropout, initial_sparsity=config.initial_sparsity,
                   convs_per_stage=config.convs_per_stage, head=config.head, rngs=rngs, **net_options)


MNIST_POOLS = (0, 1)  # 28 → 14 after conv1, 14 → 7 after conv2.


def mnist(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
          rngs: nnx.Rngs) -> DigitsNet:
  """The dense 28×28 CNN (conv1 at 28×28, conv2 at 14×14, conv3 at 7×7), twin of ``mnist-lcnn``."""
  return DigitsNet(num_classes, input_shape, width=config.width, dropout=config.dropout,
                   convs_per_stage=config.convs_per_stage, pool_after=MNIST_POOLS, head=config.head, rngs=rngs)


def mnist_lcnn(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
               rngs: nnx.Rngs) -> DigitsNet:
  """The 28×28 LCNN: dictionary sizes as ``digits-lcnn``'s, the pooling of ``mnist``."""
  return _small_lcnn(config, num_classes, input_shape, rngs, pool_after=MNIST_POOLS)
