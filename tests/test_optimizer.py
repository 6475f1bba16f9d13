"""The optimiser: the original's learning-rate and weight-decay tables by epoch, and Torch's SGD."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import config as config_lib, models, optimizer


def test_original_schedules_by_epoch():
  c = config_lib.default_config().train
  c.lr_schedule, c.learning_rate = "alexnet", 2.0  # -LR multiplies the table
  lr, wd = optimizer.schedules(c, steps_per_epoch=10, total_steps=600)
  for epoch, expected in ((1, 1e-2), (18, 1e-2), (19, 5e-3), (29, 5e-3), (30, 1e-3), (44, 5e-4), (53, 1e-4),
                          (55, 1e-4)):
    assert float(lr((epoch - 1) * 10)) == pytest.approx(2 * expected)
    assert float(lr((epoch - 1) * 10 + 9)) == pytest.approx(2 * expected)
    assert float(wd((epoch - 1) * 10)) == 0.0
  c.lr_schedule, c.learning_rate = "resnet", 1.0
  lr, wd = optimizer.schedules(c, steps_per_epoch=10, total_steps=600)
  for epoch, expected_lr, expected_wd in ((1, 0.1, 5e-4), (7, 0.1, 5e-4), (8, 0.03, 5e-4), (16, 0.03, 5e-4),
                                          (17, 0.01, 0), (26, 3e-3, 0), (31, 1e-3, 0), (50, 1e-3, 0)):
    assert float(lr((epoch - 1) * 10)) == pytest.approx(expected_lr)
    assert float(wd((epoch - 1) * 10)) == pytest.approx(expected_wd)
  c.lr_schedule, c.warmup_steps, c.learning_rate = "cosine", 10, 0.5
  lr, _ = optimizer.schedules(c, steps_per_epoch=10, total_steps=100)
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(0.5) and float(lr(100)) == pytest.approx(0.0)


def test_torch_sgd_semantics_with_weight_decay(tiny_config):
  c = tiny_config()
  c.train.weight_decay, c.train.momentum, c.sparsity.strength = 0.1, 0.9, 0.0
  model = models.create_model(c.model, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  tx, _, _ = optimizer.make_optimizer(c, model, steps_per_epoch=4, total_steps=8)
  params = {"w": jnp.asarray([1.0, -2.0])}
  state = tx.init(params)
  grads = {"w": jnp.asarray([0.5, 0.5])}
  # g = 0.5 + 0.1·w = [0.6, 0.3]; buf = g; w -= 0.05·buf -> [0.97, -2.015].
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], [0.97, -2.015], rtol=1e-6)
  # g = 0.5 + 0.1·w = [0.597, 0.2985]; buf = 0.9·[0.6, 0.3] + g = [1.137, 0.5685]; w -= 0.05·buf.
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], [0.97 - 0.05 * 1.137, -2.015 - 0.05 * 0.5685], rtol=1e-6)
