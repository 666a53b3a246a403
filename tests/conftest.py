"""Test-wide settings: CPU only, float32 matmuls at full precision, 8 virtual host devices, and
XLA at its quickest compilation.

The suite's time is XLA compilation: hundreds of small programs, most run a few times.
``JAX_DISABLE_MOST_OPTIMIZATIONS`` (LLVM at ``-O0``, its expensive passes off) compiles them in
about two thirds of the time; the programs run up to 2x slower, which only tests that run one
program for minutes notice: those ask for the ``optimized_compilation`` fixture. The setting
changes how the CPU code is generated, not what it computes. It is an environment variable so
that the subprocesses of the multi-process and kill -9 tests compile the same way; a user's
``XLA_FLAGS`` is kept and extended.

Each compiled CPU program holds a few memory mappings of its own code for as long as JAX's
caches keep it. One test worker compiles thousands of programs, more than Linux's default
limit of 65530 mappings per process allows, and XLA's CPU compiler crashes (a segmentation
fault, not an error) when it cannot map the next one. After a test, when the worker holds more
than half that limit, JAX's caches are cleared so the programs are freed.
"""
import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")          # quickest compilation
flags = os.environ.get("XLA_FLAGS", "").split()
if not any(f.startswith("--xla_force_host_platform_device_count=") for f in flags):
    flags.append("--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = " ".join(flags)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def optimized_compilation():
    """XLA's full optimisation for this test's compilations (a test that runs its programs for
    minutes, where -O0 code costs more than the compile time it saves)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _mapping_limit():
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _mappings():
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


MAPPING_LIMIT = _mapping_limit()


@pytest.fixture(autouse=True)
def _free_compiled_programs_near_the_mapping_limit():
    yield
    if MAPPING_LIMIT and _mappings() > MAPPING_LIMIT // 2:
        jax.clear_caches()
        gc.collect()
