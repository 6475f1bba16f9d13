"""``--config configs/experiments/few_iteration.py``, as before the presets moved into the package: the preset
``experiments/few_iteration`` (``lcnn_jax/configs/experiments/few_iteration.py``, where its recipe and documentation
are), the same as ``--config experiments/few_iteration``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``experiments/few_iteration``, or its ``variant``
  (``configs/experiments/few_iteration.py:VARIANT``)."""
  return config_lib.load(":".join(("experiments/few_iteration", *variant)))
