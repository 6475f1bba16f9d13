"""Random lookup layers and their independent float64 NumPy reference, shared by the inference test modules."""

import ml_dtypes
import numpy as np

from lcnn_jax.inference.records import LookupLayer


def random_layer(rng, *, m, n, k, kernel, strides, padding, size, density) -> LookupLayer:
  """A lookup layer with random D (m, k), P (kh, kw, k, n) of about ``density`` non-zeros, and a random bias."""
  dictionary = rng.standard_normal((m, k)).astype(np.float32)
  shape = (*kernel, k, n)
  coefficients = (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(np.float32)
  return LookupLayer.from_coefficients(dictionary, coefficients, rng.standard_normal(n).astype(np.float32),
                                                strides=strides, padding=padding, input_size=size)


def dense_reference(layer: LookupLayer, x) -> np.ndarray:
  """The convolution with the reconstructed kernel W = D·P of ``layer`` as stored, in float64 NumPy (independent
  of XLA and of the backends)."""
  (ph, pw), (sh, sw), (kh, kw) = layer.padding, layer.strides, layer.kernel_size
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
  kernel = np.einsum("mk,rcko->rcmo", layer.float_dictionary().astype(np.float64),
                     layer.coefficients().astype(np.float64))
  return np.einsum("bhwmrc,rcmo->bhwo", windows, kernel) + layer.bias


def max_pool_reference(x, window, strides, padding, relu):
  """Max pooling of an NHWC array in float64 numpy, positions outside x left out (independent of XLA)."""
  (top, bottom), (left, right) = padding
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)),
                  constant_values=-np.inf)
  windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=(1, 2))[:, ::strides[0], ::strides[1]]
  pooled = windows.max(axis=(-2, -1))
  return np.maximum(pooled, 0) if relu else pooled


def bfloat16_s_reference(layer: LookupLayer, x, x_in_bfloat16: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The lookups of ``layer`` over S = x·D rounded to bfloat16 (to the nearest even), in float64 NumPy otherwise:
  what ``lookup:s=bfloat16`` computes, independent of XLA and of the kernel; with ``x_in_bfloat16``, x itself
  rounded to bfloat16 first (a dictionary stage in bfloat16 dot products).

  Returns (expected, ambiguity): an element of S that lies closer to a rounding boundary of bfloat16 (the midpoint
  between two neighbours) than a float32 sum of its m products can err (m · 2⁻²³ · Σ|x||D|) may round either way
  in the kernel; ``ambiguity`` is, per output, the largest change that leaves in it (Σ over its non-zeros of
  |coefficient| · one bfloat16 step of each such element), 0 where none.
  """
  (ph, pw), (sh, sw), (kh, kw) = layer.padding, layer.strides, layer.kernel_size
  x = np.asarray(x, np.float32)
  if x_in_bfloat16:
    x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  d = layer.float_dictionary().astype(np.float64)
  s = np.einsum("bhwm,mk->bhwk", x.astype(np.float64), d)
  rounded = s.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  sum_error = layer.in_features * 2.0 ** -23 * np.einsum("bhwm,mk->bhwk", np.abs(x.astype(np.float64)), np.abs(d))
  exponent = np.floor(np.log2(np.maximum(np.abs(s), np.finfo(np.float32).tiny)))
  step = 2.0 ** (exponent - 7)  # bfloat16's spacing at |s|
  to_midpoint = np.abs(np.abs(s) / step % 1.0 - 0.5) * step
  doubtful = np.where(to_midpoint <= 2 * sum_error + 2.0 ** -24 * np.abs(s), 2 * step, 0.0)

  def lookups(values, coefficients):
    padded = np.pad(values, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    return np.einsum("bhwkrc,rcko->bhwo", windows, coefficients)

  p = layer.coefficients().astype(np.float64)
  return lookups(rounded, p) + layer.bias, lookups(doubtful, np.abs(p))
