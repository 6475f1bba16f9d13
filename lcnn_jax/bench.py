"""Wall-clock inference of the dense CNN against its LCNN, on every backend and on the chosen mix.

    python -m lcnn_jax.bench --model alexnet --preset fast --batch 32 [--checkpoint WORKDIR] [--json] [--layers]

Both models run exported (:mod:`lcnn_jax.inference`: BatchNorm folded, one jitted function each) in the same
process on the same device, with freed memory kept in the heap (:mod:`lcnn_jax.inference.allocator`); each
time is the median of interleaved calls after a warm-up. Without a checkpoint
the weights are random and the LCNN's sparsity is synthetic, at the paper's operating point: one density shared
by every lookup layer, solved so that the multiplication count (:mod:`lcnn_jax.flops`) gives the paper's
speedup over the CNN (AlexNet 37.6× fast, 3.2× accurate; ResNet-18 29.2× and 5.0×), non-zeros at random
positions. The LCNN's dictionary sizes are those of ``configs/<model>_<preset>.py``.

``--baselines xla,onnxruntime,torch,openvino`` also times the dense CNN on the other engines a user might deploy
it on, in the same interleaved rounds: ONNX Runtime runs the CNN's ONNX export
(:mod:`lcnn_jax.inference.onnx_export`, NCHW, one intra-op thread per core, as XLA) and, for comparison, the
LCNN's (lookup forms measured at the batch size); PyTorch runs the same ONNX graph translated to PyTorch
operations, traced, frozen and optimised for inference (oneDNN, channels-last;
:mod:`lcnn_jax.inference.torch_engine`); OpenVINO compiles the same ONNX graph for the CPU with as many threads
(:mod:`lcnn_jax.inference.openvino_engine`: hint ``LATENCY`` at batch 1, ``THROUGHPUT`` above) twice, in the
device's default inference precision and in f32, each row named by the precision it computes in (``openvino
(bf16)`` and ``openvino (f32)``; one row, ``openvino (f32, default)``, where the default is f32), its logits
checked against the exported CNN's first; OpenVINO also runs the LCNN's ONNX export in the same precisions, each
lookup layer in the form (dense or factored) that OpenVINO runs faster at that batch and precision. An engine
that is not installed is reported as skipped, with the reason. The headline is the LCNN's (auto mix) speedup
over the fastest float32 dense engine, and beside it over the fastest dense engine in any precision (a bf16
OpenVINO row included).

At batch 1, where the chosen mix can run its leading layers in one kernel call (:mod:`lcnn_jax.inference.chain`;
the tuner times that against a call per layer and keeps the faster), the row ``auto-per-layer`` (or
``auto-one-call``) times the same mix the other way, in the same rounds; at larger
batches, where layers add residuals and apply ReLUs as they store their outputs, ``auto-unfused`` times the same
mix with XLA doing those (``lookup-…`` rows likewise when the chosen mix is not all ``lookup``).

The table's first line names the machine (:func:`lcnn_jax.inference.machine.describe`: CPU, cores, caches, the
lookup kernel's ISA).

``--json`` prints ``{"machine": {"cpu", "kernel_arch", "march", "l1_bytes", "l2_bytes", "l3_bytes", "cores"},
"rows": [{"model", "preset", "batch", "backend", "dense_ms", "lcnn_ms", "wall_speedup", "count_speedup",
"fastest_dense_engine", "fastest_dense_ms", "wall_speedup_vs_fastest", "precision"}, ...], "baselines": {engine:
{"dense_ms", "precision"} or {"skipped"}}, "headline": {"lcnn_ms", "fastest_dense_engine", "fastest_dense_ms",
"wall_speedup", "fastest_dense_any_precision", "fastest_dense_any_precision_ms",
"wall_speedup_vs_fastest_any_precision", "count_speedup", "fastest_lcnn_engine", "fastest_lcnn_ms",
"fastest_lcnn_wall_speedup", "fastest_lcnn_any_precision", "fastest_lcnn_any_precision_ms",
"fastest_lcnn_any_precision_precision", "fastest_lcnn_vs_fastest_dense_any_precision"}, "lcnn_engines": {engine:
{"lcnn_ms", "precision"}}, "lcnn_onnxruntime": {"lcnn_ms", "lookup_forms", "lookup_form_ms"}, "lcnn_openvino":
{engine: {"lcnn_ms", "lookup_forms", "lookup_form_ms"}}}`` (``dense_ms`` and ``wall_speedup`` are against XLA:CPU;
``fastest_dense_*`` among the float32 engines; the ``fastest_lcnn_*`` figures name the fastest way to run the LCNN
— this runtime's mix, its bf16/int8 storage, its ONNX export on ONNX Runtime or OpenVINO — in float32 against
the fastest float32 dense engine, and in any precision against the fastest dense engine in any precision;
``"auto_backends_by_precision"``: the mix tuned for each further ``--precision``; ``"xla_convolutions"``: who
runs the dense convolutions XLA compiles in the CNN and in the LCNN, ``default`` or ``xla``, each measured
faster here, :func:`lcnn_jax.inference.tuning.choose_convolutions`); ``--layers`` adds the chosen
mix's per-layer times against each layer's memory-traffic, arithmetic and (lookup kernel) L2-bandwidth floors,
measured on this machine, and names the floor that binds (``"layers"``: ``memory_floor_ms``,
``arithmetic_floor_ms``, ``l2_floor_ms``, ``binding_floor``, ``floor_ratio``; ``"floors"``: ``bandwidth_gbs``,
``l2_bandwidth_gbs``, ``macs_per_s``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from flax import nnx

from lcnn_jax import checkpoint as checkpoint_lib
from lcnn_jax import cli, config as config_lib, flops, layers, models
from lcnn_jax.inference import allocator
from lcnn_jax.inference import backends as backends_lib
from lcnn_jax.inference import exporter, kernels, onnx_export, openvino_engine, torch_engine
from lcnn_jax.inference import layouts, machine, tracing, tuning
from lcnn_jax.inference import precision as precision_lib
from lcnn_jax.inference import model as model_lib
from lcnn_jax.inference.model import InferenceModel
from lcnn_jax.inference.records import ConvLayer, LinearLayer, LookupLayer, layer_arrays

CONFIGS = {("alexnet", "fast"): "alexnet_fast.py", ("alexnet", "accurate"): "alexnet_accurate.py",
           ("resnet18", "fast"): "resnet18_fast.py", ("resnet18", "accurate"): "resnet18_accurate.py"}
PAPER_SPEEDUPS = {("alexnet", "fast"): 37.6, ("alexnet", "accurate"): 3.2, ("resnet18", "fast"): 29.2,
                  ("resnet18", "accurate"): 5.0}
IMAGE_SHAPE = (224, 224, 3)
NUM_CLASSES = 1000
BASELINES = ("xla", "onnxruntime", "torch", "openvino")
"""Engines that can run the dense CNN; XLA:CPU (this package's runtime) is always timed."""

def preset_config(model: str, preset: str) -> ml_collections.ConfigDict:
  """The run config of the preset ``configs/<model>_<preset>.py`` (shipped as ``lcnn_jax.configs``)."""
  return config_lib.load(CONFIGS[(model, preset)][:-3])


def _lookup_modules(model: nnx.Module) -> list:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.LOOKUP_LAYERS)]


def solve_density(lcnn: nnx.Module, baseline_count: flops.MultiplicationCount, target_speedup: float,
                  input_shape: Sequence[int]) -> float:
  """The density d of P, shared by all lookup layers, at which count(CNN) / count(LCNN) = target_speedup.

  The count is linear in d: the dictionary stages and dense layers are fixed, each P costs d times its full cost.
  """
  fixed = full = 0.0
  for row in flops.count_multiplications(lcnn, input_shape).rows:
    if row.dictionary_size is None:
      fixed += row.multiplications
    else:
      fixed += row.dictionary_multiplications
      full += (row.multiplications - row.dictionary_multiplications) / max(row.density, 1e-12)
  density = (baseline_count.total / target_speedup - fixed) / full
  if not 0 < density <= 1:
    raise ValueError(f"No density reaches {target_speedup}x: the dictionaries and dense layers alone cost "
                     f"{fixed:,.0f} of the {baseline_count.total / target_speedup:,.0f} multiplications allowed.")
  return density


def set_random_sparsity(lcnn: nnx.Module, density: float, rng: np.random.Generator) -> None:
  """Gives every lookup layer round(density · size) non-zero coefficients at random positions, all above τ."""
  for module in _lookup_modules(lcnn):
    shape = module.coefficients.shape
    size = int(np.prod(shape))
    bound = 1 / np.sqrt(size / shape[-1])  # the layer's init bound, 1/√(kh·kw·k)
    magnitudes = rng.uniform(max(2 * module.threshold, bound / 4), bound, size)
    values = np.zeros(size, np.float32)
    chosen = rng.choice(size, int(round(density * size)), replace=False)
    values[chosen] = (magnitudes[chosen] * rng.choice([-1.0, 1.0], chosen.size)).astype(np.float32)
    module.coefficients[...] = jnp.asarray(values.reshape(shape))


@dataclasses.dataclass
class Setup:
  """The two models of one benchmark and the LCNN's multiplication speedup."""
  dense: InferenceModel
  lcnn: InferenceModel
  lcnn_module: nnx.Module
  count_speedup: float
  density: float | None


def build(model: str, preset: str, batch: int, checkpoint: str | None, seed: int,
          precision: str = "float32") -> Setup:
  """Random (or restored) CNN and LCNN, the LCNN's sparsity set, both exported; the LCNN tuned for ``batch``."""
  rng = np.random.default_rng(seed)
  density = None
  if checkpoint:
    lcnn_module, config, _ = checkpoint_lib.restore_model(checkpoint)
    _, dataset = checkpoint_lib.load_run_info(checkpoint)
    input_shape, num_classes = tuple(dataset["image_shape"]), dataset["num_classes"]
  else:
    config = preset_config(model, preset)
    input_shape, num_classes = IMAGE_SHAPE, NUM_CLASSES
    lcnn_module = models.create_model(config.model, num_classes=num_classes, input_shape=input_shape,
                                      rngs=nnx.Rngs(seed))
  dense_module = models.create_model(models.baseline_config(config.model), num_classes=num_classes,
                                     input_shape=input_shape, rngs=nnx.Rngs(seed + 1))
  baseline_count = flops.count_multiplications(dense_module, input_shape)
  if not checkpoint:
    density = solve_density(lcnn_module, baseline_count, PAPER_SPEEDUPS[(model, preset)], input_shape)
    set_random_sparsity(lcnn_module, density, rng)
  count_speedup = flops.count_multiplications(lcnn_module, input_shape).speedup_over(baseline_count)
  dense = exporter.inference_model(dense_module, input_shape, backends="dense")
  dense, _ = tuning.choose_convolutions(dense, batch)  # the faster way to run its convolutions here, as the LCNN
  lcnn = exporter.inference_model(lcnn_module, input_shape, backends="auto", batch_size=batch, precision=precision)
  return Setup(dense, lcnn, lcnn_module, count_speedup, density)


class OnnxRuntimeEngine:
  """An exported model's ONNX form on ONNX Runtime, called like an :class:`InferenceModel` (NHWC images).

  The images are given to the session in NCHW once, outside the timed calls (an ONNX user feeds NCHW)."""

  def __init__(self, model: InferenceModel, batch: int, threads: int):
    forms, timings = (onnx_export.choose_lookup_forms(model, batch, threads=threads) if model.lookup_layers
                      else ({}, {}))
    self.lookup_forms, self.lookup_form_ms = forms, timings  # per lookup layer: form; {form: ms}
    self.session = onnx_export.session(onnx_export.to_onnx(model, forms), threads)
    self._images = None

  def __call__(self, images: jax.Array) -> np.ndarray:
    if self._images is None or self._images[0] is not images:
      self._images = (images, np.ascontiguousarray(np.transpose(np.asarray(images), (0, 3, 1, 2))))
    return self.session.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: self._images[1]})[0]


def cpu_threads() -> int:
  """The cores this process may run on: ONNX Runtime gets one intra-op thread per core, as XLA:CPU uses."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@dataclasses.dataclass(frozen=True)
class DenseEngine:
  """The dense CNN on one engine: called on NHWC images, computing in ``precision`` (float32, bfloat16, ...)."""
  run: Callable[[Any], Any]
  precision: str = "float32"


def _openvino_engines(setup: Setup, batch: int) -> dict[str, DenseEngine]:
  """OpenVINO in the device's default precision and in f32, named by what each computes in: 'openvino (bf16)'
  and 'openvino (f32)', or 'openvino (f32, default)' alone where the default is f32."""
  default = openvino_engine.OpenVinoEngine(setup.dense, batch, cpu_threads())
  if default.precision == "f32":
    return {"openvino (f32, default)": DenseEngine(default, default.dtype)}
  forced = openvino_engine.OpenVinoEngine(setup.dense, batch, cpu_threads(), precision="f32")
  return {f"openvino ({default.precision})": DenseEngine(default, default.dtype),
          f"openvino ({forced.precision})": DenseEngine(forced, forced.dtype)}


def dense_engines(setup: Setup, baselines: Sequence[str], batch: int) -> tuple[dict[str, DenseEngine],
                                                                               dict[str, str]]:
  """The dense CNN on each baseline engine that can run here (by row name), and the reason for each that cannot."""
  engines, skipped = {"xla": DenseEngine(setup.dense)}, {}
  if "onnxruntime" in baselines:
    try:
      engines["onnxruntime"] = DenseEngine(OnnxRuntimeEngine(setup.dense, batch, cpu_threads()))
    except onnx_export.OnnxUnavailable as e:
      skipped["onnxruntime"] = str(e)
  if "torch" in baselines:
    try:
      engines["torch"] = DenseEngine(torch_engine.TorchEngine(setup.dense, batch, cpu_threads()))
    except (torch_engine.TorchUnavailable, onnx_export.OnnxUnavailable) as e:
      skipped["torch"] = str(e)
  if "openvino" in baselines:
    try:
      engines.update(_openvino_engines(setup, batch))
    except (openvino_engine.OpenVinoUnavailable, onnx_export.OnnxUnavailable) as e:
      skipped["openvino"] = str(e)
  return engines, skipped


def time_models(models_by_name: dict[str, Any], images: jax.Array, seconds: float) -> dict[str, float]:
  """Median milliseconds per model (any callable on NHWC images): each warmed up, then timed in interleaved
  rounds until ``seconds`` pass.

  A model whose warm-up call took over ``tuning.GIVE_UP`` times the fastest one's keeps that single time.
  """
  calls, warm = {}, {}
  for name, model in models_by_name.items():
    calls[name] = lambda model=model: jax.block_until_ready(model(images))
    for _ in range(2):
      begin = time.perf_counter()
      calls[name]()
    warm[name] = time.perf_counter() - begin
  fastest = min(warm.values())
  slow = {name: t * 1e3 for name, t in warm.items() if t > tuning.GIVE_UP * fastest}
  timed = tuning.interleaved_ms({name: call for name, call in calls.items() if name not in slow}, warmup=0,
                                min_seconds=seconds, min_rounds=3, max_rounds=50)
  return {**timed, **slow}


def l2_lookup_rate_gbs() -> float | None:
  """The lookup kernel's own rate of reading S from L2 (GB/s, every core): one call of lookups in which each of
  64 outputs reads every row of a 64-atom S that fits this core's L2 tile (4 bytes of S per multiply-add); None
  where the kernel is unavailable."""
  if not kernels.kernel_available()[0]:
    return None
  atoms = outputs = 64
  batch = 32
  width = max(1, machine.tile_budget_bytes() // (4 * atoms * batch))  # S (atoms, 1, width, batch) fills the tile
  s = jnp.asarray(np.random.default_rng(0).standard_normal((atoms, 1, width, batch), np.float32))
  lookups = (jnp.arange(0, outputs * atoms + 1, atoms, dtype=jnp.int32),
             jnp.tile(jnp.arange(atoms, dtype=jnp.int32) * width, outputs), jnp.ones(outputs * atoms, jnp.float32),
             jnp.ones(outputs, jnp.float32), jnp.zeros(outputs, jnp.float32))
  call = jax.jit(lambda v: kernels.lookup_conv(v, lookups, out_shape=(outputs, 1, width, batch), scratch_size=0,
                                                padding=(0, 0), strides=(1, 1), output_size=(1, width)))
  seconds = tuning.median_ms(lambda: jax.block_until_ready(call(s)), min_reps=10) / 1e3
  return 4 * outputs * atoms * width * batch / seconds / 1e9


def machine_floors() -> dict[str, float]:
  """Measured streaming bandwidth from memory and from this core's L2 (GB/s) and float32 matmul throughput
  (G multiply-adds/s) of the device."""
  big = jnp.ones((32 * 2**20,), jnp.float32)  # 128 MB, beyond any cache
  total = jax.jit(jnp.sum)
  seconds = tuning.median_ms(lambda: jax.block_until_ready(total(big)), min_reps=5) / 1e3
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul_seconds = tuning.median_ms(lambda: jax.block_until_ready(matmul(a)), min_reps=5) / 1e3
  return {"bandwidth_gbs": big.nbytes / seconds / 1e9, "l2_bandwidth_gbs": l2_lookup_rate_gbs(),
          "macs_per_s": n**3 / matmul_seconds / 1e9}


def _dense_layer_time(layer: ConvLayer | LinearLayer, input_shape: tuple, batch: int) -> float:
  params = {k: jnp.asarray(v) for k, v in model_lib.device_arrays(layer).items()}  # as the model holds them
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *input_shape[1:]), np.float32))
  fn = jax.jit(lambda p, v: model_lib.run_layer(layer, None, p, (v, layouts.NHWC))[0])
  return tuning.median_ms(lambda: jax.block_until_ready(fn(params, x)))


def layer_breakdown(setup: Setup, batch: int, floors: dict[str, float]) -> list[dict[str, Any]]:
  """Each layer of the chosen mix alone: its time, multiply-adds and bytes, and the floors they imply."""
  _, calls = tracing.trace(setup.lcnn_module, setup.lcnn.input_shape)
  rows = []
  for name, layer in setup.lcnn.layers.items():
    if isinstance(layer, LookupLayer):
      backend = setup.lcnn.backends[name]
      ms = tuning.time_layer(layer, backend, batch)
      (oh, ow), (h, w) = layer.output_size, layer.input_size
      count = layer.multiplications()
      macs = count.total * batch
      # The lookups read one float of S per multiply-add, from L2 at best (a tile's S does not fit L1).
      l2_ms = (4 * (count.total - count.dictionary) * batch / floors["l2_bandwidth_gbs"] / 1e6
               if isinstance(backends_lib.get_backend(backend), backends_lib.Lookup) and floors["l2_bandwidth_gbs"]
               else None)
      weight_bytes = backends_lib.coefficient_bytes(layer)
      activation_bytes = 4 * batch * (layer.in_features * h * w + layer.out_features * oh * ow)
    elif isinstance(layer, (ConvLayer, LinearLayer)):
      backend = "dense"
      shape = calls[name].input_shape
      ms = _dense_layer_time(layer, shape, batch)
      l2_ms = None
      out = calls[name].output_shape
      macs = int(np.prod(out[1:])) * int(np.prod(layer.kernel.shape[:-1])) * batch
      weight_bytes = sum(a.nbytes for a in layer_arrays(layer).values())
      activation_bytes = 4 * batch * (int(np.prod(shape[1:])) + int(np.prod(out[1:])))
    else:
      continue
    memory_ms = (weight_bytes + activation_bytes) / floors["bandwidth_gbs"] / 1e6
    arithmetic_ms = macs / floors["macs_per_s"] / 1e6
    floors_ms = {"memory": memory_ms, "arithmetic": arithmetic_ms, **({"l2": l2_ms} if l2_ms is not None else {})}
    binding = max(floors_ms, key=floors_ms.get)
    rows.append({"layer": name, "backend": backend, "ms": ms, "macs": macs, "bytes": weight_bytes + activation_bytes,
                 "memory_floor_ms": memory_ms, "arithmetic_floor_ms": arithmetic_ms, "l2_floor_ms": l2_ms,
                 "binding_floor": binding, "floor_ratio": ms / floors_ms[binding]})
  return rows


def without_epilogues(model: InferenceModel) -> InferenceModel:
  """``model`` with its residual additions and ReLUs run by XLA instead of the layers' epilogues."""
  fusion = dataclasses.replace(model.graph.fusion, epilogues={})
  return InferenceModel(dataclasses.replace(model.graph, fusion=fusion), model.layers, input_shape=model.input_shape,
                        backends=model.backends)


def _unfused_variants(model: InferenceModel, name: str, batch: int) -> dict[str, InferenceModel]:
  """The same model with this package's whole-graph fusions switched the other way, to time them side by side:
  at batch 1 with a kernel call per layer instead of the one-call chain (``<name>-per-layer``), or, where the
  tuner chose a call per layer, in one call (``<name>-one-call``); with residual additions and ReLUs run by XLA
  instead of the kernels' epilogues (``<name>-unfused``). Only those that differ from ``model``."""
  variants = {}
  if batch == 1:
    other = model.with_backends(model.backends, chain=model.chain is None)
    if (other.chain is None) != (model.chain is None):  # the layers allow one call
      variants[f"{name}-{'per-layer' if other.chain is None else 'one-call'}"] = other
  if batch > 1 and model.graph.fusion is not None and model.graph.fusion.epilogues:
    variants[f"{name}-unfused"] = without_epilogues(model)
  return variants


def run(model: str, preset: str, batch: int, *, checkpoint: str | None = None,
        backend_names: Sequence[str] | None = None, seconds: float = 20.0, seed: int = 0,
        with_layers: bool = False, baselines: Sequence[str] = ("xla",),
        precisions: Sequence[str] = ("float32",)) -> dict[str, Any]:
  """The benchmark's rows (and, ``with_layers``, the chosen mix's per-layer breakdown).

  ``baselines``: the engines the dense CNN runs on (:data:`BASELINES`; XLA always); the rows' speedups are
  also given against the fastest of them that computes in float32 (the headline's also against the fastest in
  any precision). The LCNN's weights are stored in ``precisions[0]`` (the CNN's stay
  float32); each further precision adds an ``auto`` row of the LCNN stored in that precision, its backends tuned
  for it (a bfloat16 or int8 export may keep S in bfloat16, ``lookup:s=bfloat16``, where that measures faster),
  timed in the same rounds."""
  unknown = sorted(set(baselines) - set(BASELINES))
  if unknown:
    raise ValueError(f"--baselines: unknown engine(s) {unknown}; expected some of {', '.join(BASELINES)}.")
  precision = precisions[0]
  logging.info("Building the CNN and the LCNN and measuring each lookup layer's backends at batch %d ...", batch)
  setup = build(model, preset, batch, checkpoint, seed, precision)
  if checkpoint:  # the rows name the checkpoint's model, not the --model/--preset it ignores
    model, preset = checkpoint_lib.load_run_info(checkpoint)[0].model.name, "trained"
  names = [b for b in (backend_names or backends_lib.BACKENDS) if b in backends_lib.available_backends()]
  engines, skipped = dense_engines(setup, baselines, batch)
  variants = {"cnn": setup.dense, **{f"cnn:{e}": engine.run for e, engine in engines.items() if e != "xla"},
              **{b: setup.lcnn.with_backends(b) for b in names}, "auto": setup.lcnn,
              **{f"auto {p}": exporter.inference_model(setup.lcnn_module, setup.lcnn.input_shape, backends="auto",
                                                       batch_size=batch, precision=p) for p in precisions[1:]}}
  variants.update(_unfused_variants(setup.lcnn, "auto", batch))
  if "lookup" in variants and set(setup.lcnn.backends.values()) != {"lookup"}:
    variants.update(_unfused_variants(variants["lookup"], "lookup", batch))
  if "onnxruntime" in engines:  # the LCNN's own ONNX export on the same engine, for comparison
    variants["lcnn:onnxruntime"] = OnnxRuntimeEngine(setup.lcnn, batch, cpu_threads())
  lcnn_precisions = {"auto": precision, **{f"auto {p}": p for p in precisions[1:]},
                     "lcnn:onnxruntime": "float32"}
  for name, engine in engines.items():  # the LCNN's ONNX export on OpenVINO, in each precision it computes in
    if name.startswith("openvino"):
      lcnn_engine = openvino_engine.OpenVinoEngine(setup.lcnn, batch, cpu_threads(),
                                                   precision=None if "f32" not in name else "f32",
                                                   lookup_forms="auto")
      variants[f"lcnn:{name}"] = lcnn_engine
      lcnn_precisions[f"lcnn:{name}"] = lcnn_engine.dtype
  images = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *setup.dense.input_shape), np.float32))
  logging.info("Timing %d variants for about %.3g s: %s", len(variants), seconds, ", ".join(variants))
  times = time_models(variants, images, seconds)
  dense_ms = {e: times["cnn" if e == "xla" else f"cnn:{e}"] for e in engines}
  # float32 LCNN rows against float32 engines; the headline also names the fastest in any precision
  fastest = min((e for e in dense_ms if engines[e].precision == "float32"), key=dense_ms.get)
  fastest_any = min(dense_ms, key=dense_ms.get)
  rows = [{"model": model, "preset": preset, "batch": batch, "backend": b, "dense_ms": times["cnn"],
           "lcnn_ms": times[b], "wall_speedup": times["cnn"] / times[b], "count_speedup": setup.count_speedup,
           "fastest_dense_engine": fastest, "fastest_dense_ms": dense_ms[fastest],
           "wall_speedup_vs_fastest": dense_ms[fastest] / times[b],
           "precision": b.split(" ")[1] if " " in b else precision}
          for b in [*names, "auto", *(f"auto {p}" for p in precisions[1:]),
                    *(v for v in variants if v.endswith(("-per-layer", "-one-call", "-unfused")))]]
  result = {"machine": machine.describe().as_dict(), "rows": rows, "device": tuning.device_name(),
            "density": setup.density, "precision": precision, "auto_backends": setup.lcnn.backends,
            "xla_convolutions": {"cnn": setup.dense.convolutions, "lcnn": setup.lcnn.convolutions},
            **({"auto_backends_by_precision": {p: variants[f"auto {p}"].backends for p in precisions[1:]}}
               if precisions[1:] else {}),
            "baselines": {**{e: {"dense_ms": ms, "precision": engines[e].precision} for e, ms in dense_ms.items()},
                          **{e: {"skipped": reason} for e, reason in skipped.items()}},
            "headline": {"lcnn_ms": times["auto"], "fastest_dense_engine": fastest,
                         "fastest_dense_ms": dense_ms[fastest], "wall_speedup": dense_ms[fastest] / times["auto"],
                         "fastest_dense_any_precision": fastest_any,
                         "fastest_dense_any_precision_ms": dense_ms[fastest_any],
                         "wall_speedup_vs_fastest_any_precision": dense_ms[fastest_any] / times["auto"],
                         "count_speedup": setup.count_speedup}}
  # The fastest float32 way to run this LCNN (this runtime's mix, or its own ONNX export on ONNX Runtime or
  # OpenVINO, whose dense convolutions at batch 1 beat XLA's on some CPUs) against the fastest float32 dense
  # engine; and the fastest in any precision (its bf16/int8 storage here, bf16 on OpenVINO) against the fastest
  # dense engine in any precision.
  lcnn_engines = {engine: times[engine] for engine in lcnn_precisions if engine in times}
  best = min((e for e in lcnn_engines if lcnn_precisions[e] == "float32"), key=lcnn_engines.get, default="auto")
  best_any = min(lcnn_engines, key=lcnn_engines.get)
  result["headline"].update(
      fastest_lcnn_engine=best, fastest_lcnn_ms=lcnn_engines[best],
      fastest_lcnn_wall_speedup=dense_ms[fastest] / lcnn_engines[best],
      fastest_lcnn_any_precision=best_any, fastest_lcnn_any_precision_ms=lcnn_engines[best_any],
      fastest_lcnn_any_precision_precision=lcnn_precisions[best_any],
      fastest_lcnn_vs_fastest_dense_any_precision=dense_ms[fastest_any] / lcnn_engines[best_any])
  result["lcnn_engines"] = {e: {"lcnn_ms": ms, "precision": lcnn_precisions[e]} for e, ms in lcnn_engines.items()}
  exported = {name: {"lcnn_ms": times[name], "lookup_forms": variants[name].lookup_forms,
                      "lookup_form_ms": variants[name].lookup_form_ms}
              for name in variants if name.startswith("lcnn:")}  # the LCNN's ONNX export on each engine
  if "lcnn:onnxruntime" in exported:
    result["lcnn_onnxruntime"] = exported.pop("lcnn:onnxruntime")
  if exported:
    result["lcnn_openvino"] = {name.removeprefix("lcnn:"): value for name, value in exported.items()}
  if with_layers:
    floors = machine_floors()
    result["floors"] = floors
    result["layers"] = layer_breakdown(setup, batch, floors)
  return result


def format_table(result: dict[str, Any]) -> str:
  """The rows (and the layer breakdown when present) as fixed-width text."""
  width = max([9, *(len(r["model"]) for r in result["rows"])])  # a trained checkpoint's model: digits-lcnn, ...
  lines = [machine.Machine(**result["machine"]).line()] if "machine" in result else []
  lines += [f"device {result['device']}; synthetic density {result['density']:.4f}" if result["density"] else
            f"device {result['device']}; trained checkpoint",
            f"{'model':<{width}} {'preset':<9} {'batch':>5} {'backend':<13} {'dense ms':>10} {'lcnn ms':>10} "
            f"{'wall x':>8} {'count x':>8}"]
  for r in result["rows"]:
    lines.append(f"{r['model']:<{width}} {r['preset']:<9} {r['batch']:>5} {r['backend']:<13} {r['dense_ms']:>10.3f} "
                 f"{r['lcnn_ms']:>10.3f} {r['wall_speedup']:>8.2f} {r['count_speedup']:>8.2f}")
  lines.append("auto: " + ", ".join(f"{k}={v}" for k, v in result["auto_backends"].items()))
  if "xla_convolutions" in result:
    lines.append("XLA's dense convolutions run by: " + ", ".join(f"{k} {v}" for k, v in
                                                                   result["xla_convolutions"].items()))
  for p, mix in result.get("auto_backends_by_precision", {}).items():
    lines.append(f"auto {p}: " + ", ".join(f"{k}={v}" for k, v in mix.items()))
  if "baselines" in result:
    lines.append("dense CNN: " + ", ".join(f"{e} {b['dense_ms']:.3f} ms" if "dense_ms" in b else
                                           f"{e} skipped ({b['skipped']})" for e, b in result["baselines"].items()))
    exported = {**({"onnxruntime": result["lcnn_onnxruntime"]} if "lcnn_onnxruntime" in result else {}),
                **result.get("lcnn_openvino", {})}
    for engine, run_ in exported.items():
      lines.append(f"LCNN on {engine}: {run_['lcnn_ms']:.3f} ms (lookups: "
                   + ", ".join(f"{k}={v}" for k, v in run_["lookup_forms"].items()) + ")")
    h = result["headline"]
    lines.append(f"headline: LCNN (auto) {h['lcnn_ms']:.3f} ms vs the fastest float32 dense engine, "
                 f"{h['fastest_dense_engine']} {h['fastest_dense_ms']:.3f} ms: {h['wall_speedup']:.2f}x wall (count "
                 f"{h['count_speedup']:.2f}x)")
    if h["fastest_lcnn_engine"] != "auto":
      lines.append(f"  the LCNN's fastest float32 engine here is {h['fastest_lcnn_engine']}, "
                   f"{h['fastest_lcnn_ms']:.3f} ms: {h['fastest_lcnn_wall_speedup']:.2f}x the fastest float32 dense "
                   "engine")
    if h["fastest_dense_any_precision"] != h["fastest_dense_engine"]:
      lines.append(f"  vs the fastest dense engine in any precision, {h['fastest_dense_any_precision']} "
                   f"{h['fastest_dense_any_precision_ms']:.3f} ms: {h['wall_speedup_vs_fastest_any_precision']:.2f}x")
    if (h["fastest_lcnn_any_precision"], h["fastest_dense_any_precision"]) != ("auto", h["fastest_dense_engine"]):
      lines.append(f"  in any precision: the LCNN's fastest, {h['fastest_lcnn_any_precision']} "
                   f"({h['fastest_lcnn_any_precision_precision']}) {h['fastest_lcnn_any_precision_ms']:.3f} ms, is "
                   f"{h['fastest_lcnn_vs_fastest_dense_any_precision']:.2f}x the fastest dense, "
                   f"{h['fastest_dense_any_precision']}")
  if "layers" in result:
    f = result["floors"]
    l2_rate = "-" if f["l2_bandwidth_gbs"] is None else f"{f['l2_bandwidth_gbs']:.1f}"
    lines.append(f"floors: {f['bandwidth_gbs']:.1f} GB/s streaming, {l2_rate} GB/s lookups from L2, "
                 f"{f['macs_per_s']:.1f} G multiply-adds/s")
    lines.append(f"{'layer':<18} {'backend':<20} {'ms':>9} {'M mult-adds':>12} {'MB':>8} {'mem floor':>10} "
                 f"{'math floor':>10} {'L2 floor':>9} {'binds':>10} {'x floor':>8}")
    for r in result["layers"]:
      l2 = "-" if r["l2_floor_ms"] is None else f"{r['l2_floor_ms']:.3f}"
      lines.append(f"{r['layer']:<18} {r['backend']:<20} {r['ms']:>9.3f} {r['macs'] / 1e6:>12.1f} "
                   f"{r['bytes'] / 1e6:>8.1f} {r['memory_floor_ms']:>10.3f} {r['arithmetic_floor_ms']:>10.3f} "
                   f"{l2:>9} {r['binding_floor']:>10} {r['floor_ratio']:>8.1f}")
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none, so it never clashes with another
  command's."""
  flags.DEFINE_enum("model", "alexnet", ["alexnet", "resnet18"], "The network.", flag_values=flag_values)
  flags.DEFINE_enum("preset", "fast", ["fast", "accurate"], "The paper's operating point.", flag_values=flag_values)
  flags.DEFINE_integer("batch", 1, "Images per call.", flag_values=flag_values)
  flags.DEFINE_string("checkpoint", None, "A run's workdir: benchmark its trained LCNN instead.",
                      flag_values=flag_values)
  flags.DEFINE_list("backends", None, "Backends to run every lookup layer on (default: every available one).",
                    flag_values=flag_values)
  flags.DEFINE_list("baselines", ["xla"], f"Engines to run the dense CNN on, among {', '.join(BASELINES)} (XLA "
                    "always; openvino gives a row in the device's default precision and one in f32); the headline "
                    "speedup is against the fastest float32 one, and beside it the fastest in any precision.",
                    flag_values=flag_values)
  flags.DEFINE_bool("json", False, "Print the result as JSON instead of a table.", flag_values=flag_values)
  flags.DEFINE_bool("layers", False, "Also time the chosen mix layer by layer against its floors.",
                    flag_values=flag_values)
  flags.DEFINE_float("seconds", 20.0, "Time budget of the timed calls, all models together.", flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Seed of the random weights, sparsity pattern and images.", flag_values=flag_values)
  flags.DEFINE_list("precision", ["float32"], "How the LCNN's weights are stored and computed from: float32, "
                    "bfloat16 or int8 (the CNN stays float32); a list adds a row of the chosen mix per further "
                    "precision, timed in the same rounds.", flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The ``python -m lcnn_jax.bench`` command, on its parsed flags (``flag_values``); raises
  :class:`~lcnn_jax.cli.UsageError` for a user mistake."""
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {list(argv[1:])}; see --help for the flags.")
  unknown = [p for p in flag_values.precision if p not in precision_lib.PRECISIONS]
  if unknown or not flag_values.precision:
    raise cli.UsageError(f"--precision={','.join(flag_values.precision)}: expected a list of "
                         f"{', '.join(precision_lib.PRECISIONS)}.")
  allocator.reuse_freed_memory()  # before XLA's threads allocate: both models run with it
  try:
    if flag_values.checkpoint:  # a directory that is not a run, named before any work
      checkpoint_lib.load_run_info(flag_values.checkpoint)
      checkpoint_lib.resolve_step_dir(flag_values.checkpoint)
    result = run(flag_values.model, flag_values.preset, flag_values.batch, checkpoint=flag_values.checkpoint,
                 backend_names=flag_values.backends, seconds=flag_values.seconds, seed=flag_values.seed,
                 with_layers=flag_values.layers, baselines=flag_values.baselines,
                 precisions=flag_values.precision)
  except (ValueError, FileNotFoundError) as e:
    raise cli.UsageError(str(e)) from None
  sys.stdout.write((json.dumps(result, indent=1) if flag_values.json else format_table(result)) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
