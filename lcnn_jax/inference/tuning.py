"""Choosing each lookup layer's backend by measurement, for the device and batch size at hand.

Each candidate backend runs the layer alone on random input (in the backend's own layout) after a warm-up;
the median wall-clock time decides. Timings are cached in ``$LCNN_JAX_CACHE/tuning.json`` under the device,
the JAX version, the batch size and the layer's shape and number of non-zeros, so exporting the same model
again, or another with the same layers, measures nothing. :func:`tune` then checks the per-layer choice against
each backend used throughout, on the whole model. A backend may compete with itself in several variants
(:meth:`~lcnn_jax.inference.backends.Backend.tuned_variants`: the ``lookup`` kernel at several tile sizes, sized
from this machine's L2).

A tuning result belongs to the CPU it was measured on: :func:`tune` records :func:`~lcnn_jax.inference.machine.
cpu_key` and the machine's description in ``model.tuning``, and :func:`for_this_machine` (what loading an export
calls) re-tunes a model measured on another CPU once, keeping the result per file and CPU in
``$LCNN_JAX_CACHE/retuned.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Mapping, Sequence

import jax
from jax.experimental.layout import Format, Layout
import jax.numpy as jnp
import numpy as np
from absl import logging

from lcnn_jax.inference import backends as backends_lib
from lcnn_jax.inference import kernels, layouts, machine
from lcnn_jax.inference import model as model_lib
from lcnn_jax.inference.records import LookupLayer


def median_ms(fn: Callable[[], object], *, warmup: int = 2, min_seconds: float = 0.3, min_reps: int = 5,
              max_reps: int = 100, give_up_ms: float | None = None) -> float:
  """Median wall-clock milliseconds of ``fn()`` (which must block until its result is ready).

  With ``give_up_ms``, a candidate whose last warm-up call already took longer is not timed further: that call's
  time is returned (enough to rule it out, without minutes spent on a hopeless backend).
  """
  for _ in range(warmup):
    begin = time.perf_counter()
    fn()
  if give_up_ms is not None and (time.perf_counter() - begin) * 1e3 > give_up_ms:
    return (time.perf_counter() - begin) * 1e3
  times = []
  start = time.perf_counter()
  while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_seconds):
    begin = time.perf_counter()
    fn()
    times.append(time.perf_counter() - begin)
  return float(np.median(times) * 1e3)


def interleaved_ms(fns: Mapping[str, Callable[[], object]], *, warmup: int = 2, min_seconds: float = 1.0,
                   min_rounds: int = 5, max_rounds: int = 200) -> dict[str, float]:
  """Median wall-clock milliseconds of each of ``fns`` (each blocking until its result is ready), timed in
  rounds of one call of each in turn, until ``min_seconds`` and ``min_rounds`` are reached or ``max_rounds``.

  For choosing between close candidates on a noisy machine: a slow spell falls on all of them alike, and each
  call finds the caches as the calls of the others left them, as a model serving among other work does. Timed
  one after another, two whole models that differ by 10% swapped places between runs.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  start, rounds = time.perf_counter(), 0
  while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_seconds):
    for name, fn in fns.items():
      begin = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - begin)
    rounds += 1
  return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def device_name() -> str:
  """The default device, e.g. 'cpu:cpu' or 'gpu:NVIDIA H200'."""
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind}"


def layer_input(layer: LookupLayer, layout: layouts.Layout, batch_size: int, seed: int = 0) -> jax.Array:
  """A random input for ``layer`` held in ``layout``."""
  h, w = layer.input_size
  x = np.random.default_rng(seed).standard_normal((batch_size, h, w, layer.in_features), np.float32)
  return layouts.convert(jnp.asarray(x), layouts.NHWC, layout)


def layer_call(layer: LookupLayer, backend: str, batch_size: int) -> tuple[Callable, tuple]:
  """The jitted call of ``layer`` on ``backend`` that :func:`time_layer` times, and its arguments.

  The output leaves in whichever layout XLA finds cheapest, as it flows into the next layer inside a model. In
  XLA's default layout the lookup kernel's (n, h, w, batch) result, viewed as one tile (1, n, h, w, batch), was
  copied element by element (0.19 of 0.39 ms for conv3 of the fast AlexNet-LCNN at batch 1 on an AMD EPYC Zen 2),
  a copy no model makes, which made the tuner prefer XLA's gathers for the small layers at batch 1."""
  impl = backends_lib.get_backend(backend)
  params = jax.tree.map(jnp.asarray, impl.prepare(layer))
  layout = impl.input_layout(layer, batch_size)
  x = layer_input(layer, layout, batch_size)
  fn = jax.jit(lambda p, v: impl.apply(layer, p, v, layout)[0], out_shardings=Format(Layout.AUTO))
  return fn, (params, x)


def _blocking_layer_call(layer: LookupLayer, backend: str, batch_size: int) -> Callable[[], object]:
  """:func:`layer_call` as one call with no arguments that blocks until the result is ready, for timing."""
  fn, args = layer_call(layer, backend, batch_size)
  return lambda: jax.block_until_ready(fn(*args))


def time_layer(layer: LookupLayer, backend: str, batch_size: int, give_up_ms: float | None = None) -> float:
  """Median milliseconds of one call of ``layer`` on ``backend`` at ``batch_size`` (see :func:`median_ms`)."""
  return median_ms(_blocking_layer_call(layer, backend, batch_size), give_up_ms=give_up_ms)


# How time_layer measures; a change to it makes the timings cached before it stale.
TIMING_METHOD = "output-layout-auto"


def _cache_key(layer: LookupLayer, backend: str, batch_size: int) -> str:
  # The CPU and the kernel build: a cache directory shared between machines, or kept across an update of the
  # kernel, must not hand one build's or one CPU's timings to another.
  parts = [TIMING_METHOD, device_name(), machine.cpu_key(), f"kernel build {kernels.build_id() or 'none'}",
           f"jax{jax.__version__}", backend, f"batch{batch_size}",
           f"m{layer.in_features}k{layer.dictionary_size}n{layer.out_features}",
           f"kernel{layer.kernel_size}strides{layer.strides}padding{layer.padding}input{layer.input_size}",
           f"nnz{layer.nnz}", f"dictionary {layer.dictionary.dtype}", f"values {layer.values.dtype}"]
  return "|".join([*parts, *backends_lib.get_backend(backend).timing_key()])


class TimingCache:
  """Backend timings on disk (a JSON object), read once and written after each new measurement."""

  def __init__(self, path: str | None = None):
    self.path = path or os.path.join(kernels.cache_dir(), "tuning.json")
    try:
      with open(self.path) as f:
        self.entries = json.load(f)
    except (OSError, ValueError):
      self.entries = {}

  def get(self, key: str) -> float | None:
    return self.entries.get(key)

  def put(self, key: str, ms: float) -> None:
    self.entries[key] = ms
    _write_json(self.path, self.entries)


def _write_json(path: str, value) -> None:
  """Writes ``value`` to ``path`` as JSON, atomically (concurrent writers each rename a complete file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.{os.getpid()}.tmp"
  with open(partial, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(partial, path)


PREFERENCE = ("lookup", "pallas", "gemm", "factored", "dense", "gather")
"""The order candidates are timed in: likely winners first, so hopeless ones are given up early."""


def candidate_backends() -> list[str]:
  """The backends tuning considers: every one available on the default device that offers itself to ``auto``
  here (:meth:`~lcnn_jax.inference.backends.Backend.tuned_variants`; ``pallas`` on GPUs only), likely winners
  first."""
  available = [b for b in backends_lib.available_backends() if backends_lib.get_backend(b).tuned_variants()]
  return sorted(available, key=lambda b: PREFERENCE.index(b) if b in PREFERENCE else len(PREFERENCE))


GIVE_UP = 10.0
"""A candidate that takes this many times the best time so far is not timed further."""


def _model_call(model, batch_size: int) -> Callable[[], object]:
  images = jnp.asarray(np.random.default_rng(0).standard_normal((batch_size, *model.input_shape), np.float32))
  return lambda: jax.block_until_ready(model(images))


def model_ms(model, batch_size: int, give_up_ms: float | None = None) -> float:
  """Median milliseconds of one call of an :class:`~lcnn_jax.inference.model.InferenceModel` at ``batch_size``."""
  return median_ms(_model_call(model, batch_size), give_up_ms=give_up_ms)


CLOSE = 1.5
"""Whole-model candidates within this factor of the fastest are timed again side by side before one is kept (at
1.25, a slow spell during one candidate's screening put all-`lookup` at 1.34x the mix, which then ran 6% slower
than it in `bench`)."""

SIDE_BY_SIDE_SECONDS = 1.0
"""How long close candidates are timed side by side (:func:`interleaved_ms`)."""

LAYER_SIDE_BY_SIDE_SECONDS = 0.5
"""How long a layer's close backends are timed side by side (:func:`interleaved_ms`) after each was timed
alone. Timed one after another, the same code (``lookup`` and ``lookup:tile=0`` of fc6 at batch 1, which run
alike) measured 0.998 and 1.164 ms, and chunked lookups, 17-20% faster than ``lookup`` side by side, lost to it."""


def choose_backends(layers: Mapping[str, LookupLayer], batch_size: int, *,
                    candidates: Sequence[str] | None = None,
                    cache: TimingCache | None = None) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
  """The fastest available backend per lookup layer at ``batch_size`` on the default device.

  Args:
    layers: lookup layers by name.
    batch_size: the batch size to optimise for.
    candidates: backends to consider (default: every available one).
    cache: where timings are kept (default: the shared cache file); measured ones are added.
  Returns:
    (backend per layer, milliseconds per layer and backend).
  """
  available = candidate_backends()
  candidates = [b for b in (candidates or available) if b in available]
  if not candidates:
    raise ValueError(f"None of the candidate backends is available here (available: {available}).")
  cache = cache or TimingCache()
  choice, timings = {}, {}
  candidates = [variant for b in candidates for variant in backends_lib.get_backend(b).tuned_variants()]
  built = {variant: backends_lib.get_backend(variant) for variant in candidates}
  for name, layer in layers.items():
    timings[name], fresh = {}, set()
    for backend in candidates:
      if not built[backend].times(layer, batch_size):
        continue
      key = _cache_key(layer, backend, batch_size)
      ms = cache.get(key)
      if ms is None:
        best = min(timings[name].values(), default=None)
        ms = time_layer(layer, backend, batch_size, give_up_ms=best and GIVE_UP * best)
        cache.put(key, ms)
        fresh.add(backend)
      timings[name][backend] = ms
    # Backends within CLOSE of the fastest, one of them measured just now, are timed again side by side; the
    # cache keeps those times, so a layer read from it is not timed again.
    close = [b for b in timings[name] if timings[name][b] <= CLOSE * min(timings[name].values())]
    if len(close) > 1 and fresh & set(close):
      calls = {backend: _blocking_layer_call(layer, backend, batch_size) for backend in close}
      for backend, ms in interleaved_ms(calls, min_seconds=LAYER_SIDE_BY_SIDE_SECONDS).items():
        cache.put(_cache_key(layer, backend, batch_size), ms)
        timings[name][backend] = ms
    choice[name] = min(timings[name], key=timings[name].get)
    logging.info("Layer %s at batch %d: %s -> %s", name, batch_size,
                 ", ".join(f"{b} {t:.3f} ms" for b, t in timings[name].items()), choice[name])
  return choice, timings


def choose_convolutions(model, batch_size: int):
  """``model`` with its dense convolutions run by whichever of XLA's choice and XLA's own emitter
  (:data:`~lcnn_jax.inference.model.CONVOLUTIONS`) is faster here, timed side by side on the whole model at
  ``batch_size``; and those times ({} where nothing was timed: no dense convolution in the model, or the option
  unavailable in this jaxlib)."""
  if not model_lib.xla_convolutions_available()[0] or not model.has_convolutions(batch_size):
    return model, {}
  chain = model.chain is not None
  variants = {name: model if name == model.convolutions else
              model.with_backends(model.backends, chain=chain, convolutions=name)
              for name in model_lib.CONVOLUTIONS}
  times = interleaved_ms({name: _model_call(variant, batch_size) for name, variant in variants.items()},
                         min_seconds=SIDE_BY_SIDE_SECONDS)
  return variants[min(times, key=times.get)], times


def tune(model, batch_size: int):
  """An :class:`~lcnn_jax.inference.model.InferenceModel` on the fastest backends at ``batch_size`` here: per
  layer, then checked on the whole model.

  Each lookup layer's fastest backend alone (:func:`choose_backends`) can lose on the whole model when
  neighbours disagree on the activations' layout and pay transposes, so the per-layer mix competes with every
  backend used throughout, end to end; the fastest of these is kept. At batch 1, where the kept backends let the
  leading layers run in one kernel call (:mod:`lcnn_jax.inference.chain`), that is timed against a call per
  layer too, and the faster is recorded in ``tuning["chain"]``. Where the per-layer mix leaves dense
  convolutions to XLA (dense or factored layers), who runs them is measured first, on that mix
  (:func:`choose_convolutions`), and every whole-model candidate is then timed that way
  (``tuning["convolutions"]``): timed as XLA decides, the accurate AlexNet-LCNN's mix (conv2 dense) lost to
  all-``lookup`` at batch 1 in one ``bench`` run (17.4 ms; the mix with XLA's emitter took 13.6-14.7 ms in the
  runs around it).
  """
  mix, timings = choose_backends(model.lookup_layers, batch_size)
  per_layer = model.with_backends(mix, chain=True, convolutions="default")
  per_layer, convolution_ms = (choose_convolutions(per_layer, batch_size) if model.lookup_layers
                               else (per_layer, {}))
  convolutions = per_layer.convolutions
  candidates = {"per-layer": mix, **{name: name for name in candidate_backends()}}
  variants = {name: per_layer if name == "per-layer" else
              model.with_backends(choice, chain=True, convolutions=convolutions)
              for name, choice in candidates.items()}
  whole_ms = {}
  for name, variant in variants.items() if model.lookup_layers else ():
    best = min(whole_ms.values(), default=None)
    whole_ms[name] = model_ms(variant, batch_size, give_up_ms=best and GIVE_UP * best)
  close = [name for name in whole_ms if whole_ms[name] <= CLOSE * min(whole_ms.values())]
  if len(close) > 1:
    whole_ms.update(interleaved_ms({name: _model_call(variants[name], batch_size) for name in close},
                                   min_seconds=SIDE_BY_SIDE_SECONDS))
  best = min(whole_ms, key=whole_ms.get) if whole_ms else "per-layer"
  tuned = variants[best]
  measured = {}  # whether batch 1 runs in one call, where that was timed (otherwise: where the layers allow)
  if whole_ms and batch_size == 1 and tuned.chain is not None:
    per_call = model.with_backends(candidates[best], chain=False, convolutions=convolutions)
    side_by_side = interleaved_ms({best: _model_call(tuned, 1), f"{best}, no chain": _model_call(per_call, 1)},
                                  min_seconds=SIDE_BY_SIDE_SECONDS)
    whole_ms.update(side_by_side)
    measured["chain"] = side_by_side[best] <= side_by_side[f"{best}, no chain"]
    tuned = tuned if measured["chain"] else per_call
  if convolution_ms:
    measured["convolutions"] = convolutions
    whole_ms.update({f"per-layer, convolutions {name}": ms for name, ms in convolution_ms.items()})
  tuned.tuning = {"batch_size": batch_size, "device": device_name(), "machine": machine.cpu_key(),
                  "machine_description": machine.describe().as_dict(), "timings_ms": timings,
                  "model_ms": whole_ms, "chosen": best, **measured}
  logging.info("Backends at batch %d: %s (whole model: %s).", batch_size, best,
               ", ".join(f"{k} {v:.2f} ms" for k, v in whole_ms.items()))
  return tuned


RETUNED = "retuned.json"
"""The file in ``$LCNN_JAX_CACHE`` that keeps, per exported file and CPU, the backends tuned there."""


def for_this_machine(model, file: str, *, retune: bool = False, cache_file: str | None = None):
  """``model`` (just loaded from ``file``) with backends tuned on this CPU.

  A model whose ``tuning`` was measured here (same :func:`~lcnn_jax.inference.machine.cpu_key`) is returned as
  it is, and so is one without tuning (its backends were named, not measured). Otherwise the choice made for
  this file (by a digest of its contents) on this CPU before is read from ``cache_file`` (default
  ``$LCNN_JAX_CACHE/retuned.json``), or measured now (:func:`tune`, at the batch size the file was tuned for)
  and kept there: another CPU re-tunes once. ``retune`` measures again whatever is kept.
  """
  stored = model.tuning
  if stored is None or (stored.get("machine") == machine.cpu_key() and not retune):
    return model
  batch_size = int(stored.get("batch_size", 1))
  with open(file, "rb") as f:  # read again only here: a file tuned on this CPU is never hashed
    digest = hashlib.sha256(f.read()).hexdigest()[:24]
  key = f"{digest}|{machine.cpu_key()}|batch{batch_size}"
  cache_path = cache_file or os.path.join(kernels.cache_dir(), RETUNED)
  try:
    with open(cache_path) as f:
      kept = json.load(f)
  except (OSError, ValueError):
    kept = {}
  if key in kept and not retune:
    entry = kept[key]
    tuned = model.with_backends(entry["backends"], chain=entry.get("chain"),
                                convolutions=entry["tuning"].get("convolutions", "default"))
    tuned.tuning = entry["tuning"]
    return tuned
  logging.warning("This model was tuned on %s; measuring its backends on this CPU (%s) once, at batch %d.",
                  stored.get("machine", "an unnamed CPU"), machine.cpu_key(), batch_size)
  tuned = tune(model, batch_size)
  kept[key] = {"backends": tuned.backends, "chain": tuned.chain is not None, "tuning": tuned.tuning}
  _write_json(cache_path, kept)
  return tuned
