"""``--config configs/resnet18_fast.py``, as before the presets moved into the package: the preset ``resnet18:fast``
(``lcnn_jax/configs/resnet18.py``, where its recipe and documentation are), the same as ``--config resnet18:fast``.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The preset ``resnet18:fast``."""
  return config_lib.load("resnet18:fast")
