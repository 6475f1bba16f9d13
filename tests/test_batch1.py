"""Batch 1 without dispatch overhead: a lookup layer over a small map is one kernel call (its dictionary stage
included), and equals the layer-by-layer path (an XLA matmul for S, then the lookups)."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import config as config_lib
from lcnn_jax import inference, layers, models
from lcnn_jax.inference import backends, tuning

pytestmark = pytest.mark.kernel

MODELS = {"alexnet-lcnn": (67, 67, 3), "resnet-lcnn": (32, 32, 3), "digits-lcnn": (8, 8, 1)}


def _model(name, input_shape, rng):
  config = config_lib.default_config(name).model
  config.update({key: 8 for key in ("depth", "width") if key in config})  # the keys of those models that have them
  sizes = dict(stage1=6, stage2=8, stage3=8, stage4=8, fc=16, classifier=4 if name == "digits-lcnn" else 0)
  config.dictionary.update({key: size for key, size in sizes.items() if key in config.dictionary})
  model = models.create_model(config, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0))
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      n = module.num_features
      module.mean[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
      module.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    if isinstance(module, layers.LOOKUP_LAYERS):
      p = np.asarray(module.coefficients[...])
      module.coefficients[...] = jnp.asarray(p * (rng.random(p.shape) < 0.3))
  return model


def _calls(model, x, target):
  """How many times the jitted forward pass calls the kernel ``target``."""
  return model._forward.lower(model.params(), x).as_text().count(f"@{target}(")


@pytest.mark.parametrize("name,prec", [("alexnet-lcnn", "int8"), ("resnet-lcnn", "float32"),
                                       ("digits-lcnn", "bfloat16")])
def test_batch1_path_equals_layer_by_layer_path(name, prec, rng, monkeypatch):
  input_shape = MODELS[name]
  model = _model(name, input_shape, rng)
  x = jnp.asarray(rng.standard_normal((1, *input_shape)).astype(np.float32))
  one_call = inference.inference_model(model, input_shape, backends="lookup", precision=prec)
  one_call.chain = None  # a call per layer (the whole network in one call: the test below)
  got = np.asarray(one_call(x))
  # Every lookup layer whose dictionary XLA would apply is one call with its dictionary stage.
  separate = [n for n, layer in one_call.lookup_layers.items() if not backends.Lookup.fused(layer)]
  assert separate and _calls(one_call, x, "lcnn_lookup_conv_dictionary") == len(separate)
  assert _calls(one_call, x, "lcnn_lookup_conv") == 0
  monkeypatch.setattr(backends, "DICTIONARY_COLUMNS_MAX", 0)  # S from an XLA matmul, then the lookups
  layer_by_layer = one_call.with_backends("lookup")
  layer_by_layer.chain = None
  assert _calls(layer_by_layer, x, "lcnn_lookup_conv") == len(separate)
  expected = np.asarray(layer_by_layer(x))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name,prec", [("alexnet-lcnn", "float32"), ("alexnet-lcnn", "int8"),
                                       ("digits-lcnn", "bfloat16")])
def test_whole_network_in_one_call_equals_layer_by_layer(name, prec, rng):
  input_shape = MODELS[name]
  model = _model(name, input_shape, rng)
  x = jnp.asarray(rng.standard_normal((1, *input_shape)).astype(np.float32))
  one_call = inference.inference_model(model, input_shape, backends="lookup", precision=prec)
  # The chain is the layers up to the first step the kernel cannot take (the digits model's flatten before its
  # classifier); for AlexNet-LCNN that is every layer: one kernel call, and no other lookup call at batch 1.
  chained = [s.name for s in one_call.chain.steps]
  assert len(chained) >= 2 and chained == list(one_call.layers)[:len(chained)]
  assert _calls(one_call, x, "lcnn_network") == 1
  if name == "alexnet-lcnn":
    assert chained == list(one_call.layers)
    assert _calls(one_call, x, "lcnn_lookup_conv_dictionary") == _calls(one_call, x, "lcnn_lookup_conv_fused") == 0
  layer_by_layer = one_call.with_backends("lookup")
  layer_by_layer.chain = None
  assert _calls(layer_by_layer, x, "lcnn_network") == 0
  got, expected = np.asarray(one_call(x)), np.asarray(layer_by_layer(x))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # Larger batches keep the layer-by-layer path.
  batch = jnp.concatenate([x, x])
  assert _calls(one_call, batch, "lcnn_network") == 0
  np.testing.assert_allclose(np.asarray(one_call(batch))[1], got[0], rtol=1e-5, atol=1e-5 * np.abs(got).max())


def test_a_residual_model_keeps_what_the_chain_cannot_take(rng):
  model = _model("resnet-lcnn", MODELS["resnet-lcnn"], rng)
  exported = inference.inference_model(model, MODELS["resnet-lcnn"], backends="lookup")
  x = jnp.asarray(rng.standard_normal((1, *MODELS["resnet-lcnn"])).astype(np.float32))
  if exported.chain is not None:  # a chain stops at the first value used twice (a residual's input)
    assert 2 <= len(exported.chain.steps) < len(exported.lookup_layers)
  reference = exported.with_backends("lookup")
  reference.chain = None
  np.testing.assert_allclose(np.asarray(exported(x)), np.asarray(reference(x)), rtol=1e-5,
                             atol=1e-5 * np.abs(np.asarray(reference(x))).max())


@pytest.mark.parametrize("faster", ["one call", "a call per layer"])
def test_the_tuner_times_one_call_against_a_call_per_layer_and_the_file_keeps_its_choice(faster, tmp_path, rng,
                                                                                          monkeypatch):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "candidate_backends", lambda: ["lookup"])
  timed = []

  def model_call(model, batch_size):  # the whole model's call: the variant asked for is the faster
    one_call = model.chain is not None

    def call():
      timed.append(one_call)
      time.sleep(0.001 if one_call == (faster == "one call") else 0.004)
    return call

  monkeypatch.setattr(tuning, "_model_call", model_call)
  monkeypatch.setattr(tuning, "SIDE_BY_SIDE_SECONDS", 0.0)
  model = _model("digits-lcnn", MODELS["digits-lcnn"], rng)
  tuned = inference.inference_model(model, MODELS["digits-lcnn"], backends="auto", batch_size=1)
  # The per-layer mix and 'lookup' throughout, each in one call; then the kept one per layer, side by side.
  first_per_layer = timed.index(False)
  assert first_per_layer > 0 and all(timed[:first_per_layer])
  assert tuned.tuning["chain"] is (faster == "one call") and (tuned.chain is not None) is (faster == "one call")
  # The two candidates take equal times here: whichever is kept is the one also timed per layer.
  assert set(tuned.tuning["model_ms"]) == {"per-layer", "lookup", f"{tuned.tuning['chosen']}, no chain"}
  inference.save(tuned, tmp_path / "model.npz")
  loaded = inference.load(tmp_path / "model.npz")
  assert loaded.tuning["chain"] is tuned.tuning["chain"] and (loaded.chain is None) is (tuned.chain is None)
  x = jnp.asarray(rng.standard_normal((1, *MODELS["digits-lcnn"])).astype(np.float32))
  reference = loaded.with_backends("gather")
  np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(reference(x)), rtol=1e-4,
                             atol=1e-4 * np.abs(np.asarray(reference(x))).max())
  # Tuned at another batch size, batch 1 keeps the one call wherever the layers allow it.
  at_8 = inference.inference_model(model, MODELS["digits-lcnn"], backends="auto", batch_size=8)
  assert "chain" not in at_8.tuning and at_8.chain is not None
