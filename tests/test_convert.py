"""Specification of lcnn_jax.convert: any CNN -> LCNN, init from dense weights, dictionary transfer and freezing."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import config as config_lib
from lcnn_jax import convert, models
from lcnn_jax.layers import LookupConv, LookupDense


class UserCNN(nnx.Module):
  """A CNN written with no LCNN in mind: a Sequential in a List, SAME/explicit/VALID padding, a strided conv
  without bias, a non-square kernel, BatchNorm and a Linear head."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
    self.blocks = nnx.List([
        nnx.Sequential(nnx.Conv(8, 12, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs),
                       nnx.relu),
        nnx.Sequential(nnx.Conv(12, 16, (5, 3), padding="VALID", rngs=rngs), nnx.relu),
    ])
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=(1, 2)))


PATHS = ("stem", "blocks/0/layers/0", "blocks/1/layers/0", "head")
IN_FEATURES = {"stem": 3, "blocks/0/layers/0": 8, "blocks/1/layers/0": 12, "head": 16}


def layers_by_path(model):
  return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model)
          if isinstance(m, (nnx.Conv, nnx.Linear, LookupConv, LookupDense))}


def random_input(rng, shape=(2, 13, 11, 3)):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def assert_outputs_close(a, b, x, rtol):
  a.eval()
  b.eval()
  ya, yb = np.asarray(a(x)), np.asarray(b(x))
  np.testing.assert_allclose(yb, ya, rtol=0, atol=rtol * np.abs(ya).max())


# ----------------------------------------------------------------------------------------------- to_lcnn


def test_to_lcnn_converts_a_user_defined_cnn_layer_by_layer(rng):
  cnn = UserCNN(nnx.Rngs(0))
  seen = {}

  def policy(path, kernel_shape):
    seen[path] = kernel_shape
    return IN_FEATURES[path]

  lcnn = convert.to_lcnn(cnn, policy, rngs=nnx.Rngs(1))
  assert seen == {"stem": (3, 3, 3, 8), "blocks/0/layers/0": (3, 3, 8, 12), "blocks/1/layers/0": (5, 3, 12, 16),
                  "head": (16, 5)}
  converted = layers_by_path(lcnn)
  stem, down, valid, head = (converted[p] for p in PATHS)
  assert (type(stem), stem.padding, stem.strides, stem.dictionary_size, stem.use_bias) == (
      LookupConv, (1, 1), (1, 1), 3, True)
  assert (type(down), down.padding, down.strides, down.dictionary_size, down.use_bias) == (
      LookupConv, (1, 1), (2, 2), 8, False)
  assert (type(valid), valid.kernel_size, valid.padding, valid.dictionary_size) == (LookupConv, (5, 3), (0, 0), 12)
  assert (type(head), head.in_features, head.out_features, head.dictionary_size) == (LookupDense, 16, 5, 16)
  x = random_input(rng)
  assert lcnn(x).shape == cnn(x).shape == (2, 5)
  # The input model is left as it was.
  assert all(type(m) in (nnx.Conv, nnx.Linear) for m in layers_by_path(cnn).values())


def test_policy_mapping_first_match_wins_and_unmatched_layers_stay_dense():
  policy = {r"blocks/0/.*": 8, r"blocks/.*": None, r"stem": 3}
  lcnn = convert.to_lcnn(UserCNN(nnx.Rngs(0)), policy, rngs=nnx.Rngs(1))
  types = {path: type(m) for path, m in layers_by_path(lcnn).items()}
  assert types == {"stem": LookupConv, "blocks/0/layers/0": LookupConv, "blocks/1/layers/0": nnx.Conv,
                   "head": nnx.Linear}
  assert layers_by_path(lcnn)["blocks/0/layers/0"].dictionary_size == 8
  assert convert.dictionary_size(policy, "stem/extra", (1, 1)) == 0  # patterns match the whole path


def test_to_lcnn_rejects_negative_sizes_and_models_without_layers():
  with pytest.raises(ValueError, match="'head'"):
    convert.to_lcnn(UserCNN(nnx.Rngs(0)), {"head": -1}, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="no nnx.Conv or nnx.Linear"):
    convert.to_lcnn(nnx.BatchNorm(3, rngs=nnx.Rngs(0)), {".*": 3}, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("layer_kwargs, reason", [
    ({"feature_group_count": 2}, "feature_group_count"),
    ({"kernel_dilation": 2}, "kernel_dilation"),
    ({"strides": 2, "padding": "SAME"}, "padding='SAME'"),
    ({"padding": ((0, 1), (1, 1))}, "symmetric zero padding"),
    ({"padding": "CIRCULAR"}, "padding='CIRCULAR'"),
])
def test_unsupported_convolutions_name_their_path_and_can_stay_dense(layer_kwargs, reason):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.odd = nnx.Conv(4, 6, (3, 3), **layer_kwargs, rngs=rngs)
      self.plain = nnx.Conv(6, 6, (3, 3), rngs=rngs)

  with pytest.raises(ValueError, match=f"'odd'.*{reason}|{reason}.*'odd'"):
    convert.to_lcnn(Net(nnx.Rngs(0)), {".*": 3}, rngs=nnx.Rngs(1))
  lcnn = convert.to_lcnn(Net(nnx.Rngs(0)), {"odd": 0, ".*": 3}, rngs=nnx.Rngs(1))
  assert type(lcnn.odd) is nnx.Conv and type(lcnn.plain) is LookupConv


def test_a_policy_with_the_original_rule_turns_resnet_into_resnet_lcnn():
  """Our ResNet-LCNN is what to_lcnn makes of our ResNet under ResNet-LCNN's rules."""
  pools = {"conv1": 3, "layer1": 8, "layer2": 1152, "layer3": 16, "layer4": 32}

  def resnet_lcnn_rule(path, kernel_shape):
    if "shortcut" in path or path == "fc":
      return 0
    size = pools[path.split("/")[0]]
    kh, kw, _, out = kernel_shape
    return 0 if size >= out * kh * kw else size

  config = config_lib.default_config("resnet").model
  config.depth = 8
  converted = nnx.eval_shape(lambda: convert.to_lcnn(
      models.create_model(config, num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)),
      resnet_lcnn_rule, rngs=nnx.Rngs(1)))
  config.name = "resnet-lcnn"
  config.dictionary.update(first=3, stage1=8, stage2=1152, stage3=16, stage4=32)
  built = nnx.eval_shape(lambda: models.create_model(config, num_classes=10, input_shape=(32, 32, 3),
                                                     rngs=nnx.Rngs(0)))

  def signature(model):
    return {path: (type(m), getattr(m, "dictionary_size", None)) for path, m in layers_by_path(model).items()}

  assert signature(converted) == signature(built)
  assert signature(built)["layer2/0/conv1"] == (nnx.Conv, None)  # 1152 = 128·3·3 atoms: dense


# ------------------------------------------------------------------------------------- init from dense weights


@pytest.mark.parametrize("extra_atoms", [0, 3])
def test_full_dictionary_initialised_from_dense_reproduces_the_cnn(extra_atoms, rng):
  """With k ≥ m atoms the factorisation is exact: the LCNN computes the CNN's function."""
  cnn = UserCNN(nnx.Rngs(0))
  # Give BatchNorm non-trivial statistics so the comparison covers the whole network.
  cnn.norm.mean.set_value(jnp.asarray(rng.standard_normal(16), jnp.float32))
  cnn.norm.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32))
  # k = m everywhere, and k = m + extra_atoms in one convolution (atoms past the rank start unused).
  policy = lambda path, shape: IN_FEATURES[path] + (extra_atoms if path == "blocks/1/layers/0" else 0)  # noqa: E731
  x = random_input(rng)
  exact = convert.to_lcnn(cnn, policy, init_from_dense=True, initial_sparsity=0.0, rngs=nnx.Rngs(1))
  assert_outputs_close(cnn, exact, x, rtol=1e-5)
  # With the default threshold, coefficients ≤ τ are dropped: the LCNN starts near, not at, the CNN.
  near = convert.to_lcnn(cnn, policy, init_from_dense=True, rngs=nnx.Rngs(1))
  assert_outputs_close(cnn, near, x, rtol=1e-2)


def test_random_init_does_not_reproduce_the_cnn(rng):
  cnn = UserCNN(nnx.Rngs(0))
  lcnn = convert.to_lcnn(cnn, lambda path, shape: IN_FEATURES[path], rngs=nnx.Rngs(1))
  x = random_input(rng)
  cnn.eval()
  lcnn.eval()
  assert not np.allclose(cnn(x), lcnn(x), atol=1e-2)


@pytest.mark.parametrize("kernel_shape, k", [((3, 3, 16, 10), 5), ((5, 1, 7, 4), 7), ((24, 9), 6)])
def test_truncated_factorisation_is_the_best_rank_k_approximation(kernel_shape, k, rng):
  kernel = rng.standard_normal(kernel_shape).astype(np.float32)
  m = kernel_shape[-2]
  initial = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  atoms, coefficients = convert.factorise_kernel(jnp.asarray(kernel), initial)
  atoms, coefficients = np.asarray(atoms, np.float64), np.asarray(coefficients, np.float64)
  assert atoms.shape == (m, k) and coefficients.shape == (*kernel_shape[:-2], k, kernel_shape[-1])
  np.testing.assert_allclose(atoms.T @ atoms, np.eye(k), atol=1e-5)  # orthonormal atoms
  reconstructed = np.einsum("mk,...ko->...mo", atoms, coefficients)
  # Eckart–Young: the error is the energy of the discarded singular values of the (m, taps·n) matrix.
  vectors = np.moveaxis(kernel.astype(np.float64), -2, 0).reshape(m, -1)
  singular_values = np.linalg.svd(vectors, compute_uv=False)
  np.testing.assert_allclose(np.sum((reconstructed - kernel) ** 2), np.sum(singular_values[k:] ** 2),
                             rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------------- dictionary transfer


class Stack(nnx.Module):
  """`depth` identical 3×3 lookup convolutions: a shallow and a deep net that can share dictionaries."""

  def __init__(self, depth: int, rngs: nnx.Rngs):
    self.layers = nnx.List([LookupConv(8, 8, 3, dictionary_size=4, padding=1, rngs=rngs) for _ in range(depth)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x.mean(axis=(1, 2)))


def dictionaries(model):
  return {path: np.asarray(layer.dictionary[...]) for path, layer in layers_by_path(model).items()
          if isinstance(layer, (LookupConv, LookupDense))}


def coefficients(model):
  return {path: np.asarray(layer.coefficients[...]) for path, layer in layers_by_path(model).items()
          if isinstance(layer, (LookupConv, LookupDense))}


def test_transfer_copies_dictionaries_at_shared_paths_and_nothing_else():
  source, target = Stack(2, nnx.Rngs(0)), Stack(3, nnx.Rngs(1))
  before = dictionaries(target)
  coefficients_before = coefficients(target)
  assert convert.transfer_dictionaries(source, target) == ["layers/0", "layers/1"]
  after = dictionaries(target)
  for path in ("layers/0", "layers/1"):
    np.testing.assert_array_equal(after[path], dictionaries(source)[path])
  np.testing.assert_array_equal(after["layers/2"], before["layers/2"])
  for path, value in coefficients(target).items():
    np.testing.assert_array_equal(value, coefficients_before[path])


def test_transfer_maps_a_shallow_nets_dictionaries_onto_a_deeper_net():
  shallow, deep = Stack(2, nnx.Rngs(0)), Stack(4, nnx.Rngs(1))
  mapping = {"layers/0": "layers/0", "layers/1": "layers/0", "layers/2": "layers/1", "layers/3": "layers/1"}
  assert convert.transfer_dictionaries(shallow, deep, mapping) == list(mapping)
  for target_path, source_path in mapping.items():
    np.testing.assert_array_equal(dictionaries(deep)[target_path], dictionaries(shallow)[source_path])


def test_transfer_errors_name_the_path():
  shallow, deep = Stack(1, nnx.Rngs(0)), Stack(2, nnx.Rngs(1))
  with pytest.raises(ValueError, match="'layers/1' in the source"):
    convert.transfer_dictionaries(shallow, deep, ["layers/1"])
  with pytest.raises(ValueError, match="'layers/5' in the target"):
    convert.transfer_dictionaries(shallow, deep, {"layers/5": "layers/0"})
  other = LookupConv(8, 8, 3, dictionary_size=5, rngs=nnx.Rngs(2))
  with pytest.raises(ValueError, match=r"\(8, 5\)"):
    convert.transfer_dictionaries(other, deep, {"layers/0": ""})
  with pytest.raises(ValueError, match="share no lookup layer"):
    convert.transfer_dictionaries(other, deep)


def test_frozen_dictionaries_stay_put_while_coefficients_train(rng):
  """The few-iteration setting: transferred D is frozen, P (and biases, BN) train."""
  config = config_lib.default_config().model
  config.update(name="digits-lcnn", width=8)
  config.dictionary.update(convs=8, classifier=6)
  build = lambda seed: models.create_model(config, num_classes=10, input_shape=(8, 8, 1),  # noqa: E731
                                           rngs=nnx.Rngs(seed))
  source, target = build(0), build(1)
  convert.transfer_dictionaries(source, target)
  transferred = dictionaries(target)
  coefficients_before = coefficients(target)
  bn_scale_before = np.asarray(target.bn2.scale[...])

  optimizer = nnx.Optimizer(target, optax.sgd(0.1), wrt=convert.coefficients_only)
  x = jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16))

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, convert.coefficients_only))(model)
    optimizer.update(model, grads)
    return loss

  target.train()
  losses = [float(train_step(target, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]
  for path, value in dictionaries(target).items():
    np.testing.assert_array_equal(value, transferred[path])
    np.testing.assert_array_equal(value, dictionaries(source)[path])
  for path, value in coefficients(target).items():
    assert not np.array_equal(value, coefficients_before[path]), path
  assert not np.array_equal(np.asarray(target.bn2.scale[...]), bn_scale_before)


def test_coefficients_only_selects_everything_trainable_but_dictionaries():
  model = Stack(1, nnx.Rngs(0))
  selected = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, convert.coefficients_only))}
  assert selected == {"layers/0/coefficients", "layers/0/bias", "head/kernel", "head/bias"}
  everything = nnx.state(model, nnx.Param)
  assert "dictionary" in everything["layers"][0]
