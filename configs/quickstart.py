"""``--config configs/quickstart.py``, as before the presets moved into the package: the preset ``quickstart``
(``lcnn_jax/configs/quickstart.py``, where its recipe and documentation are), the same as ``--config quickstart``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``quickstart``, or its ``variant`` (``configs/quickstart.py:VARIANT``)."""
  return config_lib.load(":".join(("quickstart", *variant)))
