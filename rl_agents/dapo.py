"""DAPO pieces: the overlong reward shaping and dynamic sampling (fixed shapes, jittable).

Clip-higher (ε_low = 0.2, ε_high = 0.28) and token-level aggregation are options of
``losses.ppo_policy_loss``; DAPO uses no KL term.
"""
from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp


def overlong_penalty(response_lengths: jax.Array, max_len, cache_len) -> jax.Array:
    """DAPO's soft overlong punishment (lengths in tokens), float32 of the lengths' shape:

        0                                   if L ≤ max_len − cache_len
        ((max_len − cache_len) − L) / cache_len   if max_len − cache_len < L < max_len
        −1                                  if L ≥ max_len

    i.e. linear from 0 to −1 over the last ``cache_len`` tokens before ``max_len``.
    """
    for name, v in (("max_len", max_len), ("cache_len", cache_len)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
            raise ValueError(f"{name}={v!r} must be a positive number")
    if cache_len > max_len:
        raise ValueError(f"cache_len={cache_len!r} must be ≤ max_len={max_len!r}")
    length = jnp.asarray(response_lengths, jnp.float32)
    start = float(max_len - cache_len)
    pen = (start - length) / float(cache_len)
    return jnp.clip(jnp.where(length <= start, 0.0, pen), -1.0, 0.0)


def informative_groups(group_rewards: jax.Array) -> jax.Array:
    """bool ``[N_groups]``: the group's rewards are not all equal (a zero-advantage group under
    GRPO carries no gradient)."""
    r = jnp.asarray(group_rewards)
    return jnp.any(r != r[:, :1], axis=1)


def select_informative_groups(group_rewards: jax.Array, n_keep: int):
    """Dynamic sampling with fixed shapes → ``(indices int32 [n_keep], keep_mask bool [n_keep])``.

    Informative groups (rewards not all equal) come first, in their original order; if fewer
    than ``n_keep`` exist the remaining slots are filled with uninformative groups (original
    order) whose ``keep_mask`` is False, so the caller masks them out of the loss.
    """
    r = jnp.asarray(group_rewards)
    if r.ndim != 2:
        raise ValueError(f"group_rewards must be [N_groups, G]; got shape {r.shape}")
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= r.shape[0]:
        raise ValueError(f"n_keep={n_keep!r} must be an int in [1, N_groups={r.shape[0]}]")
    info = informative_groups(r)
    order = jnp.argsort(~info, stable=True)[:n_keep].astype(jnp.int32)
    return order, info[order]


def gather_groups(tree: Any, indices: jax.Array, group_size: int) -> Any:
    """Gather whole groups from every leaf of ``tree`` whose leading axis is N_groups·G
    (rows of a group contiguous): leaf ``[N·G, ...]`` → ``[len(indices)·G, ...]``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    idx = jnp.asarray(indices, jnp.int32)

    def take(path, x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % group_size:
            raise ValueError(f"leaf {jax.tree_util.keystr(path)} has shape {x.shape}: its leading "
                             f"axis must be a multiple of group_size={group_size}")
        g = x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])
        return g[idx].reshape((idx.shape[0] * group_size,) + x.shape[1:])

    return jax.tree_util.tree_map_with_path(take, tree)
