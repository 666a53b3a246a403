"""Off-policy correction between the sampler's behaviour log-probs and the trainer's.

The rollout records μ(o_t), the log-prob of each sampled token under the *sampler* (its dtype,
its KV-cached kernels; in continuous mode, the parameter version that sampled the token). The
trainer's own log-prob of the same token at the update's starting parameters is π_old(o_t).
When the two differ (bfloat16 sampling, stale tokens of carried episodes) the PPO-style ratio
π_θ/μ mixes the mismatch into the trust region. ``config.rl.correction`` chooses what is done:

* ``"none"``: the policy loss's ratio is π_θ/μ (no recomputation; the default).
* ``"tis"`` — truncated importance sampling (token level): the ratio is π_θ/π_old and each
  token's policy-gradient term is weighted by w_t = min(π_old(o_t)/μ(o_t), C), no gradient
  through w (``rl.correction_cap`` = C).
* ``"mis"`` — masked importance sampling (sequence level, geometric mean): the ratio is
  π_θ/π_old and a whole row is dropped from the loss when its geometric-mean ratio
  exp(mean_t log(π_old/μ)) is outside [1/C, C].
* ``"token_mis"``: as ``"mis"`` per token: drop the tokens whose π_old/μ is outside [1/C, C].

Weights multiply the advantages: every registered policy loss is positively homogeneous in the
advantage (PPO-clip: w·max(−Aρ, −A·clip(ρ)) = max(−wAρ, −wA·clip(ρ)) for w ≥ 0; CISPO and GSPO
likewise), so this is the token's loss times w. Masks remove tokens from every term of the loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CORRECTIONS = ("none", "tis", "mis", "token_mis")


def check_correction(kind: str, cap: float) -> None:
    if kind not in CORRECTIONS:
        raise ValueError(f"config.rl.correction={kind!r} is not one of {list(CORRECTIONS)}")
    if not float(cap) > 1.0:
        raise ValueError(f"config.rl.correction_cap={cap!r} must be > 1")


def mismatch_kl(trainer_logp: jax.Array, behaviour_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """k3 estimate of KL(μ ‖ π_old) on the sampled tokens: the mean over ``mask`` of
    ρ − 1 − log ρ, ρ = π_old(o_t)/μ(o_t) (unbiased for tokens drawn from μ, ≥ 0 per token)."""
    log_ratio = jnp.where(mask, trainer_logp - behaviour_logp, 0.0)
    per_tok = jnp.exp(log_ratio) - 1.0 - log_ratio
    return jnp.where(mask, per_tok, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def correct(trainer_logp: jax.Array, behaviour_logp: jax.Array, advantages: jax.Array,
            mask: jax.Array, *, kind: str, cap: float = 2.0):
    """Apply correction ``kind`` (module doc) → ``(advantages, mask, metrics)``.

    ``trainer_logp`` = log π_old, ``behaviour_logp`` = log μ, all ``[B, T]``; ``mask`` the agent
    tokens in the loss. Metrics: ``mismatch/kl`` (``mismatch_kl``), ``mismatch/weight_mean``
    (mean w_t, TIS), ``mismatch/clipped_frac`` (tokens whose weight was capped, TIS),
    ``mismatch/masked_frac`` (tokens removed, MIS).
    """
    check_correction(kind, cap)
    m = jnp.asarray(mask, bool)
    trainer_logp = jax.lax.stop_gradient(trainer_logp)
    log_ratio = jnp.where(m, trainer_logp - behaviour_logp, 0.0)
    n_tok = jnp.maximum(m.sum(), 1)
    tok_mean = lambda x: jnp.where(m, x, 0.0).sum() / n_tok
    metrics = {"mismatch/kl": mismatch_kl(trainer_logp, behaviour_logp, m)}
    log_cap = jnp.log(jnp.float32(cap))
    if kind == "tis":
        w = jnp.exp(jnp.minimum(log_ratio, log_cap))
        metrics["mismatch/weight_mean"] = tok_mean(w)
        metrics["mismatch/clipped_frac"] = tok_mean(log_ratio > log_cap)
        return jnp.where(m, advantages * w, 0.0), m, metrics
    if kind == "mis":
        n = m.sum(-1)
        seq_log_ratio = log_ratio.sum(-1) / jnp.maximum(n, 1)
        keep_row = jnp.abs(seq_log_ratio) <= log_cap
        keep = m & keep_row[:, None]
    elif kind == "token_mis":
        keep = m & (jnp.abs(log_ratio) <= log_cap)
    else:
        return advantages, m, metrics
    metrics["mismatch/masked_frac"] = tok_mean(~keep)
    return jnp.where(keep, advantages, 0.0), keep, metrics
