"""Token sampling from logits: temperature, top-k, top-p (nucleus) and greedy.

The behaviour log-prob recorded for a sampled token y is ``log softmax(logits / τ)[y]``: the
tempered but *untruncated* distribution, as verl / OpenRLHF record it, so that the trainer can
recompute it exactly from a forward pass (top-k / top-p only decide which tokens are drawn).

``sample_tokens`` draws ``argmax(logits / τ + Gumbel noise)`` with one key for the whole
``[B, V]`` batch: the noise of row b is the same however the rows are sharded (threefry bits
are a function of the key and the global index, with ``jax_threefry_partitionable`` on or off).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingConfig:
    temperature: float = struct.field(pytree_node=False, default=1.0)
    top_k: int = struct.field(pytree_node=False, default=0)      # 0: off
    top_p: float = struct.field(pytree_node=False, default=1.0)  # 1.0: off
    greedy: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True for argmax")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


def tempered_logprobs(logits: jax.Array, temperature: float) -> jax.Array:
    """log softmax(logits / τ) in float32 (τ = 1 when temperature is 0 / greedy)."""
    t = temperature if temperature > 0 else 1.0
    return jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)


def _filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _filter_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of tokens whose probability mass reaches p (the top token always)."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row of ``logits`` [B, V]; returns (tokens int32 [B], logp float32 [B])."""
    logits = logits.astype(jnp.float32)
    logp_all = tempered_logprobs(logits, 0.0 if cfg.greedy else cfg.temperature)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = _filter_top_p(_filter_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
        tokens = jax.random.categorical(key, filtered, axis=-1)
    tokens = tokens.astype(jnp.int32)
    logp = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    return tokens, logp
