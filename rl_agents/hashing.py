"""Order-sensitive hashing of token rows on device (GiGPO's anchor-state ids)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

FNV_OFFSET_BASIS = 2166136261
FNV_PRIME = 16777619


def hash_tokens(tokens: jax.Array) -> jax.Array:
    """32-bit FNV-1a over the little-endian bytes of each int32 token id of the last axis:
    int ``[..., L]`` → uint32 ``[...]``. h ← offset; for each byte: h ← (h ^ byte)·prime mod 2³².

    Equal rows hash equal; order, padding and length all change the hash (a row is its exact
    token sequence). A ``lax.scan`` over the 4·L bytes, vectorised over the leading axes.
    """
    t = jnp.asarray(tokens)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array; got dtype {t.dtype}")
    if t.ndim < 1:
        raise ValueError(f"tokens must have a last (sequence) axis; got shape {t.shape}")
    u = jax.lax.bitcast_convert_type(t.astype(jnp.int32), jnp.uint32)           # [..., L]
    shifts = jnp.arange(4, dtype=jnp.uint32) * jnp.uint32(8)
    by = (u[..., None] >> shifts) & jnp.uint32(0xFF)                            # [..., L, 4]
    by = by.reshape(t.shape[:-1] + (t.shape[-1] * 4,))
    by = jnp.moveaxis(by, -1, 0)                                                # [4L, ...]
    h0 = jnp.full(t.shape[:-1], FNV_OFFSET_BASIS, jnp.uint32)

    def step(h, b):
        return (h ^ b) * jnp.uint32(FNV_PRIME), None

    h, _ = jax.lax.scan(step, h0, by)
    return h
