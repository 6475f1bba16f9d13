"""``--config configs/resnet18_accurate.py``, as before the presets moved into the package: the preset
``resnet18:accurate`` (``lcnn_jax/configs/resnet18.py``, where its recipe and documentation are), the same as
``--config resnet18:accurate``.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The preset ``resnet18:accurate``."""
  return config_lib.load("resnet18:accurate")
