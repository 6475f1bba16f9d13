"""``--config configs/experiments/spectrum.py``, as before the presets moved into the package: the preset
``experiments/spectrum`` (``lcnn_jax/configs/experiments/spectrum.py``, where its recipe and documentation are), the
same as ``--config experiments/spectrum``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``experiments/spectrum``, or its ``variant`` (``configs/experiments/spectrum.py:VARIANT``)."""
  return config_lib.load(":".join(("experiments/spectrum", *variant)))
