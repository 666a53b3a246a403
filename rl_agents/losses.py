"""Policy, value, KL and entropy losses, loss aggregation and token log-probabilities.

All functions are pure and jittable. Per-token quantities are ``[B, T]``; ``mask`` marks the
tokens that enter a loss (the agent's generated tokens). Registries keyed by config strings:
``POLICY_LOSSES``, ``AGGREGATIONS``, ``KL_ESTIMATORS``.

Log-prob convention: ``logits[:, t]`` predicts ``tokens[:, t+1]``; ``sequence_logprobs`` returns
entry t = log p(tokens[t] | tokens[<t]) with entry 0 = 0, so it lines up with ``tokens`` and the
rollout's ``behaviour_logp``.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable

import jax
import jax.numpy as jnp


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# ============================================================================================
# Aggregation
# ============================================================================================
def _token_mean(x, m, max_len):
    """Σ over all masked tokens / number of masked tokens in the batch (DAPO's token-level)."""
    return jnp.where(m, x, 0.0).sum() / jnp.maximum(m.sum(), 1).astype(jnp.float32)


def _seq_mean_token_mean(x, m, max_len):
    """Mean over each sequence's masked tokens, then mean over sequences with ≥ 1 token."""
    n = m.sum(-1)
    per_seq = jnp.where(m, x, 0.0).sum(-1) / jnp.maximum(n, 1).astype(jnp.float32)
    has = n > 0
    return jnp.where(has, per_seq, 0.0).sum() / jnp.maximum(has.sum(), 1).astype(jnp.float32)


def _seq_mean_token_sum_norm(x, m, max_len):
    """Dr. GRPO: each sequence's masked-token sum / the constant ``max_len``, then mean over
    sequences with ≥ 1 token (rows masked out entirely, e.g. by dynamic sampling, don't count)."""
    per_seq = jnp.where(m, x, 0.0).sum(-1) / jnp.float32(max_len)
    has = m.sum(-1) > 0
    return jnp.where(has, per_seq, 0.0).sum() / jnp.maximum(has.sum(), 1).astype(jnp.float32)


AGGREGATIONS: dict[str, Callable] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def _check_agg(mode) -> Callable:
    if mode not in AGGREGATIONS:
        raise ValueError(f"agg={mode!r} is not one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode]


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token-mean",
              max_len: int | None = None) -> jax.Array:
    """Reduce a per-token loss ``[B,T]`` to a scalar under ``mask`` with aggregation ``mode``
    (see ``AGGREGATIONS``). ``max_len`` is the Dr. GRPO constant (default T)."""
    fn = _check_agg(mode)
    per_token = jnp.asarray(per_token, jnp.float32)
    if jnp.ndim(per_token) != 2:
        raise ValueError(f"per_token must be [B,T]; got shape {jnp.shape(per_token)}")
    if jnp.shape(mask) != jnp.shape(per_token):
        raise ValueError(f"mask shape {jnp.shape(mask)} != per_token shape {jnp.shape(per_token)}")
    if max_len is None:
        max_len = per_token.shape[1]
    if _number(max_len) and not max_len > 0:
        raise ValueError(f"max_len={max_len!r} must be > 0")
    return fn(per_token, jnp.asarray(mask, bool), max_len)


# ============================================================================================
# Policy losses
# ============================================================================================
def _check_clip_range(eps_low, eps_high) -> None:
    """A policy loss's clip range: both ε ≥ 0 (concrete numbers; traced values pass)."""
    for name, v in (("eps_low", eps_low), ("eps_high", eps_high)):
        if _number(v) and not 0.0 <= v:
            raise ValueError(f"{name}={v!r} must be ≥ 0")


def _masked_mean(x, m):
    return _token_mean(jnp.asarray(x, jnp.float32), m, None)


def ppo_policy_loss(logp, old_logp, advantages, mask, *, eps_low: float = 0.2,
                    eps_high: float = 0.2, dual_clip: float | None = None,
                    agg: str = "token-mean", max_len: int | None = None,
                    log_ratio_clip: float = 20.0):
    """PPO-clip surrogate → ``(loss, metrics)``.

    ρ = exp(clip(logπ − logπ_old, ±log_ratio_clip));
    L = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A) per token;
    dual clip (c > 1): for A < 0, L = min(L, −c·A), i.e. the objective ρA is bounded below by
    c·A. Aggregated with ``agg``. ``eps_high`` > ``eps_low`` is DAPO's clip-higher.
    Metrics (masked token means, no gradient): ``clip_frac`` (the clipped term was taken),
    ``dual_clip_frac``, ``approx_kl`` (k3 estimate of KL(π_old‖π): ρ − 1 − log ρ),
    ``ratio_mean``.
    """
    m = jnp.asarray(mask, bool)
    _check_agg(agg)
    _check_clip_range(eps_low, eps_high)
    if _number(eps_low) and eps_low >= 1.0:
        raise ValueError(f"eps_low={eps_low!r} must be < 1")
    if dual_clip is not None and _number(dual_clip) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip={dual_clip!r} must be > 1 (or None)")
    if _number(log_ratio_clip) and not log_ratio_clip > 0:
        raise ValueError(f"log_ratio_clip={log_ratio_clip!r} must be > 0")
    logp = jnp.asarray(logp, jnp.float32)
    a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    log_ratio = jnp.clip(logp - jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32)),
                         -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    pg1 = -a * ratio
    pg2 = -a * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_tok = jnp.maximum(pg1, pg2)
    dual_taken = jnp.zeros_like(m)
    if dual_clip is not None:
        pg3 = -a * dual_clip
        dual_taken = (a < 0) & (pg3 < loss_tok)
        loss_tok = jnp.where(a < 0, jnp.minimum(loss_tok, pg3), loss_tok)
    loss = aggregate(loss_tok, m, agg, max_len)
    sg_ratio = jax.lax.stop_gradient(ratio)
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    metrics = {
        "clip_frac": _masked_mean(pg2 > pg1, m),
        "dual_clip_frac": _masked_mean(dual_taken, m),
        "approx_kl": _masked_mean(sg_ratio - 1.0 - sg_log_ratio, m),
        "ratio_mean": _masked_mean(sg_ratio, m),
    }
    return loss, metrics


def pg_policy_loss(logp, old_logp, advantages, mask, *, agg: str = "token-mean",
                   max_len: int | None = None, log_ratio_clip: float = 20.0):
    """Unclipped importance-weighted policy gradient → ``(loss, metrics)``:
    L = −ρ·A per token, ρ = exp(clip(logπ − logπ_old)); its gradient at ρ = 1 is REINFORCE's
    −A ∇logπ. Same metrics as ``ppo_policy_loss`` (clip fractions are 0)."""
    m = jnp.asarray(mask, bool)
    _check_agg(agg)
    if _number(log_ratio_clip) and not log_ratio_clip > 0:
        raise ValueError(f"log_ratio_clip={log_ratio_clip!r} must be > 0")
    a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    log_ratio = jnp.clip(jnp.asarray(logp, jnp.float32)
                         - jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32)),
                         -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    loss = aggregate(-a * ratio, m, agg, max_len)
    sg_ratio = jax.lax.stop_gradient(ratio)
    zero = jnp.zeros((), jnp.float32)
    metrics = {
        "clip_frac": zero, "dual_clip_frac": zero,
        "approx_kl": _masked_mean(sg_ratio - 1.0 - jax.lax.stop_gradient(log_ratio), m),
        "ratio_mean": _masked_mean(sg_ratio, m),
    }
    return loss, metrics


def gspo_policy_loss(logp, old_logp, advantages, mask, *, eps_low: float = 3e-4,
                     eps_high: float = 4e-4, agg: str = "seq-mean-token-mean",
                     max_len: int | None = None, log_ratio_clip: float = 10.0):
    """GSPO (Zheng et al., 2025), the GSPO-token form → ``(loss, metrics)``.

    Sequence importance ratio, length-normalised: s_i = exp((1/|y_i|) Σ_t (logπ − logπ_old)),
    the mean over the row's masked tokens. Per token, s_{i,t} = sg(s_i) · π(y_t) / sg(π(y_t))
    (value s_i, gradient s_i ∇logπ(y_t)); L_t = −min(s_{i,t} A_t, clip(s_{i,t}, 1−ε_low,
    1+ε_high) A_t), aggregated with ``agg`` (the paper's seq-mean-token-mean: with an advantage
    constant over the sequence this is −min(s_i A_i, clip(s_i) A_i) per sequence, so a whole
    sequence is clipped or kept). The paper's ε = (3e-4, 4e-4). Metrics: ``clip_frac`` (tokens
    whose sequence is clipped), ``approx_kl`` (token k3 of KL(π_old‖π)), ``ratio_mean`` (the
    sequence ratios' mean over rows with tokens), ``dual_clip_frac`` = 0.
    """
    m = jnp.asarray(mask, bool)
    _check_agg(agg)
    _check_clip_range(eps_low, eps_high)
    logp = jnp.asarray(logp, jnp.float32)
    a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    delta = jnp.where(m, logp - jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32)), 0.0)
    n = m.sum(-1)
    seq_log_ratio = delta.sum(-1) / jnp.maximum(n, 1).astype(jnp.float32)          # [B]
    log_s = jnp.minimum(jax.lax.stop_gradient(seq_log_ratio)[:, None] + logp
                        - jax.lax.stop_gradient(logp), log_ratio_clip)
    s = jnp.exp(log_s)
    pg1 = -a * s
    pg2 = -a * jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high)
    loss = aggregate(jnp.maximum(pg1, pg2), m, agg, max_len)
    sg_delta = jax.lax.stop_gradient(delta)
    has = n > 0
    seq_ratio = jnp.exp(jax.lax.stop_gradient(seq_log_ratio))
    metrics = {
        "clip_frac": _masked_mean(pg2 > pg1, m),
        "dual_clip_frac": jnp.zeros((), jnp.float32),
        "approx_kl": _masked_mean(jnp.exp(sg_delta) - 1.0 - sg_delta, m),
        "ratio_mean": jnp.where(has, seq_ratio, 0.0).sum() / jnp.maximum(has.sum(), 1),
    }
    return loss, metrics


def cispo_policy_loss(logp, old_logp, advantages, mask, *, eps_low: float = 1.0,
                      eps_high: float = 0.28, agg: str = "token-mean",
                      max_len: int | None = None, log_ratio_clip: float = 20.0):
    """CISPO (MiniMax-M1, 2025) → ``(loss, metrics)``: a REINFORCE token loss weighted by the
    clipped, stop-gradient importance ratio,

        L_t = −sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)) · A_t · logπ(y_t),   ρ_t = π(y_t) / π_old(y_t),

    aggregated with ``agg`` (the paper's token-mean). Unlike PPO-clip no token's gradient is
    dropped: a clipped ratio only caps its weight. The paper sets no lower bound (ε_low = 1:
    the weight is ≥ 0) and tunes ε_high. Metrics: ``clip_frac`` (tokens whose weight is
    clipped), ``approx_kl``, ``ratio_mean``, ``dual_clip_frac`` = 0.
    """
    m = jnp.asarray(mask, bool)
    _check_agg(agg)
    _check_clip_range(eps_low, eps_high)
    logp = jnp.asarray(logp, jnp.float32)
    a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    log_ratio = jax.lax.stop_gradient(jnp.clip(
        logp - jnp.asarray(old_logp, jnp.float32), -log_ratio_clip, log_ratio_clip))
    ratio = jnp.exp(log_ratio)
    weight = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = aggregate(-weight * a * logp, m, agg, max_len)
    metrics = {
        "clip_frac": _masked_mean(weight != ratio, m),
        "dual_clip_frac": jnp.zeros((), jnp.float32),
        "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, m),
        "ratio_mean": _masked_mean(ratio, m),
    }
    return loss, metrics


#: ``config.rl.policy_loss`` -> the loss (an algorithm's default is its record's ``policy_loss``).
POLICY_LOSSES: dict[str, Callable] = {
    "ppo": ppo_policy_loss,
    "pg": pg_policy_loss,
    "gspo": gspo_policy_loss,
    "cispo": cispo_policy_loss,
}


def make_policy_loss(name: str, **settings) -> Callable:
    """The registered policy loss ``name`` with its settings bound →
    ``fn(logp, old_logp, advantages, mask, max_len=None) -> (loss, metrics)``.

    ``settings`` are the run's loss settings (``eps_low``, ``eps_high``, ``dual_clip``, ``agg``,
    ...); each loss takes the ones in its signature (``pg`` has no clip range, so it reads only
    ``agg``). A setting that no registered loss takes is an error.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"config.rl.policy_loss={name!r} is not one of {sorted(POLICY_LOSSES)}")
    known = set().union(*(inspect.signature(f).parameters for f in POLICY_LOSSES.values()))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"policy-loss setting {unknown[0]!r} is not taken by any of "
                         f"{sorted(POLICY_LOSSES)}")
    fn = POLICY_LOSSES[name]
    params = inspect.signature(fn).parameters
    bound = {k: v for k, v in settings.items() if k in params}

    def loss(logp, old_logp, advantages, mask, max_len=None):
        return fn(logp, old_logp, advantages, mask, max_len=max_len, **bound)

    loss.__name__ = f"{name}_policy_loss"
    return loss


# ============================================================================================
# KL to a frozen reference
# ============================================================================================
def _k1(logp, ref_logp):
    return logp - ref_logp


def _k2(logp, ref_logp):
    return 0.5 * (logp - ref_logp) ** 2


def _k3(logp, ref_logp):
    # exp of a clipped log-ratio so that extreme tokens cannot overflow to inf
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.exp(d) - d - 1.0


KL_ESTIMATORS: dict[str, Callable] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logp, ref_logp, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(π‖π_ref) from samples of π:
    k1 = logπ − logπ_ref; k2 = ½(logπ − logπ_ref)²;
    k3 = exp(logπ_ref − logπ) − (logπ_ref − logπ) − 1 (non-negative, low variance; the
    log-ratio is clipped to ±20 before exp)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl kind={kind!r} is not one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](jnp.asarray(logp, jnp.float32), jnp.asarray(ref_logp, jnp.float32))


def kl_loss(logp, ref_logp, mask, kind: str = "k3", agg: str = "token-mean",
            max_len: int | None = None) -> jax.Array:
    """KL-to-reference loss term: ``aggregate(kl_estimate(logp, ref_logp, kind), mask, agg)``.
    The reference log-probs get no gradient."""
    kl = kl_estimate(logp, jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32)), kind)
    return aggregate(kl, mask, agg, max_len)


def kl_in_reward(rewards, logp_behaviour, ref_logp, mask, coef, kind: str = "k1") -> jax.Array:
    """Fold a KL penalty into the token rewards: r_t − coef·kl_t on masked tokens (rewards
    unchanged elsewhere); kl_t = kl_estimate(logp_behaviour, ref_logp, kind). No gradient."""
    if _number(coef) and coef < 0:
        raise ValueError(f"coef={coef!r} must be ≥ 0")
    kl = kl_estimate(logp_behaviour, ref_logp, kind)
    out = jnp.asarray(rewards, jnp.float32) - jnp.where(jnp.asarray(mask, bool), coef * kl, 0.0)
    return jax.lax.stop_gradient(out)


# ============================================================================================
# Entropy
# ============================================================================================
def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """H = −Σ_v p_v log p_v over the last axis, in float32 via log-softmax (stable for large
    logits; −inf logits contribute 0). ``[..., V]`` → ``[...]``."""
    x = jnp.asarray(logits).astype(jnp.float32)
    logp = jax.nn.log_softmax(x, axis=-1)
    finite = jnp.isfinite(logp)
    logp_safe = jnp.where(finite, logp, 0.0)
    p = jnp.where(finite, jnp.exp(logp_safe), 0.0)
    return -(p * logp_safe).sum(-1)


def entropy_bonus(entropy, mask, agg: str = "token-mean", max_len: int | None = None) -> jax.Array:
    """Aggregated entropy (positive; the caller subtracts coef × this from the loss)."""
    return aggregate(entropy, mask, agg, max_len)


# ============================================================================================
# Value loss
# ============================================================================================
def value_loss(values, old_values, returns, mask, clip_eps: float | None = None,
               agg: str = "token-mean", max_len: int | None = None) -> jax.Array:
    """PPO value loss ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²), aggregated;
    plain ½(V − R)² when ``clip_eps`` is None."""
    if clip_eps is not None and _number(clip_eps) and not clip_eps > 0:
        raise ValueError(f"clip_eps={clip_eps!r} must be > 0 (or None)")
    v = jnp.asarray(values, jnp.float32)
    r = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))
    loss = (v - r) ** 2
    if clip_eps is not None:
        vo = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
        v_clipped = vo + jnp.clip(v - vo, -clip_eps, clip_eps)
        loss = jnp.maximum(loss, (v_clipped - r) ** 2)
    return aggregate(0.5 * loss, mask, agg, max_len)


# ============================================================================================
# Token log-probabilities
# ============================================================================================
def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets] in float32, position by position (no shift):
    ``[..., V]``, ``[...]`` → ``[...]``."""
    x = jnp.asarray(logits).astype(jnp.float32)
    if x.shape[:-1] != jnp.shape(targets):
        raise ValueError(f"logits shape {x.shape} does not match targets shape "
                         f"{jnp.shape(targets)} (expected logits = targets + (V,))")
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]
    return picked - lse


def sequence_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``[B,T,V]``, ``[B,T]`` → ``[B,T]``: entry t = log p(tokens[t] | tokens[<t]) read from
    ``logits[:, t−1]`` (logits[:, t] predicts tokens[:, t+1]); entry 0 = 0."""
    if jnp.ndim(logits) != 3 or jnp.shape(logits)[:2] != jnp.shape(tokens):
        raise ValueError(f"logits {jnp.shape(logits)} must be [B,T,V] with tokens {jnp.shape(tokens)} = [B,T]")
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp], axis=1)


def chunked_sequence_logprobs(hidden: jax.Array, unembed: jax.Array, tokens: jax.Array,
                              chunk: int = 128) -> jax.Array:
    """``sequence_logprobs(hidden @ unembed, tokens)`` without materialising ``[B,T,V]``.

    hidden ``[B,T,D]`` (final hidden states), unembed ``[D,V]``, tokens ``[B,T]`` → ``[B,T]``.
    ``lax.map`` over T-chunks of ``chunk`` positions computes each chunk's float32 logits
    (matmul with float32 accumulation), their logsumexp and the gathered target logit; the chunk
    function is ``jax.checkpoint``-ed so the backward pass recomputes each chunk's logits rather
    than storing them: peak logits memory is ``B·chunk·V`` floats both ways.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int")
    h, tg, unchunk = _next_token_chunks(hidden, unembed, tokens, chunk)
    if h is None:
        return unchunk(None)

    @jax.checkpoint
    def one_chunk(args):
        hc, tc = args
        logits = jnp.einsum("bcd,dv->bcv", hc, unembed, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - lse

    return unchunk(jax.lax.map(one_chunk, (h, tg)))              # [C,B,chunk] -> [B,T]


def _next_token_chunks(hidden, unembed, tokens, chunk: int):
    """Shared set-up of the chunked log-prob functions: check hidden ``[B,T,D]`` / unembed
    ``[D,V]`` / tokens ``[B,T]``, pair positions 0..T−2 with their next tokens, zero-pad to whole
    chunks of ``min(chunk, T−1)`` and return (hidden chunks ``[C,B,c,D]``, target chunks
    ``[C,B,c]``, ``unchunk``) where ``unchunk`` maps per-chunk ``[C,B,c]`` values back to ``[B,T]``
    aligned with ``tokens`` (entry 0 = 0). For T < 2 the chunks are ``None`` and ``unchunk``
    returns zeros ``[B,T]``."""
    if jnp.ndim(hidden) != 3 or jnp.shape(hidden)[:2] != jnp.shape(tokens):
        raise ValueError(f"hidden {jnp.shape(hidden)} must be [B,T,D] with tokens "
                         f"{jnp.shape(tokens)} = [B,T]")
    if jnp.ndim(unembed) != 2 or jnp.shape(unembed)[0] != jnp.shape(hidden)[2]:
        raise ValueError(f"unembed {jnp.shape(unembed)} must be [D={jnp.shape(hidden)[2]},V]")
    b, t, d = hidden.shape
    if t < 2:
        return None, None, lambda _: jnp.zeros((b, t), jnp.float32)
    n = t - 1
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    tg = jnp.pad(jnp.asarray(tokens, jnp.int32)[:, 1:], ((0, 0), (0, pad)))
    h = h.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)          # [C,B,chunk,D]
    tg = tg.reshape(b, n_chunks, chunk).swapaxes(0, 1)           # [C,B,chunk]

    def unchunk(x):
        x = x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :n]
        return jnp.concatenate([jnp.zeros((b, 1), jnp.float32), x], axis=1)

    return h, tg, unchunk



def _chunk_stats(hc, tc, w, temperature):
    """One chunk: logits z = hc·w / temperature (float32) → (log p[target], entropy, lse)."""
    z = jnp.einsum("bcd,dv->bcv", hc, w, preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp_all = z - lse[..., None]
    ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
    picked = jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0] - lse
    return picked, ent, lse


@jax.custom_vjp
def _chunked_core(hs, w, tg, temperature):
    """hs [C,B,c,D], w [D,V], tg int [C,B,c] → (logp, entropy) [C,B,c] per chunk."""
    lp, ent, _ = jax.lax.map(lambda a: _chunk_stats(a[0], a[1], w, temperature), (hs, tg))
    return lp, ent


def _chunked_core_fwd(hs, w, tg, temperature):
    lp, ent, lse = jax.lax.map(lambda a: _chunk_stats(a[0], a[1], w, temperature), (hs, tg))
    return (lp, ent), (hs, w, tg, temperature, ent, lse)


def _chunked_core_bwd(res, cot):
    """Per chunk, recompute z and p = softmax(z); with g_lp, g_H the cotangents of log p[y] and
    H = −Σ p log p:  ∂/∂z_v = g_lp·(1[v = y] − p_v) − g_H·p_v·(log p_v + H), divided by the
    temperature; then dh = dz·wᵀ and dw += hᵀ·dz (float32 accumulator carried over chunks).
    The temperature gets no gradient (it is a sampling constant)."""
    hs, w, tg, temperature, ent, lse = res
    g_lp, g_ent = cot
    v = w.shape[1]

    def step(dw, args):
        hc, tc, e, l, glp, gh = args
        z = jnp.einsum("bcd,dv->bcv", hc, w, preferred_element_type=jnp.float32) / temperature
        logp_all = z - l[..., None]
        p = jnp.exp(logp_all)
        onehot = jnp.arange(v, dtype=jnp.int32) == tc[..., None]
        dz = (jnp.where(onehot, glp[..., None], 0.0) - p * (glp[..., None]
              + gh[..., None] * (logp_all + e[..., None]))) / temperature
        dz = dz.astype(hc.dtype)
        dh = jnp.einsum("bcv,dv->bcd", dz, w, preferred_element_type=jnp.float32).astype(hc.dtype)
        dw = dw + jnp.einsum("bcd,bcv->dv", hc, dz, preferred_element_type=jnp.float32)
        return dw, dh

    dw, dh = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), (hs, tg, ent, lse, g_lp, g_ent))
    return dh, dw.astype(w.dtype), None, jnp.zeros_like(temperature)


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked_logprobs_and_entropy(hidden: jax.Array, unembed: jax.Array, tokens: jax.Array,
                                 temperature: float = 1.0, chunk: int = 128):
    """Tempered next-token log-probs and entropies from hidden states, never building ``[B,T,V]``.

    With logits ``z = (hidden @ unembed) / temperature`` (float32 accumulation), returns
    ``(logp, entropy)``, both float32 ``[B,T]`` and aligned with ``tokens`` like
    ``sequence_logprobs``: entry t = log softmax(z[:, t−1])[tokens[:, t]] and
    H(softmax(z[:, t−1])) = −Σ_v p_v log p_v — the distribution that produced token t;
    entry 0 = 0 for both. Equals ``sequence_logprobs(z, tokens)`` and the shifted
    ``entropy_from_logits(z)``.

    hidden ``[B,T,D]``, unembed ``[D,V]`` (``models.policy_hidden`` gives both), tokens ``[B,T]``.
    A ``lax.map`` over T-chunks of ``chunk`` positions (the last one zero-padded) computes each
    chunk's logits, log-prob, entropy and log-sum-exp; a custom VJP recomputes a chunk's logits
    in the backward pass and forms their cotangent in closed form (see ``_chunked_core_bwd``), so
    forward and backward hold O(B·chunk·V) logits plus the O(D·V) unembedding gradient, never
    O(B·T·V). Differentiable in hidden and unembed (not in temperature).
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int")
    if _number(temperature) and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    h, tg, unchunk = _next_token_chunks(hidden, unembed, tokens, chunk)
    if h is None:
        return unchunk(None), unchunk(None)
    lp, ent = _chunked_core(h, unembed.astype(hidden.dtype), tg,
                            jnp.asarray(temperature, jnp.float32))
    return unchunk(lp), unchunk(ent)
