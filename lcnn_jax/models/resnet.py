"""ResNet and ResNet-LCNN for ImageNet (the original's ``models/resnet*.lua``, fb.resnet.torch lineage).

Basic blocks (conv3×3-BN-ReLU-conv3×3-BN plus the shortcut, then ReLU), shortcut type B (a 1×1 projection
with BN where the width changes, identity elsewhere), depths 8 {1,1,1,1}, 18 {2,2,2,2} and 34 {3,4,6,3}.
ResNet-LCNN keeps the original's rules:

* the 7×7 stem is a lookup layer with ``model.dictionary.first`` and every 3×3 convolution of stage i one with
  ``model.dictionary.stage<i>``,
  except that a convolution stays dense when its dictionary would have at least out·kh·kw atoms (as many atoms
  as the vectors it codes), or when the size is 0;
* the 1×1 projection shortcuts and the final fully connected layer stay dense.

The head is a global average pool (the original's 7×7 average at 224×224 input), so any input size works.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
from absl import logging
from flax import nnx

from lcnn_jax.models import common

STAGE_BLOCKS = {8: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


def dictionary_or_dense(dictionary_size: int, out_features: int, kernel_size: int) -> int:
  """The original's rule: 0 (dense) when the dictionary would code no fewer atoms than out·kh·kw vectors."""
  if dictionary_size >= out_features * kernel_size * kernel_size:
    logging.info("A %dx%d convolution with %d outputs stays dense: a dictionary of %d atoms is no smaller.",
                 kernel_size, kernel_size, out_features, dictionary_size)
    return 0
  return dictionary_size


class BasicBlock(nnx.Module):
  """conv3×3 (strided) - BN - ReLU - conv3×3 - BN, plus the shortcut, then ReLU."""

  def __init__(self, in_features: int, out_features: int, strides: int, *, dictionary_size: int,
               initial_sparsity: float, rngs: nnx.Rngs):
    size = dictionary_or_dense(dictionary_size, out_features, 3)
    self.conv1 = common.conv(in_features, out_features, 3, strides=strides, padding=1, dictionary_size=size,
                             initial_sparsity=initial_sparsity, rngs=rngs)
    self.bn1 = common.batch_norm(out_features, rngs=rngs)
    self.conv2 = common.conv(out_features, out_features, 3, padding=1, dictionary_size=size,
                             initial_sparsity=initial_sparsity, rngs=rngs)
    self.bn2 = common.batch_norm(out_features, rngs=rngs)
    if in_features != out_features:  # Shortcut type B: project only where the width changes.
      self.shortcut_conv = common.conv(in_features, out_features, 1, strides=strides, rngs=rngs)
      self.shortcut_bn = common.batch_norm(out_features, rngs=rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  """An ImageNet ResNet of basic blocks; dictionary sizes of 0 give the dense CNN.

  Args:
    depth: 8, 18 or 34.
    num_classes: outputs of the final dense layer.
    in_channels: input channels (3 for RGB).
    first_dictionary: dictionary size of the 7×7 stem (0 = dense).
    stage_dictionaries: dictionary sizes of the 3×3 convolutions of stages 1..4 (0 = dense).
    initial_sparsity: sets the lookup layers' threshold τ.
    rngs: ``params`` initialises the weights.
  """

  def __init__(self, depth: int, num_classes: int, in_channels: int = 3, *, first_dictionary: int = 0,
               stage_dictionaries: Sequence[int] = (0, 0, 0, 0), initial_sparsity: float = 0.01, rngs: nnx.Rngs):
    if depth not in STAGE_BLOCKS:
      raise ValueError(f"model.depth={depth}: expected one of {sorted(STAGE_BLOCKS)}.")
    self.conv1 = common.conv(in_channels, 64, 7, strides=2, padding=3,
                             dictionary_size=dictionary_or_dense(first_dictionary, 64, 7),
                             initial_sparsity=initial_sparsity, rngs=rngs)
    self.bn1 = common.batch_norm(64, rngs=rngs)
    stages = []
    in_features = 64
    for stage, (blocks, width, size) in enumerate(zip(STAGE_BLOCKS[depth], STAGE_WIDTHS, stage_dictionaries)):
      stage_blocks = []
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        stage_blocks.append(BasicBlock(in_features, width, strides, dictionary_size=size,
                                       initial_sparsity=initial_sparsity, rngs=rngs))
        in_features = width
      stages.append(nnx.List(stage_blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.fc = common.dense(in_features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, h, w, c) images -> (batch, num_classes) logits."""
    x = common.max_pool(nnx.relu(self.bn1(self.conv1(x))), 3, 2, padding=1)  # (batch, 56, 56, 64) at 224
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return self.fc(common.global_average_pool(x))  # (batch, 7, 7, 512) -> (batch, num_classes)


def resnet(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
           rngs: nnx.Rngs) -> ResNet:
  """The dense ResNet of ``models/resnet.lua`` (69.3% top-1 for depth 18 in the paper)."""
  return ResNet(config.depth, num_classes, input_shape[-1], rngs=rngs)


def resnet_lcnn(config: ml_collections.ConfigDict, *, num_classes: int, input_shape: Sequence[int],
                rngs: nnx.Rngs) -> ResNet:
  """ResNet-LCNN of ``models/resnet-lcnn.lua``: ``model.dictionary`` = {first, stage1, stage2, stage3, stage4}."""
  d = config.dictionary
  return ResNet(config.depth, num_classes, input_shape[-1], first_dictionary=d.first,
                stage_dictionaries=(d.stage1, d.stage2, d.stage3, d.stage4),
                initial_sparsity=config.initial_sparsity, rngs=rngs)
