"""``--config configs/fashion_mnist.py``, as before the presets moved into the package: the preset ``fashion_mnist``
(``lcnn_jax/configs/fashion_mnist.py``, where its recipe and documentation are), the same as ``--config
fashion_mnist``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``fashion_mnist``, or its ``variant`` (``configs/fashion_mnist.py:VARIANT``)."""
  return config_lib.load(":".join(("fashion_mnist", *variant)))
