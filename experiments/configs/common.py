"""Shared config builder: every experiment config is ``make_config(env, algorithm)`` plus edits.

Keys (all read by ``rl_agents.trainer`` / ``experiments.train``):
  seed, total_updates, eval_every, checkpoint_every, keep_checkpoints, log_every
  mesh.{data,fsdp,tensor}          device mesh (product = number of devices)
  env.name, env.kwargs.*           ``envs.make(name, **kwargs)``
  model.*                          ``models.ModelConfig`` fields (vocab / max_seq_len come from the env),
                                   or ``model.hf_checkpoint``: a Hugging Face checkpoint + tokenizer
  rollout.*                        groups × group size per update, sampling, eval episodes
  rl.*                             algorithm (``rl_agents.algorithms``) and loss settings
  optim.*                          AdamW with linear warm-up, optional cosine/linear decay,
                                   global-norm clipping
  bc.*                             BC warm start on ε-noisy oracle demos (episodes=0: off)
"""
import ml_collections

from rl_agents.algorithms import get_algorithm


def make_config(env: str = "guess_number", algorithm: str = "grpo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_updates = 100
    c.eval_every = 10
    c.checkpoint_every = 10
    c.keep_checkpoints = 3
    c.log_every = 1

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.env = ml_collections.ConfigDict(dict(name=env, kwargs=ml_collections.ConfigDict()))

    # ≈0.4M parameters: small enough to learn the synthetic tasks on a 2-core CPU in minutes.
    c.model = ml_collections.ConfigDict(dict(
        d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, rope_theta=10000.0,
        tie_embeddings=False, dtype="float32", param_dtype="float32", attention_impl="auto",
        remat=False, scan_layers=False,
        # your own model: a save_pretrained dir (Llama / Qwen2 + tokenizer); "" = the model
        # above in the symbol vocabulary. With a checkpoint, d_model..rope_theta are its own,
        # tags: env tags as added special tokens ("special") or plain text ("text"),
        # action_tokens: a turn's token budget in the tokenizer's ids (0: automatic).
        hf_checkpoint="", tags="special", action_tokens=0,
        # LoRA (models.lora, qwix): rank 0 = full fine-tuning; rank r > 0 trains adapters
        # (α/r)·A·B on the listed projections, the policy's base weights frozen and shared
        # with the reference policy; exports merge them.
        lora=ml_collections.ConfigDict(dict(
            rank=0, alpha=32.0, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"))))

    c.rollout = ml_collections.ConfigDict(dict(
        num_groups=16, group_size=4, temperature=1.0, top_k=0, top_p=1.0, eval_episodes=256,
        # the sampler's compute dtype: "bfloat16" samples (and evaluates) with bf16 weights and
        # activations while the trainer stays at model.dtype (see rl.correction, mismatch/kl)
        dtype="float32",
        # "sync": every update samples num_groups × group_size fresh episodes; "continuous":
        # episodes carried across updates in slots (rl_agents.continuous): slot_groups groups
        # of group_size slots (0: 2 × num_groups); each update runs turn steps over all slots
        # until num_groups groups have completed (until_full; False: always turns_per_update
        # steps), at most turns_per_update (0: the env's max_turns), and trains on the
        # completed groups; episodes first sampled more than max_staleness updates before are
        # dropped; reprefill rebuilds the carried KV caches under the new parameters at each
        # update's start
        mode="sync",
        continuous=ml_collections.ConfigDict(dict(
            slot_groups=0, turns_per_update=0, until_full=True, max_staleness=4,
            reprefill=False))))

    c.rl = ml_collections.ConfigDict(dict(
        algorithm=algorithm,
        policy_loss=get_algorithm(algorithm).policy_loss,   # losses.POLICY_LOSSES: "ppo" | "pg"
        epochs=2, minibatches=2,
        eps_low=0.2, eps_high=0.2, dual_clip=0.0,    # dual_clip c > 1 enables dual-clip
        agg="token-mean",
        kl_coef=0.0, kl_kind="k3", kl_in_reward=False,
        entropy_coef=0.0,
        value_coef=0.5, value_clip=0.2,              # read when the algorithm has a critic
        oversample=2.0,                              # read by dynamic sampling (dapo)
        overlong_cache_len=0,                        # DAPO overlong penalty window in tokens (0: off)
        logprob_chunk=128,                           # T-chunked log-probs (0: full [B,T,V] logits)
        target_kl=0.0,                               # PPO KL early stopping at 1.5·target_kl (0: off)
        max_nonfinite_updates=3,                     # stop after this many NaN / inf updates in a row
        # sampler vs trainer (rl_agents.off_policy): "none" | "tis" (token weights
        # min(π_old/μ, cap)) | "mis" (drop rows whose geometric-mean π_old/μ is outside
        # [1/cap, cap]) | "token_mis" (drop such tokens); π_old recomputed by the trainer
        correction="none", correction_cap=2.0,
        advantage_kwargs=ml_collections.ConfigDict(),
    ))
    if not get_algorithm(algorithm).group_relative:
        c.rollout.group_size = 1
        c.rollout.num_groups = 64

    # lr after warm-up: "constant", or "cosine" / "linear" decay to lr·final_lr_fraction at the
    # last optimizer step of total_updates (rl_agents.trainer.lr_schedule)
    c.optim = ml_collections.ConfigDict(dict(lr=3e-4, warmup_steps=5, decay="constant",
                                             final_lr_fraction=0.0, grad_clip=1.0, weight_decay=0.0))
    c.bc = ml_collections.ConfigDict(dict(
        episodes=2048, epsilon=0.2, success_only=False, epochs=4, batch_size=64, lr=2e-3,
        decay="constant",    # BC lr: "constant" or "cosine" (annealed to 0 over all BC steps)
        # T-chunked SFT log-probs: -1 = rl.logprob_chunk with model.hf_checkpoint (no [B,T,V]
        # logits at a real vocabulary), full logits for the 64-symbol model; 0 = full; n > 0
        logprob_chunk=-1))
    # Reward source: the env's reward, or a learned Bradley–Terry reward model (trained on
    # oracle-vs-perturbed preference pairs at init, or loaded from rm_checkpoint); optional
    # PRIME implicit process rewards with the Clip / Delta transforms.
    c.reward = ml_collections.ConfigDict(dict(
        source="env", rm_checkpoint="", rm_pairs=512, rm_epsilon=0.7, rm_epochs=3,
        rm_batch_size=32, rm_lr=1e-3, rm_eval_pairs=256,
        process=ml_collections.ConfigDict(dict(
            enabled=False, beta=0.05, coef=1.0, lr=1e-4, update="before", transform="none",
            clip_eta=0.0, granularity="token"))))
    return c
