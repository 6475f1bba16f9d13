"""An exported model on PyTorch: the dense baseline a user who deploys with PyTorch would time.

The model's ONNX form (:mod:`lcnn_jax.inference.onnx_export`) is translated node by node into PyTorch
operations, traced once with ``torch.jit.trace``, frozen and optimised for inference (``torch.jit.freeze``,
``torch.jit.optimize_for_inference``: oneDNN convolutions, weights pre-packed), and run on channels-last NCHW
inputs. Only the operators the exporter emits are translated; anything else is named in an error. PyTorch is
imported only here, when used (``pip install torch``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

import numpy as np

from lcnn_jax.inference import onnx_export


class TorchUnavailable(ImportError):
  """PyTorch is not installed."""


def require_torch():
  """The ``torch`` module, or :class:`TorchUnavailable` with the fix."""
  try:
    return importlib.import_module("torch")
  except ImportError as e:
    raise TorchUnavailable(f"torch is not installed ({e}); the PyTorch baseline needs it: pip install torch "
                           "(a CPU build is enough).") from None


def _attributes(node) -> dict[str, Any]:
  onnx = onnx_export.require("onnx")
  return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads_nchw(pads: list[int]) -> tuple[list[int], bool]:
  """ONNX pads [top, left, bottom, right] -> (torch F.pad order [left, right, top, bottom], symmetric?)."""
  top, left, bottom, right = pads
  return [left, right, top, bottom], (top, left) == (bottom, right)


class OnnxOnTorch:
  """Builds a ``torch.nn.Module`` that computes an ONNX graph of the exporter's operators.

  Initializers become buffers; the forward pass walks the nodes in order. Tracing it records only the tensor
  operations, so the Python loop costs nothing after ``torch.jit.trace``.
  """

  def __init__(self, proto):
    torch = require_torch()
    onnx = onnx_export.require("onnx")
    functional = torch.nn.functional
    constants = {t.name: torch.from_numpy(np.array(onnx.numpy_helper.to_array(t))) for t in proto.graph.initializer}
    dtypes = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
              onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BFLOAT16: torch.bfloat16,
              onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BOOL: torch.bool}
    elementwise: dict[str, Callable] = {
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Max": torch.maximum,
        "Min": torch.minimum, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
        "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Abs": torch.abs, "Erf": torch.erf, "Floor": torch.floor,
        "Ceil": torch.ceil, "Sign": torch.sign, "Relu": torch.relu, "Reciprocal": torch.reciprocal,
        "Pow": torch.pow, "Identity": lambda x: x}
    reductions = {"ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}

    def window(x, attributes, pool: Callable, fill: float, **options):
      padding, symmetric = _pads_nchw(attributes.get("pads", [0, 0, 0, 0]))
      kernel, strides = attributes["kernel_shape"], attributes.get("strides", [1, 1])
      if symmetric:
        return pool(x, kernel, strides, padding=(padding[2], padding[0]), **options)
      return pool(functional.pad(x, padding, value=fill), kernel, strides, **options)

    def step(node, inputs: list):
      op, attributes = node.op_type, _attributes(node)
      if op in elementwise:
        return elementwise[op](*inputs)
      if op == "Conv":
        x, weight, *bias = inputs
        padding, symmetric = _pads_nchw(attributes.get("pads", [0, 0, 0, 0]))
        if not symmetric:
          x, padding = functional.pad(x, padding), [0, 0, 0, 0]
        return functional.conv2d(x, weight, bias[0] if bias else None, attributes.get("strides", [1, 1]),
                                 (padding[2], padding[0]), 1, attributes.get("group", 1))
      if op == "Gemm":
        a, b, *c = inputs
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
          raise ValueError(f"Gemm {node.name!r} with {attributes}: only A @ B (+ C) is translated.")
        weight = b if attributes.get("transB", 0) else b.t()
        return functional.linear(a, weight, c[0] if c else None)
      if op == "MatMul":
        return torch.matmul(*inputs)
      if op == "MaxPool":
        return window(inputs[0], attributes, functional.max_pool2d, float("-inf"))
      if op == "AveragePool":
        if not attributes.get("count_include_pad", 0):
          raise ValueError(f"AveragePool {node.name!r} without count_include_pad is not translated.")
        return window(inputs[0], attributes, functional.avg_pool2d, 0.0, count_include_pad=True)
      if op in reductions:
        axes = attributes.get("axes") if len(node.input) == 1 else static[node.input[1]]
        return reductions[op](inputs[0], dim=tuple(axes), keepdim=bool(attributes.get("keepdims", 1)))
      if op == "Transpose":
        return inputs[0].permute(*attributes["perm"])
      if op == "Reshape":
        x = inputs[0]
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(static[node.input[1]])]  # 0 copies the dim
        return x.reshape(target)
      if op == "Concat":
        return torch.cat(inputs, dim=attributes["axis"])
      if op == "Cast":
        return inputs[0].to(dtypes[attributes["to"]])
      raise ValueError(f"ONNX operator {op!r} (node {node.name!r}) has no PyTorch translation here.")

    nodes = list(proto.graph.node)
    for node in nodes:  # fail at build time, not inside the trace
      if node.op_type not in (*elementwise, *reductions, "Conv", "Gemm", "MatMul", "MaxPool", "AveragePool",
                              "Transpose", "Reshape", "Concat", "Cast"):
        raise ValueError(f"ONNX operator {node.op_type!r} (node {node.name!r}) has no PyTorch translation here.")
    # Shapes and axes given as inputs are constants of the graph: read once, so the trace sees Python ints.
    static = {n.input[1]: constants[n.input[1]].tolist() for n in nodes
              if n.op_type in ("Reshape", *reductions) and len(n.input) > 1}
    input_name, output_name = proto.graph.input[0].name, proto.graph.output[0].name

    class Graph(torch.nn.Module):
      """The ONNX graph as one PyTorch module."""

      def __init__(self):
        super().__init__()
        self.names = {name: f"c{i}" for i, name in enumerate(constants)}
        for name, value in constants.items():
          self.register_buffer(self.names[name], value)

      def forward(self, x):
        env = {input_name: x}
        for node in nodes:
          inputs = [env[n] if n in env else getattr(self, self.names[n])
                    for n in node.input if n and n not in static]
          env[node.output[0]] = step(node, inputs)
        return env[output_name]

    self.module = Graph().eval()


class TorchEngine:
  """The dense model on PyTorch (frozen TorchScript, oneDNN, channels-last), called like an
  :class:`~lcnn_jax.inference.model.InferenceModel` on NHWC images; returns logits as NumPy.

  The images are converted to channels-last NCHW once, outside the timed calls, as a PyTorch user would feed
  them. ``threads`` sets PyTorch's intra-op threads (a process-wide setting).
  """

  def __init__(self, model, batch: int, threads: int):
    torch = require_torch()
    self.torch = torch
    torch.set_num_threads(threads)
    h, w, c = model.input_shape
    example = torch.zeros((batch, c, h, w)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
      warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)  # still PyTorch's frozen-graph path
      traced = torch.jit.trace(OnnxOnTorch(onnx_export.to_onnx(model)).module, example, check_trace=False)
      self.module = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    self._images = None

  def __call__(self, images) -> np.ndarray:
    torch = self.torch
    if self._images is None or self._images[0] is not images:
      nchw = torch.from_numpy(np.transpose(np.asarray(images, np.float32), (0, 3, 1, 2)).copy())  # writable
      self._images = (images, nchw.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
      return self.module(self._images[1]).numpy()
