"""The one lookup representation and the one multiplication formula (lcnn_jax.lookups)."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import flops, inference, layers
from lcnn_jax import lookups as lookups_lib
from lcnn_jax.lookups import Lookups


def _sparse(rng, shape, density):
  return (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (1, 1, 7, 3), (5, 5, 60, 2)])
def test_lookups_round_trip_coefficients_grouped_per_output(shape, rng):
  p = _sparse(rng, shape, 0.3)
  lookups = Lookups.from_coefficients(p)
  np.testing.assert_array_equal(lookups.coefficients(), p)
  assert lookups.shape == shape and lookups.nnz == np.count_nonzero(p)
  assert lookups.density == pytest.approx(np.count_nonzero(p) / p.size)
  np.testing.assert_array_equal(lookups.counts(), np.count_nonzero(p.reshape(-1, shape[-1]), axis=0))
  for o in range(shape[-1]):  # within an output, positions ascend
    assert np.all(np.diff(lookups.indices[lookups.starts[o]:lookups.starts[o + 1]].astype(np.int64)) > 0)
  r, c, j = lookups.taps_and_atoms()
  np.testing.assert_array_equal(p[r, c, j, lookups.output_of_each_nonzero()], lookups.values)


def test_a_dense_layers_coefficients_are_the_one_by_one_case(rng):
  p = _sparse(rng, (6, 4), 0.5)
  lookups = Lookups.from_coefficients(p)
  assert lookups.shape == (1, 1, 6, 4)
  np.testing.assert_array_equal(lookups.coefficients()[0, 0], p)
  with pytest.raises(ValueError, match=r"expected \(kh, kw, k, n\) or \(k, n\)"):
    Lookups.from_coefficients(np.zeros((2, 3, 4)))


def test_indices_are_as_narrow_as_the_positions_allow():
  assert Lookups.from_coefficients(np.ones((2, 2, 64, 1))).indices.dtype == np.uint8  # 256 positions
  assert Lookups.from_coefficients(np.ones((1, 1, 257, 1))).indices.dtype == np.uint16
  assert lookups_lib.narrowest_index_dtype((1 << 16) + 1) == np.int32


def test_slots_pad_each_output_to_the_longest_with_zeros(rng):
  p = _sparse(rng, (2, 3, 4, 6), 0.4)
  p[..., 2] = 0  # an output without non-zeros
  lookups = Lookups.from_coefficients(p)
  positions, values = lookups.slots()
  assert positions.shape == values.shape == (lookups.counts().max(), 6)
  # Σ values · P-position one-hot rebuilds each output's column of P.
  rebuilt = np.zeros((2 * 3 * 4, 6), np.float32)
  np.add.at(rebuilt, (positions, np.broadcast_to(np.arange(6), positions.shape)), values)
  np.testing.assert_array_equal(rebuilt.reshape(p.shape), p)
  assert not values[:, 2].any()


def test_multiplications_are_the_dictionary_stage_plus_one_per_nonzero_per_output_position():
  cost = lookups_lib.multiplications(nonzeros=37, dictionary_size=4, in_features=5, padded_size=(12, 10),
                                     output_size=(5, 4))
  assert cost.dictionary == 12 * 10 * 4 * 5 and cost.per_nonzero == 5 * 4
  assert cost.total == cost.dictionary + 20 * 37
  flat = lookups_lib.multiplications(nonzeros=9, dictionary_size=4, in_features=5, padded_size=(), output_size=())
  assert flat == (4 * 5, 1, 4 * 5 + 9)


def test_the_module_needs_numpy_alone():
  code = ("import sys, lcnn_jax.lookups; heavy = {'jax', 'flax', 'optax'} & {m.split('.')[0] for m in sys.modules}; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True)


class _Net(nnx.Module):
  """A strided, padded lookup convolution and lookup dense layers on (h, w, features) and on flat features."""

  def __init__(self, rngs):
    self.conv = layers.LookupConv(3, 6, 5, dictionary_size=4, strides=2, padding=2, rngs=rngs)
    self.pointwise = layers.LookupDense(6, 7, dictionary_size=3, rngs=rngs)
    self.fc = layers.LookupDense(7 * 5 * 6, 4, dictionary_size=5, rngs=rngs)

  def __call__(self, x):
    y = self.pointwise(nnx.relu(self.conv(x)))  # (batch, 5, 6, 7)
    return self.fc(y.reshape(y.shape[0], -1))


def test_the_counter_and_the_exported_layers_count_with_the_same_formula(rng):
  model = _Net(nnx.Rngs(0))
  for module in (model.conv, model.pointwise, model.fc):
    p = np.asarray(module.coefficients[...])
    module.coefficients[...] = jnp.asarray(p * (rng.random(p.shape) < 0.4))
  rows = {row.path: row for row in flops.count_multiplications(model, (9, 11, 3)).rows}
  exported = inference.inference_model(model, (9, 11, 3), backends="gather")
  assert set(rows) == set(exported.lookup_layers) == {"conv", "pointwise", "fc"}
  for name, layer in exported.lookup_layers.items():
    cost = layer.multiplications()
    assert (rows[name].multiplications, rows[name].dictionary_multiplications, rows[name].cost_per_nonzero) == (
        cost.total, cost.dictionary, cost.per_nonzero), name
    assert rows[name].density == pytest.approx(layer.density)
