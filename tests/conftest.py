"""Test-wide settings: CPU only, float32 matmuls at full precision, 8 virtual host devices.

The suite compiles many small programs and runs each a few times, so compilation is made
cheap: XLA's CPU backend at optimization level 0 (``--xla_backend_optimization_level=0``:
LLVM's code-generation optimizations off, the HLO passes as usual; the programs compute the
same functions, rounding may differ in the last bits, e.g. where fused multiply-adds are
formed), and one
persistent compilation cache per test session, shared by the xdist workers (the same program
built by two tests, or two workers, compiles once). The cache lives in a temporary directory
that the session removes at its end. Set ``XLA_FLAGS`` or ``JAX_COMPILATION_CACHE_DIR`` to
choose otherwise.
"""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # created by the session's first process (the xdist controller), inherited by its workers
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-test-cache-")
    os.environ["JAX_TEST_CACHE_OWNER"] = str(os.getpid())

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if os.environ.get("JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
