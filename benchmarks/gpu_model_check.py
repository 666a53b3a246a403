"""Model-level GPU check: "xla" vs "pallas" attention (compiled) and rollout throughput.

    python benchmarks/gpu_model_check.py [--out results.json]

1. PolicyModel logits and gradients with attention_impl="pallas" (compiled flash attention)
   against "xla" on packed / padded rows (bench-small: 4 layers, d_model 256, 8 heads, 2 KV
   heads, vocab 64), float32 and bfloat16.
   The KV-cached path too: a prompt prefill then decode steps at mixed per-row lengths, logits
   of "pallas" (``flash_decode`` merged with the chunk's keys) against "xla".
2. Multi-turn rollout throughput (KV-cached generation × jitted env) on ``maze`` and
   ``guess_number`` with bench-small at B ∈ {64, 256, 1024}: generated and total tokens/s,
   median of 3 after compilation.
Needs only jax / flax / numpy (no datasets / ml_collections), so it runs on a bare GPU image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
import envs  # noqa: E402
import models  # noqa: E402
from rl_agents.rollout import rollout  # noqa: E402
from rl_agents.sampling import SamplingConfig  # noqa: E402

BENCH_SMALL = dict(vocab_size=64, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=1024)


def parity(dtype: str) -> dict:
    out = {}
    t = 256
    cfg_x = models.ModelConfig(**BENCH_SMALL, max_seq_len=t, attention_impl="xla", dtype=dtype)
    cfg_p = cfg_x.replace(attention_impl="pallas")
    mx, mp = models.PolicyModel(cfg_x), models.PolicyModel(cfg_p)
    params = models.init_params(mx, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, t), 0, 64)
    seg = jnp.concatenate([jnp.ones((4, 100), jnp.int32), 2 * jnp.ones((4, 100), jnp.int32),
                           jnp.zeros((4, 56), jnp.int32)], axis=1)
    pos = jnp.concatenate([jnp.arange(100), jnp.arange(100), jnp.zeros(56, jnp.int32)])[None].repeat(4, 0)

    def loss(p, m):
        lg = m.apply({"params": p}, tokens, positions=pos, segment_ids=seg)
        return (jax.nn.log_softmax(lg) * (seg != 0)[..., None]).sum() / 1e4, lg

    (lx, gx_logits), gx = jax.jit(jax.value_and_grad(lambda p: loss(p, mx), has_aux=True))(params)
    (lp, gp_logits), gp = jax.jit(jax.value_and_grad(lambda p: loss(p, mp), has_aux=True))(params)
    real = np.asarray(seg != 0)
    out["logits_max_abs_diff"] = float(np.abs(np.asarray(gx_logits) - np.asarray(gp_logits))[real].max())
    out["grad_max_abs_diff"] = float(max(np.abs(np.asarray(a) - np.asarray(b)).max()
                                         for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gp))))
    out["grad_max_abs"] = float(max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(gx)))
    return out


def cached_parity(dtype: str, batch: int = 8, prompt: int = 24, steps: int = 40) -> dict:
    """Max |logit difference| of decode steps, "pallas" vs "xla" cached attention; rows start
    at different depths (a prompt of 1..``prompt`` valid tokens) as continuous slots do."""
    cfg_x = models.ModelConfig(**BENCH_SMALL, max_seq_len=prompt + steps, attention_impl="xla",
                               dtype=dtype)
    params = models.init_params(models.PolicyModel(cfg_x), jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(2), (batch, prompt + steps), 0, 64)
    valid = jnp.arange(prompt)[None] < jnp.linspace(1, prompt, batch).astype(jnp.int32)[:, None]

    def run(impl):
        m = models.PolicyModel(cfg_x.replace(attention_impl=impl))

        def go(p):
            cache = models.init_cache(m.cfg, batch, prompt + steps)
            _, cache = models.prefill(m, p, toks[:, :prompt], cache, valid)

            def step(cache, tok):
                out, cache = models.decode_step(m, p, tok, cache)
                return cache, out
            return jax.lax.scan(step, cache, toks[:, prompt:].T)[1]
        return np.asarray(jax.jit(go)(params), np.float32)
    return {"decode_logits_max_abs_diff": float(np.abs(run("xla") - run("pallas")).max())}


def rollout_speed(env_name: str, batch: int, impl: str) -> dict:
    env = envs.make(env_name)
    cfg = models.ModelConfig(**BENCH_SMALL, max_seq_len=env.max_episode_tokens, attention_impl=impl)
    model = models.PolicyModel(cfg)
    params = models.init_params(model, jax.random.PRNGKey(0))
    f = jax.jit(lambda p, k: rollout(env, model, p, k, num_groups=batch, sampling=SamplingConfig()))
    t0 = time.perf_counter()
    traj = jax.block_until_ready(f(params, jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        traj = jax.block_until_ready(f(params, jax.random.PRNGKey(i + 1)))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    gen = float(np.asarray(traj.loss_mask).sum())
    total = float(np.asarray(traj.valid).sum())
    # every row runs the full token budget (fixed shapes): budget tokens/s is the hardware rate
    budget = batch * env.max_turns * (env.action_len + env.obs_len)
    return {"env": env_name, "B": batch, "impl": impl, "median_s": med, "compile_s": compile_s,
            "generated_tok_s": gen / med, "total_tok_s": total / med, "slot_tok_s": budget / med}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    print(f"device {res['device']}, jax {res['jax']}", flush=True)
    for dt in ("float32", "bfloat16"):
        try:
            res[f"parity_{dt}"] = parity(dt)
        except Exception as e:  # noqa: BLE001
            res[f"parity_{dt}"] = {"error": repr(e)[:500]}
        print(f"parity {dt}: {res[f'parity_{dt}']}", flush=True)
        try:
            res[f"cached_parity_{dt}"] = cached_parity(dt)
        except Exception as e:  # noqa: BLE001
            res[f"cached_parity_{dt}"] = {"error": repr(e)[:500]}
        print(f"cached parity {dt}: {res[f'cached_parity_{dt}']}", flush=True)
    res["rollout"] = []
    for env_name in ("guess_number", "maze"):
        for b in (64, 256, 1024):
            for impl in ("xla", "pallas"):
                try:
                    r = rollout_speed(env_name, b, impl)
                except Exception as e:  # noqa: BLE001
                    r = {"env": env_name, "B": b, "impl": impl, "error": repr(e)[:300]}
                res["rollout"].append(r)
                print(json.dumps(r), flush=True)
    print("\n| env | B | attention | generated tok/s | total tok/s | compile s |")
    print("|---|---|---|---|---|---|")
    for r in res["rollout"]:
        if "error" not in r:
            print(f"| {r['env']} | {r['B']} | {r['impl']} | {r['generated_tok_s']:,.0f} | "
                  f"{r['total_tok_s']:,.0f} | {r['compile_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
