"""Digits-sized nets (CNN and LCNN twins) for the embedded 8×8 handwritten digits and other small inputs.

Three 3×3 convolutions of width w, 2w, 4w (Conv → BN → ReLU, a 2×2 max-pool after the second), a global
average pool, dropout and a linear classifier. The LCNN twin makes every convolution a lookup layer
(conv1 with ``first_pool``, conv2/conv3 with ``pool_size`` or ``pool_sizes``) and the classifier one when
``classifier_pool`` > 0; otherwise the twins are identical, so their accuracies compare like the paper's rows.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
from flax import nnx

from lcnn_jax.models import common


class DigitsNet(nnx.Module):
  """A small CNN, or LCNN where dictionary sizes are > 0.

  Args:
    num_classes: outputs of the classifier.
    input_shape: one example's (height, width, channels); any side of at least 2.
    width: output channels of conv1 (conv2 has twice, conv3 four times as many).
    dictionary_sizes: dictionary sizes of conv1, conv2, conv3 and the classifier (0 = dense).
    dropout: the dropout rate before the classifier.
    initial_sparsity: sets the lookup layers' threshold τ.
    rngs: ``params`` initialises the weights; the model keeps a ``dropout`` stream for its dropout masks.
  """

  def __init__(self, num_classes: int, input_shape: Sequence[int], *, width: int = 32,
               dictionary_sizes: Sequence[int] = (0, 0, 0, 0), dropout: float = 0.5,
               initial_sparsity: float = 0.01, rngs: nnx.Rngs):
    height, image_width, channels = input_shape
    if min(height, image_width) < 2:
      raise ValueError(f"input_shape={tuple(input_shape)}: the digits nets need sides of at least 2 pixels.")
    if width <= 0:
      raise ValueError(f"model.width={width}: must be positive.")
    k1, k2, k3, k_classifier = dictionary_sizes
    widths = (width, 2 * width, 4 * width)

    def conv(i, o, size):
      return common.conv(i, o, 3, padding=1, dictionary_size=size, initial_sparsity=initial_sparsity, rngs=rngs)

    self.conv1, self.bn1 = conv(channels, widths[0], k1), common.batch_norm(widths[0], rngs=rngs)
    self.conv2, self.bn2 = conv(widths[0], widths[1], k2), common.batch_norm(widths[1], rngs=rngs)
    self.conv3, self.bn3 = conv(widths[1], widths[2], k3), common.batch_norm(widths[2], rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = common.dense(widths[2], num_classes, dictionary_size=k_classifier,
                                   initial_sparsity=initial_sparsity, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, h, w, c) images -> (batch, num_classes) logits."""
    x = nnx.relu(self.bn1(self.conv1(x)))  # (batch, 8, 8, w) for digits
    x = common.max_pool(nnx.relu(self.bn2(self.conv2(x))), 2, 2)  # (batch, 4, 4, 2w)
    x = nnx.relu(self.bn3(self.conv3(x)))  # (batch, 4, 4, 4w)
    return self.classifier(self.dropout(common.global_average_pool(x)))


def digits(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
           rngs: nnx.Rngs) -> DigitsNet:
  """The dense digits CNN, twin of ``digits-lcnn``."""
  return DigitsNet(num_classes, input_shape, width=config.width, dropout=config.dropout, rngs=rngs)


def digits_lcnn(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
                rngs: nnx.Rngs) -> DigitsNet:
  """The digits LCNN: ``first_pool``, ``pool_size`` (or 2 ``pool_sizes``: conv2, conv3), ``classifier_pool``."""
  k2, k3 = common.conv_pools(config, 2, "conv2, conv3")
  return DigitsNet(num_classes, input_shape, width=config.width,
                   dictionary_sizes=(config.first_pool, k2, k3, config.classifier_pool), dropout=config.dropout,
                   initial_sparsity=config.initial_sparsity, rngs=rngs)
