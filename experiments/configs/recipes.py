"""Published recipes: ``recipe(env, algorithm)`` = ``make_config(env, algorithm)`` + every knob
of the task under ``env.kwargs`` + the algorithm's settings.

The settings live in the algorithm's record (``rl_agents.algorithms.ALGORITHMS[name].rl`` and
``.advantage_kwargs``), so an algorithm is defined in one place; ``apply_recipe`` writes them
into ``config.rl``. ``env_kwargs`` exposes each task knob, so ``--config.env.kwargs.hops=3``
works from the command line.
"""
from __future__ import annotations

import inspect

import ml_collections
from ml_collections import config_dict

from experiments.configs.common import make_config

__all__ = ["recipe", "env_kwargs", "apply_recipe", "config_arg", "ARG_KEYS"]


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


#: ``--config FILE.py:KEY=VALUE,...`` keys and the config field each one chooses.
ARG_KEYS = {"algo": "rl.algorithm", "env": "env.name"}


def config_arg(arg: str | None, **defaults) -> dict:
    """The choices of a config file from its big_vision-style argument.

    ``python -m experiments.train --config experiments/configs/default.py:algo=ppo,env=maze``
    calls ``get_config("algo=ppo,env=maze")``; ``config_arg(arg, algo="grpo", env="guess_number")``
    returns ``{"algo": "ppo", "env": "maze"}``, so the file builds ``recipe(env, algo)``: the
    chosen algorithm's own settings, then the file's edits. ``defaults`` names the keys the file
    takes (a file for one task takes ``algo`` only). A key it does not take, or an item that is
    not ``KEY=VALUE``, raises ValueError naming it.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"config argument {item!r} is not KEY=VALUE (e.g. algo=ppo)")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not taken by this config file; it takes "
                             f"{sorted(defaults)}")
        out[key] = value
    return out


def _plain(mapping) -> dict:
    """A registry mapping as plain nested dicts (``ConfigDict.update`` copies them)."""
    return {k: (_plain(v) if hasattr(v, "items") else v) for k, v in mapping.items()}


def apply_recipe(c: ml_collections.ConfigDict, algorithm: str) -> ml_collections.ConfigDict:
    """Write ``algorithm``'s registered settings into ``c.rl`` (and its estimator
    hyper-parameters into ``c.rl.advantage_kwargs``). DAPO's overlong window is the last
    quarter of the task's agent-token budget."""
    from rl_agents.algorithms import get_algorithm

    algo = get_algorithm(algorithm)
    c.rl.update(_plain(algo.rl))
    c.rl.advantage_kwargs = ml_collections.ConfigDict(_plain(algo.advantage_kwargs))
    if algo.dynamic_sampling:
        import envs
        env = envs.make(c.env.name, **dict(c.env.kwargs))
        c.rl.overlong_cache_len = max(1, env.max_turns * env.action_len // 4)
    return c


def recipe(env: str, algorithm: str, **env_knobs) -> ml_collections.ConfigDict:
    """``make_config(env, algorithm)`` + task knobs + the algorithm's published settings."""
    c = make_config(env, algorithm)
    c.env.kwargs = env_kwargs(env, **env_knobs)
    return apply_recipe(c, algorithm)
