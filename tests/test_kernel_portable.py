"""The lookup kernel's arithmetic on other CPUs than this one: tests/kernel_check.cc (the kernel's header against
float64 references, in C++ alone) built for this machine, and for 64-bit Arm, run under user-mode emulation
(qemu), where the cross compiler and qemu are installed (Debian: ``apt-get install g++-aarch64-linux-gnu
qemu-user``). Each run draws a fresh seed and names it on failure. (The x86 builds without AVX-512 run the
Python kernel tests in tests/test_kernel_arch.py.)"""

import os
import platform
import shutil
import subprocess
import sys

import pytest

from lcnn_jax.inference import kernels, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "tests", "kernel_check.cc")
ARM_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
# The kernel's own optimisation level and warnings (kernels.BASE_FLAGS), for an executable instead of a library.
FLAGS = [flag for flag in kernels.BASE_FLAGS if flag not in ("-shared", "-fPIC")] + ["-pthread"]


def _compile(compiler, extra, output):
  result = subprocess.run([compiler, *FLAGS, *extra, CHECK, "-o", str(output)], capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "warning" not in result.stderr, result.stderr[-4000:]  # the kernel builds cleanly for every target


def _run(command, seed):
  result = subprocess.run([*command, str(seed)], capture_output=True, text=True, timeout=600)
  report = f"seed {seed}:\n" + "\n".join(
      line for line in result.stdout.splitlines() if not line.startswith("ok ")) + result.stderr[-2000:]
  assert result.returncode == 0, report
  summary = result.stdout.strip().splitlines()[-1]
  failed, _, total = summary.partition(" of ")
  assert failed == "0" and int(total.split()[0]) >= 200, report  # every check ran, none failed
  return result.stdout


def _fresh_seed():
  return int.from_bytes(os.urandom(4), "little")


def _compiler():
  try:
    return kernels._compiler()[0]
  except kernels.KernelUnavailable as error:
    pytest.skip(str(error))


@pytest.mark.kernel
def test_the_kernel_header_matches_float64_on_this_machine(tmp_path):
  # The harness against the build the Python tests check too (-march=native): a wrong harness fails here.
  binary = tmp_path / "kernel_check"
  compiler = _compiler()
  _compile(compiler, list(kernels.target_flags(compiler)), binary)
  _run([str(binary)], _fresh_seed())


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which(ARM_CXX) is None or shutil.which(QEMU) is None,
                    reason=f"{ARM_CXX} and {QEMU} are not both installed (Debian: apt-get install "
                           "g++-aarch64-linux-gnu qemu-user)")
def test_the_kernel_header_matches_float64_on_arm_under_emulation(tmp_path):
  binary = tmp_path / "kernel_check_arm"
  _compile(ARM_CXX, ["-march=armv8-a", "-static"], binary)
  _run([QEMU, str(binary)], _fresh_seed())


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which(ARM_CXX) is None, reason=f"{ARM_CXX} is not installed (Debian: apt-get install "
                                                            "g++-aarch64-linux-gnu)")
def test_the_xla_binding_compiles_for_arm():
  # Every template the binding instantiates, checked for Arm (the header's code generation is checked above).
  import jax  # pylint: disable=import-outside-toplevel
  result = subprocess.run([ARM_CXX, *kernels.BASE_FLAGS, "-march=armv8-a", "-fsyntax-only", "-isystem",
                           jax.ffi.include_dir(), kernels.SOURCE], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "warning" not in result.stderr, result.stderr[-4000:]


def test_a_harness_failure_is_reported_with_its_seed(tmp_path):
  # The harness's verdict is read from its exit status and summary: a run reporting a failed check must fail.
  script = tmp_path / "fake_check.py"
  script.write_text("import sys\nprint('FAIL dispatch: max error 1')\nprint('1 of 208 checks failed')\n"
                    "sys.exit(1)\n")
  with pytest.raises(AssertionError, match="seed 5"):
    _run([sys.executable, str(script)], 5)
  script.write_text("print('0 of 3 checks failed')\n")
  with pytest.raises(AssertionError):
    _run([sys.executable, str(script)], 5)


def test_arm_cores_are_named_from_their_part_numbers(monkeypatch):
  monkeypatch.setattr(machine, "_cpuinfo", lambda: {"CPU implementer": "0x41", "CPU part": "0xd4f",
                                                    "Features": "fp asimd bf16"})
  assert machine.cpu_model() == "Arm Neoverse-V2"
  monkeypatch.setattr(machine, "_cpuinfo", lambda: {"CPU implementer": "0x41", "CPU part": "0xfff"})
  assert machine.cpu_model() == "Arm part 0xfff"
  monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "AMD EPYC", "CPU part": "0xd4f"})
  assert machine.cpu_model() == "AMD EPYC"


def test_native_builds_of_two_arm_cpus_are_cached_apart(tmp_path):
  # -march=native differs between Arm cores too: their cpuinfo (no model name, no flags) must still key the build.
  signatures = []
  for part in ("0xd0c", "0xd4f"):
    cpuinfo = tmp_path / f"cpuinfo_{part}"
    cpuinfo.write_text(f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
                       f"CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: {part}\n\n")
    signatures.append(kernels._cpu_signature(str(cpuinfo)))
  assert signatures[0] != signatures[1] and all("CPU part" in s for s in signatures)


def test_a_compiler_that_refuses_march_native_gets_mcpu_or_its_default(monkeypatch, tmp_path):
  # Clang before 15 on Arm (Apple's on Apple silicon among them) refuses -march=native but takes -mcpu=native.
  monkeypatch.delenv(kernels.ARCH_VARIABLE, raising=False)
  for refused, expected in [("-march=native", ("-mcpu=native",)), ("-march=native|-mcpu=native", ())]:
    compiler = tmp_path / f"fake_cxx_{len(expected)}"
    compiler.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in " + refused +
                        ") echo \"clang: error: the clang compiler does not support '$a'\" >&2; exit 1;; esac; "
                        "done\nexit 0\n")
    compiler.chmod(0o755)
    assert kernels.target_flags(str(compiler)) == expected
    assert kernels.flags(str(compiler)) == (*kernels.BASE_FLAGS, *expected)
  cxx = shutil.which(os.environ.get("CXX", "c++"))
  if cxx is not None and platform.machine() in ("x86_64", "AMD64"):
    assert kernels.target_flags(cxx) == ("-march=native",)  # every x86 GCC and Clang takes it
  monkeypatch.setenv(kernels.ARCH_VARIABLE, "x86-64-v3")
  assert kernels.target_flags(str(compiler)) == ("-march=x86-64-v3",)  # a target asked for is never replaced
  monkeypatch.delenv(kernels.ARCH_VARIABLE)
  # machine.describe names what the build used
  monkeypatch.setattr(kernels, "target_flags", lambda compiler=None: ("-mcpu=native",))
  machine.describe.cache_clear()
  try:
    assert machine.describe().march == "native, built with -mcpu=native"
  finally:
    machine.describe.cache_clear()
