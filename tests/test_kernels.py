"""The C++ lookup kernel's bindings (lcnn_jax.inference.kernels): build, limits, handlers, against float64
references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax import bench, inference
from lcnn_jax.inference import backends, flat_s, kernels, layouts, precision, tuning
from lcnn_jax.inference import graph as graph_lib

from lookup_reference import dense_reference, max_pool_reference, random_layer  # noqa: E402
from test_batch1 import MODELS, _model  # noqa: E402


def test_limits_are_read_from_the_header(tmp_path):
  assert kernels.LIMITS.pooled_batch_min == backends.POOLED_MIN_BATCH >= 1
  assert kernels.LIMITS.fused_dictionary_macs_max == backends.FUSED_DICTIONARY_MACS >= 1
  assert kernels.LIMITS.dense_rows_max == backends.DENSE_ROWS_MAX >= 1
  with open(kernels.HEADER) as f:
    text = f.read()
  # Every limit of the block, and each defined once in the kernel's sources.
  names = re.findall(r"^constexpr int64_t (k\w+) =", text.split("// END LIMITS")[0].split("// BEGIN LIMITS")[1],
                     re.M)
  assert len(names) == len(vars(kernels.LIMITS)) >= 4
  for name in names:
    assert text.count(f"constexpr int64_t {name} =") == 1
  header = tmp_path / "k.h"
  header.write_text("// BEGIN LIMITS\nconstexpr int64_t kSomeLimitMax = 12;\n// END LIMITS\n")
  assert vars(kernels._read_limits(str(header))) == {"some_limit_max": 12}


@pytest.mark.kernel
def test_kernel_builds_without_warnings():
  assert "-w" not in kernels.flags() and "-Wall" in kernels.flags() and "-Wextra" in kernels.flags()
  assert kernels.build_log() == ""


def test_missing_compiler_is_reported_with_the_fix(monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler-lcnn")
  with pytest.raises(kernels.KernelUnavailable, match=r"No C\+\+ compiler.*CXX"):
    kernels._load()


@pytest.mark.kernel
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("window,strides,padding", [((3, 3), (2, 2), ((0, 0), (0, 0))),  # AlexNet
                                                    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet
                                                    ((2, 3), (1, 2), ((0, 1), (1, 0))),
                                                    ((2, 2), (2, 1), ((0, 1), (0, 1))),
                                                    ((3, 3), (1, 3), ((1, 0), (2, 1)))])
@pytest.mark.parametrize("batch,size", [(backends.POOLED_MIN_BATCH + 1, (11, 12)), (1, (11, 12)), (1, (9, 71))])
def test_max_pool_kernel_equals_reference(window, strides, padding, relu, batch, size, rng):
  """The kernel's max pooling of a CHWN map, from POOLED_MIN_BATCH images (the maxima over the images as
  vectors) and of one image (its planes; with AVX-512 at a column stride of 2, 16 pooled pixels a vector: 71
  columns give 3 blocks, the last partial), equals the float64 pooling exactly."""
  x = rng.standard_normal((batch, *size, 7)).astype(np.float32)  # NHWC
  pooling = graph_lib.max_pooling({"window_dimensions": (1, *window, 1), "window_strides": (1, *strides, 1),
                                "padding": ((0, 0), *padding, (0, 0)), "base_dilation": (1,) * 4,
                                "window_dilation": (1,) * 4}, relu)
  chwn = layouts.convert(jnp.asarray(x), layouts.NHWC, batch)
  if batch > 1:
    assert backends.max_pool_chwn(chwn[..., :2], pooling) is None  # 2 to POOLED_MIN_BATCH - 1 images: XLA pools
  pooled = jax.jit(lambda v: backends.max_pool_chwn(v, pooling))(chwn)
  np.testing.assert_allclose(np.asarray(layouts.convert(pooled, batch, layouts.NHWC)),
                             max_pool_reference(x, window, strides, padding, relu), rtol=0, atol=0)


@pytest.mark.kernel
def test_struct_attributes_reach_the_kernel(rng):
  """Padding, strides and output size travel in the `layer` struct: a strided, padded layer through the plain
  handler (S from NumPy) equals the float64 convolution, and a zero stride is refused by the kernel."""
  layer = random_layer(rng, m=6, n=5, k=4, kernel=(3, 3), strides=(2, 1), padding=(1, 2), size=(7, 6), density=0.4)
  impl = backends.get_backend("lookup")
  params = impl.prepare(layer)
  batch = 3
  x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
  s = np.einsum("bhwm,mk->khwb", x.astype(np.float64), layer.float_dictionary()).astype(np.float32)
  lookups = tuple(jnp.asarray(params[k]) for k in ("starts", "indices", "values", "scale", "bias"))
  expected = dense_reference(layer, x)
  oh, ow = layer.output_size
  g = flat_s.geometry(layer)
  call = dict(out_shape=(layer.out_features, oh, ow, batch),
              scratch_size=g.atoms * g.height * g.width * batch, padding=layer.padding, output_size=(oh, ow))
  got = kernels.lookup_conv(jnp.asarray(s), lookups, strides=layer.strides, **call)
  np.testing.assert_allclose(np.transpose(np.asarray(got), (3, 1, 2, 0)), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  with pytest.raises(Exception, match="strides < 1"):
    jax.block_until_ready(kernels.lookup_conv(jnp.asarray(s), lookups, strides=(0, 1), **call))
  # S in bfloat16 is made in the padded copy: a scratch of float32's size, or a layer that does not copy, is refused
  with pytest.raises(Exception, match="half as many floats"):
    jax.block_until_ready(kernels.lookup_conv(jnp.asarray(s), lookups, strides=layer.strides, s_bfloat16=True,
                                              **{**call, "scratch_size": 2 * call["scratch_size"] + 2}))
  with pytest.raises(Exception, match="neither pads nor strides"):
    unpadded = dict(call, padding=(0, 0), scratch_size=0, output_size=(5, 4), out_shape=(layer.out_features, 5, 4,
                                                                                         batch))
    jax.block_until_ready(kernels.lookup_conv(jnp.asarray(s), lookups, strides=(1, 1), s_bfloat16=True, **unpadded))


@pytest.mark.kernel
@pytest.mark.kernel
@pytest.mark.parametrize("size", [(13, 13), (9, 71), (27, 27), (5, 7)])
@pytest.mark.parametrize("backend", ["lookup", "lookup:tile=0", "lookup:tile=6000"])
def test_outputs_with_many_non_zeros_split_their_last_block_and_equal_float64(size, backend, rng):
  # 24 atoms x 9 taps at density 0.6: every output has more non-zeros than kSplitNonZeros, so the last, partial
  # block of wide elements is covered by narrower blocks; the map widths leave remainders of every size.
  layer = random_layer(rng, m=5, n=6, k=24, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=size,
                       density=0.6)
  assert np.diff(layer.starts).min() >= kernels.LIMITS.split_non_zeros
  impl = backends.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  for batch in (1, 3):
    x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
    expected = dense_reference(layer, x)
    run = jax.jit(lambda p, v: layouts.convert(*impl.apply(layer, p, v, layouts.NHWC), layouts.NHWC))
    np.testing.assert_allclose(np.asarray(run(params, jnp.asarray(x))), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max(), err_msg=f"batch {batch}")


@pytest.mark.parametrize("backend", ["lookup", "lookup:chunk=256"])
def test_serial_work_threshold_moves_work_between_threads_not_results(backend, rng):
  """kernels.set_serial_work sets the work below which a call stays on one thread and returns the value in force;
  a layer run on the calling thread alone (a threshold above its work) and split among the pool's threads (0)
  equals the float64 convolution both ways, at batch 1 and 3."""
  layer = random_layer(rng, m=24, n=40, k=12, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(9, 11),
                       density=0.3)
  before = kernels.set_serial_work()
  assert before >= 0
  with pytest.raises(ValueError, match="serial work -1"):
    kernels.set_serial_work(-1)
  impl = backends.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  try:
    for batch in (1, 3):
      layout = impl.input_layout(layer, batch)
      x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
      v = layouts.convert(jnp.asarray(x), layouts.NHWC, layout)
      expected = dense_reference(layer, x)
      for value in (1 << 40, 0):
        assert kernels.set_serial_work(value) == value == kernels.set_serial_work()
        got = np.asarray(layouts.convert(*impl.apply(layer, params, v, layout), layouts.NHWC))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  finally:
    kernels.set_serial_work(before)
  assert kernels.set_serial_work() == before


@pytest.mark.kernel
@pytest.mark.parametrize("values", ["float32", "int8"])
def test_network_equals_float64_layers(values, rng):
  """lcnn_network over two lookup steps (the first with a fused dictionary, ReLU and pooling; the second with a
  dictionary stage, padding and strides, ReLU alone) and a 1×1 dense step, against float64 NumPy."""
  first = random_layer(rng, m=3, n=8, k=3, kernel=(5, 5), strides=(2, 2), padding=(2, 2), size=(21, 17),
                       density=0.3)
  second = random_layer(rng, m=8, n=6, k=9, kernel=(3, 3), strides=(2, 1), padding=(1, 1), size=(5, 4),
                        density=0.4)
  if values == "int8":
    second = precision.quantize_layer(second, "int8")
  pooling = backends.Pooling((3, 3), (2, 2), ((0, 0), (0, 0)), relu=True)
  assert pooling.output_size(first.output_size) == second.input_size
  dense = rng.standard_normal((4, second.out_features)).astype(np.float32)  # W (n, m)
  bias = rng.standard_normal(4).astype(np.float32)
  impl = backends.get_backend("lookup")
  p1, p2 = impl.prepare(first), impl.prepare(second)
  lookups = lambda p: [jnp.asarray(p[k]) for k in ("starts", "indices", "values", "scale", "bias")]  # noqa: E731
  steps = [(dict(kind=kernels.STEPS.step_fused_lookups, relu=True, pooling=pooling, padding=first.padding,
                 strides=first.strides, output_size=first.output_size), [jnp.asarray(p1["dictionary"]),
                                                                        *lookups(p1)]),
           (dict(kind=kernels.STEPS.step_lookups, relu=True, pooling=None, padding=second.padding,
                 strides=second.strides, output_size=second.output_size),
            [jnp.asarray(p2["dictionary_q"]), jnp.asarray(p2["dictionary_scale"]), *lookups(p2)]),
           (dict(kind=kernels.STEPS.step_dense, relu=False), [jnp.asarray(dense), jnp.ones(4, jnp.float32),
                                                             jnp.asarray(bias)])]
  x = rng.standard_normal((1, *first.input_size, 3)).astype(np.float32)
  got = np.asarray(kernels.network(jnp.asarray(x), steps, (1, *second.output_size, 4)))
  y = max_pool_reference(np.maximum(dense_reference(first, x), 0), (3, 3), (2, 2), ((0, 0), (0, 0)), relu=False)
  y = np.maximum(dense_reference(second, y), 0)
  expected = y @ dense.T.astype(np.float64) + bias
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.kernel
@pytest.mark.parametrize("case", ["fused", "dictionary", "plain"])
def test_epilogue_adds_the_residual_and_applies_the_relu(case, rng, monkeypatch):
  """The outputs as the kernel stores them: + a residual, then the ReLU, against float64 NumPy."""
  m, k = {"fused": (3, 4), "dictionary": (12, 8), "plain": (12, 8)}[case]
  layer = random_layer(rng, m=m, n=7, k=k, kernel=(3, 3), strides=(2, 1), padding=(1, 1), size=(9, 8), density=0.4)
  impl = backends.get_backend("lookup")
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  batch = 5
  x = rng.standard_normal((batch, *layer.input_size, m)).astype(np.float32)
  conv = dense_reference(layer, x)  # (batch, oh, ow, n)
  residual = rng.standard_normal(conv.shape).astype(np.float32)
  chwn = jnp.asarray(np.transpose(residual, (3, 1, 2, 0)))
  if case == "plain":
    monkeypatch.setattr(backends, "DICTIONARY_COLUMNS_MAX", 0)  # S from XLA's matmul, then lcnn_lookup_conv
  for relu, add in [(True, None), (False, chwn), (True, chwn)]:
    epilogue = backends.Epilogue(residual=add is not None, relu=relu)
    assert impl.fuses(layer, batch, epilogue)
    out, layout = impl.apply(layer, params, jnp.asarray(x), layouts.NHWC, epilogue,
                             None if add is None else (add[None], batch))  # CHWN, as one tile
    got = np.asarray(layouts.convert(out, layout, layouts.NHWC))
    expected = conv + (residual if add is not None else 0)
    expected = np.maximum(expected, 0) if relu else expected
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.kernel
@pytest.mark.parametrize("batch", [1, 5])
def test_gemm_convolution_adds_the_residual_and_applies_the_relu(batch, rng):
  """The kernel's dense convolution (backend ``gemm``) as it stores its outputs, against float64 NumPy."""
  layer = random_layer(rng, m=12, n=7, k=8, kernel=(3, 3), strides=(2, 1), padding=(1, 1), size=(9, 8), density=0.4)
  impl = backends.get_backend("gemm")
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  x = rng.standard_normal((batch, *layer.input_size, 12)).astype(np.float32)
  conv = dense_reference(layer, x)  # (batch, oh, ow, n)
  residual = rng.standard_normal(conv.shape).astype(np.float32)
  chwn = jnp.asarray(np.transpose(residual, (3, 1, 2, 0)))
  for relu, add in [(False, None), (True, None), (False, chwn), (True, chwn)]:
    epilogue = backends.Epilogue(residual=add is not None, relu=relu)
    assert impl.fuses(layer, batch, epilogue)
    out, layout = impl.apply(layer, params, jnp.asarray(x), layouts.NHWC, epilogue,
                             None if add is None else (add[None], batch))
    got = np.asarray(layouts.convert(out, layout, layouts.NHWC))
    expected = conv + (residual if add is not None else 0)
    expected = np.maximum(expected, 0) if relu else expected
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  pooling = backends.Pooling((3, 3), (2, 2), ((0, 0), (0, 0)), relu=True)
  assert not impl.fuses(layer, batch, backends.Epilogue(pooling=pooling))
  # Offered to the tuner on convolutions; a layer of one output pixel (a matmul) it runs as dense does.
  assert "gemm" in tuning.candidate_backends() and impl.times(layer, batch)
  fc = random_layer(rng, m=12, n=7, k=8, kernel=(3, 3), strides=(1, 1), padding=(0, 0), size=(3, 3), density=0.4)
  assert not impl.times(fc, batch) and not impl.fuses(fc, batch, backends.Epilogue(relu=True))
  x = rng.standard_normal((batch, 3, 3, 12)).astype(np.float32)
  got = backends.apply_nhwc(impl, fc, jax.tree.map(jnp.asarray, impl.prepare(fc)), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), dense_reference(fc, x), rtol=1e-4, atol=1e-4)


@pytest.mark.kernel
def test_residual_blocks_end_inside_the_kernel(rng):
  """ResNet-LCNN: each block's addition and ReLU, and each ReLU after a layer, are applied by the layer before
  them (no XLA maximum left), with the same logits as running them in XLA."""
  input_shape = MODELS["resnet-lcnn"]
  exported = inference.inference_model(_model("resnet-lcnn", input_shape, rng), input_shape, backends="lookup")
  x = jnp.asarray(rng.standard_normal((17, *input_shape)).astype(np.float32))
  fused_text = exported._forward.lower(exported.params(), x).as_text()
  got = np.asarray(exported(x))
  assert exported.graph.fusion.epilogues  # found once, at export
  separate = bench.without_epilogues(exported)
  separate_text = separate._forward.lower(separate.params(), x).as_text()
  expected = np.asarray(separate(x))
  assert fused_text.count("stablehlo.maximum") == 0 < separate_text.count("stablehlo.maximum")
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
