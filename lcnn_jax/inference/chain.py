"""Batch 1 in one kernel call: the chain of layers at the start of a model's graph, run by ``lcnn_network``.

At batch 1 a layer of AlexNet-LCNN costs little arithmetic (0.1–5 M multiply-adds), so a call per layer, with
XLA's ReLU and pooling fusions between the calls, is a large part of the time. :func:`plan` finds the longest
run of equations from the graph's input that the kernel can take in one call: lookup layers whose backend has a
step for them there (:meth:`~lcnn_jax.inference.backends.Backend.network_step`: the ``lookup`` backend's),
1×1 dense convolutions, each followed by its ReLU and max pooling, every intermediate value used only by
the next step. :func:`run` hands that run to :func:`lcnn_jax.inference.kernels.network` and the rest of the graph
(here, the final reshape) to the interpreter, :func:`lcnn_jax.inference.graph.run`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from lcnn_jax.inference import backends as backends_lib
from lcnn_jax.inference import graph as graph_lib
from lcnn_jax.inference import kernels

MIN_STEPS = 2
"""A chain of fewer layers saves no call."""


@dataclasses.dataclass
class Step:
  """One layer of the chain, the ReLU and max pooling after it included."""
  name: str
  kind: int  # one of kernels.STEPS
  output: int  # the graph variable holding the step's result (after its ReLU and pooling)
  size: tuple[int, int]  # (h, w) of the step's result
  channels: int
  relu: bool = False
  pooling: backends_lib.Pooling | None = None


@dataclasses.dataclass(frozen=True)
class Chain:
  """The steps, and the graph that is left: its input is the chain's result (NHWC)."""
  steps: tuple[Step, ...]
  rest: graph_lib.Graph


def _pointwise(layer) -> bool:
  """Whether ``layer`` is a 1×1 convolution record (kernel (1, 1, m, n)) without padding or strides."""
  kernel = getattr(layer, "kernel", None)
  return (kernel is not None and kernel.ndim == 4 and kernel.shape[:2] == (1, 1)
          and tuple(map(tuple, layer.padding)) == ((0, 0), (0, 0)) and tuple(layer.strides) == (1, 1))


def _layer_step(name: str, layer, backend: backends_lib.Backend | None, size: tuple[int, int],
                output: int) -> Step | None:
  """The step of a layer on a map of ``size``, or None where the kernel cannot run it in the chain."""
  if isinstance(layer, backends_lib.LookupLayer):
    kind = backend.network_step(layer)
    if kind is None or tuple(layer.input_size) != size:
      return None
    return Step(name, kind, output, tuple(layer.output_size), layer.out_features)
  if _pointwise(layer):
    return Step(name, kernels.STEPS.step_dense, output, size, layer.kernel.shape[-1])
  return None


def plan(graph: graph_lib.Graph, layers: Mapping, backends: Mapping[str, backends_lib.Backend],
         input_shape: tuple[int, int, int]) -> Chain | None:
  """The chain at the start of ``graph`` for one image of ``input_shape`` (h, w, c), with ``backends`` the
  lookup layers' backends, or None (fewer than :data:`MIN_STEPS` layers, or no kernel here)."""
  steps: list[Step] = []
  current, size = graph.input, tuple(input_shape[:2])
  done = 0
  for index, eqn in enumerate(graph.equations):
    if eqn.inputs[:1] != (("var", current),) or current == graph.output:
      break
    if current != graph.input and len(graph.consumers(current)) != 1:
      break
    last = steps[-1] if steps else None
    if eqn.primitive == "layer" and len(eqn.inputs) == 1:
      name = eqn.params["name"]
      step = _layer_step(name, layers[name], backends.get(name), size, eqn.outputs[0])
      if step is None:
        break
      steps.append(step)
    elif last is not None and graph_lib.is_relu(eqn) and not last.relu and last.pooling is None:
      last.relu = True
    elif (last is not None and eqn.primitive == "reduce_window_max" and last.pooling is None
          and (pooling := graph_lib.max_pooling(eqn.params, relu=last.relu)) is not None and pooling.fits(size)):
      last.pooling = pooling
    else:
      break
    current = eqn.outputs[0]
    if steps:
      steps[-1].output = current
      if eqn.primitive == "reduce_window_max":
        steps[-1].size = steps[-1].pooling.output_size(steps[-1].size)
      size = steps[-1].size
    done = index + 1
  if len(steps) < MIN_STEPS or not backends_lib.kernel_here()[0]:  # checked last: it builds the kernel
    return None
  rest = dataclasses.replace(graph, equations=graph.equations[done:], input=current)  # the fusion still holds
  return Chain(tuple(steps), rest)


def _arrays(step: Step, params: Mapping[str, jax.Array]) -> list[jax.Array]:
  if step.kind == kernels.STEPS.step_dense:
    if "kernel_q" in params:  # as stored, bfloat16 or int8
      return [params["kernel_q"], params["kernel_scale"], params["bias"]]
    return [params["kernel_t"], jnp.ones(params["kernel_t"].shape[0], jnp.float32), params["bias"]]
  lookups = [params[k] for k in ("starts", "indices", "values", "scale", "bias")]
  if step.kind == kernels.STEPS.step_fused_lookups:
    return [params["dictionary"], *lookups]
  return [params["dictionary_q"], params["dictionary_scale"], *lookups]


def run(chain: Chain, layers: Mapping, params: Mapping[str, Mapping[str, jax.Array]], image: jax.Array,
        layer_fn: graph_lib.LayerFn, consts: Mapping[str, jax.Array],
        max_pool: graph_lib.MaxPoolFn | None = None) -> jax.Array:
  """The model on one NHWC image (1, h, w, c): the chain in one kernel call, then the rest of the graph (with
  ``layer_fn`` and ``max_pool`` as :func:`lcnn_jax.inference.graph.run` takes them)."""
  calls = []
  for step in chain.steps:
    layer = layers[step.name]
    attributes = dict(kind=step.kind, relu=step.relu, pooling=step.pooling)
    if isinstance(layer, backends_lib.LookupLayer):
      attributes.update(padding=layer.padding, strides=layer.strides, output_size=layer.output_size)
    calls.append((attributes, _arrays(step, params[step.name])))
  last = chain.steps[-1]
  y = kernels.network(image, calls, (1, *last.size, last.channels))  # NHWC
  return graph_lib.run(chain.rest, layer_fn, y, consts, max_pool)


__all__ = ["Chain", "MIN_STEPS", "Step", "plan", "run"]
