"""Readable text of an episode from its token arrays (for logs, demos and debugging).

    print(render_episode(env, prompt, actions, observations, rewards, dones=dones))

    kv_search episode (obs_len=6, action_len=5, max_turns=6)
      prompt: <task> e 3 qh ?
      turn 1: <search> e 3 q <eos>  ->  <obs> <result> w 3   [reward -0.01]
      turn 2: <search> w 3 h <eos>  ->  <obs> <result> c 2   [reward -0.01]
      turn 3: <answer> c 2 <eos>    ->  <obs> <yes>          [reward +1.00, done]
      return +0.98 over 3 turns
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from envs import vocab


def decode_safe(tokens: Sequence[int], phrases: Sequence[str] = ()) -> str:
    """``vocab.decode`` (with an env's ``phrases``) that writes an id ``i`` outside the
    vocabulary as ``#i`` instead of raising."""
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    limit = vocab.size + len(phrases)
    if all(0 <= t < limit for t in toks):
        return vocab.decode(toks, phrases=phrases)
    parts, run = [], []
    for t in toks:
        if 0 <= t < limit:
            run.append(t)
            continue
        if run:
            parts.append(vocab.decode(run, phrases=phrases))
            run = []
        parts.append(f"#{t}")
    if run:
        parts.append(vocab.decode(run, phrases=phrases))
    return " ".join(p for p in parts if p)


def action_text(action: Sequence[int]) -> str:
    """The action as the env reads it: tokens up to its first ``<eos>`` / ``<pad>`` (shown)."""
    toks = [int(t) for t in np.asarray(action).reshape(-1)]
    out = []
    for t in toks:
        if t == vocab.PAD:
            break
        out.append(t)
        if t == vocab.EOS:
            break
    return decode_safe(out) if out else "<pad>"


def render_episode(env, prompt, actions, observations, rewards, dones=None) -> str:
    """Text of one episode.

    ``prompt`` int [obs_len]; ``actions`` int [T, action_len]; ``observations`` int [T, obs_len];
    ``rewards`` float [T]; ``dones`` optional bool [T] (the episode's done flags: turns after the
    first done are left out). ``env`` is used for its name and sizes (may be None).
    """
    actions = np.asarray(actions)
    observations = np.asarray(observations)
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if actions.ndim != 2 or observations.ndim != 2:
        raise ValueError(f"actions and observations must be 2-D [T, len], got shapes "
                         f"{actions.shape} and {observations.shape}")
    T = actions.shape[0]
    if observations.shape[0] != T or rewards.shape[0] != T:
        raise ValueError(f"actions, observations and rewards need the same number of turns, got "
                         f"{T}, {observations.shape[0]}, {rewards.shape[0]}")
    done_flags = None if dones is None else np.asarray(dones, bool).reshape(-1)
    if done_flags is not None and done_flags.shape[0] != T:
        raise ValueError(f"dones must have {T} entries, got {done_flags.shape[0]}")
    phrases = tuple(getattr(env, "phrases", ()))
    head = "episode" if env is None else f"{getattr(env, 'name', type(env).__name__)} episode"
    if env is not None:
        head += f" (obs_len={env.obs_len}, action_len={env.action_len}, max_turns={env.max_turns})"
    rows = []
    total, n = 0.0, 0
    for t in range(T):
        done = bool(done_flags[t]) if done_flags is not None else False
        rows.append((f"turn {t + 1}:", action_text(actions[t]), decode_safe(observations[t], phrases),
                     f"[reward {rewards[t]:+.2f}{', done' if done else ''}]"))
        total += float(rewards[t])
        n += 1
        if done:
            break
    wa = max((len(r[1]) for r in rows), default=0)
    wo = max((len(r[2]) for r in rows), default=0)
    lines = [head, f"  prompt: {decode_safe(prompt, phrases)}"]
    for label, act, obs, rew in rows:
        lines.append(f"  {label} {act.ljust(wa)}  ->  {obs.ljust(wo)}   {rew}")
    lines.append(f"  return {total:+.2f} over {n} turns")
    return "\n".join(lines)
