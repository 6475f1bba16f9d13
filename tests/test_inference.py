"""Fast inference: backends, export, loader and benchmark helpers (REFERENCE §1; issue 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax.inference import backends

AVAILABLE = backends.available_backends()


def _random_layer(rng, *, m, n, k, kernel, strides, padding, size, density):
  dictionary = rng.standard_normal((m, k)).astype(np.float32)
  shape = (*kernel, k, n)
  coefficients = (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(np.float32)
  return backends.LookupLayer.from_coefficients(dictionary, coefficients, rng.standard_normal(n).astype(np.float32),
                                                strides=strides, padding=padding, input_size=size)


def _fresh_rng():
  """A generator on fresh entropy, and its seed for the failure message."""
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _dense_reference(layer, x):
  """The convolution with the reconstructed kernel W = D·P, in float64 numpy (independent of XLA)."""
  (ph, pw), (sh, sw), (kh, kw) = layer.padding, layer.strides, layer.kernel_size
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
  kernel = np.einsum("mk,rcko->rcmo", layer.dictionary.astype(np.float64), layer.coefficients().astype(np.float64))
  return np.einsum("bhwmrc,rcmo->bhwo", windows, kernel) + layer.bias


LAYER_CASES = {
    "alexnet_conv1_like": dict(m=3, n=8, k=3, kernel=(11, 11), strides=(4, 4), padding=(2, 2), size=(23, 27),
                               density=0.1),
    "3x3_pad1": dict(m=5, n=7, k=4, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(6, 5), density=0.3),
    "uneven_strides": dict(m=6, n=9, k=5, kernel=(3, 2), strides=(2, 1), padding=(0, 1), size=(9, 8), density=0.5),
    "fc6_like": dict(m=16, n=33, k=20, kernel=(6, 6), strides=(1, 1), padding=(0, 0), size=(6, 6), density=0.05),
    "1x1": dict(m=40, n=12, k=8, kernel=(1, 1), strides=(1, 1), padding=(0, 0), size=(1, 1), density=0.2),
    "empty": dict(m=4, n=5, k=3, kernel=(2, 2), strides=(1, 1), padding=(0, 0), size=(3, 3), density=0.0),
}


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_backend_equals_dense_conv_with_reconstructed_kernel(backend, case):
  rng, seed = _fresh_rng()
  layer = _random_layer(rng, **LAYER_CASES[case])
  impl = backends.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  run = jax.jit(lambda p, x: backends.apply_nhwc(impl, layer, p, x))
  # Batches 1, 3, 17 and 40 take every path of the C++ kernel (sparse dot products, 16- and 32-wide blocks).
  for batch in (1, 3, 17, 40):
    x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
    expected = _dense_reference(layer, x)
    got = np.asarray(run(params, x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                               err_msg=f"seed={seed}, batch={batch}")


def test_lookup_layer_round_trips_coefficients():
  rng, _ = _fresh_rng()
  coefficients = (rng.standard_normal((3, 2, 4, 5)) * (rng.random((3, 2, 4, 5)) < 0.4)).astype(np.float32)
  layer = backends.LookupLayer.from_coefficients(np.eye(4, dtype=np.float32), coefficients, None, strides=(1, 1),
                                                 padding=(0, 0), input_size=(4, 4))
  np.testing.assert_array_equal(layer.coefficients(), coefficients)
  assert layer.nnz == np.count_nonzero(coefficients)
  assert layer.indices.dtype == np.uint16
  assert np.all(np.diff(layer.starts) == np.count_nonzero(coefficients.reshape(-1, 5), axis=0))


def test_unknown_backend_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="expected one of"):
    backends.get_backend("sparse")
