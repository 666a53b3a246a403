"""A Hugging Face checkpoint as the policy: weights, tokenizer, chat template and stop ids.

``config.model.hf_checkpoint = DIR`` (a ``save_pretrained`` directory of a LlamaForCausalLM /
Qwen2ForCausalLM with its tokenizer files and, optionally, ``generation_config.json``):

    pre = load_pretrained(config.model, env)
    pre.env          # envs.tokenizer_bridge.BridgedEnv: the task in the tokenizer's ids
    pre.model_cfg    # models.ModelConfig from config.json (+ the run's dtype / attention knobs,
                     #   vocab_limit = len(tokenizer), rows added for new tag tokens)
    pre.params       # PolicyModel params: the checkpoint's, new tag rows = mean embedding
    pre.tokenizer    # transformers tokenizer, with the env tags added (tags="special")

The policy, the frozen reference and the value trunk all start from ``pre.params``. The
model's config fields (d_model, ...) of ``config.model`` are not read in this mode; its
``dtype``, ``param_dtype``, ``attention_impl``, ``remat`` and ``scan_layers`` are.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import models
from envs import tokenizer_bridge as tb
from envs.base import Env
from models.hf_io import ARCHITECTURES, config_from_hf

RUN_KNOBS = ("dtype", "param_dtype", "attention_impl", "remat", "scan_layers")


@dataclasses.dataclass(eq=False)
class Pretrained:
    env: tb.BridgedEnv
    model_cfg: models.ModelConfig
    params: dict
    tokenizer: Any
    bridge: tb.TokenizerBridge
    architecture: str
    path: str
    has_weights: bool = True     # False: params are zeros of the right shapes (restore targets)


def _grow(params: dict, cfg: models.ModelConfig, old_rows: int, rows: int) -> dict:
    """Embedding (and untied LM-head) rows [old_rows, rows) set to the mean of the first
    ``old_rows`` (``tokenizer_bridge.init_new_rows``); the tables grow if ``rows`` > V."""
    trunk = dict(params["model"])
    emb = np.asarray(trunk["embed_tokens"]["embedding"])
    trunk["embed_tokens"] = {"embedding": jnp.asarray(tb.init_new_rows(emb, old_rows, rows))}
    out = dict(params, model=trunk)
    if "lm_head" in params:
        w = np.asarray(params["lm_head"]["kernel"])                      # [D, V]
        out["lm_head"] = {"kernel": jnp.asarray(tb.init_new_rows(w.T, old_rows, rows).T)}
    return out


def check_checkpoint_dir(path: str) -> str | None:
    """One line naming what is wrong with an ``hf_checkpoint`` directory, or None."""
    p = Path(path)
    if not p.exists():
        return f"directory {path!r} does not exist"
    if not p.is_dir():
        return f"{path!r} is not a directory"
    if not (p / "config.json").exists():
        return f"no config.json in {path!r} (expected a save_pretrained directory)"
    if not any((p / f).exists() for f in tb.TOKENIZER_FILES):
        return (f"no tokenizer in {path!r} ({', '.join(tb.TOKENIZER_FILES)}; save the tokenizer "
                f"with the model)")
    return None


def load_pretrained(model_config, env: Env, weights: bool = True) -> Pretrained:
    """Load ``model_config.hf_checkpoint`` and bridge ``env`` to its tokenizer (module doc).
    ``weights=False``: the safetensors are not read (a run's base copy has none); ``params`` are
    zeros of the checkpoint's shapes, a target for restoring a trained state."""
    path = str(model_config.hf_checkpoint)
    problem = check_checkpoint_dir(path)
    if problem:
        raise ValueError(f"config.model.hf_checkpoint: {problem}")
    tokenizer = tb.load_tokenizer(path)
    n_before = len(tokenizer)
    stop_ids = tb.stop_ids_from(path, tokenizer)
    bridge = tb.build_bridge(tokenizer, stop_ids, tags=model_config.get("tags", "special"),
                             phrases=env.phrases)
    action_tokens = int(model_config.get("action_tokens", 0)) or None
    benv = tb.BridgedEnv(env, bridge, action_tokens=action_tokens, tokenizer=tokenizer)
    tb.warn_if_not_canonical(benv, tokenizer, episodes=8)    # renderings vs tokenizer.encode
    knobs = {k: model_config[k] for k in RUN_KNOBS if k in model_config}
    hf_cfg = json.loads(Path(path, "config.json").read_text())
    if weights:
        cfg, params = models.load_hf_checkpoint(path, **knobs)
    else:
        import jax
        cfg = config_from_hf(hf_cfg, **knobs)[0]
        shapes = jax.eval_shape(lambda: models.init_params(models.PolicyModel(cfg),
                                                           jax.random.PRNGKey(0)))
        params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    arch = config_from_hf(hf_cfg)[1]
    if n_before > cfg.vocab_size:
        raise ValueError(f"config.model.hf_checkpoint: the tokenizer has {n_before} ids but the "
                         f"model's vocab_size is {cfg.vocab_size}")
    rows = bridge.vocab_limit
    if rows > n_before:                                   # tag tokens were added
        params = _grow(params, cfg, n_before, rows)
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, rows), vocab_limit=rows)
    need = benv.max_episode_tokens
    if cfg.max_seq_len < need:
        raise ValueError(f"config.model.hf_checkpoint: an episode of {env.name} takes up to "
                         f"{need} tokens in this tokenizer but the model's "
                         f"max_position_embeddings is {cfg.max_seq_len}")
    return Pretrained(benv, cfg, params, tokenizer, bridge, arch, path, has_weights=weights)


def save_tokenizer(pre: Pretrained, out_dir) -> None:
    """The (tag-extended) tokenizer and ``generation_config.json`` (the checkpoint's, with the
    run's stop ids) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pre.tokenizer.save_pretrained(str(out_dir))
    gen_file = Path(pre.path, "generation_config.json")
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen["eos_token_id"] = list(pre.bridge.stop_ids)
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


#: a training workdir's copy of the checkpoint without its weights (``save_base``)
BASE_DIR = "hf_base"


def save_base(pre: Pretrained, model_cfg: models.ModelConfig, out_dir) -> None:
    """The checkpoint without its weights into ``out_dir``: ``config.json`` (its vocabulary as
    the run's tables: rows added for tags included), the tag-extended tokenizer and
    ``generation_config.json``. A run's workdir keeps one, so that its checkpoints restore and
    export after the original directory is gone (``load_pretrained(..., weights=False)``)."""
    out_dir = Path(out_dir)
    save_tokenizer(pre, out_dir)
    hf = json.loads(Path(pre.path, "config.json").read_text())
    hf["vocab_size"] = int(model_cfg.vocab_size)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


__all__ = ["Pretrained", "load_pretrained", "check_checkpoint_dir", "save_tokenizer", "save_base",
           "BASE_DIR", "ARCHITECTURES"]
