"""Building blocks shared by the model files, initialised as the original (REFERENCE §3).

* dense convolutions and linear layers: He-normal, std √(2 / fan_in), bias 0;
* BatchNorm: γ ~ U(0, 1) and β = 0 (Torch's default, kept on purpose), Torch momentum 0.1 = Flax 0.9;
* lookup layers: :class:`~lcnn_jax.layers.LookupConv` / :class:`~lcnn_jax.layers.LookupDense` and their own
  Torch-default init.

A ``dictionary_size`` of 0 means "keep this layer dense", the original's ``fcPool = 0`` convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lcnn_jax.layers import LookupConv, LookupDense

he_normal = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
torch_bn_scale = jax.nn.initializers.uniform(1.0)  # U[0, 1)
TORCH_BN_MOMENTUM = 0.9  # Torch's momentum 0.1 on the new statistics.


def conv(in_features: int, out_features: int, kernel_size: int | tuple[int, int], *, strides: int = 1,
         padding: int = 0, dictionary_size: int = 0, initial_sparsity: float = 0.01,
         rngs: nnx.Rngs) -> nnx.Conv | LookupConv:
  """A Torch-style convolution (explicit zero padding, bias): lookup when ``dictionary_size`` > 0, else dense."""
  if dictionary_size > 0:
    return LookupConv(in_features, out_features, kernel_size, dictionary_size=dictionary_size, strides=strides,
                      padding=padding, initial_sparsity=initial_sparsity, rngs=rngs)
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size, kernel_size)  # nnx.Conv reads a bare int as a 1-D kernel.
  return nnx.Conv(in_features, out_features, tuple(kernel_size), strides=strides, padding=((padding, padding),) * 2,
                  kernel_init=he_normal, bias_init=nnx.initializers.zeros, rngs=rngs)


def dense(in_features: int, out_features: int, *, dictionary_size: int = 0, initial_sparsity: float = 0.01,
          rngs: nnx.Rngs) -> nnx.Linear | LookupDense:
  """A fully connected layer with bias: lookup when ``dictionary_size`` > 0, else dense."""
  if dictionary_size > 0:
    return LookupDense(in_features, out_features, dictionary_size=dictionary_size,
                       initial_sparsity=initial_sparsity, rngs=rngs)
  return nnx.Linear(in_features, out_features, kernel_init=he_normal, bias_init=nnx.initializers.zeros, rngs=rngs)


def batch_norm(num_features: int, *, epsilon: float = 1e-5, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """Torch's SpatialBatchNormalization: γ ~ U(0, 1), β = 0, momentum 0.1 (Flax 0.9)."""
  return nnx.BatchNorm(num_features, momentum=TORCH_BN_MOMENTUM, epsilon=epsilon, scale_init=torch_bn_scale,
                       rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Torch's SpatialMaxPooling (floor mode; padding counts as −∞)."""
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)


def pooled_size(size: int, window: int, stride: int, padding: int = 0) -> int:
  """The output length of a convolution or pooling window along one axis (floor mode)."""
  return (size + 2 * padding - window) // stride + 1


def global_average_pool(x: jax.Array) -> jax.Array:
  """(batch, h, w, c) -> (batch, c)."""
  return jnp.mean(x, axis=(1, 2))


def conv_dictionaries(config: ml_collections.ConfigDict, count: int, layers: str) -> tuple[int, ...]:
  """The dictionary sizes of a net's convolutions after the first, from ``model.dictionary.convs``: one size for
  every one of them, or ``count`` sizes.

  Args:
    config: the model config.
    count: how many sizes the net takes.
    layers: the layers they belong to, for the error message (e.g. 'conv2..conv5').
  """
  convs = config.dictionary.convs
  if not isinstance(convs, (tuple, list)):
    return (int(convs),) * count
  if len(convs) == 1:
    return (int(convs[0]),) * count
  if len(convs) != count:
    raise ValueError(f"model.dictionary.convs={tuple(convs)}: {config.name} takes one size or {count} ({layers}).")
  return tuple(int(k) for k in convs)
