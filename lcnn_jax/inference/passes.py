"""The rewrites an exported graph gets once, at export time: BatchNorm folding and the steps that run together.

:func:`fold_batch_norms` folds each eval-mode BatchNorm that directly follows a layer into that layer's
coefficients (or kernel) and bias. :func:`fuse` finds the ReLUs that the max pooling after them can apply and
the layers whose backend may compute the ReLU and max pooling after them in the same step, and stores them with
the graph (:class:`~lcnn_jax.inference.graph.Fusion`), so the interpreter that runs it looks nothing up.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from lcnn_jax.inference.graph import Epilogue, Fusion, Graph, is_relu, max_pooling
from lcnn_jax.inference.records import AffineLayer, Layer, LookupLayer


def fold_batch_norm(layer: Layer, norm: AffineLayer) -> Layer:
  """``layer`` followed by the eval-mode BatchNorm ``norm``, as one layer: scale per output, shift in the bias."""
  bias = (layer.bias * norm.scale + norm.shift).astype(np.float32)
  if isinstance(layer, LookupLayer):
    values = layer.values * norm.scale[layer.output_of_each_nonzero()]
    return dataclasses.replace(layer, values=values.astype(np.float32), bias=bias)
  return dataclasses.replace(layer, kernel=(layer.kernel * norm.scale).astype(np.float32), bias=bias)


def fold_batch_norms(graph: Graph, layers: dict[str, Layer]) -> tuple[Graph, dict[str, Layer]]:
  """Folds each BatchNorm whose input is a layer's output used by nothing else into that layer; returns the graph
  without those BatchNorms and the layers (``layers`` is updated)."""
  producer = {e.outputs[0]: e for e in graph.equations if e.primitive == "layer"}
  dropped, rename = set(), {}
  for eqn in graph.equations:
    name = eqn.params.get("name")
    if eqn.primitive != "layer" or not isinstance(layers[name], AffineLayer) or eqn.inputs[0][0] != "var":
      continue
    source = producer.get(eqn.inputs[0][1])
    if source is None or isinstance(layers[source.params["name"]], AffineLayer):
      continue
    if len(graph.consumers(source.outputs[0])) != 1 or source.outputs[0] == graph.output:
      continue
    layers[source.params["name"]] = fold_batch_norm(layers[source.params["name"]], layers.pop(name))
    dropped.add(id(eqn))
    rename[eqn.outputs[0]] = source.outputs[0]
  return graph.replace([e for e in graph.equations if id(e) not in dropped], rename), layers


def relus_into_max_pools(graph: Graph) -> frozenset[int]:
  """The output variables of ReLUs used only by one max pooling, which then applies the ReLU itself: max pooling
  and ReLU commute, so the pooled ReLU is the ReLU of the pooled values, and the pass over the unpooled
  activation is saved."""
  deferred = set()
  for eqn in graph.equations:
    if is_relu(eqn) and eqn.outputs[0] != graph.output:
      users = graph.consumers(eqn.outputs[0])
      if len(users) == 1 and users[0].primitive == "reduce_window_max":
        deferred.add(eqn.outputs[0])
  return frozenset(deferred)


def layers_into_max_pools(graph: Graph, deferred: frozenset[int]) -> dict[int, int]:
  """Layer outputs whose only use is a ReLU in ``deferred`` before a max pooling over (h, w): the layer's output
  variable -> the pooling's. The layer may then compute the pooled map itself."""
  producers = {e.outputs[0]: e for e in graph.equations}
  fusable = {}
  for pool in graph.equations:
    if pool.primitive != "reduce_window_max" or pool.inputs[0][0] != "var" or pool.inputs[0][1] not in deferred:
      continue
    relu = producers[pool.inputs[0][1]]
    source = next(i for i in relu.inputs if i[0] == "var")[1]
    layer = producers.get(source)
    if layer is None or layer.primitive != "layer" or len(graph.consumers(source)) != 1 or source == graph.output:
      continue
    if max_pooling(pool.params, relu=True) is not None:
      fusable[source] = pool.outputs[0]
  return fusable


def layers_into_epilogues(graph: Graph, deferred: frozenset[int], pooled: Mapping[int, int]) -> dict[int, Epilogue]:
  """Layer outputs used only by a residual addition and/or a ReLU after it (a ResNet block's end: conv2, the
  shortcut's addition, the ReLU; or a layer and its ReLU): output variable -> :class:`Epilogue`. The other
  operand of the addition must exist before the layer runs, or be computed by a layer equation whose input
  does (a ResNet shortcut convolution, hoisted to run first). ReLUs deferred into max poolings are left to
  them (:func:`relus_into_max_pools`)."""
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
          hoisted = made.outputs[0]
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
    if is_relu(user) and user.outputs[0] not in deferred:
      skipped.append(user.outputs[0])
      epilogues[source] = Epilogue(user.outputs[0], residual, True, tuple(skipped), hoisted)
    elif residual is not None:
      epilogues[source] = Epilogue(skipped[-1], residual, False, tuple(skipped), hoisted)
  return epilogues


def fuse(graph: Graph) -> Graph:
  """``graph`` with its :class:`~lcnn_jax.inference.graph.Fusion`: the ReLUs its max poolings apply, the layers
  that may compute the ReLU and max pooling after them, and those that may add a residual and apply a ReLU as
  they store their outputs."""
  deferred = relus_into_max_pools(graph)
  pooled = layers_into_max_pools(graph, deferred)
  return dataclasses.replace(graph, fusion=Fusion(deferred, pooled, layers_into_epilogues(graph, deferred, pooled)))
