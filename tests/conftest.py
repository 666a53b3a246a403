"""Test-wide settings: CPU only, float32 matmuls at full precision, 8 virtual host devices, and
XLA's CPU backend at its quickest compilation.

The suite's time is XLA compilation: hundreds of small programs, most run a few times. LLVM at
``-O0`` compiles them in about two thirds of the time (the programs themselves run up to 2x
slower, which only the few learning tests notice). The flag changes how the CPU code is
generated, not what it computes; a user's ``XLA_FLAGS`` is kept and extended.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "").split()
for name, value in (("--xla_force_host_platform_device_count", "8"),
                    ("--xla_backend_optimization_level", "0")):       # quickest compilation
    if not any(f.startswith(name + "=") for f in flags):
        flags.append(f"{name}={value}")
os.environ["XLA_FLAGS"] = " ".join(flags)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
