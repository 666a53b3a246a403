"""Logical-axis annotations, rules → mesh specs, sharded forward == unsharded (8 CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import models
from models import LOGICAL_AXIS_RULES, ModelConfig, PolicyModel, ValueModel
from models.sharding import fit_spec, logical_param_specs, mesh_param_specs, param_shardings
from tests.models.helpers import fwd, random_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=64, attention_impl="xla")


def mesh_(shape):
    if len(jax.devices()) < int(np.prod(shape)):
        pytest.skip("needs 8 (forced host) devices")
    devs = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
    return Mesh(devs, ("data", "fsdp", "tensor"))


def test_every_param_is_annotated():
    for cfg in (CFG, CFG.replace(scan_layers=True, qkv_bias=True)):
        for cls in (PolicyModel, ValueModel, models.RewardModel):
            specs = logical_param_specs(cls(cfg))
            shapes = jax.eval_shape(lambda: random_params(cls(cfg)))
            for (path, spec), leaf in zip(
                    jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)),
                    jax.tree.leaves(shapes)):
                assert isinstance(spec, P), path
                assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
                if "head" not in jax.tree_util.keystr(path):       # heads' scalar output axis
                    assert None not in spec, (path, spec)


def test_logical_specs_follow_hf_layout():
    s = logical_param_specs(CFG)
    layer = s["model"]["layers_0"]
    assert s["model"]["embed_tokens"]["embedding"] == P("vocab", "embed")
    assert layer["self_attn"]["q_proj"]["kernel"] == P("embed", "heads", "head_dim")
    assert layer["self_attn"]["k_proj"]["kernel"] == P("embed", "kv_heads", "head_dim")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("heads", "head_dim", "embed")
    assert layer["mlp"]["down_proj"]["kernel"] == P("mlp", "embed")
    assert s["lm_head"]["kernel"] == P("embed", "vocab")
    stacked = logical_param_specs(CFG.replace(scan_layers=True))["model"]["layers"]
    assert stacked["mlp"]["gate_proj"]["kernel"] == P("layers", "embed", "mlp")
    assert stacked["input_layernorm"]["scale"] == P("layers", "embed")


def test_mesh_specs_are_what_the_rules_say():
    rules = dict(LOGICAL_AXIS_RULES)
    assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
    assert all(rules[a] == "tensor" for a in ("mlp", "heads", "kv_heads", "vocab"))
    assert rules["head_dim"] is None and rules["layers"] is None
    mesh = mesh_((2, 2, 2))
    sh = param_shardings(PolicyModel(CFG), mesh)
    layer = sh["model"]["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"].spec == P("tensor", None, "fsdp")
    assert layer["mlp"]["gate_proj"]["kernel"].spec == P("fsdp", "tensor")
    assert layer["input_layernorm"]["scale"].spec == P("fsdp")
    assert sh["model"]["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert sh["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    specs = mesh_param_specs(CFG.replace(scan_layers=True))
    assert specs["model"]["layers"]["self_attn"]["k_proj"]["kernel"] == P(None, "fsdp", "tensor", None)


def test_sharded_forward_equals_unsharded():
    mesh = mesh_((2, 2, 2))
    m = PolicyModel(CFG)
    p = random_params(m, seed=3)
    shardings = param_shardings(m, mesh)
    ps = jax.device_put(p, shardings)
    q = ps["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == shardings["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (16, 2, 8)          # [32/fsdp, 4/tensor, 8]
    toks = jnp.asarray(np.random.default_rng(0).integers(1, 64, (4, 6)), jnp.int32)
    tok_sh = NamedSharding(mesh, P(("data", "fsdp")))
    f = jax.jit(lambda params, t: m.apply({"params": params}, t), in_shardings=(shardings, tok_sh))
    out = f(ps, jax.device_put(toks, tok_sh))
    np.testing.assert_allclose(out, fwd(m)(p, toks), atol=1e-5, rtol=1e-5)


def test_non_divisible_dims_fall_back_to_replication():
    mesh = mesh_((1, 2, 4))
    cfg = CFG.replace(d_ff=38)               # 38 % 4 != 0; n_kv_heads 2 % 4 != 0; vocab 64 % 4 == 0
    fallbacks = []
    sh = param_shardings(PolicyModel(cfg), mesh, fallbacks=fallbacks)
    layer = sh["model"]["layers_0"]
    assert sh["lm_head"]["kernel"].spec == P("fsdp", "tensor")          # vocab 64 over 4: fine
    assert layer["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")  # 4 heads over 4
    assert layer["self_attn"]["k_proj"]["kernel"].spec == P("fsdp")     # 2 kv heads: replicated
    assert layer["mlp"]["gate_proj"]["kernel"].spec == P("fsdp")        # d_ff 38: replicated
    paths = {f[0] for f in fallbacks}
    assert any("k_proj" in x for x in paths) and any("gate_proj" in x for x in paths)
    assert not any("lm_head" in x for x in paths)
    m = PolicyModel(cfg)
    p = random_params(m)
    toks = jnp.ones((2, 5), jnp.int32)
    out = jax.jit(lambda params, t: m.apply({"params": params}, t), in_shardings=(sh, None))(
        jax.device_put(p, sh), toks)
    np.testing.assert_allclose(out, fwd(m)(p, toks), atol=1e-5, rtol=1e-5)
    # fit_spec itself
    assert fit_spec(P(("data", "fsdp"), "tensor"), (5, 8), mesh) == P(None, "tensor")
    assert fit_spec(P(("fsdp", "tensor")), (8, 3), mesh) == P(("fsdp", "tensor"))
