"""Grouped-query self-attention with RoPE: full (packed / padded) and KV-cached paths.

GQA: the H query heads are split into H_kv groups of G = H / H_kv heads sharing one K/V head;
q is reshaped to [B, T, H_kv, G, D] and contracted with k [B, S, H_kv, D] directly (K/V are never
repeated). Scores are (q·k)·D^(−1/2) in float32. Full sequences: XLA or the Pallas flash-attention
kernel; the KV-cached path: XLA or the Pallas decode kernel merged with the chunk's own keys.
Under a context mesh (``models.sharding.on_mesh``) both kernels run per shard (``shard_map``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig
from models.layers import Dense
from models.rope import apply_rope, config_rope
from models.sharding import (BATCH_AXES, TENSOR_AXIS, constrain_activation, context_mesh,
                             divisible_axes)

NEG_INF = -1e30   # finite: masked scores underflow to exactly 0 after exp, never NaN


def segment_causal_mask(segment_ids):
    """[B, T, T] bool: query i sees key j iff j <= i, seg_i == seg_j and seg_j != 0."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] != 0)


def xla_attention(q, k, v, mask, scale: float):
    """softmax(scale·q kᵀ masked) v. q [B,T,H,D], k/v [B,S,Hkv,D], mask [B,T,S] bool.
    Query rows with no visible key give 0. Returns [B,T,H,D] in q's dtype."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None]
    s = jnp.where(m, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


def cached_attention(q, k_new, v_new, k_cache, v_cache, lengths, scale: float,
                     impl: str = "xla"):
    """Attention of a chunk over [cache slots < lengths_b] ∪ [chunk keys j <= i].

    q [B,C,H,D]; k_new / v_new [B,C,Hkv,D] (the chunk's own keys, not yet in the cache);
    k_cache / v_cache [B,S,Hkv,D]; lengths int32 [B]. Query i of row b therefore sees cache slots
    j < lengths_b and chunk positions <= i — the same set as slots j <= lengths_b + i once the
    chunk is written at [lengths_b, lengths_b + C). One softmax over both parts; the mask comes
    from ``lengths`` (no [S, S] matrix). Returns [B,C,H,D] in q's dtype.

    ``impl="pallas"`` computes the cache part with ``pallas_kernels.flash_decode``, whose work
    stops at each row's own length (the XLA path reads every slot of the cache it is given),
    and merges it with the chunk part through the kernel's log-sum-exp:

        o = (e^(lse − m) o_cache + Σ_j e^(s_j − m) v_j) / (e^(lse − m) + Σ_j e^(s_j − m)),

    m = max(lse, max_j s_j). Used when C·H/Hkv <= ``PALLAS_CACHED_MAX_GROUP`` (decode steps and
    short chunks: the C queries of a kv head are one tile of the kernel); longer chunks (prompt
    prefill) take the XLA path.
    """
    if impl not in ("xla", "pallas"):
        raise ValueError(f"cached_attention impl={impl!r} is not one of ('xla', 'pallas')")
    b, c, h, d = q.shape
    hkv = k_new.shape[2]
    g = h // hkv
    qg = q.reshape(b, c, hkv, g, d)
    s_new = jnp.einsum("bckgd,bjkd->bkgcj", qg, k_new.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale
    s_new = jnp.where(jnp.tril(jnp.ones((c, c), bool)), s_new, NEG_INF)
    if impl == "pallas" and c * g <= PALLAS_CACHED_MAX_GROUP:
        return _cached_attention_pallas(q, qg, s_new, v_new, k_cache, v_cache, lengths, scale)
    s_old = jnp.einsum("bckgd,bskd->bkgcs", qg, k_cache.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale
    old_ok = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]              # [B,S]
    s_old = jnp.where(old_ok[:, None, None, None, :], s_old, NEG_INF)
    mx = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    p_old, p_new = jnp.exp(s_old - mx), jnp.exp(s_new - mx)
    denom = p_old.sum(-1) + p_new.sum(-1)                                          # [B,K,G,C]
    o = (jnp.einsum("bkgcs,bskd->bckgd", p_old.astype(q.dtype), v_cache.astype(q.dtype),
                    preferred_element_type=jnp.float32)
         + jnp.einsum("bkgcj,bjkd->bckgd", p_new.astype(q.dtype), v_new.astype(q.dtype),
                      preferred_element_type=jnp.float32))
    o = o / jnp.moveaxis(denom, 3, 1)[..., None]
    return o.reshape(b, c, h, d).astype(q.dtype)


PALLAS_CACHED_MAX_GROUP = 64   # largest C·G the cached Pallas path takes as one query tile


def _cached_attention_pallas(q, qg, s_new, v_new, k_cache, v_cache, lengths, scale):
    """The cache part by ``flash_decode`` (queries of kv head k as [C·G] rows), merged by lse."""
    from pallas_kernels import flash_decode
    b, c, h, d = q.shape
    hkv, g = qg.shape[2], qg.shape[3]
    q_rows = qg.transpose(0, 2, 1, 3, 4).reshape(b, hkv * c * g, d)               # [B,K·C·G,D]
    o_old, lse = _decode_per_shard(
        functools.partial(flash_decode, sm_scale=scale, return_lse=True),
        q_rows, k_cache, v_cache, lengths)
    o_old = o_old.reshape(b, hkv, c, g, d).transpose(0, 1, 3, 2, 4)               # [B,K,G,C,D]
    lse = lse.reshape(b, hkv, c, g).transpose(0, 1, 3, 2)                         # [B,K,G,C]
    mx = jnp.maximum(lse, s_new.max(-1))          # finite: every query sees its own key
    w_old = jnp.exp(lse - mx)                     # 0 where the row's cache is empty
    p_new = jnp.exp(s_new - mx[..., None])
    denom = w_old + p_new.sum(-1)
    o = (w_old[..., None] * o_old
         + jnp.einsum("bkgcj,bjkd->bkgcd", p_new.astype(q.dtype), v_new.astype(q.dtype),
                      preferred_element_type=jnp.float32))
    o = o / denom[..., None]                                                       # [B,K,G,C,D]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, c, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------- kernels on a mesh
# XLA's SPMD partitioner does not split a Pallas call: under a sharded jit it gathers the
# kernel's inputs to every device, and each device computes the whole batch. The calls below
# run the kernel per shard with ``jax.shard_map`` over the context mesh (set by the trainer,
# ``models.sharding.on_mesh``): rows split over the data axes ("data", "fsdp") when the batch
# divides over them, kv heads (with their query heads) over "tensor" when they divide. With no
# context mesh, a one-device mesh or nothing to split, the kernel is called directly.


def _kernel_specs(batch: int, kv_heads: int):
    """(mesh, batch entry, head entry) of the per-shard call, or None to call directly."""
    mesh = context_mesh()
    if mesh is None:
        return None
    bt = divisible_axes(mesh, BATCH_AXES, batch)
    hd = divisible_axes(mesh, (TENSOR_AXIS,), kv_heads)
    if bt is None and hd is None:
        return None
    return mesh, bt, hd


def _flash_attention_per_shard(flash_attention, q, k, v, segment_ids):
    """``flash_attention(q, k, v, segment_ids=...)`` with q [B,T,H,D], k / v [B,S,Hkv,D],
    segment_ids [B,T], run on each shard of the context mesh (see above)."""
    specs = _kernel_specs(q.shape[0], k.shape[2])
    if specs is None:
        return flash_attention(q, k, v, segment_ids=segment_ids)
    mesh, bt, hd = specs
    x = P(bt, None, hd, None)
    return jax.shard_map(lambda q_, k_, v_, s_: flash_attention(q_, k_, v_, segment_ids=s_),
                         mesh=mesh, in_specs=(x, x, x, P(bt, None)), out_specs=x,
                         check_vma=False)(q, k, v, segment_ids)


def _decode_per_shard(flash_decode, q_rows, k_cache, v_cache, lengths):
    """``flash_decode(q_rows, k_cache, v_cache, lengths) -> (out, lse)`` with q_rows
    [B, Hkv·R, D] (the rows of kv head k contiguous), caches [B,S,Hkv,D], lengths [B], run on
    each shard of the context mesh (see above)."""
    specs = _kernel_specs(q_rows.shape[0], k_cache.shape[2])
    if specs is None:
        return flash_decode(q_rows, k_cache, v_cache, lengths)
    mesh, bt, hd = specs
    rows, cache = P(bt, hd, None), P(bt, None, hd, None)
    return jax.shard_map(flash_decode, mesh=mesh, in_specs=(rows, cache, cache, P(bt)),
                         out_specs=(rows, P(bt, hd)), check_vma=False)(
        q_rows, k_cache, v_cache, lengths)


def _pallas_flash_attention():
    """``pallas_kernels.flash_attention`` or None when it cannot be imported."""
    try:
        from pallas_kernels import flash_attention
    except ImportError:
        return None
    return flash_attention


def resolve_attention_impl(impl: str) -> str:
    """"auto" → "pallas" on a GPU / TPU (when the kernel imports) with one device, or with
    several under a context mesh (``models.sharding.on_mesh``: the kernels then run per shard);
    "xla" otherwise. Read at trace time.

    Without a context mesh, "auto" stays on XLA with several devices: XLA's SPMD partitioner
    does not split a Pallas call, so under a sharded jit the kernel's inputs would be gathered
    to every device and each would compute the whole batch."""
    if impl == "auto":
        if (jax.default_backend() in ("gpu", "tpu")
                and (jax.device_count() == 1 or context_mesh() is not None)
                and _pallas_flash_attention() is not None):
            return "pallas"
        return "xla"
    if impl not in ("xla", "pallas"):
        raise ValueError(f"attention_impl={impl!r} is not one of ('auto', 'xla', 'pallas')")
    return impl


def cached_attention_impl(impl: str) -> str:
    """The KV-cached path's implementation: "pallas" only when asked for by name ("auto" keeps
    it on XLA: the decode kernel is tested in interpret mode and lowered for Triton / Mosaic,
    not yet compiled and timed on a device)."""
    resolve_attention_impl(impl)          # validates the name
    return "pallas" if impl == "pallas" else "xla"


class Attention(nn.Module):
    """Self-attention block: q/k/v projections (+ optional biases), RoPE, GQA, o_proj.

    Without ``layer_cache``: causal attention within equal non-zero segment ids (packed / padded
    rows), returns (out, None). With ``layer_cache=(k_cache, v_cache)`` [B,S,Hkv,D] and
    ``lengths`` [B]: the chunk attends to the cache prefix and causally to itself; returns
    (out, (k_chunk, v_chunk)) — the chunk's post-RoPE keys / values for the caller to store.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache=None, lengths=None):
        cfg = self.cfg
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, use_bias=cfg.qkv_bias)
        q = Dense((h, d), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
        k = Dense((hkv, d), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = Dense((hkv, d), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        q, k, v = (constrain_activation(y, heads_dim=2) for y in (q, k, v))  # see models.sharding
        inv_freq, mscale = config_rope(cfg)
        q = apply_rope(q, positions, inv_freq, mscale)
        k = apply_rope(k, positions, inv_freq, mscale)
        scale = 1.0 / math.sqrt(d)
        new_kv = None
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
            o = cached_attention(q, k, v, k_cache, v_cache, lengths, scale,
                                 impl=cached_attention_impl(cfg.attention_impl))
            new_kv = (k, v)
        elif resolve_attention_impl(cfg.attention_impl) == "pallas":
            flash_attention = _pallas_flash_attention()
            if flash_attention is None:
                raise ImportError("attention_impl='pallas' needs pallas_kernels.flash_attention, "
                                  "which could not be imported")
            o = _flash_attention_per_shard(
                functools.partial(flash_attention, causal=True, sm_scale=scale),
                q, k, v, segment_ids.astype(jnp.int32))
        else:
            o = xla_attention(q, k, v, segment_causal_mask(segment_ids), scale)
        out = Dense((x.shape[-1],), ("heads", "head_dim", "embed"), n_in=2, name="o_proj",
                    dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)(o)
        return out, new_kv
