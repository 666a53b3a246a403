"""The offline chain's first half (tokenizer → SFT from scratch → save_pretrained) makes a
directory that transformers and model.hf_checkpoint both load as any checkpoint; the RL and
export halves are tests/rl_agents/test_pretrained.py."""
import json

import jax
import numpy as np
import pytest

import envs
from experiments.offline_chain import make_pretrained
from rl_agents.pretrained import load_pretrained


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "pretrained"
    info = make_pretrained("guess_number", str(out), sft_episodes=32, sft_epochs=2,
                           vocab_size=300, d_model=32, verbose=False)
    return out, info


def test_sft_lowers_the_loss_and_the_dir_is_complete(pretrained):
    out, info = pretrained
    assert info["sft_loss"][-1] < info["sft_loss"][0]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert len(json.loads((out / "generation_config.json").read_text())["eos_token_id"]) == 2


def test_the_saved_checkpoint_loads_in_transformers_and_as_hf_checkpoint(pretrained):
    import ml_collections
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import models

    out, info = pretrained
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == info["tokenizer_size"] and "<calc>" in tok.get_vocab()
    mc = ml_collections.ConfigDict(dict(hf_checkpoint=str(out), tags="special", action_tokens=0))
    pre = load_pretrained(mc, envs.make("guess_number"))
    assert pre.bridge.added_tokens == ()              # the tags are already in its tokenizer
    assert pre.model_cfg.vocab_limit is None and pre.model_cfg.vocab_size == len(tok)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "<task> 12 ?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(models.PolicyModel(pre.model_cfg).apply({"params": pre.params},
                                                               jax.numpy.asarray([ids])))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
