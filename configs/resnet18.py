"""``--config configs/resnet18.py``, as before the presets moved into the package: the preset ``resnet18``
(``lcnn_jax/configs/resnet18.py``, where its recipe and documentation are), the same as ``--config resnet18``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``resnet18``, or its ``variant`` (``configs/resnet18.py:VARIANT``)."""
  return config_lib.load(":".join(("resnet18", *variant)))
