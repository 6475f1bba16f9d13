"""The original's ImageNet recipe (REFERENCE §5), which the AlexNet and ResNet-18 presets start from."""

import ml_collections

from lcnn_jax import config as config_lib


def recipe(model: str, *, batch_size: int, lr_schedule: str) -> ml_collections.ConfigDict:
  """``model`` on an ImageNet folder at 224×224 with class-balanced sampling, 55 epochs of 10,000 steps, the
  architecture's learning-rate schedule."""
  c = config_lib.default_config(model)
  c.data.name = "folder"
  c.data.image_size = 224
  c.data.balanced = True
  c.train.batch_size = batch_size
  c.train.lr_schedule = lr_schedule
  c.train.epochs = 55  # Training length in epochs of train.steps_per_epoch steps.
  c.train.steps_per_epoch = 10_000
  return c
