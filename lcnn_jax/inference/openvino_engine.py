"""An exported model on OpenVINO: the dense baseline a user who deploys on Intel's CPU runtime would time.

OpenVINO reads the model's ONNX form (:mod:`lcnn_jax.inference.onnx_export`, the graph ONNX Runtime runs; an
LCNN's lookup layers in the forms :func:`choose_lookup_forms` measures on OpenVINO itself, or as given), its batch
fixed, and compiles it for the CPU with ``threads`` inference threads and the performance hint OpenVINO
prescribes for the batch: ``LATENCY`` at batch 1 (one stream, every thread on the image), ``THROUGHPUT`` above
(the streams OpenVINO chooses, the batch split into one request per stream, run at once). It computes in the
device's default inference precision (bf16 on a CPU with AMX or AVX-512 BF16, else f32) or, asked, in f32;
:attr:`OpenVinoEngine.precision` says which, read back from the compiled model. Every engine checks its logits
against the model's before it is used. OpenVINO is imported only here (``pip install -e '.[openvino]'``).
"""

from __future__ import annotations

import importlib
import io
from typing import Callable, Mapping

import numpy as np

from lcnn_jax.inference import onnx_export

PRECISIONS = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
"""OpenVINO's names of the inference precisions -> this package's (``float32``, ``bfloat16``, ...)."""


class OpenVinoUnavailable(ImportError):
  """OpenVINO is not installed."""


class LogitsMismatch(RuntimeError):
  """The engine's logits differ from the model's beyond its precision's tolerance."""


def require_openvino():
  """The ``openvino`` module, or :class:`OpenVinoUnavailable` with the fix."""
  try:
    return importlib.import_module("openvino")
  except ImportError as e:
    raise OpenVinoUnavailable(f"openvino is not installed ({e}); the OpenVINO baseline needs it: pip install -e "
                              "'.[openvino]' (or pip install openvino).") from None


def tolerance(precision: str) -> float:
  """The largest logit error an engine computing in ``precision`` may show, as a fraction of the largest logit:
  1e-4 in f32 (a different order of summation), 5e-2 below (bf16 keeps 8 bits of mantissa: 0.4% per rounding)."""
  return 1e-4 if precision == "f32" else 5e-2


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


class OpenVinoEngine:
  """An exported model (the dense CNN, or an LCNN in its ONNX forms) on OpenVINO's CPU plugin, called like an
  :class:`~lcnn_jax.inference.model.InferenceModel` on NHWC images; returns logits as NumPy.

  ``precision``: None for the device's default inference precision, or an OpenVINO precision name (``"f32"``) to
  force. ``lookup_forms``: the ONNX form of each lookup layer of an LCNN (``"dense"``, ``"factored"``, one per
  layer, or ``"auto"`` to measure them on OpenVINO at this batch and precision: :func:`choose_lookup_forms`);
  :attr:`lookup_forms` holds the forms used. :attr:`precision` is the one it computes in (``"bf16"``, ``"f32"``,
  ...), :attr:`hint` the performance hint and :attr:`requests` how many requests one call's batch is split into.
  The images are converted to NCHW once, outside the timed calls, as an OpenVINO user would feed them.

  Raises:
    OpenVinoUnavailable: where OpenVINO is not installed.
    LogitsMismatch: where its logits on random images differ from ``model``'s beyond :func:`tolerance`.
  """

  def __init__(self, model, batch: int, threads: int, precision: str | None = None,
               lookup_forms: Mapping[str, str] | str = "dense"):
    ov = require_openvino()
    core = ov.Core()
    self.lookup_form_ms: dict[str, dict[str, float]] = {}
    if lookup_forms == "auto":
      lookup_forms, self.lookup_form_ms = choose_lookup_forms(model, batch, threads, precision)
    self.lookup_forms = dict(lookup_forms) if not isinstance(lookup_forms, str) else {
        name: lookup_forms for name in model.lookup_layers}
    graph = core.read_model(io.BytesIO(onnx_export.to_onnx(model, self.lookup_forms).SerializeToString()))
    h, w, c = model.input_shape
    self.hint = "LATENCY" if batch == 1 else "THROUGHPUT"
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": self.hint}
    if precision is not None:
      config["INFERENCE_PRECISION_HINT"] = precision
    self.requests = 1
    graph.reshape({onnx_export.INPUT_NAME: [batch, c, h, w]})
    compiled = core.compile_model(graph, "CPU", config)
    streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    if streams > 1:  # one request per stream, each a slice of the batch; as many streams as slices
      self.requests = _largest_divisor(batch, streams)
      graph.reshape({onnx_export.INPUT_NAME: [batch // self.requests, c, h, w]})
      compiled = core.compile_model(graph, "CPU", {**config, "PERFORMANCE_HINT_NUM_REQUESTS": self.requests})
    self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    self._ov, self._compiled = ov, compiled
    self._infer = [compiled.create_infer_request() for _ in range(self.requests)]
    self._images = None
    self._check(model, batch)

  @property
  def dtype(self) -> str:
    """:attr:`precision` in this package's words (``float32``, ``bfloat16``, ...)."""
    return PRECISIONS.get(self.precision, self.precision)

  def _check(self, model, batch: int) -> None:
    h, w, c = model.input_shape
    images = np.random.default_rng(0).standard_normal((batch, h, w, c)).astype(np.float32)
    expected, got = np.asarray(model(images)), self(images)
    scale = float(np.abs(expected).max()) or 1.0
    error = float(np.abs(got - expected).max()) / scale
    allowed = tolerance(self.precision)
    if not error <= allowed:
      raise LogitsMismatch(f"OpenVINO ({self.precision}, {self.hint}, batch {batch}) computes logits that differ "
                           f"from the exported model's by {error:.2g} of the largest logit ({scale:.3g}), beyond "
                           f"the {allowed:g} allowed in {self.precision}: the ONNX graph or OpenVINO "
                           f"{self._ov.__version__} is wrong; report it with this message.")

  def __call__(self, images) -> np.ndarray:
    if self._images is None or self._images[0] is not images:
      nchw = np.transpose(np.asarray(images, np.float32), (0, 3, 1, 2)).copy()  # (batch, c, h, w), writable
      for request, part in zip(self._infer, np.split(nchw, self.requests)):
        request.set_input_tensor(self._ov.Tensor(part, shared_memory=True))
      self._images = (images, nchw)  # the tensors share its memory
    if self.requests == 1:
      self._infer[0].infer()
      return self._infer[0].get_output_tensor(0).data.copy()
    for request in self._infer:
      request.start_async()
    for request in self._infer:
      request.wait()
    return np.concatenate([request.get_output_tensor(0).data for request in self._infer])


def layer_compiler(threads: int, precision: str | None = None) -> Callable:
  """``compile(proto, batch)`` -> a callable on NCHW inputs running ``proto`` (one layer's ONNX model, batch
  free) on OpenVINO's CPU plugin at that batch, with ``threads`` threads, the hint :class:`OpenVinoEngine` uses
  for the batch and its ``precision`` (None: the device's default); for
  :func:`lcnn_jax.inference.onnx_export.time_lookup_forms`."""
  ov = require_openvino()
  core = ov.Core()

  def compile_layer(proto, batch: int) -> Callable:
    graph = core.read_model(io.BytesIO(proto.SerializeToString()))
    shape = [batch, *(d.get_length() for d in list(graph.input().get_partial_shape())[1:])]
    graph.reshape({onnx_export.INPUT_NAME: shape})
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY" if batch == 1 else "THROUGHPUT"}
    if precision is not None:
      config["INFERENCE_PRECISION_HINT"] = precision
    request = core.compile_model(graph, "CPU", config).create_infer_request()

    def run(x):
      request.infer({0: x})
      return request.get_output_tensor(0).data
    return run
  return compile_layer


def choose_lookup_forms(model, batch: int, threads: int, precision: str | None = None
                 ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
  """The faster ONNX form of each lookup layer of ``model`` on OpenVINO at ``batch`` and ``precision`` (None:
  the device's default), each layer timed alone; and the times (ms) seen."""
  return onnx_export.choose_lookup_forms(model, batch, threads=threads, engine="OpenVINO",
                                         compile_layer=layer_compiler(threads, precision))
