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


def bfloat16_s_reference(layer: LookupLayer, x, x_in_bfloat16: bool = False) -> np.ndarray:
  """The lookups of ``layer`` over S = x·D rounded to bfloat16 (to the nearest even, from its float32 value), in
  float64 NumPy otherwise: what ``lookup:s=bfloat16`` computes, independent of XLA and of the kernel; with
  ``x_in_bfloat16``, x itself rounded to bfloat16 first (a dictionary stage in bfloat16 dot products)."""
  (ph, pw), (sh, sw), (kh, kw) = layer.padding, layer.strides, layer.kernel_size
  x = np.asarray(x, np.float32)
  if x_in_bfloat16:
    x = x.astype(ml_dtypes.bfloat16)
  s = np.einsum("bhwm,mk->bhwk", x.astype(np.float64), layer.float_dictionary().astype(np.float64))
  s = s.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  padded = np.pad(s, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
  return np.einsum("bhwkrc,rcko->bhwo", windows, layer.coefficients().astype(np.float64)) + layer.bias
