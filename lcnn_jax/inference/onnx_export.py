"""An exported model as an ONNX graph, for ONNX Runtime or any other ONNX engine.

:func:`to_onnx` translates an :class:`~lcnn_jax.inference.model.InferenceModel` — the traced graph of
:mod:`lcnn_jax.inference.graph` and its layers, BatchNorm already folded — so the ``.npz`` file and the ONNX
file come from one representation. The ONNX model takes NCHW float32 images (``images``, batch size free) and
returns ``logits``; it uses opset :data:`OPSET` and standard operators only. Activations stay NCHW between
convolutions and pooling; an operation that needs the model's own NHWC view (a reshape of a feature map, say)
gets a transpose first.

ONNX has no lookup operator, so each lookup layer becomes one of :data:`LOOKUP_FORMS`:

* ``dense``: one convolution with the reconstructed kernel W = D·P (kh, kw, m, n);
* ``factored``: the 1×1 convolution with the dictionary D (m -> k), then the convolution with the coefficients
  P (kh, kw, k -> n), P's zeros stored as zeros.

``auto`` times both forms of each layer alone on ONNX Runtime at the export's batch size and keeps the faster
(:func:`choose_lookup_forms`). ``onnx`` and ``onnxruntime`` (the ``onnx`` extra) are imported only here.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax import export as jax_export
from jax.extend.core import primitives as jax_primitives

from lcnn_jax.inference import graph as graph_lib
from lcnn_jax.inference.model import InferenceModel
from lcnn_jax.inference.records import AffineLayer, ConvLayer, LinearLayer, LookupLayer

OPSET = 17
LOOKUP_FORMS = ("dense", "factored")
INPUT_NAME, OUTPUT_NAME = "images", "logits"

_NCHW, _NHWC = "nchw", "nhwc"
_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}  # logical (NHWC) axis -> its axis in NCHW
_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "neg": "Neg",
                "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh", "logistic": "Sigmoid", "abs": "Abs",
                "erf": "Erf", "floor": "Floor", "ceil": "Ceil", "sign": "Sign"}
_IDENTITY = frozenset({"copy", "stop_gradient"})
_REDUCTIONS = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}


class OnnxUnavailable(ValueError):
  """``onnx`` or ``onnxruntime`` is not installed."""


def require(module: str = "onnx"):
  """Imports ``onnx`` or ``onnxruntime``, or raises :class:`OnnxUnavailable` with the command that installs it."""
  try:
    if module == "onnx":
      import onnx
      return onnx
    import onnxruntime
    return onnxruntime
  except ImportError as e:
    raise OnnxUnavailable(f"{module} is not installed ({e}); ONNX export and ONNX Runtime need the onnx extra: "
                          "pip install -e '.[onnx]' (or pip install onnx onnxruntime).") from None


# Building the graph --------------------------------------------------------------------------------------

class _Builder:
  """Collects nodes and initializers with unique names."""

  def __init__(self):
    self.onnx = require("onnx")
    self.nodes: list = []
    self.initializers: list = []
    self.count = 0

  def name(self, hint: str) -> str:
    self.count += 1
    return f"{hint.replace('/', '.')}:{self.count}"

  def const(self, value: np.ndarray, hint: str = "const") -> str:
    name = self.name(hint)
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: Sequence[str], hint: str, **attributes) -> str:
    output = self.name(hint)
    self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [output], name=output, **attributes))
    return output


class _Value:
  """An activation: its ONNX tensor, its layout (NCHW or NHWC for 4-D arrays, None otherwise) and its logical
  (model-side, NHWC) shape with a symbolic batch."""

  def __init__(self, tensor: str, layout: str | None, shape: tuple, dtype: np.dtype):
    self.tensor, self.layout, self.shape, self.dtype = tensor, layout, tuple(shape), np.dtype(dtype)
    self.views: dict[str, str] = {}  # layout -> tensor, transposes already emitted


def _in_layout(b: _Builder, value: _Value, layout: str | None) -> str:
  """``value``'s tensor in ``layout`` (4-D values only), transposing once per value."""
  if value.layout is None or layout is None or value.layout == layout:
    return value.tensor
  if layout not in value.views:
    perm = _TO_NCHW if layout == _NCHW else _TO_NHWC
    value.views[layout] = b.node("Transpose", [value.tensor], "transpose", perm=list(perm))
  return value.views[layout]


def _conv_pads(padding) -> list[int]:
  """((top, bottom), (left, right)) -> ONNX pads [top, left, bottom, right]."""
  (top, bottom), (left, right) = padding
  return [int(top), int(left), int(bottom), int(right)]


def _conv(b: _Builder, x: str, kernel: np.ndarray, bias: np.ndarray | None, strides, padding, hint: str) -> str:
  """An NCHW convolution with an HWIO ``kernel`` (kh, kw, m, n)."""
  weight = b.const(np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)), np.float32), f"{hint}/kernel")
  inputs = [x, weight] + ([b.const(np.asarray(bias, np.float32), f"{hint}/bias")] if bias is not None else [])
  return b.node("Conv", inputs, hint, kernel_shape=list(kernel.shape[:2]), strides=[int(s) for s in strides],
                pads=_conv_pads(padding))


def _matmul(b: _Builder, x: str, kernel: np.ndarray, bias: np.ndarray | None, rank: int, hint: str) -> str:
  """x (..., m) @ kernel (m, n) + bias: Gemm for 2-D inputs, MatMul then Add otherwise."""
  weight = b.const(np.asarray(kernel, np.float32), f"{hint}/kernel")
  if bias is None:
    return b.node("MatMul", [x, weight], hint)
  if rank == 2:
    return b.node("Gemm", [x, weight, b.const(np.asarray(bias, np.float32), f"{hint}/bias")], hint)
  return b.node("Add", [b.node("MatMul", [x, weight], hint), b.const(np.asarray(bias, np.float32), f"{hint}/bias")],
                hint)


def _lookup(b: _Builder, layer: LookupLayer, value: _Value, form: str, hint: str) -> str:
  """A lookup layer on an NCHW map or (batch, m) features, in ``form`` (see :data:`LOOKUP_FORMS`)."""
  padding = tuple((p, p) for p in layer.padding)
  if len(value.shape) == 2:  # a LookupDense on flat features: kernel 1×1
    if form == "dense":
      return _matmul(b, value.tensor, layer.dense_kernel()[0, 0], layer.bias, 2, hint)
    looked_up = _matmul(b, value.tensor, layer.dictionary, None, 2, f"{hint}/dictionary")  # (batch, k)
    return _matmul(b, looked_up, layer.coefficients()[0, 0], layer.bias, 2, f"{hint}/coefficients")
  x = _in_layout(b, value, _NCHW)
  if form == "dense":
    return _conv(b, x, layer.dense_kernel(), layer.bias, layer.strides, padding, hint)
  # S = I * D: (batch, k, h, w); zero padding of S is the padding of I, as D has no bias.
  looked_up = _conv(b, x, layer.dictionary[None, None], None, (1, 1), ((0, 0), (0, 0)), f"{hint}/dictionary")
  return _conv(b, looked_up, layer.coefficients(), layer.bias, layer.strides, padding, f"{hint}/coefficients")


def _layer(b: _Builder, name: str, layer, value: _Value, form: str | None) -> _Value:
  """One layer of the model on ``value``; 4-D results are NCHW."""
  shape = value.shape
  if isinstance(layer, LookupLayer):
    if len(shape) == 2:
      return _Value(_lookup(b, layer, value, form, name), None, (shape[0], layer.out_features), np.float32)
    return _Value(_lookup(b, layer, value, form, name), _NCHW, (shape[0], *layer.output_size, layer.out_features),
                  np.float32)
  if isinstance(layer, ConvLayer):
    kh, kw, _, n = layer.kernel.shape
    size = [(s + lo + hi - k) // st + 1 for s, (lo, hi), k, st in zip(shape[1:3], layer.padding, (kh, kw),
                                                                      layer.strides)]
    out = _conv(b, _in_layout(b, value, _NCHW), layer.kernel, layer.bias, layer.strides, layer.padding, name)
    return _Value(out, _NCHW, (shape[0], *size, n), np.float32)
  if isinstance(layer, LinearLayer):
    n = layer.kernel.shape[1]
    if len(shape) == 4:  # over the channels of a map: a 1×1 convolution
      out = _conv(b, _in_layout(b, value, _NCHW), layer.kernel[None, None], layer.bias, (1, 1), ((0, 0), (0, 0)),
                  name)
      return _Value(out, _NCHW, (*shape[:3], n), np.float32)
    return _Value(_matmul(b, value.tensor, layer.kernel, layer.bias, len(shape), name), None, (*shape[:-1], n),
                  np.float32)
  if isinstance(layer, AffineLayer):
    c = layer.scale.shape[0]
    channel_shape = (c, 1, 1) if value.layout == _NCHW else (c,)
    scaled = b.node("Mul", [value.tensor, b.const(layer.scale.reshape(channel_shape), f"{name}/scale")], name)
    out = b.node("Add", [scaled, b.const(layer.shift.reshape(channel_shape), f"{name}/shift")], name)
    return _Value(out, value.layout, shape, np.float32)
  raise graph_lib.UnsupportedModel(f"Layer {name!r} of type {type(layer).__name__} has no ONNX form.")


# Primitives ----------------------------------------------------------------------------------------------

def _abstract(values: list[Any]) -> list[Any]:
  return [jax.ShapeDtypeStruct(v.shape, v.dtype) if isinstance(v, _Value) else v for v in values]


def _output_aval(primitive: str, params: dict, args: list[Any]) -> jax.ShapeDtypeStruct:
  prim = getattr(jax_primitives, f"{primitive}_p")
  return jax.eval_shape(lambda *a: prim.bind(*a, **params), *_abstract(args))


def _is_batch(dim) -> bool:
  return not isinstance(dim, (int, np.integer))


def _window(b: _Builder, primitive: str, value: _Value, params: dict, hint: str) -> str:
  window, strides, padding = params["window_dimensions"], params["window_strides"], params["padding"]
  dilated = any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
  over_batch_or_channels = (window[0], window[3], strides[0], strides[3]) != (1, 1, 1, 1) or any(
      padding[a] != (0, 0) for a in (0, 3))
  if len(value.shape) != 4 or dilated or over_batch_or_channels:
    raise graph_lib.UnsupportedModel(f"{primitive} with window {window}, strides {strides}, padding {padding}: "
                                     "ONNX export supports undilated pooling over (h, w) of 4-D maps only.")
  x = _in_layout(b, value, _NCHW)
  attributes = dict(kernel_shape=list(window[1:3]), strides=list(strides[1:3]),
                    pads=_conv_pads(padding[1:3]))
  if primitive == "reduce_window_max":
    return b.node("MaxPool", [x], hint, **attributes)
  average = b.node("AveragePool", [x], hint, count_include_pad=1, **attributes)  # zero padding, as the sum's
  return b.node("Mul", [average, b.const(np.float32(window[1] * window[2]))], hint)


def _reduction(b: _Builder, primitive: str, value: _Value, axes: Sequence[int], hint: str) -> str:
  """A reduction over logical ``axes``; the result in the logical order of the kept axes."""
  layout = value.layout
  physical = sorted(_NCHW_AXIS[a] for a in axes) if layout == _NCHW else sorted(axes)
  op = _REDUCTIONS[primitive]
  if op == "ReduceSum":  # opset 13+: axes as an input; ReduceMax/Min take them as an attribute until opset 18
    out = b.node(op, [value.tensor, b.const(np.asarray(physical, np.int64), "axes")], hint, keepdims=0)
  else:
    out = b.node(op, [value.tensor], hint, axes=physical, keepdims=0)
  kept = [a for a in range(len(value.shape)) if a not in axes]
  if layout == _NCHW and len(kept) > 1:
    order = sorted(kept, key=lambda a: _NCHW_AXIS[a])  # the kept axes as the result holds them
    perm = [order.index(a) for a in kept]
    if perm != sorted(perm):
      out = b.node("Transpose", [out], "transpose", perm=perm)
  return out


def _reshape(b: _Builder, value: _Value, new_sizes: Sequence, hint: str) -> str:
  batch_positions = [i for i, d in enumerate(new_sizes) if _is_batch(d)]
  if len(batch_positions) > 1:
    raise graph_lib.UnsupportedModel(f"reshape to {new_sizes}: the batch size appears twice.")
  target = [int(d) if not _is_batch(d) else (0 if i == 0 else -1) for i, d in enumerate(new_sizes)]
  spatial = value.shape[1:3] if len(value.shape) == 4 else ()
  # A map of 1×1 holds the same values in the same order in NCHW and NHWC: no transpose needed.
  layout = value.layout if tuple(spatial) == (1, 1) else _NHWC
  return b.node("Reshape", [_in_layout(b, value, layout), b.const(np.asarray(target, np.int64), "shape")], hint)


def _operand(b: _Builder, arg: Any, layout: str | None) -> str:
  """An operand of an element-wise node: a value in ``layout``, or a constant (transposed to match)."""
  if isinstance(arg, _Value):
    return _in_layout(b, arg, layout)
  array = np.asarray(arg)
  if array.ndim == 4 and layout == _NCHW:
    array = np.transpose(array, _TO_NCHW)
  return b.const(np.ascontiguousarray(array))


def _primitive(b: _Builder, primitive: str, params: dict, args: list[Any], hint: str) -> _Value | np.ndarray:
  """One JAX primitive between layers as ONNX nodes (a constant broadcast stays a constant, broadcastable)."""
  aval = _output_aval(primitive, params, args)
  values = [a for a in args if isinstance(a, _Value)]
  if primitive in _ELEMENTWISE or primitive in _IDENTITY or primitive in ("integer_pow", "square", "rsqrt",
                                                                          "convert_element_type"):
    four_d = [v for v in values if len(v.shape) == 4]
    layout = (_NCHW if any(v.layout == _NCHW for v in four_d) else _NHWC) if four_d else None
    relu = primitive == "max" and len(values) == 1 and any(
        not isinstance(a, _Value) and np.ndim(a) == 0 and np.asarray(a) == 0 for a in args)
    operands = [_operand(b, a, layout) for a in (values if relu else args)]
    if relu:  # max(x, 0)
      out = b.node("Relu", operands, hint)
    elif primitive in _ELEMENTWISE:
      out = b.node(_ELEMENTWISE[primitive], operands, hint)
    elif primitive in _IDENTITY:
      out = b.node("Identity", operands, hint)
    elif primitive == "convert_element_type":
      out = b.node("Cast", operands, hint, to=b.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype)))
    elif primitive == "rsqrt":
      out = b.node("Reciprocal", [b.node("Sqrt", operands, hint)], hint)
    elif primitive == "square" or (primitive == "integer_pow" and params["y"] == 2):
      out = b.node("Mul", [operands[0], operands[0]], hint)
    else:
      out = b.node("Pow", [operands[0], b.const(np.asarray(params["y"], aval.dtype))], hint)
    return _Value(out, layout if len(aval.shape) == 4 else None, aval.shape, aval.dtype)
  if primitive == "broadcast_in_dim" and not values:  # a constant, e.g. a bias: ONNX operators broadcast it
    operand, dimensions = np.asarray(args[0]), list(params["broadcast_dimensions"])
    return operand.reshape([operand.shape[dimensions.index(d)] if d in dimensions else 1
                            for d in range(len(params["shape"]))])
  if primitive == "concatenate":
    layout = _NCHW if len(aval.shape) == 4 and all(v.layout == _NCHW for v in values) else _NHWC
    axis = _NCHW_AXIS[params["dimension"]] if len(aval.shape) == 4 and layout == _NCHW else params["dimension"]
    out = b.node("Concat", [_operand(b, a, layout) for a in args], hint, axis=int(axis))
    return _Value(out, layout if len(aval.shape) == 4 else None, aval.shape, aval.dtype)
  if len(values) != 1:
    raise graph_lib.UnsupportedModel(f"The forward pass uses the primitive {primitive!r} on {len(values)} "
                                     "activations, which the ONNX export does not translate.")
  value = values[0]
  if primitive in ("reduce_window_max", "reduce_window_sum"):
    return _Value(_window(b, primitive, value, params, hint), _NCHW, aval.shape, aval.dtype)
  if primitive in _REDUCTIONS:
    out = _reduction(b, primitive, value, params["axes"], hint)
    return _Value(out, _NHWC if len(aval.shape) == 4 else None, aval.shape, aval.dtype)
  if primitive == "reshape" and params.get("dimensions") is None:
    out = _reshape(b, value, params["new_sizes"], hint)
    return _Value(out, _NHWC if len(aval.shape) == 4 else None, aval.shape, aval.dtype)
  raise graph_lib.UnsupportedModel(f"The forward pass uses the primitive {primitive!r}, which the ONNX export does "
                                   "not translate (supported: layers, element-wise arithmetic, max/average pooling "
                                   "over (h, w), sums and maxima over axes, reshapes, concatenations).")


# The model -----------------------------------------------------------------------------------------------

def to_onnx(model: InferenceModel, lookup_forms: Mapping[str, str] | str = "dense"):
  """``model`` as an ``onnx.ModelProto``: NCHW float32 ``images`` (batch, c, h, w) -> ``logits``.

  Args:
    model: an exported model (:func:`lcnn_jax.inference.export`), BatchNorm folded.
    lookup_forms: "dense" or "factored" for every lookup layer, or a form per lookup layer
      (:func:`choose_lookup_forms` measures them).
  """
  onnx = require("onnx")
  forms = _resolve_forms(model, lookup_forms)
  b = _Builder()
  batch, = jax_export.symbolic_shape(graph_lib.BATCH)
  h, w, c = model.input_shape
  env: dict[int, _Value] = {model.graph.input: _Value(INPUT_NAME, _NCHW, (batch, h, w, c), np.float32)}

  def read(ref) -> Any:
    if ref[0] == "var":
      return env[ref[1]]
    if ref[0] == "const":
      return np.asarray(model.graph.consts[ref[1]])
    return np.asarray(ref[1], ref[2])

  for eqn in model.graph.equations:
    args = [read(ref) for ref in eqn.inputs]
    if eqn.primitive == "layer":
      name = eqn.params["name"]
      env[eqn.outputs[0]] = _layer(b, name, model.layers[name], args[0], forms.get(name))
      continue
    if len(eqn.outputs) != 1:
      raise graph_lib.UnsupportedModel(f"The primitive {eqn.primitive!r} has {len(eqn.outputs)} outputs; the ONNX "
                                       "export translates single-output primitives.")
    params = {k: graph_lib._decode(v, batch) for k, v in eqn.params.items()}
    env[eqn.outputs[0]] = _primitive(b, eqn.primitive, params, args, eqn.primitive)

  result = env[model.graph.output]
  b.nodes.append(onnx.helper.make_node("Identity", [_in_layout(b, result, _NHWC)], [OUTPUT_NAME], name=OUTPUT_NAME))

  def dims(shape):
    return ["batch" if _is_batch(d) else int(d) for d in shape]

  inputs = [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, dims((batch, c, h, w)))]
  outputs = [onnx.helper.make_tensor_value_info(
      OUTPUT_NAME, onnx.helper.np_dtype_to_tensor_dtype(result.dtype), dims(result.shape))]
  proto = onnx.helper.make_model(
      onnx.helper.make_graph(b.nodes, "lcnn_jax", inputs, outputs, b.initializers),
      opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="lcnn_jax")
  metadata = {"lookup_forms": forms, "class_names": model.class_names, "preprocessing": model.preprocessing,
              "input_layout": "NCHW"}
  onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
  onnx.checker.check_model(proto, full_check=True)
  return proto


def _resolve_forms(model: InferenceModel, lookup_forms: Mapping[str, str] | str) -> dict[str, str]:
  names = list(model.lookup_layers)
  forms = {name: lookup_forms for name in names} if isinstance(lookup_forms, str) else dict(lookup_forms)
  missing = sorted(set(names) - set(forms))
  if missing:
    raise ValueError(f"lookup_forms: no form given for lookup layers {missing}.")
  bad = {name: forms[name] for name in names if forms[name] not in LOOKUP_FORMS}
  if bad:
    raise ValueError(f"lookup_forms={bad}: expected one of {', '.join(LOOKUP_FORMS)} (or 'auto' to measure).")
  return {name: forms[name] for name in names}


# Running and measuring -----------------------------------------------------------------------------------

def session(proto_or_path, threads: int | None = None):
  """An ONNX Runtime CPU session with every graph optimisation; ``threads`` intra-op threads (None: the
  runtime's default, one per physical core)."""
  ort = require("onnxruntime")
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  if threads:
    options.intra_op_num_threads = threads
  # Idle worker threads sleep instead of spinning: spinning ones keep the cores busy after each call, which slows
  # whatever runs next in the process (bench times the LCNN and XLA interleaved with this session).
  options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  if isinstance(proto_or_path, (str, os.PathLike)):
    source = os.fspath(proto_or_path)
  else:
    source = proto_or_path.SerializeToString()
  return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess, images_nhwc: np.ndarray) -> np.ndarray:
  """Logits of (batch, h, w, c) images, the layout :class:`InferenceModel` takes, through an ONNX session."""
  images = np.ascontiguousarray(np.transpose(np.asarray(images_nhwc, np.float32), _TO_NCHW))
  return sess.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _median_ms(fn, seconds: float, min_reps: int = 3) -> float:
  fn()
  times = []
  start = time.perf_counter()
  while len(times) < min_reps or (time.perf_counter() - start < seconds and len(times) < 30):
    begin = time.perf_counter()
    fn()
    times.append(time.perf_counter() - begin)
  return float(np.median(times) * 1e3)


def _one_layer_model(layer: LookupLayer, form: str):
  """A model of ``layer`` alone, in ``form``: NCHW input of the layer's own shape."""
  b = _Builder()
  onnx = b.onnx
  h, w = layer.input_size
  x = _Value(INPUT_NAME, _NCHW, ("batch", h, w, layer.in_features), np.float32)
  out = _lookup(b, layer, x, form, "layer")
  b.nodes.append(onnx.helper.make_node("Identity", [out], [OUTPUT_NAME]))
  inputs = [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT,
                                               ["batch", layer.in_features, h, w])]
  outputs = [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, None)]
  return onnx.helper.make_model(onnx.helper.make_graph(b.nodes, "layer", inputs, outputs, b.initializers),
                                opset_imports=[onnx.helper.make_opsetid("", OPSET)])


def time_lookup_forms(layer: LookupLayer, batch_size: int, *, threads: int | None = None,
                      seconds: float = 0.5, compile_layer: Callable[[Any, int], Callable] | None = None
                      ) -> dict[str, float]:
  """Median milliseconds of ``layer`` alone in each of :data:`LOOKUP_FORMS` on ONNX Runtime, or on the engine
  ``compile_layer(proto, batch_size)`` builds (a callable on the layer's NCHW input, e.g.
  :func:`lcnn_jax.inference.openvino_engine.layer_compiler`'s)."""
  h, w = layer.input_size
  x = np.random.default_rng(0).standard_normal((batch_size, layer.in_features, h, w)).astype(np.float32)
  if compile_layer is None:
    def compile_layer(proto, _):
      sess = session(proto, threads)
      return lambda images: sess.run([OUTPUT_NAME], {INPUT_NAME: images})
  times = {}
  for form in LOOKUP_FORMS:
    run_layer = compile_layer(_one_layer_model(layer, form), batch_size)
    times[form] = _median_ms(lambda: run_layer(x), seconds)
  return times


def choose_lookup_forms(model: InferenceModel, batch_size: int, *, threads: int | None = None,
                        compile_layer: Callable[[Any, int], Callable] | None = None, engine: str = "ONNX Runtime"
                        ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
  """The faster form of each lookup layer at ``batch_size`` on ONNX Runtime (or on the ``engine`` that
  ``compile_layer`` builds, see :func:`time_lookup_forms`), and the times (ms) it saw."""
  forms, timings = {}, {}
  for name, layer in model.lookup_layers.items():
    timings[name] = time_lookup_forms(layer, batch_size, threads=threads, compile_layer=compile_layer)
    forms[name] = min(timings[name], key=timings[name].get)
    logging.info("%s: lookup layer %s at batch %d: %s (%s).", engine, name, batch_size, forms[name],
                 ", ".join(f"{k} {v:.3f} ms" for k, v in timings[name].items()))
  return forms, timings


def save(model: InferenceModel, path: str | os.PathLike, *, lookup_forms: Mapping[str, str] | str = "auto",
         batch_size: int = 1) -> dict[str, str]:
  """Writes ``model`` as an ONNX file; ``lookup_forms="auto"`` measures each lookup layer's forms at
  ``batch_size`` first. Returns the form of each lookup layer."""
  if lookup_forms == "auto":
    lookup_forms, _ = choose_lookup_forms(model, batch_size)
  forms = _resolve_forms(model, lookup_forms)
  proto = to_onnx(model, forms)
  path = os.fspath(path)
  partial = f"{path}.partial"
  with open(partial, "wb") as f:
    f.write(proto.SerializeToString())
  os.replace(partial, path)
  logging.info("Exported %d layers to %s (%.1f MB, ONNX opset %d).", len(model.layers), path,
               os.path.getsize(path) / 1e6, OPSET)
  return forms
