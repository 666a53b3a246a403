"""KV cache for incremental decoding: fixed shapes, per-row lengths, compacted rows.

Row b holds ``lengths[b]`` valid tokens in slots [0, lengths[b]); slots beyond are garbage that
masks exclude and later writes overwrite. A chunk of C tokens (``valid`` a prefix mask) is
written at slots [lengths_b, lengths_b + C) with RoPE positions lengths_b + arange(C); query i
attends to slots j <= lengths_b + i; then lengths_b += sum(valid_b). Shapes never change, so
``prefill`` / ``decode_step`` jit once and run inside ``lax.scan``. Writes past ``max_len`` are
dropped (the caller sizes the cache; inside jit this cannot raise).

Where ``KV_BLOCK`` names the backend (CPU: 64), a step's attention reads only the first
``kv_len`` slots, kv_len the smallest of (block, 2·block, ..., max_len) >= max(lengths), picked
by ``lax.switch`` among one traced call per bucket: cost follows the filled prefix, not max_len,
with the same results (slots >= every row's length are masked anyway).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array        # [n_layers, B, S_max, n_kv_heads, head_dim] (cfg.dtype), post-RoPE keys
    v: jax.Array        # same, values
    lengths: jax.Array  # int32 [B]: valid tokens stored per row (slots [0, lengths))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """Zero cache for ``batch_size`` rows of up to ``max_len`` tokens (lengths 0)."""
    for name, val in (("batch_size", batch_size), ("max_len", max_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"init_cache: {name} must be a positive int, got {val!r}")
    shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype),
                   lengths=jnp.zeros((batch_size,), jnp.int32))


def check_cache(cfg: ModelConfig, cache: KVCache, batch: int) -> None:
    """Static shape checks (raise ValueError naming the mismatch)."""
    want = (cfg.n_layers, batch, cache.k.shape[2], cfg.n_kv_heads, cfg.head_dim)
    for name, arr in (("k", cache.k), ("v", cache.v)):
        if tuple(arr.shape) != want:
            raise ValueError(f"KVCache.{name} has shape {tuple(arr.shape)}, expected {want} "
                             f"(n_layers, batch, max_len, n_kv_heads, head_dim)")
    if tuple(cache.lengths.shape) != (batch,):
        raise ValueError(f"KVCache.lengths has shape {tuple(cache.lengths.shape)}, expected ({batch},)")


def chunk_positions(cache: KVCache, chunk_len: int):
    """RoPE positions [B, C] of a chunk appended to the cache: lengths_b + arange(C)."""
    return cache.lengths[:, None] + jnp.arange(chunk_len, dtype=jnp.int32)[None, :]


def write_chunk(cache: KVCache, k_chunk, v_chunk, valid=None) -> KVCache:
    """Store k/v_chunk [L, B, C, Hkv, D] at slots [lengths_b, lengths_b + C) of each row (one
    scatter, out-of-range slots dropped) and advance lengths by sum(valid_b) (C if None)."""
    b, c = k_chunk.shape[1], k_chunk.shape[2]
    rows = jnp.arange(b)[:, None]
    slots = chunk_positions(cache, c)
    k = cache.k.at[:, rows, slots].set(k_chunk.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, slots].set(v_chunk.astype(cache.v.dtype), mode="drop")
    n = jnp.full((b,), c, jnp.int32) if valid is None else valid.astype(jnp.int32).sum(-1)
    return KVCache(k=k, v=v, lengths=cache.lengths + n)


# Cache-length buckets: attention over a cache reads every slot of it, so a step attends over
# only the first kv_len slots, kv_len = the smallest bucket >= max(lengths) (exact: later slots
# are masked for every row). One traced model call per bucket, chosen by ``lax.switch``.
# ``KV_BLOCK`` maps a backend to the bucket width (buckets block, 2·block, ..., max_len); a
# backend not listed (or width 0) always attends over the whole cache.
KV_BLOCK: dict[str, int] = {"cpu": 64}


def kv_buckets(max_len: int, block: int) -> tuple[int, ...]:
    """Static bucket sizes: multiples of ``block`` below ``max_len``, then ``max_len``
    (``(max_len,)`` when block is 0 or >= max_len)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"kv block={block!r} must be an int >= 0")
    if block == 0 or block >= max_len:
        return (max_len,)
    return tuple(range(block, max_len, block)) + (max_len,)


def default_kv_block() -> int:
    """``KV_BLOCK`` for the default backend (0: no buckets)."""
    return KV_BLOCK.get(jax.default_backend(), 0)


def _apply(model, params, tokens, cache: KVCache, valid, head_at=None):
    """model.apply on a chunk with the cache, attention over the bucket covering max(lengths);
    the chunk's K/V are written to the cache here (``write=False`` in the model call)."""
    buckets = kv_buckets(cache.max_len, default_kv_block())
    if len(buckets) == 1:
        out, (k_chunk, v_chunk) = model.apply({"params": params}, tokens, cache=cache,
                                              valid=valid, write=False, head_at=head_at)
        return out, write_chunk(cache, k_chunk, v_chunk, valid)
    need = jnp.max(cache.lengths)
    idx = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets, jnp.int32), need, side="left"),
                      len(buckets) - 1)
    # branches return only the chunk's K/V (a full-cache output would be copied out of the
    # conditional every step); the chunk is stored once, after the switch
    branches = [lambda p, t, c, v, h, s=s: model.apply({"params": p}, t, cache=c, valid=v,
                                                       kv_len=s, write=False, head_at=h)
                for s in buckets]
    out, (k_chunk, v_chunk) = jax.lax.switch(idx, branches, params, tokens, cache, valid, head_at)
    return out, write_chunk(cache, k_chunk, v_chunk, valid)


def prefill(model, params, tokens, cache: KVCache, valid=None, last_only: bool = False):
    """Append a chunk: tokens int32 [B, C], valid bool [B, C] (a prefix of each row; default all
    True). Returns (out [B, C, ...], new cache); out is logits for PolicyModel, values for
    ValueModel (entries at invalid positions are garbage).

    ``last_only``: out is [B, ...], each row's output at its last valid position (position
    sum(valid) − 1; garbage for a row with no valid token), and the head runs on those B
    positions only, so a policy never builds [B, C, V] logits."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"prefill: tokens must be [B, C], got shape {tokens.shape}")
    if valid is not None and tuple(jnp.shape(valid)) != tuple(tokens.shape):
        raise ValueError(f"prefill: valid shape {tuple(jnp.shape(valid))} != tokens shape "
                         f"{tuple(tokens.shape)}")
    head_at = None
    if last_only:
        n = (jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32) if valid is None
             else jnp.asarray(valid).astype(jnp.int32).sum(-1))
        head_at = jnp.maximum(n - 1, 0)
    return _apply(model, params, tokens, cache, valid, head_at)


def decode_step(model, params, token, cache: KVCache, valid=None):
    """One token per row: token int32 [B], valid bool [B] (rows with False keep their length;
    their output is garbage). Same as ``prefill`` with C = 1. Returns (out [B, ...], cache)."""
    token = jnp.asarray(token)
    if token.ndim != 1:
        raise ValueError(f"decode_step: token must be [B], got shape {token.shape}")
    if valid is not None and tuple(jnp.shape(valid)) != tuple(token.shape):
        raise ValueError(f"decode_step: valid shape {tuple(jnp.shape(valid))} != token shape "
                         f"{tuple(token.shape)}")
    out, cache = _apply(model, params, token[:, None], cache,
                        None if valid is None else valid[:, None])
    return out[:, 0], cache
