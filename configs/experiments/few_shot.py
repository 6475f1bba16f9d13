"""``--config configs/experiments/few_shot.py``, as before the presets moved into the package: the preset
``experiments/few_shot`` (``lcnn_jax/configs/experiments/few_shot.py``, where its recipe and documentation are), the
same as ``--config experiments/few_shot``.
"""

from lcnn_jax import config as config_lib


def get_config(*variant: str):
  """The preset ``experiments/few_shot``, or its ``variant`` (``configs/experiments/few_shot.py:VARIANT``)."""
  return config_lib.load(":".join(("experiments/few_shot", *variant)))
