"""Test probes for the jitted update: record what a method saw or returned inside ``jit``.

``Recorder.wrap(monkeypatch, cls, name, pick)`` replaces ``cls.name`` by a wrapper that calls
the original and sends ``pick(args, kwargs, result)`` (a pytree of arrays) to the host with
``jax.debug.callback``; each traced execution appends one NumPy pytree to ``recorder[name]``.
The production code path is unchanged: the wrapper is looked up by the real ``Trainer.update``
when it is traced.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from experiments.configs import recipes


class Recorder(dict):
    def wrap(self, monkeypatch, cls, name, pick):
        original = getattr(cls, name)
        self[name] = []

        def store(tree):
            self[name].append(jax.tree.map(np.asarray, tree))

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            jax.debug.callback(store, pick(args, kwargs, out))
            return out

        monkeypatch.setattr(cls, name, wrapper)
        return self

    def last(self, name):
        jax.effects_barrier()
        assert self[name], f"{name} was not called"
        return self[name][-1]


def tiny(env: str, algorithm: str, *, groups: int = 4, group_size: int = 2, **env_knobs):
    """The published recipe of ``algorithm`` on ``env`` with a 1-layer d_model 32 model, one
    epoch of two minibatches, no BC warm start (random policy) and no learned-RM training."""
    c = recipes.recipe(env, algorithm, **env_knobs)
    c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, attention_impl="xla")
    c.rollout.update(num_groups=groups, group_size=group_size)
    c.rl.update(epochs=1, minibatches=2, logprob_chunk=0)
    c.bc.episodes = 0
    c.reward.update(rm_pairs=32, rm_epochs=1, rm_eval_pairs=32, rm_batch_size=16)
    c.total_updates = 1
    return c


def batch_pick(args, kwargs, out):
    """``Trainer.optimize(loss_fn, params, opt_state, batch, key)`` → the batch it trains on."""
    return args[4]


def traj_pick(args, kwargs, out):
    """``_sample_groups`` → the sampled trajectory as a dict of its fields (those that are set:
    ``behaviour_version`` is None outside continuous rollouts)."""
    return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)
            if getattr(out, f.name) is not None}
