"""The lookups of a lookup layer (REFERENCE §2–3, §6): the non-zeros of P grouped per output, and their cost.

One representation, one multiplication formula and one storage-size rule for the whole package, in NumPy alone so
that the inference runtime reads them without Flax: the layers build :class:`Lookups` from their thresholded P
(:meth:`lcnn_jax.layers.LookupConv.lookups`), the multiplication counter (:mod:`lcnn_jax.counting`) and the exported
layers count with :func:`multiplications`, and the exporter stores and the inference backends run a
:class:`~lcnn_jax.inference.records.LookupLayer`, which is :class:`Lookups` with its dictionary, bias and geometry.
What an exported layer stores, in bytes, is :func:`lookup_layer_bytes` and :func:`dense_layer_bytes`: the counter
predicts a model's stored bytes with them, and an export (:mod:`lcnn_jax.inference.precision`) stores exactly that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np


VALUE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
"""Bytes per stored weight at each storage precision of an exported model (``--precision`` of the exporter)."""

SCALE_BYTES = BIAS_BYTES = INDEX_START_BYTES = 4  # float32 scales and biases, int32 starts of each output


def narrowest_index_dtype(size: int) -> np.dtype:
  """uint8, uint16 or int32: the narrowest that holds indices in [0, size)."""
  return np.dtype(np.uint8 if size <= 1 << 8 else np.uint16 if size <= 1 << 16 else np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Lookups:
  """The non-zeros of thresholded P (kh, kw, k, n), grouped per output.

  Output o's non-zeros are ``indices[starts[o]:starts[o + 1]]``, in increasing order, with ``values`` alongside;
  an index is the flat position (r·kw + c)·k + j of the coefficient P[r, c, j, o] in a (kh, kw, k) block. A dense
  lookup layer's P (k, n) is the 1×1 case, shape (1, 1, k, n).
  """
  starts: np.ndarray  # (n + 1,) int32
  indices: np.ndarray  # (nnz,) uint8 when kh·kw·k ≤ 256, uint16 when ≤ 65536, else int32
  values: np.ndarray  # (nnz,)
  shape: tuple[int, int, int, int]  # P's (kh, kw, k, n)

  @classmethod
  def from_coefficients(cls, coefficients: np.ndarray) -> "Lookups":
    """The lookups of thresholded P, (kh, kw, k, n) for a convolution or (k, n) for a dense layer."""
    p = np.asarray(coefficients)
    if p.ndim == 2:
      p = p[None, None]
    if p.ndim != 4:
      raise ValueError(f"coefficients of shape {p.shape}: expected (kh, kw, k, n) or (k, n).")
    kh, kw, k, n = p.shape
    flat = p.reshape(kh * kw * k, n).T  # (n, kh·kw·k)
    outputs, positions = np.nonzero(flat)  # row-major: grouped by output, positions ascending
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(outputs, minlength=n), out=starts[1:])
    return cls(starts=starts.astype(np.int32), indices=positions.astype(narrowest_index_dtype(kh * kw * k)),
               values=flat[outputs, positions], shape=(kh, kw, k, n))

  @property
  def kernel_size(self) -> tuple[int, int]:
    return tuple(self.shape[:2])

  @property
  def dictionary_size(self) -> int:
    return self.shape[2]

  @property
  def out_features(self) -> int:
    return self.shape[3]

  @property
  def nnz(self) -> int:
    return int(self.values.shape[0])

  @property
  def density(self) -> float:
    """nnz(P) / size(P)."""
    size = math.prod(self.shape)
    return self.nnz / size if size else 0.0

  def counts(self) -> np.ndarray:
    """(n,) the number of non-zeros of each output."""
    return np.diff(self.starts)

  def output_of_each_nonzero(self) -> np.ndarray:
    """(nnz,) the output each non-zero belongs to."""
    return np.repeat(np.arange(self.out_features), self.counts())

  def taps_and_atoms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r, c, j), each (nnz,): the tap row, tap column and dictionary atom of each non-zero."""
    tap, atom = np.divmod(self.indices.astype(np.int64), self.dictionary_size)
    row, column = np.divmod(tap, self.kernel_size[1])
    return row, column, atom

  def float_values(self) -> np.ndarray:
    """The non-zeros (nnz,) in float32."""
    return self.values.astype(np.float32)

  def coefficients(self) -> np.ndarray:
    """P as a dense (kh, kw, k, n) float32 array."""
    kh, kw, k, n = self.shape
    p = np.zeros((kh * kw * k, n), np.float32)
    p[self.indices.astype(np.int64), self.output_of_each_nonzero()] = self.float_values()
    return p.reshape(self.shape)

  def slots(self, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The lookups padded to a common length: (positions, values), each (slots, n) with output o's t-th non-zero
    at [t, o]; slots past an output's count hold position 0 and value 0.

    Args:
      positions: (nnz,) where each non-zero reads (default: its index); int32 in the result.
    """
    counts = self.counts()
    slots = max(int(counts.max(initial=0)), 1)
    column = np.arange(self.nnz) - np.repeat(self.starts[:-1], counts)
    outputs = self.output_of_each_nonzero()
    padded_positions = np.zeros((slots, self.out_features), np.int32)
    padded_values = np.zeros((slots, self.out_features), np.float32)
    padded_positions[column, outputs] = self.indices if positions is None else positions
    padded_values[column, outputs] = self.float_values()
    return padded_positions, padded_values


class Multiplications(NamedTuple):
  """The multiplications of one lookup layer for one example (REFERENCE §6)."""
  dictionary: int  # the dictionary stage: k · m_in per position of the padded input
  per_nonzero: int  # the output positions each non-zero of P is used at
  total: int  # dictionary + per_nonzero · nnz(P)


def multiplications(*, nonzeros: int, dictionary_size: int, in_features: int, padded_size: Sequence[int],
                    output_size: Sequence[int]) -> Multiplications:
  """A lookup layer's multiplications for one example: S = X ⊛ D over the padded input, then one multiplication per
  non-zero of P at every output position.

  It needs the number of non-zeros, not where they are: the counter (:mod:`lcnn_jax.counting`) takes it from P with
  ``np.count_nonzero`` (an untrained AlexNet-LCNN's P is nearly dense, and its lookups would take gigabytes), an
  exported layer from its :class:`Lookups` (``nnz``).

  Args:
    nonzeros: nnz(P).
    dictionary_size: k, the atoms of D.
    in_features: m_in, the input channels.
    padded_size: the input's spatial size with the layer's zero padding, (h + 2·ph, w + 2·pw); () for flat features.
    output_size: the output's spatial size (oh, ow); () for flat features.
  """
  dictionary = math.prod(padded_size) * dictionary_size * in_features
  per_nonzero = math.prod(output_size)
  return Multiplications(dictionary, per_nonzero, dictionary + per_nonzero * nonzeros)


def _value_bytes(precision: str) -> int:
  if precision not in VALUE_BYTES:
    raise ValueError(f"precision={precision!r}: expected one of {', '.join(VALUE_BYTES)}.")
  return VALUE_BYTES[precision]


def lookup_layer_bytes(*, nonzeros: int, dictionary_size: int, in_features: int, positions: int, out_features: int,
                       precision: str) -> int:
  """Bytes an exported lookup layer stores: D (m_in, k) and the non-zeros of P in ``precision`` (int8 adds a float32
  scale per atom of D and per output), each non-zero's index in [0, ``positions``) (kh·kw·k; the narrowest dtype,
  :func:`narrowest_index_dtype`), each output's start (int32, n + 1 of them) and the bias (float32, n)."""
  size = _value_bytes(precision)
  scales = SCALE_BYTES * (dictionary_size + out_features) if precision == "int8" else 0
  index = narrowest_index_dtype(positions).itemsize
  return (in_features * dictionary_size * size + nonzeros * (size + index) + scales
          + INDEX_START_BYTES * (out_features + 1) + BIAS_BYTES * out_features)


def dense_layer_bytes(*, weights: int, out_features: int, precision: str) -> int:
  """Bytes an exported dense convolution or dense layer stores: its kernel's ``weights`` in ``precision`` (int8
  adds a float32 scale per output) and the bias (float32, one per output)."""
  scales = SCALE_BYTES * out_features if precision == "int8" else 0
  return weights * _value_bytes(precision) + scales + BIAS_BYTES * out_features


def affine_bytes(channels: int) -> int:
  """Bytes of a BatchNorm the export cannot fold into the layer before it: a float32 scale and shift per channel."""
  return 2 * SCALE_BYTES * channels
