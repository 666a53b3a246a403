"""Real sizes: compiled memory and throughput of the rollout and the RL update for a
Qwen2.5-0.5B-shaped policy (random weights), full fine-tuning vs LoRA.

    python -m benchmarks.real_sizes                       # qwen2.5-0.5b shape, CPU, small batch
    python -m benchmarks.real_sizes --shape tiny          # seconds (the test runs this)
    python -m benchmarks.real_sizes --out benchmarks/results/real_sizes.md --json FILE

The checkpoint is made here: random weights of the shape (Qwen2: 24 layers, d_model 896, 14
heads, 2 KV heads, d_ff 4864, tied embeddings, q/k/v biases, 151,936 embedding rows) saved as a
``save_pretrained`` directory with a tokenizer of 151,665 ids (a locally trained byte-level
BPE extended with filler tokens, ChatML template). It is trained exactly as a user's would be:
``calculator_grpo`` with ``--config.model.hf_checkpoint=DIR`` (the env through the tokenizer
bridge; 14 tag tokens added in the padded rows; ``vocab_limit`` 151,679), scanned and
rematerialised layers, T-chunked log-probs, ``rollout.num_groups × group_size`` episodes.

Per mode (``full``: every weight trained, AdamW moments for all; ``lora``: rank-16 adapters on
the seven projections, base frozen; ``full_bf16`` / ``lora_bf16``: the same with bfloat16
compute, ``model.dtype=bfloat16``, over float32 master weights and optimizer state, the
sampler at bfloat16 too, ``rollout.dtype=bfloat16``):

- compiled memory of the jitted rollout and of the jitted update (``memory_analysis()``:
  arguments, outputs, XLA temporaries; the update donates its state, so its peak is about
  arguments + temporaries);
- wall time of one rollout (generated tokens / s) and of one update (rollout + scoring +
  advantages + optimizer; all tokens of the batch / s), median of ``--runs`` after a warm-up.

And the sampling cost at the full vocabulary: ``sample_tokens`` on [B, vocab_limit] logits
(plain, top-k 50, top-p 0.9) against one KV-cached ``decode_step`` of the model at the same B.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

SHAPES = {
    # Qwen2.5-0.5B (config.json of the release): 494M parameters
    "qwen2.5-0.5b": dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         d_ff=4864, tie_embeddings=True, qkv_bias=True, rope_theta=1e6,
                         n_tokens=151665),
    "tiny": dict(vocab_size=640, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 tie_embeddings=True, qkv_bias=True, rope_theta=1e6, n_tokens=600),
}


def make_tokenizer(n_tokens: int):
    """A byte-level BPE trained on calculator texts, its vocabulary extended to ``n_tokens``
    ids with filler tokens ``w0, w1, ...`` (real ids a model can emit; they parse as letters and
    digits)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    import envs
    from envs.tokenizer_bridge import oracle_texts
    from models.tokenizer_training import train_tokenizer

    tok = train_tokenizer(oracle_texts(envs.make("calculator"), 16), 400)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    start = max(vocab.values()) + 1
    for i in range(n_tokens - len(tok)):
        vocab[f"w{i}"] = start + i
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=tok.chat_template)


def make_checkpoint(shape: str, path: str) -> str:
    import models
    s = dict(SHAPES[shape])
    n_tokens = s.pop("n_tokens")
    cfg = models.ModelConfig(max_seq_len=32768, **s)
    params = models.init_params(models.PolicyModel(cfg), jax.random.PRNGKey(0))
    models.save_hf_checkpoint(cfg, jax.device_get(params), path, architecture="Qwen2ForCausalLM")
    del params
    tok = make_tokenizer(n_tokens)
    tok.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.convert_tokens_to_ids("<|im_end|>"),
                                    tok.convert_tokens_to_ids("<|endoftext|>")]}, f)
    return path


def _mem(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 2.0 ** 30
    return {"arguments_gib": m.argument_size_in_bytes / gib, "outputs_gib": m.output_size_in_bytes / gib,
            "temp_gib": m.temp_size_in_bytes / gib, "alias_gib": m.alias_size_in_bytes / gib}


def bench_mode(ckpt: str, mode: str, *, num_groups: int, group_size: int, runs: int,
               lora_rank: int = 16) -> dict:
    import rl_agents
    from experiments.configs import load
    from models import lora

    cfg = load("calculator_grpo")
    cfg.model.hf_checkpoint = ckpt
    cfg.model.scan_layers, cfg.model.remat = True, True
    base, _, precision = mode.partition("_")
    if base not in ("full", "lora") or precision not in ("", "bf16"):
        raise ValueError(f"mode {mode!r} is not one of full, lora, full_bf16, lora_bf16")
    cfg.model.lora.rank = lora_rank if base == "lora" else 0
    if precision == "bf16":        # bf16 compute over f32 masters; bf16 sampler
        cfg.model.dtype, cfg.rollout.dtype = "bfloat16", "bfloat16"
    cfg.rollout.num_groups, cfg.rollout.group_size = num_groups, group_size
    cfg.rl.minibatches, cfg.rl.epochs = 1, 1
    cfg.bc.episodes = 0
    t0 = time.time()
    tr = rl_agents.make_trainer(cfg)
    state = tr.fresh_state(jax.random.PRNGKey(0))
    load_s = time.time() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_train = n_params if base == "full" else sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(lora.adapters(state.params["policy"])))

    def sample(p, k):
        return tr.context.sample(tr, p, k, num_groups=num_groups, group_size=group_size)

    t0 = time.time()
    roll = jax.jit(sample).lower(state.params["policy"], state.key).compile()   # casts inside
    roll_compile = time.time() - t0
    out = {"mode": mode, "params": n_params, "trainable": n_train, "load_s": load_s,
           "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
           "opt_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.opt_state)
                                 if jnp.issubdtype(x.dtype, jnp.floating)}),
           "rollout_compile_s": roll_compile, "rollout_memory": _mem(roll)}
    traj = common.block(roll(state.params["policy"], state.key))
    times, gen = [], []
    for r in range(runs):
        t0 = time.time()
        traj = common.block(roll(state.params["policy"], jax.random.PRNGKey(r + 1)))
        times.append(time.time() - t0)
        gen.append(int(traj.loss_mask.sum()))
    out.update(rollout_s=common.median(times), generated_tokens=int(np.median(gen)),
               episode_tokens=int(traj.valid.sum()),
               generated_tok_s=float(np.median(gen) / common.median(times)))
    t0 = time.time()
    upd = jax.jit(tr.step, donate_argnums=0).lower(state).compile()
    out.update(update_compile_s=time.time() - t0, update_memory=_mem(upd))
    state, m = upd(state)
    common.block(m)
    times = []
    for _ in range(runs):
        t0 = time.time()
        state, m = upd(state)
        common.block(m)
        times.append(time.time() - t0)
    out.update(update_s=common.median(times), loss=float(m["loss"]))
    out["update_tok_s"] = out["episode_tokens"] / out["update_s"]
    return out


def bench_sampling(ckpt: str, batch: int, runs: int) -> dict:
    """sample_tokens at the full vocabulary vs one decode step of the model."""
    import ml_collections

    import envs
    import models
    from rl_agents.pretrained import load_pretrained
    from rl_agents.sampling import SamplingConfig, sample_tokens

    mc = ml_collections.ConfigDict(dict(hf_checkpoint=ckpt, tags="special", action_tokens=0,
                                        scan_layers=True))
    pre = load_pretrained(mc, envs.make("calculator"))
    cfg = pre.model_cfg
    model = models.PolicyModel(cfg)
    v = cfg.vocab_limit or cfg.vocab_size
    logits = jax.random.normal(jax.random.PRNGKey(0), (batch, v)) * 3
    out = {"batch": batch, "vocab": v}
    for name, sc in [("plain", SamplingConfig()), ("top_k=50", SamplingConfig(top_k=50)),
                     ("top_p=0.9", SamplingConfig(top_p=0.9))]:
        f = jax.jit(lambda lg, k, sc=sc: sample_tokens(lg, k, sc))
        common.block(f(logits, jax.random.PRNGKey(1)))
        out[f"sample_{name}_ms"] = 1e3 * common.median(common.time_calls(
            lambda i: f(logits, jax.random.PRNGKey(i)), runs))
    cache = models.init_cache(cfg, batch, 256)
    step = jax.jit(lambda p, t, c: models.decode_step(model, p, t, c))
    tok = jnp.zeros((batch,), jnp.int32)
    common.block(step(pre.params, tok, cache))
    out["decode_step_ms"] = 1e3 * common.median(common.time_calls(
        lambda i: step(pre.params, tok, cache), runs))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--num_groups", type=int, default=1)
    ap.add_argument("--group_size", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=None, help="append a markdown table here")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args(argv)
    results = {"shape": args.shape, "machine": common.machine_note(),
               "date": time.strftime("%Y-%m-%d"), "modes": []}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        ckpt = make_checkpoint(args.shape, os.path.join(d, "ckpt"))
        print(f"checkpoint {args.shape} written in {time.time() - t0:.0f} s", flush=True)
        results["sampling"] = bench_sampling(ckpt, args.num_groups * args.group_size, max(args.runs, 3))
        print(json.dumps(results["sampling"]), flush=True)
        for mode in args.modes.split(","):
            r = bench_mode(ckpt, mode, num_groups=args.num_groups, group_size=args.group_size,
                           runs=args.runs)
            print(json.dumps(r), flush=True)
            results["modes"].append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    rows = []
    for r in results["modes"]:
        rm, um = r["rollout_memory"], r["update_memory"]
        rows.append([r["mode"], f"{r['params'] / 1e6:.0f}M / {r['trainable'] / 1e6:.2f}M",
                     f"{rm.get('arguments_gib', float('nan')):.2f} + {rm.get('temp_gib', float('nan')):.2f}",
                     f"{um.get('arguments_gib', float('nan')):.2f} + {um.get('temp_gib', float('nan')):.2f}",
                     f"{r['generated_tok_s']:.1f}", f"{r['rollout_s']:.1f}",
                     f"{r['update_s']:.1f}", f"{r['update_tok_s']:.1f}"])
    s = results["sampling"]
    common.append_markdown(
        args.out, f"real sizes: {args.shape}",
        ["mode", "params / trained", "rollout GiB (args + temp)", "update GiB (args + temp)",
         "rollout generated tok/s", "rollout s", "update s", "update tok/s"], rows,
        notes=[results["machine"],
               f"{args.num_groups}×{args.group_size} calculator episodes, "
               f"{results['modes'][0]['episode_tokens'] if results['modes'] else 0} tokens",
               f"sampling at V={s['vocab']}, B={s['batch']}: plain {s['sample_plain_ms']:.1f} ms, "
               f"top-k 50 {s['sample_top_k=50_ms']:.1f} ms, top-p 0.9 {s['sample_top_p=0.9_ms']:.1f} ms; "
               f"one decode step {s['decode_step_ms']:.1f} ms"])
    return results


if __name__ == "__main__":
    main()
