"""Multiplication counts against hand-computed values (REFERENCE §6), dense baselines against XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import config as config_lib, flops, layers, models


class Wrap(nnx.Module):
  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def set_density(layer, fraction_zero):
  """Coefficients far above τ with an exact fraction of zeros."""
  p = np.full(layer.coefficients.shape, 0.5, np.float32)
  flat = p.reshape(-1)
  flat[:int(round(fraction_zero * flat.size))] = 0.0
  layer.coefficients[...] = jnp.asarray(p)


@pytest.mark.parametrize("padding,expected", [
    # 3→8, 3×3 on 8×8: output 8×8×8 = 512 elements × 27 = 13,824 with padding 1; 6×6×8 × 27 = 7,776 without.
    (1, 13_824), (0, 7_776)])
def test_conv_counts_output_elements_times_fan_in(padding, expected):
  conv = nnx.Conv(3, 8, (3, 3), padding=((padding, padding),) * 2, rngs=nnx.Rngs(0))
  count = flops.count_multiplications(Wrap(conv), (8, 8, 3))
  assert count.total == expected
  (row,) = count.rows
  assert (row.path, row.kind, row.dictionary_size, row.density) == ("layer", "conv", None, 1.0)


def test_strided_conv_count():
  # 3→96, 11×11 stride 4 pad 2 on 224²: 55×55×96 outputs × 363 = 105,415,200 (AlexNet conv1).
  conv = nnx.Conv(3, 96, (11, 11), strides=4, padding=((2, 2), (2, 2)), rngs=nnx.Rngs(0))
  assert flops.count_multiplications(Wrap(conv), (224, 224, 3)).total == 105_415_200


def test_linear_count():
  assert flops.count_multiplications(Wrap(nnx.Linear(10, 5, rngs=nnx.Rngs(0))), (10,)).total == 50


@pytest.mark.parametrize("padding,stride,expected", [
    # m=8, k=4, n=16, 3×3, half of P zero, on 8×8.
    # pad 1, stride 2: S = 4·10·10 = 400 elements × 8 = 3,200; output 4×4×16 = 256 × 36 × 0.5 = 4,608.
    (1, 2, 3_200 + 4_608),
    # pad 0, stride 1: S = 4·8·8 = 256 × 8 = 2,048; output 6×6×16 = 576 × 36 × 0.5 = 10,368.
    (0, 1, 2_048 + 10_368),
])
def test_lookup_conv_counts_dictionary_over_padded_input_plus_nonzero_lookups(padding, stride, expected):
  layer = layers.LookupConv(8, 16, 3, dictionary_size=4, strides=stride, padding=padding, rngs=nnx.Rngs(0))
  set_density(layer, 0.5)
  count = flops.count_multiplications(Wrap(layer), (8, 8, 8))
  (row,) = count.rows
  assert row.kind == "lookup_conv" and row.dictionary_size == 4 and row.density == pytest.approx(0.5)
  assert row.multiplications == expected


def test_lookup_dense_count():
  # m=10, k=3, n=5, a third of P zero: 3·10 + 5·3·(2/3) = 30 + 10.
  layer = layers.LookupDense(10, 5, dictionary_size=3, rngs=nnx.Rngs(0))
  set_density(layer, 1 / 3)
  assert flops.count_multiplications(Wrap(layer), (10,)).total == 40


class SmallCNN(nnx.Module):
  def __init__(self, rngs, lookup):
    if lookup:
      self.conv1 = layers.LookupConv(3, 16, 3, dictionary_size=3, padding=1, rngs=rngs)
      self.conv2 = layers.LookupConv(16, 32, 3, dictionary_size=8, strides=2, padding=1, rngs=rngs)
    else:
      self.conv1 = nnx.Conv(3, 16, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
      self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.fc = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.norm(self.conv2(x)))
    return self.fc(x.mean(axis=(1, 2)))


def test_cnn_and_lcnn_are_counted_alike_and_the_model_is_left_unchanged():
  cnn, lcnn = SmallCNN(nnx.Rngs(0), False), SmallCNN(nnx.Rngs(0), True)
  set_density(lcnn.conv2, 0.75)
  cnn_count = flops.count_multiplications(cnn, (8, 8, 3))
  lcnn_count = flops.count_multiplications(lcnn, (8, 8, 3))
  assert [r.path for r in cnn_count.rows] == [r.path for r in lcnn_count.rows] == ["conv1", "conv2", "fc"]
  assert cnn_count.total == 8 * 8 * 16 * 27 + 4 * 4 * 32 * 144 + 320
  dense_conv1 = lcnn.conv1.thresholded_coefficients()
  conv1 = 3 * 10 * 10 * 3 + int(round(8 * 8 * 16 * 27 * flops.density(dense_conv1)))
  assert lcnn_count.total == conv1 + (8 * 10 * 10 * 16 + 4 * 4 * 32 * 72 * 0.25) + 320
  assert lcnn_count.speedup_over(cnn_count) == pytest.approx(cnn_count.total / lcnn_count.total)
  assert "total" in lcnn_count.table()
  # Counting evaluates a view: the model's own train mode is untouched.
  assert lcnn.norm.use_running_average is False


# ------------------------------------------------------------------------------------------------ XLA cross-check


def in_bounds_taps(size, kernel, stride, pad):
  """Σ over output positions of the kernel taps that land inside the unpadded input (1-D)."""
  out = (size + 2 * pad - kernel) // stride + 1
  return sum(sum(0 <= o * stride - pad + t < size for t in range(kernel)) for o in range(out)), out


def module_at(model, path):
  for part in path.split("/"):
    model = model[int(part)] if part.isdigit() else getattr(model, part)
  return model


def xla_multiply_adds(fn, shape):
  cost = jax.jit(fn).lower(jnp.zeros((1, *shape), jnp.float32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / 2


@pytest.mark.parametrize("name,input_shape,num_classes", [
    ("digits", (8, 8, 1), 10), ("resnet", (32, 32, 3), 10)])
def test_dense_baselines_agree_with_xla_cost_analysis_up_to_the_border(name, input_shape, num_classes):
  """XLA counts a convolution's taps that fall on the zero padding as free; the paper's rule counts every tap.

  So per layer XLA's multiply-adds equal our count times the fraction of in-bounds taps (exactly), and over the
  whole network XLA counts up to 5% more (its flops of BatchNorm, ReLU, pooling and the bias additions, which
  the paper's rule leaves out; a larger share in these narrow test nets than in real ones).
  """
  config = config_lib.default_config(name).model
  config.update({key: 8 for key in ("depth", "width") if key in config})  # the keys of those models that have them
  model = models.create_model(config, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0))
  model.eval()
  count = flops.count_multiplications(model, input_shape)
  border_corrected = 0.0
  for row in count.rows:
    module = module_at(model, row.path)
    expected = row.multiplications
    if row.kind == "conv":
      strides = module.strides if isinstance(module.strides, (tuple, list)) else (module.strides,) * 2
      for axis in range(2):
        taps, out = in_bounds_taps(row.input_shape[axis], row.kernel_shape[axis], strides[axis],
                                   module.padding[axis][0])
        assert out == row.output_shape[axis]
        expected *= taps / (out * row.kernel_shape[axis])
    assert xla_multiply_adds(module, row.input_shape) == pytest.approx(expected, rel=1e-9), row.path
    border_corrected += expected
  assert border_corrected <= xla_multiply_adds(model, input_shape) <= 1.05 * border_corrected
  assert border_corrected < count.total  # the paper's rule counts the padded taps too


@pytest.mark.parametrize("name,input_shape,num_classes", [("digits-lcnn", (8, 8, 1), 10),
                                                          ("alexnet-lcnn", (224, 224, 3), 1000)])
def test_baseline_is_built_abstract_and_counts_as_a_built_cnn(name, input_shape, num_classes):
  config = config_lib.default_config(name).model
  baseline = flops.baseline_model(config, num_classes, input_shape)
  values = [variable.get_value() for _, variable in nnx.to_flat_state(nnx.state(baseline))]
  assert values and all(isinstance(value, jax.ShapeDtypeStruct) for value in values)  # no parameter allocated
  built = models.create_model(models.baseline_config(config), num_classes=num_classes, input_shape=input_shape,
                              rngs=nnx.Rngs(0))
  assert flops.baseline_count(config, num_classes, input_shape) == flops.count_multiplications(built, input_shape)
  assert flops.stored_parameters(baseline) == flops.stored_parameters(built)
  assert flops.stored_bytes(baseline, input_shape, "int8") == flops.stored_bytes(built, input_shape, "int8")
