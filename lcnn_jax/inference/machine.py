"""The machine a figure was measured on: CPU model, caches, cores and the ISA the lookup kernel was built for.

Every timing this package reports (``bench``, ``devicecheck``, ``throughput``, the tuner's choices stored in an
export) carries :func:`describe`'s answer, since a kernel's speed on one CPU says little about another. The
cache sizes are read here at run time (Linux sysfs, else ``sysconf``), never taken from constants tuned on one
CPU: the lookup kernel's tiles are sized from them (:func:`tile_budget_bytes`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
from typing import Any

from lcnn_jax.inference import kernels

_SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"


@dataclasses.dataclass(frozen=True)
class Machine:
  """What a measurement depends on: ``cpu`` (the model name), ``kernel_arch`` (the ISA the lookup kernel was
  built for: avx512, avx2, sse2, neon, scalar; or why it is unavailable), ``march`` (the ``-march`` it was built
  with; "native, built with -mcpu=native" where the compiler refused -march=native), the per-core L1 data and
  L2 and the shared L3 in bytes (None: unknown) and ``cores`` (usable here)."""
  cpu: str
  kernel_arch: str
  march: str
  l1_bytes: int | None
  l2_bytes: int | None
  l3_bytes: int | None
  cores: int

  def as_dict(self) -> dict[str, Any]:
    """The JSON form (``"machine"`` in the commands' ``--json``)."""
    return dataclasses.asdict(self)

  def line(self) -> str:
    """One line for a table's heading, e.g. 'AMD EPYC, 2 cores, L1d 32 KiB, L2 1 MiB, L3 32 MiB; kernel avx512
    (-march=native)'."""
    caches = ", ".join(f"{name} {_size(value)}" for name, value in
                       (("L1d", self.l1_bytes), ("L2", self.l2_bytes), ("L3", self.l3_bytes)))
    return f"{self.cpu}, {self.cores} cores, {caches}; kernel {self.kernel_arch} (-march={self.march})"


def _size(value: int | None) -> str:
  if value is None:
    return "?"
  if value >= 1 << 20 and value % (1 << 20) == 0:
    return f"{value >> 20} MiB"
  return f"{value >> 10} KiB"


def _parse_size(text: str) -> int | None:
  """'48K', '2048K', '32M' (sysfs) -> bytes."""
  text = text.strip().upper()
  scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
  digits = text.rstrip("KMG")
  return int(digits) * scale if digits.isdigit() else None


@functools.cache
def cache_sizes() -> tuple[int | None, int | None, int | None]:
  """(L1 data, L2, L3) of one core in bytes, as this machine reports them; None where it does not say (read
  once per process)."""
  sizes: dict[int, int] = {}
  try:
    for entry in sorted(os.listdir(_SYSFS_CACHE)):
      if not entry.startswith("index"):
        continue
      path = os.path.join(_SYSFS_CACHE, entry)
      with open(os.path.join(path, "type")) as f:
        kind = f.read().strip()
      if kind not in ("Data", "Unified"):
        continue
      with open(os.path.join(path, "level")) as f:
        level = int(f.read())
      with open(os.path.join(path, "size")) as f:
        size = _parse_size(f.read())
      if size:
        sizes[level] = size
  except (OSError, ValueError):
    pass
  for level, name in ((1, "SC_LEVEL1_DCACHE_SIZE"), (2, "SC_LEVEL2_CACHE_SIZE"), (3, "SC_LEVEL3_CACHE_SIZE")):
    if level not in sizes and name in os.sysconf_names:
      try:
        value = os.sysconf(name)
      except (OSError, ValueError):
        value = 0
      if value > 0:
        sizes[level] = value
  return sizes.get(1), sizes.get(2), sizes.get(3)


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (empty elsewhere)."""
  fields: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          if fields:
            break
          continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


_ARM_IMPLEMENTERS = {0x41: "Arm", 0x48: "HiSilicon", 0x51: "Qualcomm", 0x61: "Apple", 0xc0: "Ampere",
                     0x46: "Fujitsu", 0x4e: "NVIDIA"}
_ARM_PARTS = {(0x41, 0xd0c): "Neoverse-N1", (0x41, 0xd40): "Neoverse-V1", (0x41, 0xd49): "Neoverse-N2",
              (0x41, 0xd4f): "Neoverse-V2", (0x41, 0xd8e): "Neoverse-N3", (0x41, 0xd84): "Neoverse-V3",
              (0x41, 0xd08): "Cortex-A72", (0x41, 0xd0b): "Cortex-A76", (0x41, 0xd41): "Cortex-A78",
              (0x41, 0xd03): "Cortex-A53", (0x41, 0xd05): "Cortex-A55", (0xc0, 0xac3): "AmpereOne"}
"""Names of common Arm cores by /proc/cpuinfo's (CPU implementer, CPU part); Linux on Arm gives no model name."""


def _arm_model(info: dict[str, str]) -> str:
  """An Arm core's name from its implementer and part numbers ('' where cpuinfo has neither)."""
  try:
    implementer, part = int(info["CPU implementer"], 16), int(info["CPU part"], 16)
  except (KeyError, ValueError):
    return ""
  name = _ARM_PARTS.get((implementer, part))
  vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer:#x}")
  return f"{vendor} {name}" if name else f"{vendor} part {part:#x}"


def cpu_model() -> str:
  """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) Platinum 8480C', 'Arm Neoverse-V2', ...)."""
  info = _cpuinfo()
  for key in ("model name", "Model", "cpu model", "Hardware"):
    if info.get(key):
      return info[key]
  return _arm_model(info) or platform.processor() or platform.machine()


def cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


@functools.cache
def describe() -> Machine:
  """This machine (the kernel is built first, to name the ISA it was built for)."""
  l1, l2, l3 = cache_sizes()
  try:
    march = kernels.march()
    if march == "native" and (used := kernels.target_flags()) != ("-march=native",):
      # a compiler refusing -march=native (kernels.NATIVE_TARGETS)
      march = f"native, built with {' '.join(used)}" if used else "native, built for the compiler's default target"
  except kernels.KernelUnavailable:  # a malformed LCNN_JAX_KERNEL_ARCH, or no compiler: kernel_arch says why
    march = os.environ.get(kernels.ARCH_VARIABLE, "")
  return Machine(cpu=cpu_model(), kernel_arch=kernels.kernel_arch(), march=march, l1_bytes=l1,
                 l2_bytes=l2, l3_bytes=l3, cores=cores())


@functools.cache
def cpu_key() -> str:
  """What a tuning result is valid for: the CPU model, a digest of its feature flags and caches, and the
  kernel's build target. Another CPU, or the same one with another ``LCNN_JAX_KERNEL_ARCH``, has another key."""
  info = _cpuinfo()
  flags = " ".join(sorted((info.get("flags") or info.get("Features") or "").split()))
  detail = hashlib.sha256(f"{flags}|{cache_sizes()}|{platform.machine()}".encode()).hexdigest()[:12]
  return f"{cpu_model()} [{detail}] kernel {describe().march}"


DEFAULT_L2_BYTES = 512 << 10
"""The L2 assumed where the machine does not say (smaller than any current server core's)."""


def _emulated_cache_bytes(variable: str, example: int) -> int | None:
  """The cache size the environment variable ``variable`` sets to emulate another machine's, or None when unset;
  ValueError naming it when it is not a number of bytes."""
  override = os.environ.get(variable)
  if not override:
    return None
  try:
    return int(override)
  except ValueError:
    raise ValueError(f"{variable}={override!r} is not a number of bytes (e.g. {example}).") from None


def tile_budget_bytes() -> int:
  """The bytes of S one lookup tile may hold: half of this core's L2 (the rest for the outputs and the lookups),
  divided among the threads of ours that share it (:func:`l2_sharers`), overridable with ``LCNN_JAX_L2_BYTES``
  to emulate a smaller cache."""
  override = _emulated_cache_bytes("LCNN_JAX_L2_BYTES", 1048576)
  if override is not None:
    return max(4096, override // 2)
  l2 = cache_sizes()[1] or DEFAULT_L2_BYTES
  return l2 // 2 // l2_sharers()


DEFAULT_L1_BYTES = 32 << 10
"""The L1 data cache assumed where the machine does not say."""


def chunk_bytes() -> int:
  """The bytes of S one chunk of a one-pixel layer's lookups spans (the ``lookup:chunk=N`` the tuner times): half
  of this core's L1 data cache, overridable with ``LCNN_JAX_L1_BYTES`` to emulate another."""
  override = _emulated_cache_bytes("LCNN_JAX_L1_BYTES", 49152)
  if override is not None:
    return max(1024, override // 2)
  return (cache_sizes()[0] or DEFAULT_L1_BYTES) // 2


def _cpu_list(text: str) -> set[int]:
  """'0-3,8' -> {0, 1, 2, 3, 8}."""
  cpus: set[int] = set()
  for part in text.strip().split(","):
    if "-" in part:
      first, last = part.split("-")
      cpus.update(range(int(first), int(last) + 1))
    elif part:
      cpus.add(int(part))
  return cpus


@functools.cache
def l2_sharers() -> int:
  """How many of the CPUs this process runs on share one L2 (2 where the machine's virtual CPUs are the two
  hardware threads of a core, as on many cloud VMs): each of their kernel threads gets its share of it."""
  try:
    ours = os.sched_getaffinity(0)
    for entry in sorted(os.listdir(_SYSFS_CACHE)):
      path = os.path.join(_SYSFS_CACHE, entry)
      if not entry.startswith("index"):
        continue
      with open(os.path.join(path, "level")) as f:
        if int(f.read()) != 2:
          continue
      with open(os.path.join(path, "shared_cpu_list")) as f:
        return max(1, len(_cpu_list(f.read()) & ours))
  except (OSError, ValueError, AttributeError):
    pass
  return 1
