"""The exported model's file: :func:`save` writes an :class:`~lcnn_jax.inference.model.InferenceModel`, :func:`load`
reads it back (run time: no Flax, no trainer).

The file is an ``.npz`` archive read with ``allow_pickle=False``: a JSON header (``header``: graph with its
fusion, layer geometry, backends, class names, preprocessing) and the arrays (``layers/<name>/<array>``,
``consts/<name>``). Loading it runs no code from the file. Files of format version 1 carry no fusion; it is found
once when they load (:func:`lcnn_jax.inference.passes.fuse`).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging

import lcnn_jax
from lcnn_jax.inference import passes, tuning
from lcnn_jax.inference import precision as precision_lib
from lcnn_jax.inference.graph import Graph
from lcnn_jax.inference.model import InferenceModel
from lcnn_jax.inference.records import AffineLayer, ConvLayer, Layer, LinearLayer, LookupLayer, layer_arrays

FORMAT = "lcnn_jax.inference"
VERSION = 2
"""1: the graph alone; 2: the graph with its fusion."""
KINDS = {LookupLayer: "lookup", ConvLayer: "conv", LinearLayer: "linear", AffineLayer: "affine"}


def _layer_header(layer: Layer) -> dict:
  header = {"kind": KINDS[type(layer)]}
  for field in ("kernel_size", "strides", "padding", "input_size"):
    if hasattr(layer, field):
      header[field] = np.asarray(getattr(layer, field)).tolist()
  bfloat16 = sorted(f for f, a in layer_arrays(layer).items() if a.dtype == precision_lib.BFLOAT16)
  if bfloat16:
    header["bfloat16"] = bfloat16  # stored as their uint16 bits: .npy has no bfloat16
  return header


def _stored(array: np.ndarray) -> np.ndarray:
  return array.view(np.uint16) if array.dtype == precision_lib.BFLOAT16 else array


def save(model: InferenceModel, path: str | os.PathLike) -> None:
  """Writes ``model`` to ``path`` (.npz): a JSON header and the arrays, no pickled objects."""
  header = {
      "format": FORMAT, "version": VERSION, "lcnn_jax": lcnn_jax.__version__, "jax": jax.__version__,
      "input_shape": list(model.input_shape), "class_names": model.class_names,
      "preprocessing": model.preprocessing, "tuning": model.tuning, "backends": model.backends,
      "precision": model.precision,
      "graph": model.graph.to_json(),
      "layers": {name: _layer_header(layer) for name, layer in model.layers.items()},
  }
  arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
  arrays.update({f"consts/{name}": value for name, value in model.graph.consts.items()})
  for name, layer in model.layers.items():
    arrays.update({f"layers/{name}/{field}": _stored(value) for field, value in layer_arrays(layer).items()})
  path = os.fspath(path)
  partial = f"{path}.partial.npz"
  np.savez(partial, **arrays)
  os.replace(partial, path)
  logging.info("Exported %d layers to %s (%.1f MB).", len(model.layers), path, os.path.getsize(path) / 1e6)


def _layer_from_file(name: str, header: dict, arrays: dict[str, np.ndarray]) -> Layer:
  kind = header["kind"]
  if kind == "lookup":
    shape = (*header["kernel_size"], arrays["dictionary"].shape[1], arrays["bias"].shape[0])
    return LookupLayer(**arrays, shape=shape, strides=tuple(header["strides"]), padding=tuple(header["padding"]),
                       input_size=tuple(header["input_size"]))
  if kind == "conv":
    return ConvLayer(**arrays, strides=tuple(header["strides"]),
                     padding=tuple(tuple(p) for p in header["padding"]))
  if kind == "linear":
    return LinearLayer(**arrays)
  if kind == "affine":
    return AffineLayer(**arrays)
  raise ValueError(f"Layer {name!r} has unknown kind {kind!r}; the file needs a newer lcnn_jax.")


def load(path: str | os.PathLike, *, backends: Mapping[str, str] | str | None = None,
         batch_size: int | None = None, retune: bool = False) -> InferenceModel:
  """Loads an exported model: a callable from (batch, h, w, c) images to logits.

  Args:
    path: a file written by :func:`lcnn_jax.inference.export` or :func:`save`.
    backends: None keeps the backends chosen at export where they were measured on this CPU; a file tuned on
      another CPU is tuned again here, once (:func:`lcnn_jax.inference.tuning.for_this_machine`; an
      unavailable backend falls back to 'gather'); "auto" measures again here; or a backend name for every
      lookup layer, or a name per layer.
    batch_size: the batch size "auto" optimises for (default: the one used at export).
    retune: with ``backends`` None, measure this CPU's choice again even when one is kept.
  """
  with np.load(os.fspath(path), allow_pickle=False) as archive:
    arrays = {key: archive[key] for key in archive.files}
  header = json.loads(arrays.pop("header").tobytes())
  if header.get("format") != FORMAT:
    raise ValueError(f"{path}: not an lcnn_jax export (format {header.get('format')!r}).")
  if header["version"] > VERSION:
    raise ValueError(f"{path}: export format version {header['version']}; this lcnn_jax reads up to {VERSION}.")
  consts = {key[len("consts/"):]: value for key, value in arrays.items() if key.startswith("consts/")}
  graph = Graph.from_json(header["graph"], consts)
  if graph.fusion is None:  # written before version 2
    graph = passes.fuse(graph)
  layers = {}
  for name, layer_header in header["layers"].items():
    prefix = f"layers/{name}/"
    fields = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)
              and "/" not in key[len(prefix):]}
    for field in layer_header.get("bfloat16", ()):
      fields[field] = fields[field].view(precision_lib.BFLOAT16)
    layers[name] = _layer_from_file(name, layer_header, fields)
  model = InferenceModel(graph, layers, input_shape=header["input_shape"], backends=header["backends"],
                         class_names=header["class_names"], preprocessing=header["preprocessing"],
                         tuning=header["tuning"])
  if backends == "auto":
    return tuning.tune(model, batch_size or (header["tuning"] or {}).get("batch_size", 1))
  if backends is None:
    return tuning.for_this_machine(model, os.fspath(path), retune=retune)
  return model.with_backends(backends)
