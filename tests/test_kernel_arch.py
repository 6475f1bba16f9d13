"""The lookup kernel built for CPUs without AVX-512 (LCNN_JAX_KERNEL_ARCH): each build passes the kernel's tests
against the float64 references, in a process of its own (a process loads one build of the kernel)."""

import os
import platform
import subprocess
import sys

import pytest

from lcnn_jax.inference import kernels, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine() in ("x86_64", "AMD64")

BUILDS = {
    # AVX2 and FMA, no AVX-512 (Intel laptops, AMD before Zen 4): every kernel path, every backend case.
    "x86-64-v3": ("avx2", ["tests/test_kernels.py", "tests/test_inference.py", "-k",
                           "not network and (kernel or lookup or pools_its_output or residual or dense_rows)"]),
    # No SIMD beyond the x86-64 baseline (SSE2): the kernel's own tests and the lookups of every layer case.
    "x86-64": ("sse2", ["tests/test_inference.py", "-k", "backend_equals and lookup"]),
}


@pytest.mark.kernel
@pytest.mark.skipif(not X86, reason=f"the -march targets tested here are x86's; this machine is {platform.machine()}")
@pytest.mark.parametrize("arch", sorted(BUILDS))
def test_the_kernel_built_without_avx512_passes_its_tests(arch, tmp_path):
  isa, tests = BUILDS[arch]
  # Only the kernel's cases: the dense, factored, gather and Pallas forms do not call the build under test.
  env = dict(os.environ, LCNN_JAX_KERNEL_ARCH=arch, LCNN_JAX_REQUIRE_KERNEL="1", LCNN_JAX_TEST_BACKENDS="lookup")
  check = subprocess.run([sys.executable, "-c", "from lcnn_jax.inference import machine; "
                          "d = machine.describe(); print(d.kernel_arch, d.march)"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert check.returncode == 0, check.stderr[-2000:]
  assert check.stdout.split() == [isa, arch]  # built for that target, cached apart from the native build
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert " passed" in result.stdout and " failed" not in result.stdout


def test_a_malformed_arch_is_refused_with_the_variable_named(monkeypatch):
  monkeypatch.setenv(kernels.ARCH_VARIABLE, "native; rm -rf /")
  with pytest.raises(kernels.KernelUnavailable, match="LCNN_JAX_KERNEL_ARCH"):
    kernels.flags()
  monkeypatch.setenv(kernels.ARCH_VARIABLE, "x86-64-v3")
  assert "-march=x86-64-v3" in kernels.flags()
  monkeypatch.delenv(kernels.ARCH_VARIABLE)
  assert "-march=native" in kernels.flags()


def test_cache_sizes_and_shared_l2_are_read_from_the_machine(monkeypatch):
  l1, l2, l3 = machine.cache_sizes()
  if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
    assert l1 and l2 and l1 < l2  # a Linux machine says
  assert machine._parse_size("48K") == 48 << 10 and machine._parse_size("2048K") == 2 << 20
  assert machine._cpu_list("0-3,8") == {0, 1, 2, 3, 8} and machine._cpu_list("5") == {5}
  monkeypatch.setenv("LCNN_JAX_L2_BYTES", "1048576")
  assert machine.tile_budget_bytes() == (1 << 20) // 2 // machine.l2_sharers()
  monkeypatch.setenv("LCNN_JAX_L2_BYTES", "a lot")
  with pytest.raises(ValueError, match="LCNN_JAX_L2_BYTES"):
    machine.tile_budget_bytes()


def test_the_machine_line_names_cpu_caches_cores_and_the_kernel_build():
  described = machine.describe()
  assert described.cores >= 1 and described.cpu
  line = described.line()
  assert described.cpu in line and f"-march={described.march}" in line and "L2" in line
  assert machine.cpu_key().startswith(described.cpu) and described.march in machine.cpu_key()
