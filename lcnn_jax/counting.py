"""Counting multiplications per layer, as the original's ``-benchmark`` mode does (REFERENCE §6).

This module is the counter, a plain library (of lcnn_jax it imports the layers, the models and the lookups); the
command that inspects a run's checkpoint with it (tables, JSON, plot), ``python -m lcnn_jax.flops``, is
:mod:`lcnn_jax.inspection`'s.

One image, eval mode. Only multiplications count; BatchNorm, ReLU, pooling, dropout and additions are free.

* convolution: (elements of the output) × (m_in · kh · kw) (per group) × density of its kernel
  = H_out · W_out × nnz(kernel)
* linear: (elements of the output) × m_in × density of its kernel = nnz(kernel) per output position
* lookup convolution: (elements of S over the *padded* input, k · H_p · W_p) × m_in
  + (elements of the output) × (k · kh · kw) × density(P) = … + H_out · W_out × nnz(P)
* lookup dense: k · m_in + n_out · k · density(P) = k · m_in + nnz(P)

A kernel weight that is exactly zero (a magnitude-pruned CNN's) costs nothing, as a zero of P does; a trained or
freshly initialised dense kernel has none, so its count is the full one.

So a lookup layer costs a fixed part (its dictionary stage) plus ``cost_per_nonzero`` (the output positions
each non-zero of P is used at) times nnz(P); :mod:`lcnn_jax.operating_point` steers training by this sum.

The counter works on any NNX model: it runs the model once on an abstract input of one example
(``jax.eval_shape``, nothing is computed) and records the shapes each ``nnx.Conv``, ``nnx.Linear``,
:class:`~lcnn_jax.layers.LookupConv` and :class:`~lcnn_jax.layers.LookupDense` sees, so a CNN and its LCNN
are counted by the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcnn_jax import layers, models
from lcnn_jax import lookups as lookups_lib


@dataclasses.dataclass(frozen=True)
class LayerCount:
  """The multiplications of one layer for one image."""
  path: str
  kind: str  # conv | linear | lookup_conv | lookup_dense
  input_shape: tuple[int, ...]  # one example, without the batch axis
  output_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]  # (kh, kw, in, out) / (in, out); P's shape for lookup layers
  dictionary_size: int | None  # None for dense layers
  density: float  # nnz(P) / size(P); nnz(kernel) / size(kernel) for dense layers (1.0 unless pruned)
  multiplications: int
  dictionary_multiplications: int  # the lookup layer's dictionary stage; 0 for dense layers
  cost_per_nonzero: int = 0  # lookup layers: multiplications per non-zero of P (output positions); 0 for dense


@dataclasses.dataclass(frozen=True)
class MultiplicationCount:
  """Per-layer counts in forward order and their total."""
  rows: tuple[LayerCount, ...]

  @property
  def total(self) -> int:
    return sum(row.multiplications for row in self.rows)

  def speedup_over(self, baseline: "MultiplicationCount") -> float:
    """count(baseline) / count(self), the paper's speedup."""
    return baseline.total / self.total if self.total else math.inf

  def table(self) -> str:
    """A fixed-width table of the rows, with each layer's share of the total and the total."""
    header = f"{'layer':<28} {'kind':<12} {'output':<16} {'dict':>5} {'density':>8} {'mults':>15} {'share':>6}"
    lines = [header, "-" * len(header)]
    total = self.total or 1
    for row in self.rows:
      lines.append(
          f"{row.path or '(model)':<28} {row.kind:<12} {'x'.join(map(str, row.output_shape)):<16} "
          f"{row.dictionary_size if row.dictionary_size is not None else '-':>5} {row.density:>8.4f} "
          f"{row.multiplications:>15,} {100 * row.multiplications / total:>5.1f}%")
    lines.append("-" * len(header))
    lines.append(f"{'total':<28} {'':<12} {'':<16} {'':>5} {'':>8} {self.total:>15,}")
    return "\n".join(lines)


def density(coefficients: jax.Array | np.ndarray) -> float:
  """nnz(P) / size(P) of already thresholded coefficients."""
  p = np.asarray(coefficients)
  return float(np.count_nonzero(p)) / p.size if p.size else 0.0


def _count_layer(path: str, module: nnx.Module, x_shape: Sequence[int], y_shape: Sequence[int]) -> LayerCount:
  out_elements = math.prod(y_shape[1:])
  in_shape, out_shape = tuple(x_shape[1:]), tuple(y_shape[1:])
  if isinstance(module, (layers.LookupConv, layers.LookupDense)):
    p = np.asarray(module.thresholded_coefficients())
    spatial = tuple(x_shape[1:-1])  # () for flat features
    padding = module.padding if isinstance(module, layers.LookupConv) else (0,) * len(spatial)
    cost = lookups_lib.multiplications(nonzeros=int(np.count_nonzero(p)), dictionary_size=module.dictionary_size,
                                       in_features=module.in_features,
                                       padded_size=[s + 2 * q for s, q in zip(spatial, padding)],
                                       output_size=y_shape[1:-1])
    kind = "lookup_conv" if isinstance(module, layers.LookupConv) else "lookup_dense"
    return LayerCount(path, kind, in_shape, out_shape, tuple(module.coefficients.shape), module.dictionary_size,
                      density(p), cost.total, cost.dictionary, cost.per_nonzero)
  kernel = np.asarray(module.kernel[...])  # conv (kh, kw, in / groups, out); linear (in, out)
  # Each weight is used once per output position: H_out · W_out for a convolution, once for a linear layer.
  positions = out_elements // kernel.shape[-1]
  nonzeros = int(np.count_nonzero(kernel))
  kind = "conv" if isinstance(module, nnx.Conv) else "linear"
  return LayerCount(path, kind, in_shape, out_shape, tuple(kernel.shape), None, density(kernel),
                    positions * nonzeros, 0)


_COUNTED = (layers.LookupConv, layers.LookupDense, nnx.Conv, nnx.Linear)


def _recording(paths: dict[int, str], records: list):
  """Wraps the counted classes' ``__call__`` so each call appends (path, module, input, output shapes)."""

  def make_wrapper(original):
    def wrapper(module, x, *args, **kwargs):
      y = original(module, x, *args, **kwargs)
      if id(module) in paths:
        records.append((paths[id(module)], module, tuple(x.shape), tuple(y.shape)))
      return y
    return wrapper

  return layers.replaced_calls(_COUNTED, make_wrapper)


def module_paths(model: nnx.Module) -> dict[int, str]:
  """id(module) -> 'a/b/0' path of each counted layer in the model."""
  return {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(model)
          if isinstance(m, _COUNTED)}


def count_multiplications(model: nnx.Module, input_shape: Sequence[int]) -> MultiplicationCount:
  """Counts the multiplications of one forward pass of one example of shape ``input_shape``.

  Args:
    model: any NNX model whose convolutions and dense layers are ``nnx.Conv``/``nnx.Linear`` or lookup layers.
      It is evaluated in eval mode (a view; the model itself is not changed).
    input_shape: one example's shape without the batch axis, e.g. (224, 224, 3).
  Returns:
    A :class:`MultiplicationCount` with one row per layer call, in the order the forward pass calls them.
  """
  eval_model = layers.eval_view(model)
  paths = module_paths(eval_model)
  records: list = []
  spec = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with _recording(paths, records):
    jax.eval_shape(lambda x: eval_model(x), spec)
  # Densities need P's values, which are concrete on the modules themselves.
  return MultiplicationCount(tuple(_count_layer(path, m, xs, ys) for path, m, xs, ys in records))


def stored_parameters(model: nnx.Module) -> int:
  """Parameters a deployed model stores: dictionaries, non-zeros of P, biases, and every dense layer whole.

  The original's memory column; BatchNorm statistics are left out (they fold into the layers before them).
  """
  total = 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable[...])
    if isinstance(variable, layers.Coefficients):
      threshold = _owner(model, path).threshold
      total += int(np.count_nonzero(np.abs(value) > threshold))
    else:
      total += value.size
  return total


VALUE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
"""Bytes per stored weight at each precision of ``python -m lcnn_jax.inference.exporter --precision``."""


def stored_bytes(model: nnx.Module, precision: str = "float32") -> int:
  """Bytes a deployed model stores with its weights (dictionaries, non-zeros of P, dense kernels) in
  ``precision``: each non-zero of P with its index (uint8/uint16/int32, the narrowest for kh·kw·k positions) and
  each output's start (int32); int8 weights with a float32 scale per output channel; 1-D parameters in float32."""
  size = VALUE_BYTES[precision]
  total = 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable[...])
    scales = 4 * value.shape[-1] if precision == "int8" else 0
    if isinstance(variable, layers.Coefficients):
      nnz = int(np.count_nonzero(np.abs(value) > _owner(model, path).threshold))
      positions = value.size // value.shape[-1]
      index = 1 if positions <= 1 << 8 else 2 if positions <= 1 << 16 else 4
      total += nnz * (size + index) + 4 * (value.shape[-1] + 1) + scales
    elif value.ndim >= 2:
      total += value.size * size + scales
    else:
      total += 4 * value.size
  return total


def _owner(model: nnx.Module, path) -> nnx.Module:
  module = model
  for part in path[:-1]:
    module = module[part] if isinstance(part, int) else getattr(module, part)
  return module


def baseline_model(model_config, num_classes: int, input_shape: Sequence[int]) -> nnx.Module:
  """The dense CNN the paper compares ``model_config`` with (``alexnet`` for AlexNet-LCNN, ...), seeded with 0."""
  return models.create_model(models.baseline_config(model_config), num_classes=num_classes,
                             input_shape=tuple(input_shape), rngs=nnx.Rngs(0))


def baseline_count(model_config, num_classes: int, input_shape: Sequence[int]) -> MultiplicationCount:
  """Multiplications of the dense CNN the paper compares ``model_config`` with (AlexNet-LCNN vs ``alexnet``...)."""
  return count_multiplications(baseline_model(model_config, num_classes, input_shape), input_shape)

