"""Flash decoding: one query token per row against a (compacted) KV cache, GQA, split-K.

For row b, query head h (kv head g = h // (H // Hkv)) and valid length L_b:

    out_bh = Σ_{j < L_b} softmax_j(sm_scale q_bh · k_bjg) v_bjg,   out_bh = 0 if L_b == 0.

The cache axis is cut into ``num_splits`` chunks processed by separate programs (grid
(B, Hkv, splits)); each runs the online softmax of attention.py over its chunk's key blocks
(stopping at L_b, so work scales with the valid length) for all H / Hkv query heads of its kv
head at once (a [G, D] x [D, bk] tile: K / V are read once per group). The partial results
(o_s unnormalised, m_s, l_s; base 2) are merged in XLA:

    m = max_s m_s,  l = Σ_s 2^(m_s - m) l_s,  out = Σ_s 2^(m_s - m) o_s / l.

With ``return_lse=True`` the wrapper also returns the natural-log normaliser
lse_bh = log Σ_{j < L_b} exp(sm_scale q_bh · k_bjg) = (m + log2 l) · ln 2 (−inf when L_b = 0),
so a caller can merge this attention with keys held elsewhere (``models.attention`` merges a
chunk's own keys this way).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (LOG2E, NEG_INF, check_int, compiler_params, next_pow2,
                                    pad_axis, resolve, round_up)
from pallas_kernels.attention import _dot_nn, _dot_nt


def _check_decode_args(q, k_cache, v_cache, lengths, sm_scale):
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H, D]; got shape {q.shape}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [B, S, Hkv, D]; got "
                         f"{k_cache.shape}, {v_cache.shape}")
    b, h, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"cache batch / head_dim must match q {q.shape}; got {k_cache.shape}")
    if h % k_cache.shape[2]:
        raise ValueError(f"number of query heads H={h} must be a multiple of kv heads "
                         f"Hkv={k_cache.shape[2]}")
    if tuple(jnp.shape(lengths)) != (b,):
        raise ValueError(f"lengths must be int [B] = ({b},); got shape {jnp.shape(lengths)}")
    if sm_scale is not None and not isinstance(sm_scale, (int, float, np.floating)):
        raise ValueError(f"sm_scale must be a Python float or None; got {sm_scale!r}")


def decode_reference(q, k_cache, v_cache, lengths, *, sm_scale=None):
    """jnp reference for ``flash_decode`` (float32 math, output in q's dtype)."""
    _check_decode_args(q, k_cache, v_cache, lengths, sm_scale)
    b, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    qf = q.astype(jnp.float32).reshape(b, hkv, h // hkv, d)
    logits = jnp.einsum("bkgd,bskd->bkgs", qf, k_cache.astype(jnp.float32)) * sm_scale
    valid = (jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None])[:, None, None, :]
    logits = jnp.where(valid, logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(valid, jnp.exp(logits - mx), 0.0)
    den = jnp.sum(p, -1, keepdims=True)
    p = p / jnp.where(den == 0, 1.0, den)
    out = jnp.einsum("bkgs,bskd->bkgd", p, v_cache.astype(jnp.float32))
    return out.reshape(b, h, d).astype(q.dtype)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, chunk, bk, scale2,
                   smem_lengths):
    """One (row, kv head, split): q_ref [G, D], k_ref / v_ref [chunk, D].

    len_ref: the row's length as a 0-d block (GPU / interpret) or all lengths in SMEM (TPU).
    """
    start = pl.program_id(2) * chunk
    length = len_ref[pl.program_id(0)] if smem_lengths else len_ref[...]
    q = q_ref[...]
    g, d = q.shape
    n_valid = jnp.clip(length - start, 0, chunk)            # valid keys in this chunk
    hi = lax.div(n_valid + bk - 1, bk)

    def body(j, carry):
        o, m, l = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * scale2                          # [G, bk]
        mask = (k_start + lax.broadcasted_iota(jnp.int32, (g, bk), 1)) < n_valid
        s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp2(s - m_new), 0.0)
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        o = alpha * o + _dot_nn(p.astype(v.dtype), v)
        return o, m_new, l

    init = (jnp.zeros((g, d), jnp.float32), jnp.full((g, 1), NEG_INF, jnp.float32),
            jnp.zeros((g, 1), jnp.float32))
    o, m, l = lax.fori_loop(0, hi, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _pick_splits(n_blocks: int, parallel: int, target_programs: int) -> int:
    """Largest divisor of n_blocks not above ceil(target_programs / parallel)."""
    want = max(1, min(n_blocks, -(-target_programs // max(parallel, 1))))
    for cand in range(want, 0, -1):
        if n_blocks % cand == 0:
            return cand
    return 1


def flash_decode(q, k_cache, v_cache, lengths, *, sm_scale=None, interpret=None, block_k=None,
                 num_splits=None, backend: str | None = None, return_lse: bool = False):
    """Attention of one query token per row over a KV cache with valid lengths.

    q [B, H, D]; k_cache / v_cache [B, S, Hkv, D] (H % Hkv == 0, GQA); lengths int32 [B]:
    key slots j < lengths[b] are attended (compacted cache). Rows with length 0 give zeros.
    Returns [B, H, D] in q's dtype. ``block_k`` (power of two) is the key tile; ``num_splits``
    the split-K factor (default: enough programs to fill the device). S is padded to a
    multiple of block_k * num_splits only if needed (a copy; pick S accordingly).
    ``return_lse=True`` returns (out float32 [B, H, D], lse float32 [B, H]); see the module doc.
    """
    _check_decode_args(q, k_cache, v_cache, lengths, sm_scale)
    interpret, backend = resolve(interpret, backend)
    b, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    g = h // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    gpu = backend == "gpu" and not interpret
    tpu = backend == "tpu" and not interpret
    min_block = 16 if gpu else (128 if tpu else 8)
    if block_k is None:
        block_k = {"gpu": 64, "tpu": 128}.get(backend, 64)
    check_int("block_k", block_k, minimum=8, pow2=True)
    bk = max(min_block, min(block_k, next_pow2(s)))
    n_blocks = -(-s // bk)
    if num_splits is None:
        num_splits = _pick_splits(n_blocks, b * hkv, 256 if gpu else 1)
    check_int("num_splits", num_splits, minimum=1)
    sp_len = round_up(s, bk * num_splits)
    chunk = sp_len // num_splits

    # Group the query heads of each kv head: [B, Hkv, Gp, Dp]; Triton dots need >= 16 rows.
    gp = max(16, next_pow2(g)) if gpu else (round_up(g, 8) if tpu else g)
    dp = max(16, next_pow2(d)) if gpu else (round_up(d, 128) if tpu else d)
    qg = pad_axis(pad_axis(q.reshape(b, hkv, g, d), 2, gp), 3, dp)
    kc = pad_axis(pad_axis(k_cache.astype(q.dtype), 1, sp_len), 3, dp)
    vc = pad_axis(pad_axis(v_cache.astype(q.dtype), 1, sp_len), 3, dp)
    lens = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, s)
    tpu_layout = backend == "tpu"   # also in interpret mode (testable on CPU)
    if tpu_layout:
        from jax.experimental.pallas import tpu as pltpu
        len_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        len_spec = pl.BlockSpec((None,), lambda i, j, c: (i,))
    if tpu_layout:
        kc, vc = kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3)
        kv_spec = pl.BlockSpec((None, None, chunk, dp), lambda i, j, c: (i, j, c, 0))
    else:
        kv_spec = pl.BlockSpec((None, chunk, None, dp), lambda i, j, c: (i, c, j, 0))
    part = lambda last: pl.BlockSpec((None, None, None, gp, last),  # noqa: E731
                                     lambda i, j, c: (i, j, c, 0, 0))
    o, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, chunk=chunk, bk=bk, scale2=sm_scale * LOG2E,
                          smem_lengths=tpu_layout),
        grid=(b, hkv, num_splits),
        in_specs=[len_spec,
                  pl.BlockSpec((None, None, gp, dp), lambda i, j, c: (i, j, 0, 0)),
                  kv_spec, kv_spec],
        out_specs=[part(dp), part(1), part(1)],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, gp, dp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, gp, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, gp, 1), jnp.float32)],
        compiler_params=compiler_params(backend, interpret, num_warps=4, num_stages=2,
                                        dimension_semantics=("parallel",) * 3),
        interpret=interpret,
        name="flash_decode",
    )(lens, qg, kc, vc)
    # merge the splits
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)                                  # [B, Hkv, splits, Gp, 1]
    l_all = jnp.sum(w * l, axis=2)
    o_all = jnp.sum(w * o, axis=2)
    out = o_all / jnp.where(l_all == 0, 1.0, l_all)
    out = out[:, :, :g, :d].reshape(b, h, d)
    if not return_lse:
        return out.astype(q.dtype)
    lse = jnp.where(l_all == 0, -jnp.inf,
                    (m_all[:, :, 0] + jnp.log2(jnp.where(l_all == 0, 1.0, l_all))) / LOG2E)
    return out, lse[:, :, :g, 0].reshape(b, h)
