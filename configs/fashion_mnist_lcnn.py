"""``--config configs/fashion_mnist_lcnn.py``, as before the presets moved into the package: the preset
``fashion_mnist:lcnn`` (``lcnn_jax/configs/fashion_mnist.py``, where its recipe and documentation are), the same as
``--config fashion_mnist:lcnn``.
"""

from lcnn_jax import config as config_lib


def get_config():
  """The preset ``fashion_mnist:lcnn``."""
  return config_lib.load("fashion_mnist:lcnn")
