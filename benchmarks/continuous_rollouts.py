"""Synchronous vs continuous rollouts: useful generated tokens per second of the whole update.

    python -m benchmarks.continuous_rollouts                      # maze, keychain, calculator
    python -m benchmarks.continuous_rollouts --envs maze --turns 3,5 --updates 10
    python -m benchmarks.continuous_rollouts --quick              # tiny smoke run

For each task: its GRPO recipe (the default ≈0.4M-parameter model, 16 groups × 4 rollouts an
update), a BC warm start on ``--bc_episodes`` ε-noisy demos (so that episodes end at different
turns, as a trained policy's do), then the same starting state is updated ``--warmup`` +
``--updates`` times with ``rollout.mode = "sync"`` and with ``"continuous"`` for each
``--turns`` value of ``rollout.continuous.turns_per_update`` (slot_groups = num_groups,
max_staleness 2, carried KV caches). The warm-up updates compile and, in continuous mode, fill
the slots; the next ``--updates`` are timed one by one, the modes interleaved (whole jitted
update: rollout, scoring, advantages, two epochs of two minibatches).

Per mode: median seconds per update; trained agent tokens per update (the generated tokens
of the episodes the update trains on: sync, all B episodes; continuous, the completed groups
in its buffer, stale drops excluded); **useful tokens/s** = their ratio; the ratio to sync;
generated tokens per update (continuous: every token sampled in the update, including those of
episodes still in flight); the trained episodes' success rate, turns and token staleness.
Printed as a markdown table with the hardware; ``--out`` writes it and a JSON file.
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


def _config(env: str, args, mode: str, turns: int = 0):
    c = recipe(env, "grpo")
    c.seed = args.seed
    c.bc.update(episodes=args.bc_episodes, epsilon=0.3)
    c.rl.kl_coef = 0.0
    if args.quick:
        c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
        c.rollout.update(num_groups=4, group_size=2)
        c.bc.update(episodes=64, epochs=1)
    c.rollout.mode = mode
    if mode == "continuous":
        c.rollout.continuous.update(slot_groups=0, turns_per_update=turns, max_staleness=2,
                                    reprefill=args.reprefill)
    return c


def _summary(tr, times, rows) -> dict:
    b = tr.num_episodes
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    if tr.continuous is None:
        trained = mean("rollout/agent_tokens") * b
        generated = trained
        extra = dict(groups=float(tr.num_groups), staleness=0.0, dropped=0.0)
    else:
        trained = mean("continuous/trained_tokens")
        generated = mean("continuous/generated_tokens")
        extra = dict(groups=mean("continuous/groups_completed"),
                     staleness=mean("continuous/staleness_mean"),
                     dropped=mean("continuous/groups_dropped_stale"))
    sec = statistics.median(times)
    return dict(sec_per_update=sec, trained_tokens=trained, generated_tokens=generated,
                useful_tok_s=trained / sec, success=mean("rollout/success_rate"),
                turns=mean("rollout/turns"), **extra)


def bench_env(env: str, args) -> list[dict]:
    """The modes' updates are timed interleaved (one update of each mode in turn), so that a
    change in the machine's load hits every mode alike."""
    sync_tr = make_trainer(_config(env, args, "sync"))
    t0 = time.time()
    start = sync_tr.init(jax.random.PRNGKey(args.seed))
    print(f"[{env}] BC warm start {time.time() - t0:.0f} s; max_turns {sync_tr.env.max_turns}",
          flush=True)
    runs = [("sync", sync_tr.env.max_turns, sync_tr, jax.tree.map(jnp.copy, start))]
    for turns in args.turns:
        tr = make_trainer(_config(env, args, "continuous", turns))
        state = tr.fresh_state(jax.random.PRNGKey(args.seed)).replace(
            **jax.tree.map(jnp.copy, dict(params=start.params, opt_state=start.opt_state,
                                          ref_params=start.ref_params, key=start.key)))
        runs.append(("continuous", turns, tr, state))
    states = [r[3] for r in runs]
    for _ in range(args.warmup):          # compilation; the continuous slots' first fill
        states = [r[2].update(s)[0] for r, s in zip(runs, states)]
    jax.block_until_ready(states)
    times = [[] for _ in runs]
    rows = [[] for _ in runs]
    for _ in range(args.updates):
        for i, (r, s) in enumerate(zip(runs, states)):
            t0 = time.perf_counter()
            s, m = r[2].update(s)
            m = jax.tree.map(float, jax.device_get(m))
            times[i].append(time.perf_counter() - t0)
            rows[i].append(m)
            states[i] = s
    out = []
    for i, (mode, turns, tr, _) in enumerate(runs):
        row = dict(env=env, mode=mode, turns_per_update=turns, **_summary(tr, times[i], rows[i]))
        row["ratio"] = row["useful_tok_s"] / (out[0]["useful_tok_s"] if out else
                                              row["useful_tok_s"])
        out.append(row)
        print(f"[{env}] {mode} turns={turns}: {row}", flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| task | mode | turn steps / update | s / update | trained agent tokens / update "
             "| useful tok/s | × sync | generated tokens / update | groups trained | "
             "dropped stale | mean staleness | success (trained episodes) | turns |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['mode']} | {r['turns_per_update']} | {r['sec_per_update']:.3f} | "
            f"{r['trained_tokens']:.0f} | {r['useful_tok_s']:.0f} | **{r['ratio']:.2f}** | "
            f"{r['generated_tokens']:.0f} | {r['groups']:.1f} | {r['dropped']:.2f} | "
            f"{r['staleness']:.2f} | {r['success']:.3f} | {r['turns']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", default="maze,keychain,calculator")
    ap.add_argument("--turns", default="3,5", help="turns_per_update values (comma-separated)")
    ap.add_argument("--updates", type=int, default=8, help="timed updates per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    ap.add_argument("--bc_episodes", type=int, default=1024)
    ap.add_argument("--reprefill", action="store_true", help="rebuild caches at each update")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model and batch (smoke test)")
    ap.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    args.turns = [int(t) for t in args.turns.split(",") if t]
    if args.quick:
        args.updates, args.warmup = min(args.updates, 2), min(args.warmup, 1)
    rows = []
    for env in args.envs.split(","):
        rows.extend(bench_env(env, args))
    hw = common.machine_note()
    text = (f"{table(rows)}\n\n{hw}; jax {jax.__version__}; "
            f"{time.strftime('%Y-%m-%d')}; reprefill={args.reprefill}\n")
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
