"""A model's eval-mode forward pass as a small graph that can be stored as JSON and run without the model code.

:func:`trace` runs the model once on an abstract input whose batch size is a symbol, with every convolution,
dense, lookup and BatchNorm layer replaced by an opaque *layer* equation named by the layer's path. What is
left between the layers (ReLU, pooling, residual additions, reshapes, averages) are JAX primitives with plain
parameters; nested calls (``jax.jit``, ``custom_jvp``) are inlined. The result is a :class:`Graph` of
:class:`Equation` s whose parameters are JSON values, so an exported model holds data only: loading it binds
the named JAX primitives again and never runs code from the file.

:func:`run` evaluates a graph. Four-dimensional activations may be held channels-first in batch tiles (the
lookup kernels' layouts, :mod:`lcnn_jax.inference.layouts`) instead of NHWC: element-wise primitives, pooling
windows and reductions run on whichever layout their input has, with their axes mapped, so a chain of lookup
layers with ReLU and pooling between them never transposes its activations; any other primitive gets NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export as jax_export
from jax.extend import core as jax_core
from jax.extend.core import primitives as jax_primitives

from lcnn_jax.inference import backends as backends_lib
from lcnn_jax.inference import kernels, layouts
from lcnn_jax.inference.layouts import NHWC, Layout
from lcnn_jax.layers import LookupConv, LookupDense, replaced_calls

LAYER_CLASSES = (LookupConv, LookupDense, nnx.Conv, nnx.Linear, nnx.BatchNorm)
"""Modules that become layer equations; everything else is traced through."""

BATCH = "b"
"""The symbol standing for the batch size in traced shapes and parameters."""

ELEMENTWISE = frozenset({
    "abs", "add", "and", "ceil", "clamp", "convert_element_type", "copy", "div", "eq", "erf", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "integer_pow", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "not", "or", "pow", "round", "rsqrt", "select_n", "sign", "sqrt", "square", "stop_gradient",
    "sub", "tanh"})
REDUCTIONS = frozenset({"reduce_max", "reduce_min", "reduce_prod", "reduce_sum"})
INLINED = {"jit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr"}
"""Call primitives whose body is inlined, and the parameter holding it."""


class UnsupportedModel(ValueError):
  """The model's forward pass uses something the graph cannot store."""


_layer_p = jax_core.Primitive("lcnn_layer")
_layer_p.def_abstract_eval(lambda x, *, name, shape, dtype: jax.core.ShapedArray(shape, dtype))


@dataclasses.dataclass(frozen=True)
class Equation:
  """One step: ``outputs = primitive(*inputs, **params)``, or a layer call when ``primitive == 'layer'``.

  An input is ``["var", id]``, ``["const", name]`` or ``["literal", value, dtype]``.
  """
  primitive: str
  inputs: tuple
  outputs: tuple[int, ...]
  params: dict

  def to_json(self) -> dict:
    return {"primitive": self.primitive, "inputs": [list(i) for i in self.inputs], "outputs": list(self.outputs),
            "params": self.params}

  @classmethod
  def from_json(cls, data: dict) -> "Equation":
    return cls(data["primitive"], tuple(tuple(i) for i in data["inputs"]), tuple(data["outputs"]),
               data["params"])


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """What tracing saw of one layer: the module, and its input and output shapes (batch axis = ``b``)."""
  module: nnx.Module
  input_shape: tuple
  output_shape: tuple


@dataclasses.dataclass(frozen=True)
class Graph:
  """Equations in order, from the input variable to the output variable; constants by name."""
  equations: tuple[Equation, ...]
  input: int
  output: int
  consts: dict[str, np.ndarray]

  def to_json(self) -> dict:
    return {"input": self.input, "output": self.output, "equations": [e.to_json() for e in self.equations]}

  @classmethod
  def from_json(cls, data: dict, consts: dict[str, np.ndarray]) -> "Graph":
    return cls(tuple(Equation.from_json(e) for e in data["equations"]), data["input"], data["output"], consts)

  def layer_names(self) -> list[str]:
    """The layers in the order the forward pass calls them."""
    return [e.params["name"] for e in self.equations if e.primitive == "layer"]

  def consumers(self, var: int) -> list[Equation]:
    return [e for e in self.equations if ["var", var] in [list(i) for i in e.inputs]]

  def replace(self, equations: Sequence[Equation], rename: dict[int, int]) -> "Graph":
    """The graph with new equations, every use of variable a replaced by rename[a]."""
    def fix(i):
      return ("var", rename.get(i[1], i[1])) if i[0] == "var" else i
    fixed = tuple(dataclasses.replace(e, inputs=tuple(fix(i) for i in e.inputs)) for e in equations)
    return Graph(fixed, self.input, rename.get(self.output, self.output), self.consts)


# Parameters ------------------------------------------------------------------------------------------------

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


def _decode(value: Any, batch: int) -> Any:
  if isinstance(value, list):
    return tuple(_decode(v, batch) for v in value)
  if isinstance(value, dict):
    if "dtype" in value:
      return np.dtype(value["dtype"])
    if "float" in value:
      return float(value["float"])
    if "precision" in value:
      return jax.lax.Precision[value["precision"]]
    if "dim" in value:
      return batch
    raise ValueError(f"Unknown tagged parameter {value!r} in the graph; re-export the model with this version.")
  return value


# Tracing ---------------------------------------------------------------------------------------------------

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
  eval_model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
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


# Running ---------------------------------------------------------------------------------------------------

Value = tuple[jax.Array, Layout]  # (array, layout); NHWC means the array as the model sees it
LayerFn = Callable[..., Value | None]
"""``layer_fn(name, value)`` -> the layer's output; ``layer_fn(name, value, pooling=p)`` -> the output after the
ReLU and the max pooling ``p`` (a :class:`~lcnn_jax.inference.backends.Pooling`), and ``layer_fn(name, value,
residual=r, relu=b)`` -> the output plus the value ``r`` (or None), then the ReLU when ``b``; either is None where
the layer cannot apply them itself (the graph then runs them)."""


def as_layout(value: Value, layout: Layout) -> jax.Array:
  """The array of ``value`` held in ``layout``, transposing if needed (arrays other than 4-D are as they are)."""
  array, current = value
  return array if current == layout else layouts.convert(array, current, layout)


_WINDOW_OPS = {"reduce_window_max": (jnp.maximum, -np.inf), "reduce_window_min": (jnp.minimum, np.inf),
               "reduce_window_sum": (jnp.add, 0.0)}
_WINDOW_KEYS = ("window_dimensions", "window_strides", "padding", "base_dilation", "window_dilation")


def _window_reduce(primitive: str, x: jax.Array, params: dict) -> jax.Array:
  """A pooling window as an element-wise reduction of strided slices: one fused pass in XLA, where XLA's own
  reduce-window loop is several times slower on CPU. Falls back to the primitive for dilated or large windows."""
  window, strides = params["window_dimensions"], params["window_strides"]
  dilated = any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
  if dilated or math.prod(window) > 64:
    return getattr(jax_primitives, f"{primitive}_p").bind(x, **params)
  op, init = _WINDOW_OPS[primitive]
  if any(lo or hi for lo, hi in params["padding"]):
    x = jax.lax.pad(x, jnp.asarray(init, x.dtype), [(lo, hi, 0) for lo, hi in params["padding"]])
  out = [(size - w) // s + 1 for size, w, s in zip(x.shape, window, strides)]
  result = None
  for offset in np.ndindex(*window):
    part = jax.lax.slice(x, offset, [o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides)], strides)
    result = part if result is None else op(result, part)
  return result


def _tiled_params(params: dict) -> dict:
  """Window parameters of a logical (n, h, w, c) array for its tiled (tiles, c, h, w, tile) form."""
  def tiled(values, unit):
    return (unit, values[3], values[1], values[2], unit)
  units = {"padding": (0, 0)}
  return {k: tiled(v, units.get(k, 1)) if k in _WINDOW_KEYS else v for k, v in params.items()}


def _reduce_tiled(prim, x: jax.Array, params: dict) -> jax.Array:
  """A reduction over logical axes among (h, w, c) of a tiled array, returned in NHWC order."""
  axes = tuple(params["axes"])
  kept = [a for a in (1, 2, 3) if a not in axes]
  physical_kept = sorted(layouts.physical_axis(a) for a in kept)
  out = prim.bind(x, **{**params, "axes": tuple(sorted(layouts.physical_axis(a) for a in axes))})
  # out is (tiles, kept in physical order, tile): put the tile after the tiles, the rest in logical order.
  order = [0, len(kept) + 1] + [1 + physical_kept.index(layouts.physical_axis(a)) for a in kept]
  out = jnp.transpose(out, order)
  return out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])


def _pooling(params: dict, relu: bool) -> backends_lib.Pooling | None:
  """The max pooling over (h, w) of logical (n, h, w, c) window ``params``; None for any other window (over the
  batch or channels, or dilated)."""
  plain = (all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"]))
           and params["window_dimensions"][0] == params["window_dimensions"][3] == 1
           and params["window_strides"][0] == params["window_strides"][3] == 1
           and tuple(params["padding"][0]) == tuple(params["padding"][3]) == (0, 0))
  if not plain:
    return None
  return backends_lib.Pooling(window=tuple(params["window_dimensions"][1:3]),
                              strides=tuple(params["window_strides"][1:3]),
                              padding=tuple(tuple(p) for p in params["padding"][1:3]), relu=relu)


def _max_pool_kernel(x: jax.Array, pooling: backends_lib.Pooling) -> jax.Array | None:
  """``pooling`` of a CHWN array (1, c, h, w, batch) in the C++ kernel (:mod:`lcnn_jax.inference.kernels`); None
  where the kernel does not apply (not float32 on CPU, a batch under
  :data:`~lcnn_jax.inference.backends.POOLED_MIN_BATCH`, a window not inside the map, or no kernel here). XLA's
  fusion of the same pooling ran 2–3× slower inside AlexNet-LCNN at batch 32 (its input no longer in cache)."""
  _, c, h, w, batch = x.shape
  if (x.shape[0] != 1 or batch < backends_lib.POOLED_MIN_BATCH or x.dtype != jnp.float32
      or not pooling.fits((h, w)) or jax.default_backend() != "cpu" or not kernels.kernel_available()[0]):
    return None
  return kernels.max_pool(x[0], pooling)[None]


def _apply(primitive: str, params: dict, args: list[Value], relu: bool = False) -> list[Value]:
  """Binds one primitive, on tiled operands where the primitive allows it, else on NHWC ones. ``relu``: a
  max pooling also applies the ReLU before it (see :func:`_relus_into_max_pools`)."""
  prim = getattr(jax_primitives, f"{primitive}_p")
  tile = next((layout for _, layout in args if layout != NHWC), None)
  if primitive == "reduce_window_max" and tile is not None and len(args) == 1:
    pooling = _pooling(params, relu)
    pooled = None if pooling is None else _max_pool_kernel(args[0][0], pooling)
    if pooled is not None:
      return [(pooled, tile)]
  if relu:
    args = [(jnp.maximum(a, jnp.zeros((), a.dtype)), layout) for a, layout in args]
  if tile is not None and primitive in ELEMENTWISE and all(a.ndim in (0, 4) or l != NHWC for a, l in args):
    out = prim.bind(*[a if a.ndim == 0 else as_layout((a, l), tile) for a, l in args], **params)
    return [(o, tile) for o in (out if prim.multiple_results else [out])]
  if tile is not None and len(args) == 1:
    x = args[0][0]
    if primitive in _WINDOW_OPS and params["window_dimensions"][0] == 1:
      return [(_window_reduce(primitive, x, _tiled_params(params)), tile)]
    if primitive in REDUCTIONS and 0 not in params["axes"]:
      return [(_reduce_tiled(prim, x, params), NHWC)]
  arrays = [as_layout(a, NHWC) for a in args]
  if primitive in _WINDOW_OPS:
    return [(_window_reduce(primitive, arrays[0], params), NHWC)]
  out = prim.bind(*arrays, **params)
  return [(o, NHWC) for o in (out if prim.multiple_results else [out])]


def _is_relu(eqn: Equation) -> bool:
  """max(x, 0) with a literal zero: a ReLU."""
  variables = [i for i in eqn.inputs if i[0] == "var"]
  zeros = [i for i in eqn.inputs if i[0] == "literal" and i[1] == 0.0]
  return eqn.primitive == "max" and len(variables) == 1 and len(zeros) == 1


def _relus_into_max_pools(graph: Graph) -> set[int]:
  """The output variables of ReLUs used only by one max pooling, which then applies the ReLU itself: max pooling
  and ReLU commute, so the pooled ReLU is the ReLU of the pooled values, and the pass over the unpooled
  activation is saved."""
  deferred = set()
  for eqn in graph.equations:
    if _is_relu(eqn) and eqn.outputs[0] != graph.output:
      users = graph.consumers(eqn.outputs[0])
      if len(users) == 1 and users[0].primitive == "reduce_window_max":
        deferred.add(eqn.outputs[0])
  return deferred


def _layers_into_max_pools(graph: Graph, deferred: set[int]) -> dict[int, tuple[Equation, dict]]:
  """Layer outputs whose only use is a ReLU deferred into a max pooling over (h, w): output variable ->
  (the pooling equation, its parameters). The layer may then compute the pooled map itself."""
  fusable = {}
  for pool in graph.equations:
    if pool.primitive != "reduce_window_max" or pool.inputs[0][0] != "var" or pool.inputs[0][1] not in deferred:
      continue
    relu = next(e for e in graph.equations if e.outputs[0] == pool.inputs[0][1])
    source = next(i for i in relu.inputs if i[0] == "var")[1]
    layer = next((e for e in graph.equations if source in e.outputs), None)
    if layer is None or layer.primitive != "layer" or len(graph.consumers(source)) != 1 or source == graph.output:
      continue
    if _pooling(pool.params, relu=True) is not None:
      fusable[source] = (pool, relu)
  return fusable


@dataclasses.dataclass(frozen=True)
class Epilogue:
  """What a layer may apply to its outputs as it stores them: the residual added (``residual``, a graph input
  reference, or None), then the ReLU (``relu``); ``output`` is the variable that then holds the result, ``skipped``
  the equations' outputs it stands for, ``hoisted`` an equation computing the residual that runs first."""
  output: int
  residual: tuple | None
  relu: bool
  skipped: tuple[int, ...]
  hoisted: Equation | None


def _layers_into_epilogues(graph: Graph, deferred: set[int], pooled: dict) -> dict[int, Epilogue]:
  """Layer outputs used only by a residual addition and/or a ReLU after it (a ResNet block's end: conv2, the
  shortcut's addition, the ReLU; or a layer and its ReLU): output variable -> :class:`Epilogue`. The other
  operand of the addition must exist before the layer runs, or be computed by a layer equation whose input
  does (a ResNet shortcut convolution, hoisted to run first). ReLUs deferred into max poolings are left to
  them (:func:`_relus_into_max_pools`)."""
  order = {e.outputs[0]: i for i, e in enumerate(graph.equations)}
  epilogues = {}
  for index, layer in enumerate(graph.equations):
    source = layer.outputs[0]
    if layer.primitive != "layer" or source in pooled or source == graph.output:
      continue
    users = graph.consumers(source)
    if len(users) != 1:
      continue
    user, residual, hoisted, skipped = users[0], None, None, []
    if user.primitive == "add" and len(user.inputs) == 2 and user.inputs.count(("var", source)) == 1:
      other = next(i for i in user.inputs if i != ("var", source))
      if other[0] == "var" and other[1] != graph.input:
        made = graph.equations[order[other[1]]]
        if order[other[1]] > index:  # computed after the layer: hoist it if it is a layer on an earlier value
          ready = [i for i in made.inputs if i[0] == "var" and (i[1] == graph.input or order[i[1]] < index)]
          if made.primitive != "layer" or len(ready) != len(made.inputs):
            continue
          hoisted = made
      residual = other
      skipped.append(user.outputs[0])
      end = user.outputs[0]
      if end == graph.output:
        epilogues[source] = Epilogue(end, residual, False, tuple(skipped), hoisted)
        continue
      users = graph.consumers(end)
      if len(users) != 1:
        epilogues[source] = Epilogue(end, residual, False, tuple(skipped), hoisted)
        continue
      user = users[0]
    if _is_relu(user) and user.outputs[0] not in deferred:
      skipped.append(user.outputs[0])
      epilogues[source] = Epilogue(user.outputs[0], residual, True, tuple(skipped), hoisted)
    elif residual is not None:
      epilogues[source] = Epilogue(skipped[-1], residual, False, tuple(skipped), hoisted)
  return epilogues


def _run_with_epilogue(eqn: Equation, value: Value, epilogue: Epilogue, layer_fn: LayerFn, env: dict,
                       read: Callable, done: set) -> bool:
  """Runs layer ``eqn`` with its ``epilogue`` where ``layer_fn`` can (its hoisted residual layer first);
  False where it cannot (the layer then runs alone)."""
  if epilogue.hoisted is not None and epilogue.hoisted.outputs[0] not in env:
    hoisted = epilogue.hoisted
    env[hoisted.outputs[0]] = layer_fn(hoisted.params["name"], read(hoisted.inputs[0]))
    done.add(hoisted.outputs[0])
  residual = read(epilogue.residual) if epilogue.residual is not None else None
  result = layer_fn(eqn.params["name"], value, residual=residual, relu=epilogue.relu)
  if result is None:
    return False
  env[epilogue.output] = result
  done.update(epilogue.skipped)
  return True


def run(graph: Graph, layer_fn: LayerFn, x: jax.Array, consts: dict[str, jax.Array] | None = None) -> jax.Array:
  """Evaluates ``graph`` on NHWC images ``x`` (traceable); ``layer_fn(name, value)`` runs each layer.

  Args:
    graph: the traced forward pass.
    layer_fn: maps a layer's name and input (array, layout) to its output (array, layout); see :data:`LayerFn`
      for the pooling it may be offered.
    x: (batch, h, w, c) images.
    consts: the graph's constants as device arrays (defaults to ``graph.consts``).
  Returns:
    The model's output (logits).
  """
  consts = graph.consts if consts is None else consts
  batch = x.shape[0]
  env: dict[int, Value] = {graph.input: (x, NHWC)}

  def read(ref) -> Value:
    kind = ref[0]
    if kind == "var":
      return env[ref[1]]
    if kind == "const":
      return jnp.asarray(consts[ref[1]]), NHWC
    return jnp.asarray(ref[1], ref[2]), NHWC

  deferred = _relus_into_max_pools(graph)
  fusable = _layers_into_max_pools(graph, deferred)
  epilogues = _layers_into_epilogues(graph, deferred, fusable)
  done = set()  # outputs of a ReLU and a pooling that the layer before them computed
  for eqn in graph.equations:
    if eqn.outputs[0] in done:
      continue
    args = [read(i) for i in eqn.inputs]
    if eqn.primitive == "layer" and eqn.outputs[0] in epilogues:
      if _run_with_epilogue(eqn, args[0], epilogues[eqn.outputs[0]], layer_fn, env, read, done):
        continue
    if eqn.outputs[0] in deferred:  # a ReLU that the max pooling after it applies
      env[eqn.outputs[0]] = next(a for a, i in zip(args, eqn.inputs) if i[0] == "var")
      continue
    if eqn.primitive == "layer" and eqn.outputs[0] in fusable:
      pool, relu = fusable[eqn.outputs[0]]
      pooling = _pooling({k: _decode(v, batch) for k, v in pool.params.items()}, relu=True)
      pooled = layer_fn(eqn.params["name"], args[0], pooling=pooling)
      if pooled is not None:  # the layer, its ReLU and the pooling in one step
        env[pool.outputs[0]] = pooled
        done.update((relu.outputs[0], pool.outputs[0]))
        continue
    if eqn.primitive == "layer":
      results = [layer_fn(eqn.params["name"], args[0])]
    else:
      params = {k: _decode(v, batch) for k, v in eqn.params.items()}
      relu = eqn.primitive == "reduce_window_max" and eqn.inputs[0][0] == "var" and eqn.inputs[0][1] in deferred
      results = _apply(eqn.primitive, params, args, relu=relu)
    env.update(zip(eqn.outputs, results))
  return as_layout(env[graph.output], NHWC)
