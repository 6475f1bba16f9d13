"""A model's eval-mode forward pass as a small graph stored as JSON, and the interpreter that runs it.

A :class:`Graph` is a list of :class:`Equation` s: JAX primitives with plain parameters (ReLU, pooling, residual
additions, reshapes, averages) between opaque *layer* equations named by the layer's path. Its parameters are JSON
values, so an exported model holds data only: running it binds the named JAX primitives again and never runs code
from the file. :mod:`lcnn_jax.inference.tracing` makes a graph from an NNX model (at export time);
:mod:`lcnn_jax.inference.passes` finds, once, which steps run together (its :class:`Fusion`), stored with it.

:func:`run` evaluates a graph. Four-dimensional activations may be held channels-first in batch tiles (the
lookup kernels' layouts, :mod:`lcnn_jax.inference.layouts`) instead of NHWC: element-wise primitives, pooling
windows and reductions run on whichever layout their input has, with their axes mapped, so a chain of lookup
layers with ReLU and pooling between them never transposes its activations; any other primitive gets NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as jax_primitives

from lcnn_jax.inference import backends as backends_lib
from lcnn_jax.inference import layouts
from lcnn_jax.inference.layouts import NHWC, Layout

BATCH = "b"
"""The symbol standing for the batch size in traced shapes and parameters."""

ELEMENTWISE = frozenset({
    "abs", "add", "and", "ceil", "clamp", "convert_element_type", "copy", "div", "eq", "erf", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "integer_pow", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "not", "or", "pow", "round", "rsqrt", "select_n", "sign", "sqrt", "square", "stop_gradient",
    "sub", "tanh"})
REDUCTIONS = frozenset({"reduce_max", "reduce_min", "reduce_prod", "reduce_sum"})


class UnsupportedModel(ValueError):
  """The model's forward pass uses something the graph cannot store."""


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
class Epilogue:
  """What a layer may apply to its outputs as it stores them: the residual added (``residual``, an equation
  input reference, or None), then the ReLU (``relu``). ``output`` is the variable that then holds the result,
  ``skipped`` the equations' outputs it stands for, ``hoisted`` the output of a layer equation computing the
  residual that runs first (a ResNet shortcut convolution), or None."""
  output: int
  residual: tuple | None
  relu: bool
  skipped: tuple[int, ...]
  hoisted: int | None

  def to_json(self) -> dict:
    return {"output": self.output, "residual": None if self.residual is None else list(self.residual),
            "relu": self.relu, "skipped": list(self.skipped), "hoisted": self.hoisted}

  @classmethod
  def from_json(cls, data: dict) -> "Epilogue":
    residual = None if data["residual"] is None else tuple(data["residual"])
    return cls(data["output"], residual, data["relu"], tuple(data["skipped"]), data["hoisted"])


@dataclasses.dataclass(frozen=True)
class Fusion:
  """Steps of a graph that run together, found once at export (:func:`lcnn_jax.inference.passes.fuse`).

  ``relus_into_max_pools``: the output variables of ReLUs whose one use is a max pooling, which applies the ReLU
  itself (the two commute). ``layers_into_max_pools``: a layer's output variable -> the output variable of the
  max pooling that follows it through one of those ReLUs; the layer's backend may compute the pooled map itself.
  ``epilogues``: a layer's output variable -> the residual addition and/or ReLU it may apply as it stores its
  outputs (:class:`Epilogue`).
  """
  relus_into_max_pools: frozenset[int] = frozenset()
  layers_into_max_pools: Mapping[int, int] = dataclasses.field(default_factory=dict)
  epilogues: Mapping[int, Epilogue] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {"relus_into_max_pools": sorted(self.relus_into_max_pools),
            "layers_into_max_pools": [[k, v] for k, v in sorted(self.layers_into_max_pools.items())],
            "epilogues": [[k, v.to_json()] for k, v in sorted(self.epilogues.items())]}

  @classmethod
  def from_json(cls, data: dict) -> "Fusion":
    return cls(frozenset(data["relus_into_max_pools"]), {k: v for k, v in data["layers_into_max_pools"]},
               {k: Epilogue.from_json(v) for k, v in data.get("epilogues", [])})


@dataclasses.dataclass(frozen=True)
class Graph:
  """Equations in order, from the input variable to the output variable; constants by name; and which steps run
  together (None: each on its own, as traced)."""
  equations: tuple[Equation, ...]
  input: int
  output: int
  consts: dict[str, np.ndarray]
  fusion: Fusion | None = None

  def to_json(self) -> dict:
    data = {"input": self.input, "output": self.output, "equations": [e.to_json() for e in self.equations]}
    if self.fusion is not None:
      data["fusion"] = self.fusion.to_json()
    return data

  @classmethod
  def from_json(cls, data: dict, consts: dict[str, np.ndarray]) -> "Graph":
    fusion = Fusion.from_json(data["fusion"]) if "fusion" in data else None
    return cls(tuple(Equation.from_json(e) for e in data["equations"]), data["input"], data["output"], consts,
               fusion)

  def layer_names(self) -> list[str]:
    """The layers in the order the forward pass calls them."""
    return [e.params["name"] for e in self.equations if e.primitive == "layer"]

  def consumers(self, var: int) -> list[Equation]:
    return [e for e in self.equations if ["var", var] in [list(i) for i in e.inputs]]

  def replace(self, equations: Sequence[Equation], rename: dict[int, int]) -> "Graph":
    """The graph with new equations, every use of variable a replaced by rename[a] (and no fusion: the steps
    that run together are found again on the result)."""
    def fix(i):
      return ("var", rename.get(i[1], i[1])) if i[0] == "var" else i
    fixed = tuple(dataclasses.replace(e, inputs=tuple(fix(i) for i in e.inputs)) for e in equations)
    return Graph(fixed, self.input, rename.get(self.output, self.output), self.consts)


# Parameters ------------------------------------------------------------------------------------------------

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


# Running ---------------------------------------------------------------------------------------------------

Value = tuple[jax.Array, Layout]  # (array, layout); NHWC means the array as the model sees it
LayerFn = Callable[..., Value | None]
"""``layer_fn(name, value)`` -> the layer's output; ``layer_fn(name, value, epilogue, residual)`` -> the output
after the :class:`~lcnn_jax.inference.backends.Epilogue` (``residual``: the value it adds, or None), or None where
the layer cannot apply it itself (the graph then runs those steps)."""
MaxPoolFn = Callable[[jax.Array, backends_lib.Pooling], jax.Array | None]
"""``max_pool(x, pooling)`` -> ``pooling`` of a tiled activation (tiles, c, h, w, tile), or None to leave it to
XLA's window (:meth:`lcnn_jax.inference.backends.Backend.max_pool`)."""


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


def max_pooling(params: dict, relu: bool) -> backends_lib.Pooling | None:
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


def _apply(primitive: str, params: dict, args: list[Value], relu: bool = False,
           max_pool: MaxPoolFn | None = None) -> list[Value]:
  """Binds one primitive, on tiled operands where the primitive allows it, else on NHWC ones. ``relu``: a
  max pooling also applies the ReLU before it (see :class:`Fusion`); ``max_pool`` pools tiled activations where
  it can."""
  prim = getattr(jax_primitives, f"{primitive}_p")
  tile = next((layout for _, layout in args if layout != NHWC), None)
  if primitive == "reduce_window_max" and tile is not None and len(args) == 1 and max_pool is not None:
    pooling = max_pooling(params, relu)
    pooled = None if pooling is None else max_pool(args[0][0], pooling)
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


def is_relu(eqn: Equation) -> bool:
  """max(x, 0) with a literal zero: a ReLU."""
  variables = [i for i in eqn.inputs if i[0] == "var"]
  zeros = [i for i in eqn.inputs if i[0] == "literal" and i[1] == 0.0]
  return eqn.primitive == "max" and len(variables) == 1 and len(zeros) == 1


def _run_with_epilogue(eqn: Equation, value: Value, epilogue: Epilogue, producers: dict[int, Equation],
                       layer_fn: LayerFn, env: dict, read: Callable, done: set) -> bool:
  """Runs layer ``eqn`` with its ``epilogue`` where ``layer_fn`` can (its hoisted residual layer first);
  False where it cannot (the layer then runs alone)."""
  if epilogue.hoisted is not None and epilogue.hoisted not in env:
    hoisted = producers[epilogue.hoisted]
    env[epilogue.hoisted] = layer_fn(hoisted.params["name"], read(hoisted.inputs[0]))
    done.add(epilogue.hoisted)
  residual = read(epilogue.residual) if epilogue.residual is not None else None
  offered = backends_lib.Epilogue(residual=residual is not None, relu=epilogue.relu)
  result = layer_fn(eqn.params["name"], value, offered, residual)
  if result is None:
    return False
  env[epilogue.output] = result
  done.update(epilogue.skipped)
  return True


def run(graph: Graph, layer_fn: LayerFn, x: jax.Array, consts: dict[str, jax.Array] | None = None,
        max_pool: MaxPoolFn | None = None) -> jax.Array:
  """Evaluates ``graph`` on NHWC images ``x`` (traceable); ``layer_fn(name, value)`` runs each layer, and the
  steps of ``graph.fusion`` run together.

  Args:
    graph: the traced forward pass.
    layer_fn: maps a layer's name and input (array, layout) to its output (array, layout); see :data:`LayerFn`
      for the epilogues it may be offered.
    x: (batch, h, w, c) images.
    consts: the graph's constants as device arrays (defaults to ``graph.consts``).
    max_pool: pools tiled activations where it can (:data:`MaxPoolFn`); None: XLA's windows.
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

  fusion = graph.fusion or Fusion()
  deferred = fusion.relus_into_max_pools
  producers = {e.outputs[0]: e for e in graph.equations}
  done = set()  # outputs of a ReLU and a pooling that the layer before them computed
  for eqn in graph.equations:
    if eqn.outputs[0] in done:
      continue
    args = [read(i) for i in eqn.inputs]
    epilogue = fusion.epilogues.get(eqn.outputs[0]) if eqn.primitive == "layer" else None
    if epilogue is not None and _run_with_epilogue(eqn, args[0], epilogue, producers, layer_fn, env, read, done):
      continue
    if eqn.outputs[0] in deferred:  # a ReLU that the max pooling after it applies
      env[eqn.outputs[0]] = next(a for a, i in zip(args, eqn.inputs) if i[0] == "var")
      continue
    pooled_output = fusion.layers_into_max_pools.get(eqn.outputs[0]) if eqn.primitive == "layer" else None
    if pooled_output is not None:
      pool = producers[pooled_output]
      pooling = max_pooling({k: _decode(v, batch) for k, v in pool.params.items()}, relu=True)
      pooled = layer_fn(eqn.params["name"], args[0], backends_lib.Epilogue(pooling=pooling), None)
      if pooled is not None:  # the layer, its ReLU and the pooling in one step
        env[pooled_output] = pooled
        done.update((pool.inputs[0][1], pooled_output))
        continue
    if eqn.primitive == "layer":
      results = [layer_fn(eqn.params["name"], args[0])]
    else:
      params = {k: _decode(v, batch) for k, v in eqn.params.items()}
      relu = eqn.primitive == "reduce_window_max" and eqn.inputs[0][0] == "var" and eqn.inputs[0][1] in deferred
      results = _apply(eqn.primitive, params, args, relu=relu, max_pool=max_pool)
    env.update(zip(eqn.outputs, results))
  return as_layout(env[graph.output], NHWC)
