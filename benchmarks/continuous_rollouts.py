"""Synchronous vs continuous rollouts: useful generated tokens per second of the whole update.

    python -m benchmarks.continuous_rollouts                      # maze, keychain, calculator
    python -m benchmarks.continuous_rollouts --envs maze --algos ppo --fill off --turns 4,6
    python -m benchmarks.continuous_rollouts --quick              # tiny smoke run
    python -m benchmarks.continuous_rollouts --attention pallas   # cached attention by flash_decode

For each task and algorithm (``--algos``: ``grpo``, groups of G = 4; ``ppo``, one episode per
group): its recipe (the default ≈0.4M-parameter model, 64 episodes an update), a BC warm start
on ``--bc_episodes`` ε-noisy demos (so that episodes end at different turns, as a trained
policy's do), then the same starting state is updated ``--warmup`` + ``--updates`` times with
``rollout.mode = "sync"`` and with ``"continuous"`` for each ``--turns`` value of
``rollout.continuous.turns_per_update`` (0: the task's max_turns), each ``--slots`` multiplier m
(slot_groups = m · num_groups; the training buffer stays num_groups groups) and each ``--fill``
setting (``on``: ``until_full``, turn steps stop once the buffer is full, at most
turns_per_update; ``off``: always turns_per_update steps). ``max_staleness`` is the config's
(4) with ``until_full`` and ⌈max_turns / turns_per_update⌉ without, unless
``--max_staleness`` sets it; carried KV caches, or with ``--reprefill on|both`` caches rebuilt
from the tokens under the new parameters at each update's start. The warm-up updates compile
and, in continuous mode, fill the slots; the next
``--updates`` are timed one by one with the modes interleaved (one update of each in turn), so
that a change in the machine's load hits every mode alike (whole jitted update: rollout,
scoring, advantages, two epochs of two minibatches). The rollout alone (the collect stage,
jitted on its own) is timed the same way, to show its share of the update.

Per row: mean turn steps per update; median seconds per update and per rollout; trained
agent tokens per update (the
generated tokens of the episodes the update trains on: sync, all episodes; continuous, the
completed groups in its buffer); **useful tokens/s** = their ratio; the ratio to sync;
generated tokens per update (continuous: every token sampled, including those of episodes still
in flight); groups trained and groups dropped as stale per update; the trained episodes' success
rate, turns and token staleness. Printed as a markdown table with the hardware; ``--out``
writes it and a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from experiments.configs.recipes import recipe
from rl_agents import make_trainer


def _config(env: str, algo: str, args, mode: str, turns: int = 0, slots: int = 1,
            reprefill: bool = False, until_full: bool = True):
    c = recipe(env, algo)
    c.seed = args.seed
    c.bc.update(episodes=args.bc_episodes, epsilon=0.3)
    c.rl.kl_coef = 0.0
    c.model.attention_impl = args.attention
    if args.quick:
        c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
        c.rollout.update(num_groups=4, group_size=2 if c.rollout.group_size > 1 else 1)
        c.bc.update(episodes=64, epochs=1)
    c.rollout.mode = mode
    if mode == "continuous":
        import math
        import envs
        max_turns = envs.make(c.env.name, **dict(c.env.kwargs)).max_turns
        c.rollout.continuous.update(slot_groups=slots * c.rollout.num_groups,
                                    turns_per_update=turns, until_full=until_full,
                                    reprefill=reprefill)
        if args.max_staleness is not None:
            c.rollout.continuous.max_staleness = args.max_staleness
        elif not until_full:
            c.rollout.continuous.max_staleness = math.ceil(max_turns / (turns or max_turns))
    return c


def _summary(tr, times, rollout_times, rows) -> dict:
    b = tr.num_episodes
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    if tr.continuous is None:
        trained = mean("rollout/agent_tokens") * b
        generated = trained
        extra = dict(groups=float(tr.num_groups), staleness=0.0, dropped=0.0,
                     turn_steps=float(tr.env.max_turns))
    else:
        trained = mean("continuous/trained_tokens")
        generated = mean("continuous/generated_tokens")
        extra = dict(groups=mean("continuous/groups_completed"),
                     staleness=mean("continuous/staleness_mean"),
                     dropped=mean("continuous/groups_dropped_stale"),
                     turn_steps=mean("continuous/turn_steps"))
    sec = statistics.median(times)
    return dict(sec_per_update=sec, sec_rollout=statistics.median(rollout_times),
                trained_tokens=trained, generated_tokens=generated,
                useful_tok_s=trained / sec, success=mean("rollout/success_rate"),
                turns=mean("rollout/turns"), **extra)


def _rollout_fn(tr):
    """The collect stage alone, jitted: ``state -> (state', outputs)``."""
    if tr.continuous is None:
        def f(state):
            key, k_roll = jax.random.split(state.key)
            out = tr.collect(state.params["policy"], k_roll)
            return state.replace(key=key), out
    else:
        def f(state):
            key, k_roll = jax.random.split(state.key)
            out = tr.collect_continuous(state.params["policy"], state.rollout, k_roll, state.step)
            return state.replace(key=key, rollout=out[3], step=state.step + 1), out[:3]
    return jax.jit(f)


def bench_env(env: str, algo: str, args) -> list[dict]:
    """The modes' updates are timed interleaved (one update of each mode in turn), so that a
    change in the machine's load hits every mode alike."""
    sync_tr = make_trainer(_config(env, algo, args, "sync"))
    t0 = time.time()
    start = sync_tr.init(jax.random.PRNGKey(args.seed))
    print(f"[{env}/{algo}] BC warm start {time.time() - t0:.0f} s; max_turns "
          f"{sync_tr.env.max_turns}", flush=True)
    runs = [("sync", sync_tr.env.max_turns, 0, sync_tr, jax.tree.map(jnp.copy, start))]
    choice = {"off": [False], "on": [True], "both": [False, True]}
    for turns, slots, reprefill, fill in [(t, m, p, f) for f in choice[args.fill]
                                          for t in args.turns for m in args.slots
                                          for p in choice[args.reprefill]]:
        tr = make_trainer(_config(env, algo, args, "continuous", turns, slots, reprefill, fill))
        state = tr.fresh_state(jax.random.PRNGKey(args.seed)).replace(
            **jax.tree.map(jnp.copy, dict(params=start.params, opt_state=start.opt_state,
                                          ref_params=start.ref_params, key=start.key)))
        mode = ("continuous, until full" if fill else "continuous") + (
            " + re-prefill" if reprefill else "")
        runs.append((mode, turns or tr.env.max_turns, slots, tr, state))
    states = [r[4] for r in runs]
    rollouts = [_rollout_fn(r[3]) for r in runs]
    for _ in range(args.warmup):          # compilation; the continuous slots' first fill
        states = [r[3].update(s)[0] for r, s in zip(runs, states)]
        jax.block_until_ready([f(jax.tree.map(jnp.copy, s)) for f, s in zip(rollouts, states)])
    jax.block_until_ready(states)
    times, rollout_times, rows = ([[] for _ in runs] for _ in range(3))
    for _ in range(args.updates):
        for i, (r, s) in enumerate(zip(runs, states)):
            probe = jax.tree.map(jnp.copy, s)
            jax.block_until_ready(probe)
            t0 = time.perf_counter()
            jax.block_until_ready(rollouts[i](probe))
            rollout_times[i].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s, m = r[3].update(s)
            m = jax.tree.map(float, jax.device_get(m))
            times[i].append(time.perf_counter() - t0)
            rows[i].append(m)
            states[i] = s
    out = []
    for i, (mode, turns, slots, tr, _) in enumerate(runs):
        row = dict(env=env, algo=algo, group_size=tr.group_size, mode=mode,
                   turns_per_update=turns, slot_groups=(tr.continuous.slot_groups if slots
                                                        else tr.num_groups),
                   **_summary(tr, times[i], rollout_times[i], rows[i]))
        row["ratio"] = row["useful_tok_s"] / (out[0]["useful_tok_s"] if out else
                                              row["useful_tok_s"])
        out.append(row)
        print(f"[{env}/{algo}] {mode} turns={turns} slots={row['slot_groups']}: {row}",
              flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| task | algorithm (G) | mode | max turn steps | slot groups | turn steps / "
             "update | s / update | rollout s | trained agent tokens / update | useful tok/s | "
             "× sync | generated tokens / update | groups trained | groups dropped | mean "
             "staleness | success (trained) | turns |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['algo']} ({r['group_size']}) | {r['mode']} | "
            f"{r['turns_per_update']} | {r['slot_groups']} | {r['turn_steps']:.1f} | "
            f"{r['sec_per_update']:.3f} | "
            f"{r['sec_rollout']:.3f} | {r['trained_tokens']:.0f} | {r['useful_tok_s']:.0f} | "
            f"**{r['ratio']:.2f}** | {r['generated_tokens']:.0f} | {r['groups']:.1f} | "
            f"{r['dropped']:.1f} | "
            f"{r['staleness']:.2f} | {r['success']:.3f} | {r['turns']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", default="maze,keychain,calculator")
    ap.add_argument("--algos", default="grpo,ppo")
    ap.add_argument("--turns", default="0",
                    help="turns_per_update values (comma-separated; 0: the task's max_turns)")
    ap.add_argument("--fill", default="on", choices=["off", "on", "both"],
                    help="continuous rows with until_full off, on or both")
    ap.add_argument("--max_staleness", type=int, default=None,
                    help="override rollout.continuous.max_staleness")
    ap.add_argument("--slots", default="1,2",
                    help="slot_groups as multiples of num_groups (comma-separated)")
    ap.add_argument("--updates", type=int, default=8, help="timed updates per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    ap.add_argument("--bc_episodes", type=int, default=1024)
    ap.add_argument("--reprefill", default="off", choices=["off", "on", "both"],
                    help="continuous rows with carried caches (off), rebuilt caches (on) or both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"],
                    help="model.attention_impl (pallas: the decode steps' attention over the KV "
                         "cache stops at each slot's own length; interpret mode on CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny model and batch (smoke test)")
    ap.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    args.turns = [int(t) for t in args.turns.split(",") if t]
    args.slots = [int(m) for m in args.slots.split(",") if m]
    if args.quick:
        args.updates, args.warmup = min(args.updates, 2), min(args.warmup, 1)
    rows = []
    for env in args.envs.split(","):
        for algo in args.algos.split(","):
            rows.extend(bench_env(env, algo, args))
    hw = common.machine_note()
    text = (f"{table(rows)}\n\n{hw}; jax {jax.__version__}; "
            f"{time.strftime('%Y-%m-%d')}; fill={args.fill}; reprefill={args.reprefill}; "
            f"attention={args.attention}\n")
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(rows=rows, argv=vars(args), hardware=hw), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
