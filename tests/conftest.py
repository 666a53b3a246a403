"""Test-wide settings: CPU only, float32 matmuls at full precision, 8 virtual host devices, and
XLA's CPU backend at its quickest compilation.

The suite's time is XLA compilation: hundreds of small programs, most run a few times. LLVM at
``-O0`` compiles them in about two thirds of the time (the programs themselves run up to 2x
slower, which only the few learning tests notice). The flag changes how the CPU code is
generated, not what it computes; a user's ``XLA_FLAGS`` is kept and extended.

Each compiled CPU program holds a few memory mappings of its own code for as long as JAX's
caches keep it. One test worker compiles thousands of programs, more than Linux's default
limit of 65530 mappings per process allows, and XLA's CPU compiler crashes (a segmentation
fault, not an error) when it cannot map the next one. After a test, when the worker holds more
than half that limit, JAX's caches are cleared so the programs are freed.
"""
import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "").split()
for name, value in (("--xla_force_host_platform_device_count", "8"),
                    ("--xla_backend_optimization_level", "0")):       # quickest compilation
    if not any(f.startswith(name + "=") for f in flags):
        flags.append(f"{name}={value}")
os.environ["XLA_FLAGS"] = " ".join(flags)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
