"""Train-step throughput: one jitted RL update (forward + backward + AdamW) of policy and critic.

    python -m benchmarks.train_step                     # d_model 512, 8 layers, T 512, B 16
    python -m benchmarks.train_step --quick             # tiny shapes (CI smoke test)
    python -m benchmarks.train_step --remat --dtype bfloat16 --scan-layers --out results.md
    python -m benchmarks.train_step --compile-depth     # compile seconds, 4 vs 32 layers, ± scan

The step is the trainer's minibatch step built from ``rl_agents.losses`` on random tokens:

    logπ = chunked_logprobs_and_entropy(policy_hidden(tokens), tokens, chunk)[0]   (--logprob-chunk
           c > 0, default 128 as in the trainer; 0: sequence_logprobs(PolicyModel(tokens), tokens))
    loss = ppo_policy_loss(logπ, logπ_old, A, mask) + β·kl_loss(logπ, logπ_ref, mask, "k3")
           + c_v·value_loss(ValueModel(tokens), V_old, R, mask, clip 0.2)

then ``optax.adamw`` on {policy, value} params, under ``jax.jit(step, donate_argnums=0)`` (params
and optimizer state are donated and updated in place). The reference log-probs are an input, as in
the trainer (computed once per update, outside the gradient). Compiled and run once, then timed
``--runs`` times; median. Printed::

    train_step: <N> tok/s, <F>% MFU

N = B·T / t; MFU = (6·(N_policy + N_value)·B·T + 3·attention) / t / peak, with N_* the matmul
parameters (everything but the embedding table; ``benchmarks.common.matmul_params``), attention =
forward causal attention FLOPs ``4·L·H·Dh·T(T+1)/2`` per row per model, and peak the float32
2048² matmul FLOP/s timed in the same run. Model shape: d_model 512, 8 layers, 8 heads, 2 KV
heads, head_dim 64, d_ff 2048, vocab 64 (the ``--quick`` shape is tiny).

``--compile-depth``: instead of timing steps, trace + compile the same step (B 2, T 64 unless
given) for the "bench-small" width (d_model 256, 8 heads, 2 KV heads, head_dim 32, d_ff 1024) at
4 and 32 layers (``--depths``), with ``scan_layers`` off and on, and print one line each::

    compile_depth: layers=<L> scan_layers=<bool>: trace+lower <a> s, compile <b> s, total <c> s

With ``nn.scan`` over layers the program holds one layer body, so the total should stay roughly
flat in depth; unrolled, it grows with the number of layers.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

import models
from benchmarks import common
from envs import vocab
from rl_agents import losses


@struct.dataclass
class StepState:
    params: Any      # {"policy": ..., "value": ...}
    opt_state: Any


def model_config(quick: bool, seq_len: int, **overrides) -> models.ModelConfig:
    if quick:
        kw = dict(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    else:
        kw = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=2048)
    kw.update(vocab_size=vocab.size, max_seq_len=seq_len, attention_impl="xla")
    kw.update(overrides)
    return models.ModelConfig(**kw)


def random_batch(key, batch: int, seq_len: int, vocab_size: int) -> dict[str, jax.Array]:
    """Random tokens and RL targets of a plausible scale; the first T/8 tokens are the prompt
    (no loss), the rest are agent tokens."""
    ks = jax.random.split(key, 6)
    tokens = jax.random.randint(ks[0], (batch, seq_len), 2, vocab_size, dtype=jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(seq_len) >= max(seq_len // 8, 1), (batch, seq_len))
    base = -jnp.log(jnp.float32(vocab_size))
    return dict(
        tokens=tokens, valid=jnp.ones((batch, seq_len), bool), loss_mask=mask,
        old_logp=base + 0.1 * jax.random.normal(ks[1], (batch, seq_len)),
        ref_logp=base + 0.1 * jax.random.normal(ks[2], (batch, seq_len)),
        advantages=jax.random.normal(ks[3], (batch, seq_len)),
        returns=jax.random.normal(ks[4], (batch, seq_len)),
        old_values=0.1 * jax.random.normal(ks[5], (batch, seq_len)))


def make_step(policy, value_model, optimizer, kl_coef: float = 0.05, value_coef: float = 0.5,
              logprob_chunk: int = 128):
    """(StepState, batch) -> (StepState, loss), un-jitted (the caller jits with donation).
    ``logprob_chunk`` > 0: log-probs from hidden states over T-chunks (no [B,T,V] logits)."""
    def loss_fn(params, b):
        seg = b["valid"].astype(jnp.int32)
        if logprob_chunk > 0:
            hidden, unembed = models.policy_hidden(policy, params["policy"], b["tokens"],
                                                   segment_ids=seg)
            logp, _ = losses.chunked_logprobs_and_entropy(hidden, unembed, b["tokens"], 1.0,
                                                          logprob_chunk)
        else:
            logits = policy.apply({"params": params["policy"]}, b["tokens"], segment_ids=seg)
            logp = losses.sequence_logprobs(logits, b["tokens"])
        pg, _ = losses.ppo_policy_loss(logp, b["old_logp"], b["advantages"], b["loss_mask"])
        kl = losses.kl_loss(logp, b["ref_logp"], b["loss_mask"], "k3")
        v = value_model.apply({"params": params["value"]}, b["tokens"], segment_ids=seg)
        vl = losses.value_loss(v, b["old_values"], b["returns"], b["loss_mask"], clip_eps=0.2)
        return pg + kl_coef * kl + value_coef * vl

    def step(state: StepState, b):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, b)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return StepState(optax.apply_updates(state.params, updates), opt_state), loss

    return step


def roofline(params, cfg, tokens: int, peak: float, runs: int) -> dict:
    """Time every weight matmul of the step alone: per weight [K, N] of policy and value, the
    forward ``[BT, K]@[K, N]``, the input gradient ``[BT, N]@[N, K]`` and the weight gradient
    ``[K, BT]@[BT, N]`` (``benchmarks.common.matmuls_seconds``). Returns their seconds, their
    FLOP/s and the MFU the step would have if it took only that time."""
    from benchmarks.rollout_throughput import matmul_shapes
    shapes = matmul_shapes(params["policy"], cfg) + matmul_shapes(params["value"], cfg)
    triples = []
    for _, k, n in shapes:
        triples += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]
    t = common.matmuls_seconds(triples, 1, runs, cfg.compute_dtype)
    mm_flops = 2.0 * sum(m * k * n for m, k, n in triples)
    return dict(matmul_s=t, matmul_gflops=mm_flops / t / 1e9,
                mfu_ceiling=100.0 * mm_flops / t / peak)


def step_flops(cfg, n_mm_total: int, batch: int, seq_len: int, n_models: int = 2) -> float:
    """6·N·B·T + 3·(forward causal attention of ``n_models`` trunks)."""
    attn = float(common.causal_attention_flops(cfg, seq_len)) * batch * n_models
    return 6.0 * n_mm_total * batch * seq_len + 3.0 * attn


def make_init(cfg, policy, value_model, optimizer, batch: int, seq_len: int):
    """(k_policy, k_value, k_batch) -> (StepState with the critic initialised from the policy,
    random batch), un-jitted (run it under ``jax.jit`` or ``jax.eval_shape``)."""
    def init(k_pol, k_val, k_batch):
        pol = models.init_params(policy, k_pol)
        params = {"policy": pol, "value": models.init_value_from_policy(
            pol, models.init_params(value_model, k_val))}
        return (StepState(params, optimizer.init(params)),
                random_batch(k_batch, batch, seq_len, cfg.vocab_size))
    return init


def compile_seconds(cfg: models.ModelConfig, batch: int, seq_len: int,
                    logprob_chunk: int) -> tuple[float, float]:
    """(trace + lower seconds, XLA compile seconds) of the jitted train step for ``cfg``; params
    and batch are abstract (``jax.eval_shape``), nothing is run."""
    policy, value_model = models.PolicyModel(cfg), models.ValueModel(cfg)
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    init = make_init(cfg, policy, value_model, optimizer, batch, seq_len)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    state, b = jax.eval_shape(init, *keys)
    step = jax.jit(make_step(policy, value_model, optimizer, logprob_chunk=logprob_chunk),
                   donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, b)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def compile_depth(depths, batch: int, seq_len: int, dtype: str, logprob_chunk: int,
                  out: str | None) -> list[dict[str, Any]]:
    """Compile time of the train step at each depth, scan_layers off / on (bench-small width)."""
    results = []
    for scan in (False, True):
        for n_layers in depths:
            cfg = model_config(False, seq_len, d_model=256, n_layers=n_layers, n_heads=8,
                               n_kv_heads=2, head_dim=32, d_ff=1024, dtype=dtype,
                               scan_layers=scan)
            lower_s, comp_s = compile_seconds(cfg, batch, seq_len, logprob_chunk)
            r = dict(layers=n_layers, scan_layers=scan, lower_s=lower_s, compile_s=comp_s,
                     total_s=lower_s + comp_s)
            results.append(r)
            print(f"compile_depth: layers={n_layers} scan_layers={scan}: trace+lower "
                  f"{lower_s:.2f} s, compile {comp_s:.2f} s, total {r['total_s']:.2f} s", flush=True)
    common.append_markdown(
        out, "train step compile time vs depth",
        ["layers", "scan_layers", "trace+lower s", "compile s", "total s"],
        [[r["layers"], r["scan_layers"], f"{r['lower_s']:.2f}", f"{r['compile_s']:.2f}",
          f"{r['total_s']:.2f}"] for r in results],
        [f"bench-small width (d_model 256, 8/2 heads, head_dim 32, d_ff 1024), B={batch} "
         f"T={seq_len} {dtype}, policy + value, forward + backward + AdamW, "
         f"logprob_chunk={logprob_chunk}", common.machine_note(),
         "timings vary with machine load (load avg above): compare rows of one run"])
    return results


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes (smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="rows (default 16; --quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="T (default 512; --quick 32)")
    ap.add_argument("--runs", type=int, default=3, help="timed steps (median; >= 3)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (params and optimizer stay float32)")
    ap.add_argument("--remat", action="store_true", help="ModelConfig.remat (recompute layers)")
    ap.add_argument("--scan-layers", action="store_true", help="ModelConfig.scan_layers")
    ap.add_argument("--logprob-chunk", type=int, default=128,
                    help="T-chunk of the log-prob computation (0: full [B,T,V] logits)")
    ap.add_argument("--compile-depth", "--compile_depth", action="store_true",
                    help="print train-step compile seconds at --depths layers, scan_layers off/on")
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 32],
                    help="layer counts for --compile-depth (default 4 32)")
    ap.add_argument("--roofline", action="store_true",
                    help="also time the step's weight matmuls alone (forward, input and weight "
                         "gradients at B·T rows): the share of the step they take")
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args(argv)
    small = args.quick or args.compile_depth
    batch = args.batch if args.batch is not None else (2 if small else 16)
    seq_len = args.seq_len if args.seq_len is not None else (
        32 if args.quick else 64 if args.compile_depth else 512)
    if batch < 1 or seq_len < 2:
        ap.error(f"--batch={batch} must be >= 1 and --seq-len={seq_len} >= 2")
    if args.runs < 3:
        ap.error(f"--runs={args.runs}: need at least 3 timed runs for a median")
    if args.logprob_chunk < 0:
        ap.error(f"--logprob-chunk={args.logprob_chunk} must be >= 0")
    if any(d < 1 for d in args.depths):
        ap.error(f"--depths={args.depths}: layer counts must be >= 1")
    if args.compile_depth:
        return {"compile_depth": compile_depth(args.depths, batch, seq_len, args.dtype,
                                               args.logprob_chunk, args.out)}

    cfg = model_config(args.quick, seq_len, dtype=args.dtype, remat=args.remat,
                       scan_layers=args.scan_layers)
    policy, value_model = models.PolicyModel(cfg), models.ValueModel(cfg)
    k_pol, k_val, k_batch = jax.random.split(jax.random.PRNGKey(0), 3)
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    init = jax.jit(make_init(cfg, policy, value_model, optimizer, batch, seq_len))
    state, b = init(k_pol, k_val, k_batch)
    params = state.params
    n_mm = common.matmul_params(params["policy"], cfg) + common.matmul_params(params["value"], cfg)

    n_peak = 256 if args.quick else 2048
    peak = common.matmul_peak(n_peak, runs=5)
    step = jax.jit(make_step(policy, value_model, optimizer, logprob_chunk=args.logprob_chunk),
                   donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_mb = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20 if mem is not None else float("nan")
    state, loss = compiled(state, b)
    common.block(loss)
    holder = [state]

    def one(i):
        holder[0], l = compiled(holder[0], b)
        return l

    t = common.median(common.time_calls(one, args.runs))
    tokens = batch * seq_len
    flops = step_flops(cfg, n_mm, batch, seq_len)
    r = dict(tok_s=tokens / t, mfu=100.0 * flops / t / peak, seconds=t, compile_s=compile_s,
             temp_mb=temp_mb, peak=peak, n_mm=n_mm, flops=flops)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32 {n_peak}x{n_peak}); model: "
          f"{cfg.n_layers} layers, d_model {cfg.d_model}, {n_mm} matmul params (policy + value), "
          f"B={batch} T={seq_len} {args.dtype} remat={args.remat} scan_layers={args.scan_layers} "
          f"logprob_chunk={args.logprob_chunk}; "
          f"step {t:.3f} s, compile {compile_s:.1f} s, XLA temp {temp_mb:.0f} MiB; "
          f"{common.machine_note()}", flush=True)
    print(f"train_step: {r['tok_s']:.0f} tok/s, {r['mfu']:.1f}% MFU", flush=True)
    if args.roofline:
        r.update(roofline(params, cfg, tokens, peak, args.runs))
        print(f"train_step roofline: weight matmuls alone {r['matmul_s']:.3f} s of the {t:.3f} s "
              f"step ({100 * r['matmul_s'] / t:.0f}%), at {r['matmul_gflops']:.0f} GFLOP/s "
              f"({100 * r['matmul_gflops'] * 1e9 / peak:.0f}% of peak) -> MFU ceiling "
              f"{r['mfu_ceiling']:.1f}% if the step did nothing else", flush=True)
    common.append_markdown(
        args.out, "train step" + (" (quick)" if args.quick else ""),
        ["B", "T", "d_model", "layers", "dtype", "remat", "scan", "logprob chunk", "tok/s",
         "MFU %", "step s", "compile s", "XLA temp MiB"],
        [[batch, seq_len, cfg.d_model, cfg.n_layers, args.dtype, args.remat, args.scan_layers,
          args.logprob_chunk, f"{r['tok_s']:.0f}", f"{r['mfu']:.1f}", f"{t:.3f}", f"{compile_s:.1f}",
          f"{temp_mb:.0f}"]],
        [f"matmul peak {peak / 1e9:.1f} GFLOP/s (float32 {n_peak}², same run); "
         f"{n_mm} matmul params (policy + value); step FLOPs {flops:.3e}",
         common.machine_note(), "timings vary with machine load (load avg above): compare rows of one run"])
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
