"""LookupConv and LookupDense against a dense convolution and an independent float64 NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import layers


def numpy_lookup_conv(x, dictionary, coefficients, bias, strides, padding, initial_sparsity=0.01):
  """REFERENCE §1 in float64 NumPy: pad X, S = X·D, threshold P, strided valid correlation of S with P."""
  x, d, p = (np.asarray(a, np.float64) for a in (x, dictionary, coefficients))
  kh, kw, k, n = p.shape
  tau = initial_sparsity / math.sqrt(kh * kw * k)
  p = np.where(np.abs(p) > tau, p, 0.0)
  (ph, pw), (sh, sw) = padding, strides
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  s = x @ d  # (b, hp, wp, k)
  oh, ow = (s.shape[1] - kh) // sh + 1, (s.shape[2] - kw) // sw + 1
  out = np.zeros((x.shape[0], oh, ow, n))
  for i in range(oh):
    for j in range(ow):
      window = s[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :]  # (b, kh, kw, k)
      out[:, i, j, :] = np.einsum("brck,rckn->bn", window, p)
  return out + np.asarray(bias, np.float64)


def make_layer(rng, m, n, kernel, k, strides, padding):
  layer = layers.LookupConv(m, n, kernel, dictionary_size=k, strides=strides, padding=padding,
                            rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  # Push about a third of P under the threshold so the mask matters.
  p = np.asarray(layer.coefficients[...])
  small = rng.random(p.shape) < 0.3
  layer.coefficients[...] = jnp.asarray(np.where(small, p * 1e-3, p))
  layer.bias[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
  return layer


CASES = [  # kernel, stride, padding, (h, w)
    ((1, 1), 1, 0, (9, 7)), ((1, 1), 2, 1, (9, 12)), ((3, 3), 1, 1, (10, 13)), ((3, 3), 2, 0, (11, 8)),
    ((3, 3), 4, 3, (15, 9)), ((5, 5), 1, 2, (12, 9)), ((5, 5), 2, 3, (13, 14)), ((7, 7), 2, 3, (17, 11)),
    ((7, 7), 4, 1, (19, 23)), ((11, 11), 4, 2, (31, 27)), ((11, 11), 1, 0, (12, 15)), ((3, 5), 2, (1, 2), (9, 10)),
    ((5, 3), 1, (2, 0), (8, 11)), ((1, 1), 4, 3, (6, 5)), ((3, 3), 1, 2, (5, 7)),
]


@pytest.mark.parametrize("kernel,stride,padding,size", CASES)
def test_lookup_conv_equals_dense_conv_with_reconstructed_kernel(rng, kernel, stride, padding, size):
  layer = make_layer(rng, m=5, n=6, kernel=kernel, k=4, strides=stride, padding=padding)
  x = jnp.asarray(rng.normal(size=(2, *size, 5)), jnp.float32)
  ph, pw = layer.padding
  dense = jax.lax.conv_general_dilated(
      x, layer.dense_kernel(), layer.strides, ((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer.bias[...]
  np.testing.assert_allclose(layer(x), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding,size", CASES)
def test_lookup_conv_equals_float64_numpy_reference(rng, kernel, stride, padding, size):
  layer = make_layer(rng, m=6, n=5, kernel=kernel, k=3, strides=stride, padding=padding)
  x = rng.normal(size=(2, *size, 6))
  expected = numpy_lookup_conv(x, layer.dictionary[...], layer.coefficients[...], layer.bias[...],
                               layer.strides, layer.padding)
  got = layer(jnp.asarray(x, jnp.float32))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding,size", CASES[::2])
def test_gather_path_equals_dense_path(rng, kernel, stride, padding, size):
  layer = make_layer(rng, m=4, n=7, kernel=kernel, k=5, strides=stride, padding=padding)
  x = jnp.asarray(rng.normal(size=(3, *size, 4)), jnp.float32)
  np.testing.assert_allclose(layer.gather_forward(x), layer(x), rtol=1e-4, atol=1e-5)


def test_lookups_hold_exactly_the_nonzeros_of_thresholded_coefficients(rng):
  layer = make_layer(rng, m=4, n=6, kernel=3, k=8, strides=1, padding=1)
  p = np.asarray(layer.thresholded_coefficients())  # (kh, kw, k, n)
  lookups = layer.lookups()
  assert lookups.shape == (3, 3, 8, 6) and lookups.nnz == np.count_nonzero(p)
  rebuilt = np.zeros_like(p)
  for o in range(6):
    begin, end = lookups.starts[o], lookups.starts[o + 1]
    assert end - begin == np.count_nonzero(p[..., o])
    for index, value in zip(lookups.indices[begin:end], lookups.values[begin:end]):
      r, rest = divmod(int(index), 3 * 8)
      c, j = divmod(rest, 8)
      rebuilt[r, c, j, o] = value
  np.testing.assert_array_equal(rebuilt, p)


def test_lookup_dense_equals_float64_reference_and_gather_path(rng):
  layer = layers.LookupDense(12, 7, dictionary_size=5, rngs=nnx.Rngs(3))
  p = np.asarray(layer.coefficients[...])
  layer.coefficients[...] = jnp.asarray(np.where(rng.random(p.shape) < 0.3, p * 1e-3, p))
  x = rng.normal(size=(4, 12))
  tau = 0.01 / math.sqrt(5)
  p64 = np.asarray(layer.coefficients[...], np.float64)
  expected = (x @ np.asarray(layer.dictionary[...], np.float64)) @ np.where(np.abs(p64) > tau, p64, 0)
  expected += np.asarray(layer.bias[...], np.float64)
  got = layer(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(layer.gather_forward(jnp.asarray(x, jnp.float32)), got, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jnp.asarray(x, jnp.float32) @ layer.dense_kernel() + layer.bias[...], got,
                             rtol=1e-4, atol=1e-5)


def test_parameters_have_the_documented_shapes_types_and_torch_init():
  layer = layers.LookupConv(64, 128, (3, 5), dictionary_size=16, rngs=nnx.Rngs(0))
  assert layer.dictionary.shape == (64, 16) and isinstance(layer.dictionary, layers.Dictionary)
  assert layer.coefficients.shape == (3, 5, 16, 128) and isinstance(layer.coefficients, layers.Coefficients)
  assert layer.bias.shape == (128,)
  assert isinstance(layer.coefficients, nnx.Param)  # optimisers that select nnx.Param see P
  d_bound, p_bound = 1 / math.sqrt(64), 1 / math.sqrt(3 * 5 * 16)
  assert np.abs(layer.dictionary[...]).max() <= d_bound and np.abs(layer.dictionary[...]).max() > 0.9 * d_bound
  assert np.abs(layer.coefficients[...]).max() <= p_bound
  assert np.abs(layer.bias[...]).max() <= p_bound
  assert layer.threshold == pytest.approx(0.01 / math.sqrt(3 * 5 * 16))
  # Uniform init: about initial_sparsity of P starts below τ (τ / bound = 0.01).
  below = np.mean(np.abs(layer.coefficients[...]) <= layer.threshold)
  assert 0.003 < below < 0.02
  assert layers.LookupConv(3, 4, 3, dictionary_size=2, use_bias=False, rngs=nnx.Rngs(0)).bias is None


@pytest.mark.parametrize("bad", [dict(dictionary_size=0), dict(dictionary_size=-3)])
def test_nonpositive_dictionary_size_is_rejected_with_its_value(bad):
  with pytest.raises(ValueError, match="dictionary_size"):
    layers.LookupConv(3, 4, 3, rngs=nnx.Rngs(0), **bad)
  with pytest.raises(ValueError, match="dictionary_size"):
    layers.LookupDense(3, 4, rngs=nnx.Rngs(0), **bad)


def test_bfloat16_compute_dtype_runs_and_stays_close(rng):
  layer = make_layer(rng, m=8, n=8, kernel=3, k=4, strides=1, padding=1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 8)), jnp.float32)
  full = layer(x)
  layer.dtype = jnp.bfloat16
  half = layer(x)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=0.05, atol=0.05)
