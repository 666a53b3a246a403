"""Rollout throughput: KV-cached generation × env steps, exactly the training rollout path.

    python -m benchmarks.rollout_throughput                 # bench-small, B in {1, 64, 256}
    python -m benchmarks.rollout_throughput --quick         # tiny shapes (CI smoke test)
    python -m benchmarks.rollout_throughput --profile --out results.md

Model "bench-small": 4 layers, d_model 256, 8 heads, 2 KV heads, head_dim 32, d_ff 1024, vocab 64,
float32. Cases (each through ``rl_agents.rollout.run_episodes`` + ``model_policy`` under one
``jax.jit``, as in training):

* single: a 1-turn ``SyntheticTurnEnv`` with a 32-token prompt and ``action_len`` 32;
* multi: 8 turns of (16 observation tokens from the env + 16 generated); the first observation
  is the reset prompt, the KV cache carries the whole history (observations are prefilled
  chunk by chunk, nothing is re-encoded).

The env's observation after the last turn is empty (all ``<pad>``), so a row holds
``obs_len + K·action_len + (K−1)·obs_len`` real tokens. Generation never stops early: the policy
is ``NoEosPolicyModel``, a ``models.PolicyModel`` whose ``<eos>`` / ``<pad>`` logits are −1e9, so every turn
uses its whole token budget; generated tokens are nevertheless *counted* from the trajectory
(``loss_mask.sum()``), and a warning is printed if the count is not ``B·K·action_len``.

Timing: the jitted rollout is compiled and run once, then timed ``--runs`` times (≥ 3, fresh
key each run, result blocked on); the median is reported. The process CPU time of the timed runs
is recorded too: on a loaded machine the multi/single ratio of CPU seconds per token is steadier
than that of wall time. ``--kv-block w`` sets ``models.kv_cache.KV_BLOCK`` for the backend
(cache attention over the smallest multiple of w covering the filled prefix; 0: whole cache). Printed per case::

    rollout <single|multi> B=<B>: <N> generated tok/s, <M> total tok/s, <F>% of matmul peak

N = generated tokens / t, M = all real tokens (prompt + generated + observations) / t,
F = model FLOP/s / peak, with model FLOPs = Σ_rows [2·N_mm·n + 4·L·H·Dh·n(n+1)/2] (n = real
tokens of the row, N_mm = matmul parameters: everything but the embedding table, lm_head
included; see ``benchmarks.common``) and peak = 2·2048³ / t of a float32 2048² matmul timed in
the same run, right before the case (median of 3; the machine's load may drift between cases).
Work XLA does beyond this (masked cache slots, the final empty observation's prefill, logits at
prefill positions other than the last) is overhead, not counted.
``--profile`` adds a breakdown of one rollout into decode steps, sampling, env steps and
observation prefills, each timed alone as a jitted ``lax.scan`` of the same shapes (a rough
guide: see ``profile_case``).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import models
from benchmarks import common
from envs import vocab
from models import kv_cache
from envs.base import Env, TimeStep
from rl_agents.rollout import model_policy, run_episodes
from rl_agents.sampling import SamplingConfig, sample_tokens


# ---------------------------------------------------------------------------------- model
def bench_small(**overrides) -> models.ModelConfig:
    """The standard benchmark model (overridable fields for --quick)."""
    kw = dict(vocab_size=vocab.size, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
              head_dim=32, d_ff=1024, max_seq_len=512, dtype="float32", param_dtype="float32",
              attention_impl="xla")
    kw.update(overrides)
    return models.ModelConfig(**kw)


def quick_model(**overrides) -> models.ModelConfig:
    kw = dict(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
              max_seq_len=128)
    kw.update(overrides)
    return bench_small(**kw)


class NoEosPolicyModel(models.PolicyModel):
    """``models.PolicyModel`` with the ``<eos>`` and ``<pad>`` logits set to −1e9 (benchmark only;
    either token ends a turn), so sampled turns always run to ``action_len`` tokens. Same
    parameters as the plain policy."""

    def __call__(self, tokens, *args, **kwargs):
        out = super().__call__(tokens, *args, **kwargs)

        def mask(logits):
            return logits.at[..., vocab.EOS].set(-1e9).at[..., vocab.PAD].set(-1e9)

        return (mask(out[0]), out[1]) if isinstance(out, tuple) else mask(out)


# ---------------------------------------------------------------------------------- env
@struct.dataclass
class SyntheticState:
    key: jax.Array
    turn: jax.Array   # int32 []
    done: jax.Array   # bool []


class SyntheticTurnEnv(Env):
    """A fixed-length env for speed tests: every observation is ``obs_len`` uniformly random
    non-special tokens (ids 2..vocab−1) drawn from the state's key; the episode truncates after
    ``max_turns`` steps, and the observation returned by the final step is empty (all ``<pad>``).
    Rewards are 0, actions are ignored (any action is valid), no format errors."""

    name = "synthetic_turns"

    def __init__(self, obs_len: int = 16, action_len: int = 16, max_turns: int = 8):
        for f, v in (("obs_len", obs_len), ("action_len", action_len), ("max_turns", max_turns)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SyntheticTurnEnv.{f} must be a positive int, got {v!r}")
        self.obs_len, self.action_len, self.max_turns = obs_len, action_len, max_turns

    def _obs(self, key):
        return jax.random.randint(key, (self.obs_len,), 2, vocab.size, dtype=jnp.int32)

    def _timestep(self, obs, truncated):
        no = jnp.zeros((), bool)
        return TimeStep(observation=obs, reward=jnp.zeros((), jnp.float32), terminated=no,
                        truncated=truncated, info={"success": no, "format_error": no})

    def reset(self, key):
        k_obs, k_state = jax.random.split(key)
        state = SyntheticState(key=k_state, turn=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool))
        return state, self._timestep(self._obs(k_obs), jnp.zeros((), bool))

    def step(self, state, action):
        del action
        key, k_obs = jax.random.split(state.key)
        turn = state.turn + 1
        truncated = turn >= self.max_turns
        obs = jnp.where(truncated, jnp.full((self.obs_len,), vocab.PAD, jnp.int32), self._obs(k_obs))
        new = SyntheticState(key=key, turn=turn, done=truncated)
        # a step on a finished episode is a no-op (reward 0, done kept, empty observation)
        new = jax.tree.map(lambda a, b: jnp.where(state.done, a, b), state, new)
        obs = jnp.where(state.done, vocab.PAD, obs)
        return new, self._timestep(obs, truncated | state.done)

    def oracle_action(self, state, key):
        toks = jax.random.randint(key, (self.action_len,), 2, vocab.size, dtype=jnp.int32)
        return toks.at[-1].set(vocab.EOS)

    def render(self, state):
        return f"synthetic turn {int(state.turn)}/{self.max_turns}"


def case_envs(quick: bool) -> dict[str, SyntheticTurnEnv]:
    if quick:
        return {"single": SyntheticTurnEnv(8, 8, 1), "multi": SyntheticTurnEnv(4, 4, 3)}
    return {"single": SyntheticTurnEnv(32, 32, 1), "multi": SyntheticTurnEnv(16, 16, 8)}


# ---------------------------------------------------------------------------------- timing
def make_rollout_fn(env: Env, model, sampling: SamplingConfig, batch: int):
    """jit((params, key) -> Trajectory) of ``batch`` episodes, as the trainer runs it."""
    def fn(params, key):
        return run_episodes(env, model_policy(model, params, env, sampling), key, num_groups=batch)
    return jax.jit(fn)


def measure_case(kind: str, env: Env, model, params, cfg, batch: int, runs: int, peak: float,
                 n_mm: int) -> dict[str, Any]:
    """Compile, warm up, time ``runs`` rollouts; throughput and %-of-peak (see module doc)."""
    fn = make_rollout_fn(env, model, SamplingConfig(temperature=1.0), batch)
    key = jax.random.PRNGKey(1)
    common.block(fn(params, key))                               # compile + first run
    trajs = []
    keys = common.block([jax.random.fold_in(key, i + 1) for i in range(runs)])  # outside timing

    def one(i):
        traj = fn(params, keys[i])
        trajs.append(traj)
        return traj

    cpu0 = time.process_time()
    t = common.median(common.time_calls(one, runs))
    cpu_s = (time.process_time() - cpu0) / runs
    gen = [int(tr.loss_mask.sum()) for tr in trajs]
    lengths = [np.asarray(tr.valid.sum(-1)) for tr in trajs]
    expected = batch * env.max_turns * env.action_len
    if min(gen) != expected:
        warnings.warn(f"rollout {kind} B={batch}: {min(gen)} generated tokens, expected {expected} "
                      "(generation stopped early); reporting the tokens actually generated")
    n_gen = common.median(gen)
    n_total = common.median([float(x.sum()) for x in lengths])
    flops = common.median([common.forward_flops(cfg, n_mm, x) for x in lengths])
    return dict(kind=kind, batch=batch, seconds=t, cpu_seconds=cpu_s, gen=n_gen, total=n_total,
                gen_tps=n_gen / t, total_tps=n_total / t,
                pct_peak=100.0 * flops / t / peak, flops=flops)


def format_line(r: dict[str, Any]) -> str:
    return (f"rollout {r['kind']} B={r['batch']}: {r['gen_tps']:.0f} generated tok/s, "
            f"{r['total_tps']:.0f} total tok/s, {r['pct_peak']:.1f}% of matmul peak")


def profile_case(kind: str, env: Env, model, params, cfg, batch: int, runs: int) -> dict[str, float]:
    """Seconds per rollout spent in each part, each part timed alone as a jitted ``lax.scan``
    with the rollout's shapes: K·A decode steps over a cache of the rollout's size, K·A sampling
    draws, K env steps (vmapped), K observation prefills, the prompt prefill; and the rollout.
    ``other`` = rollout − Σ parts (trajectory assembly, masking, hashing, loop overhead). It can
    be negative: parts timed alone do work that XLA removes from the fused rollout (in a 1-turn
    scan the last observation's prefill is dead code and is eliminated)."""
    k_turns, a, o = env.max_turns, env.action_len, env.obs_len
    max_len = env.max_episode_tokens
    sampling = SamplingConfig(temperature=1.0)
    key = jax.random.PRNGKey(2)
    prompt = jax.random.randint(key, (batch, o), 2, vocab.size, dtype=jnp.int32)

    @jax.jit
    def filled_cache(params, prompt, cache):
        # the empty cache is an argument, not built inside: a constant cache makes XLA
        # constant-fold the masked attention over it (minutes of compile time at B=256)
        _, cache = models.prefill(model, params, prompt, cache)
        return cache

    @jax.jit
    def decode_only(params, cache):
        def body(c, i):
            tok = jnp.full((batch,), 2 + i % (vocab.size - 2), jnp.int32)
            logits, c = models.decode_step(model, params, tok, c)
            return c, logits[:, 0]
        return jax.lax.scan(body, cache, jnp.arange(k_turns * a))

    @jax.jit
    def sample_only(logits, key):
        def body(c, k):
            tok, lp = sample_tokens(logits + c[:, None], k, sampling)
            return c + lp, tok
        return jax.lax.scan(body, jnp.zeros((batch,), jnp.float32),
                            jax.random.split(key, k_turns * a))

    @jax.jit
    def env_only(key):
        state, _ = jax.vmap(env.reset)(jax.random.split(key, batch))
        act = jnp.full((batch, a), 2, jnp.int32)

        def body(s, _):
            s, ts = jax.vmap(env.step)(s, act)
            return s, ts.observation
        return jax.lax.scan(body, state, None, length=k_turns)

    @jax.jit
    def prefill_only(params, cache, obs):
        def body(c, _):
            logits, c = models.prefill(model, params, obs, c)
            return c, logits[:, -1]
        return jax.lax.scan(body, cache, None, length=k_turns)

    @jax.jit
    def prompt_only(params, prompt, cache):
        return models.prefill(model, params, prompt, cache)

    rollout_fn = make_rollout_fn(env, model, sampling, batch)
    cache = filled_cache(params, prompt, models.init_cache(cfg, batch, max_len))
    empty = models.init_cache(cfg, batch, max_len)
    obs = jnp.roll(prompt, 1, axis=1)
    logits = jax.random.normal(key, (batch, cfg.vocab_size))
    parts = {
        "rollout": lambda i: rollout_fn(params, jax.random.fold_in(key, i)),
        "decode": lambda i: decode_only(params, cache),
        "sample": lambda i: sample_only(logits, jax.random.fold_in(key, i)),
        "env": lambda i: env_only(jax.random.fold_in(key, i)),
        "prefill_obs": lambda i: prefill_only(params, cache, obs),
        "prefill_prompt": lambda i: prompt_only(params, prompt, empty),
    }
    out = {}
    for name, f in parts.items():
        common.block(f(0))
        out[name] = common.median(common.time_calls(f, runs))
    out["other"] = out["rollout"] - sum(v for k, v in out.items() if k != "rollout")
    return out


def matmul_shapes(params, cfg) -> list[tuple[str, int, int]]:
    """(name, K, N) of every matmul weight applied per token: the ``kernel`` leaves outside the
    embedding table as [K, N] (``o_proj`` contracts its first two dims, the others their
    first), plus the tied embedding as the output projection when ``cfg.tie_embeddings``;
    norms and biases are skipped."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[-1] != "kernel" or any("embed_tokens" in n for n in names):
            continue
        n_in = 2 if "o_proj" in names else 1
        k = int(np.prod(leaf.shape[:n_in]))
        out.append(("/".join(names), k, int(np.prod(leaf.shape[n_in:]))))
    if getattr(cfg, "tie_embeddings", False):
        out.append(("embed_tokens (tied output projection)", cfg.d_model, cfg.vocab_size))
    if not out:
        raise ValueError("matmul_shapes: no kernel leaves found in params")
    return out


def roofline_case(env: Env, params, cfg, batch: int, runs: int) -> dict[str, float]:
    """Matmul-only ceiling of a rollout: the seconds its weight matmuls take alone at the
    rollout's shapes (prompt prefill over B·obs_len rows, K·A decode steps over B rows, K−1
    observation prefills over B·obs_len rows), and the generated tok/s that time would allow.
    Attention, sampling, env steps and everything else are left out, so a rollout can only be
    slower than this ceiling."""
    shapes = matmul_shapes(params, cfg)
    k_turns, a, o = env.max_turns, env.action_len, env.obs_len
    t_decode = common.matmuls_seconds([(batch, k, n) for _, k, n in shapes],
                                      max(k_turns * a, 16), runs, cfg.compute_dtype)
    t_prefill = common.matmuls_seconds([(batch * o, k, n) for _, k, n in shapes],
                                       max(k_turns, 16), runs, cfg.compute_dtype)
    total = k_turns * t_prefill + k_turns * a * t_decode
    flops_decode = 2.0 * batch * sum(k * n for _, k, n in shapes)
    return dict(decode_step_s=t_decode, prefill_s=t_prefill, rollout_s=total,
                ceiling_gen_tps=batch * k_turns * a / total,
                decode_gflops=flops_decode / t_decode / 1e9,
                prefill_gflops=flops_decode * o / t_prefill / 1e9)


def format_roofline(kind: str, batch: int, r: dict[str, float], measured: dict[str, Any]) -> str:
    return (f"roofline {kind} B={batch}: weight matmuls alone {r['rollout_s'] * 1e3:.1f} ms per "
            f"rollout (decode step {r['decode_step_s'] * 1e3:.2f} ms at {r['decode_gflops']:.0f} "
            f"GFLOP/s, prefill {r['prefill_s'] * 1e3:.2f} ms at {r['prefill_gflops']:.0f} GFLOP/s) "
            f"-> ceiling {r['ceiling_gen_tps']:.0f} generated tok/s; measured "
            f"{measured['gen_tps']:.0f} = {100 * measured['gen_tps'] / r['ceiling_gen_tps']:.0f}% "
            f"of the ceiling")


def format_profile(kind: str, batch: int, p: dict[str, float]) -> str:
    total = p["rollout"]
    parts = ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)"
                      for k, v in p.items() if k != "rollout")
    return f"profile {kind} B={batch}: rollout {total * 1e3:.1f} ms = {parts}"


# ---------------------------------------------------------------------------------- main
def cpu_ratio(m: dict[str, Any], s: dict[str, Any], tokens: str) -> float:
    """(CPU seconds per token of case m) / (that of case s); tokens = "gen" or "total"."""
    return (m["cpu_seconds"] / m[tokens]) / (s["cpu_seconds"] / s[tokens])


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes (smoke test)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes (default 1 64 256; --quick: 2)")
    ap.add_argument("--cases", nargs="+", default=["single", "multi"], choices=["single", "multi"])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per case (median; >= 3)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model compute dtype (params stay float32)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a decode / sample / env / prefill breakdown per case")
    ap.add_argument("--roofline", action="store_true",
                    help="also time the rollout's weight matmuls alone at its shapes: a "
                         "matmul-only ceiling on generated tok/s")
    ap.add_argument("--kv-block", type=int, default=None,
                    help="cache-length bucket width of decode / prefill attention for this "
                         "backend (models.kv_cache.KV_BLOCK; 0: whole cache; default: as set)")
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args(argv)
    if args.runs < 3:
        ap.error(f"--runs={args.runs}: need at least 3 timed runs for a median")
    if args.batches is not None and any(b < 1 for b in args.batches):
        ap.error(f"--batches={args.batches}: batch sizes must be >= 1")
    if args.kv_block is not None and args.kv_block < 0:
        ap.error(f"--kv-block={args.kv_block} must be >= 0")
    saved_blocks = dict(kv_cache.KV_BLOCK)
    if args.kv_block is not None:
        kv_cache.KV_BLOCK[jax.default_backend()] = args.kv_block
    try:
        return _run(args)
    finally:
        kv_cache.KV_BLOCK.clear()
        kv_cache.KV_BLOCK.update(saved_blocks)


def _run(args) -> list[dict[str, Any]]:
    batches = args.batches if args.batches is not None else ([2] if args.quick else [1, 64, 256])

    cfg = quick_model(dtype=args.dtype) if args.quick else bench_small(dtype=args.dtype)
    model = NoEosPolicyModel(cfg)
    params = jax.jit(lambda k: models.init_params(model, k))(jax.random.PRNGKey(0))
    n_mm = common.matmul_params(params, cfg)
    n_peak = 256 if args.quick else 2048
    peak = common.matmul_peak(n_peak, runs=5)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32 {n_peak}x{n_peak}, median of 5); "
          f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, {n_mm} matmul params, {args.dtype}; "
          f"{common.machine_note()}", flush=True)

    envs_ = case_envs(args.quick)
    results, profiles, roofs = [], [], []
    for kind in args.cases:
        env = envs_[kind]
        for b in batches:
            # the peak is re-measured next to each case: on a shared machine the load drifts
            case_peak = common.matmul_peak(n_peak, runs=3)
            r = measure_case(kind, env, model, params, cfg, b, args.runs, case_peak, n_mm)
            r["peak"] = case_peak
            results.append(r)
            print(format_line(r), flush=True)
            if args.profile:
                p = profile_case(kind, env, model, params, cfg, b, args.runs)
                profiles.append((kind, b, p))
                print(format_profile(kind, b, p), flush=True)
            if args.roofline:
                rf = roofline_case(env, params, cfg, b, max(args.runs, 5))
                roofs.append((kind, b, rf, r))
                print(format_roofline(kind, b, rf, r), flush=True)
    by = {(r["kind"], r["batch"]): r for r in results}
    for b in batches:
        if ("single", b) in by and ("multi", b) in by:
            s, m = by[("single", b)], by[("multi", b)]
            print(f"rollout multi/single B={b}: {s['total_tps'] / m['total_tps']:.2f}x time per "
                  f"total token, {s['gen_tps'] / m['gen_tps']:.2f}x time per generated token; "
                  f"process CPU time: {cpu_ratio(m, s, 'total'):.2f}x per total token, "
                  f"{cpu_ratio(m, s, 'gen'):.2f}x per generated token", flush=True)

    notes = [f"matmul peak {peak / 1e9:.1f} GFLOP/s at start (float32 {n_peak}²); re-measured "
             "before each case (column 'peak') and used for that case's %",
             f"model: {cfg.n_layers}L d{cfg.d_model} h{cfg.n_heads}/{cfg.n_kv_heads} "
             f"dh{cfg.head_dim} ff{cfg.d_ff} V{cfg.vocab_size} {args.dtype}; {n_mm} matmul params",
             f"cache attention bucket width (models.kv_cache.KV_BLOCK) on {jax.default_backend()}: "
             f"{kv_cache.default_kv_block()}",
             common.machine_note(),
             "timings vary with machine load (load avg above): compare rows of one run"]
    rows = [[r["kind"], r["batch"], f"{r['gen_tps']:.0f}", f"{r['total_tps']:.0f}",
             f"{r['pct_peak']:.1f}", f"{r['peak'] / 1e9:.1f}", f"{r['seconds'] * 1e3:.1f}"]
            for r in results]
    common.append_markdown(args.out, "rollout throughput" + (" (quick)" if args.quick else ""),
                           ["case", "B", "generated tok/s", "total tok/s", "% matmul peak",
                            "peak GFLOP/s", "median ms / rollout"], rows, notes)
    if profiles:
        keys = [k for k in profiles[0][2] if k != "rollout"]
        prow = [[k, b, f"{p['rollout'] * 1e3:.1f}"] + [f"{p[x] * 1e3:.1f}" for x in keys]
                for k, b, p in profiles]
        common.append_markdown(args.out, "rollout profile (ms per rollout)",
                               ["case", "B", "rollout"] + keys, prow)
    if roofs:
        rrow = [[k, b, f"{rf['decode_step_s'] * 1e3:.2f}", f"{rf['decode_gflops']:.0f}",
                 f"{rf['prefill_s'] * 1e3:.2f}", f"{rf['prefill_gflops']:.0f}",
                 f"{rf['ceiling_gen_tps']:.0f}", f"{r['gen_tps']:.0f}",
                 f"{100 * r['gen_tps'] / rf['ceiling_gen_tps']:.0f}%"] for k, b, rf, r in roofs]
        common.append_markdown(args.out, "rollout matmul-only ceiling (weight matmuls alone at "
                               "the rollout's shapes)",
                               ["case", "B", "decode-step matmuls ms", "GFLOP/s",
                                "obs/prompt prefill matmuls ms", "GFLOP/s",
                                "ceiling generated tok/s", "measured", "measured / ceiling"], rrow)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
