"""The Pallas lookup backend against the dense convolution with the reconstructed kernel: interpreted on a CPU,
compiled through Triton on a GPU (``python -m lcnn_jax.devicecheck`` runs this module there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import inference, layers
from lcnn_jax.inference import backends, layouts, pallas_lookup, precision, tuning

from lookup_reference import dense_reference, random_layer  # noqa: E402

PALLAS = pallas_lookup.PallasLookup()  # interpreted anywhere but a GPU
COMPILED = pallas_lookup.PallasLookup(interpret=False)


# Every kernel size, stride, padding and dictionary size of the models (AlexNet-LCNN fast and accurate,
# ResNet-18-LCNN fast, the digits nets), on small maps and few outputs; odd batch sizes.
LAYER_CASES = {
    "alexnet_conv1": (dict(m=3, n=24, k=3, kernel=(11, 11), strides=(4, 4), padding=(2, 2), size=(23, 27),
                           density=0.2), 3),
    "alexnet_conv2": (dict(m=8, n=20, k=30, kernel=(5, 5), strides=(1, 1), padding=(2, 2), size=(7, 6),
                           density=0.1), 1),
    "alexnet_conv3_accurate": (dict(m=12, n=17, k=500, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(5, 4),
                                    density=0.02), 5),
    "alexnet_fc6": (dict(m=16, n=33, k=512, kernel=(6, 6), strides=(1, 1), padding=(0, 0), size=(6, 6),
                         density=0.01), 3),
    "alexnet_fc7_accurate": (dict(m=64, n=140, k=1024, kernel=(1, 1), strides=(1, 1), padding=(0, 0), size=(1, 1),
                                  density=0.02), 1),
    "resnet_stem": (dict(m=3, n=16, k=3, kernel=(7, 7), strides=(2, 2), padding=(3, 3), size=(13, 12),
                         density=0.3), 1),
    "resnet_3x3_strided": (dict(m=6, n=12, k=12, kernel=(3, 3), strides=(2, 2), padding=(1, 1), size=(9, 8),
                                density=0.3), 7),
    "resnet_3x3": (dict(m=10, n=16, k=48, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(4, 4),
                        density=0.1), 3),
    "digits_conv1": (dict(m=1, n=8, k=1, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(8, 8),
                          density=0.5), 5),
    "uneven": (dict(m=6, n=9, k=5, kernel=(3, 2), strides=(2, 1), padding=(0, 1), size=(9, 8), density=0.5), 3),
    "empty": (dict(m=4, n=5, k=3, kernel=(2, 2), strides=(1, 1), padding=(0, 0), size=(3, 3), density=0.0), 1),
}


def _run(impl, layer, x, layout=layouts.NHWC):
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  fn = jax.jit(lambda p, v: layouts.convert(*impl.apply(layer, p, v, layout), layouts.NHWC))
  return fn(params, layouts.convert(jnp.asarray(x), layouts.NHWC, layout))


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_pallas_lookups_equal_dense_conv_with_reconstructed_kernel(case, rng):
  spec, batch = LAYER_CASES[case]
  layer = random_layer(rng, **spec)
  x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
  expected = dense_reference(layer, x)
  got = np.asarray(_run(PALLAS, layer, x))
  assert got.shape == expected.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["alexnet_conv2", "resnet_3x3_strided", "alexnet_fc6"])
def test_pallas_lookups_in_bfloat16_accumulate_in_float32(case, rng):
  spec, batch = LAYER_CASES[case]
  layer = random_layer(rng, **spec)
  x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
  expected = dense_reference(layer, x)
  got = _run(PALLAS, layer, x.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  # S and the output are rounded to bfloat16 (8 bits of mantissa); the sums over hundreds of terms are not.
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=2e-2 * np.abs(expected).max())


def test_pallas_reads_channels_first_input_without_a_transpose(rng):
  spec, _ = LAYER_CASES["uneven"]
  layer = random_layer(rng, **spec)
  assert PALLAS.input_layout(layer, 5) == 5
  x = rng.standard_normal((5, *layer.input_size, layer.in_features)).astype(np.float32)
  expected = dense_reference(layer, x)
  np.testing.assert_allclose(np.asarray(_run(PALLAS, layer, x, layout=5)), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("prec", ["bfloat16", "int8"])
@pytest.mark.parametrize("case", ["alexnet_conv1", "resnet_3x3_strided", "alexnet_fc7_accurate"])
def test_pallas_computes_layers_stored_at_reduced_precision(case, prec, rng):
  spec, batch = LAYER_CASES[case]
  stored = precision.quantize_layer(random_layer(rng, **spec), prec)  # int8: D and P scaled per channel
  x = rng.standard_normal((batch, *stored.input_size, stored.in_features)).astype(np.float32)
  expected = dense_reference(stored, x)  # the layer as stored
  np.testing.assert_allclose(np.asarray(_run(PALLAS, stored, x)), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


# The layers at the models' own sizes and batch 256 (fewer atoms and non-zeros: the kernel's blocks and grid depend
# on the outputs, the columns and the length of S): AlexNet-LCNN's conv1, conv2 and fc6, ResNet-18-LCNN's stem and
# a 56×56 3×3 layer.
FULL_SIZE = {
    "alexnet_conv1": dict(m=3, n=96, k=3, kernel=(11, 11), strides=(4, 4), padding=(2, 2), size=(224, 224)),
    "alexnet_conv2": dict(m=96, n=256, k=8, kernel=(5, 5), strides=(1, 1), padding=(2, 2), size=(27, 27)),
    "alexnet_fc6": dict(m=256, n=4096, k=8, kernel=(6, 6), strides=(1, 1), padding=(0, 0), size=(6, 6)),
    "resnet_stem": dict(m=3, n=64, k=3, kernel=(7, 7), strides=(2, 2), padding=(3, 3), size=(224, 224)),
    "resnet_layer1": dict(m=64, n=64, k=8, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(56, 56)),
}


def _lowered_for_cuda(layer, batch, dtype) -> str:
  params = jax.tree.map(jnp.asarray, COMPILED.prepare(layer))
  x = jax.ShapeDtypeStruct((batch, *layer.input_size, layer.in_features), dtype)  # traced, never allocated
  fn = jax.jit(lambda p, v: backends.apply_nhwc(COMPILED, layer, p, v))
  return fn.trace(params, x).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernel_lowers_to_triton_for_cuda(dtype, rng):
  """Every block shape a power of two, every operation one the Triton lowering has (no GPU needed to check); the
  interpret mode of the other tests checks none of this."""
  for case in sorted(LAYER_CASES):
    spec, batch = LAYER_CASES[case]
    assert "xla.gpu.triton" in _lowered_for_cuda(random_layer(rng, **spec), batch, dtype), case
  for case in sorted(FULL_SIZE):
    layer = random_layer(rng, **FULL_SIZE[case], density=0.002)
    for batch in (1, 256):
      assert pallas_lookup.padded_length(layer, batch) < 2**31  # the kernel's positions are int32
      assert "xla.gpu.triton" in _lowered_for_cuda(layer, batch, dtype), (case, batch)


def test_every_read_of_a_block_stays_inside_padded_s(rng):
  """Interpret mode clamps reads past the end of S, a GPU does not: the padding must cover every block's reads."""
  layers_and_batches = [(random_layer(rng, **spec), (1, batch, 256)) for spec, batch in LAYER_CASES.values()]
  layers_and_batches += [(random_layer(rng, **spec, density=0.002), (1, 3, 256)) for spec in FULL_SIZE.values()]
  for layer, batches in layers_and_batches:
    offsets = COMPILED.prepare(layer)["offsets"]
    for batch in batches:
      wide = pallas_lookup.wide_columns(layer, batch)
      _, block_columns = pallas_lookup.block_shape(offsets.shape[1], wide)
      last_read = int(offsets.max()) * batch + -(-wide // block_columns) * block_columns - 1
      assert last_read < pallas_lookup.padded_length(layer, batch), (layer.kernel_size, layer.input_size, batch)


@pytest.mark.parametrize("outputs,columns", [(5, 1), (4096, 1), (192, 27 * 27 * 256), (64, 3), (384, 40)])
def test_block_shapes_are_powers_of_two_within_the_register_budget(outputs, columns):
  block_outputs, block_columns = pallas_lookup.block_shape(outputs, columns)
  for size in (block_outputs, block_columns):
    assert size & (size - 1) == 0
  assert pallas_lookup.MAX_OUTPUTS_PER_BLOCK % block_outputs == 0 and block_outputs % pallas_lookup.GROUP == 0
  assert block_outputs * block_columns <= max(pallas_lookup.BLOCK_ELEMENTS, pallas_lookup.GROUP * block_columns)


def test_pallas_is_offered_to_auto_on_gpus_only(monkeypatch):
  monkeypatch.delenv(pallas_lookup.INTERPRET_ENV, raising=False)
  on_gpu = jax.default_backend() == "gpu"
  ok, reason = backends.get_backend("pallas").available()
  assert ok == on_gpu and (on_gpu or pallas_lookup.INTERPRET_ENV in reason)
  assert ("pallas" in tuning.candidate_backends()) == on_gpu
  monkeypatch.setenv(pallas_lookup.INTERPRET_ENV, "1")
  assert "pallas" in backends.available_backends()
  assert ("pallas" in tuning.candidate_backends()) == on_gpu  # interpreted: never timed for auto


def test_on_a_gpu_auto_times_pallas_and_never_the_cpp_kernel(monkeypatch):
  monkeypatch.delenv(pallas_lookup.INTERPRET_ENV, raising=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not pallas_lookup.interpreted() and backends.get_backend("pallas").available() == (True, "")
  assert not backends.get_backend("lookup").available()[0] and not backends.dense_rows_available()
  assert tuning.candidate_backends() == ["pallas", "factored", "dense", "gather"]


class _TinyLcnn(nnx.Module):
  """A lookup convolution, BatchNorm, ReLU, max pooling and a lookup dense layer: what an exported LCNN runs."""

  def __init__(self, rngs):
    self.conv = layers.LookupConv(3, 6, 3, dictionary_size=4, strides=2, padding=1, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.fc = layers.LookupDense(6 * 2 * 2, 10, dictionary_size=5, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))  # (batch, 2, 2, 6)
    return self.fc(x.reshape(x.shape[0], -1))


def test_exported_model_on_pallas_equals_eval_mode_logits(monkeypatch, rng):
  monkeypatch.setenv(pallas_lookup.INTERPRET_ENV, "1")
  model = _TinyLcnn(nnx.Rngs(0))
  model.bn.mean[...] = jnp.asarray(rng.normal(0, 0.3, 6), jnp.float32)
  model.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
  for module in (model.conv, model.fc):
    p = np.asarray(module.coefficients[...])
    module.coefficients[...] = jnp.asarray(p * (rng.random(p.shape) < 0.5))
  x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
  eval_model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
  expected = np.asarray(eval_model(jnp.asarray(x)))
  exported = inference.inference_model(model, (8, 8, 3), backends="pallas")
  assert exported.backends == {"conv": "pallas", "fc": "pallas"}
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
