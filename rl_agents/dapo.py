"""DAPO pieces: the overlong reward shaping and dynamic sampling (fixed shapes, jittable).

Dynamic sampling keeps a group iff 0 < #successes < G (``informative_groups``), on the
episodes' success labels, never on their shaped returns.

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


def informative_groups(group_success: jax.Array) -> jax.Array:
    """bool ``[N_groups]``: 0 < #successes < G in the group (``group_success`` bool
    ``[N_groups, G]``). DAPO's filter: a group whose rollouts all solve, or all fail, the task
    has no outcome signal to compare (its GRPO advantage is 0 or only reflects reward shaping
    such as per-step costs or format penalties)."""
    s = jnp.asarray(group_success)
    if s.ndim != 2:
        raise ValueError(f"group_success must be [N_groups, G]; got shape {s.shape}")
    if s.dtype != jnp.bool_:
        raise ValueError(f"group_success must be bool (the episodes' success labels), got "
                         f"{s.dtype}: shaped returns are not DAPO's signal")
    n = s.sum(axis=1)
    return (n > 0) & (n < s.shape[1])


def select_informative_groups(group_success: jax.Array, n_keep: int):
    """Dynamic sampling with fixed shapes → ``(indices int32 [n_keep], keep_mask bool [n_keep])``.

    ``group_success``: bool ``[N_groups, G]`` success labels. Informative groups
    (0 < #successes < G, ``informative_groups``) come first, in their original order; if fewer
    than ``n_keep`` exist the remaining slots are filled with uninformative groups (original
    order) whose ``keep_mask`` is False, so the caller masks them out of the loss.
    """
    return _keep_first(informative_groups(group_success), n_keep)


def _keep_first(info: jax.Array, n_keep: int):
    """The ``n_keep`` first groups with the informative ones (``info``) in front, stable."""
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= info.shape[0]:
        raise ValueError(f"n_keep={n_keep!r} must be an int in [1, N_groups={info.shape[0]}]")
    order = jnp.argsort(~info, stable=True)[:n_keep].astype(jnp.int32)
    return order, info[order]


def dynamic_sampling(traj: Any, n_keep: int, group_size: int):
    """DAPO's dynamic sampling on an oversampled batch → ``(traj, row_weight, metrics)``.

    ``traj``: N_groups·G episodes (rows of a group contiguous) with ``success`` bool ``[N·G]``
    and ``group_ids``. Keeps ``n_keep`` groups (``select_informative_groups`` on ``success``),
    renumbers their ``group_ids`` 0..n_keep−1, and weights the rows of uninformative filler
    groups 0 (``row_weight`` float32 ``[n_keep·G]``).

    The filter reads the env's success label, which every env reports (``info["success"]``,
    true on the step that solves the task): DAPO keeps a group iff its accuracy is strictly
    between 0 and 1. It never reads the shaped return: per-search costs, step costs or format
    penalties make returns of an all-success or all-fail group differ, and such a group would be
    kept though it has no outcome signal.

    ``metrics["dapo/kept_fraction"]``: the fraction of the N_groups sampled groups that pass the
    filter (informative groups / sampled groups). Of those, at most ``n_keep`` train;
    ``row_weight.mean()`` is the fraction of the ``n_keep`` training slots they fill.
    """
    success = jnp.asarray(traj.success, bool)
    n_total = success.shape[0] // group_size
    info = informative_groups(success.reshape(n_total, group_size))
    idx, keep = _keep_first(info, n_keep)
    out = gather_groups(traj, idx, group_size)
    out = out.replace(group_ids=jnp.repeat(jnp.arange(n_keep, dtype=jnp.int32), group_size))
    metrics = {"dapo/kept_fraction": info.mean(dtype=jnp.float32)}
    return out, jnp.repeat(keep, group_size).astype(jnp.float32), metrics


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
