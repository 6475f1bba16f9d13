"""Compact storage of an exported model: its weights in bfloat16 or int8, its indices as narrow as they fit.

:func:`quantize` converts the dictionaries, the non-zeros of P and the dense kernels of an
:class:`~lcnn_jax.inference.model.InferenceModel`; biases, BatchNorm maps left unfolded and the lookups'
``starts`` stay float32/int32 (a few values per output). ``int8`` is symmetric with one float32 scale per output
channel: per atom for a dictionary (column j of D), per output for the non-zeros of P and for a dense kernel
(its last axis), each scale the channel's largest magnitude over 127. Indices are uint8, uint16 or int32,
whichever is the narrowest that holds the layer's kh·kw·k positions
(:func:`~lcnn_jax.lookups.narrowest_index_dtype`).

The C++ lookup kernel reads the stored values and converts them in registers, accumulating in float32; so do its
dictionary stage over small maps (batch 1) and its dense-rows routine for dense layers over a few rows (batch
1's fully connected layers, bound by reading their weights). XLA's convolutions and larger matmuls, and the
XLA backends, run on float32 copies made at load.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lcnn_jax import lookups
from lcnn_jax.inference.model import InferenceModel
from lcnn_jax.inference.records import AffineLayer, Layer, LookupLayer, layer_arrays

PRECISIONS = tuple(lookups.VALUE_BYTES)
"""The storage precisions :func:`quantize` accepts: float32, bfloat16, int8."""

BFLOAT16 = np.dtype(jnp.bfloat16)


def _check(precision: str) -> None:
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}.")


def int8_per_channel(weights: np.ndarray, channels: np.ndarray | None = None,
                     num_channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 with one scale per channel: (q int8, scale float32 (channels,)), weights ≈ q · scale[channel].

  Args:
    weights: float32 weights; their channel is the last axis when ``channels`` is None.
    channels: (weights.size,) the channel of each element of a flat ``weights`` (the non-zeros of P).
    num_channels: the number of channels when ``channels`` is given.
  """
  w = np.asarray(weights, np.float32)
  if channels is None:
    largest = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0, initial=0.0)
  else:
    largest = np.zeros(num_channels, np.float32)
    np.maximum.at(largest, channels, np.abs(w))
  scale = np.where(largest > 0, largest / 127, 1.0).astype(np.float32)
  per_element = scale if channels is None else scale[channels]
  q = np.clip(np.rint(w / per_element), -127, 127).astype(np.int8)
  return q, scale


def quantize_layer(layer: Layer, precision: str) -> Layer:
  """``layer`` with its weights stored in ``precision`` (from float32 weights; see the module docstring)."""
  _check(precision)
  if isinstance(layer, AffineLayer) or precision == "float32":
    return layer
  if isinstance(layer, LookupLayer):
    dictionary, values = layer.float_dictionary(), layer.float_values()
    if precision == "bfloat16":
      return dataclasses.replace(layer, dictionary=dictionary.astype(BFLOAT16), values=values.astype(BFLOAT16),
                                 dictionary_scale=None, value_scale=None)
    d, d_scale = int8_per_channel(dictionary)
    v, v_scale = int8_per_channel(values, layer.output_of_each_nonzero(), layer.out_features)
    return dataclasses.replace(layer, dictionary=d, values=v, dictionary_scale=d_scale, value_scale=v_scale)
  kernel = layer.float_kernel()
  if precision == "bfloat16":
    return dataclasses.replace(layer, kernel=kernel.astype(BFLOAT16), kernel_scale=None)
  q, scale = int8_per_channel(kernel)
  return dataclasses.replace(layer, kernel=q, kernel_scale=scale)


def quantize(model: InferenceModel, precision: str) -> InferenceModel:
  """``model`` with every layer's weights stored in ``precision``; its backends and metadata kept."""
  _check(precision)
  layers = {name: quantize_layer(layer, precision) for name, layer in model.layers.items()}
  return InferenceModel(model.graph, layers, input_shape=model.input_shape, backends=model.backends,
                        class_names=model.class_names, preprocessing=model.preprocessing, tuning=model.tuning)


def model_bytes(model: InferenceModel) -> int:
  """Bytes of every stored array of ``model`` (its layers and the graph's constants), as stored: the measurement
  that the counter's prediction (:func:`lcnn_jax.counting.stored_bytes`, by the rule of :mod:`lcnn_jax.lookups`)
  equals."""
  layers = sum(array.nbytes for layer in model.layers.values() for array in layer_arrays(layer).values())
  return layers + sum(np.asarray(c).nbytes for c in model.graph.consts.values())


__all__ = ["BFLOAT16", "PRECISIONS", "int8_per_channel", "model_bytes", "quantize",
           "quantize_layer"]
