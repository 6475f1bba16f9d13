"""The C++ lookup kernel (``lookup_kernel.cc``): built on first use, cached, registered with the XLA FFI.

This module is the only one that talks to the FFI: :func:`lookup_conv`, :func:`lookup_conv_dictionary`,
:func:`lookup_conv_fused`, :func:`max_pool`, :func:`dense_rows` and :func:`dense_conv` each bind one handler, and :data:`LIMITS`
holds the kernel's limits as ``lookup_kernel.h`` defines them.

The kernel is compiled for the machine it runs on (``-march=native``, or ``-mcpu=native`` from a compiler that
refuses it: :func:`target_flags`; ``LCNN_JAX_KERNEL_ARCH`` names another target: ``x86-64-v3`` for AVX2 without
AVX-512, ``x86-64`` for no SIMD beyond SSE2, ``armv8-a`` ...) into ``$LCNN_JAX_CACHE/kernels/<hash>/`` (default
``~/.cache/lcnn_jax``), where the hash covers the source, the compiler, the flags, the jaxlib headers and the
CPU, so a changed source, another target or another machine builds its own copy. :func:`kernel_arch` names the
vector ISA the build uses. Building needs a C++17 compiler (``$CXX``, else ``c++``); without one
:func:`ensure_kernel` raises :class:`KernelUnavailable` and the ``lookup`` backend reports itself unavailable,
leaving the XLA backends.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

TARGET = "lcnn_lookup_conv"
FUSED_TARGET = "lcnn_lookup_conv_fused"
POOL_TARGET = "lcnn_max_pool"
DENSE_TARGET = "lcnn_dense_rows"
CONV_TARGET = "lcnn_dense_conv"
DICTIONARY_TARGET = "lcnn_lookup_conv_dictionary"
NETWORK_TARGET = "lcnn_network"
SOURCE = os.path.join(os.path.dirname(__file__), "lookup_kernel.cc")
HEADER = os.path.join(os.path.dirname(__file__), "lookup_kernel.h")
SOURCES = (SOURCE, HEADER)
ARCH_VARIABLE = "LCNN_JAX_KERNEL_ARCH"
"""The environment variable that sets the kernel's ``-march`` (default ``native``)."""
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Wno-psabi")
"""Warnings on: the kernel compiles without any (XLA's FFI headers come in with -isystem, as a library's do).
``-Wno-psabi``: GCC notes that 64-byte vector arguments change the ABI where AVX-512 is off (x86-64-v3); they
are the kernel's own inline functions, never passed across a library boundary."""


def march() -> str:
  """The ``-march`` the kernel is built with: ``$LCNN_JAX_KERNEL_ARCH``, else ``native``."""
  value = os.environ.get(ARCH_VARIABLE, "").strip() or "native"
  if not re.fullmatch(r"[A-Za-z0-9_.+-]+", value):
    raise KernelUnavailable(f"{ARCH_VARIABLE}={value!r} is not a -march name (e.g. native, x86-64-v3, x86-64, "
                            "armv8-a).")
  return value


NATIVE_TARGETS = (("-march=native",), ("-mcpu=native",), ())
"""How a default build asks for this CPU, first the compiler accepts: ``-march=native``, else ``-mcpu=native``
(Clang before 15 on Arm, Apple's Clang on Apple silicon among them, refuses ``-march=native`` and takes
``-mcpu``), else the compiler's own default target (baseline AArch64 with NEON, x86-64 with SSE2)."""


@functools.cache
def _accepts(compiler: str, flag: tuple[str, ...]) -> bool:
  """Whether ``compiler`` takes ``flag`` (a C++17 translation unit of one line, checked for syntax only)."""
  try:
    result = subprocess.run([compiler, "-x", "c++", "-std=c++17", *flag, "-fsyntax-only", "-"], input="int x;\n",
                            capture_output=True, text=True, check=False, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return result.returncode == 0


def target_flags(compiler: str | None = None) -> tuple[str, ...]:
  """The flags that choose the build's target: ``-march=$LCNN_JAX_KERNEL_ARCH`` where it is set; for the default
  ``native``, the first of :data:`NATIVE_TARGETS` that ``compiler`` (default: :func:`_compiler`'s) accepts."""
  if march() != "native":
    return (f"-march={march()}",)
  compiler = compiler or _compiler()[0]
  return next((flag for flag in NATIVE_TARGETS if _accepts(compiler, flag)), ())


def flags(compiler: str | None = None) -> tuple[str, ...]:
  """The compiler flags of the build: :data:`BASE_FLAGS` and :func:`target_flags`."""
  return (*BASE_FLAGS, *target_flags(compiler))
BUILD_LOG = "build.log"
"""The compiler's messages, kept beside the library."""


def _read_limits(path: str = HEADER, block_name: str = "LIMITS") -> types.SimpleNamespace:
  """The ``constexpr int64_t kName = value;`` lines between ``// BEGIN LIMITS`` and ``// END LIMITS`` (or
  another ``block_name``) of the kernel's header, as attributes ``name`` in snake case (kPooledBatchMin ->
  pooled_batch_min).

  Read from the source rather than from the built library: the limits also steer choices on a machine that
  cannot build the kernel (which backend, which layout), and importing must not compile anything.
  """
  with open(path) as f:
    text = f.read()
  block = re.search(rf"// BEGIN {block_name}\n(.*?)// END {block_name}", text, re.S)
  if block is None:
    raise KernelUnavailable(f"{path} has no // BEGIN {block_name} ... // END {block_name} block.")
  limits = {}
  for name, value in re.findall(r"^constexpr int64_t k(\w+) = (\d+);", block.group(1), re.M):
    limits[re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()] = int(value)
  return types.SimpleNamespace(**limits)


class KernelUnavailable(RuntimeError):
  """The C++ lookup kernel cannot be built or loaded here; the XLA backends still work."""


def cache_dir() -> str:
  """Where built kernels (and the backend timings of :mod:`lcnn_jax.inference.tuning`) are kept."""
  return os.environ.get("LCNN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lcnn_jax")


_SIGNATURE_FIELDS = ("model name", "flags",  # x86
                     "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")  # Arm
"""The /proc/cpuinfo fields that tell one CPU's native build from another's."""


def _cpu_signature(cpuinfo: str = "/proc/cpuinfo") -> str:
  try:
    with open(cpuinfo) as f:
      lines = [line for line in f if line.startswith(_SIGNATURE_FIELDS)]
  except OSError:
    lines = []
  return "".join(sorted(set(lines))) or platform.processor() or platform.machine()


def _compiler() -> tuple[str, str]:
  name = os.environ.get("CXX", "c++")
  path = shutil.which(name)
  if path is None:
    raise KernelUnavailable(f"No C++ compiler found (looked for {name!r} on PATH; set $CXX to one). The 'lookup' "
                            "backend needs it; the XLA backends ('dense', 'factored', 'gather') work without.")
  version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
  return path, version


def _build(compiler: str, library: str) -> None:
  """Compiles the kernel into ``library`` (atomically: concurrent builders each rename a complete file)."""
  os.makedirs(os.path.dirname(library), exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(library))
  os.close(fd)
  command = [compiler, *flags(compiler), "-isystem", jax.ffi.include_dir(), SOURCE, "-o", partial]
  logging.info("Building the LCNN lookup kernel: %s", " ".join(command))
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(partial)
    hint = (f" ({ARCH_VARIABLE}={march()!r} is set: unset it, or name a target this compiler knows.)"
            if march() != "native" else "")
    raise KernelUnavailable(f"Building the lookup kernel failed ({' '.join(command)}):\n{result.stderr[-4000:]}"
                            f"{hint}")
  if result.stderr:
    logging.warning("The lookup kernel built with messages:\n%s", result.stderr[-4000:])
  with open(os.path.join(os.path.dirname(library), BUILD_LOG), "w") as f:
    f.write(result.stderr)
  os.replace(partial, library)


def _load() -> str:
  missing = [path for path in SOURCES if not os.path.exists(path)]
  if missing:
    raise KernelUnavailable(f"The kernel sources {missing} are missing from this installation; reinstall lcnn_jax "
                            "from a source checkout (pip install -e .).")
  compiler, version = _compiler()
  sources = []
  for path in SOURCES:
    with open(path, "rb") as f:
      sources.append(f.read())
  key = hashlib.sha256(b"\0".join([*sources, version.encode(), " ".join(flags(compiler)).encode(), b"-isystem",
                                   jax.ffi.include_dir().encode(), jax.__version__.encode(),
                                   _cpu_signature().encode()])).hexdigest()[:16]
  library = os.path.join(cache_dir(), "kernels", key, "liblcnn_lookup.so")
  if not os.path.exists(library):
    _build(compiler, library)
  try:
    loaded = ctypes.cdll.LoadLibrary(library)
    handlers = {TARGET: loaded.LcnnLookupConv, FUSED_TARGET: loaded.LcnnLookupConvFused,
                POOL_TARGET: loaded.LcnnMaxPool, DENSE_TARGET: loaded.LcnnDenseRows,
                DICTIONARY_TARGET: loaded.LcnnLookupConvDictionary, NETWORK_TARGET: loaded.LcnnNetwork,
                CONV_TARGET: loaded.LcnnDenseConv}
    isa = loaded.LcnnKernelIsa
    isa.restype = ctypes.c_char_p
    _ISA[library] = isa().decode()
    _BF16_DOT[library] = bool(loaded.LcnnKernelBf16Dot())
    serial_work = loaded.LcnnSerialWork
    serial_work.restype, serial_work.argtypes = ctypes.c_int64, [ctypes.c_int64]
    _SERIAL_WORK[library] = serial_work
  except (OSError, AttributeError) as e:
    raise KernelUnavailable(f"Loading the lookup kernel {library} failed: {e}. Delete that directory to rebuild.")
  for target, handler in handlers.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  return library


@functools.cache
def _load_once() -> tuple[str, KernelUnavailable | None]:
  try:
    return _load(), None
  except KernelUnavailable as e:  # Remembered: a failed build is not retried in this process.
    return "", e


def build_id() -> str:
  """The kernel build this process uses: its cache key, which covers the source, compiler, flags and CPU ("" where
  no kernel loads). A timing measured with one build does not stand for another."""
  library, _ = _load_once()
  return os.path.basename(os.path.dirname(library)) if library else ""


def ensure_kernel() -> str:
  """Builds (once per machine) and registers the kernel; returns the library's path.

  Raises:
    KernelUnavailable: with the reason, when there is no compiler, the build fails or the library won't load.
  """
  library, error = _load_once()
  if error is not None:
    raise error
  return library


def kernel_available() -> tuple[bool, str]:
  """(True, path) when the kernel is usable here, else (False, the reason)."""
  try:
    return True, ensure_kernel()
  except KernelUnavailable as e:
    return False, str(e)


_ISA: dict[str, str] = {}
_BF16_DOT: dict[str, bool] = {}
_SERIAL_WORK: dict[str, Any] = {}


def kernel_bf16_dot() -> bool:
  """Whether the kernel in use computes with AVX512-BF16 dot products where S is kept in bfloat16 (its lookups,
  and the dictionary stage of a layer stored in bfloat16 or int8): built for a CPU that has them."""
  available, library = kernel_available()
  return available and _BF16_DOT[library]


def set_serial_work(value: int | None = None) -> int:
  """The work (multiply-adds, or bytes moved) below which a kernel call runs on its calling thread alone; set to
  ``value`` first where given. For benchmarks (``benchmarks/serial_work_ab.py`` times a model under several
  values in one process); the default suits the machines measured. Raises
  :class:`KernelUnavailable` where no kernel loads."""
  if value is not None and value < 0:
    raise ValueError(f"serial work {value}: expected a count >= 0.")
  return _SERIAL_WORK[ensure_kernel()](-1 if value is None else int(value))


def kernel_arch() -> str:
  """The vector ISA the kernel in use was built for: ``avx512``, ``avx2``, ``sse2``, ``neon`` or ``scalar``; or
  ``unavailable: <reason>`` where it cannot be built here."""
  available, library = kernel_available()
  return _ISA[library] if available else f"unavailable: {library.splitlines()[0][:200]}"


def build_log() -> str:
  """The compiler's messages when it built the kernel in use (empty: a clean build)."""
  with open(os.path.join(os.path.dirname(ensure_kernel()), BUILD_LOG)) as f:
    return f.read()


LIMITS = _read_limits()
"""The kernel's limits (``lookup_kernel.h``'s LIMITS block): ``fused_dictionary_macs_max``, ``pooled_row_min``,
``pooled_batch_min``, ``dense_rows_max``, ``split_non_zeros``, ``conv_tile_outputs``."""
STEPS = _read_limits(block_name="STEPS")
"""The kinds of a :func:`network` step: ``step_fused_lookups``, ``step_lookups``, ``step_dense``."""


# Calls ---------------------------------------------------------------------------------------------------------
# Each binds one handler of lookup_kernel.cc; the kernel is built and registered first. Arrays are float32 unless
# said; `lookups` is (starts int32, indices uint8/uint16/int32, values float32/bfloat16/int8, scale, bias).

def _layer_attribute(padding: Sequence[int], strides: Sequence[int], output_size: Sequence[int]) -> dict:
  """The handlers' ``layer`` attribute (LayerGeometry): top/left padding, strides, output size."""
  (ph, pw), (sh, sw), (oh, ow) = padding, strides, output_size
  return dict(pad_h=np.int64(ph), pad_w=np.int64(pw), stride_h=np.int64(sh), stride_w=np.int64(sw),
              out_h=np.int64(oh), out_w=np.int64(ow))


def _pool_attribute(pooling: Any) -> dict:
  """The handlers' ``pool`` attribute (PoolWindow) of a :class:`~lcnn_jax.inference.backends.Pooling`, or of
  None (no pooling: a zero window)."""
  if pooling is None:
    window, strides, (top, left), relu = (0, 0), (1, 1), (0, 0), False
  else:
    window, strides, relu = pooling.window, pooling.strides, pooling.relu
    (top, _), (left, _) = pooling.padding
  return dict(window_h=np.int64(window[0]), window_w=np.int64(window[1]), stride_h=np.int64(strides[0]),
              stride_w=np.int64(strides[1]), pad_h=np.int64(top), pad_w=np.int64(left), relu=bool(relu))


def _tile_attribute(tile_bytes: int, tile_outputs: int = 0, chunk: int = 0) -> dict:
  """The handlers' ``tile`` attribute (Tile): the bytes of S one piece of work keeps in cache (0: no tiling),
  the outputs per piece (0: as load balance allows), and the elements of S per chunk of lookups stored chunk by
  chunk (0: stored output by output)."""
  if tile_bytes < 0 or tile_outputs < 0 or chunk < 0:
    raise ValueError(f"tile_bytes={tile_bytes}, tile_outputs={tile_outputs} and chunk={chunk} must be >= 0.")
  return dict(bytes=np.int64(tile_bytes), outputs=np.int64(tile_outputs), chunk=np.int64(chunk))


def _call(target: str, results, *args, **attributes):
  ensure_kernel()
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attributes)


def _residual(residual: jax.Array | None) -> jax.Array:
  """The handlers' residual argument: the array, or one of no elements for none."""
  return jnp.zeros((0,), jnp.float32) if residual is None else residual.astype(jnp.float32)


def _lookup_results(out_shape: Sequence[int], scratch_size: int, s_bfloat16: bool = False) -> tuple:
  """The output and the scratch S of ``scratch_size`` elements: float32, or bfloat16 two to a float."""
  floats = (scratch_size + 1) // 2 if s_bfloat16 else scratch_size
  return (jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32), jax.ShapeDtypeStruct((max(1, floats),), jnp.float32))


def lookup_conv(s: jax.Array, lookups: Sequence[jax.Array], *, out_shape: Sequence[int], scratch_size: int,
                padding: Sequence[int], strides: Sequence[int], output_size: Sequence[int],
                pooling: Any = None, residual: jax.Array | None = None, relu: bool = False,
                tile_bytes: int = 0, tile_outputs: int = 0, chunk: int = 0, s_bfloat16: bool = False) -> jax.Array:
  """The lookups over S (k, h, w, batch) -> out ``out_shape`` (n, oh, ow, batch), or its max pooling (with the
  ReLU before it when ``pooling.relu``). ``scratch_size``: elements of the padded space-to-depth S (k·sh·sw,
  H, W, batch) when the layer pads or strides, else 0. Without pooling, the outputs may get ``residual``
  (shaped as out) added and then the ReLU (``relu``) as they are stored. ``tile_bytes``: the S each piece of
  work keeps in cache, every output of the piece reading it (0: no tiling, a block of S at a time);
  ``tile_outputs``: outputs per piece (0: as load balance allows). ``chunk``: for a layer whose output is one
  pixel, the lookups are stored chunk by chunk of this many elements of S (``starts`` has chunks·n + 1 entries:
  :func:`~lcnn_jax.inference.flat_s.by_chunks`) and each chunk of S is read by all outputs in turn.
  ``s_bfloat16``: the padded copy of S (a layer that pads or strides) is rounded to bfloat16 as it is made, and
  the lookups read it so, widening each element to float32 and accumulating in float32."""
  out, _ = _call(TARGET, _lookup_results(out_shape, scratch_size, s_bfloat16), s, *lookups, _residual(residual),
                 layer=_layer_attribute(padding, strides, output_size), pool=_pool_attribute(pooling), relu=relu,
                 tile=_tile_attribute(tile_bytes, tile_outputs, chunk), s_bfloat16=bool(s_bfloat16))
  return out


def lookup_conv_dictionary(x: jax.Array, dictionary: jax.Array, dictionary_scale: jax.Array,
                           lookups: Sequence[jax.Array], *, out_shape: Sequence[int], scratch_size: int,
                           padding: Sequence[int], strides: Sequence[int], output_size: Sequence[int],
                           pooling: Any = None, residual: jax.Array | None = None, relu: bool = False,
                           tile_bytes: int = 0, tile_outputs: int = 0, chunk: int = 0,
                           s_bfloat16: bool = False) -> jax.Array:
  """As :func:`lookup_conv`, with S = Dᵀ·x computed in the same call from x (m, h, w, batch) and Dᵀ (k, m) as
  stored (float32, bfloat16 or int8, times ``dictionary_scale`` (k))."""
  k = dictionary.shape[0]
  _, h, w, batch = x.shape
  results = (*_lookup_results(out_shape, scratch_size, s_bfloat16),
             jax.ShapeDtypeStruct((k, h, w, batch), jnp.float32))
  out, _, _ = _call(DICTIONARY_TARGET, results, x, dictionary, dictionary_scale, *lookups, _residual(residual),
                    layer=_layer_attribute(padding, strides, output_size), pool=_pool_attribute(pooling), relu=relu,
                    tile=_tile_attribute(tile_bytes, tile_outputs, chunk), s_bfloat16=bool(s_bfloat16))
  return out


def lookup_conv_fused(x: jax.Array, dictionary: jax.Array, lookups: Sequence[jax.Array], *, nhwc: bool,
                      out_shape: Sequence[int], scratch_size: int, padding: Sequence[int], strides: Sequence[int],
                      output_size: Sequence[int], pooling: Any = None, residual: jax.Array | None = None,
                      relu: bool = False, tile_bytes: int = 0, tile_outputs: int = 0, chunk: int = 0,
                      s_bfloat16: bool = False) -> jax.Array:
  """As :func:`lookup_conv`, with S = x ⊛ D computed while filling the space-to-depth buffer, from x (batch,
  h, w, m) when ``nhwc`` else (m, h, w, batch) and D (m, k) float32, m·k at most
  ``LIMITS.fused_dictionary_macs_max``."""
  out, _ = _call(FUSED_TARGET, _lookup_results(out_shape, scratch_size, s_bfloat16), x, dictionary, *lookups,
                 _residual(residual), layer=_layer_attribute(padding, strides, output_size),
                 pool=_pool_attribute(pooling), relu=relu, nhwc=nhwc,
                 tile=_tile_attribute(tile_bytes, tile_outputs, chunk), s_bfloat16=bool(s_bfloat16))
  return out


def max_pool(x: jax.Array, pooling: Any) -> jax.Array:
  """``pooling`` (a :class:`~lcnn_jax.inference.backends.Pooling`) of a CHWN array x (c, h, w, batch)."""
  c, h, w, batch = x.shape
  result = jax.ShapeDtypeStruct((c, *pooling.output_size((h, w)), batch), jnp.float32)
  return _call(POOL_TARGET, result, x, pool=_pool_attribute(pooling))


def dense_rows(x: jax.Array, weights: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """x (rows, m) -> (rows, n) = x · (weights · scale)ᵀ + bias, for ``weights`` (n, m) float32, bfloat16 or int8
  as stored, converted in registers, accumulated in float32."""
  result = jax.ShapeDtypeStruct((x.shape[0], weights.shape[0]), jnp.float32)
  return _call(DENSE_TARGET, result, x.astype(jnp.float32), weights, scale, bias)


def pack_conv_kernel(kernel: np.ndarray) -> np.ndarray:
  """A dense kernel (kh, kw, m, n) as :func:`dense_conv` reads it: (tiles, m·kh·kw, R) float32, R =
  ``LIMITS.conv_tile_outputs`` outputs a tile in (channel, row, column) order, the outputs past n zero."""
  kh, kw, m, n = kernel.shape
  r = LIMITS.conv_tile_outputs
  tiles = -(-n // r)
  rows = np.zeros((tiles * r, m * kh * kw), np.float32)
  rows[:n] = np.asarray(kernel, np.float32).transpose(3, 2, 0, 1).reshape(n, m * kh * kw)
  return np.ascontiguousarray(rows.reshape(tiles, r, m * kh * kw).transpose(0, 2, 1))


def dense_conv(x: jax.Array, packed: jax.Array, bias: jax.Array, *, kernel_size: Sequence[int],
               padding: Sequence[int], strides: Sequence[int], output_size: Sequence[int],
               residual: jax.Array | None = None, relu: bool = False) -> jax.Array:
  """A dense convolution of a CHWN x (c, h, w, batch) -> (n, oh, ow, batch) with the kernel packed by
  :func:`pack_conv_kernel` (``kernel_size`` (kh, kw)), plus ``bias`` (n); the ``residual`` (shaped as the output)
  added and the ReLU applied as it is stored, where given."""
  n = bias.shape[0]
  result = jax.ShapeDtypeStruct((n, *output_size, x.shape[3]), jnp.float32)
  return _call(CONV_TARGET, result, x.astype(jnp.float32), packed, bias, _residual(residual),
               layer=_layer_attribute(padding, strides, output_size), kernel_h=np.int64(kernel_size[0]),
               kernel_w=np.int64(kernel_size[1]), relu=bool(relu))


def network(image: jax.Array, steps: Sequence[tuple[dict, Sequence[jax.Array]]], out_shape: Sequence[int]
            ) -> jax.Array:
  """A chain of layers over one NHWC image (1, h, w, c) in one call -> the last step's output, NHWC
  ``out_shape`` (1, h', w', c').

  Args:
    image: (1, h, w, c) float32.
    steps: per layer, ``(step, arrays)``: ``step`` a dict with ``kind`` (one of :data:`STEPS`), ``padding``,
      ``strides`` and ``output_size`` (lookups; anything for a dense step), ``pooling`` (a
      :class:`~lcnn_jax.inference.backends.Pooling` or None) and ``relu``; ``arrays`` as the kind takes them:
      fused lookups D (m, k) float32 and the lookups; lookups Dᵀ (k, m) as stored, its scale (k) and the
      lookups; dense (a 1×1 convolution) W (n, m) as stored, its scale (n) and the bias (n).
    out_shape: the last step's output size as (1, h', w', c').
  """
  attributes, arrays = {"steps": np.int64(len(steps))}, []
  for i, (step, step_arrays) in enumerate(steps):
    pooling = step.get("pooling")
    attributes[f"step{i}"] = dict(kind=np.int64(step["kind"]), relu=bool(step["relu"]))
    attributes[f"step{i}_layer"] = _layer_attribute(step.get("padding", (0, 0)), step.get("strides", (1, 1)),
                                                    step.get("output_size", (1, 1)))
    attributes[f"step{i}_pool"] = _pool_attribute(pooling)
    arrays.extend(step_arrays)
  result = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
  return _call(NETWORK_TARGET, result, image, *arrays, **attributes)
