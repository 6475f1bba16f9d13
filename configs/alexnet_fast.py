"""``--config configs/alexnet_fast.py``, as before the presets moved into the package: the preset ``alexnet:fast``
(``lcnn_jax/configs/alexnet.py``, where its recipe and documentation are), the same as ``--config alexnet:fast``.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The preset ``alexnet:fast``."""
  return config_lib.load("alexnet:fast")
