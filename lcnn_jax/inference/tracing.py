"""Tracing an NNX model's eval-mode forward pass into a :class:`~lcnn_jax.inference.graph.Graph` (export time).

:func:`trace` runs the model once on an abstract input whose batch size is a symbol, with every convolution,
dense, lookup and BatchNorm layer replaced by an opaque *layer* equation named by the layer's path. What is
left between the layers (ReLU, pooling, residual additions, reshapes, averages) are JAX primitives whose
parameters are encoded as JSON values; nested calls (``jax.jit``, ``custom_jvp``) are inlined.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export as jax_export
from jax.extend import core as jax_core
from jax.extend.core import primitives as jax_primitives

from lcnn_jax.inference.graph import BATCH, Equation, Graph, UnsupportedModel
from lcnn_jax.layers import LookupConv, LookupDense, eval_view, replaced_calls

LAYER_CLASSES = (LookupConv, LookupDense, nnx.Conv, nnx.Linear, nnx.BatchNorm)
"""Modules that become layer equations; everything else is traced through."""

INLINED = {"jit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr"}
"""Call primitives whose body is inlined, and the parameter holding it."""

_layer_p = jax_core.Primitive("lcnn_layer")
_layer_p.def_abstract_eval(lambda x, *, name, shape, dtype: jax.core.ShapedArray(shape, dtype))


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """What tracing saw of one layer: the module, and its input and output shapes (batch axis = ``b``)."""
  module: nnx.Module
  input_shape: tuple
  output_shape: tuple


def _encode(value: Any, where: str) -> Any:
  """A primitive parameter as a JSON value (tuples as lists; dtypes, precisions and the batch tagged)."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else {"float": repr(float(value))}
  if isinstance(value, (tuple, list)):
    return [_encode(v, where) for v in value]
  if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
    return {"dtype": np.dtype(value).name}
  if isinstance(value, jax.lax.Precision):
    return {"precision": value.name}
  if type(value).__name__ == "_DimExpr":
    if str(value) != BATCH:
      raise UnsupportedModel(f"{where}: the forward pass computes the shape {value} from the batch size; only the "
                             "batch size itself can stay symbolic (reshape with x.shape[0], not a product).")
    return {"dim": BATCH}
  raise UnsupportedModel(f"{where}: parameter value {value!r} of type {type(value).__name__} cannot be stored.")


def _layers_as_equations(names: dict[int, str], calls: dict[str, LayerCall]):
  """Makes each layer class's ``__call__`` emit one opaque layer equation (shape from an abstract run)."""

  def make(original):
    def call(module, x, *args, **kwargs):
      if args or kwargs:
        raise UnsupportedModel(f"Layer {names.get(id(module), module)!r} is called with extra arguments; only "
                               "layer(x) can be exported.")
      name = names[id(module)]
      y = jax.eval_shape(lambda v: original(module, v), jax.ShapeDtypeStruct(x.shape, x.dtype))
      seen = calls.get(name)
      if seen is not None and (seen.input_shape, seen.output_shape) != (tuple(x.shape), tuple(y.shape)):
        raise UnsupportedModel(f"Layer {name!r} is called on inputs of different shapes; it cannot be exported.")
      calls[name] = LayerCall(module, tuple(x.shape), tuple(y.shape))
      return _layer_p.bind(x, name=name, shape=tuple(y.shape), dtype=y.dtype)
    return call

  return replaced_calls(LAYER_CLASSES, make)


class _Builder:
  """Flattens a jaxpr (inlining calls) into equations over integer variable ids."""

  def __init__(self):
    self.equations: list[Equation] = []
    self.consts: dict[str, np.ndarray] = {}
    self.count = 0

  def fresh(self) -> int:
    self.count += 1
    return self.count - 1

  def add_const(self, value) -> tuple:
    name = str(len(self.consts))
    self.consts[name] = np.asarray(value)
    return ("const", name)

  def emit(self, jaxpr: jax_core.Jaxpr, env: dict) -> None:
    def ref(atom):
      if isinstance(atom, jax_core.Literal):
        value = np.asarray(atom.val)
        if value.shape:
          return self.add_const(value)
        return ("literal", value.item(), value.dtype.name)
      return env[atom]

    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      inputs = [ref(v) for v in eqn.invars]
      if name in INLINED:
        body = eqn.params[INLINED[name]]
        inner = body.jaxpr if isinstance(body, jax_core.ClosedJaxpr) else body
        consts = body.consts if isinstance(body, jax_core.ClosedJaxpr) else ()
        inner_env = {v: self.add_const(c) for v, c in zip(inner.constvars, consts)}
        inner_env.update(zip(inner.invars, inputs))
        self.emit(inner, inner_env)
        for outer, result in zip(eqn.outvars, inner.outvars):
          env[outer] = ref(result) if isinstance(result, jax_core.Literal) else inner_env[result]
        continue
      outputs = []
      for v in eqn.outvars:
        var = self.fresh()
        outputs.append(var)
        if not isinstance(v, jax_core.DropVar):
          env[v] = ("var", var)
      if name == "lcnn_layer":
        params = {"name": eqn.params["name"]}
        name = "layer"
      else:
        if not hasattr(jax_primitives, f"{name}_p"):
          raise UnsupportedModel(f"The forward pass uses the primitive {name!r}, which the export cannot store.")
        params = {k: _encode(v, f"primitive {name!r}, parameter {k!r}") for k, v in eqn.params.items()}
      self.equations.append(Equation(name, tuple(inputs), tuple(outputs), params))


def trace(model: nnx.Module, input_shape: Sequence[int]) -> tuple[Graph, dict[str, LayerCall]]:
  """The model's eval-mode forward on one (h, w, c) example shape, as a graph and the layers it calls.

  The model is viewed in eval mode (BatchNorm on running statistics, no dropout); it is not changed.
  """
  eval_model = eval_view(model)
  names = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(eval_model)
           if isinstance(m, LAYER_CLASSES)}
  calls: dict[str, LayerCall] = {}
  batch, = jax_export.symbolic_shape(BATCH)
  spec = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  with _layers_as_equations(names, calls):
    closed = jax.make_jaxpr(lambda x: eval_model(x))(spec)
  if len(closed.jaxpr.outvars) != 1:
    raise UnsupportedModel(f"The model returns {len(closed.jaxpr.outvars)} arrays; export needs one (the logits).")
  builder = _Builder()
  env = {v: builder.add_const(c) for v, c in zip(closed.jaxpr.constvars, closed.consts)}
  input_var = builder.fresh()
  env[closed.jaxpr.invars[0]] = ("var", input_var)
  builder.emit(closed.jaxpr, env)
  out = closed.jaxpr.outvars[0]
  if isinstance(out, jax_core.Literal) or env[out][0] != "var":
    raise UnsupportedModel("The model's output does not depend on its input; nothing to export.")
  return Graph(tuple(builder.equations), input_var, env[out][1], builder.consts), calls
