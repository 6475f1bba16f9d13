"""AlexNet, the paper's CNN baseline, and AlexNet-LCNN (the original's ``models/alexnet*.lua``, REFERENCE §4).

Both have five convolutions (Conv → BN → ReLU, max-pool 3/2 after conv1, conv2 and conv5) and a classifier
written as convolutions over the feature map, as the original: fc6 a 6×6 convolution (the map's size at 224×224
input; the map's size in general, so other input sizes work), fc7 and fc8 1×1 convolutions.

* ``alexnet``: widths 96-256-384-384-256, BN eps 1e-5, Torch's ``SpatialDropout`` (whole channels, no rescaling
  in training, × (1 − p) at evaluation: :class:`SpatialDropout`) before fc6 and fc7.
* ``alexnet-lcnn``: widths 64-192-384-256-256, BN eps 1e-3, element-wise dropout (Torch's ``Dropout``, which
  rescales by 1 / (1 − p) in training, as ``nnx.Dropout``), every convolution a lookup
  layer (``model.dictionary``: conv1 with ``first``, conv2–conv5 with ``convs``), fc6/fc7 lookup layers with
  ``fc`` (0 = dense) and fc8 with ``classifier`` (0 = dense).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lcnn_jax.models import common

CNN_WIDTHS = (96, 256, 384, 384, 256)
LCNN_WIDTHS = (64, 192, 384, 256, 256)
FC_WIDTH = 4096
MIN_INPUT_SIZE = 63  # The smallest side that leaves a 1×1 map after the third max-pool.


def feature_map_size(size: int) -> int:
  """The side of the map fc6 sees for an input side ``size`` (224 -> 55 -> 27 -> 13 -> 6)."""
  size = common.pooled_size(size, 11, 4, 2)  # conv1
  size = common.pooled_size(size, 3, 2)  # pool1; conv2–conv5 keep the size
  size = common.pooled_size(size, 3, 2)  # pool2
  return common.pooled_size(size, 3, 2)  # pool5


class SpatialDropout(nnx.Dropout):
  """Torch's ``nn.SpatialDropout``: drops whole channels of (batch, h, w, c) maps with probability ``rate``
  and, unlike ``nnx.Dropout``, does not rescale the kept ones in training; at evaluation it multiplies every
  value by (1 − rate) instead, so both modes see the same expected activation."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    super().__init__(rate, broadcast_dims=(1, 2), rngs=rngs)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic:
      return inputs * (1.0 - self.rate)
    kept = super().__call__(jnp.ones_like(inputs), deterministic=False)  # 1 / (1 − rate) where kept, else 0
    return jnp.where(kept > 0, inputs, jnp.zeros_like(inputs))


class AlexNet(nnx.Module):
  """AlexNet with configurable widths and per-layer dictionary sizes (0 = dense).

  Args:
    num_classes: outputs of fc8.
    input_shape: one example's (height, width, channels); fixes fc6's kernel to the final feature map.
    widths: output channels of conv1..conv5.
    dictionary_sizes: dictionary sizes of conv1..conv5, fc6, fc7, fc8 (8 values; 0 keeps the layer dense).
    bn_epsilon: BatchNorm epsilon (the original: 1e-5 in the CNN, 1e-3 in the LCNN).
    spatial_dropout: Torch's SpatialDropout (:class:`SpatialDropout`) instead of element-wise dropout.
    dropout: the dropout rate before fc6 and fc7.
    initial_sparsity: sets the lookup layers' threshold τ.
    rngs: ``params`` initialises the weights; the model keeps a ``dropout`` stream for its dropout masks.
  """

  def __init__(self, num_classes: int, input_shape: Sequence[int], *, widths: Sequence[int] = CNN_WIDTHS,
               dictionary_sizes: Sequence[int] = (0,) * 8, bn_epsilon: float = 1e-5, spatial_dropout: bool = True,
               dropout: float = 0.5, initial_sparsity: float = 0.01, rngs: nnx.Rngs):
    height, width, channels = input_shape
    if min(height, width) < MIN_INPUT_SIZE:
      raise ValueError(f"input_shape={tuple(input_shape)}: AlexNet needs sides of at least {MIN_INPUT_SIZE} "
                       "pixels (224 in the paper); set data.image_size.")
    if len(widths) != 5 or len(dictionary_sizes) != 8:
      raise ValueError(f"widths={tuple(widths)}, dictionary_sizes={tuple(dictionary_sizes)}: expected 5 widths "
                       "and 8 dictionary sizes (conv1..conv5, fc6, fc7, fc8).")
    self.num_classes = num_classes
    map_size = (feature_map_size(height), feature_map_size(width))
    k = tuple(dictionary_sizes)
    w1, w2, w3, w4, w5 = widths

    def conv(i, o, kernel, strides, padding, size):
      return common.conv(i, o, kernel, strides=strides, padding=padding, dictionary_size=size,
                         initial_sparsity=initial_sparsity, rngs=rngs)

    def bn(features):
      return common.batch_norm(features, epsilon=bn_epsilon, rngs=rngs)

    self.conv1, self.bn1 = conv(channels, w1, 11, 4, 2, k[0]), bn(w1)
    self.conv2, self.bn2 = conv(w1, w2, 5, 1, 2, k[1]), bn(w2)
    self.conv3, self.bn3 = conv(w2, w3, 3, 1, 1, k[2]), bn(w3)
    self.conv4, self.bn4 = conv(w3, w4, 3, 1, 1, k[3]), bn(w4)
    self.conv5, self.bn5 = conv(w4, w5, 3, 1, 1, k[4]), bn(w5)
    make_dropout = SpatialDropout if spatial_dropout else nnx.Dropout
    self.dropout6 = make_dropout(dropout, rngs=rngs)
    self.fc6, self.bn6 = conv(w5, FC_WIDTH, map_size, 1, 0, k[5]), bn(FC_WIDTH)
    self.dropout7 = make_dropout(dropout, rngs=rngs)
    self.fc7, self.bn7 = conv(FC_WIDTH, FC_WIDTH, 1, 1, 0, k[6]), bn(FC_WIDTH)
    self.fc8 = conv(FC_WIDTH, num_classes, 1, 1, 0, k[7])

  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, h, w, c) images -> (batch, num_classes) logits."""
    x = common.max_pool(nnx.relu(self.bn1(self.conv1(x))), 3, 2)  # (batch, 27, 27, w1) at 224
    x = common.max_pool(nnx.relu(self.bn2(self.conv2(x))), 3, 2)  # (batch, 13, 13, w2)
    x = nnx.relu(self.bn3(self.conv3(x)))
    x = nnx.relu(self.bn4(self.conv4(x)))
    x = common.max_pool(nnx.relu(self.bn5(self.conv5(x))), 3, 2)  # (batch, 6, 6, w5)
    x = nnx.relu(self.bn6(self.fc6(self.dropout6(x))))  # (batch, 1, 1, 4096)
    x = nnx.relu(self.bn7(self.fc7(self.dropout7(x))))
    return self.fc8(x).reshape(x.shape[0], self.num_classes)


def alexnet(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
            rngs: nnx.Rngs) -> AlexNet:
  """The CNN baseline of ``models/alexnet.lua`` (56.6% top-1 in the paper)."""
  return AlexNet(num_classes, input_shape, widths=CNN_WIDTHS, bn_epsilon=1e-5, spatial_dropout=True,
                 dropout=config.dropout, rngs=rngs)


def alexnet_lcnn(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
                 rngs: nnx.Rngs) -> AlexNet:
  """AlexNet-LCNN of ``models/alexnet-lcnn.lua``: ``model.dictionary`` = {first, convs, fc, classifier}."""
  dictionary = config.dictionary
  sizes = (dictionary.first, *common.conv_dictionaries(config, 4, "conv2..conv5"), dictionary.fc, dictionary.fc,
           dictionary.classifier)
  return AlexNet(num_classes, input_shape, widths=LCNN_WIDTHS, dictionary_sizes=sizes, bn_epsilon=1e-3,
                 spatial_dropout=False, dropout=config.dropout, initial_sparsity=config.initial_sparsity,
                 rngs=rngs)
