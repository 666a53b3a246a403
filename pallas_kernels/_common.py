"""Shared helpers for the Pallas kernels: backend resolution, padding, compiler params."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite stand-in for -inf in the online-softmax running max. A finite value keeps
# exp2(m_prev - m_new) well defined (never inf - inf) for rows whose keys are all masked.
NEG_INF = -1e30
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

_BACKEND_ALIASES = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu",
                    "interpret": "cpu"}


def resolve(interpret: bool | None, backend: str | None) -> tuple[bool, str]:
    """Return (interpret, backend) with backend in {"gpu", "tpu", "cpu"}.

    ``interpret=None`` means interpret mode on CPU and compiled on GPU / TPU. ``backend`` picks
    the kernel layout / compiler parameters (default: ``jax.default_backend()``); passing it
    explicitly lets a CPU-only machine *lower* the GPU or TPU kernels (see the lowering tests).
    """
    if backend is None:
        backend = jax.default_backend()
    if backend not in _BACKEND_ALIASES:
        raise ValueError(f"backend must be one of {sorted(_BACKEND_ALIASES)}; got {backend!r}")
    backend = _BACKEND_ALIASES[backend]
    if interpret is None:
        interpret = backend == "cpu"
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be None, True or False; got {interpret!r}")
    if not interpret and backend == "cpu":
        raise ValueError("interpret=False needs a GPU or TPU backend (Pallas does not compile "
                         "for CPU); got backend='cpu'. Use interpret=None or True on CPU.")
    return interpret, backend


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad ``x`` along ``axis`` at the end up to ``size`` (no-op if already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def compiler_params(backend: str, interpret: bool, *, num_warps: int | None = None,
                    num_stages: int | None = None, dimension_semantics=None):
    """Backend-specific ``compiler_params`` for ``pl.pallas_call`` (None in interpret mode)."""
    if interpret:
        return None
    if backend == "gpu":
        from jax.experimental.pallas import triton as plgpu
        kw = {}
        if num_warps is not None:
            kw["num_warps"] = num_warps
        if num_stages is not None:
            kw["num_stages"] = num_stages
        return plgpu.CompilerParams(**kw)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        if dimension_semantics is None:
            return None
        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
    return None


def check_int(name: str, value, *, minimum: int = 1, pow2: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    if pow2 and value & (value - 1):
        raise ValueError(f"{name} must be a power of two; got {value!r}")
    return value
