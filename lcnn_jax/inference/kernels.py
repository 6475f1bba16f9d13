"""The C++ lookup kernel (``lookup_kernel.cc``): built on first use, cached, registered with the XLA FFI.

The kernel is compiled for the machine it runs on (``-march=native``) into
``$LCNN_JAX_CACHE/kernels/<hash>/`` (default ``~/.cache/lcnn_jax``), where the hash covers the source, the
compiler, the flags, the jaxlib headers and the CPU, so a changed source or another machine builds its own
copy. Building needs a C++17 compiler (``$CXX``, else ``c++``); without one :func:`ensure_kernel` raises
:class:`KernelUnavailable` and the ``lookup`` backend reports itself unavailable, leaving the XLA backends.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
from absl import logging

TARGET = "lcnn_lookup_conv"
FUSED_TARGET = "lcnn_lookup_conv_fused"
POOL_TARGET = "lcnn_max_pool"
DENSE_TARGET = "lcnn_dense_rows"
DICTIONARY_TARGET = "lcnn_lookup_conv_dictionary"
SOURCE = os.path.join(os.path.dirname(__file__), "lookup_kernel.cc")
SOURCES = (SOURCE, os.path.join(os.path.dirname(__file__), "lookup_kernel.h"))
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelUnavailable(RuntimeError):
  """The C++ lookup kernel cannot be built or loaded here; the XLA backends still work."""


def cache_dir() -> str:
  """Where built kernels (and the backend timings of :mod:`lcnn_jax.inference.tuning`) are kept."""
  return os.environ.get("LCNN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lcnn_jax")


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f if line.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


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
  command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", partial]
  logging.info("Building the LCNN lookup kernel: %s", " ".join(command))
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(partial)
    raise KernelUnavailable(f"Building the lookup kernel failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
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
  key = hashlib.sha256(b"\0".join([*sources, version.encode(), " ".join(FLAGS).encode(),
                                   jax.ffi.include_dir().encode(), jax.__version__.encode(),
                                   _cpu_signature().encode()])).hexdigest()[:16]
  library = os.path.join(cache_dir(), "kernels", key, "liblcnn_lookup.so")
  if not os.path.exists(library):
    _build(compiler, library)
  try:
    loaded = ctypes.cdll.LoadLibrary(library)
    handlers = {TARGET: loaded.LcnnLookupConv, FUSED_TARGET: loaded.LcnnLookupConvFused,
                POOL_TARGET: loaded.LcnnMaxPool, DENSE_TARGET: loaded.LcnnDenseRows,
                DICTIONARY_TARGET: loaded.LcnnLookupConvDictionary}
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
