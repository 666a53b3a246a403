"""Jitted token-native environments for synthetic agentic tasks.

    import envs
    env = envs.make("kv_search", hops=2)        # -> envs.tasks.kv_search.KvSearchEnv
    envs.registered()                           # the nine task names

Task modules are imported lazily (``envs.tasks.<name>``) so that importing ``envs`` is cheap
and a broken task module only fails when it is asked for.
"""
from __future__ import annotations

import importlib
import inspect

from envs.base import Env, TimeStep

__all__ = ["Env", "TimeStep", "make", "registered", "env_class", "register"]

# name -> (module, class name), or the class itself for envs added with ``register``
_REGISTRY: dict[str, tuple[str, str] | type] = {
    "guess_number": ("envs.tasks.guess_number", "GuessNumberEnv"),
    "kv_search": ("envs.tasks.kv_search", "KvSearchEnv"),
    "calculator": ("envs.tasks.calculator", "CalculatorEnv"),
    "maze": ("envs.tasks.maze", "MazeEnv"),
    "wordle": ("envs.tasks.wordle", "WordleEnv"),
    "keychain": ("envs.tasks.keychain", "KeychainEnv"),
    "bandit": ("envs.tasks.bandit", "BanditEnv"),
    # tasks in words (Env.phrases): only with a Hugging Face checkpoint's tokenizer
    "word_problems": ("envs.tasks.word_problems", "WordProblemsEnv"),
    "kb_qa": ("envs.tasks.kb_qa", "KbQaEnv"),
}


def registered() -> list[str]:
    """Names accepted by ``make``, in registration order."""
    return list(_REGISTRY)


def env_class(name: str) -> type[Env]:
    """The Env subclass registered under ``name`` (imports its module on first use)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown env name {name!r}; registered: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry
    return getattr(importlib.import_module(module), cls)


def register(name: str, cls: type[Env]) -> None:
    """Add env class ``cls`` under ``name`` (then ``envs.make(name, **knobs)`` and
    ``config.env.name = name`` work). A name already taken raises ValueError."""
    if name in _REGISTRY:
        raise ValueError(f"env {name!r} is already registered")
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise ValueError(f"env {name!r}: expected a subclass of envs.Env, got {cls!r}")
    _REGISTRY[name] = cls


def make(name: str, **kwargs) -> Env:
    """Construct the task ``name`` with difficulty knobs ``kwargs``.

    Raises ValueError for an unknown name (listing the registered ones) or for a keyword the
    task's constructor does not take (listing the ones it does); the task itself validates
    the knob values.
    """
    cls = env_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        allowed = [p for p in params if p != "self"
                   and params[p].kind in (inspect.Parameter.KEYWORD_ONLY,
                                          inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        bad = sorted(set(kwargs) - set(allowed))
        if bad:
            raise ValueError(f"env {name!r} got unknown keyword argument(s) {bad}; "
                             f"it takes: {', '.join(allowed) or '(none)'}")
    return cls(**kwargs)
