"""lcnn_jax: Lookup-based Convolutional Neural Networks (LCNN) in JAX and Flax NNX.

The layers are imported on first use (``lcnn_jax.LookupConv``), so that ``import lcnn_jax.inference`` and
``import lcnn_jax.lookups`` do not load Flax.
"""

import importlib

__all__ = ["Coefficients", "Dictionary", "LookupConv", "LookupDense", "Lookups"]
__version__ = "0.1.0"

_HOMES = {"Coefficients": "lcnn_jax.layers", "Dictionary": "lcnn_jax.layers", "LookupConv": "lcnn_jax.layers",
          "LookupDense": "lcnn_jax.layers", "Lookups": "lcnn_jax.lookups"}


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module 'lcnn_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__():
  return sorted([*globals(), *__all__])
