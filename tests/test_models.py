"""Specification of lcnn_jax.models and the presets: shapes, parameter counts, the original's rules, modes, and what
adding a model takes (one module and one registration)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import config_flags

from lcnn_jax import cli, counting
from lcnn_jax import config as config_lib
from lcnn_jax import models
from lcnn_jax.layers import LookupConv, LookupDense
from lcnn_jax.models import common


def model_config(name, dictionary=(), **overrides):
  """``name``'s model config with ``overrides`` and the sizes in ``dictionary`` set in ``model.dictionary``."""
  c = config_lib.default_config(name).model
  c.dictionary.update(dict(dictionary))
  for key, value in overrides.items():
    c[key] = value
  return c


def build(name, num_classes, input_shape, seed=0, **overrides):
  return models.create_model(model_config(name, **overrides), num_classes=num_classes, input_shape=input_shape,
                             rngs=nnx.Rngs(seed))


def abstract(name, num_classes, input_shape, **overrides):
  """The model with shapes only (nothing initialised), for shapes and counts of ImageNet-sized nets."""
  return nnx.eval_shape(lambda: build(name, num_classes, input_shape, **overrides))


def abstract_output(model, batch_shape):
  return nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(batch_shape, jnp.float32))


def param_count(model):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def layer_types(model):
  return {"/".join(map(str, path)): type(m) for path, m in nnx.iter_modules(model)
          if isinstance(m, (nnx.Conv, nnx.Linear, LookupConv, LookupDense))}


def lookup(m, k, kh, kw, n):
  """Parameters of a lookup layer with bias: D (m, k), P (kh, kw, k, n), bias (n)."""
  return m * k + kh * kw * k * n + n


def conv(m, kh, kw, n):
  return kh * kw * m * n + n


# ---------------------------------------------------------------------------------------------- registry


def test_unknown_model_name_lists_the_known_names():
  with pytest.raises(ValueError, match="alexnet-lcnn.*digits-lcnn.*resnet-lcnn"):
    build("vgg", 10, (32, 32, 3))


def test_config_validate_knows_every_registered_model():
  assert config_lib.model_names() == ("alexnet", "alexnet-lcnn", "digits", "digits-lcnn", "mnist", "mnist-lcnn",
                                      "resnet", "resnet-lcnn")
  for name in config_lib.model_names():
    config_lib.validate(config_lib.default_config(name))
    assert callable(models.builder(name))
  c = config_lib.default_config()
  c.model.name = "lenet"
  with pytest.raises(ValueError, match="model.name='lenet'"):
    config_lib.validate(c)


class TinyNet(nnx.Module):
  """A model added by a test: one 3×3 convolution (a lookup layer in the LCNN) and a classifier on its average."""

  def __init__(self, num_classes, input_shape, *, width, dictionary_size=0, rngs):
    self.conv1 = common.conv(input_shape[-1], width, 3, padding=1, dictionary_size=dictionary_size, rngs=rngs)
    self.classifier = common.dense(width, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.classifier(common.global_average_pool(jax.nn.relu(self.conv1(x))))


def tiny(config, *, num_classes, input_shape, rngs):
  return TinyNet(num_classes, input_shape, width=config.width, rngs=rngs)


def tiny_lcnn(config, *, num_classes, input_shape, rngs):
  return TinyNet(num_classes, input_shape, width=config.width, dictionary_size=config.dictionary.first, rngs=rngs)


@pytest.fixture
def tiny_model(monkeypatch):
  """The registration a new model needs, beside its module: its names, builders, keys and dictionary sizes."""
  monkeypatch.setattr(config_lib, "FAMILIES", list(config_lib.FAMILIES))
  return config_lib.register_model(config_lib.ModelFamily(
      cnn="tiny", lcnn="tiny-lcnn", builders=(tiny, tiny_lcnn),
      keys={"width": (6, "Width of conv1."), "hops": (2, "A key no other model has.")},
      dictionary={"first": (2, "conv1.")}))


def test_a_model_added_by_one_registration_builds_validates_counts_and_owns_its_keys(tiny_model, tmp_path, capsys):
  config = config_lib.default_config("tiny-lcnn")
  assert sorted(config.model) == ["dictionary", "hops", "initial_sparsity", "name", "width"]
  config_lib.validate(config)
  model = models.create_model(config.model, num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  assert isinstance(model.conv1, LookupConv) and model(jnp.zeros((2, 8, 8, 1))).shape == (2, 3)
  baseline = models.baseline_config(config.model)
  assert baseline.name == "tiny" and isinstance(
      models.create_model(baseline, num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0)).conv1, nnx.Conv)
  assert counting.baseline_count(config.model, 3, (8, 8, 1)).total == 8 * 8 * 9 * 6 + 6 * 3

  config.model.depth = 34
  with pytest.raises(ValueError, match=r"model.depth is a key of resnet-lcnn, resnet, not of tiny-lcnn\. tiny-lcnn "
                                       r"takes model.dictionary.\{first\} and model.\{width, hops\}"):
    config_lib.validate(config)
  alexnet = config_lib.default_config("alexnet-lcnn")
  alexnet.model.hops = 3
  with pytest.raises(ValueError, match=r"model.hops is a key of tiny-lcnn, tiny, not of alexnet-lcnn"):
    models.create_model(alexnet.model, num_classes=3, input_shape=(67, 67, 3), rngs=nnx.Rngs(0))

  path = tmp_path / "tiny.py"
  path.write_text("from lcnn_jax import config as config_lib\n\n\ndef get_config():\n"
                  "  return config_lib.default_config('tiny-lcnn')\n")
  argv = ["prog", "--config", str(path), "--config.model.hops=5", "--config.model.dictionary.first=4"]
  seen = {}

  def define(flag_values):
    config_flags.DEFINE_config_file("config", None, "The run config.", flag_values=flag_values)

  assert cli.call(lambda argv, flags: seen.update(config=flags.config), define, argv) == 0
  assert (seen["config"].model.hops, seen["config"].model.dictionary.first) == (5, 4)
  assert cli.call(lambda argv, flags: None, define, ["prog", "--config", str(path), "--config.model.depth=8"]) == 2
  assert capsys.readouterr().err.startswith("error: --config.model.depth: model.depth is a key of resnet-lcnn, resnet, "
                                            "not of tiny-lcnn. The config's model tiny-lcnn takes")


def test_a_dictionary_size_of_another_model_is_rejected_when_the_model_is_built():
  c = model_config("alexnet-lcnn")
  c.dictionary.stage1 = 6
  with pytest.raises(ValueError, match=r"model.dictionary.stage1 is a dictionary size of resnet-lcnn, not of "
                                       r"alexnet-lcnn.*alexnet-lcnn takes model.dictionary.\{first, convs, fc, "
                                       r"classifier\}"):
    models.create_model(c, num_classes=10, input_shape=(224, 224, 3), rngs=nnx.Rngs(0))


def test_baseline_config_maps_each_lcnn_to_its_cnn_and_keeps_the_rest():
  for lcnn, cnn, own in (("alexnet-lcnn", "alexnet", {"dropout": 0.3}), ("resnet-lcnn", "resnet", {"depth": 34}),
                         ("digits-lcnn", "digits", {"width": 16}), ("alexnet", "alexnet", {"dropout": 0.3}),
                         ("resnet", "resnet", {"depth": 34}), ("digits", "digits", {"width": 16})):
    c = model_config(lcnn, **own)
    baseline = models.baseline_config(c)
    assert baseline.name == cnn and {key: baseline[key] for key in own} == own
    assert c.name == lcnn  # the input is not changed


# ------------------------------------------------------------------------------------------ shapes at 224


@pytest.mark.parametrize("name, overrides", [
    ("alexnet", {}),
    ("alexnet-lcnn", {"dictionary": {"fc": 512, "classifier": 64}}),
    ("resnet", {"depth": 8}),
    ("resnet", {"depth": 34}),
    ("resnet-lcnn", {"depth": 18, "dictionary": {"stage1": 6, "stage2": 12, "stage3": 24, "stage4": 48}}),
])
def test_imagenet_models_give_logits_at_224(name, overrides):
  model = abstract(name, 1000, (224, 224, 3), **overrides)
  assert abstract_output(model, (2, 224, 224, 3)).shape == (2, 1000)


def test_alexnet_lcnn_forward_at_224_gives_finite_logits(rng):
  model = build("alexnet-lcnn", 1000, (224, 224, 3), dictionary={"fc": 64})
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(rng.standard_normal((1, 224, 224, 3)), jnp.float32))
  assert logits.shape == (1, 1000)
  assert np.isfinite(np.asarray(logits)).all()


# ------------------------------------------------------------------------------------- shapes on small data


@pytest.mark.parametrize("name, input_shape, overrides", [
    ("digits", (8, 8, 1), {}),
    ("digits-lcnn", (8, 8, 1), {"dictionary": {"classifier": 8}}),
    ("digits-lcnn", (32, 32, 3), {"dictionary": {"convs": (4, 6)}}),
    ("resnet", (32, 32, 3), {"depth": 8}),
    ("resnet-lcnn", (17, 23, 1), {"depth": 8, "dictionary": {"stage1": 8, "stage2": 8, "stage3": 8, "stage4": 8}}),
    ("alexnet", (63, 63, 3), {}),
    ("alexnet-lcnn", (96, 80, 3), {"dictionary": {"fc": 16}}),
])
def test_models_give_logits_on_small_inputs_with_any_class_count(name, input_shape, overrides):
  model = abstract(name, 7, input_shape, **overrides)
  assert abstract_output(model, (3, *input_shape)).shape == (3, 7)


def test_alexnet_rejects_inputs_too_small_for_its_pools():
  with pytest.raises(ValueError, match="at least 63"):
    abstract("alexnet", 10, (62, 62, 3))


def test_conv_dictionary_sizes_of_the_wrong_length_are_rejected():
  with pytest.raises(ValueError, match=r"model.dictionary.convs=\(30, 30\): alexnet-lcnn takes one size or 4"):
    abstract("alexnet-lcnn", 10, (224, 224, 3), dictionary={"convs": (30, 30)})


def test_one_conv_dictionary_size_sizes_every_conv_after_the_first():
  one = abstract("alexnet-lcnn", 10, (224, 224, 3), dictionary={"convs": 7})
  four = abstract("alexnet-lcnn", 10, (224, 224, 3), dictionary={"convs": (7, 7, 7, 7)})
  assert [getattr(m, f"conv{i}").dictionary_size for m in (one, four) for i in range(2, 6)] == [7] * 8


# ---------------------------------------------------------------------------------------- parameter counts


def test_alexnet_parameter_count():
  expected = (conv(3, 11, 11, 96) + conv(96, 5, 5, 256) + conv(256, 3, 3, 384) + conv(384, 3, 3, 384)
              + conv(384, 3, 3, 256) + conv(256, 6, 6, 4096) + conv(4096, 1, 1, 4096) + conv(4096, 1, 1, 1000)
              + 2 * (96 + 256 + 384 + 384 + 256 + 4096 + 4096))  # BN γ, β
  assert expected == 62_397_480
  assert param_count(abstract("alexnet", 1000, (224, 224, 3))) == expected


def test_alexnet_lcnn_fast_parameter_count():
  k = 30
  expected = (lookup(3, 3, 11, 11, 64) + lookup(64, k, 5, 5, 192) + lookup(192, k, 3, 3, 384)
              + lookup(384, k, 3, 3, 256) + lookup(256, k, 3, 3, 256)
              + lookup(256, 512, 6, 6, 4096) + lookup(4096, 512, 1, 1, 4096) + conv(4096, 1, 1, 1000)
              + 2 * (64 + 192 + 384 + 256 + 256 + 4096 + 4096))
  model = abstract("alexnet-lcnn", 1000, (224, 224, 3), dictionary={"first": 3, "convs": (k,) * 4, "fc": 512})
  assert param_count(model) == expected


def test_resnet18_parameter_count():
  stem = conv(3, 7, 7, 64)
  stages = (4 * conv(64, 3, 3, 64)
            + conv(64, 3, 3, 128) + 3 * conv(128, 3, 3, 128) + conv(64, 1, 1, 128)
            + conv(128, 3, 3, 256) + 3 * conv(256, 3, 3, 256) + conv(128, 1, 1, 256)
            + conv(256, 3, 3, 512) + 3 * conv(512, 3, 3, 512) + conv(256, 1, 1, 512))
  fc = 512 * 1000 + 1000
  bn = 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)  # stem, convs and projections
  # torchvision's 11,689,512 plus the 4,800 conv biases the Torch original keeps.
  assert stem + stages + fc + bn == 11_689_512 + 4_800
  assert param_count(abstract("resnet", 1000, (224, 224, 3), depth=18)) == stem + stages + fc + bn


def test_digits_parameter_counts():
  w = 32
  dense = conv(1, 3, 3, w) + conv(w, 3, 3, 2 * w) + conv(2 * w, 3, 3, 4 * w) + 4 * w * 10 + 10 + 2 * 7 * w
  assert param_count(abstract("digits", 10, (8, 8, 1), width=w)) == dense
  lcnn = (lookup(1, 3, 3, 3, w) + lookup(w, 8, 3, 3, 2 * w) + lookup(2 * w, 12, 3, 3, 4 * w)
          + lookup(4 * w, 16, 1, 1, 10) + 2 * 7 * w)
  model = abstract("digits-lcnn", 10, (8, 8, 1), width=w,
                   dictionary={"first": 3, "convs": (8, 12), "classifier": 16})
  assert param_count(model) == lcnn


# ------------------------------------------------------------------------------------- the original's rules


def test_resnet_lcnn_keeps_a_conv_dense_when_its_dictionary_is_not_smaller():
  # Stage 1 convs code 64·3·3 = 576 vectors, stage 2 ones 1152: 576 atoms is dense there, not in stage 2.
  types = layer_types(abstract("resnet-lcnn", 10, (64, 64, 3), depth=8, dictionary=dict(
      first=64 * 49, stage1=576, stage2=576, stage3=30, stage4=30)))
  assert types["conv1"] is nnx.Conv  # first ≥ 64·7·7
  assert types["layer1/0/conv1"] is nnx.Conv and types["layer1/0/conv2"] is nnx.Conv
  assert types["layer2/0/conv1"] is LookupConv and types["layer2/0/conv2"] is LookupConv
  types = layer_types(abstract("resnet-lcnn", 10, (64, 64, 3), depth=8, dictionary=dict(
      first=64 * 49 - 1, stage1=575, stage2=0, stage3=30, stage4=30)))
  assert types["conv1"] is LookupConv
  assert types["layer1/0/conv1"] is LookupConv
  assert types["layer2/0/conv1"] is nnx.Conv  # 0 = dense


def test_resnet_lcnn_keeps_projection_shortcuts_and_fc_dense():
  types = layer_types(abstract("resnet-lcnn", 10, (64, 64, 3), depth=18,
                               dictionary=dict(stage1=8, stage2=8, stage3=8, stage4=8)))
  shortcuts = {path: t for path, t in types.items() if "shortcut" in path}
  assert sorted(shortcuts) == ["layer2/0/shortcut_conv", "layer3/0/shortcut_conv", "layer4/0/shortcut_conv"]
  assert set(shortcuts.values()) == {nnx.Conv}
  assert types["fc"] is nnx.Linear
  lookups = [path for path, t in types.items() if t is LookupConv]
  assert len(lookups) == 1 + 16  # the stem and every 3×3 conv


def test_alexnet_lcnn_dense_fc_when_their_dictionary_sizes_are_zero():
  types = layer_types(abstract("alexnet-lcnn", 10, (224, 224, 3), dictionary={"fc": 0, "classifier": 0}))
  assert [types[f"conv{i}"] for i in range(1, 6)] == [LookupConv] * 5
  assert (types["fc6"], types["fc7"], types["fc8"]) == (nnx.Conv,) * 3
  types = layer_types(abstract("alexnet-lcnn", 10, (224, 224, 3), dictionary={"fc": 64, "classifier": 32}))
  assert (types["fc6"], types["fc7"], types["fc8"]) == (LookupConv,) * 3
  model = abstract("alexnet-lcnn", 10, (224, 224, 3), dictionary={"fc": 64})
  assert model.fc6.kernel_size == (6, 6) and model.fc6.dictionary_size == 64
  assert model.bn1.epsilon == 1e-3


def test_resnet_lcnn_equals_resnet_with_the_reconstructed_kernels(rng):
  """The twins are wired alike: the CNN with each lookup layer's D·P (and every other weight) copied in gives
  the LCNN's logits. The CNN is built abstract and filled from the LCNN, which keeps the test fast."""
  lcnn = build("resnet-lcnn", 5, (20, 20, 3), depth=8,
               dictionary=dict(first=3, stage1=8, stage2=8, stage3=8, stage4=8))
  cnn = abstract("resnet", 5, (20, 20, 3), depth=8)
  lcnn_layers = dict(nnx.iter_modules(lcnn))
  for path, module in nnx.iter_modules(cnn):
    twin = lcnn_layers[path]
    if isinstance(twin, LookupConv):
      module.kernel.set_value(twin.dense_kernel())
      module.bias.set_value(twin.bias[...])
    elif isinstance(module, (nnx.Conv, nnx.Linear)):
      module.kernel.set_value(twin.kernel[...])
      module.bias.set_value(twin.bias[...])
    elif isinstance(module, nnx.BatchNorm):
      for name in ("scale", "bias", "mean", "var"):
        getattr(module, name).set_value(getattr(twin, name)[...])
  lcnn.eval()
  cnn.eval()
  x = jnp.asarray(rng.standard_normal((2, 20, 20, 3)), jnp.float32)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(forward(cnn, x), forward(lcnn, x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- initialisation


def test_dense_layers_are_he_normal_with_zero_bias_and_bn_is_torch_default():
  model = build("digits", 10, (8, 8, 1))
  kernel = np.asarray(model.conv3.kernel[...])  # (3, 3, 64, 128)
  assert abs(kernel.std() / math.sqrt(2 / (3 * 3 * 64)) - 1) < 0.02
  assert abs(kernel.mean()) < 0.01 * kernel.std()
  assert not np.asarray(model.conv3.bias[...]).any()
  assert model.conv3.padding == ((1, 1), (1, 1))
  scale = np.asarray(model.bn3.scale[...])
  assert scale.min() >= 0 and scale.max() < 1 and 0.4 < scale.mean() < 0.6  # U(0, 1)
  assert not np.asarray(model.bn3.bias[...]).any()
  assert model.bn3.momentum == 0.9


# ------------------------------------------------------------------------------------------ train / eval


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout_and_batch_statistics(rng):
  model = build("digits-lcnn", 10, (8, 8, 1), dropout=0.5)
  x = jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32)
  model.eval()
  mean_before = np.asarray(model.bn1.mean[...])
  np.testing.assert_array_equal(model(x), model(x))
  np.testing.assert_array_equal(model.bn1.mean[...], mean_before)  # running statistics untouched
  model.train()
  first, second = model(x), model(x)
  assert not np.allclose(first, second)  # fresh dropout masks from the model's dropout stream
  assert not np.allclose(model.bn1.mean[...], mean_before)  # running statistics updated


def test_dropout_draws_from_the_dropout_stream():
  def outputs(dropout_seed):
    model = models.create_model(model_config("digits-lcnn"), num_classes=10, input_shape=(8, 8, 1),
                                rngs=nnx.Rngs(params=0, dropout=dropout_seed))
    model.train()
    return np.asarray(model(jnp.ones((4, 8, 8, 1))))
  np.testing.assert_array_equal(outputs(1), outputs(1))
  assert not np.allclose(outputs(1), outputs(2))


def test_alexnet_spatial_dropout_drops_whole_channels_and_lcnn_single_elements():
  cnn = abstract("alexnet", 10, (224, 224, 3))
  lcnn = abstract("alexnet-lcnn", 10, (224, 224, 3))
  assert tuple(cnn.dropout6.broadcast_dims) == (1, 2) and tuple(cnn.dropout7.broadcast_dims) == (1, 2)
  assert tuple(lcnn.dropout6.broadcast_dims) == ()
  dropout = nnx.Dropout(0.5, broadcast_dims=tuple(cnn.dropout6.broadcast_dims), rngs=nnx.Rngs(dropout=0))
  y = np.asarray(dropout(jnp.ones((4, 6, 6, 32))))  # NHWC
  kept = y[:, :1, :1, :] != 0  # (4, 1, 1, 32)
  np.testing.assert_array_equal(y != 0, np.broadcast_to(kept, y.shape))
  assert 0 < kept.mean() < 1


def test_cnn_spatial_dropout_keeps_values_unscaled_in_training_and_scales_by_one_minus_p_at_evaluation(rng):
  # Torch's nn.SpatialDropout: y = x · mask (whole channels) in training, y = (1 − p) · x at evaluation.
  from lcnn_jax.models.alexnet import SpatialDropout
  cnn = abstract("alexnet", 10, (224, 224, 3))
  assert isinstance(cnn.dropout6, SpatialDropout) and isinstance(cnn.dropout7, SpatialDropout)
  assert type(abstract("alexnet-lcnn", 10, (224, 224, 3)).dropout6) is nnx.Dropout  # Torch's Dropout rescales
  dropout = SpatialDropout(0.3, rngs=nnx.Rngs(dropout=0))
  x = jnp.asarray(rng.normal(size=(8, 5, 5, 64)), jnp.float32)
  y = np.asarray(dropout(x))
  kept = np.broadcast_to(y[:, :1, :1, :] != 0, y.shape)
  np.testing.assert_array_equal(y, np.where(kept, np.asarray(x), 0))  # kept values are not rescaled
  assert 0.5 < kept.mean() < 0.9
  np.testing.assert_allclose(np.asarray(nnx.view(dropout, deterministic=True)(x)), 0.7 * np.asarray(x),
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------------ configs


# Every preset's model and baseline as built before the dictionary sizes were nested per model (model.dictionary):
# parameter paths, types and shapes, recorded from the flat-key presets of 2026-11-29 (the two Fashion-MNIST run presets
# re-recorded when their classifier came to read every pixel of conv3, model.head = "flatten").
PRESET_SHAPES = os.path.join(os.path.dirname(__file__), "preset_parameter_shapes.json")
PRESET_INPUTS = {"folder": ((224, 224, 3), 1000), "digits": ((8, 8, 1), 10), "fashion_mnist": ((28, 28, 1), 10)}


def parameter_shapes(model):
  return {"/".join(map(str, path)): f"{type(v).__name__}{tuple(v.shape)}"
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


with open(PRESET_SHAPES) as f:
  RECORDED_SHAPES = json.load(f)


@pytest.mark.parametrize("preset", sorted({key.split(":")[0] for key in RECORDED_SHAPES}))
def test_every_preset_builds_the_same_model_and_baseline_as_with_the_flat_keys(preset):
  config = config_lib.load(preset)
  input_shape, num_classes = PRESET_INPUTS[config.data.name]
  for role, model_cfg in (("model", config.model), ("baseline", models.baseline_config(config.model))):
    model = nnx.eval_shape(lambda c=model_cfg: models.create_model(c, num_classes=num_classes,
                                                                     input_shape=input_shape, rngs=nnx.Rngs(0)))
    assert {"model": model_cfg.name, "params": parameter_shapes(model)} == RECORDED_SHAPES[f"{preset}:{role}"], role


RUN_PRESETS = [name for name in config_lib.presets() if "/" not in name]  # the experiments' are theirs
PAPER_ROWS = ("alexnet", "alexnet:fast", "alexnet:accurate", "resnet18", "resnet18:fast", "resnet18:accurate")


def test_every_paper_row_has_a_config():
  assert set(PAPER_ROWS) <= set(RUN_PRESETS)


@pytest.mark.parametrize("preset", RUN_PRESETS)
def test_config_loads_validates_and_builds_its_model_and_baseline(preset):
  config = config_lib.load(preset)
  config_lib.validate(config)
  imagenet = config.data.name == "folder"
  size = config.data.image_size or (224 if imagenet else 8)
  input_shape = (size, size, 3 if imagenet else 1)
  num_classes = 1000 if imagenet else 10
  for model_cfg in (config.model, models.baseline_config(config.model)):
    model = nnx.eval_shape(lambda c=model_cfg: models.create_model(c, num_classes=num_classes,
                                                                     input_shape=input_shape, rngs=nnx.Rngs(0)))
    assert abstract_output(model, (2, *input_shape)).shape == (2, num_classes)


@pytest.mark.parametrize("name, target", [
    ("alexnet:fast", 37.6), ("alexnet:accurate", 3.2), ("resnet18:fast", 29.2), ("resnet18:accurate", 5.0),
])
def test_paper_configs_target_their_rows_speedup_with_the_original_rule(name, target):
  config = config_lib.load(name)
  assert (config.sparsity.target_speedup, config.sparsity.rule) == (target, "threshold")
  family, _, variant = name.partition(":")
  assert config.sparsity.strength > 0 and f"{target}×" in config_lib.variants(family)[variant]


@pytest.mark.parametrize("name, model, pools, strength", [
    ("alexnet:fast", "alexnet-lcnn", (3, 30, 30, 30, 30, 512, 512, 0), 1.0),
    ("alexnet:accurate", "alexnet-lcnn", (3, 500, 500, 500, 30, 1024, 1024, 0), 0.3),
])
def test_alexnet_configs_follow_the_tf_ports_published_settings(name, model, pools, strength):
  config = config_lib.load(name)
  built = nnx.eval_shape(lambda: models.create_model(config.model, num_classes=1000, input_shape=(224, 224, 3),
                                                     rngs=nnx.Rngs(0)))
  sizes = tuple(getattr(getattr(built, layer), "dictionary_size", 0)
                for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"))
  assert (config.model.name, sizes, config.sparsity.strength) == (model, pools, strength)
  assert (config.train.batch_size, config.train.lr_schedule, config.train.epochs) == (128, "alexnet", 55)
