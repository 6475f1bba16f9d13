"""Exporting a trained LCNN for inference, saving it as one file, and loading it back.

    python -m lcnn_jax.inference.exporter --workdir RUN --output model.npz|model.onnx [--step N] [--backends auto]
        [--batch_size 1] [--lookup_form auto] [--precision float32|bfloat16|int8]

:func:`export` takes a live model or a run's workdir, traces its eval-mode forward pass
(:mod:`lcnn_jax.inference.graph`), and turns each layer into its inference form: a lookup layer keeps its
dictionary and the non-zeros of P as per-output indices and coefficients; a BatchNorm that directly follows a
layer is folded into that layer's coefficients (or kernel) and bias, scale per output; dense convolutions and
dense layers stay dense. It then picks each lookup layer's backend by measurement
(:mod:`lcnn_jax.inference.tuning`) for the batch size given.

The file is an ``.npz`` archive read with ``allow_pickle=False``: a JSON header (``header``: graph, layer
geometry, backends, class names, preprocessing) and the arrays (``layers/<name>/<array>``,
``consts/<name>``). Loading it runs no code from the file. An ``.onnx`` output writes the same model as an ONNX
graph instead (:mod:`lcnn_jax.inference.onnx_export`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from lcnn_jax import cli, layers as layers_lib
from lcnn_jax.inference import allocator
from lcnn_jax.inference import graph as graph_lib
from lcnn_jax.inference import onnx_export, tuning
from lcnn_jax.inference import precision as precision_lib
from lcnn_jax.inference.backends import LookupLayer
from lcnn_jax.inference.model import AffineLayer, ConvLayer, InferenceModel, Layer, LinearLayer, layer_arrays

FORMAT = "lcnn_jax.inference"
VERSION = 1
KINDS = {LookupLayer: "lookup", ConvLayer: "conv", LinearLayer: "linear", AffineLayer: "affine"}


# From modules --------------------------------------------------------------------------------------------

def _array(variable) -> np.ndarray:
  return np.asarray(variable[...], np.float32)


def _bias(module, n: int) -> np.ndarray:
  return _array(module.bias) if module.bias is not None else np.zeros(n, np.float32)


def _explicit_padding(module: nnx.Conv, input_size: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  padding = module.padding
  kernel = module.kernel_size
  strides = module.strides if not isinstance(module.strides, int) else (module.strides,) * 2
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise graph_lib.UnsupportedModel(f"nnx.Conv padding={padding!r}: only SAME, VALID or explicit pairs export.")
    return tuple(jax.lax.padtype_to_pads(tuple(input_size), tuple(kernel), tuple(strides), padding))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _conv_layer(name: str, module: nnx.Conv, call: graph_lib.LayerCall) -> ConvLayer:
  if len(module.kernel_size) != 2 or module.feature_group_count != 1:
    raise graph_lib.UnsupportedModel(f"Layer {name!r}: only 2-D convolutions without groups export.")
  for attribute in ("kernel_dilation", "input_dilation"):
    dilation = getattr(module, attribute)
    if dilation not in (None, 1) and tuple(np.broadcast_to(dilation, 2)) != (1, 1):
      raise graph_lib.UnsupportedModel(f"Layer {name!r}: {attribute}={dilation} is not supported by the export.")
  strides = module.strides if not isinstance(module.strides, int) else (module.strides,) * 2
  kernel = _array(module.kernel)
  return ConvLayer(kernel, _bias(module, kernel.shape[-1]), tuple(int(s) for s in strides),
                   _explicit_padding(module, call.input_shape[1:3]))


def _lookup_layer(module: layers_lib.LookupConv | layers_lib.LookupDense, call: graph_lib.LayerCall) -> LookupLayer:
  coefficients = np.asarray(module.thresholded_coefficients(), np.float32)
  bias = _bias(module, module.out_features)
  if isinstance(module, layers_lib.LookupConv):
    return LookupLayer.from_coefficients(_array(module.dictionary), coefficients, bias, strides=module.strides,
                                         padding=module.padding, input_size=call.input_shape[1:3])
  spatial = call.input_shape[1:-1]
  if len(spatial) not in (0, 2):
    raise graph_lib.UnsupportedModel(f"A LookupDense on input {call.input_shape}: export supports (batch, "
                                     "features) and (batch, h, w, features) inputs.")
  return LookupLayer.from_coefficients(_array(module.dictionary), coefficients[None, None], bias, strides=(1, 1),
                                       padding=(0, 0), input_size=tuple(spatial) or (1, 1))


def _batch_norm(name: str, module: nnx.BatchNorm, call: graph_lib.LayerCall) -> AffineLayer:
  if module.axis not in (-1, len(call.input_shape) - 1):
    raise graph_lib.UnsupportedModel(f"BatchNorm {name!r} normalises axis {module.axis}; export needs the last.")
  scale = _array(module.scale) if module.scale is not None else np.ones(module.num_features, np.float32)
  offset = _array(module.bias) if module.bias is not None else np.zeros(module.num_features, np.float32)
  factor = scale / np.sqrt(_array(module.var) + module.epsilon)
  return AffineLayer(factor.astype(np.float32), (offset - _array(module.mean) * factor).astype(np.float32))


def _inference_layer(name: str, call: graph_lib.LayerCall) -> Layer:
  module = call.module
  if isinstance(module, (layers_lib.LookupConv, layers_lib.LookupDense)):
    return _lookup_layer(module, call)
  if isinstance(module, nnx.Conv):
    return _conv_layer(name, module, call)
  if isinstance(module, nnx.Linear):
    return LinearLayer(_array(module.kernel), _bias(module, module.out_features))
  return _batch_norm(name, module, call)


def fold_batch_norm(layer: Layer, norm: AffineLayer) -> Layer:
  """``layer`` followed by the eval-mode BatchNorm ``norm``, as one layer: scale per output, shift in the bias."""
  bias = layer.bias * norm.scale + norm.shift
  if isinstance(layer, LookupLayer):
    values = layer.values * norm.scale[layer.output_of_each_nonzero()]
    return LookupLayer(layer.dictionary, layer.starts, layer.indices, values.astype(np.float32),
                       bias.astype(np.float32), layer.kernel_size, layer.strides, layer.padding, layer.input_size)
  return type(layer)(**{**{f: getattr(layer, f) for f in layer.__dataclass_fields__},
                        "kernel": (layer.kernel * norm.scale).astype(np.float32), "bias": bias.astype(np.float32)})


def _fold(graph: graph_lib.Graph, layers: dict[str, Layer]) -> tuple[graph_lib.Graph, dict[str, Layer]]:
  """Folds each BatchNorm whose input is a layer's output used by nothing else into that layer."""
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


def inference_model(model: nnx.Module, input_shape: Sequence[int], *, backends: Mapping[str, str] | str = "auto",
                    batch_size: int = 1, class_names: Sequence[str] | None = None,
                    preprocessing: Mapping[str, Any] | None = None, precision: str = "float32") -> InferenceModel:
  """The :class:`InferenceModel` of a live NNX model (in memory; :func:`save` writes it).

  Args:
    model: any NNX model built from ``nnx.Conv``, ``nnx.Linear``, lookup layers and ``nnx.BatchNorm``, with
      other operations in plain JAX; it is evaluated in eval mode and not changed.
    input_shape: one example's (h, w, c).
    backends: "auto" (measure and pick per layer), one backend name for every lookup layer, or a name per layer.
    batch_size: the batch size "auto" optimises for.
    class_names: the names of the model's outputs, when known.
    preprocessing: how images are prepared for the model (``image_size``, ``resize_size``, ``channels``,
      ``mean``, ``std``), stored for the prediction CLI.
    precision: how the weights are stored and computed from: float32, bfloat16 or int8
      (:mod:`lcnn_jax.inference.precision`).
  """
  graph, calls = graph_lib.trace(model, input_shape)
  layers = {name: _inference_layer(name, call) for name, call in calls.items()}
  graph, layers = _fold(graph, layers)
  layers = {name: layers[name] for name in graph.layer_names()}
  exported = InferenceModel(graph, layers, input_shape=input_shape, backends="dense", class_names=class_names,
                            preprocessing=preprocessing)
  exported = precision_lib.quantize(exported, precision)
  if backends != "auto":
    return exported.with_backends(backends)
  return tune(exported, batch_size)


def tune(model: InferenceModel, batch_size: int) -> InferenceModel:
  """``model`` on the fastest backends at ``batch_size`` here: per layer, then checked on the whole model.

  Each lookup layer's fastest backend alone (:func:`tuning.choose_backends`) can lose on the whole model when
  neighbours disagree on the activations' layout and pay transposes, so the per-layer mix competes with every
  backend used throughout, end to end; the fastest of these is kept.
  """
  mix, timings = tuning.choose_backends(model.lookup_layers, batch_size)
  candidates = {"per-layer": mix, **{name: name for name in tuning.candidate_backends()}}
  model_ms = {}
  for name, choice in candidates.items() if model.lookup_layers else ():
    best = min(model_ms.values(), default=None)
    model_ms[name] = tuning.model_ms(model.with_backends(choice), batch_size, give_up_ms=best and tuning.GIVE_UP * best)
  best = min(model_ms, key=model_ms.get) if model_ms else "per-layer"
  tuned = model.with_backends(candidates[best])
  tuned.tuning = {"batch_size": batch_size, "device": tuning.device_name(), "timings_ms": timings,
                  "model_ms": model_ms, "chosen": best}
  logging.info("Backends at batch %d: %s (whole model: %s).", batch_size, best,
               ", ".join(f"{k} {v:.2f} ms" for k, v in model_ms.items()))
  return tuned


def _from_workdir(workdir: str, step: int | None) -> tuple[nnx.Module, tuple, list | None, dict]:
  from lcnn_jax import checkpoint  # The trainer's checkpoint reader; only needed for a workdir.
  model, config, _ = checkpoint.restore_model(workdir, step)
  _, dataset = checkpoint.load_run_info(workdir)
  image_size, _, channels = dataset["image_shape"]
  if dataset["name"] in ("digits", "idx", "fashion_mnist"):  # evaluated whole, only resized to image_size: no resize-and-crop margin
    resize_size = image_size
  else:
    resize_size = config.data.resize_size or round(image_size * 256 / 224)
  preprocessing = {"image_size": image_size, "resize_size": resize_size, "channels": channels,
                   "mean": list(dataset["mean"]), "std": list(dataset["std"]), "dataset": dataset["name"]}
  return model, tuple(dataset["image_shape"]), dataset.get("class_names"), preprocessing


def export(source: nnx.Module | str | os.PathLike, path: str | os.PathLike | None = None, *,
           input_shape: Sequence[int] | None = None, step: int | None = None,
           backends: Mapping[str, str] | str = "auto", batch_size: int = 1,
           class_names: Sequence[str] | None = None,
           preprocessing: Mapping[str, Any] | None = None, precision: str = "float32") -> InferenceModel:
  """Exports a model (live, or a run's workdir) for inference and, with ``path``, saves it as one file.

  Args:
    source: an NNX model, or the workdir of a training run (its latest checkpoint, or ``step``).
    path: where to write the ``.npz`` file; None keeps the result in memory only.
    input_shape: one example's (h, w, c); read from the run for a workdir.
    step: the checkpoint step of a workdir (default: the latest).
    backends: "auto" to measure and pick per layer, or backend names (see :func:`inference_model`).
    batch_size: the batch size "auto" optimises for.
    class_names: output names (a workdir's dataset supplies its own when it has them).
    preprocessing: image preparation for the prediction CLI (a workdir supplies its own).
    precision: float32, bfloat16 or int8 weights (see :func:`inference_model`).
  Returns:
    The exported :class:`InferenceModel`.
  """
  if isinstance(source, nnx.Module):
    if input_shape is None:
      raise ValueError("input_shape=None: exporting a live model needs one example's (h, w, c).")
    model = source
  else:
    model, run_shape, run_classes, run_preprocessing = _from_workdir(os.fspath(source), step)
    input_shape = input_shape or run_shape
    class_names = class_names if class_names is not None else run_classes
    preprocessing = preprocessing if preprocessing is not None else run_preprocessing
  exported = inference_model(model, input_shape, backends=backends, batch_size=batch_size,
                             class_names=class_names, preprocessing=preprocessing, precision=precision)
  if path is not None:
    save(exported, path)
  return exported


# The file ------------------------------------------------------------------------------------------------

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
  from lcnn_jax import __version__
  header = {
      "format": FORMAT, "version": VERSION, "lcnn_jax": __version__, "jax": jax.__version__,
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
    return LookupLayer(**arrays, kernel_size=tuple(header["kernel_size"]), strides=tuple(header["strides"]),
                       padding=tuple(header["padding"]), input_size=tuple(header["input_size"]))
  if kind == "conv":
    return ConvLayer(**arrays, strides=tuple(header["strides"]),
                     padding=tuple(tuple(p) for p in header["padding"]))
  if kind == "linear":
    return LinearLayer(**arrays)
  if kind == "affine":
    return AffineLayer(**arrays)
  raise ValueError(f"Layer {name!r} has unknown kind {kind!r}; the file needs a newer lcnn_jax.")


def load(path: str | os.PathLike, *, backends: Mapping[str, str] | str | None = None,
         batch_size: int | None = None) -> InferenceModel:
  """Loads an exported model: a callable from (batch, h, w, c) images to logits.

  Args:
    path: a file written by :func:`export` or :func:`save`.
    backends: None keeps the backends chosen at export (an unavailable one falls back to 'gather'); "auto"
      measures again here; or a backend name for every lookup layer, or a name per layer.
    batch_size: the batch size "auto" optimises for (default: the one used at export).
  """
  with np.load(os.fspath(path), allow_pickle=False) as archive:
    arrays = {key: archive[key] for key in archive.files}
  header = json.loads(arrays.pop("header").tobytes())
  if header.get("format") != FORMAT:
    raise ValueError(f"{path}: not an lcnn_jax export (format {header.get('format')!r}).")
  if header["version"] > VERSION:
    raise ValueError(f"{path}: export format version {header['version']}; this lcnn_jax reads up to {VERSION}.")
  consts = {key[len("consts/"):]: value for key, value in arrays.items() if key.startswith("consts/")}
  graph = graph_lib.Graph.from_json(header["graph"], consts)
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
    return tune(model, batch_size or (header["tuning"] or {}).get("batch_size", 1))
  return model if backends is None else model.with_backends(backends)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so it never clashes with another
  command's."""
  flags.DEFINE_string("workdir", None, "The training run to export (its latest checkpoint, or --step).",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "Where to write the exported model: .npz (this package's runtime) or .onnx "
                      "(ONNX Runtime and other ONNX engines; needs the onnx extra).", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest).", flag_values=flag_values)
  flags.DEFINE_string("backends", "auto", "'auto' (measured here per layer), or one backend name for every lookup "
                      "layer: dense, factored, gather, lookup.", flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 1, "The batch size 'auto' optimises for.", flag_values=flag_values)
  flags.DEFINE_enum("lookup_form", "auto", ["auto", *onnx_export.LOOKUP_FORMS], "ONNX only: each lookup layer as "
                    "one convolution with W = D·P (dense), as the dictionary's 1×1 convolution then the "
                    "coefficients' (factored), or whichever of the two ONNX Runtime runs faster (auto, measured "
                    "here at --batch_size).", flag_values=flag_values)
  flags.DEFINE_enum("precision", "float32", list(precision_lib.PRECISIONS), "How weights are stored and computed "
                    "from: dictionaries, non-zeros of P and dense kernels (int8: one scale per output channel). "
                    ".npz only: an ONNX file stores float32.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdir", "output"], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The ``python -m lcnn_jax.inference.exporter`` command, on its parsed flags (``flag_values``); raises
  :class:`~lcnn_jax.cli.UsageError` for a user mistake."""
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {list(argv[1:])}; see --help for the flags.")
  cli.check_output_file(flag_values.output, "--output")
  try:
    if flag_values.output.endswith(".onnx"):
      if flag_values.precision != "float32":
        raise ValueError(f"--precision={flag_values.precision}: an ONNX file stores float32 weights; write a .npz "
                         "for bfloat16 or int8 storage, or drop --precision.")
      onnx_export.require("onnx")
      model = export(flag_values.workdir, step=flag_values.step, backends="dense")
      forms = onnx_export.save(model, flag_values.output, lookup_forms=flag_values.lookup_form,
                               batch_size=flag_values.batch_size)
    else:
      allocator.reuse_freed_memory()  # the timings of --backends=auto then match the prediction command's
      model = export(flag_values.workdir, flag_values.output, step=flag_values.step, backends=flag_values.backends,
                     batch_size=flag_values.batch_size, precision=flag_values.precision)
      forms = model.backends
    dense = _dense_cnn_parameters(flag_values.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise cli.UsageError(str(e)) from None
  lookups = model.lookup_layers
  sys.stdout.write(f"{flag_values.output}: {len(model.layers)} layers ({len(lookups)} lookup), input "
                   f"{'x'.join(map(str, model.input_shape))}, {len(model.class_names or [])} class names\n")
  for name, layer in lookups.items():
    sys.stdout.write(f"  {name:<24} {forms[name]:<9} k={layer.dictionary_size:<4} "
                     f"density {layer.density:.4f}\n")
  sys.stdout.write(_bytes_line(model, *dense) + "\n")


def _dense_cnn_parameters(workdir: str) -> tuple[int, int]:
  """(weights, output channels) of the dense CNN a run's LCNN is compared with (BatchNorm folded away)."""
  from lcnn_jax import checkpoint, flops, models  # only for the report; the export itself needs neither
  config, dataset = checkpoint.load_run_info(workdir)
  cnn = models.create_model(models.baseline_config(config.model), num_classes=dataset["num_classes"],
                            input_shape=tuple(dataset["image_shape"]), rngs=nnx.Rngs(0))
  weights = outputs = 0
  for _, module in nnx.iter_modules(cnn):
    if isinstance(module, (nnx.Conv, nnx.Linear)):
      weights += module.kernel[...].size + (module.bias[...].size if module.bias is not None else 0)
      outputs += module.kernel[...].shape[-1]
  return weights, outputs


def _bytes_line(model: InferenceModel, dense_weights: int, dense_outputs: int) -> str:
  """The exported model's bytes beside its dense CNN's (float32, and at the model's precision)."""
  def size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"
  line = (f"stored: {size(precision_lib.model_bytes(model))} ({model.precision}); dense CNN "
          f"{size(precision_lib.dense_bytes(dense_weights, 'float32'))} float32")
  if model.precision in ("bfloat16", "int8"):
    line += f", {size(precision_lib.dense_bytes(dense_weights, model.precision, dense_outputs))} {model.precision}"
  return line


if __name__ == "__main__":
  define_flags()
  cli.run(main)
