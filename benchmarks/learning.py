"""Learning benchmark: task × algorithm → greedy success after a noisy-BC warm start and after RL.

    python -m benchmarks.learning --runs guess_number:grpo,guess_number:ppo --minutes 10
    python -m benchmarks.learning --quick          # a smoke run (tiny budget)

For each run: build the config (``experiments/configs/<task>_<algo>.py`` when it exists, else
the published recipe ``recipe(task, algo)``), BC warm start on ε-noisy oracle demos, evaluate greedy success
(the BC start), then RL updates until the wall-clock budget or ``total_updates`` runs out,
evaluating every ``--eval_every`` updates on ``--eval_episodes`` fixed seeds, and at the end the
final policy on ``--final_episodes`` fresh seeds (not the ones ``--stop_at`` read). Writes the
curves to ``<--results_dir>/learning_<task>_<algo>.json`` (default ``benchmarks/results``) and a
PNG, and prints a markdown table (task, algorithm, BC success, final success on the curve's seeds
and on fresh seeds, best success, wall time, env steps, updates), with the hardware named.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from experiments.configs import apply_overrides, parse_set_args, task_config
from rl_agents.trainer import make_trainer

RESULTS = os.path.join(os.path.dirname(__file__), "results")


# per-update metrics whose mean over the run is reported (those the run logs)
MEAN_METRICS = ("mismatch/masked_frac", "mismatch/weight_mean", "mismatch/clipped_frac",
                "continuous/staleness_mean", "continuous/groups_completed",
                "continuous/groups_dropped_stale", "continuous/turn_steps",
                "update/empty_step_frac")


load_config = task_config      # the config file of task_algo if there is one, else the recipe


def run_one(task: str, algo: str, minutes: float, eval_every: int, eval_episodes: int,
            overrides: dict, seed: int = 0, stop_at: float | None = None,
            final_episodes: int = 0, max_updates: int | None = None) -> dict:
    config = load_config(task, algo)
    config.seed = seed
    apply_overrides(config, overrides)
    t0 = time.time()
    trainer = make_trainer(config)
    state = trainer.init(jax.random.PRNGKey(config.seed))
    bc_time = time.time() - t0
    ekey = jax.random.PRNGKey(1234)

    def evaluate(st, key=ekey, episodes=eval_episodes):
        m, _ = trainer.evaluate(st.params["policy"], key, episodes=episodes, greedy=True)
        return float(m["eval/success_rate"])

    curve = [{"update": 0, "wall_s": bc_time, "env_steps": 0, "success": evaluate(state)}]
    print(f"[{task}/{algo}] BC start: greedy success {curve[0]['success']:.3f} ({bc_time:.0f} s)",
          file=sys.stderr, flush=True)
    env_steps = 0
    mismatch = []                     # mismatch/kl of every update (sampler vs trainer)
    means: dict = {}                  # MEAN_METRICS the run logs, every update
    deadline = t0 + minutes * 60
    update = 0
    last = config.total_updates if max_updates is None else min(max_updates, config.total_updates)
    while update < last and time.time() < deadline:
        state, metrics = trainer.update(state)
        update += 1
        mismatch.append(float(metrics["mismatch/kl"]))
        for k in MEAN_METRICS:
            if k in metrics:
                means.setdefault(k, []).append(float(metrics[k]))
        env_steps += int(round(float(metrics["rollout/turns"]) * trainer.batch_size
                               * (1 if trainer.algorithm.dynamic_sampling is False
                                  else config.rl.oversample)))
        if update % eval_every == 0:
            curve.append({"update": update, "wall_s": time.time() - t0, "env_steps": env_steps,
                          "success": evaluate(state),
                          "rollout_success": float(metrics["rollout/success_rate"])})
            print(f"[{task}/{algo}] update {update}: greedy success {curve[-1]['success']:.3f} "
                  f"(rollout {curve[-1]['rollout_success']:.3f}, {curve[-1]['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            if stop_at is not None and curve[-1]["success"] >= stop_at:
                break
    if curve[-1]["update"] != update:
        curve.append({"update": update, "wall_s": time.time() - t0, "env_steps": env_steps,
                      "success": evaluate(state)})
    # the final policy on fresh episodes (another key than the curve's, which stop_at read)
    fresh = (evaluate(state, jax.random.PRNGKey(98765), final_episodes) if final_episodes > 0
             else None)
    return {"task": task, "algorithm": algo, "bc_success": curve[0]["success"],
            "final_success": curve[-1]["success"], "final_fresh_success": fresh,
            "final_fresh_episodes": final_episodes, "best_success": max(c["success"] for c in curve),
            "wall_s": curve[-1]["wall_s"], "env_steps": env_steps, "updates": update,
            "bc_epsilon": float(config.bc.epsilon), "stop_at": stop_at,
            "seconds_per_update": (curve[-1]["wall_s"] - bc_time) / max(update, 1),
            "mismatch_kl_mean": float(np.mean(mismatch)) if mismatch else None,
            "metric_means": {k: float(np.mean(v)) for k, v in means.items()}, "curve": curve}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = result["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p["wall_s"] / 60 for p in c], [p["success"] for p in c], marker="o")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("greedy success")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{result['task']} / {result['algorithm']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[dict]) -> str:
    lines = [f"Hardware: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable CPU cores "
             f"(of {os.cpu_count()}), "
             f"jax {jax.__version__} ({jax.default_backend()})", "",
             "| task | algorithm | BC start (ε) | final greedy success | final, fresh episodes "
             "| best | wall time | env steps | updates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fresh = ("–" if r.get("final_fresh_success") is None
                 else f"{r['final_fresh_success']:.3f} (n={r['final_fresh_episodes']:,})")
        lines.append(f"| {r['task']} | {r['algorithm']} | {r['bc_success']:.3f} (ε={r['bc_epsilon']}) | "
                     f"{r['final_success']:.3f} | {fresh} | {r['best_success']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} min | {r['env_steps']:,} | {r['updates']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="guess_number:grpo,guess_number:ppo")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget per run")
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--eval_episodes", type=int, default=256, help="greedy episodes per curve point")
    ap.add_argument("--final_episodes", type=int, default=1024,
                    help="greedy episodes (fresh seeds) for the final policy's success; 0: off")
    ap.add_argument("--results_dir", default=RESULTS, help="where the JSON curves and PNGs go")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--stop_at", type=float, default=None,
                    help="stop a run once its greedy success reaches this value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_updates", type=int, default=None,
                    help="stop after this many updates (the lr schedule still spans total_updates): "
                         "the first part of a run, e.g. to compare settings early")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    overrides = parse_set_args(args.set)
    if args.quick:
        overrides.update({"bc.episodes": "128", "bc.epochs": "1", "total_updates": "2",
                          "model.d_model": "32", "model.d_ff": "64", "model.n_layers": "1"})
        args.eval_every, args.eval_episodes, args.final_episodes = 1, 16, 16
    if args.max_updates is not None and args.max_updates < 1:
        raise ValueError(f"--max_updates must be >= 1, got {args.max_updates}")
    if args.eval_every < 1 or args.eval_episodes < 1 or args.final_episodes < 0:
        raise ValueError(f"--eval_every and --eval_episodes must be >= 1 and --final_episodes >= 0, "
                         f"got {args.eval_every}, {args.eval_episodes}, {args.final_episodes}")
    specs = []
    for spec in args.runs.split(","):
        task, sep, algo = spec.partition(":")
        if not sep or not task or not algo:
            raise ValueError(f"--runs entry {spec!r} is not TASK:ALGORITHM")
        apply_overrides(load_config(task, algo), overrides)     # bad --set: fail before any run
        specs.append((task, algo))
    os.makedirs(args.results_dir, exist_ok=True)
    results = []
    for task, algo in specs:
        r = run_one(task, algo, args.minutes, args.eval_every, args.eval_episodes, overrides,
                    seed=args.seed, stop_at=args.stop_at, final_episodes=args.final_episodes,
                    max_updates=args.max_updates)
        results.append(r)
        if not args.quick:
            with open(os.path.join(args.results_dir, f"learning_{task}_{algo}.json"), "w") as f:
                json.dump(r, f, indent=1)
            plot(r, os.path.join(args.results_dir, f"learning_{task}_{algo}.png"))
    text = table(results)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:                  # bad arguments: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
