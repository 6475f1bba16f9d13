"""Exporting a trained LCNN for inference (export time: needs Flax and, for a run's workdir, the trainer).

    python -m lcnn_jax.inference.exporter --workdir RUN --output model.npz|model.onnx [--step N] [--backends auto]
        [--batch_size 1] [--lookup_form auto] [--precision float32|bfloat16|int8]

:func:`export` takes a live model or a run's workdir, traces its eval-mode forward pass
(:mod:`lcnn_jax.inference.tracing`), and turns each layer into its inference form
(:mod:`lcnn_jax.inference.records`): a lookup layer keeps its dictionary and its lookups (the non-zeros of P per
output, :mod:`lcnn_jax.lookups`); dense convolutions and dense layers stay dense. The graph's rewrites run once,
here (:mod:`lcnn_jax.inference.passes`): a BatchNorm that directly follows a layer is folded into that layer's
coefficients (or kernel) and bias, scale per output, and the steps that run together are stored with the graph.
It then picks each lookup layer's backend by measurement (:mod:`lcnn_jax.inference.tuning`) for the batch size
given, and :func:`~lcnn_jax.inference.storage.save` writes one ``.npz`` file that
:func:`~lcnn_jax.inference.storage.load` reads without Flax. An ``.onnx`` output writes the same model as an
ONNX graph instead (:mod:`lcnn_jax.inference.onnx_export`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx

from lcnn_jax import checkpoint, cli, data, flops, layers as layers_lib
from lcnn_jax.inference import allocator, onnx_export, passes, tracing, tuning
from lcnn_jax.inference import precision as precision_lib
from lcnn_jax.inference.graph import UnsupportedModel
from lcnn_jax.inference.model import InferenceModel
from lcnn_jax.inference.records import AffineLayer, ConvLayer, Layer, LinearLayer, LookupLayer
from lcnn_jax.inference.storage import load, save

__all__ = ["define_flags", "export", "inference_model", "load", "main", "save"]


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
      raise UnsupportedModel(f"nnx.Conv padding={padding!r}: only SAME, VALID or explicit pairs export.")
    return tuple(jax.lax.padtype_to_pads(tuple(input_size), tuple(kernel), tuple(strides), padding))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _conv_layer(name: str, module: nnx.Conv, call: tracing.LayerCall) -> ConvLayer:
  if len(module.kernel_size) != 2 or module.feature_group_count != 1:
    raise UnsupportedModel(f"Layer {name!r}: only 2-D convolutions without groups export.")
  for attribute in ("kernel_dilation", "input_dilation"):
    dilation = getattr(module, attribute)
    if dilation not in (None, 1) and tuple(np.broadcast_to(dilation, 2)) != (1, 1):
      raise UnsupportedModel(f"Layer {name!r}: {attribute}={dilation} is not supported by the export.")
  strides = module.strides if not isinstance(module.strides, int) else (module.strides,) * 2
  kernel = _array(module.kernel)
  return ConvLayer(kernel, _bias(module, kernel.shape[-1]), tuple(int(s) for s in strides),
                   _explicit_padding(module, call.input_shape[1:3]))


def _lookup_layer(module: layers_lib.LookupConv | layers_lib.LookupDense, call: tracing.LayerCall) -> LookupLayer:
  lookups = module.lookups()  # the non-zeros of thresholded P, (kh, kw, k, n); (1, 1, k, n) for a dense layer
  bias = _bias(module, module.out_features)
  if isinstance(module, layers_lib.LookupConv):
    return LookupLayer.from_lookups(lookups, _array(module.dictionary), bias, strides=module.strides,
                                    padding=module.padding, input_size=call.input_shape[1:3])
  spatial = call.input_shape[1:-1]
  if len(spatial) not in (0, 2):
    raise UnsupportedModel(f"A LookupDense on input {call.input_shape}: export supports (batch, features) and "
                           "(batch, h, w, features) inputs.")
  return LookupLayer.from_lookups(lookups, _array(module.dictionary), bias, strides=(1, 1), padding=(0, 0),
                                  input_size=tuple(spatial) or (1, 1))


def _batch_norm(name: str, module: nnx.BatchNorm, call: tracing.LayerCall) -> AffineLayer:
  if module.axis not in (-1, len(call.input_shape) - 1):
    raise UnsupportedModel(f"BatchNorm {name!r} normalises axis {module.axis}; export needs the last.")
  scale = _array(module.scale) if module.scale is not None else np.ones(module.num_features, np.float32)
  offset = _array(module.bias) if module.bias is not None else np.zeros(module.num_features, np.float32)
  factor = scale / np.sqrt(_array(module.var) + module.epsilon)
  return AffineLayer(factor.astype(np.float32), (offset - _array(module.mean) * factor).astype(np.float32))


def _inference_layer(name: str, call: tracing.LayerCall) -> Layer:
  module = call.module
  if isinstance(module, (layers_lib.LookupConv, layers_lib.LookupDense)):
    return _lookup_layer(module, call)
  if isinstance(module, nnx.Conv):
    return _conv_layer(name, module, call)
  if isinstance(module, nnx.Linear):
    return LinearLayer(_array(module.kernel), _bias(module, module.out_features))
  return _batch_norm(name, module, call)


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
  graph, calls = tracing.trace(model, input_shape)
  layers = {name: _inference_layer(name, call) for name, call in calls.items()}
  graph, layers = passes.fold_batch_norms(graph, layers)
  graph = passes.fuse(graph)
  layers = {name: layers[name] for name in graph.layer_names()}
  exported = InferenceModel(graph, layers, input_shape=input_shape, backends="dense", class_names=class_names,
                            preprocessing=preprocessing)
  exported = precision_lib.quantize(exported, precision)
  if backends != "auto":
    return exported.with_backends(backends)
  return tuning.tune(exported, batch_size)


def _from_workdir(workdir: str, step: int | None, run_info=None) -> tuple[nnx.Module, tuple, list | None, dict]:
  run_info = run_info if run_info is not None else checkpoint.load_run_info(workdir)
  model, config, _ = checkpoint.restore_model(workdir, step, run_info=run_info)
  _, dataset = run_info
  preprocessing = data.preprocessing(config.data, dataset) | {"dataset": dataset["name"]}
  return model, tuple(dataset["image_shape"]), dataset.get("class_names"), preprocessing


def export(source: nnx.Module | str | os.PathLike, path: str | os.PathLike | None = None, *,
           input_shape: Sequence[int] | None = None, step: int | None = None,
           backends: Mapping[str, str] | str = "auto", batch_size: int = 1,
           class_names: Sequence[str] | None = None,
           preprocessing: Mapping[str, Any] | None = None, precision: str = "float32",
           run_info=None) -> InferenceModel:
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
    run_info: a workdir's (config, dataset facts) when already read (:func:`lcnn_jax.checkpoint.load_run_info`);
      None reads its ``config.json``.
  Returns:
    The exported :class:`InferenceModel`.
  """
  if isinstance(source, nnx.Module):
    if input_shape is None:
      raise ValueError("input_shape=None: exporting a live model needs one example's (h, w, c).")
    model = source
  else:
    model, run_shape, run_classes, run_preprocessing = _from_workdir(os.fspath(source), step, run_info)
    input_shape = input_shape or run_shape
    class_names = class_names if class_names is not None else run_classes
    preprocessing = preprocessing if preprocessing is not None else run_preprocessing
  exported = inference_model(model, input_shape, backends=backends, batch_size=batch_size,
                             class_names=class_names, preprocessing=preprocessing, precision=precision)
  if path is not None:
    save(exported, path)
  return exported


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so it never clashes with another
  command's."""
  flags.DEFINE_string("workdir", None, "The training run to export (its latest checkpoint, or --step).",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "Where to write the exported model: .npz (this package's runtime) or .onnx "
                      "(ONNX Runtime and other ONNX engines; needs the onnx extra).", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest).", flag_values=flag_values)
  flags.DEFINE_string("backends", "auto", "'auto' (measured here per layer), or one backend name for every lookup "
                      "layer: dense, gemm, factored, gather, lookup.", flag_values=flag_values)
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
    run_info = checkpoint.load_run_info(flag_values.workdir)  # the run's facts, read once; not a run: named first
    checkpoint.resolve_step_dir(flag_values.workdir, flag_values.step)
    if flag_values.output.endswith(".onnx"):
      if flag_values.precision != "float32":
        raise ValueError(f"--precision={flag_values.precision}: an ONNX file stores float32 weights; write a .npz "
                         "for bfloat16 or int8 storage, or drop --precision.")
      onnx_export.require("onnx")
      model = export(flag_values.workdir, step=flag_values.step, backends="dense", run_info=run_info)
      forms = onnx_export.save(model, flag_values.output, lookup_forms=flag_values.lookup_form,
                               batch_size=flag_values.batch_size)
    else:
      allocator.reuse_freed_memory()  # the timings of --backends=auto then match the prediction command's
      model = export(flag_values.workdir, flag_values.output, step=flag_values.step, backends=flag_values.backends,
                     batch_size=flag_values.batch_size, precision=flag_values.precision, run_info=run_info)
      forms = model.backends
    dense = _dense_cnn_bytes(run_info, model.precision)
  except (ValueError, FileNotFoundError) as e:
    raise cli.UsageError(str(e)) from None
  lookups = model.lookup_layers
  sys.stdout.write(f"{flag_values.output}: {len(model.layers)} layers ({len(lookups)} lookup), input "
                   f"{'x'.join(map(str, model.input_shape))}, {len(model.class_names or [])} class names\n")
  for name, layer in lookups.items():
    sys.stdout.write(f"  {name:<24} {forms[name]:<9} k={layer.dictionary_size:<4} "
                     f"density {layer.density:.4f}\n")
  sys.stdout.write(_bytes_line(model, dense) + "\n")


def _dense_cnn_bytes(run_info, precision: str) -> dict[str, int]:
  """{precision: bytes} the export of the dense CNN a run's LCNN is compared with would store, float32 and
  ``precision`` (the counter's prediction, :func:`lcnn_jax.counting.stored_bytes`; the CNN is abstract)."""
  config, dataset = run_info
  input_shape = tuple(dataset["image_shape"])
  cnn = flops.baseline_model(config.model, dataset["num_classes"], input_shape)
  return {p: flops.stored_bytes(cnn, input_shape, p) for p in dict.fromkeys(("float32", precision))}


def _bytes_line(model: InferenceModel, dense: Mapping[str, int]) -> str:
  """The exported model's bytes beside its dense CNN's (float32, and at the model's precision)."""
  def size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"
  line = (f"stored: {size(precision_lib.model_bytes(model))} ({model.precision}); dense CNN "
          f"{size(dense['float32'])} float32")
  if model.precision != "float32":
    line += f", {size(dense[model.precision])} {model.precision}"
  return line


if __name__ == "__main__":
  define_flags()
  cli.run(main)
