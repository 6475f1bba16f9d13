"""``--config configs/experiments/spectrum_fashion.py``, as before the presets moved into the package: the preset
``experiments/spectrum_fashion`` (``lcnn_jax/configs/experiments/spectrum_fashion.py``, where its recipe and
documentation are), the same as ``--config experiments/spectrum_fashion``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``experiments/spectrum_fashion``, or its ``variant``
  (``configs/experiments/spectrum_fashion.py:VARIANT``)."""
  return config_lib.load(":".join(("experiments/spectrum_fashion", *variant)))
