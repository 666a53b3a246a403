"""SUPO on KeyChain: greedy success vs. working-context length L.

Methods (same architecture, same number of BC steps):
  (a) no summarization, context truncated at L: the plain model (BC on full oracle episodes)
      rolled out with SUPO's runner at ``max_summaries = 0`` — the episode ends when the next
      turn no longer fits in L tokens;
  (b) SUPO: the SUPO model (BC on the segments of oracle episodes with oracle summaries
      ``<summary> last-key <eos>``, demos at several L) rolled out with summarization at L;
  (c) oracle long context: the plain model with the whole episode in context.
Optionally a short SUPO RL phase (GRPO over segments, ``--rl_updates``) follows BC.

All evaluations run through one compiled rollout (shapes of the full episode length and the
largest summary cap) with the limits (L, max_summaries) passed as traced values.

    python -m benchmarks.supo_keychain            # ~10 min on 2 loaded CPU cores
    python -m benchmarks.supo_keychain --quick    # smoke test
Prints a markdown table (and writes it to --out if given).
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import envs
import models
from envs import vocab
from rl_agents import bc as bc_lib
from rl_agents.sampling import SamplingConfig
from rl_agents.summarization import (SupoConfig, collect_supo_demos, demo_rows, supo_rollout)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--chain_len", type=int, default=3)
    p.add_argument("--n_distractors", type=int, default=3)
    p.add_argument("--lengths", type=str, default="40,48,56",
                   help="working lengths L to evaluate (an oracle episode has 60 real tokens)")
    p.add_argument("--summary_len", type=int, default=3)
    p.add_argument("--max_summaries", type=int, default=6, help="cap in the demos / training")
    p.add_argument("--max_summaries_eval", type=int, default=8)
    p.add_argument("--demo_episodes", type=int, default=256, help="per working length (and for the plain model)")
    p.add_argument("--bc_steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--rl_updates", type=int, default=0, help="SUPO GRPO updates after BC (L = first length)")
    p.add_argument("--eval_episodes", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="")
    args = p.parse_args(argv)
    if args.quick:
        args.demo_episodes, args.bc_steps, args.eval_episodes = 32, 20, 16
        args.lengths = "40,56"
    return args


def log(msg):
    print(msg, flush=True)


def sft(model, params, arrays, key, steps, batch_size, lr):
    n = len(arrays["tokens"])
    batch_size = min(batch_size, n)
    epochs = max(1, math.ceil(steps / (n // batch_size)))
    return bc_lib.sft_train(model, params, arrays, key, epochs=epochs, batch_size=batch_size, lr=lr)


def trim(arrays, multiple=8):
    """Drop all-pad columns at the end (rows are compact), keeping a multiple of 8 tokens."""
    n = int(arrays["valid"].sum(1).max())
    n = min(arrays["valid"].shape[1], -(-n // multiple) * multiple)
    return {k: v[:, :n] for k, v in arrays.items()}


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    env = envs.make("keychain", chain_len=args.chain_len, n_distractors=args.n_distractors, value_len=2)
    lengths = [int(x) for x in args.lengths.split(",")]
    full_len = env.max_episode_tokens
    log(f"# SUPO on {env!r}: oracle episode needs {env.episode_tokens_needed} tokens (padded budget), "
        f"full context {full_len}; L = {lengths}")
    for L in lengths:
        SupoConfig(L, args.summary_len, args.max_summaries).validate(env)
    mcfg = models.ModelConfig(vocab_size=vocab.size, d_model=args.d_model, n_layers=args.n_layers,
                              n_heads=4, n_kv_heads=2, d_ff=2 * args.d_model, max_seq_len=full_len + 64,
                              attention_impl="xla")
    model = models.PolicyModel(mcfg)
    key = jax.random.PRNGKey(args.seed)
    k_init, k_demo, k_sft_plain, k_sft_supo, k_rl, k_eval = jax.random.split(key, 6)
    init = models.init_params(model, k_init)

    # ---- demos: SUPO segments at every L (padded to the largest), full plain episodes
    t = time.time()
    supo_arrays = []
    for i, L in enumerate(lengths):
        demos = collect_supo_demos(env, SupoConfig(L, args.summary_len, args.max_summaries),
                                   jax.random.fold_in(k_demo, i), args.demo_episodes)
        assert bool(demos.success.all()), "oracle demos must succeed"
        supo_arrays.append(demo_rows(demos, pad_to=max(lengths)))
    supo_arrays = {k: np.concatenate([a[k] for a in supo_arrays]) for k in supo_arrays[0]}
    plain_demos = collect_supo_demos(env, SupoConfig(full_len, args.summary_len, 0),
                                     jax.random.fold_in(k_demo, 99), args.demo_episodes * len(lengths))
    plain_arrays = trim(demo_rows(plain_demos))
    log(f"demos: {len(supo_arrays['tokens'])} SUPO segments × {supo_arrays['tokens'].shape[1]} tokens, "
        f"{len(plain_arrays['tokens'])} plain episodes × {plain_arrays['tokens'].shape[1]} tokens "
        f"({time.time() - t:.0f} s)")

    # ---- BC
    t = time.time()
    plain_params, h_plain = sft(model, init, plain_arrays, k_sft_plain, args.bc_steps, args.batch_size, args.lr)
    log(f"BC plain: sft loss {h_plain['bc/sft_loss'][0]:.3f} -> {h_plain['bc/sft_loss'][-1]:.3f} ({time.time() - t:.0f} s)")
    t = time.time()
    supo_params, h_supo = sft(model, init, supo_arrays, k_sft_supo, args.bc_steps, args.batch_size, args.lr)
    log(f"BC SUPO:  sft loss {h_supo['bc/sft_loss'][0]:.3f} -> {h_supo['bc/sft_loss'][-1]:.3f} ({time.time() - t:.0f} s)")

    bc_supo_params = supo_params
    if args.rl_updates > 0:
        t = time.time()
        supo_params = rl_phase(args, env, supo_params, k_rl, lengths[0])
        log(f"RL SUPO: {args.rl_updates} GRPO updates at L={lengths[0]} ({time.time() - t:.0f} s)")

    # ---- evaluation: one compiled rollout, traced (L, max_summaries)
    t = time.time()
    shape_cfg = SupoConfig(full_len, args.summary_len, args.max_summaries_eval)
    greedy = SamplingConfig(greedy=True)
    run = jax.jit(lambda p, k, L, m: supo_rollout(env, model, p, k, cfg=shape_cfg,
                                                  num_groups=args.eval_episodes, sampling=greedy,
                                                  limits=(L, m)))

    def evaluate(params, L, m):
        traj = run(params, k_eval, jnp.int32(L), jnp.int32(m))
        return float(traj.success.mean()), float(traj.num_summaries.mean())

    rows = []
    rows.append(("(a) no summarization, context truncated at L", "plain",
                 [evaluate(plain_params, L, 0) for L in lengths]))
    if args.rl_updates > 0:
        rows.append((f"(b0) SUPO after BC only, before RL (max_summaries_eval="
                     f"{args.max_summaries_eval})", "supo",
                     [evaluate(bc_supo_params, L, args.max_summaries_eval) for L in lengths]))
    rows.append((f"(b) SUPO{' after RL' if args.rl_updates > 0 else ''} (max_summaries_eval="
                 f"{args.max_summaries_eval})", "supo",
                 [evaluate(supo_params, L, args.max_summaries_eval) for L in lengths]))
    m_small = 1
    rows.append((f"(b') SUPO, max_summaries={m_small} at eval", "supo",
                 [evaluate(supo_params, L, m_small) for L in lengths]))
    rows.append(("(a') SUPO model without summarization", "supo",
                 [evaluate(supo_params, L, 0) for L in lengths]))
    full = evaluate(plain_params, full_len, 0)
    rows.append((f"(c) oracle long context (L={full_len})", "plain", [full] * len(lengths)))
    log(f"eval ({time.time() - t:.0f} s)")

    header = "| method | " + " | ".join(f"L={L}" for L in lengths) + " |"
    sep = "|---|" + "---|" * len(lengths)
    lines = [f"KeyChain chain_len={args.chain_len}, n_distractors={args.n_distractors}: an oracle "
             f"episode needs {env.episode_tokens_needed} tokens; greedy success over "
             f"{args.eval_episodes} episodes (mean summaries per episode in parentheses); "
             f"{args.bc_steps} BC steps per model, {args.rl_updates} RL updates; "
             f"total {time.time() - t_start:.0f} s", "", header, sep]
    for name, _, vals in rows:
        lines.append(f"| {name} | " + " | ".join(f"{s:.3f} ({m:.1f})" for s, m in vals) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return rows


def rl_phase(args, env, params, key, working_len):
    """A few SUPO (GRPO) updates from the BC policy at working length ``working_len``."""
    import ml_collections

    from experiments.configs.common import make_config
    from rl_agents.trainer import make_trainer

    c = make_config("keychain", "grpo")
    c.env.kwargs = ml_collections.ConfigDict(dict(chain_len=args.chain_len, n_distractors=args.n_distractors,
                                                  value_len=2))
    c.model.update(dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=4, n_kv_heads=2,
                        d_ff=2 * args.d_model, attention_impl="xla"))
    c.rollout.update(dict(num_groups=8, group_size=4))
    c.rl.update(dict(epochs=1, minibatches=2))
    c.optim.update(dict(lr=1e-4, warmup_steps=1))
    c.bc.episodes = 0
    c.context = ml_collections.ConfigDict(dict(mode="supo", working_len=working_len,
                                               summary_len=args.summary_len,
                                               max_summaries=args.max_summaries,
                                               max_summaries_eval=args.max_summaries_eval,
                                               overlong_mask=True))
    trainer = make_trainer(c)
    state = trainer.fresh_state(key)
    policy = jax.tree.map(jnp.copy, params)      # the update donates its state; keep the BC params
    ref = None if state.ref_params is None else jax.tree.map(jnp.copy, policy)
    state = state.replace(params={"policy": policy}, ref_params=ref,
                          opt_state=trainer.optimizer.init({"policy": policy}))
    for i in range(args.rl_updates):
        state, m = trainer.update(state)
        log(f"  rl {i + 1}: success {float(m['rollout/success_rate']):.3f} summaries "
            f"{float(m['rollout/summaries']):.2f} masked {float(m['rollout/overlong_masked']):.2f}")
    return state.params["policy"]


if __name__ == "__main__":
    main()
