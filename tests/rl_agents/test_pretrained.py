"""A Hugging Face checkpoint (made here: locally trained tokenizer, random Llama) as the policy:
loading, token-in / token-out rollouts, training and export back to ``transformers``."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import rl_agents
from experiments.configs import load
from rl_agents.validation import ConfigError, check_config
from tests.hf_fixtures import make_checkpoint_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 40 padded embedding rows: room for the 14 tag tokens and 26 rows never sampled
    return make_checkpoint_dir(tmp_path_factory.mktemp("hf") / "llama", pad_rows=40)


def tiny_config(ckpt, algorithm="grpo", **rl):
    cfg = load(f"calculator_{algorithm}")
    cfg.model.hf_checkpoint = str(ckpt)
    cfg.rollout.num_groups, cfg.rollout.group_size = (2, 2) if algorithm == "grpo" else (4, 1)
    cfg.rollout.eval_episodes = 4
    cfg.rl.minibatches = 1
    cfg.bc.episodes = 0
    cfg.total_updates = 1
    for k, v in rl.items():
        cfg.rl[k] = v
    return cfg


@pytest.fixture(scope="module")
def trainer(ckpt):
    return rl_agents.make_trainer(tiny_config(ckpt, "ppo", kl_coef=0.01))


def test_policy_reference_and_value_trunk_start_from_the_checkpoint(ckpt, trainer):
    cfg0, p0 = models.load_hf_checkpoint(ckpt)
    n_tok = len(trainer.pretrained.tokenizer)
    added = len(trainer.pretrained.bridge.added_tokens)
    assert added == 14 and trainer.model_cfg.vocab_limit == n_tok
    assert trainer.model_cfg.vocab_size == cfg0.vocab_size        # the padded rows held the tags
    state = trainer.fresh_state(jax.random.PRNGKey(0))
    emb = np.asarray(state.params["policy"]["model"]["embed_tokens"]["embedding"])
    emb0 = np.asarray(p0["model"]["embed_tokens"]["embedding"])
    old = n_tok - added
    np.testing.assert_array_equal(emb[:old], emb0[:old])
    np.testing.assert_allclose(emb[old:n_tok], np.broadcast_to(emb0[:old].mean(0), (added, emb.shape[1])),
                               rtol=1e-6)
    np.testing.assert_array_equal(emb[n_tok:], emb0[n_tok:])
    q = lambda p: np.asarray(p["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(q(state.params["policy"]), q(p0))
    np.testing.assert_array_equal(q(state.ref_params), q(p0))
    np.testing.assert_array_equal(q(state.params["value"]), q(p0))


def test_rollout_in_tokenizer_ids_rescored_exactly_and_padded_rows_never_sampled(trainer):
    """The trajectory holds the ids the model sampled; the trainer's log-probs of those ids
    equal the sampler's. Padded embedding rows get huge logits and are still never sampled:
    the logits stop at ``vocab_limit``."""
    state = trainer.fresh_state(jax.random.PRNGKey(1))
    pol = state.params["policy"]
    limit = trainer.model_cfg.vocab_limit
    w = pol["lm_head"]["kernel"]
    pol = dict(pol, lm_head={"kernel": w.at[:, limit:].set(50.0)})
    traj = jax.jit(lambda p, k: trainer.context.sample(
        trainer, p, k, num_groups=4, group_size=2))(pol, jax.random.PRNGKey(2))
    mask = np.asarray(traj.loss_mask)
    assert mask.sum() > 40
    toks = np.asarray(traj.tokens)
    assert toks[mask].max() < limit and toks.min() >= 0
    logp, _ = jax.jit(trainer.logprobs)(pol, traj.tokens, traj.valid)
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(traj.behaviour_logp)[mask],
                               atol=2e-5)
    from rl_agents.rollout import render_trajectory
    text = render_trajectory(trainer.env, traj, 0)
    assert "<|im_start|>assistant" in text and "<|im_start|>user\n<obs>" in text
    # the observations hold the env's rendered ids (chat pieces included)
    obs = toks[np.asarray(traj.valid) & ~mask & (np.asarray(traj.turn_ids) >= 0)]
    assert set(trainer.pretrained.bridge.obs_suffix) <= set(obs.tolist())


def test_updates_run_and_metrics_are_finite(trainer):
    state = trainer.init(jax.random.PRNGKey(0))
    before = np.asarray(state.params["policy"]["lm_head"]["kernel"]).copy()
    for _ in range(2):
        state, m = trainer.update(state)
    assert np.isfinite(float(m["loss"])) and float(m["mismatch/kl"]) < 1e-6
    assert not np.array_equal(before, np.asarray(state.params["policy"]["lm_head"]["kernel"]))


def test_bad_checkpoint_settings_give_one_line(ckpt, tmp_path):
    cfg = tiny_config(ckpt)
    for path, msg in [(tmp_path / "nope", "does not exist"), (tmp_path, "no config.json")]:
        cfg.model.hf_checkpoint = str(path)
        with pytest.raises(ConfigError, match=f"config.model.hf_checkpoint: .*{msg}"):
            check_config(cfg, 1)
    (tmp_path / "config.json").write_text(json.loads(json.dumps("{}")))
    with pytest.raises(ConfigError, match="no tokenizer"):
        check_config(cfg, 1)
    cfg.model.hf_checkpoint = str(ckpt)
    cfg.model.tags = "bytes"
    with pytest.raises(ConfigError, match="config.model.tags = 'bytes'"):
        check_config(cfg, 1)


def test_unsupported_architecture_is_one_line(ckpt, tmp_path):
    import shutil
    from experiments.run import build_trainer
    d = tmp_path / "gpt"
    shutil.copytree(ckpt, d)
    hf = json.loads((d / "config.json").read_text())
    hf["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(hf))
    cfg = tiny_config(d)
    check_config(cfg, 1)
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel"):
        build_trainer(cfg)


def test_train_export_and_transformers_generate_the_same(ckpt, trainer, tmp_path, monkeypatch):
    """experiments.train → experiments.export_hf → transformers: the exported policy's logits
    equal ours within 1e-4 (float32) on the real token columns, and greedy generation from the
    task prompt gives the ids our greedy rollout samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments import run as run_lib
    from experiments.export_hf import export_workdir

    # one device, no mesh (the test process has eight: tests/conftest.py)
    monkeypatch.setattr(run_lib, "check_config", lambda c: check_config(c, num_devices=1))
    monkeypatch.setattr(run_lib, "make_mesh", lambda m: None)
    monkeypatch.setattr(run_lib, "build_trainer",                                  # compiled once
                        lambda c, mesh=None, checkpoint_weights=True: trainer)

    cfg = trainer.config
    cfg.total_updates, cfg.eval_every, cfg.checkpoint_every = 1, 1, 1
    res = run_lib.run_training(cfg, str(tmp_path / "wd"), progress=False)
    out = tmp_path / "export"
    summary = export_workdir(str(tmp_path / "wd"), str(out))
    assert summary["step"] == 1 and summary["tokenizer"]
    tr, state = res["trainer"], res["state"]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == tr.model_cfg.vocab_limit
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        list(tr.pretrained.bridge.stop_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    # the prompt of one greedy eval episode, as ids
    _, traj = tr.evaluate(state.params["policy"], jax.random.PRNGKey(5), episodes=1, greedy=True)
    toks = np.asarray(traj.tokens[0])[np.asarray(traj.valid[0])]
    mask = np.asarray(traj.loss_mask[0])[np.asarray(traj.valid[0])]
    first = int(np.argmax(mask))
    prompt = toks[:first].tolist()
    assert tok.decode(prompt).startswith("<|im_start|>system")
    with torch.no_grad():
        theirs = hf(torch.tensor([toks.tolist()])).logits.numpy()[0]
    ours = np.asarray(tr.policy.apply({"params": state.params["policy"]}, jnp.asarray([toks])))[0]
    assert theirs.shape == ours.shape                  # padded rows are not exported
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    first_action = toks[first:][mask[first:].cumprod().astype(bool)].tolist()
    gen = hf.generate(torch.tensor([prompt]), max_new_tokens=len(first_action), do_sample=False,
                      eos_token_id=list(tr.pretrained.bridge.stop_ids), pad_token_id=0)
    assert gen[0, len(prompt):].tolist() == first_action


def test_lora_trains_adapters_only_shares_the_base_and_exports_merged(ckpt, tmp_path):
    """config.model.lora.rank > 0: BC and RL move the adapters only (base weights bit-equal to
    the checkpoint's), the reference keeps a copy of the adapters only, and the export merges
    them: transformers' logits equal the adapted policy's."""
    import torch
    from transformers import AutoModelForCausalLM

    from experiments.export_hf import trim_vocab
    from models import lora
    from rl_agents.pretrained import save_tokenizer

    cfg = tiny_config(ckpt, "ppo", kl_coef=0.01)
    cfg.model.lora.rank, cfg.model.lora.alpha = 4, 8.0
    cfg.bc.episodes, cfg.bc.batch_size, cfg.bc.epochs = 8, 8, 1
    tr = rl_agents.make_trainer(cfg)
    state = tr.init(jax.random.PRNGKey(0))
    _, p0 = models.load_hf_checkpoint(ckpt)
    ad0 = {k: np.asarray(v) for k, v in lora.adapters(state.params["policy"]).items()}
    assert set(state.ref_params) == set(ad0)              # no copy of the base weights
    assert any(np.any(v != 0) for k, v in ad0.items() if k.endswith("lora_b']"))   # BC moved B
    state, m = tr.update(state)
    pol = state.params["policy"]
    q = lambda p: np.asarray(p["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(q(pol), q(p0))
    for k, v in state.ref_params.items():
        np.testing.assert_array_equal(np.asarray(v), ad0[k])
    assert any(np.any(np.asarray(v) != ad0[k]) for k, v in lora.adapters(pol).items())
    assert np.isfinite(float(m["loss"])) and float(m["policy/kl_ref"]) >= 0
    out = tmp_path / "lora_export"
    cfg_x, params_x = trim_vocab(tr.model_cfg, jax.device_get(tr.policy_weights(pol)))
    models.save_hf_checkpoint(cfg_x, params_x, out)
    save_tokenizer(tr.pretrained, out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    toks = np.random.RandomState(0).randint(0, tr.model_cfg.vocab_limit, (2, 30))
    with torch.no_grad():
        theirs = hf(torch.tensor(toks)).logits.numpy()
    ours = np.asarray(tr.policy.apply({"params": pol}, jnp.asarray(toks)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_a_task_in_words_trains_through_the_checkpoint(tmp_path):
    """kb_qa (questions and facts in words) with a checkpoint whose tokenizer writes words whole:
    the prompt is the question as text, the oracle solves the bridged task and the trainer
    re-scores the sampled ids exactly (the update itself is the same as for any task)."""
    from experiments.configs.recipes import recipe
    from rl_agents.rollout import oracle_policy, run_episodes

    ck = make_checkpoint_dir(tmp_path / "words", env_names=("kb_qa",), pretokenize="qwen2",
                             pad_rows=40)
    cfg = recipe("kb_qa", "grpo", hops=1, relations=2)
    cfg.model.hf_checkpoint = str(ck)
    cfg.rollout.num_groups, cfg.rollout.group_size = 2, 2
    cfg.rl.minibatches = 1
    cfg.bc.episodes = 0
    check_config(cfg, num_devices=1)
    tr = rl_agents.make_trainer(cfg)
    env, tok = tr.env, tr.pretrained.tokenizer
    assert env.bridge.phrases == env.env.phrases and env.bridge.words
    traj = jax.jit(lambda k: run_episodes(env, oracle_policy(env), k, num_groups=8))(
        jax.random.PRNGKey(0))
    assert np.asarray(traj.success).all()
    prompt = np.asarray(traj.tokens[0])[np.asarray(traj.turn_ids[0]) == -1]
    assert "<task> Who is the " in tok.decode([int(t) for t in prompt if t >= 0])
    pol = tr.fresh_state(jax.random.PRNGKey(1)).params["policy"]
    traj = jax.jit(lambda p, k: tr.context.sample(tr, p, k, num_groups=2, group_size=2))(
        pol, jax.random.PRNGKey(2))
    mask = np.asarray(traj.loss_mask)
    assert mask.sum() > 8
    logp, _ = jax.jit(tr.logprobs)(pol, traj.tokens, traj.valid)
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(traj.behaviour_logp)[mask],
                               atol=2e-5)


def test_bc_warm_start_uses_chunked_logprobs_with_a_checkpoint(ckpt, trainer, monkeypatch):
    """bc.logprob_chunk = -1 (default): the RL loss's chunk with a checkpoint, full logits for
    the 64-symbol model; an explicit value wins."""
    from rl_agents import trainer as trainer_lib
    seen = []
    monkeypatch.setattr(trainer_lib.bc_lib, "warm_start",
                        lambda *a, **kw: (seen.append(kw["logprob_chunk"]), (a[2], {}))[1])
    assert trainer.config.bc.logprob_chunk == -1 and trainer.config.rl.logprob_chunk == 128
    trainer.context.warm_start(trainer, None, jax.random.PRNGKey(0))
    cfg = tiny_config(ckpt)
    cfg.bc.logprob_chunk = 0
    assert trainer_lib.bc_logprob_chunk(cfg, pretrained=True) == 0
    cfg.bc.logprob_chunk = -1
    assert trainer_lib.bc_logprob_chunk(cfg, pretrained=False) == 0
    cfg.rl.logprob_chunk = 32
    assert trainer_lib.bc_logprob_chunk(cfg, pretrained=True) == 32
    assert seen == [128]
    cfg.bc.episodes, cfg.bc.batch_size, cfg.bc.logprob_chunk = 8, 8, -2
    with pytest.raises(ConfigError, match="bc.logprob_chunk must be -1"):
        check_config(cfg, num_devices=1)


def test_bf16_compute_over_float32_master_weights(ckpt, trainer):
    """model.dtype = bfloat16 (param_dtype float32): the state keeps float32 parameters and
    AdamW moments (the master weights) and the model computes in bfloat16: its log-probs of the
    same ids differ from the float32 trainer's by bf16 rounding, not more."""
    cfg = tiny_config(ckpt, "ppo", kl_coef=0.01)
    cfg.model.dtype = "bfloat16"
    tr16 = rl_agents.make_trainer(cfg)
    state = tr16.fresh_state(jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state)
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    pol = state.params["policy"]
    traj = jax.jit(lambda p, k: trainer.context.sample(trainer, p, k, num_groups=2,
                                                       group_size=1))(pol, jax.random.PRNGKey(3))
    mask = np.asarray(traj.loss_mask)
    lp32 = np.asarray(jax.jit(trainer.logprobs)(pol, traj.tokens, traj.valid)[0])[mask]
    lp16 = np.asarray(jax.jit(tr16.logprobs)(pol, traj.tokens, traj.valid)[0])[mask]
    diff = np.abs(lp16 - lp32)
    assert 1e-4 < diff.max() < 0.25, diff.max()


def test_export_and_eval_after_the_checkpoint_dir_is_gone(ckpt, tmp_path, monkeypatch):
    """A run keeps a weightless copy of its checkpoint (WORKDIR/hf_base: config, tokenizer with
    the run's tags, stop ids); with the original directory deleted, export writes the same
    files and restoring reads no weights (init refuses a trainer built that way)."""
    import shutil

    from experiments import run as run_lib
    from experiments.export_hf import export_workdir
    from models.hf_io import read_safetensors
    from rl_agents.pretrained import BASE_DIR

    monkeypatch.setattr(run_lib, "check_config", lambda c: check_config(c, num_devices=1))
    monkeypatch.setattr(run_lib, "make_mesh", lambda m: None)
    src = tmp_path / "ckpt"
    shutil.copytree(ckpt, src)
    cfg = tiny_config(src)
    cfg.total_updates, cfg.eval_every, cfg.checkpoint_every = 1, 1, 1
    cfg.rollout.eval_episodes = 2
    wd = tmp_path / "wd"
    run_lib.run_training(cfg, str(wd), progress=False)
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= \
        {p.name for p in (wd / BASE_DIR).iterdir()}
    assert not list((wd / BASE_DIR).glob("*.safetensors"))
    export_workdir(str(wd), str(tmp_path / "before"))
    shutil.rmtree(src)
    export_workdir(str(wd), str(tmp_path / "after"))
    a = read_safetensors(tmp_path / "before" / "model.safetensors")
    b = read_safetensors(tmp_path / "after" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "before" / name).read_text() == (tmp_path / "after" / name).read_text()
    tr, state, _ = run_lib.restore_latest(run_lib.config_from_workdir(str(wd)), str(wd))
    assert not tr.pretrained.has_weights and int(state.step) == 1
    with pytest.raises(ValueError, match="can restore a trained state, not start one"):
        tr.init(jax.random.PRNGKey(0))
