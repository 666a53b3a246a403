"""Export a trained policy as a Hugging Face ``save_pretrained`` directory.

    python -m experiments.export_hf --workdir DIR --out OUT [--step N]

Reads the run's config from ``DIR/config.json`` and its latest checkpoint (or ``--step``), and
writes to OUT: ``config.json`` + ``model.safetensors`` (the policy's weights in the
checkpoint's architecture, ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``; the vocabulary cut to
the tokenizer's ids, padded embedding rows dropped), the tokenizer (with the env tags the run added) and
``generation_config.json`` (the run's stop ids), so that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer`` load it.
The checkpoint's weights are not read (the trained ones are in the run's checkpoint); when the
``model.hf_checkpoint`` directory is gone, its weightless copy ``DIR/hf_base`` (written at the
start of training) gives the config and tokenizer.
Runs of the library's own model (no ``model.hf_checkpoint``) are exported with
``LlamaForCausalLM`` weights and no tokenizer (their vocabulary is ``envs.vocab``).
Errors (no workdir / checkpoint, a damaged checkpoint) exit with status 2 and one line.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("out", None, "Output directory for the save_pretrained files.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "out"])


def trim_vocab(cfg, params: dict):
    """(cfg, params) with the embedding / LM head cut to the ``cfg.vocab_limit`` real token ids:
    padded rows the policy never produced are not exported, so ``transformers`` generation
    samples exactly the ids our policy does."""
    n = cfg.vocab_limit
    if n is None:
        return cfg, params
    trunk = dict(params["model"])
    trunk["embed_tokens"] = {"embedding": trunk["embed_tokens"]["embedding"][:n]}
    out = dict(params, model=trunk)
    if "lm_head" in params:
        out["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :n]}
    return cfg.replace(vocab_size=n, vocab_limit=None), out


def export_state(trainer, state, out: str) -> dict:
    """Write the policy of a trainer's ``state`` to ``out`` (module docstring)."""
    import jax

    import models
    from rl_agents.pretrained import save_tokenizer

    params = jax.device_get(trainer.policy_weights(state.params["policy"]))
    pre = trainer.pretrained
    cfg, params = trim_vocab(trainer.model_cfg, params)
    arch = pre.architecture if pre is not None else "LlamaForCausalLM"
    models.save_hf_checkpoint(cfg, params, out, architecture=arch)
    if pre is not None:
        save_tokenizer(pre, out)
    return {"step": int(state.step), "out": os.path.abspath(out), "architecture": arch,
            "tokenizer": pre is not None}


def export_workdir(workdir: str, out: str, step: int | None = None) -> dict:
    """Write the policy of ``workdir``'s latest checkpoint (or ``step``) to ``out``."""
    from experiments.run import config_from_workdir, restore_latest

    trainer, state, _ = restore_latest(config_from_workdir(workdir), workdir, step=step)
    return export_state(trainer, state, out)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from experiments.checkpointing import CheckpointError
    from experiments.run import ConfigError
    try:
        res = export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"exported step {res['step']} ({res['architecture']}"
          f"{', with tokenizer' if res['tokenizer'] else ''}) to {res['out']}")


if __name__ == "__main__":
    app.run(main)
