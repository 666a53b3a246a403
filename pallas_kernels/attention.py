"""Flash attention in Pallas: forward, dQ and dK/dV kernels, GQA, segment ids, causal skipping.

Online softmax (FlashAttention-2), per query row i, over key blocks j = 1..N (base 2, with
s_ij = log2(e) * sm_scale * q_i · k_j and masked entries contributing nothing):

    m_j = max(m_{j-1}, max_k s_ik)                      (running max, m_0 = -inf)
    l_j = 2^(m_{j-1} - m_j) l_{j-1} + Σ_k 2^(s_ik - m_j)    (running normaliser, l_0 = 0)
    o_j = 2^(m_{j-1} - m_j) o_{j-1} + Σ_k 2^(s_ik - m_j) v_k
    out_i = o_N / l_N,   lse_i = m_N + log2(l_N)

Only ``lse`` (and the output) are saved for the backward pass, which recomputes
P_ik = 2^(s_ik - lse_i) block by block:

    dV_k = Σ_i P_ik dO_i,   dP_ik = dO_i · v_k,   Δ_i = dO_i · out_i
    dS_ik = P_ik (dP_ik - Δ_i)
    dQ_i = sm_scale Σ_k dS_ik k_k,   dK_k = sm_scale Σ_i dS_ik q_i

Masking: key j is visible to query i iff (not causal or j <= i + S - T) and, with segment ids,
seg_q[i] == seg_k[j] != 0. Causal attention with T != S is aligned to the *end* (the last
query sees every key; this is the KV-cache convention). A row with no visible key (padding,
id 0, or i < T - S under causal) gets output 0 and zero gradients.

GQA: query head h reads kv head h // (H // Hkv) through the BlockSpec index map (K / V are
never repeated in memory); the dK/dV kernel for kv head g loops over its H // Hkv query heads.

Layouts: on GPU (Triton) and in interpret mode the kernels read the [B, T, H, D] arrays in
place; on TPU (Mosaic) the wrapper transposes to [B, H, T, D] so that the two minor block dims
are (sequence, head_dim) as Mosaic requires.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (LOG2E, NEG_INF, check_int, compiler_params, next_pow2,
                                    pad_axis, resolve, round_up)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 8; >= 16 for compiled GPU kernels).

    block_q / block_k: forward tiles. block_q_dq / block_k_dq: dQ kernel tiles.
    block_q_dkv / block_k_dkv: dK/dV kernel tiles. num_warps / num_stages: Triton only
    (forward; the backward kernels use num_warps_bwd / num_stages_bwd, default the same).
    """
    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv",
                  "block_k_dkv"):
            check_int(f"BlockSizes.{f}", getattr(self, f), minimum=8, pow2=True)
        for f in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd"):
            if getattr(self, f) is not None:
                check_int(f"BlockSizes.{f}", getattr(self, f), minimum=1)

    @classmethod
    def default(cls, backend: str | None = None) -> "BlockSizes":
        """Defaults per backend: "gpu" (Triton, tuned for Hopper, D <= 128), "tpu", "cpu"."""
        backend = backend or jax.default_backend()
        if backend in ("gpu", "cuda", "rocm"):
            # Measured on an H200 (B=4, T=S=2048, H=16/4, D=128 bf16 causal): 64x64 tiles,
            # 4 warps, 3 stages fwd / 2 stages bwd were the fastest of the configs tried.
            return cls(block_q=64, block_k=64, block_q_dq=64, block_k_dq=64,
                       block_q_dkv=64, block_k_dkv=64, num_warps=4, num_stages=3,
                       num_warps_bwd=4, num_stages_bwd=2)
        if backend == "tpu":
            return cls(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128,
                       block_q_dkv=128, block_k_dkv=128)
        if backend in ("cpu", "interpret"):
            # Interpret mode: few, larger blocks keep the interpreter's per-step overhead low.
            return cls(block_q=64, block_k=64, block_q_dq=64, block_k_dq=64,
                       block_q_dkv=64, block_k_dkv=64)
        raise ValueError(f"BlockSizes.default: unknown backend {backend!r}")


# ============================================================================================
# Reference
# ============================================================================================
def _visible_mask(t, s, causal, segment_ids):
    """[B or 1, T, S] bool: which keys each query may attend to (see module docstring)."""
    mask = jnp.ones((1, t, s), bool)
    if causal:
        qi = jnp.arange(t)[:, None]
        kj = jnp.arange(s)[None, :]
        mask = mask & (kj <= qi + (s - t))[None]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids, jnp.int32)
        mask = mask & ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))
    return mask


def attention_reference(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
    """Straightforward softmax attention in jnp (float32 math), same contract as the kernel."""
    _check_attention_args(q, k, v, causal, segment_ids, sm_scale)
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    g = h // hkv
    qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * sm_scale
    mask = _visible_mask(t, s, causal, segment_ids)[:, None, None]  # [B|1,1,1,T,S]
    logits = jnp.where(mask, logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(mask, jnp.exp(logits - mx), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def _check_attention_args(q, k, v, causal, segment_ids, sm_scale):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D]; got shape {q.shape}")
    if k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B, S, Hkv, D]; got k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k / v batch and head_dim must match q {q.shape}; got {k.shape}")
    if h % k.shape[2]:
        raise ValueError(f"number of query heads H={h} must be a multiple of kv heads "
                         f"Hkv={k.shape[2]}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool; got {causal!r}")
    if segment_ids is not None:
        if tuple(jnp.shape(segment_ids)) != (b, t):
            raise ValueError(f"segment_ids must be [B, T] = {(b, t)}; got "
                             f"{jnp.shape(segment_ids)}")
        if t != k.shape[1]:
            raise ValueError(f"segment_ids need self-attention (T == S); got T={t}, "
                             f"S={k.shape[1]}")
    if sm_scale is not None and not isinstance(sm_scale, (int, float, np.floating)):
        raise ValueError(f"sm_scale must be a Python float or None; got {sm_scale!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point; got dtype {x.dtype}")


# ============================================================================================
# Kernel helpers (written for both Triton and Mosaic: 2-D values, column vectors [bq, 1])
# ============================================================================================
def _dot_nt(a, b):
    """a [m, d] @ b[n, d]^T -> [m, n] in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a[m, n]^T @ b[m, d] -> [n, d] in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need to know at trace time."""
    t: int            # true query length
    s: int            # true key length
    tp: int           # padded query length
    sp: int           # padded key length
    groups: int       # H // Hkv
    causal: bool
    has_segments: bool
    scale2: float     # sm_scale * log2(e)
    sm_scale: float
    layout: str       # "bthd" (GPU / interpret) or "bhtd" (TPU)

    @property
    def offset(self) -> int:  # causal alignment to the end: key j visible iff j <= i + offset
        return self.s - self.t

    @property
    def key_pad(self) -> bool:
        return self.sp != self.s


def _mask(st: _Static, q_start, k_start, bq, bk, q_seg=None, k_seg=None, positional=True):
    """[bq, bk] visibility mask of a (query block, key block) tile, or None if all visible.

    positional=False: the caller knows the tile is inside the causal / key-padding bounds
    (an interior tile), so only the segment mask (if any) is applied.
    """
    mask = None
    if positional and (st.causal or st.key_pad):
        kj = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        if st.key_pad:
            mask = kj < st.s
        if st.causal:
            qi = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            c = kj <= qi + st.offset
            mask = c if mask is None else mask & c
    if st.has_segments:
        seg = (q_seg == k_seg) & (k_seg != 0)  # [bq, 1] vs [1, bk]
        mask = seg if mask is None else mask & seg
    return mask


def _kv_block_range(st: _Static, q_start, bq, bk, nk):
    """Key blocks for the query block [q_start, q_start + bq): (lo, mid, hi).

    Blocks in [lo, mid) are fully visible (no positional mask needed); blocks in [mid, hi) are
    on the causal diagonal or hold padded keys and need the mask; blocks >= hi are skipped
    (entirely above the causal diagonal).
    """
    full = nk - 1 if st.key_pad else nk          # the last block holds padded keys
    if not st.causal:
        return 0, full, nk
    # last visible key of the block's last query: q_start + bq - 1 + offset
    hi = jnp.minimum(lax.div(jnp.maximum(q_start + bq + st.offset, 0) + bk - 1, bk), nk)
    # key block j is fully visible to the block's first query iff (j+1) bk - 1 <= q_start + off
    mid = jnp.minimum(lax.div(jnp.maximum(q_start + st.offset + 1, 0), bk), full)
    return 0, jnp.minimum(mid, hi), hi


def _q_block_range(st: _Static, k_start, bq, bk, nq):
    """Query blocks for the key block [k_start, k_start + bk): (lo, mid, nq).

    Blocks < lo are skipped (they see none of these keys), [lo, mid) need the mask (causal
    diagonal; or every block if this key block holds padded keys), [mid, nq) are interior.
    """
    if st.causal:
        # first query i with i + offset >= k_start
        lo = jnp.minimum(lax.div(jnp.maximum(k_start - st.offset, 0), bq), nq)
        # first query block whose first query sees the whole key block
        mid = lax.div(jnp.maximum(k_start + bk - 1 - st.offset, 0) + bq - 1, bq)
        mid = jnp.clip(mid, lo, nq)
    else:
        lo, mid = 0, 0
    if st.key_pad:  # (arithmetic select: Triton rejects a scalar where() of two constants)
        pad = (k_start + bk > st.s).astype(jnp.int32)
        mid = mid * (1 - pad) + nq * pad
    return lo, mid, nq


# ============================================================================================
# Forward kernel: grid (B, H, T / bq)
# ============================================================================================
def _fwd_kernel(*refs, st: _Static, bq: int, bk: int):
    if st.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kseg_ref = None
    qb = pl.program_id(2)
    q_start = qb * bq
    q = q_ref[...]                                     # [bq, D]
    d = q.shape[-1]
    q_seg = qseg_ref[...] if st.has_segments else None  # [bq, 1]
    nk = st.sp // bk

    def body(j, carry, positional):
        o, m, l = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * st.scale2                  # [bq, bk], base-2 logits
        k_seg = kseg_ref[:, pl.ds(k_start, bk)] if st.has_segments else None
        mask = _mask(st, q_start, k_start, bq, bk, q_seg, k_seg, positional)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp2(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        o = alpha * o + _dot_nn(p.astype(v.dtype), v)
        return o, m_new, l

    lo, mid, hi = _kv_block_range(st, q_start, bq, bk, nk)
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq, 1), NEG_INF, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    carry = lax.fori_loop(lo, mid, functools.partial(body, positional=False), init)
    o, m, l = lax.fori_loop(mid, hi, functools.partial(body, positional=True), carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (o / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log2(l_safe))


# ============================================================================================
# dQ kernel: grid (B, H, T / bq)
# ============================================================================================
def _dq_kernel(*refs, st: _Static, bq: int, bk: int):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kseg_ref = None
    qb = pl.program_id(2)
    q_start = qb * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]       # [bq, 1]
    delta = delta_ref[...]   # [bq, 1]
    q_seg = qseg_ref[...] if st.has_segments else None
    nk = st.sp // bk

    def body(j, dq, positional):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * st.scale2
        p = jnp.exp2(s - lse)
        k_seg = kseg_ref[:, pl.ds(k_start, bk)] if st.has_segments else None
        mask = _mask(st, q_start, k_start, bq, bk, q_seg, k_seg, positional)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta)
        return dq + _dot_nn(ds.astype(k.dtype), k)

    lo, mid, hi = _kv_block_range(st, q_start, bq, bk, nk)
    dq = lax.fori_loop(lo, mid, functools.partial(body, positional=False),
                       jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(mid, hi, functools.partial(body, positional=True), dq)
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


# ============================================================================================
# dK / dV kernel: grid (B, Hkv, S / bk); loops over the group's query heads and query blocks
# ============================================================================================
def _dkv_kernel(*refs, st: _Static, bq: int, bk: int):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        qseg_ref = kseg_ref = None
    kb = pl.program_id(2)
    k_start = kb * bk
    k = k_ref[...]             # [bk, D]
    v = v_ref[...]
    k_seg = kseg_ref[...] if st.has_segments else None  # [1, bk]
    nq = st.tp // bq
    q_lo, q_mid, _ = _q_block_range(st, k_start, bq, bk, nq)

    if st.layout == "bthd":     # q_ref [Tp, G, D], lse_ref [G, Tp, 1]
        def load_q(ref, hh, start):
            return ref[pl.ds(start, bq), hh, :]
    else:                       # q_ref [G, Tp, D]
        def load_q(ref, hh, start):
            return ref[hh, pl.ds(start, bq), :]

    def head_body(hh, carry):
        def q_body(i, carry, positional):
            dk, dv = carry
            q_start = pl.multiple_of(i * bq, bq)
            q = load_q(q_ref, hh, q_start)
            do = load_q(do_ref, hh, q_start)
            lse = lse_ref[hh, pl.ds(q_start, bq), :]
            delta = delta_ref[hh, pl.ds(q_start, bq), :]
            s = _dot_nt(q, k) * st.scale2
            p = jnp.exp2(s - lse)
            q_seg = qseg_ref[pl.ds(q_start, bq), :] if st.has_segments else None
            mask = _mask(st, q_start, k_start, bq, bk, q_seg, k_seg, positional)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            dp = _dot_nt(do, v)
            ds = p * (dp - delta)
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        carry = lax.fori_loop(q_lo, q_mid, functools.partial(q_body, positional=True), carry)
        return lax.fori_loop(q_mid, nq, functools.partial(q_body, positional=False), carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if st.groups == 1:
        dk, dv = head_body(0, init)
    else:
        dk, dv = lax.fori_loop(0, st.groups, head_body, init)
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ============================================================================================
# pallas_call wrappers (arrays already padded; layout per _Static.layout)
# ============================================================================================
def _specs(st: _Static, d: int):
    """BlockSpec factories for the two layouts. Grid axes: (b, head, block)."""
    g = st.groups
    if st.layout == "bthd":
        def q_blk(bq):       # per query head, one q block
            return pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))

        def kv_full():       # kv head h // g, whole sequence
            return pl.BlockSpec((None, st.sp, None, d),
                                lambda b, h, i: (b, 0, lax.div(h, g), 0))

        def kv_blk(bk):      # grid over kv heads, one k block
            return pl.BlockSpec((None, bk, None, d), lambda b, hk, j: (b, j, hk, 0))

        def q_group():       # the kv head's g query heads, whole sequence
            return pl.BlockSpec((None, st.tp, g, d), lambda b, hk, j: (b, 0, hk, 0))
    else:
        def q_blk(bq):
            return pl.BlockSpec((None, None, bq, d), lambda b, h, i: (b, h, i, 0))

        def kv_full():
            return pl.BlockSpec((None, None, st.sp, d),
                                lambda b, h, i: (b, lax.div(h, g), 0, 0))

        def kv_blk(bk):
            return pl.BlockSpec((None, None, bk, d), lambda b, hk, j: (b, hk, j, 0))

        def q_group():
            return pl.BlockSpec((None, g, st.tp, d), lambda b, hk, j: (b, hk, 0, 0))
    return q_blk, kv_full, kv_blk, q_group


def _row_blk(bq):      # lse / delta [B, H, Tp, 1], per query head and block
    return pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))


def _seg_specs_q(st, bq):   # q segments [B, Tp, 1] block, kv segments [B, 1, Sp] whole
    return [pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, st.sp), lambda b, h, i: (b, 0, 0))]


def _fwd_call(q, k, v, seg_q, seg_k, *, st, bs: BlockSizes, interpret, backend):
    b = q.shape[0]
    h = q.shape[2] if st.layout == "bthd" else q.shape[1]
    d = q.shape[-1]
    bq, bk = bs.block_q, bs.block_k
    q_blk, kv_full, _, _ = _specs(st, d)
    in_specs = [q_blk(bq), kv_full(), kv_full()]
    args = [q, k, v]
    if st.has_segments:
        in_specs += _seg_specs_q(st, bq)
        args += [seg_q, seg_k]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk),
        grid=(b, h, st.tp // bq),
        in_specs=in_specs,
        out_specs=[q_blk(bq), _row_blk(bq)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, st.tp, 1), jnp.float32)],
        compiler_params=compiler_params(
            backend, interpret, num_warps=bs.num_warps, num_stages=bs.num_stages,
            dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
    return o, lse


def _bwd_call(q, k, v, o, lse, do, seg_q, seg_k, *, st, bs: BlockSizes, interpret, backend):
    b = q.shape[0]
    h = q.shape[2] if st.layout == "bthd" else q.shape[1]
    hkv = k.shape[2] if st.layout == "bthd" else k.shape[1]
    d = q.shape[-1]
    # Δ_i = dO_i · out_i, [B, H, Tp, 1] (memory-bound; XLA fuses it)
    prod = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = (prod.transpose(0, 2, 1) if st.layout == "bthd" else prod)[..., None]
    q_blk, kv_full, kv_blk, q_group = _specs(st, d)
    cp = compiler_params(backend, interpret,
                         num_warps=bs.num_warps_bwd or bs.num_warps,
                         num_stages=bs.num_stages_bwd or bs.num_stages,
                         dimension_semantics=("parallel", "parallel", "parallel"))

    # dQ
    bq, bk = bs.block_q_dq, bs.block_k_dq
    in_specs = [q_blk(bq), kv_full(), kv_full(), q_blk(bq), _row_blk(bq), _row_blk(bq)]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += _seg_specs_q(st, bq)
        args += [seg_q, seg_k]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, bq=bq, bk=bk),
        grid=(b, h, st.tp // bq),
        in_specs=in_specs,
        out_specs=q_blk(bq),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cp,
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)

    # dK, dV
    bq, bk = bs.block_q_dkv, bs.block_k_dkv
    g = st.groups
    rows_group = pl.BlockSpec((None, g, st.tp, 1), lambda b_, hk, j: (b_, hk, 0, 0))
    in_specs = [q_group(), kv_blk(bk), kv_blk(bk), q_group(), rows_group, rows_group]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, st.tp, 1), lambda b_, hk, j: (b_, 0, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b_, hk, j: (b_, 0, j))]
        args += [seg_q, seg_k]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, bq=bq, bk=bk),
        grid=(b, hkv, st.sp // bk),
        in_specs=in_specs,
        out_specs=[kv_blk(bk), kv_blk(bk)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cp,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash_core(q, k, v, seg_q, seg_k, st, bs, interpret, backend):
    o, _ = _fwd_call(q, k, v, seg_q, seg_k, st=st, bs=bs, interpret=interpret,
                     backend=backend)
    return o


def _flash_core_fwd(q, k, v, seg_q, seg_k, st, bs, interpret, backend):
    o, lse = _fwd_call(q, k, v, seg_q, seg_k, st=st, bs=bs, interpret=interpret,
                       backend=backend)
    return o, (q, k, v, seg_q, seg_k, o, lse)


def _flash_core_bwd(st, bs, interpret, backend, res, do):
    q, k, v, seg_q, seg_k, o, lse = res
    dq, dk, dv = _bwd_call(q, k, v, o, lse, do, seg_q, seg_k, st=st, bs=bs,
                           interpret=interpret, backend=backend)
    zero = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return dq, dk, dv, zero(seg_q), zero(seg_k)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def _fit_blocks(bs: BlockSizes, t: int, s: int, min_block: int) -> BlockSizes:
    """Shrink blocks to the (power-of-two rounded) sequence lengths, keep >= min_block."""
    tq = max(min_block, next_pow2(t))
    tk = max(min_block, next_pow2(s))
    return dataclasses.replace(
        bs,
        block_q=max(min_block, min(bs.block_q, tq)),
        block_k=max(min_block, min(bs.block_k, tk)),
        block_q_dq=max(min_block, min(bs.block_q_dq, tq)),
        block_k_dq=max(min_block, min(bs.block_k_dq, tk)),
        block_q_dkv=max(min_block, min(bs.block_q_dkv, tq)),
        block_k_dkv=max(min_block, min(bs.block_k_dkv, tk)),
    )


def flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, interpret=None,
                    block_sizes: BlockSizes | None = None, backend: str | None = None):
    """Memory-efficient attention: softmax(sm_scale q k^T + mask) v, never materialising T x S.

    q [B, T, H, D], k / v [B, S, Hkv, D] with H % Hkv == 0 (GQA), segment_ids int32 [B, T]
    (self-attention only; id 0 = padding, attends to and is attended by nothing). Causal with
    T != S is aligned to the end: query i attends keys j <= i + S - T. Rows with no visible key
    give 0 (and zero gradients). Output [B, T, H, D] in q's dtype; float32 accumulation.
    Any T, S: inputs are padded to the block sizes and the output sliced back.
    ``interpret=None``: interpret mode on CPU, compiled on GPU / TPU. ``backend`` ("gpu",
    "tpu", "cpu"; default jax.default_backend()) picks the layout and compiler parameters.
    """
    _check_attention_args(q, k, v, causal, segment_ids, sm_scale)
    interpret, backend = resolve(interpret, backend)
    if block_sizes is None:
        block_sizes = BlockSizes.default(backend)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None; got {block_sizes!r}")
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)

    gpu = backend == "gpu" and not interpret
    tpu = backend == "tpu" and not interpret
    min_block = 16 if gpu else (128 if tpu else 8)
    bs = _fit_blocks(block_sizes, t, s, min_block)
    mult_q = max(bs.block_q, bs.block_q_dq, bs.block_q_dkv)
    mult_k = max(bs.block_k, bs.block_k_dq, bs.block_k_dkv)
    if segment_ids is not None:   # self-attention: one padded length for both
        mult_q = mult_k = max(mult_q, mult_k)
    tp, sp = round_up(t, mult_q), round_up(s, mult_k)
    # Triton dots need power-of-two tiles >= 16 on every axis, so pad the head dim on GPU.
    dp = max(16, next_pow2(d)) if gpu else (round_up(d, 128) if tpu else d)
    layout = "bhtd" if backend == "tpu" else "bthd"   # also in interpret mode (testable)
    st = _Static(t=t, s=s, tp=tp, sp=sp, groups=h // hkv, causal=causal,
                 has_segments=segment_ids is not None, scale2=sm_scale * LOG2E,
                 sm_scale=sm_scale, layout=layout)

    qp = pad_axis(pad_axis(q, 1, tp), 3, dp)
    kp = pad_axis(pad_axis(k, 1, sp), 3, dp)
    vp = pad_axis(pad_axis(v, 1, sp), 3, dp)
    if layout == "bhtd":
        qp, kp, vp = (x.transpose(0, 2, 1, 3) for x in (qp, kp, vp))
    seg_q = seg_k = None
    if segment_ids is not None:
        seg = pad_axis(jnp.asarray(segment_ids, jnp.int32), 1, tp)   # padding gets id 0
        seg_q, seg_k = seg[:, :, None], seg[:, None, :]
    o = _flash_core(qp, kp, vp, seg_q, seg_k, st, bs, interpret, backend)
    if layout == "bhtd":
        o = o.transpose(0, 2, 1, 3)
    return o[:, :t, :, :d]
