"""``--config configs/alexnet.py``, as before the presets moved into the package: the preset ``alexnet``
(``lcnn_jax/configs/alexnet.py``, where its recipe and documentation are), the same as ``--config alexnet``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``alexnet``, or its ``variant`` (``configs/alexnet.py:VARIANT``)."""
  return config_lib.load(":".join(("alexnet", *variant)))
