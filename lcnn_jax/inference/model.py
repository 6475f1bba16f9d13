"""An exported model in memory: its graph, its layers (BatchNorm folded), and the backend of each lookup layer.

The run-time core: it needs JAX and the records of :mod:`lcnn_jax.inference.records`, not Flax or the trainer.

:class:`InferenceModel` maps a batch of NHWC images to logits with one jitted function. Lookup layers run on
the backend chosen for them (:mod:`lcnn_jax.inference.backends`); dense convolutions and dense layers stay
as they were trained (XLA); a BatchNorm that does not directly follow a layer stays a per-channel affine map.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lcnn_jax.inference import backends as backends_lib
from lcnn_jax.inference import chain as chain_lib
from lcnn_jax.inference import graph as graph_lib
from lcnn_jax.inference import layouts
from lcnn_jax.inference.layouts import NHWC
from lcnn_jax.inference.records import AffineLayer, ConvLayer, Layer, LinearLayer, LookupLayer, layer_arrays


def _pointwise(layer: ConvLayer) -> bool:
  """Whether ``layer`` is a 1×1 convolution without padding (a matmul per pixel)."""
  return layer.kernel.shape[:2] == (1, 1) and tuple(map(tuple, layer.padding)) == ((0, 0), (0, 0))


def _matmul(layer: Layer) -> bool:
  """Whether ``layer`` is a matmul over its input's last axis (a dense layer or a pointwise convolution)."""
  return isinstance(layer, LinearLayer) or (isinstance(layer, ConvLayer) and _pointwise(layer))


def device_arrays(layer: ConvLayer | LinearLayer | AffineLayer) -> dict[str, np.ndarray]:
  """The arrays a dense layer runs with. Matmul kernels are held transposed, (n, m): XLA:CPU then reads W
  row by row on every thread (a CHWN 1×1 convolution over W as (m, n) ran 3.6× slower at batch 32, cold cache).
  A bfloat16 or int8 matmul kernel is also held as stored (``kernel_q``, (n, m), with ``kernel_scale``) for
  the C++ dense-rows kernel at a few rows (:data:`~lcnn_jax.inference.backends.DENSE_ROWS_MAX`); XLA's
  convolutions and larger matmuls run on its float32 copy."""
  arrays = layer_arrays(layer)
  arrays.pop("kernel_scale", None)
  if isinstance(layer, AffineLayer):
    return arrays
  arrays["kernel"] = layer.float_kernel()
  if _matmul(layer):
    kernel = arrays.pop("kernel")
    arrays["kernel_t"] = np.ascontiguousarray(kernel.reshape(kernel.shape[-2:]).T)
    if layer.kernel.dtype != np.float32:
      n = layer.kernel.shape[-1]
      arrays["kernel_q"] = np.ascontiguousarray(layer.kernel.reshape(-1, n).T)
      arrays["kernel_scale"] = (layer.kernel_scale if layer.kernel_scale is not None
                                else np.ones(n, np.float32)).astype(np.float32)
  return arrays


def _dense_rows(params: dict[str, jax.Array], x: jax.Array) -> jax.Array | None:
  """x (..., m) through a stored bfloat16/int8 matmul kernel in the C++ dense-rows kernel, where it has one and
  x has few rows (its weights then dominate the time); None otherwise."""
  rows = int(np.prod(x.shape[:-1]))
  if "kernel_q" not in params or rows > backends_lib.DENSE_ROWS_MAX or not backends_lib.dense_rows_available():
    return None
  y = backends_lib.dense_rows(x.reshape(rows, x.shape[-1]), params["kernel_q"], params["kernel_scale"],
                              params["bias"])
  return y.reshape(*x.shape[:-1], y.shape[-1])


def _conv(layer: ConvLayer, params: dict[str, jax.Array], value: graph_lib.Value) -> graph_lib.Value:
  array, layout = value
  (top, bottom), (left, right) = layer.padding
  sh, sw = layer.strides
  if _pointwise(layer):
    b, h, w, _ = layouts.logical_shape(array, layout)
    if "kernel_q" in params and b * -(-h // sh) * -(-w // sw) <= backends_lib.DENSE_ROWS_MAX:
      rows = _dense_rows(params, graph_lib.as_layout(value, NHWC)[:, ::sh, ::sw])  # a few rows: no transpose cost
      if rows is not None:
        return rows, NHWC
    if layout != NHWC:  # e.g. a ResNet shortcut on tiled activations: a matmul, no transpose
      y = jnp.einsum("nm,tmhwb->tnhwb", params["kernel_t"], array[:, :, ::sh, ::sw])
      return y + params["bias"][:, None, None, None], layout
    x = graph_lib.as_layout(value, NHWC)[:, ::sh, ::sw]
    return jnp.einsum("bhwm,nm->bhwn", x, params["kernel_t"]) + params["bias"], NHWC
  x = graph_lib.as_layout(value, NHWC)
  if top == bottom and left == right:
    y = backends_lib.conv_or_matmul(x, params["kernel"], (sh, sw), (top, left))
  else:
    y = jax.lax.conv_general_dilated(x, params["kernel"], (sh, sw), layer.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + params["bias"], NHWC


def _affine(params: dict[str, jax.Array], value: graph_lib.Value) -> graph_lib.Value:
  array, layout = value
  if layout != NHWC:  # (tiles, c, h, w, tile)
    return array * params["scale"][:, None, None, None] + params["shift"][:, None, None, None], layout
  return array * params["scale"] + params["shift"], NHWC


def _lookup(layer: LookupLayer, backend: backends_lib.Backend, params: dict[str, jax.Array],
            value: graph_lib.Value) -> graph_lib.Value:
  array, _ = value
  if array.ndim == 2:  # A dense lookup layer on flat features: the 1×1 case.
    y = backends_lib.apply_nhwc(backend, layer, params, array.reshape(array.shape[0], 1, 1, array.shape[1]))
    return y.reshape(array.shape[0], layer.out_features), NHWC
  return backend.apply(layer, params, *value)


def _fused(layer: LookupLayer, backend: backends_lib.Backend, params: dict[str, jax.Array], value: graph_lib.Value,
           epilogue: backends_lib.Epilogue, residual: graph_lib.Value | None) -> graph_lib.Value | None:
  """The lookup layer with ``epilogue`` applied as its backend stores the outputs, where it fuses it; else None."""
  array, layout = value
  if array.ndim == 2 or (residual is not None and residual[0].ndim != 4 and residual[1] == NHWC):
    return None
  if not backend.fuses(layer, layouts.batch_size(array, layout), epilogue):
    return None
  return backend.apply(layer, params, array, layout, epilogue, residual)


def run_layer(layer: Layer, backend: backends_lib.Backend | None, params: dict[str, jax.Array],
              value: graph_lib.Value, epilogue: backends_lib.Epilogue | None = None,
              residual: graph_lib.Value | None = None) -> graph_lib.Value | None:
  """One layer on (array, layout) -> (array, layout); ``backend`` runs a lookup layer (None for the others).

  With an ``epilogue`` (and the ``residual`` value it adds), the output after it where the layer's backend
  applies it as it stores the outputs (:meth:`~lcnn_jax.inference.backends.Backend.fuses`); else None, and the
  caller runs those steps (:data:`~lcnn_jax.inference.graph.LayerFn`).
  """
  if epilogue is not None:
    return _fused(layer, backend, params, value, epilogue, residual) if isinstance(layer, LookupLayer) else None
  if isinstance(layer, LookupLayer):
    return _lookup(layer, backend, params, value)
  if isinstance(layer, ConvLayer):
    return _conv(layer, params, value)
  if isinstance(layer, LinearLayer):
    x = graph_lib.as_layout(value, NHWC)
    rows = _dense_rows(params, x)
    if rows is not None:
      return rows, NHWC
    return jnp.einsum("...m,nm->...n", x, params["kernel_t"]) + params["bias"], NHWC
  return _affine(params, value)


def max_pool_of(used: Sequence[backends_lib.Backend]) -> graph_lib.MaxPoolFn:
  """The pooling of tiled activations for a model on the backends ``used``: the first of their
  :meth:`~lcnn_jax.inference.backends.Backend.max_pool` that pools, else None (XLA's window)."""
  def max_pool(x: jax.Array, pooling: backends_lib.Pooling) -> jax.Array | None:
    for backend in used:
      pooled = backend.max_pool(x, pooling)
      if pooled is not None:
        return pooled
    return None
  return max_pool


CONVOLUTIONS = ("default", "xla")
"""Who runs the dense convolutions XLA compiles (a dense layer, a ``dense`` or ``factored`` lookup layer):
``default`` as XLA decides (this jaxlib hands them to YNNPACK on CPU), ``xla`` XLA's own convolution emitter,
dots and reductions left to YNNPACK. Which is faster depends on the CPU and the shapes; the tuner measures both
(:func:`lcnn_jax.inference.tuning.choose_convolutions`). On an AMD EPYC Zen 4, XLA's emitter ran every
AlexNet and ResNet convolution timed 10-48% faster than YNNPACK, at batch 1 and 32
(benchmarks/convolutions_ab.py)."""

XLA_CONVOLUTION_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
"""The compiler options of ``convolutions="xla"``: YNNPACK fuses dots and reductions, not convolutions."""


@functools.cache
def xla_convolutions_available() -> tuple[bool, str]:
  """Whether ``convolutions="xla"`` compiles here (the option belongs to XLA's CPU compiler of this jaxlib),
  and why not."""
  if jax.default_backend() != "cpu":
    return False, f"the default device is {jax.default_backend()}, not the CPU"
  x, w = jnp.ones((1, 4, 4, 2), jnp.float32), jnp.ones((3, 3, 2, 2), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  try:
    jax.jit(conv, compiler_options=XLA_CONVOLUTION_OPTIONS).lower(x, w).compile()
  except Exception as error:  # pylint: disable=broad-except  # an option this jaxlib does not know
    return False, f"this jaxlib ({jax.__version__}) refuses the option: {str(error).splitlines()[0][:200]}"
  return True, ""


class InferenceModel:
  """A batch of NHWC images -> logits, with each lookup layer on its chosen backend.

  Attributes:
    graph: the forward pass.
    layers: every layer by name, in graph order.
    backends: the backend of each lookup layer, by its spec (``lookup``, ``lookup:tile=N``, ``gather``, ...).
    input_shape: one example's (h, w, c).
    class_names: the dataset's class names, when it has them.
    preprocessing: how to turn an image file into an input (``image_size``, ``resize_size``, ``channels``,
      ``mean``, ``std``), when known.
    tuning: how the backends were chosen (batch size, device, per-layer timings), when they were measured;
      its ``chain`` says whether batch 1 runs its leading layers in one kernel call (:mod:`chain`), as
      measured against a call per layer (absent: it does, where the layers allow); its ``convolutions``, who
      runs the dense convolutions (:data:`CONVOLUTIONS`; absent: ``default``).
    chain: the layers a batch of 1 runs in one kernel call, or None (a call per layer).
    convolutions: who runs the dense convolutions XLA compiles (:data:`CONVOLUTIONS`).
  """

  def __init__(self, graph: graph_lib.Graph, layers: Mapping[str, Layer], *, input_shape: Sequence[int],
               backends: Mapping[str, str] | str = "lookup", class_names: Sequence[str] | None = None,
               preprocessing: Mapping[str, Any] | None = None, tuning: Mapping[str, Any] | None = None,
               chain: bool | None = None, convolutions: str | None = None):
    """``chain``: whether batch 1 may run its leading layers in one kernel call (None: as ``tuning`` says);
    ``convolutions``: ``default`` or ``xla`` (:data:`CONVOLUTIONS`; None: as ``tuning`` says). ``xla`` where
    this jaxlib cannot compile it falls back to ``default`` with a warning."""
    self.graph = graph
    self.layers = dict(layers)
    self.input_shape = tuple(input_shape)
    self.class_names = list(class_names) if class_names is not None else None
    self.preprocessing = dict(preprocessing) if preprocessing is not None else None
    self.tuning = dict(tuning) if tuning is not None else None
    self._impls = self._resolve(backends)  # each lookup layer's backend, made once
    self.backends = {name: impl.name for name, impl in self._impls.items()}
    used = list({impl.name: impl for impl in self._impls.values()}.values())
    self._max_pool = max_pool_of(used)
    self._params: dict[str, dict[str, jax.Array]] = {}
    if chain is None:
      chain = (self.tuning or {}).get("chain", True)
    self.chain = chain_lib.plan(graph, self.layers, self._impls, self.input_shape) if chain else None
    if convolutions is None:
      convolutions = (self.tuning or {}).get("convolutions", "default")
    if convolutions not in CONVOLUTIONS:
      raise ValueError(f"convolutions={convolutions!r}: expected one of {', '.join(CONVOLUTIONS)}.")
    if convolutions == "xla":
      available, reason = xla_convolutions_available()
      if not available:
        logging.warning("convolutions='xla' is unavailable (%s); XLA runs them as it decides.", reason)
        convolutions = "default"
    self.convolutions = convolutions
    options = XLA_CONVOLUTION_OPTIONS if convolutions == "xla" else None
    self._forward = jax.jit(self._apply, compiler_options=options)

  @property
  def precision(self) -> str:
    """How the weights are stored: 'float32', 'bfloat16', 'int8', or 'mixed'."""
    dtypes = {np.dtype(array.dtype).name for layer in self.layers.values() if not isinstance(layer, AffineLayer)
              for key, array in layer_arrays(layer).items() if key in ("dictionary", "values", "kernel")}
    return dtypes.pop() if len(dtypes) == 1 else "mixed" if dtypes else "float32"

  @property
  def lookup_layers(self) -> dict[str, LookupLayer]:
    return {name: layer for name, layer in self.layers.items() if isinstance(layer, LookupLayer)}

  def _resolve(self, choice: Mapping[str, str] | str) -> dict[str, backends_lib.Backend]:
    names = list(self.lookup_layers)
    chosen = {name: choice for name in names} if isinstance(choice, str) else dict(choice)
    missing = sorted(set(names) - set(chosen))
    if missing:
      raise ValueError(f"backends: no backend given for lookup layers {missing}.")
    resolved = {}
    for name in names:
      backend = backends_lib.get_backend(chosen[name])
      ok, reason = backend.available()
      if not ok:
        logging.warning("Layer %s: backend %r is unavailable (%s); using 'gather'.", name, backend.name, reason)
        backend = backends_lib.get_backend("gather")
      resolved[name] = backend
    return resolved

  def with_backends(self, choice: Mapping[str, str] | str, *, chain: bool | None = None,
                    convolutions: str | None = None) -> "InferenceModel":
    """The same model with other backends: one name for every lookup layer, or a name per layer; ``chain``
    whether batch 1 may run in one kernel call, ``convolutions`` who runs the dense convolutions (None: as this
    model's ``tuning`` says)."""
    return InferenceModel(self.graph, self.layers, input_shape=self.input_shape, backends=choice,
                          class_names=self.class_names, preprocessing=self.preprocessing, tuning=self.tuning,
                          chain=chain, convolutions=convolutions)

  def has_convolutions(self, batch_size: int) -> bool:
    """Whether XLA compiles a dense convolution in this model at ``batch_size`` (where ``convolutions`` can
    matter)."""
    images = jax.ShapeDtypeStruct((batch_size, *self.input_shape), jnp.float32)
    return "convolution(" in jax.jit(self._apply).lower(self.params(), images).as_text(dialect="hlo")

  def params(self) -> dict[str, dict[str, jax.Array]]:
    """Every layer's arrays on the device, in the layout of its backend (prepared once)."""
    if not self._params:
      for name, layer in self.layers.items():
        if isinstance(layer, LookupLayer):
          arrays = self._impls[name].prepare(layer)
        else:
          arrays = device_arrays(layer)
        self._params[name] = jax.tree.map(jnp.asarray, arrays)
      self._params["__consts__"] = {k: jnp.asarray(v) for k, v in self.graph.consts.items()}
    return self._params

  def _apply(self, params: dict[str, dict[str, jax.Array]], images: jax.Array) -> jax.Array:
    def layer_fn(name: str, value: graph_lib.Value, epilogue: backends_lib.Epilogue | None = None,
                 residual: graph_lib.Value | None = None) -> graph_lib.Value | None:
      return run_layer(self.layers[name], self._impls.get(name), params[name], value, epilogue, residual)
    if images.shape[0] == 1 and self.chain is not None:
      return chain_lib.run(self.chain, self.layers, params, images, layer_fn, params["__consts__"], self._max_pool)
    return graph_lib.run(self.graph, layer_fn, images, params["__consts__"], self._max_pool)

  def __call__(self, images: jax.Array | np.ndarray) -> jax.Array:
    """(batch, h, w, c) float32 images -> (batch, classes) logits."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
      expected = ", ".join(map(str, self.input_shape))
      raise ValueError(f"images of shape {tuple(images.shape)}: expected (batch, {expected}).")
    return self._forward(self.params(), images)

  def top_k(self, images: jax.Array | np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k most likely classes per image, most likely first."""
    probabilities = np.asarray(jax.nn.softmax(self(images), axis=-1))
    indices = np.argsort(-probabilities, axis=-1)[:, :k]
    return indices, np.take_along_axis(probabilities, indices, axis=-1)
