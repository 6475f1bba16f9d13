"""The layers of an exported model, as plain records of NumPy arrays: what the file stores and the runtime runs.

A :class:`LookupLayer` is a trained lookup convolution (or dense layer, the 1×1 case) ready for inference; a
:class:`ConvLayer` and a :class:`LinearLayer` are dense layers as trained; an :class:`AffineLayer` is an eval-mode
BatchNorm that could not be folded into the layer before it. Any BatchNorm folded into a layer is already in its
coefficients (or kernel) and bias.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcnn_jax.lookups import Lookups, Multiplications, multiplications


@dataclasses.dataclass(frozen=True, eq=False)
class LookupLayer(Lookups):
  """A lookup convolution for inference: the :class:`~lcnn_jax.lookups.Lookups` of P, D, the bias and the geometry.

  D and the values are stored in float32, bfloat16 or int8 (:mod:`lcnn_jax.inference.precision`); int8 ones
  carry a float32 scale per output channel (``dictionary_scale`` per atom, ``value_scale`` per output), so that
  D[:, j] = dictionary[:, j] · dictionary_scale[j] and the values of output o are scaled by value_scale[o].
  """
  dictionary: np.ndarray  # (m, k) float32, bfloat16 or int8
  bias: np.ndarray  # (n,) float32
  strides: tuple[int, int]
  padding: tuple[int, int]
  input_size: tuple[int, int]  # (h, w) of the input the layer sees
  dictionary_scale: np.ndarray | None = None  # (k,) float32, int8 dictionaries only
  value_scale: np.ndarray | None = None  # (n,) float32, int8 values only

  def __post_init__(self):
    m, k = self.dictionary.shape
    if (k, self.bias.shape[0]) != tuple(self.shape[2:]) or self.starts.shape[0] != self.shape[3] + 1:
      raise ValueError(f"A lookup layer with D {self.dictionary.shape}, bias {self.bias.shape} and "
                       f"{self.starts.shape[0]} starts does not match P of shape {self.shape}.")

  @property
  def in_features(self) -> int:
    return self.dictionary.shape[0]

  def float_dictionary(self) -> np.ndarray:
    """D (m, k) in float32, as stored (scaled back from int8)."""
    d = self.dictionary.astype(np.float32)
    return d if self.dictionary_scale is None else d * self.dictionary_scale

  def float_values(self) -> np.ndarray:
    """The non-zeros (nnz,) in float32, as stored (scaled back from int8)."""
    v = self.values.astype(np.float32)
    return v if self.value_scale is None else v * self.value_scale[self.output_of_each_nonzero()]

  @property
  def padded_size(self) -> tuple[int, int]:
    """(h + 2·ph, w + 2·pw): the size of S."""
    return tuple(s + 2 * p for s, p in zip(self.input_size, self.padding))

  @property
  def output_size(self) -> tuple[int, int]:
    return tuple((s - k) // st + 1 for s, k, st in zip(self.padded_size, self.kernel_size, self.strides))

  @classmethod
  def from_lookups(cls, lookups: Lookups, dictionary: np.ndarray, bias: np.ndarray | None, *,
                   strides: tuple[int, int], padding: tuple[int, int], input_size: tuple[int, int]) -> "LookupLayer":
    """The layer of ``lookups`` with D (m, k) and the bias (n,) in float32 (None: zeros)."""
    n = lookups.out_features
    return cls(starts=lookups.starts, indices=lookups.indices, values=np.asarray(lookups.values, np.float32),
               shape=lookups.shape, dictionary=np.asarray(dictionary, np.float32),
               bias=np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32),
               strides=tuple(strides), padding=tuple(padding), input_size=tuple(input_size))

  @classmethod
  def from_coefficients(cls, dictionary: np.ndarray, coefficients: np.ndarray, bias: np.ndarray | None, *,
                        strides: tuple[int, int], padding: tuple[int, int],
                        input_size: tuple[int, int]) -> "LookupLayer":
    """The layer of thresholded P (kh, kw, k, n), keeping its non-zeros."""
    return cls.from_lookups(Lookups.from_coefficients(np.asarray(coefficients, np.float32)), dictionary, bias,
                            strides=strides, padding=padding, input_size=input_size)

  def dense_kernel(self) -> np.ndarray:
    """W = D·P, the equivalent dense kernel (kh, kw, m, n)."""
    return np.einsum("mk,rcko->rcmo", self.float_dictionary(), self.coefficients())

  def multiplications(self) -> Multiplications:
    """The layer's multiplications for one example (:func:`lcnn_jax.lookups.multiplications`)."""
    return multiplications(nonzeros=self.nnz, dictionary_size=self.dictionary_size, in_features=self.in_features,
                           padded_size=self.padded_size, output_size=self.output_size)


class _Kernel:
  """A dense kernel stored in float32, bfloat16 or int8; int8 with a float32 scale per output (last axis)."""

  def float_kernel(self) -> np.ndarray:
    """The kernel in float32, as stored (scaled back from int8)."""
    kernel = self.kernel.astype(np.float32)
    return kernel if self.kernel_scale is None else kernel * self.kernel_scale


@dataclasses.dataclass(frozen=True, eq=False)
class ConvLayer(_Kernel):
  """A dense convolution (``nnx.Conv``), BatchNorm folded: NHWC, explicit zero padding."""
  kernel: np.ndarray  # (kh, kw, m, n) float32, bfloat16 or int8
  bias: np.ndarray  # (n,)
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
  kernel_scale: np.ndarray | None = None  # (n,) float32, int8 kernels only


@dataclasses.dataclass(frozen=True, eq=False)
class LinearLayer(_Kernel):
  """A dense layer (``nnx.Linear``) over the last axis, BatchNorm folded."""
  kernel: np.ndarray  # (m, n) float32, bfloat16 or int8
  bias: np.ndarray  # (n,)
  kernel_scale: np.ndarray | None = None  # (n,) float32, int8 kernels only


@dataclasses.dataclass(frozen=True, eq=False)
class AffineLayer:
  """An eval-mode BatchNorm that could not be folded: x · scale + shift over the last (channel) axis."""
  scale: np.ndarray  # (c,)
  shift: np.ndarray  # (c,)


Layer = LookupLayer | ConvLayer | LinearLayer | AffineLayer


def layer_arrays(layer: Layer) -> dict[str, np.ndarray]:
  """The arrays a layer stores (its dataclass fields that are arrays)."""
  return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
          if isinstance(getattr(layer, f.name), np.ndarray)}
