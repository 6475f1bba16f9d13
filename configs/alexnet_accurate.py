"""``--config configs/alexnet_accurate.py``, as before the presets moved into the package: the preset
``alexnet:accurate`` (``lcnn_jax/configs/alexnet.py``, where its recipe and documentation are), the same as
``--config alexnet:accurate``.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The preset ``alexnet:accurate``."""
  return config_lib.load("alexnet:accurate")
