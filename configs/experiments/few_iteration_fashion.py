"""``--config configs/experiments/few_iteration_fashion.py``, as before the presets moved into the package: the preset
``experiments/few_iteration_fashion`` (``lcnn_jax/configs/experiments/few_iteration_fashion.py``, where its recipe
and documentation are), the same as ``--config experiments/few_iteration_fashion``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``experiments/few_iteration_fashion``, or its ``variant``
  (``configs/experiments/few_iteration_fashion.py:VARIANT``)."""
  return config_lib.load(":".join(("experiments/few_iteration_fashion", *variant)))
