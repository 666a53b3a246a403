"""ModelConfig: validation with clear errors, hashability, rope_scaling normalisation."""
import dataclasses

import jax.numpy as jnp
import pytest

from models import ModelConfig, PolicyModel


def test_defaults_and_derived_fields():
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2)
    assert cfg.head_dim == 16 and cfg.n_groups == 2
    assert cfg.dtype == "float32" and cfg.compute_dtype == jnp.float32
    assert ModelConfig(head_dim=12, d_model=50, n_heads=5, n_kv_heads=5).head_dim == 12


def test_hashable_and_module_attribute():
    rs = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 128}
    a = ModelConfig(rope_scaling=rs)
    b = ModelConfig(rope_scaling=dict(rs))
    assert hash(a) == hash(b) and a == b
    assert a.rope_scaling_dict["type"] == "yarn" and a.rope_scaling_dict["factor"] == 4.0
    assert isinstance(a.rope_scaling, tuple)
    assert hash(PolicyModel(a)) is not None            # usable as a linen module attribute
    # replace() round-trips the stored tuple form, and to_dict rebuilds an equal config
    assert dataclasses.replace(a, n_layers=3).rope_scaling == a.rope_scaling
    assert ModelConfig(**a.to_dict()) == a
    assert ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2}).rope_scaling_dict == \
        {"type": "linear", "factor": 2.0}


def test_dtypes_accept_names_and_dtypes():
    c = ModelConfig(dtype=jnp.bfloat16, param_dtype="float32")
    assert c.dtype == "bfloat16" and c.compute_dtype == jnp.bfloat16
    assert ModelConfig(dtype="bfloat16") == c
    with pytest.raises(ValueError, match="dtype='float8'"):
        ModelConfig(dtype="float8")
    with pytest.raises(ValueError, match="param_dtype"):
        ModelConfig(param_dtype=jnp.int32)


@pytest.mark.parametrize("kw, match", [
    (dict(n_heads=6, n_kv_heads=4, d_model=48), r"n_heads=6.*n_kv_heads=4"),
    (dict(d_model=50, n_heads=4), r"d_model=50.*n_heads=4"),
    (dict(vocab_size=0), r"vocab_size"),
    (dict(n_layers=2.5), r"n_layers"),
    (dict(head_dim=7), r"head_dim=7"),
    (dict(attention_impl="flash"), r"attention_impl='flash'"),
    (dict(rope_scaling={"type": "weird", "factor": 2.0}), r"'weird'"),
    (dict(rope_scaling={"type": "linear"}), r"factor"),
    (dict(rope_scaling={"type": "linear", "factor": -1.0}), r"factor"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "beta_fast": 3}), r"beta_fast"),
    (dict(rope_scaling=[("type", "linear")]), r"rope_scaling"),
    (dict(rope_theta=0.0), r"rope_theta"),
    (dict(rms_norm_eps=-1.0), r"rms_norm_eps"),
    (dict(pad_id=64, vocab_size=64), r"pad_id=64"),
    (dict(remat="yes"), r"remat"),
])
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_rope_defaults_filled():
    c = ModelConfig(max_seq_len=256, rope_scaling={"type": "yarn", "factor": 2.0})
    assert c.rope_scaling_dict["original_max_seq_len"] == 256
    l3 = ModelConfig(rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 64})
    assert l3.rope_scaling_dict["low_freq_factor"] == 1.0
    assert l3.rope_scaling_dict["high_freq_factor"] == 4.0
