"""Keeping freed activation memory in the process between inference calls (glibc, CPU).

XLA on CPU allocates each call's activations afresh. glibc serves large blocks with ``mmap`` and returns them
to the operating system when freed, so every call page-faults its activations back in and the kernel zeroes
each page: measured at about 40% of an AlexNet-LCNN call at batch 32 on a 2-core CPU (far less for the dense
CNN, whose arithmetic dwarfs it). :func:`reuse_freed_memory` raises glibc's mmap and trim thresholds, as
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` would, so freed blocks stay in the heap for the next call.
It changes the whole process's allocator; the prediction and benchmark commands call it, a library user
chooses.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from absl import logging

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
  """Keeps freed blocks of up to ``limit_bytes`` in the process heap; False where glibc's mallopt is absent."""
  name = ctypes.util.find_library("c")
  try:
    mallopt = ctypes.CDLL(name).mallopt if name else None
  except (OSError, AttributeError):
    mallopt = None
  if mallopt is None:
    logging.debug("No glibc mallopt here; freed memory goes back to the OS as usual.")
    return False
  # One arena: a thread's own arena grows in heaps of at most 64 MB and mmaps any block larger than that.
  ok = all(mallopt(parameter, ctypes.c_int(value)) for parameter, value in
           ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, limit_bytes), (M_TRIM_THRESHOLD, limit_bytes)))
  logging.debug("Freed blocks of up to %d MB now stay in the heap (mallopt %s).", limit_bytes >> 20,
                "accepted" if ok else "refused")
  return ok
