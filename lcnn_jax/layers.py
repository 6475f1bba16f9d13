"""Lookup layers: a convolution or dense layer as a dictionary and sparse coefficients (REFERENCE §1–3).

A convolution with kernel W (kh, kw, m, n) becomes two stages:

* the dictionary D (m, k): a 1×1 convolution, no bias, S = X ⊛ D with k channels (the layer's zero
  padding is applied here);
* the coefficients P (kh, kw, k, n): an ordinary kh×kw convolution over S with the layer's stride and
  no padding, plus the bias.

The equivalent dense kernel is W[r, c, :, o] = Σ_j P[r, c, j, o] · D[:, j]. Entries of P with |P| ≤ τ,
τ = initial_sparsity / √(kh·kw·k), are zero on every forward pass. At inference each output is
Σ C · S[I] over the non-zeros of P at shifted taps: the *lookups*.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcnn_jax.lookups import Lookups

IntOrPair = int | Sequence[int]


class Dictionary(nnx.Param):
  """The dictionary D of a lookup layer, shape (in_features, dictionary_size)."""


class Coefficients(nnx.Param):
  """The sparse coefficients P of a lookup layer, shape (kh, kw, dictionary_size, out_features)."""


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
  if isinstance(value, int):
    pair = (value, value)
  else:
    pair = tuple(int(v) for v in value)
  if len(pair) != 2:
    raise ValueError(f"{name}={value!r}: expected an int or a pair of ints.")
  return pair


def threshold_value(initial_sparsity: float, taps: int, dictionary_size: int) -> float:
  """τ = initial_sparsity / √(kh·kw·k): the magnitude at or below which a coefficient is zero."""
  return initial_sparsity / math.sqrt(taps * dictionary_size)


def apply_threshold(coefficients: jax.Array, threshold: float) -> jax.Array:
  """P with every entry of magnitude ≤ τ set to zero (the gradient is zero there too)."""
  return jnp.where(jnp.abs(coefficients) > threshold, coefficients, jnp.zeros_like(coefficients))


def _uniform(bound: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dictionary_stage(x: jax.Array, dictionary: jax.Array, padding: tuple[int, int]) -> jax.Array:
  """S = X ⊛ D over the zero-padded input: (batch, h, w, m) -> (batch, h + 2·ph, w + 2·pw, k)."""
  s = jnp.einsum("bhwm,mk->bhwk", x, dictionary)  # (batch, h, w, k)
  # Zero-padding X and then applying the bias-free 1×1 dictionary equals padding S.
  ph, pw = padding
  return jnp.pad(s, ((0, 0), (ph, ph), (pw, pw), (0, 0)))


def lookup_conv_gather(x: jax.Array, dictionary: jax.Array, lookups: Lookups, bias: jax.Array | None,
                       strides: IntOrPair = 1, padding: IntOrPair = 0) -> jax.Array:
  """The reference lookup forward: S once, then per output Σ C · S[I] over its non-zeros at their shifted taps.

  Args:
    x: input (batch, h, w, m).
    dictionary: D (m, k).
    lookups: the non-zeros of P (kh, kw, k, n) (:class:`~lcnn_jax.lookups.Lookups`).
    bias: (n,) or None.
  Returns:
    (batch, oh, ow, n), equal to the dense convolution with the reconstructed kernel.
  """
  sh, sw = _pair(strides, "strides")
  s = dictionary_stage(x, dictionary, _pair(padding, "padding"))  # (batch, hp, wp, k)
  kh, kw, _, _ = lookups.shape
  oh = (s.shape[1] - kh) // sh + 1
  ow = (s.shape[2] - kw) // sw + 1
  taps = [s[:, r:r + sh * (oh - 1) + 1:sh, c:c + sw * (ow - 1) + 1:sw, :] for r in range(kh) for c in range(kw)]
  shifted = jnp.concatenate(taps, axis=-1)  # (batch, oh, ow, kh·kw·k): S at position (r·kw + c)·k + j
  positions, values = lookups.slots()  # (slots, n)
  gathered = jnp.take(shifted, jnp.asarray(positions), axis=-1)  # (batch, oh, ow, slots, n)
  out = jnp.einsum("bhwsn,sn->bhwn", gathered, jnp.asarray(values, s.dtype))
  if bias is not None:
    out = out + bias
  return out


def _lookup_parameters(in_features: int, out_features: int, taps: tuple[int, ...], dictionary_size: int,
                       use_bias: bool, param_dtype, rngs: nnx.Rngs):
  """D (m, k), P (*taps, k, n) and the bias (n,) with Torch's default init of each stage: U(±1/√fan_in)."""
  if dictionary_size <= 0:
    raise ValueError(f"dictionary_size={dictionary_size}: a lookup layer needs at least one atom.")
  if in_features <= 0 or out_features <= 0:
    raise ValueError(f"in_features={in_features}, out_features={out_features}: must be positive.")
  dictionary = Dictionary(
      _uniform(1 / math.sqrt(in_features))(rngs.params(), (in_features, dictionary_size), param_dtype))
  bound = 1 / math.sqrt(math.prod(taps) * dictionary_size)
  coefficients = Coefficients(_uniform(bound)(rngs.params(), (*taps, dictionary_size, out_features), param_dtype))
  bias = nnx.Param(_uniform(bound)(rngs.params(), (out_features,), param_dtype)) if use_bias else None
  return dictionary, coefficients, bias


class LookupConv(nnx.Module):
  """A convolution as a dictionary (1×1, no bias) followed by sparse coefficients (kh×kw, strided).

  Input and output are NHWC. ``padding`` is explicit zero padding as in Torch (not 'SAME'/'VALID').
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: IntOrPair, *, dictionary_size: int,
               strides: IntOrPair = 1, padding: IntOrPair = 0, use_bias: bool = True,
               initial_sparsity: float = 0.01, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = _pair(kernel_size, "kernel_size")
    self.strides = _pair(strides, "strides")
    self.padding = _pair(padding, "padding")
    self.dictionary_size = dictionary_size
    self.use_bias = use_bias
    self.initial_sparsity = initial_sparsity
    self.dtype = dtype
    kh, kw = self.kernel_size
    self.dictionary, self.coefficients, self.bias = _lookup_parameters(
        in_features, out_features, self.kernel_size, dictionary_size, use_bias, param_dtype, rngs)
    self.threshold = threshold_value(initial_sparsity, kh * kw, dictionary_size)

  def thresholded_coefficients(self) -> jax.Array:
    """P with |P| ≤ τ set to zero: the coefficients every forward pass uses."""
    return apply_threshold(self.coefficients[...], self.threshold)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    s = dictionary_stage(x, self.dictionary[...].astype(dtype), self.padding)  # (batch, hp, wp, k)
    y = jax.lax.conv_general_dilated(
        s, self.thresholded_coefficients().astype(dtype), window_strides=self.strides, padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (batch, oh, ow, n)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y

  def dense_kernel(self) -> jax.Array:
    """The equivalent dense kernel W (kh, kw, in_features, out_features)."""
    return jnp.einsum("mk,rcko->rcmo", self.dictionary[...], self.thresholded_coefficients())

  def lookups(self) -> Lookups:
    """The non-zeros of thresholded P (kh, kw, k, n), grouped per output."""
    return Lookups.from_coefficients(np.asarray(self.thresholded_coefficients()))

  def gather_forward(self, x: jax.Array) -> jax.Array:
    """The forward pass through :func:`lookup_conv_gather` (reference lookups, plain XLA)."""
    bias = self.bias[...] if self.bias is not None else None
    return lookup_conv_gather(x, self.dictionary[...], self.lookups(), bias, self.strides, self.padding)


class LookupDense(nnx.Module):
  """A dense layer as a dictionary (in_features, k) and sparse coefficients (k, out_features).

  The 1×1 case of :class:`LookupConv` for inputs whose last axis is the feature axis.
  """

  def __init__(self, in_features: int, out_features: int, *, dictionary_size: int, use_bias: bool = True,
               initial_sparsity: float = 0.01, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dictionary_size = dictionary_size
    self.use_bias = use_bias
    self.initial_sparsity = initial_sparsity
    self.dtype = dtype
    self.dictionary, self.coefficients, self.bias = _lookup_parameters(
        in_features, out_features, (), dictionary_size, use_bias, param_dtype, rngs)
    self.threshold = threshold_value(initial_sparsity, 1, dictionary_size)

  def thresholded_coefficients(self) -> jax.Array:
    """P with |P| ≤ τ set to zero."""
    return apply_threshold(self.coefficients[...], self.threshold)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    s = x.astype(dtype) @ self.dictionary[...].astype(dtype)  # (..., k)
    y = s @ self.thresholded_coefficients().astype(dtype)  # (..., n)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y

  def dense_kernel(self) -> jax.Array:
    """The equivalent dense kernel (in_features, out_features)."""
    return self.dictionary[...] @ self.thresholded_coefficients()

  def lookups(self) -> Lookups:
    """The non-zeros of thresholded P (k, n), grouped per output (the 1×1 case: shape (1, 1, k, n))."""
    return Lookups.from_coefficients(np.asarray(self.thresholded_coefficients()))

  def gather_forward(self, x: jax.Array) -> jax.Array:
    """The forward pass through the lookups: S = x·D, then Σ C · S[I] per output."""
    positions, values = self.lookups().slots()  # (slots, n)
    s = x @ self.dictionary[...]  # (..., k)
    gathered = jnp.take(s, jnp.asarray(positions), axis=-1)  # (..., slots, n)
    y = jnp.einsum("...sn,sn->...n", gathered, jnp.asarray(values, s.dtype))
    if self.bias is not None:
      y = y + self.bias[...]
    return y


LOOKUP_LAYERS = (LookupConv, LookupDense)


def eval_view(model: nnx.Module) -> nnx.Module:
  """The model in eval mode, as a view (the model itself is not changed): BatchNorm on its running statistics,
  dropout off. The one eval view of the trainer, the multiplication counter and the exporter."""
  return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


@contextlib.contextmanager
def replaced_calls(classes: Sequence[type], make: Callable[[Callable], Callable]) -> Iterator[None]:
  """Within the block, each class's ``__call__`` is ``make(original)``; the originals come back on exit.

  The one place where layer calls are intercepted: the multiplication counter records each layer's shapes
  through it and the exporter turns each layer into one equation of its graph.
  """
  originals = {cls: cls.__call__ for cls in classes}
  try:
    for cls, original in originals.items():
      cls.__call__ = make(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original
