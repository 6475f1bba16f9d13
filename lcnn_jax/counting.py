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


def _is_abstract(value) -> bool:
  """A value of a model built with ``nnx.eval_shape``: a shape and dtype, no numbers."""
  return isinstance(value, jax.ShapeDtypeStruct)


def _lookup_nonzeros(module: nnx.Module) -> int:
  """nnz(|P| > τ) of a lookup layer; every entry of an abstract P (``nnx.eval_shape``) counts."""
  p = module.coefficients.get_value()
  if _is_abstract(p):
    return p.size
  return int(np.count_nonzero(np.abs(np.asarray(p)) > module.threshold))


def _kernel_nonzeros(module: nnx.Module) -> int:
  """The non-zeros of a dense kernel; a freshly initialised or abstract one (``nnx.eval_shape``) has no zeros."""
  kernel = module.kernel.get_value()
  return kernel.size if _is_abstract(kernel) else int(np.count_nonzero(np.asarray(kernel)))


def _count_layer(path: str, module: nnx.Module, x_shape: Sequence[int], y_shape: Sequence[int]) -> LayerCount:
  out_elements = math.prod(y_shape[1:])
  in_shape, out_shape = tuple(x_shape[1:]), tuple(y_shape[1:])
  if isinstance(module, (layers.LookupConv, layers.LookupDense)):
    nonzeros, size = _lookup_nonzeros(module), module.coefficients.get_value().size
    spatial = tuple(x_shape[1:-1])  # () for flat features
    padding = module.padding if isinstance(module, layers.LookupConv) else (0,) * len(spatial)
    cost = lookups_lib.multiplications(nonzeros=nonzeros, dictionary_size=module.dictionary_size,
                                       in_features=module.in_features,
                                       padded_size=[s + 2 * q for s, q in zip(spatial, padding)],
                                       output_size=y_shape[1:-1])
    kind = "lookup_conv" if isinstance(module, layers.LookupConv) else "lookup_dense"
    return LayerCount(path, kind, in_shape, out_shape, tuple(module.coefficients.get_value().shape),
                      module.dictionary_size, nonzeros / size if size else 0.0, cost.total, cost.dictionary,
                      cost.per_nonzero)
  kernel = module.kernel.get_value()  # conv (kh, kw, in / groups, out); linear (in, out)
  # Each weight is used once per output position: H_out · W_out for a convolution, once for a linear layer.
  positions = out_elements // kernel.shape[-1]
  nonzeros = _kernel_nonzeros(module)
  kind = "conv" if isinstance(module, nnx.Conv) else "linear"
  return LayerCount(path, kind, in_shape, out_shape, tuple(kernel.shape), None,
                    nonzeros / kernel.size if kernel.size else 0.0, positions * nonzeros, 0)


_COUNTED = (layers.LookupConv, layers.LookupDense, nnx.Conv, nnx.Linear)


def module_paths(model: nnx.Module) -> dict[int, str]:
  """id(module) -> 'a/b/0' path of each counted layer in the model."""
  return {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(model)
          if isinstance(m, _COUNTED)}


@dataclasses.dataclass(frozen=True)
class _Trace:
  """What one abstract forward pass of one example saw."""
  layer_calls: tuple[tuple[str, nnx.Module, tuple[int, ...], tuple[int, ...]], ...]  # (path, layer, in, out shapes)
  unfolded_batch_norms: tuple[nnx.BatchNorm, ...]  # those whose input is not a counted layer's output


def _trace(model: nnx.Module, input_shape: Sequence[int]) -> _Trace:
  """Runs ``model`` in eval mode on an abstract example (``jax.eval_shape``: nothing is computed) and records each
  counted layer call and each BatchNorm that does not directly follow one. The model may be abstract itself
  (built with ``nnx.eval_shape``); the records name its own modules, whose values the counts read."""
  eval_model = layers.eval_view(model)
  graphdef, state = nnx.split(eval_model)
  modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(eval_model)}
  layer_calls, unfolded, outputs, paths = [], [], [], {}

  def make_wrapper(original):
    def wrapper(module, x, *args, **kwargs):
      y = original(module, x, *args, **kwargs)
      path = paths.get(id(module))
      if path is None:
        return y
      if isinstance(module, nnx.BatchNorm):
        if not any(x is out for out in outputs):
          unfolded.append(modules[path])
      else:
        layer_calls.append((path, modules[path], tuple(x.shape), tuple(y.shape)))
        outputs.append(y)
      return y
    return wrapper

  def forward(state, x):
    traced = nnx.merge(graphdef, state)  # abstract values are traced here, concrete ones too
    paths.update({id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(traced)
                  if isinstance(m, (*_COUNTED, nnx.BatchNorm))})
    return traced(x)

  with layers.replaced_calls((*_COUNTED, nnx.BatchNorm), make_wrapper):
    jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return _Trace(tuple(layer_calls), tuple(unfolded))


def count_multiplications(model: nnx.Module, input_shape: Sequence[int]) -> MultiplicationCount:
  """Counts the multiplications of one forward pass of one example of shape ``input_shape``.

  Args:
    model: any NNX model whose convolutions and dense layers are ``nnx.Conv``/``nnx.Linear`` or lookup layers.
      It is evaluated in eval mode (a view; the model itself is not changed). An abstract model (built with
      ``nnx.eval_shape``, no parameters allocated) counts every weight as non-zero.
    input_shape: one example's shape without the batch axis, e.g. (224, 224, 3).
  Returns:
    A :class:`MultiplicationCount` with one row per layer call, in the order the forward pass calls them.
  """
  calls = _trace(model, input_shape).layer_calls
  # Densities need P's values, which are concrete on the modules themselves.
  return MultiplicationCount(tuple(_count_layer(path, m, xs, ys) for path, m, xs, ys in calls))


def stored_parameters(model: nnx.Module) -> int:
  """Parameters a deployed model stores: dictionaries, non-zeros of P, biases, and every dense layer whole.

  The original's memory column; BatchNorm statistics are left out (they fold into the layers before them).
  """
  total = 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if isinstance(variable, layers.Coefficients):
      total += _lookup_nonzeros(_owner(model, path))
    else:
      total += variable.get_value().size
  return total


VALUE_BYTES = lookups_lib.VALUE_BYTES
"""Bytes per stored weight at each precision of ``python -m lcnn_jax.inference.exporter --precision``."""


def stored_bytes(model: nnx.Module, input_shape: Sequence[int], precision: str = "float32") -> int:
  """Bytes the export of ``model`` (``python -m lcnn_jax.inference.exporter --precision``) stores, predicted by the
  rule of :mod:`lcnn_jax.lookups`: per lookup layer D and the non-zeros of P in ``precision`` with their indices and
  each output's start (:func:`~lcnn_jax.lookups.lookup_layer_bytes`), per dense layer its kernel
  (:func:`~lcnn_jax.lookups.dense_layer_bytes`), int8 with a float32 scale per channel, and float32 biases. A
  BatchNorm folds into the layer whose output it reads and stores nothing of its own; one that reads anything
  else keeps a scale and shift per channel (:func:`~lcnn_jax.lookups.affine_bytes`). ``input_shape`` (one
  example's) finds the layers the forward pass calls; a layer called twice is stored once. (The counter does not
  see whether anything else also reads that layer's output, in which case the export keeps the BatchNorm too; no
  built-in model does that.)"""
  trace = _trace(model, input_shape)
  layers_by_id = {id(module): module for _, module, _, _ in trace.layer_calls}
  unfolded = {id(bn): bn for bn in trace.unfolded_batch_norms}
  total = sum(lookups_lib.affine_bytes(bn.num_features) for bn in unfolded.values())
  for module in layers_by_id.values():
    if isinstance(module, layers.LOOKUP_LAYERS):
      p_shape = module.coefficients.get_value().shape
      total += lookups_lib.lookup_layer_bytes(
          nonzeros=_lookup_nonzeros(module), dictionary_size=module.dictionary_size, in_features=module.in_features,
          positions=math.prod(p_shape[:-1]), out_features=p_shape[-1], precision=precision)
    else:
      kernel = module.kernel.get_value()
      total += lookups_lib.dense_layer_bytes(weights=kernel.size, out_features=kernel.shape[-1], precision=precision)
  return total


def _owner(model: nnx.Module, path) -> nnx.Module:
  module = model
  for part in path[:-1]:
    module = module[part] if isinstance(part, int) else getattr(module, part)
  return module


def baseline_model(model_config, num_classes: int, input_shape: Sequence[int]) -> nnx.Module:
  """The dense CNN the paper compares ``model_config`` with (``alexnet`` for AlexNet-LCNN, ...), abstract: built
  with ``nnx.eval_shape``, its parameters are shapes and dtypes, none allocated (a count needs no values: a fresh
  dense kernel has no zeros)."""
  return nnx.eval_shape(lambda: models.create_model(models.baseline_config(model_config), num_classes=num_classes,
                                                    input_shape=tuple(input_shape), rngs=nnx.Rngs(0)))


def baseline_count(model_config, num_classes: int, input_shape: Sequence[int]) -> MultiplicationCount:
  """Multiplications of the dense CNN the paper compares ``model_config`` with (AlexNet-LCNN vs ``alexnet``...)."""
  return count_multiplications(baseline_model(model_config, num_classes, input_shape), input_shape)
