"""Env-steps per second: jit(vmap(env.step)) against the plain-Python twin.

    python -m benchmarks.env_throughput            # batches 1, 64, 1024, 4096, 5 runs
    python -m benchmarks.env_throughput --quick    # batches 1, 64, 1024, 3 runs

Every module of ``envs/python_twins`` that defines a class with ``from_state(state, env)`` and
``step(text)`` and whose module name is a registered env is benchmarked (kv_search,
calculator, maze, ...). For each env and batch size B:

* a trajectory of B episodes is generated with the jitted oracle (one ``jit(vmap)`` +
  ``lax.scan``); T = the median oracle episode length (turns after an env's end are no-op
  steps, the same for both sides);
* jitted: ``jit(vmap(env.step))(states_t, actions_t)`` for t < T, each call followed by
  ``block_until_ready``; compiled beforehand;
* twin: B twin objects built from the reset states (not timed), then a Python loop over the T
  turns and the B twins calling ``twin.step(text)`` with the action strings prepared before
  timing (``vocab.decode`` of the same action tokens). The twin's own parsing and formatting
  are timed, since they are its cost.

Reported: env-steps per second (B * T / seconds), median of ``--runs`` runs, and the ratio.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import envs
from envs import vocab
from envs.python_twins import __path__ as _twins_path


def discover_twins() -> dict[str, type]:
    """{env name: twin class} for every twin module with the from_state / step interface."""
    found = {}
    for mod in sorted(m.name for m in pkgutil.iter_modules(_twins_path)):
        if mod not in envs.registered():
            continue
        module = importlib.import_module(f"envs.python_twins.{mod}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "from_state", None)) \
                    and callable(getattr(cls, "step", None)):
                found[mod] = cls
                break
    return found


def oracle_trajectory(env, n: int, seed: int = 0):
    """States before each turn, actions and episode lengths of n oracle episodes (numpy)."""
    turns = env.max_turns

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        s0, _ = env.reset(k_reset)

        def body(s, k):
            a = env.oracle_action(s, k)
            s2, ts = env.step(s, a)
            return s2, (s, a, ts.terminated | ts.truncated)
        _, (states, acts, done) = jax.lax.scan(body, s0, jax.random.split(k_act, turns))
        return states, acts, done

    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    states, acts, done = jax.device_get(jax.jit(jax.vmap(episode))(keys))
    lengths = np.argmax(done, axis=1) + 1
    lengths = np.where(done.any(axis=1), lengths, turns)
    return states, acts, lengths


def time_jitted(env, states, acts, B: int, T: int, runs: int) -> float:
    step = jax.jit(jax.vmap(env.step))
    per_t = [(jax.device_put(jax.tree_util.tree_map(lambda x: x[:B, t], states)),
              jax.device_put(acts[:B, t])) for t in range(T)]
    for s, a in per_t:                                   # compile + warm up
        jax.block_until_ready(step(s, a))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for s, a in per_t:
            jax.block_until_ready(step(s, a))
        times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times)


def time_twin(env, twin_cls, states, acts, B: int, T: int, runs: int) -> float:
    texts = [[vocab.decode(acts[i, t], skip_pad=False) for i in range(B)] for t in range(T)]
    first = [jax.tree_util.tree_map(lambda x: x[i, 0], states) for i in range(B)]
    times = []
    for _ in range(runs):
        twins = [twin_cls.from_state(s, env) for s in first]          # not timed
        t0 = time.perf_counter()
        for t in range(T):
            row = texts[t]
            for i, tw in enumerate(twins):
                tw.step(row[i])
        times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batches 1, 64, 1024 and 3 runs")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (>= 3)")
    p.add_argument("--envs", nargs="+", default=None, help="subset of the discovered twins")
    args = p.parse_args(argv)
    batches = args.batches or ([1, 64, 1024] if args.quick else [1, 64, 1024, 4096])
    runs = args.runs or (3 if args.quick else 5)
    if runs < 3:
        raise ValueError(f"--runs must be >= 3 (median of at least 3 runs), got {runs}")
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches must be positive, got {batches}")
    twins = discover_twins()
    if args.envs:
        unknown = sorted(set(args.envs) - set(twins))
        if unknown:
            raise ValueError(f"no twin for {unknown}; available: {sorted(twins)}")
        twins = {k: v for k, v in twins.items() if k in args.envs}

    lines = [f"Env throughput (env-steps/s), device {jax.devices()[0].platform}, "
             f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
             f"median of {runs} runs",
             "",
             "| env | batch | turns | jitted steps/s | twin steps/s | jitted / twin |",
             "|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name, twin_cls in twins.items():
        env = envs.make(name)
        states, acts, lengths = oracle_trajectory(env, max(batches))
        T = max(1, int(np.median(lengths)))
        for B in batches:
            j = time_jitted(env, states, acts, B, T, runs)
            tw = time_twin(env, twin_cls, states, acts, B, T, runs)
            line = f"| {name} | {B} | {T} | {j:,.0f} | {tw:,.0f} | {j / tw:,.1f}x |"
            lines.append(line)
            print(line, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
