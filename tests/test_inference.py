"""Fast inference: backends, export, loader and benchmark helpers (REFERENCE §1)."""

import functools
import logging
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lcnn_jax import bench, checkpoint, cli, flops, inference, models
from lcnn_jax.inference import backends, flat_s, kernels, layouts, machine, passes, predict, tracing, tuning
from lcnn_jax.inference import precision as precision_lib
from lcnn_jax.inference import exporter as exporter_lib
from lcnn_jax.inference import model as model_lib
from lcnn_jax.inference.records import AffineLayer, LookupLayer

from lookup_reference import bfloat16_s_reference, dense_reference, max_pool_reference, random_layer  # noqa: E402
from helpers import (LAYER_CASES, Unfoldable, as_if_trained, assert_describes_a_machine, eval_logits, run_config,
                     small_model, write_run)

AVAILABLE = backends.available_backends()


TILES = ("lookup:tile=0", "lookup:tile=1", "lookup:tile=6000", "lookup:tile=40000", "lookup:chunk=64",
         "lookup:tile=0,chunk=1000")
"""The lookup kernel without tiles, with tiles of one block (any tile too small for a band of S), and two sizes
that cut the test maps into several bands of rows; ``lookup`` itself tiles by this machine's L2. The one-pixel
layers (fc6_like, 1x1) stored by chunks of S: of 16 elements (the smallest), and of 250 (a few chunks)."""


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS) + list(TILES))
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_backend_equals_dense_conv_with_reconstructed_kernel(backend, case, rng):
  layer = random_layer(rng, **LAYER_CASES[case])
  impl = backends.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  # Batches 1, 3, 17 and 40 take every path of the C++ kernel (sparse dot products, 16- and 32-wide blocks);
  # the input arrives as NHWC, or (batch 17) as CHWN or NCHW.
  for batch, layout in [(1, layouts.NHWC), (3, layouts.NHWC), (17, 17), (17, 1), (40, layouts.NHWC)]:
    run = jax.jit(lambda p, x: layouts.convert(*impl.apply(layer, p, x, layout), layouts.NHWC))
    x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
    expected = dense_reference(layer, x)
    got = np.asarray(run(params, layouts.convert(jnp.asarray(x), layouts.NHWC, layout)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                               err_msg=f"input {layout}, batch {batch}")


S_BFLOAT16 = ("lookup:s=bfloat16", "lookup:tile=0,s=bfloat16", "lookup:tile=6000,s=bfloat16")
"""S kept in bfloat16: with this machine's tiles, without tiles, and with tiles that cut the test maps into bands."""


@pytest.mark.kernel
@pytest.mark.parametrize("stored", ["float32", "bfloat16", "int8"])  # bf16 and int8: AVX512-BF16's dot products
@pytest.mark.parametrize("backend", S_BFLOAT16)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_lookups_over_bfloat16_s_equal_the_reference_over_rounded_s(backend, case, stored, rng):
  layer = precision_lib.quantize_layer(random_layer(rng, **LAYER_CASES[case]), stored)
  impl = backends.get_backend(backend)
  if not impl.available()[0]:
    pytest.skip(impl.available()[1])
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  for batch, layout in [(1, layouts.NHWC), (3, layouts.NHWC), (17, 17), (40, layouts.NHWC)]:
    run = jax.jit(lambda p, x: layouts.convert(*impl.apply(layer, p, x, layout), layouts.NHWC))
    x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
    got = np.asarray(run(params, layouts.convert(jnp.asarray(x), layouts.NHWC, layout)))
    exact = dense_reference(layer, x)
    if not impl.s_bfloat16(layer):  # S read in place, in float32: as plain lookup
      np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
      continue
    columns = batch * layer.input_size[0] * layer.input_size[1]  # a stage of under 32 columns stays float32
    expected, ambiguity = bfloat16_s_reference(layer, x, impl.dictionary_in_bfloat16(layer) and columns >= 32)
    # To float32 accuracy, but for elements of S that the kernel's float32 sum (in another order) may round to
    # the other neighbouring bfloat16 value: the reference bounds what those can change in each output.
    tight = 1e-4 * np.abs(expected).max()
    error = np.abs(got - expected)
    assert got.shape == expected.shape and np.all(error <= tight + ambiguity), (
        f"input {layout}, batch {batch}: {np.sum(error > tight + ambiguity)} outputs off by up to {error.max():.3g}")
    if layer.nnz and batch == 40:  # the rounding is there: float32 S gives other outputs almost everywhere
      assert np.mean(np.abs(exact - expected) > tight) > 0.5


def test_bfloat16_s_is_timed_only_on_low_precision_layers_whose_s_the_kernel_copies(rng):
  impl = backends.get_backend("lookup:s=bfloat16")
  assert "lookup:s=bfloat16" in backends.get_backend("lookup").tuned_variants()
  for case, copies in [("3x3_pad1", True), ("alexnet_conv1_like", True), ("fc6_like", False), ("1x1", False)]:
    layer = random_layer(rng, **LAYER_CASES[case])
    assert backends.Lookup.copies_s(layer) == copies and impl.s_bfloat16(layer) == copies
    assert not impl.times(layer, 8)  # a float32 export keeps float32 S
    for stored in ("bfloat16", "int8"):
      assert impl.times(precision_lib.quantize_layer(layer, stored), 8) == copies
  with pytest.raises(ValueError, match="lookup:s= one of float32, bfloat16"):
    backends.get_backend("lookup:s=float16")


def test_lookup_layer_round_trips_coefficients(rng):
  coefficients = (rng.standard_normal((3, 2, 4, 5)) * (rng.random((3, 2, 4, 5)) < 0.4)).astype(np.float32)
  layer = LookupLayer.from_coefficients(np.eye(4, dtype=np.float32), coefficients, None, strides=(1, 1),
                                                 padding=(0, 0), input_size=(4, 4))
  np.testing.assert_array_equal(layer.coefficients(), coefficients)
  assert layer.nnz == np.count_nonzero(coefficients)
  assert layer.indices.dtype == np.uint8  # 3·2·4 positions
  assert np.all(np.diff(layer.starts) == np.count_nonzero(coefficients.reshape(-1, 5), axis=0))


@pytest.mark.kernel
@pytest.mark.parametrize("case,pooling", [
    ("alexnet_conv1_like", backends.Pooling((3, 3), (2, 2), ((0, 0), (0, 0)), relu=True)),
    ("3x3_pad1", backends.Pooling((3, 3), (2, 2), ((1, 1), (1, 1)), relu=True)),  # ResNet's first pooling
    ("map_strided", backends.Pooling((2, 3), (1, 2), ((0, 1), (1, 0)), relu=False)),
    ("map_fused_dictionary", backends.Pooling((3, 3), (3, 3), ((0, 0), (0, 0)), relu=True))])
@pytest.mark.parametrize("backend", ("lookup",) + TILES)
def test_lookup_kernel_pools_its_output_as_the_reference(case, pooling, backend, rng):
  layer = random_layer(rng, **LAYER_CASES[case])
  impl = backends.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  batch = backends.POOLED_MIN_BATCH + 1
  x = rng.standard_normal((batch, *layer.input_size, layer.in_features)).astype(np.float32)
  layout = impl.input_layout(layer, batch)
  epilogue = backends.Epilogue(pooling=pooling)
  assert impl.fuses(layer, batch, epilogue) and not impl.fuses(layer, batch - 2, epilogue)
  run = jax.jit(lambda p, v: layouts.convert(*impl.apply(layer, p, v, layout, epilogue), layouts.NHWC))
  got = np.asarray(run(params, layouts.convert(jnp.asarray(x), layouts.NHWC, layout)))
  conv = dense_reference(layer, x)
  expected = max_pool_reference(np.maximum(conv, 0) if pooling.relu else conv, pooling.window, pooling.strides,
                                 pooling.padding, relu=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_relu_before_max_pool_is_applied_by_the_pool(rng):
  model = as_if_trained(small_model("alexnet-lcnn", (67, 67, 3)), rng)
  graph, _ = tracing.trace(model, (67, 67, 3))
  deferred = passes.relus_into_max_pools(graph)
  pools = [e for e in graph.equations if e.primitive == "reduce_window_max"]
  assert pools and {e.inputs[0][1] for e in pools} == deferred
  relus = [e for e in graph.equations if passes.is_relu(e)]
  assert {e.outputs[0] for e in relus} > deferred  # those after conv3, conv4, fc6 and fc7 stay ReLUs


def test_unknown_backend_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="expected one of"):
    backends.get_backend("sparse")
  with pytest.raises(ValueError, match="lookup:tile=N"):
    backends.get_backend("lookup:tile=big")


def test_lookup_tiles_are_sized_from_this_machines_l2(monkeypatch):
  monkeypatch.setenv("LCNN_JAX_L2_BYTES", "262144")
  assert backends.get_backend("lookup").tile() == 131072  # half the L2, as the environment emulates it
  assert backends.get_backend("lookup:tile=0").tile() == 0
  assert backends.get_backend("lookup:tile=4096").name == "lookup:tile=4096"


@pytest.mark.parametrize("batch", [1, 4])
def test_a_timed_layer_leaves_its_output_uncopied_and_equal_to_the_reference(batch, rng):
  # The tuner's call of a layer must not add a copy that no model makes (the kernel's CHWN output once went
  # through an element-wise copy into XLA's default layout, doubling small layers' times at batch 1).
  if not backends.kernel_here()[0]:
    pytest.skip(backends.kernel_here()[1])
  layer = random_layer(rng, **LAYER_CASES["3x3_pad1"])
  fn, (params, x) = tuning.layer_call(layer, "lookup", batch)
  assert " copy(" not in fn.lower(params, x).compile().as_text()
  out = np.asarray(fn(params, x)).reshape(layer.out_features, *layer.output_size, batch)  # one tile of CHWN
  nhwc = np.asarray(layouts.convert(jnp.asarray(x), batch, layouts.NHWC)) if x.ndim == 5 else np.asarray(x)
  np.testing.assert_allclose(out.transpose(3, 1, 2, 0), dense_reference(layer, nhwc), rtol=1e-4, atol=1e-4)


def test_lookup_chunks_are_sized_from_this_machines_l1_and_change_only_one_pixel_layers(monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_L1_BYTES", "16384")
  assert machine.chunk_bytes() == 8192 and "lookup:chunk=8192" in backends.get_backend("lookup").tuned_variants()
  chunked = backends.get_backend("lookup:tile=0,chunk=8192")
  assert chunked.name == "lookup:tile=0,chunk=8192" and chunked.tile() == 0
  with pytest.raises(ValueError, match="lookup:chunk=N"):
    backends.get_backend("lookup:chunk=half")
  one_pixel, a_map = (random_layer(rng, **LAYER_CASES[case]) for case in ("fc6_like", "3x3_pad1"))
  assert chunked.chunk(one_pixel) == 2048 and chunked.times(one_pixel, 1)
  assert chunked.chunk(a_map) == 0 and not chunked.times(a_map, 1)
  # The lookups by chunks: every non-zero once, chunk-major, each chunk's indices within its span of S.
  params = chunked.prepare(one_pixel)
  g = flat_s.geometry(one_pixel)
  chunks = -(-g.atoms * g.height * g.width // 2048)
  starts, indices = params["starts"], params["indices"].astype(np.int64)
  assert starts.shape == (chunks * one_pixel.out_features + 1,) and starts[-1] == one_pixel.nnz
  for c in range(chunks):
    piece = indices[starts[c * one_pixel.out_features]:starts[(c + 1) * one_pixel.out_features]]
    assert np.all(piece // 2048 == c)
  assert chunked.network_step(one_pixel) is None  # the batch-1 chain reads lookups stored output by output


class _ReluFusing(backends.Dense):
  """A backend declared only here: the reconstructed kernel, with the ReLU after a layer applied by the layer
  itself. ``applied`` lists the epilogues it was given."""
  name = "relu-fusing"
  applied: list = []

  def fuses(self, layer, batch, epilogue):
    return epilogue == backends.Epilogue(relu=True)

  def apply(self, layer, params, x, layout, epilogue=None, residual=None):
    y, layout = super().apply(layer, params, x, layout)
    if epilogue is None:
      return y, layout
    self.applied.append(epilogue)
    return jnp.maximum(y, 0.0), layout


def test_a_backend_added_as_one_class_and_one_registration_is_chosen_and_fuses_its_relu(tmp_path, monkeypatch, rng):
  monkeypatch.setitem(backends.BACKENDS, _ReluFusing.name, _ReluFusing)  # its registration, for this test only
  monkeypatch.setattr(_ReluFusing, "applied", [])
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  # The tuner offers it and times it like the others.
  assert _ReluFusing.name in tuning.candidate_backends()
  layer = random_layer(rng, **LAYER_CASES["3x3_pad1"])
  choice, timings = tuning.choose_backends({"a": layer}, 2, candidates=[_ReluFusing.name])
  assert choice == {"a": _ReluFusing.name} and timings["a"][_ReluFusing.name] > 0
  # One layer with its ReLU fused equals the float64 reference; what it does not fuse is left to the graph.
  impl = backends.get_backend(_ReluFusing.name)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  x = rng.standard_normal((3, *layer.input_size, layer.in_features)).astype(np.float32)
  got, layout = model_lib.run_layer(layer, impl, params, (jnp.asarray(x), layouts.NHWC), backends.Epilogue(relu=True))
  expected = np.maximum(dense_reference(layer, x), 0)
  np.testing.assert_allclose(np.asarray(layouts.convert(got, layout, layouts.NHWC)), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  pooling = backends.Pooling((2, 2), (2, 2), ((0, 0), (0, 0)), relu=True)
  assert model_lib.run_layer(layer, impl, params, (jnp.asarray(x), layouts.NHWC),
                             backends.Epilogue(pooling=pooling)) is None
  # A whole model named on it: the ReLUs after its lookup layers run inside the backend, the logits as trained.
  model, input_shape, x, expected = _trained_model_and_logits("resnet-lcnn")
  exported = inference.inference_model(model, input_shape, backends=_ReluFusing.name)
  assert set(exported.backends.values()) == {_ReluFusing.name}
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert _ReluFusing.applied and set(_ReluFusing.applied) == {backends.Epilogue(relu=True)}


# Export ------------------------------------------------------------------------------------------------------

MODEL_CASES = {
    "digits-lcnn": dict(input_shape=(8, 8, 1), classifier=4),
    "alexnet-lcnn": dict(input_shape=(67, 67, 3)),
    "resnet-lcnn": dict(input_shape=(32, 32, 3)),
}


@functools.cache
def _trained_model_and_logits(name):
  """One model per case for every backend: (model, input shape, inputs, eval-mode logits)."""
  case = dict(MODEL_CASES[name])
  input_shape = case.pop("input_shape")
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  model = as_if_trained(small_model(name, input_shape, **case), rng)
  x = rng.standard_normal((3, *input_shape)).astype(np.float32)
  return model, input_shape, x, eval_logits(model, x)


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS))
@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_exported_logits_equal_eval_mode_logits(name, backend):
  model, input_shape, x, expected = _trained_model_and_logits(name)
  exported = inference.inference_model(model, input_shape, backends=backend)
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # Every BatchNorm of these models directly follows a layer, so all of them fold.
  assert not any(isinstance(layer, AffineLayer) for layer in exported.layers.values())


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["alexnet-lcnn", "resnet-lcnn"])
def test_exported_logits_at_a_batch_pooled_by_the_kernel(name, rng):
  model, input_shape, _, _ = _trained_model_and_logits(name)
  x = rng.standard_normal((backends.POOLED_MIN_BATCH + 1, *input_shape)).astype(np.float32)
  expected = eval_logits(model, x)
  exported = inference.inference_model(model, input_shape, backends="lookup")
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # Every max pooling of these models follows a lookup layer and its ReLU: the kernel computes all three.
  graph = exported.graph
  pools = [e for e in graph.equations if e.primitive == "reduce_window_max"]
  # The export found them once and stored them with the graph.
  assert pools and sorted(graph.fusion.layers_into_max_pools.values()) == sorted(e.outputs[0] for e in pools)


@pytest.mark.parametrize("name,input_shape", [("digits", (8, 8, 1)), ("resnet", (32, 32, 3))])
def test_dense_models_export_with_folded_batch_norm(name, input_shape, rng):
  model = as_if_trained(small_model(name, input_shape), rng)
  x = rng.standard_normal((2, *input_shape)).astype(np.float32)
  exported = inference.inference_model(model, input_shape, backends="dense")
  expected = eval_logits(model, x)
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS))
def test_batch_norm_folds_only_into_a_layer_whose_output_nothing_else_reads(backend, rng):
  model = as_if_trained(Unfoldable(nnx.Rngs(0)), rng, density=0.7)
  x = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
  exported = inference.inference_model(model, (6, 5, 3), backends=backend)
  kinds = {name: type(layer).__name__ for name, layer in exported.layers.items()}
  assert kinds == {"bn_in": "AffineLayer", "conv": "LookupLayer", "conv2": "ConvLayer", "bn2": "AffineLayer",
                   "fc": "LookupLayer"}
  expected = eval_logits(model, x)
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_saved_file_loads_without_pickle_and_keeps_classes_and_backends(tmp_path, rng):
  model = as_if_trained(small_model("digits-lcnn", (8, 8, 1), classifier=4), rng)
  classes = [f"digit {i}" for i in range(10)]
  exported = inference.inference_model(model, (8, 8, 1), backends="gather", class_names=classes)
  path = tmp_path / "digits.npz"
  inference.save(exported, path)
  with np.load(path, allow_pickle=False) as archive:  # would raise on any pickled object
    assert "header" in archive.files and "layers/conv1/values" in archive.files
  loaded = inference.load(path)
  x = rng.standard_normal((5, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(exported(x)), rtol=1e-6, atol=1e-6)
  assert loaded.class_names == classes and loaded.backends == exported.backends
  assert inference.load(path, backends="dense").backends == {name: "dense" for name in exported.backends}


def test_export_names_what_it_cannot_store():
  class Branches(nnx.Module):
    def __call__(self, x):
      return jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x)

  with pytest.raises(inference.UnsupportedModel, match="'cond'"):
    inference.inference_model(Branches(), (2, 2, 1), backends="dense")


def test_export_from_workdir_and_predict_top5_of_image_files(tmp_path, rng):
  model = models.create_model(run_config().model, num_classes=10, input_shape=(16, 16, 3), rngs=nnx.Rngs(3))
  as_if_trained(model, rng)
  classes = [f"class {i}" for i in range(10)]
  write_run(tmp_path / "run", model, {"name": "folder", "num_classes": 10, "image_shape": [16, 16, 3],
                                      "class_names": classes, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]})
  exported = inference.export(tmp_path / "run", tmp_path / "model.npz", backends="factored")
  assert exported.class_names == classes and exported.preprocessing["resize_size"] == 18
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f"image{i}.png"))
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(paths[-1])
  loaded = inference.load(tmp_path / "model.npz")
  top = predict.predict(loaded, paths, k=5)
  images = predict.load_images(paths, loaded)
  expected = np.argsort(-eval_logits(model, images), axis=-1)[:, :5]
  assert [[name for name, _ in row] for row in top] == [[classes[i] for i in row] for row in expected]
  assert all(1 >= row[0][1] >= row[-1][1] > 0 for row in top)
  assert "class" in predict.format_predictions(paths, top)


def test_digits_run_predicts_image_files_as_its_evaluation_sees_them(tmp_path, rng):
  from sklearn.datasets import load_digits
  from lcnn_jax.data import transforms
  model = as_if_trained(models.create_model(run_config().model, num_classes=10, input_shape=(8, 8, 1),
                                            rngs=nnx.Rngs(5)), rng)
  write_run(tmp_path / "run", model, {"name": "digits", "num_classes": 10, "image_shape": [8, 8, 1],
                                      "mean": [0.3], "std": [0.4]})
  exported = inference.export(tmp_path / "run", backends="dense")
  assert exported.preprocessing["resize_size"] == 8  # no resize-and-crop: digits are evaluated whole
  digit = load_digits().images[-1]
  path = str(tmp_path / "digit.png")
  Image.fromarray((digit * 255 / 16).astype(np.uint8)).save(path)
  evaluated = transforms.DigitsTransform(8).eval((digit / 16)[..., None].astype(np.float32))
  expected = eval_logits(model, ((evaluated - 0.3) / 0.4)[None].astype(np.float32))
  np.testing.assert_allclose(np.asarray(exported(predict.load_images([path], exported))), expected,
                             rtol=1e-3, atol=2e-2 * np.abs(expected).max())  # the PNG holds 8-bit pixels


def export_command(*args):
  """The exit status of ``python -m lcnn_jax.inference.exporter ARGS``, run in this process."""
  return cli.call(exporter_lib.main, exporter_lib.define_flags, ["exporter", *args])


def test_export_command_writes_a_model_and_rejects_a_missing_run(tmp_path, rng, capsys):
  model = as_if_trained(models.create_model(run_config().model, num_classes=10, input_shape=(16, 16, 3),
                                            rngs=nnx.Rngs(4)), rng)
  write_run(tmp_path / "run", model, {"name": "folder", "num_classes": 10, "image_shape": [16, 16, 3],
                                      "mean": [0.5] * 3, "std": [0.2] * 3})
  output = tmp_path / "model.npz"
  assert export_command(f"--workdir={tmp_path / 'run'}", f"--output={output}",
                        "--backends=gather") == 0
  assert "gather" in capsys.readouterr().out
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  expected = eval_logits(model, x)
  np.testing.assert_allclose(np.asarray(inference.load(output)(x)), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  assert export_command(f"--workdir={tmp_path / 'missing'}", f"--output={output}") == 2
  assert "missing" in capsys.readouterr().err
  compact = tmp_path / "int8.npz"
  assert export_command(f"--workdir={tmp_path / 'run'}", f"--output={compact}", "--backends=gather",
                        "--precision=int8") == 0
  out = capsys.readouterr().out
  assert "(int8); dense CNN" in out and "B float32" in out, out  # its bytes beside the dense CNN's
  assert inference.load(compact).precision == "int8"
  assert export_command(f"--workdir={tmp_path / 'run'}", f"--output={compact}",
                        "--precision=float16") == 2
  assert "float16" in capsys.readouterr().err


def test_export_command_reads_the_runs_config_once_and_prints_the_counted_dense_cnn_bytes(tmp_path, monkeypatch, rng,
                                                                                           capsys):
  model = as_if_trained(models.create_model(run_config().model, num_classes=10, input_shape=(8, 8, 1),
                                            rngs=nnx.Rngs(2)), rng)
  write_run(tmp_path / "run", model, {"name": "digits", "num_classes": 10, "image_shape": [8, 8, 1],
                                      "mean": [0.5], "std": [0.2]})
  reads = []
  load_run_info = checkpoint.load_run_info
  monkeypatch.setattr(checkpoint, "load_run_info", lambda workdir: reads.append(workdir) or load_run_info(workdir))
  assert export_command(f"--workdir={tmp_path / 'run'}", f"--output={tmp_path / 'm.npz'}", "--backends=dense",
                        "--precision=bfloat16") == 0
  assert reads == [str(tmp_path / "run")]
  cnn = flops.baseline_model(run_config().model, 10, (8, 8, 1))
  dense = {p: flops.stored_bytes(cnn, (8, 8, 1), p) / 1e3 for p in ("float32", "bfloat16")}
  assert f"dense CNN {dense['float32']:.1f} KB float32, {dense['bfloat16']:.1f} KB bfloat16" in capsys.readouterr().out


def test_auto_backends_are_measured_once_then_read_from_the_cache(tmp_path, monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  layer = random_layer(rng, **LAYER_CASES["3x3_pad1"])
  choice, timings = inference.choose_backends({"a": layer}, 2)
  lookup_variants = backends.get_backend("lookup").tuned_variants() if "lookup" in AVAILABLE else []
  timed = {b for b in set(AVAILABLE) - {"lookup"} | set(lookup_variants) if backends.get_backend(b).times(layer, 2)}
  assert not any("chunk=" in b for b in timed)  # a layer whose output is a map: chunks would change nothing
  assert choice["a"] in timed and set(timings["a"]) == timed
  monkeypatch.setattr(tuning, "time_layer", lambda *args: pytest.fail("measured a cached layer"))
  assert inference.choose_backends({"a": layer}, 2) == (choice, timings)


def test_close_backends_are_timed_again_side_by_side_and_the_side_by_side_times_decide(tmp_path, monkeypatch, rng):
  # Timed alone, "factored" looks 10% faster (within tuning.CLOSE of "dense"); side by side, "dense" is faster:
  # the side-by-side times decide, and the cache keeps them, so the next choice measures nothing.
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  layer = random_layer(rng, **LAYER_CASES["3x3_pad1"])
  alone = {"dense": 1.0, "factored": 0.9}
  monkeypatch.setattr(tuning, "time_layer", lambda layer, backend, *args, **kwargs: alone[backend])
  side_by_side = []
  def interleaved(fns, **kwargs):
    side_by_side.append(sorted(fns))
    for fn in fns.values():
      fn()  # each is a real call of the layer on its backend
    return {"dense": 0.5, "factored": 0.8}
  monkeypatch.setattr(tuning, "interleaved_ms", interleaved)
  choice, timings = inference.choose_backends({"a": layer}, 2, candidates=["dense", "factored"])
  assert side_by_side == [["dense", "factored"]]
  assert choice == {"a": "dense"} and timings == {"a": {"dense": 0.5, "factored": 0.8}}
  monkeypatch.setattr(tuning, "time_layer", lambda *args, **kwargs: pytest.fail("measured a cached layer"))
  monkeypatch.setattr(tuning, "interleaved_ms", lambda *args, **kwargs: pytest.fail("timed cached layers again"))
  assert inference.choose_backends({"a": layer}, 2, candidates=["dense", "factored"]) == (choice, timings)


def test_a_backend_far_behind_is_not_timed_again_side_by_side(tmp_path, monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  layer = random_layer(rng, **LAYER_CASES["3x3_pad1"])
  alone = {"dense": 1.0, "factored": 1.0 * tuning.CLOSE * 1.01}
  monkeypatch.setattr(tuning, "time_layer", lambda layer, backend, *args, **kwargs: alone[backend])
  monkeypatch.setattr(tuning, "interleaved_ms", lambda *args, **kwargs: pytest.fail("timed a hopeless backend"))
  assert inference.choose_backends({"a": layer}, 2, candidates=["dense", "factored"]) == (
      {"a": "dense"}, {"a": alone})


@pytest.mark.parametrize("changed", ["kernel build", "cpu"])
def test_cached_timings_do_not_outlive_the_kernel_build_or_cpu_they_were_measured_with(changed, tmp_path,
                                                                                       monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  layer = random_layer(rng, **LAYER_CASES["3x3_pad1"])
  inference.choose_backends({"a": layer}, 2, candidates=["dense"])
  if changed == "kernel build":
    monkeypatch.setattr(kernels, "build_id", lambda: "0123456789abcdef")
  else:
    monkeypatch.setattr(machine, "cpu_key", lambda: "Another CPU [000000000000] kernel native")
  measured = []
  monkeypatch.setattr(tuning, "time_layer", lambda *args, **kwargs: measured.append(args[1]) or 1.0)
  assert inference.choose_backends({"a": layer}, 2, candidates=["dense"]) == ({"a": "dense"}, {"a": {"dense": 1.0}})
  assert measured == ["dense"]


def test_an_export_from_another_cpu_is_tuned_again_here_once_with_equal_logits(tmp_path, monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path / "cache"))
  model, input_shape, x, expected = _trained_model_and_logits("digits-lcnn")
  exported = inference.inference_model(model, input_shape, backends="auto", batch_size=3)
  assert exported.tuning["machine"] == machine.cpu_key()
  assert set(exported.tuning["machine_description"]) == {"cpu", "kernel_arch", "march", "l1_bytes", "l2_bytes",
                                                         "l3_bytes", "cores"}
  here = tmp_path / "here.npz"
  inference.save(exported, here)
  assert inference.load(here).backends == exported.backends  # tuned on this CPU: kept as it is
  # The same file as if exported on another machine: its tuning names another CPU, its backends all 'gather'.
  elsewhere = dict(exported.tuning, machine="Other CPU [0123456789ab] kernel native")
  moved = exported.with_backends("gather")
  moved.tuning = elsewhere
  path = tmp_path / "elsewhere.npz"
  inference.save(moved, path)
  calls = []
  real_tune = tuning.tune
  monkeypatch.setattr(tuning, "tune", lambda *args: calls.append(args[1:]) or real_tune(*args))
  retuned = inference.load(path)
  assert calls == [(3,)]  # measured here, at the batch size the file was tuned for
  assert retuned.tuning["machine"] == machine.cpu_key() and retuned.tuning["batch_size"] == 3
  np.testing.assert_allclose(np.asarray(retuned(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # Once per file and CPU: the next load reads the choice kept in the cache; --retune measures again.
  monkeypatch.setattr(tuning, "tune", lambda *args: pytest.fail("tuned a second time"))
  again = inference.load(path)
  assert again.backends == retuned.backends and again.tuning == retuned.tuning
  with pytest.raises(pytest.fail.Exception, match="tuned a second time"):
    inference.load(path, retune=True)


@pytest.mark.parametrize("faster", model_lib.CONVOLUTIONS)
def test_dense_convolutions_run_by_xla_keep_the_logits_and_the_tuner_keeps_the_faster_way(faster, tmp_path,
                                                                                           monkeypatch):
  ok, reason = model_lib.xla_convolutions_available()
  if not ok:
    pytest.skip(reason)
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  model, input_shape, x, expected = _trained_model_and_logits("digits-lcnn")
  dense = inference.inference_model(model, input_shape, backends="dense")  # every lookup layer a convolution
  assert dense.convolutions == "default" and dense.has_convolutions(3)
  assert not inference.inference_model(model, input_shape, backends="lookup").has_convolutions(3)
  by_xla = dense.with_backends("dense", convolutions="xla")
  np.testing.assert_allclose(np.asarray(by_xla(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  compiled = {m.convolutions: m._forward.lower(m.params(), jnp.asarray(x)).compile().as_text() for m in (dense, by_xla)}
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  probe = jax.jit(conv).lower(jnp.ones((1, 27, 27, 64)), jnp.ones((5, 5, 64, 64))).compile().as_text()
  if "__ynn_fusion" in probe:  # where XLA hands convolutions to YNNPACK, "xla" takes them back
    assert compiled["xla"].count("__ynn_fusion") < compiled["default"].count("__ynn_fusion")
  with pytest.raises(ValueError, match="convolutions='eigen'"):
    dense.with_backends("dense", convolutions="eigen")

  # The tuner times both ways on the whole model, side by side, and keeps the faster; the file keeps it.
  monkeypatch.setattr(tuning, "candidate_backends", lambda: ["dense"])
  monkeypatch.setattr(tuning, "SIDE_BY_SIDE_SECONDS", 0.0)
  timed = []

  def model_call(variant, batch_size):
    def call():
      timed.append(variant.convolutions)
      time.sleep(0.001 if variant.convolutions == faster else 0.004)
    return call

  monkeypatch.setattr(tuning, "_model_call", model_call)
  tuned = inference.inference_model(model, input_shape, backends="auto", batch_size=3)
  assert set(timed) == set(model_lib.CONVOLUTIONS)
  assert tuned.convolutions == tuned.tuning["convolutions"] == faster
  # measured on the per-layer mix (every layer dense here), before the whole-model candidates
  assert {f"per-layer, convolutions {name}" for name in model_lib.CONVOLUTIONS} <= set(tuned.tuning["model_ms"])
  inference.save(tuned, tmp_path / "model.npz")
  loaded = inference.load(tmp_path / "model.npz")
  assert loaded.convolutions == faster and loaded.with_backends("gather").convolutions == faster
  np.testing.assert_allclose(np.asarray(loaded(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # A model without dense convolutions is not timed both ways.
  timed.clear()
  monkeypatch.setattr(tuning, "candidate_backends", lambda: ["lookup"])
  all_lookups = inference.inference_model(model, input_shape, backends="auto", batch_size=3)
  assert "convolutions" not in all_lookups.tuning and all_lookups.convolutions == "default"


# Benchmark helpers -------------------------------------------------------------------------------------------

def test_synthetic_sparsity_gives_the_target_multiplication_speedup(rng):
  lcnn = small_model("digits-lcnn", (8, 8, 1), convs=4, first=2)
  cnn = small_model("digits", (8, 8, 1))
  baseline = flops.count_multiplications(cnn, (8, 8, 1))
  density = bench.solve_density(lcnn, baseline, 3.0, (8, 8, 1))
  bench.set_random_sparsity(lcnn, density, rng)
  count = flops.count_multiplications(lcnn, (8, 8, 1))
  assert count.speedup_over(baseline) == pytest.approx(3.0, rel=0.01)
  assert all(row.density == pytest.approx(density, abs=0.01) for row in count.rows if row.dictionary_size)


def test_unreachable_speedup_is_explained(rng):
  lcnn = small_model("digits-lcnn", (8, 8, 1))
  baseline = flops.count_multiplications(small_model("digits", (8, 8, 1)), (8, 8, 1))
  with pytest.raises(ValueError, match="dictionaries and dense layers alone"):
    bench.solve_density(lcnn, baseline, 1000.0, (8, 8, 1))


def test_auto_export_picks_the_fastest_whole_model_and_keeps_the_logits(tmp_path, monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  model, input_shape, x, expected = _trained_model_and_logits("digits-lcnn")
  exported = inference.inference_model(model, input_shape, backends="auto", batch_size=3)
  assert exported.tuning["chosen"] in ["per-layer", *AVAILABLE]
  # ... and, where the per-layer mix has dense convolutions, who runs them, both ways side by side
  both_ways = {f"per-layer, convolutions {name}" for name in model_lib.CONVOLUTIONS}
  timed_both_ways = "convolutions" in exported.tuning
  assert set(exported.tuning["model_ms"]) == {"per-layer", *AVAILABLE, *(both_ways if timed_both_ways else ())}
  mix = {name: min(ms, key=ms.get) for name, ms in exported.tuning["timings_ms"].items()}
  assert timed_both_ways == (exported.with_backends(mix).has_convolutions(3)
                             and model_lib.xla_convolutions_available()[0])
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_benchmark_of_a_trained_run_reports_every_backend(tmp_path, monkeypatch, rng, caplog):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  caplog.set_level(logging.INFO, logger="absl")
  model = models.create_model(run_config().model, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(3))
  as_if_trained(model, rng)
  write_run(tmp_path / "run", model, {"name": "digits", "num_classes": 10, "image_shape": [8, 8, 1],
                                      "class_names": None, "mean": [0.5], "std": [0.25]})
  result = bench.run("alexnet", "fast", 2, checkpoint=str(tmp_path / "run"), seconds=0.05, with_layers=True,
                     precisions=("float32", "int8"))
  # the same mixes without the stored epilogues, timed beside them where the layers have some
  unfused = [row for row in result["rows"] if row["backend"].endswith("-unfused")]
  assert {row["backend"] for row in unfused} <= {"auto-unfused", "lookup-unfused"}
  rows = [row for row in result["rows"] if row not in unfused]
  assert [row["backend"] for row in rows] == [*AVAILABLE, "auto", "auto int8"]
  assert [row["precision"] for row in rows] == ["float32"] * (len(AVAILABLE) + 1) + ["int8"]
  int8_mix = result["auto_backends_by_precision"]["int8"]  # the int8 export tuned for itself
  assert set(int8_mix) == set(result["auto_backends"]) and all(b in AVAILABLE or b.startswith("lookup:")
                                                                for b in int8_mix.values())
  assert "auto int8: " in bench.format_table(result)
  assert {(row["model"], row["preset"]) for row in result["rows"]} == {(run_config().model.name, "trained")}
  for row in result["rows"]:
    assert row["dense_ms"] > 0 and row["lcnn_ms"] > 0 and row["count_speedup"] > 0
    assert row["wall_speedup"] == pytest.approx(row["dense_ms"] / row["lcnn_ms"])
  assert [layer["layer"] for layer in result["layers"]] == ["conv1", "conv2", "conv3", "classifier"]
  assert result["floors"]["l2_bandwidth_gbs"] > 0
  for layer in result["layers"]:  # the L2 floor for the kernel's lookups; the binding floor is the largest
    on_kernel = isinstance(backends.get_backend(layer["backend"]), backends.Lookup)  # the classifier too, if tuned so
    assert (layer["l2_floor_ms"] is not None) == on_kernel
    floors = {"memory": layer["memory_floor_ms"], "arithmetic": layer["arithmetic_floor_ms"],
              "l2": layer["l2_floor_ms"] or 0.0}
    assert layer["binding_floor"] == max(floors, key=floors.get)
    assert layer["floor_ratio"] == pytest.approx(layer["ms"] / floors[layer["binding_floor"]])
  table = bench.format_table(result)
  assert "auto" in table
  assert table.splitlines()[0] == assert_describes_a_machine(result["machine"])  # the machine heads the table
  # progress while it works: what it builds, then what it times and for how long
  progress = [r.getMessage() for r in caplog.records if r.name == "absl"]
  assert any(m.startswith("Building the CNN and the LCNN") for m in progress), progress
  assert any(m.startswith(f"Timing {len(result['rows']) + 1} variants") for m in progress), progress
