"""A tiny Hugging Face checkpoint directory made here (no download): a byte-level BPE tokenizer
trained on an env's oracle texts, random Llama weights with padded embedding rows, the ChatML
chat template and a generation config with two stop ids."""
from __future__ import annotations

import json
from pathlib import Path

import jax

import envs
import models
from envs.tokenizer_bridge import oracle_texts
from models.tokenizer_training import train_tokenizer


def make_checkpoint_dir(path, env_names=("calculator",), *, vocab_size: int = 384,
                        pretokenize: str = "symbols", pad_rows: int = 13, d_model: int = 32,
                        n_layers: int = 2, seed: int = 0, tie_embeddings: bool = False,
                        architecture: str = "LlamaForCausalLM") -> Path:
    path = Path(path)
    texts = []
    for name in env_names:
        env = envs.make(name)
        texts += oracle_texts(env, episodes=32, seed=seed) + [" ".join(env.phrases)] * 4
    tok = train_tokenizer(texts, vocab_size, pretokenize=pretokenize)
    cfg = models.ModelConfig(vocab_size=len(tok) + pad_rows, d_model=d_model, n_layers=n_layers,
                             n_heads=4, n_kv_heads=2, d_ff=2 * d_model, max_seq_len=2048,
                             tie_embeddings=tie_embeddings,
                             qkv_bias=architecture == "Qwen2ForCausalLM")
    params = models.init_params(models.PolicyModel(cfg), jax.random.PRNGKey(seed))
    models.save_hf_checkpoint(cfg, params, path, architecture=architecture)
    tok.save_pretrained(str(path))
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    return path
