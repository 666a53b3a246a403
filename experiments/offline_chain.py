"""The whole bring-your-own-model chain, offline, from parts made here.

    python -m experiments.offline_chain --out workdirs/chain                 # guess_number, 3 seeds
    python -m experiments.offline_chain --out DIR --env calculator --updates 100

1. **Tokenizer**: a byte-level BPE trained on the texts of oracle episodes of the task
   (``models.tokenizer_training.train_tokenizer``), ChatML template, stop ids
   ``<|im_end|>`` / ``<|endoftext|>``; the env tags added as special tokens.
2. **Pretrain / SFT** a small Llama from scratch on ε-noisy oracle demonstrations rendered
   through that tokenizer and its chat template (``envs.tokenizer_bridge.BridgedEnv``), few
   enough that the SFT policy leaves room for RL.
3. ``save_pretrained`` it: ``DIR/pretrained`` holds config.json, model.safetensors, the tokenizer
   with its chat template and generation_config.json — a checkpoint like any downloaded one.
4. **RL** it through ``--config.model.hf_checkpoint=DIR/pretrained`` (the task's GRPO config,
   no BC warm start) for each seed in its own workdir.
5. **Evaluate** the SFT start and each final policy greedily on the same fresh episodes (a key
   no training or eval step used).
6. **Export** the first seed's policy (``experiments.export_hf``) and check it with
   ``transformers``: logits of an episode equal ours within 1e-4 (float32), greedy generation of
   its first turn equals our greedy rollout's.

Writes ``DIR/chain.json`` and prints a summary table. Same arguments, same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

FRESH_KEY = 424242            # the evaluation episodes: drawn by no training or eval step


def make_pretrained(env_name: str, out: str, *, env_kwargs: dict | None = None,
                    sft_episodes: int = 1024, epsilon: float = 0.4, sft_epochs: int = 4,
                    vocab_size: int = 512, d_model: int = 128, n_layers: int = 2,
                    seed: int = 0, verbose: bool = True) -> dict:
    """Steps 1-3: tokenizer, SFT from scratch, ``save_pretrained`` into ``out``. The tokenizer
    splits symbol tasks character by character (``pretokenize="symbols"``) and tasks in words
    (``Env.phrases``) word by word, digits alone (``"qwen2"``)."""
    import envs
    import models
    from envs import tokenizer_bridge as tb
    from models.tokenizer_training import train_tokenizer
    from rl_agents import bc

    env = envs.make(env_name, **(env_kwargs or {}))
    t0 = time.time()
    texts = tb.oracle_texts(env, episodes=128, seed=seed)
    texts += [" ".join(env.phrases)] * (16 if env.phrases else 0)   # words other knobs use too
    tok = train_tokenizer(texts, vocab_size, pretokenize="qwen2" if env.phrases else "symbols")
    stop_ids = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    bridge = tb.build_bridge(tok, stop_ids, phrases=env.phrases)   # adds the env tags
    benv = tb.BridgedEnv(env, bridge)
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=d_model, n_layers=n_layers, n_heads=4,
                             n_kv_heads=2, d_ff=3 * d_model,
                             max_seq_len=max(1024, benv.max_episode_tokens))
    model = models.PolicyModel(cfg)
    params = models.init_params(model, jax.random.PRNGKey(seed))
    k_demo, k_sft = jax.random.split(jax.random.PRNGKey(seed + 1))
    demos = bc.collect_demos(benv, k_demo, sft_episodes, epsilon)
    arrays = bc.dataset_arrays(bc.to_dataset(demos))
    params, hist = bc.sft_train(model, params, arrays, k_sft, epochs=sft_epochs,
                                batch_size=min(32, sft_episodes),
                                lr=2e-3, verbose=verbose)
    os.makedirs(out, exist_ok=True)
    models.save_hf_checkpoint(cfg, jax.device_get(params), out, architecture="LlamaForCausalLM")
    tok.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": list(stop_ids)}, f, indent=2)
    return {"dir": out, "tokenizer_size": len(tok), "params": models.count_params(params),
            "episode_tokens": benv.max_episode_tokens, "sft_loss": hist["bc/sft_loss"],
            "demo_success": float(demos.success.mean()), "seconds": time.time() - t0}


def greedy_success(trainer, params, episodes: int) -> float:
    m, _ = trainer.evaluate(params, jax.random.PRNGKey(FRESH_KEY), episodes=episodes, greedy=True)
    return float(m["eval/success_rate"])


def check_export(workdir: str, out: str) -> dict:
    """Step 6: export, then transformers' logits and greedy generation against ours."""
    import torch
    from transformers import AutoModelForCausalLM

    from experiments.export_hf import export_state
    from experiments.run import config_from_workdir, restore_latest

    tr, state, _ = restore_latest(config_from_workdir(workdir), workdir)
    export_state(tr, state, out)
    params = state.params["policy"]
    _, traj = tr.evaluate(params, jax.random.PRNGKey(FRESH_KEY + 1), episodes=1, greedy=True)
    valid = np.asarray(traj.valid[0])
    toks = np.asarray(traj.tokens[0])[valid]
    mask = np.asarray(traj.loss_mask[0])[valid]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([toks.tolist()])).logits.numpy()[0]
    ours = np.asarray(tr.policy.apply({"params": params}, toks[None]))[0]   # LoRA: adapted
    first = int(np.argmax(mask))
    turn = toks[first:][mask[first:].cumprod().astype(bool)].tolist()
    gen = hf.generate(torch.tensor([toks[:first].tolist()]), max_new_tokens=len(turn),
                      do_sample=False, eos_token_id=list(tr.pretrained.bridge.stop_ids),
                      pad_token_id=0)
    return {"max_abs_logit_diff": float(np.abs(theirs - ours).max()),
            "greedy_first_turn_equal": gen[0, first:].tolist() == turn, "episode_tokens": len(toks)}


def run_chain(out: str, *, env_name: str = "guess_number", seeds=(0, 1, 2), updates: int = 60,
              sft_episodes: int = 1024, epsilon: float = 0.4, sft_epochs: int = 4,
              eval_episodes: int = 1024, set_overrides: dict | None = None,
              verbose: bool = True) -> dict:
    from experiments.configs import apply_overrides, task_config
    from experiments.run import build_trainer, run_training

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    result = {"env": env_name, "seeds": list(seeds), "updates": updates,
              "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    pre_dir = os.path.join(out, "pretrained")
    result["pretrained"] = make_pretrained(env_name, pre_dir, sft_episodes=sft_episodes,
                                           epsilon=epsilon, sft_epochs=sft_epochs, verbose=verbose)
    log(f"[chain] pretrained: {json.dumps(result['pretrained'])}")
    runs = []
    start = None
    for seed in seeds:
        cfg = task_config(env_name, "grpo")
        cfg.model.hf_checkpoint = os.path.abspath(pre_dir)
        cfg.bc.episodes = 0
        cfg.seed = seed
        cfg.total_updates = updates
        cfg.eval_every = cfg.checkpoint_every = max(1, updates)
        cfg.rollout.eval_episodes = min(cfg.rollout.eval_episodes, 256)
        apply_overrides(cfg, set_overrides or {})
        t0 = time.time()
        if start is None:     # the SFT policy on the fresh episodes (same for every seed)
            tr0 = build_trainer(cfg)
            start = greedy_success(tr0, tr0.fresh_state(jax.random.PRNGKey(0)).params["policy"],
                                   eval_episodes)
            log(f"[chain] SFT start: greedy success {start:.3f} on {eval_episodes} fresh episodes")
        wd = os.path.join(out, f"rl_seed{seed}")
        res = run_training(cfg, wd, progress=verbose)
        final = greedy_success(res["trainer"], res["state"].params["policy"], eval_episodes)
        runs.append({"seed": seed, "final_fresh_success": final, "wall_s": time.time() - t0,
                     "workdir": wd})
        log(f"[chain] seed {seed}: final greedy success {final:.3f} ({time.time() - t0:.0f} s)")
    finals = np.array([r["final_fresh_success"] for r in runs])
    result.update(sft_start_fresh_success=start, runs=runs,
                  final_mean=float(finals.mean()), final_std=float(finals.std()),
                  eval_episodes=eval_episodes)
    result["export"] = check_export(runs[0]["workdir"], os.path.join(out, "export"))
    log(f"[chain] export: {json.dumps(result['export'])}")
    with open(os.path.join(out, "chain.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--env", default="guess_number")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--sft_episodes", type=int, default=1024)
    ap.add_argument("--sft_epochs", type=int, default=4)
    ap.add_argument("--epsilon", type=float, default=0.4)
    ap.add_argument("--eval_episodes", type=int, default=1024)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the RL runs, e.g. --set rollout.temperature=0.5")
    args = ap.parse_args(argv)
    from experiments.configs import apply_overrides, parse_set_args, task_config
    overrides = parse_set_args(args.set)
    apply_overrides(task_config(args.env, "grpo"), overrides)   # a bad --set fails before SFT
    r = run_chain(args.out, env_name=args.env, seeds=tuple(int(s) for s in args.seeds.split(",")),
                  updates=args.updates, sft_episodes=args.sft_episodes, epsilon=args.epsilon,
                  sft_epochs=args.sft_epochs, eval_episodes=args.eval_episodes,
                  set_overrides=overrides)
    print(f"{r['env']}: SFT start {r['sft_start_fresh_success']:.3f} -> final "
          f"{r['final_mean']:.3f} ± {r['final_std']:.3f} over seeds {r['seeds']} "
          f"({r['eval_episodes']} fresh episodes); export logit diff "
          f"{r['export']['max_abs_logit_diff']:.1e}, greedy turn equal "
          f"{r['export']['greedy_first_turn_equal']}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:                  # bad arguments: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
