"""Published recipes as edits of ``make_config(env, algorithm)`` (see /work/shared/METHODS.md).

``recipe(env, algorithm)`` = ``make_config`` + the algorithm's settings + every knob of the task
exposed under ``env.kwargs`` (so ``--config.env.kwargs.hops=3`` works from the command line).

| algorithm      | settings                                                                        |
|----------------|---------------------------------------------------------------------------------|
| ppo            | token GAE γ=1, λ=0.95; KL-in-reward 0.01 (k1); value loss ½, clip 0.2           |
|                | (Practitioner's Guide to multi-turn agentic RL)                                 |
| turn_ppo       | turn-level GAE γ=0.99, λ=0.9; KL-in-reward 0.01                                 |
| bilevel_ppo    | RAGEN bi-level GAE (turn γ=0.95, token γ=λ=1, whitened); KL-in-reward 0.01      |
| grpo           | group mean/std advantages, seq-mean-token-mean loss, KL loss k3 β=0.04          |
|                | (DeepSeekMath)                                                                  |
| dr_grpo        | group-mean advantages, seq-mean-token-sum-norm loss (÷ max length), no KL       |
| rloo           | leave-one-out baseline, token-mean loss, KL-in-reward 0.01 (the episode's       |
|                | summed KL penalty is part of the return the baseline compares)                  |
| reinforce_pp   | batch-normalised returns, token-level KL-in-reward 0.01 (k1)                    |
|   (_baseline)  | the same after subtracting the group mean                                      |
| gigpo          | episode group (mean only) + step groups γ=0.95, ω=1; KL loss k3 0.01 (verl-agent)|
| dapo           | clip-higher ε=(0.2, 0.28), token-mean, dynamic sampling (oversample 2),         |
|                | overlong penalty over the last quarter of the token budget, no KL               |
| archer         | off-policy turn critic: TD(0) γ=0.95 from a 512-episode replay, 8 critic steps  |
|                | of 32 episodes, Adam 5e-4, Polyak τ=0.1; actor: turn advantage r+γV'−V (λ=0),   |
|                | PPO-clip token-mean, no KL (ArCHer; ``rl_agents.archer``)                       |
"""
from __future__ import annotations

import inspect

import ml_collections
from ml_collections import config_dict

from experiments.configs.common import make_config

__all__ = ["recipe", "env_kwargs", "apply_recipe", "RECIPES"]


def env_kwargs(name: str, **overrides) -> ml_collections.ConfigDict:
    """All constructor knobs of task ``name`` with their defaults (``overrides`` replace them).

    Knobs whose default is ``None`` (derived, e.g. ``max_turns``) become typed placeholders:
    ``None`` unless overridden, and still overridable as ``int`` / ``float`` on the command line.
    """
    import envs

    params = inspect.signature(envs.env_class(name).__init__).parameters
    out = {}
    for p in list(params.values())[1:]:
        if p.kind not in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            continue
        value = overrides.pop(p.name, p.default)
        if value is inspect.Parameter.empty:
            raise ValueError(f"env {name!r}: knob {p.name!r} has no default; pass it to env_kwargs")
        if value is None:
            ann = str(p.annotation)
            kind = float if "float" in ann else int if "int" in ann else str if "str" in ann else None
            if kind is None:
                continue
            value = config_dict.placeholder(kind)
        out[p.name] = value
    if overrides:
        raise ValueError(f"env {name!r} takes no knob(s) {sorted(overrides)}; it takes "
                         f"{[p for p in params if p != 'self']}")
    return ml_collections.ConfigDict(out)


_KL_IN_REWARD = dict(kl_coef=0.01, kl_kind="k1", kl_in_reward=True)

#: algorithm -> (``config.rl`` settings, ``config.rl.advantage_kwargs``).
RECIPES: dict[str, tuple[dict, dict]] = {
    "ppo": (dict(agg="token-mean", value_coef=0.5, value_clip=0.2, **_KL_IN_REWARD),
            dict(gamma=1.0, lam=0.95)),
    "turn_ppo": (dict(agg="token-mean", value_coef=0.5, value_clip=0.2, **_KL_IN_REWARD),
                 dict(gamma=0.99, lam=0.9)),
    "bilevel_ppo": (dict(agg="token-mean", value_coef=0.5, value_clip=0.2, **_KL_IN_REWARD),
                    dict(gamma_turn=0.95, lam_turn=1.0, gamma_token=1.0, lam_token=1.0,
                         whiten=True)),
    "grpo": (dict(agg="seq-mean-token-mean", kl_coef=0.04, kl_kind="k3", kl_in_reward=False),
             dict(eps=1e-6, unbiased=True)),
    "dr_grpo": (dict(agg="seq-mean-token-sum-norm", kl_coef=0.0), dict()),
    "rloo": (dict(agg="token-mean", **_KL_IN_REWARD), dict()),
    "reinforce_pp": (dict(agg="token-mean", **_KL_IN_REWARD), dict(gamma=1.0)),
    "reinforce_pp_baseline": (dict(agg="token-mean", **_KL_IN_REWARD), dict(gamma=1.0)),
    "gigpo": (dict(agg="token-mean", kl_coef=0.01, kl_kind="k3", kl_in_reward=False),
              dict(gamma=0.95, omega=1.0, norm="mean")),
    "dapo": (dict(eps_low=0.2, eps_high=0.28, agg="token-mean", kl_coef=0.0, oversample=2.0),
             dict(eps=1e-6, unbiased=True)),
    # a plain dict (ConfigDict.update copies it): a shared ConfigDict would leak edits
    "archer": (dict(agg="token-mean", kl_coef=0.0,
                    archer=dict(tau=0.1, replay_episodes=512, critic_updates=8, critic_batch=32,
                                critic_lr=5e-4, whiten=False)),
               dict(gamma=0.95, lam=0.0)),
}


def apply_recipe(c: ml_collections.ConfigDict, algorithm: str) -> ml_collections.ConfigDict:
    if algorithm not in RECIPES:
        raise ValueError(f"no recipe for algorithm {algorithm!r}; recipes: {sorted(RECIPES)}")
    rl_settings, adv_kwargs = RECIPES[algorithm]
    c.rl.update(rl_settings)
    c.rl.advantage_kwargs = ml_collections.ConfigDict(adv_kwargs)
    if algorithm == "dapo":
        import envs
        env = envs.make(c.env.name, **dict(c.env.kwargs))
        c.rl.overlong_cache_len = max(1, env.max_turns * env.action_len // 4)
    return c


def recipe(env: str, algorithm: str, **env_knobs) -> ml_collections.ConfigDict:
    """``make_config(env, algorithm)`` + task knobs + the algorithm's published settings."""
    c = make_config(env, algorithm)
    c.env.kwargs = env_kwargs(env, **env_knobs)
    return apply_recipe(c, algorithm)
