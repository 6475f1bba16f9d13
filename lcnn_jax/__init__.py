"""lcnn_jax: Lookup-based Convolutional Neural Networks (LCNN) in JAX and Flax NNX."""

from lcnn_jax.layers import Coefficients, Dictionary, LookupConv, LookupDense, Lookups

__all__ = ["Coefficients", "Dictionary", "LookupConv", "LookupDense", "Lookups"]
__version__ = "0.1.0"
