"""Advantage / return scans as Pallas kernels: a reverse scan over time inside the kernel,
the batch tiled across program ids. Each has a ``lax.scan`` reference beside it.

GAE (rlax ``truncated_generalized_advantage_estimation`` semantics), for t = T-1 .. 0:

    δ_t = r_t + γ_t v_{t+1} − v_t,      A_t = δ_t + γ_t λ_t A_{t+1},      A_T = 0,

with v_T the bootstrap value; termination is γ_t = 0 (cuts both the bootstrap and the trace).

Discounted returns:  G_t = r_t + γ_t G_{t+1},  G_T = bootstrap.

Masked (multi-turn, token-level) GAE over agent tokens only. For an agent token t (mask_t) let
n(t) be the next agent token after t, if any:

    δ_t = r_t + γ V_{n(t)} − V_t,   A_t = δ_t + γ λ A_{n(t)},   V_{n(t)} = A_{n(t)} = 0 if none,

i.e. observation / prompt / padding positions are skipped (the carry passes through them) and
the episode ends terminally after its last agent token. A_t = 0 off the mask.

Kernel layout: the wrapper transposes to time-major [T, B] so that one time step of a batch
tile is one contiguous row; grid = (B / block_b,), each program scans its tile backwards.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import check_int, compiler_params, pad_axis, resolve, round_up


# ============================================================================================
# References (lax.scan over time, batch-major in and out)
# ============================================================================================
def gae_reference(rewards, values, discounts, lam):
    """GAE with ``lax.scan`` (see module docstring). lam: float or [B, T]."""
    r, v, g, lam_bt = _check_gae(rewards, values, discounts, lam)

    def step(a_next, xs):
        r_t, g_t, v_t, v_tp1, l_t = xs
        a = r_t + g_t * v_tp1 - v_t + g_t * l_t * a_next
        return a, a

    xs = (r.T, g.T, v[:, :-1].T, v[:, 1:].T, lam_bt.T)
    _, adv = lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), xs, reverse=True)
    return adv.T.astype(_out_dtype(rewards, values, discounts))


def discounted_returns_reference(rewards, discounts, bootstrap):
    """G_t = r_t + γ_t G_{t+1}, G_T = bootstrap, with ``lax.scan``."""
    r, g, boot = _check_returns(rewards, discounts, bootstrap)

    def step(g_next, xs):
        r_t, d_t = xs
        out = r_t + d_t * g_next
        return out, out

    _, ret = lax.scan(step, boot, (r.T, g.T), reverse=True)
    return ret.T.astype(_out_dtype(rewards, discounts))


def masked_gae_reference(rewards, values, mask, gamma, lam):
    """Masked GAE with ``lax.scan`` carrying the next agent token's (V, A) across skipped ones."""
    r, v, m, gam, lmb = _check_masked(rewards, values, mask, gamma, lam)

    def step(carry, xs):
        a_next, v_next = carry
        r_t, v_t, m_t = xs
        a = r_t + gam * v_next - v_t + gam * lmb * a_next
        carry = (jnp.where(m_t, a, a_next), jnp.where(m_t, v_t, v_next))
        return carry, jnp.where(m_t, a, 0.0)

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv = lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    return adv.T.astype(_out_dtype(rewards, values))


# ============================================================================================
# Argument checks
# ============================================================================================
def _out_dtype(*xs):
    dt = jnp.result_type(*[jnp.asarray(x).dtype for x in xs])
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32


def _bt(name, x, b=None, t=None):
    x = jnp.asarray(x)
    if x.ndim != 2 or (b is not None and x.shape != (b, t)):
        want = "[B, T]" if b is None else f"[B, T] = {(b, t)}"
        raise ValueError(f"{name} must be {want}; got shape {x.shape}")
    return x.astype(jnp.float32)


def _check_gae(rewards, values, discounts, lam):
    r = _bt("rewards", rewards)
    b, t = r.shape
    g = _bt("discounts", discounts, b, t)
    v = jnp.asarray(values)
    if v.shape != (b, t + 1):
        raise ValueError(f"values must be [B, T+1] = {(b, t + 1)} (last column = bootstrap); "
                         f"got shape {v.shape}")
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim == 0:
        lam_bt = jnp.broadcast_to(lam, (b, t))
    elif lam.shape == (b, t):
        lam_bt = lam
    else:
        raise ValueError(f"lam must be a scalar or [B, T] = {(b, t)}; got shape {lam.shape}")
    return r, v.astype(jnp.float32), g, lam_bt


def _check_returns(rewards, discounts, bootstrap):
    r = _bt("rewards", rewards)
    b, t = r.shape
    g = _bt("discounts", discounts, b, t)
    boot = jnp.asarray(bootstrap)
    if boot.shape != (b,):
        raise ValueError(f"bootstrap must be [B] = ({b},); got shape {boot.shape}")
    return r, g, boot.astype(jnp.float32)


def _check_masked(rewards, values, mask, gamma, lam):
    r = _bt("rewards", rewards)
    b, t = r.shape
    v = _bt("values", values, b, t)
    m = jnp.asarray(mask)
    if m.shape != (b, t):
        raise ValueError(f"mask must be [B, T] = {(b, t)}; got shape {m.shape}")
    for name, x in (("gamma", gamma), ("lam", lam)):
        if jnp.ndim(x) != 0:
            raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(x)}")
    return r, v, m.astype(bool), jnp.asarray(gamma, jnp.float32), jnp.asarray(lam, jnp.float32)


# ============================================================================================
# Kernels: refs are time-major tiles [T(+1), bb]; carries are [1, bb] rows
# ============================================================================================
def _row(ref, t):
    return ref[pl.ds(t, 1), :]


def _gae_kernel(r_ref, g_ref, v_ref, lam_ref, adv_ref, *, t_len, lam_per_step):
    lam_row = None if lam_per_step else lam_ref[...]          # [1, bb]

    def body(i, carry):
        a_next, v_next = carry
        t = t_len - 1 - i
        r = _row(r_ref, t)
        g = _row(g_ref, t)
        v = _row(v_ref, t)
        lam = _row(lam_ref, t) if lam_per_step else lam_row
        a = r + g * v_next - v + g * lam * a_next
        adv_ref[pl.ds(t, 1), :] = a
        return a, v

    boot = _row(v_ref, t_len)
    lax.fori_loop(0, t_len, body, (jnp.zeros_like(boot), boot))


def _returns_kernel(r_ref, g_ref, boot_ref, out_ref, *, t_len):
    def body(i, g_next):
        t = t_len - 1 - i
        out = _row(r_ref, t) + _row(g_ref, t) * g_next
        out_ref[pl.ds(t, 1), :] = out
        return out

    lax.fori_loop(0, t_len, body, boot_ref[...])


def _masked_gae_kernel(r_ref, v_ref, m_ref, gam_ref, lam_ref, adv_ref, *, t_len):
    gam = gam_ref[...]
    gl = gam * lam_ref[...]

    def body(i, carry):
        a_next, v_next = carry
        t = t_len - 1 - i
        v = _row(v_ref, t)
        m = _row(m_ref, t) > 0.5
        a = _row(r_ref, t) + gam * v_next - v + gl * a_next
        adv_ref[pl.ds(t, 1), :] = jnp.where(m, a, 0.0)
        return jnp.where(m, a, a_next), jnp.where(m, v, v_next)

    z = jnp.zeros_like(gam)
    lax.fori_loop(0, t_len, body, (z, z))


def _default_block_b(backend: str, interpret: bool) -> int:
    if interpret:
        return 128
    return 128 if backend == "tpu" else 16


def _scan_call(kernel, arrays, *, t_len, block_b, interpret, backend, name):
    """arrays: time-major float32 [rows, B] (rows = T, T+1 or 1). Returns [T, B]."""
    b = arrays[0].shape[1]
    interpret, backend = resolve(interpret, backend)
    if block_b is None:
        block_b = _default_block_b(backend, interpret)
    check_int("block_b", block_b, minimum=1, pow2=True)
    if backend == "tpu" and not interpret:
        block_b = max(128, block_b)
    bb = min(block_b, max(8, 1 << max(0, b - 1).bit_length()))
    bp = round_up(b, bb)
    arrays = [pad_axis(x, 1, bp) for x in arrays]
    specs = [pl.BlockSpec((x.shape[0], bb), lambda i: (0, i)) for x in arrays]
    out = pl.pallas_call(
        kernel,
        grid=(bp // bb,),
        in_specs=specs,
        out_specs=pl.BlockSpec((t_len, bb), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((t_len, bp), jnp.float32),
        compiler_params=compiler_params(backend, interpret, num_warps=1, num_stages=3,
                                        dimension_semantics=("parallel",)),
        interpret=interpret,
        name=name,
    )(*arrays)
    return out[:, :b]


def gae(rewards, values, discounts, lam, *, interpret=None, block_b=None, backend=None):
    """Generalized advantage estimates [B, T] (rlax semantics; see module docstring).

    rewards, discounts [B, T]; values [B, T+1] (last column = bootstrap); lam float or [B, T].
    """
    r, v, g, lam_bt = _check_gae(rewards, values, discounts, lam)
    t = r.shape[1]
    per_step = jnp.ndim(lam) != 0
    lam_arr = lam_bt.T if per_step else lam_bt[:, :1].T       # [T, B] or [1, B]
    adv = _scan_call(functools.partial(_gae_kernel, t_len=t, lam_per_step=per_step),
                     [r.T, g.T, v.T, lam_arr], t_len=t, block_b=block_b,
                     interpret=interpret, backend=backend, name="gae")
    return adv.T.astype(_out_dtype(rewards, values, discounts))


def discounted_returns(rewards, discounts, bootstrap, *, interpret=None, block_b=None,
                       backend=None):
    """Discounted returns [B, T]: G_t = r_t + γ_t G_{t+1}, G_T = bootstrap [B]."""
    r, g, boot = _check_returns(rewards, discounts, bootstrap)
    t = r.shape[1]
    ret = _scan_call(functools.partial(_returns_kernel, t_len=t), [r.T, g.T, boot[None, :]],
                     t_len=t, block_b=block_b, interpret=interpret, backend=backend,
                     name="discounted_returns")
    return ret.T.astype(_out_dtype(rewards, discounts))


def masked_gae(rewards, values, mask, gamma, lam, *, interpret=None, block_b=None,
               backend=None):
    """Token-level GAE over agent tokens (mask) skipping observation tokens; 0 off the mask.

    rewards, values [B, T] float, mask [B, T] bool, gamma / lam scalars (see module docstring).
    """
    r, v, m, gam, lmb = _check_masked(rewards, values, mask, gamma, lam)
    b, t = r.shape
    row = lambda x: jnp.broadcast_to(x, (1, b))  # noqa: E731
    adv = _scan_call(functools.partial(_masked_gae_kernel, t_len=t),
                     [r.T, v.T, m.T.astype(jnp.float32), row(gam), row(lmb)], t_len=t,
                     block_b=block_b, interpret=interpret, backend=backend, name="masked_gae")
    return adv.T.astype(_out_dtype(rewards, values))
