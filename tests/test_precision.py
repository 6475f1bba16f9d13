"""Compact storage: bfloat16 and int8 weights, narrow indices, and the kernels that compute from them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import config as config_lib
from lcnn_jax import counting, inference, layers, lookups, models
from lcnn_jax.inference import backends, layouts, precision
from lcnn_jax.inference import model as model_lib
from lcnn_jax.inference import records

from helpers import Unfoldable, as_if_trained
from lookup_reference import dense_reference, random_layer  # noqa: E402

AVAILABLE = backends.available_backends()

# The quantisation error allowed against the float32 layer, relative to the output's largest magnitude: bfloat16
# keeps 8 significant bits (relative rounding 2^-9 per weight), int8 7 bits of each channel's largest weight;
# sums of tens of such products stay well inside these.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "int8": 4e-2}


CASES = {
    "strided_padded": dict(m=6, n=9, k=5, kernel=(5, 5), strides=(2, 2), padding=(2, 2), size=(13, 12), density=0.3),
    "fused_dictionary": dict(m=3, n=8, k=3, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(9, 8), density=0.4),
    "fc6_like": dict(m=40, n=33, k=24, kernel=(3, 3), strides=(1, 1), padding=(0, 0), size=(3, 3), density=0.1),
    "fc7_like": dict(m=70, n=41, k=20, kernel=(1, 1), strides=(1, 1), padding=(0, 0), size=(1, 1), density=0.3),
}


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS) + ["lookup:chunk=128"])
@pytest.mark.parametrize("prec", ["bfloat16", "int8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reduced_precision_layer_equals_float64_reference(case, prec, backend, rng):
  layer = random_layer(rng, **CASES[case])
  stored = precision.quantize_layer(layer, prec)
  assert stored.dictionary.dtype == stored.values.dtype == np.dtype(precision.BFLOAT16 if prec == "bfloat16" else
                                                                    np.int8)
  impl = backends.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(stored))
  # Batch 1 takes the dense-rows kernel for fc7's dictionary stage; 3 and 40 the sparse dot and block paths.
  for batch in (1, 3, 40):
    x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
    got = np.asarray(jax.jit(lambda p, v: backends.apply_nhwc(impl, stored, p, v))(params, jnp.asarray(x)))
    expected = dense_reference(stored, x)  # the layer as stored: the kernels must compute exactly this
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=f"batch {batch}")
    original = dense_reference(layer, x)  # and the storage costs at most the rounding of its weights
    np.testing.assert_allclose(got, original, rtol=0, atol=TOLERANCE[prec] * np.abs(original).max())


@pytest.mark.parametrize("prec", precision.PRECISIONS)
@pytest.mark.parametrize("kind", ["linear", "pointwise_conv"])
def test_dense_layer_computes_from_its_stored_kernel(kind, prec, rng):
  m, n = 100, 37
  kernel = rng.standard_normal((m, n)).astype(np.float32)
  bias = rng.standard_normal(n).astype(np.float32)
  if kind == "linear":
    layer = records.LinearLayer(kernel, bias)
  else:
    layer = records.ConvLayer(kernel[None, None], bias, (1, 1), ((0, 0), (0, 0)))
  stored = precision.quantize_layer(layer, prec)
  params = jax.tree.map(jnp.asarray, model_lib.device_arrays(stored))
  assert ("kernel_q" in params) == (prec != "float32")
  run = jax.jit(lambda p, v: model_lib.run_layer(stored, None, p, (v, layouts.NHWC))[0])
  # Up to DENSE_ROWS_MAX rows the C++ dense-rows kernel reads the stored kernel; more go to XLA's float32 copy.
  for rows in (1, 5, backends.DENSE_ROWS_MAX + 3):
    x = rng.standard_normal((rows, m) if kind == "linear" else (rows, 1, 1, m)).astype(np.float32)
    expected = x.astype(np.float64) @ stored.float_kernel().reshape(m, n).astype(np.float64) + bias
    got = np.asarray(run(params, jnp.asarray(x))).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=f"{rows} rows")


def test_int8_keeps_each_channel_within_half_its_step(rng):
  weights = rng.standard_normal((30, 7)).astype(np.float32) * rng.uniform(0.01, 10, 7).astype(np.float32)
  weights[:, 3] = 0  # an all-zero channel keeps a usable scale
  q, scale = precision.int8_per_channel(weights)
  assert q.dtype == np.int8 and scale.shape == (7,) and np.all(scale > 0)
  assert np.all(np.abs(q.astype(np.float32) * scale - weights) <= scale / 2 + 1e-6 * np.abs(weights).max())
  assert np.array_equal(np.abs(q).max(axis=0)[[0, 1, 2, 4, 5, 6]], [127] * 6)
  flat = rng.standard_normal(50).astype(np.float32)
  channels = rng.integers(0, 4, 50)
  q, scale = precision.int8_per_channel(flat, channels, 4)
  assert np.all(np.abs(q.astype(np.float32) * scale[channels] - flat) <= scale[channels] / 2 + 1e-6)


def test_indices_are_as_narrow_as_the_dictionary_allows(rng):
  small = random_layer(rng, **CASES["fused_dictionary"])  # 3·3·3 = 27 positions
  assert small.indices.dtype == np.uint8
  assert backends.get_backend("lookup").prepare(small)["indices"].dtype == np.uint8
  assert random_layer(rng, **CASES["fc6_like"]).indices.dtype == np.uint8  # 216 positions
  assert lookups.narrowest_index_dtype(257) == np.uint16 and lookups.narrowest_index_dtype(1 << 16) == np.uint16
  assert lookups.narrowest_index_dtype((1 << 16) + 1) == np.int32


def _digits_lcnn(rng):
  config = config_lib.default_config().model
  config.update(dict(name="digits-lcnn", width=8))
  config.dictionary.classifier = 4
  model = models.create_model(config, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.LOOKUP_LAYERS):
      p = np.asarray(module.coefficients[...])
      module.coefficients[...] = jnp.asarray(p * (rng.random(p.shape) < 0.4))
  return model


@pytest.mark.parametrize("prec", ["bfloat16", "int8"])
def test_exported_model_at_reduced_precision_saves_loads_and_stays_close(prec, tmp_path, rng):
  model = _digits_lcnn(rng)
  backend = "lookup" if "lookup" in AVAILABLE else "gather"
  full = inference.inference_model(model, (8, 8, 1), backends=backend)
  compact = inference.inference_model(model, (8, 8, 1), backends=backend, precision=prec)
  assert full.precision == "float32" and compact.precision == prec
  # Weights at 2 (1) bytes instead of 4, plus int8's scales; biases, starts and indices as they were.
  weights = sum(a.nbytes for layer in full.layers.values() for f, a in records.layer_arrays(layer).items()
                if f in ("dictionary", "values", "kernel"))
  scales = sum(a.nbytes for layer in compact.layers.values() for f, a in records.layer_arrays(layer).items()
               if f.endswith("scale"))
  saved = weights // 2 if prec == "bfloat16" else weights * 3 // 4 - scales
  assert precision.model_bytes(full) - precision.model_bytes(compact) == saved
  inference.save(compact, tmp_path / "m.npz")
  loaded = inference.load(tmp_path / "m.npz")
  assert loaded.precision == prec
  for name, layer in compact.layers.items():
    for field, array in records.layer_arrays(layer).items():
      assert records.layer_arrays(loaded.layers[name])[field].dtype == array.dtype, (name, field)
  x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(compact(x)))
  expected = np.asarray(full(x))
  np.testing.assert_allclose(np.asarray(compact(x)), expected, rtol=0,
                             atol=2 * TOLERANCE[prec] * np.abs(expected).max())


def test_unknown_precision_is_rejected_with_the_choices(rng):
  with pytest.raises(ValueError, match="float32, bfloat16, int8"):
    inference.inference_model(_digits_lcnn(rng), (8, 8, 1), backends="dense", precision="float16")


@pytest.mark.parametrize("prec", precision.PRECISIONS)
def test_counted_bytes_equal_the_stored_bytes_of_the_exported_file(prec, tmp_path, rng):
  """The counter's prediction (one rule, lookups.lookup_layer_bytes/dense_layer_bytes) is what an export stores:
  for an LCNN with sparse P and lookup classifier, and for its dense CNN counted abstract (nnx.eval_shape) against
  the export of a real one."""
  model = _digits_lcnn(rng)
  inference.save(inference.inference_model(model, (8, 8, 1), backends="dense", precision=prec), tmp_path / "m.npz")
  assert counting.stored_bytes(model, (8, 8, 1), prec) == precision.model_bytes(inference.load(tmp_path / "m.npz"))
  config = config_lib.default_config().model
  config.update(dict(name="digits-lcnn", width=8))
  cnn = models.create_model(models.baseline_config(config), num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(1))
  exported = inference.inference_model(cnn, (8, 8, 1), backends="dense", precision=prec)
  assert counting.stored_bytes(counting.baseline_model(config, 10, (8, 8, 1)), (8, 8, 1), prec) == \
      precision.model_bytes(exported)


def test_counted_bytes_keep_a_batch_norm_that_reads_no_layer_output(rng):
  model = as_if_trained(Unfoldable(nnx.Rngs(0)), rng, density=0.7)
  exported = inference.inference_model(model, (6, 5, 3), backends="dense")
  assert {name for name, layer in exported.layers.items() if isinstance(layer, records.AffineLayer)} == {"bn_in",
                                                                                                        "bn2"}
  # bn_in reads the input: kept by both. bn2 reads conv2's output, which the residual reads too: the export keeps
  # it, while the counter, which sees only that bn2 reads a layer's output, folds it (stored_bytes says so).
  assert counting.stored_bytes(model, (6, 5, 3)) == precision.model_bytes(exported) - lookups.affine_bytes(4)
