"""Hugging Face import / export against transformers + torch (CPU, tiny random models)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import PolicyModel
from models.hf_io import read_safetensors, write_safetensors
from tests.models.helpers import fwd, random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
            rms_norm_eps=1e-6)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def build(arch="llama", seed=0, **kw):
    """A tiny random transformers model (all weights incl. norms / biases perturbed)."""
    torch.manual_seed(seed)
    if arch == "llama":
        conf, cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    else:
        conf, cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    model = cls(conf(**{**TINY, **kw}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.copy_(1.0 + 0.1 * torch.randn_like(prm))
            else:
                prm.copy_(0.1 * torch.randn_like(prm))
    return model


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def our_logits(cfg, params, tokens=TOKENS):
    m = PolicyModel(cfg.replace(attention_impl="xla"))
    return np.asarray(fwd(m)(params, jnp.asarray(tokens, jnp.int32)))


def roundtrip(tmp_path, arch="llama", **kw):
    model = build(arch, **kw)
    model.save_pretrained(tmp_path)
    cfg, params = models.load_hf_checkpoint(tmp_path)
    np.testing.assert_allclose(our_logits(cfg, params), torch_logits(model), atol=1e-4, rtol=1e-4)
    return cfg, params, model


def test_llama_untied(tmp_path):
    cfg, params, _ = roundtrip(tmp_path, tie_word_embeddings=False)
    assert not cfg.tie_embeddings and "lm_head" in params and not cfg.qkv_bias
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.head_dim) == \
        (64, 2, 4, 2, 128, 16)
    assert params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (64, 4, 16)
    assert params["model"]["embed_tokens"]["embedding"].dtype == jnp.float32


def test_llama_tied(tmp_path):
    cfg, params, _ = roundtrip(tmp_path, tie_word_embeddings=True)
    assert cfg.tie_embeddings and "lm_head" not in params


def test_qwen2_biases_gqa(tmp_path):
    cfg, params, model = roundtrip(tmp_path, arch="qwen2", tie_word_embeddings=False,
                                   num_key_value_heads=1)
    assert cfg.qkv_bias and cfg.n_kv_heads == 1
    b = params["model"]["layers_1"]["self_attn"]["k_proj"]["bias"]
    np.testing.assert_allclose(np.asarray(b).reshape(-1),
                               model.model.layers[1].self_attn.k_proj.bias.detach().numpy())


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4,
     "rope_theta": 500000.0},
])
def test_llama_rope_scaling_both_config_formats(tmp_path, rope):
    cfg, params, model = roundtrip(tmp_path / "v5", rope_parameters=dict(rope))
    saved = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == rope["rope_type"]      # transformers-5 format
    assert cfg.rope_scaling_dict["type"] == rope["rope_type"]
    assert cfg.rope_theta == rope["rope_theta"]
    if rope["rope_type"] == "yarn":
        assert cfg.rope_scaling_dict["original_max_seq_len"] == 4
    # the same checkpoint described transformers-4 style: rope_theta + rope_scaling
    v4 = dict(saved)
    del v4["rope_parameters"]
    v4["rope_theta"] = rope["rope_theta"]
    v4["rope_scaling"] = {"type": rope["rope_type"]}
    v4["rope_scaling"].update({k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")})
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text(json.dumps(v4))
    (tmp_path / "v4" / "model.safetensors").write_bytes(
        (tmp_path / "v5" / "model.safetensors").read_bytes())
    cfg4, params4 = models.load_hf_checkpoint(tmp_path / "v4")
    assert cfg4 == cfg
    np.testing.assert_allclose(our_logits(cfg4, params4), torch_logits(model), atol=1e-4, rtol=1e-4)
    # scaling matters at these positions: plain RoPE gives different logits
    plain = our_logits(cfg.replace(rope_scaling=None), params)
    assert np.abs(plain - torch_logits(model)).max() > 1e-3


def test_sharded_checkpoint_and_bf16(tmp_path):
    import copy
    ref = build(tie_word_embeddings=False)
    with torch.no_grad():                         # weights exactly representable in bfloat16
        for prm in ref.parameters():
            prm.copy_(prm.bfloat16().float())
    # (a float32 reference: .to(bfloat16) would also round torch's RoPE inv_freq buffer)
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    cfg, params = models.load_hf_checkpoint(tmp_path)
    np.testing.assert_allclose(our_logits(cfg, params), torch_logits(ref), atol=1e-4, rtol=1e-4)
    # overrides: bf16 params, scan_layers (stacked)
    cfg_b, params_b = models.load_hf_checkpoint(tmp_path, param_dtype="bfloat16", scan_layers=True)
    assert cfg_b.scan_layers and "layers" in params_b["model"]
    assert params_b["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 128)
    assert params_b["model"]["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(our_logits(cfg_b, params_b), torch_logits(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, kw", [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_embeddings": True, "qkv_bias": True, "scan_layers": True,
                          "rope_scaling": {"type": "yarn", "factor": 4.0,
                                           "original_max_seq_len": 4}}),
    ("Qwen2ForCausalLM", {"qkv_bias": True, "n_kv_heads": 1}),
    ("Qwen2ForCausalLM", {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}),
])
def test_save_then_transformers_loads_same_logits(tmp_path, arch, kw):
    cfg = models.ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                       n_kv_heads=2, d_ff=48, max_seq_len=64,
                                       attention_impl="xla"), **kw})
    params = random_params(PolicyModel(cfg), seed=5, scale=0.1)
    models.save_hf_checkpoint(cfg, params, tmp_path, architecture=arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(hf).__name__ == arch
    np.testing.assert_allclose(torch_logits(hf.float().eval()), our_logits(cfg, params),
                               atol=1e-4, rtol=1e-4)
    cfg2, params2 = models.load_hf_checkpoint(tmp_path, scan_layers=cfg.scan_layers)
    assert cfg2.replace(attention_impl="xla", qkv_bias=cfg.qkv_bias) == cfg   # Qwen2: biases
    assert cfg2.qkv_bias == (cfg.qkv_bias or arch == "Qwen2ForCausalLM")      # zeros if absent
    np.testing.assert_allclose(our_logits(cfg2, params2), our_logits(cfg, params), atol=1e-5)


def test_save_rejects_ntk_and_bad_arch(tmp_path):
    cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             d_ff=48, rope_scaling={"type": "ntk", "factor": 2.0})
    params = random_params(PolicyModel(cfg))
    with pytest.raises(ValueError, match="ntk"):
        models.save_hf_checkpoint(cfg, params, tmp_path)
    with pytest.raises(ValueError, match="architecture='GPT2LMHeadModel'"):
        models.save_hf_checkpoint(cfg.replace(rope_scaling=None), params, tmp_path,
                                  architecture="GPT2LMHeadModel")


def test_safetensors_reader_writer(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file
    rng = np.random.default_rng(0)
    t = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
         "c": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "x.safetensors", t)
    back = read_safetensors(tmp_path / "x.safetensors")
    for k in t:
        assert back[k].dtype == t[k].dtype
        np.testing.assert_array_equal(np.asarray(back[k], np.float64), np.asarray(t[k], np.float64))
    save_file({k: v for k, v in t.items() if k != "c"}, str(tmp_path / "y.safetensors"))
    y = read_safetensors(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(y["a"], t["a"])
    write_safetensors(tmp_path / "z.safetensors", {"a": t["a"]})
    np.testing.assert_array_equal(load_file(str(tmp_path / "z.safetensors"))["a"], t["a"])


# --------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    build(num_hidden_layers=1).save_pretrained(d)
    return d


def _copy(good_dir, dst, config_edit=None, weights=True):
    dst.mkdir()
    conf = json.loads((good_dir / "config.json").read_text())
    if config_edit:
        config_edit(conf)
    (dst / "config.json").write_text(json.dumps(conf))
    if weights:
        (dst / "model.safetensors").write_bytes((good_dir / "model.safetensors").read_bytes())
    return dst


def test_error_missing_dir_and_files(tmp_path, good_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_hf_checkpoint(tmp_path / "empty")
    d = _copy(good_dir, tmp_path / "noweights", weights=False)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model.bin"):
        models.load_hf_checkpoint(d)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        models.load_hf_checkpoint(tmp_path / "file")


@pytest.mark.parametrize("edit, exc, match", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"), ValueError,
     "unsupported architecture.*GPT2LMHeadModel"),
    (lambda c: c.update(intermediate_size=96), ValueError,
     r"mlp.gate_proj.weight.*shape \(128, 64\), expected \(96, 64\)"),
    (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), ValueError,
     "RoPE type 'longrope'"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), ValueError,
     "RoPE type 'dynamic'"),
    (lambda c: c.update(num_hidden_layers=2), ValueError, r"model.layers.1.*missing"),
    (lambda c: c.update(hidden_act="gelu"), ValueError, "hidden_act='gelu'"),
])
def test_error_bad_config(tmp_path, good_dir, edit, exc, match):
    d = _copy(good_dir, tmp_path / "bad", edit)
    with pytest.raises(exc, match=match):
        models.load_hf_checkpoint(d)


def test_error_bad_json_and_overrides(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load_hf_checkpoint(d)
    with pytest.raises(ValueError, match="unknown ModelConfig overrides"):
        models.load_hf_checkpoint(good_dir, n_experts=4)


def test_error_missing_or_unexpected_tensors(tmp_path, good_dir):
    tied = tmp_path / "tied"
    build(num_hidden_layers=1, tie_word_embeddings=True).save_pretrained(tied)
    d = _copy(tied, tmp_path / "untied", lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"'lm_head.weight' is missing"):
        models.load_hf_checkpoint(d)
    d = _copy(good_dir, tmp_path / "extra")
    t = dict(read_safetensors(d / "model.safetensors"))
    t["model.layers.7.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
    write_safetensors(d / "model.safetensors", {k: np.array(v) for k, v in t.items()})
    with pytest.raises(ValueError, match=r"unexpected tensors.*model.layers.7"):
        models.load_hf_checkpoint(d)
