"""Hugging Face checkpoint import / export (LlamaForCausalLM, Qwen2ForCausalLM), no torch needed.

Reads a ``save_pretrained`` directory: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json. Safetensors are parsed directly (8-byte header length, JSON header,
raw little-endian buffers; bfloat16 via ml_dtypes), memory-mapped. RoPE settings are read from
either transformers-4 style (``rope_theta`` + ``rope_scaling``) or transformers-5 style
(``rope_parameters`` with ``rope_type``, ``rope_theta``, ``factor``, ...).

Weight mapping (torch Linear weights are [out, in]; ours are [in, out...]):
    model.embed_tokens.weight [V, D]            → model/embed_tokens/embedding
    model.layers.i.self_attn.q_proj.weight [H·Dh, D] → model/layers_i/self_attn/q_proj/kernel [D, H, Dh]
    ... .q_proj.bias [H·Dh]                      → .../q_proj/bias [H, Dh]   (k, v alike with Hkv)
    ... .o_proj.weight [D, H·Dh]                 → .../o_proj/kernel [H, Dh, D]
    ... .mlp.{gate,up}_proj.weight [F, D]        → .../mlp/{gate,up}_proj/kernel [D, F]
    ... .mlp.down_proj.weight [D, F]             → .../mlp/down_proj/kernel [F, D]
    ... .{input,post_attention}_layernorm.weight → .../scale;  model.norm.weight → model/norm/scale
    lm_head.weight [V, D]                        → lm_head/kernel [D, V]  (absent when tied)
HF's rotate-half RoPE layout is the one models.rope uses, so no permutation is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_NP_PARAM_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- safetensors
def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as (memory-mapped, read-only) NumPy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (bad JSON header)") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        start, end = info["data_offsets"]
        arr = data[start:end].view(_ST_DTYPES[dt]).reshape(info["shape"])
        out[name] = arr
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write tensors as a .safetensors file (header padded to 8 bytes, offsets in name order)."""
    header, offset, bufs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"write_safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        nbytes = arr.nbytes
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        bufs.append(arr.tobytes())
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for b in bufs:
            f.write(b)


# --------------------------------------------------------------------------- config
def _rope_from_hf(hf: dict, max_seq_len: int) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from transformers-5 ``rope_parameters`` or transformers-4
    ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"config.json rope_parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json has per-layer-type rope_parameters; only one global RoPE "
                         "setting is supported")
    scaling = dict(params or {})
    if hf.get("rope_scaling"):
        if not isinstance(hf["rope_scaling"], dict):
            raise ValueError(f"config.json rope_scaling must be a dict, got {hf['rope_scaling']!r}")
        scaling = {**hf["rope_scaling"], **scaling}
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    orig = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": scaling["factor"]}
    if kind == "yarn":
        out = {"type": "yarn", "factor": scaling.get("factor"),
               "original_max_seq_len": orig or max_seq_len}
        if out["factor"] is None:
            out["factor"] = max_seq_len / out["original_max_seq_len"]
        for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"):
            if scaling.get(k) is not None:
                out[k] = scaling[k]
        return float(theta), out
    if kind == "llama3":
        return float(theta), {"type": "llama3", "factor": scaling["factor"],
                              "original_max_seq_len": orig or max_seq_len,
                              "low_freq_factor": scaling.get("low_freq_factor", 1.0),
                              "high_freq_factor": scaling.get("high_freq_factor", 4.0)}
    raise ValueError(f"config.json RoPE type {kind!r} is not supported (supported: default, "
                     f"linear, yarn, llama3; 'dynamic' NTK depends on the running length)")


def config_from_hf(hf: dict, **overrides) -> tuple[ModelConfig, str, bool]:
    """(ModelConfig, architecture, o_proj has a bias) from a parsed config.json dict."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        if not archs and hf.get("model_type") in by_type:
            arch = by_type[hf["model_type"]]
        else:
            raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                             f"supported: {sorted(ARCHITECTURES)}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    o_bias = False
    if arch == "Qwen2ForCausalLM":
        qkv_bias = True
        if hf.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=True (Qwen2 sliding-window "
                             "attention) is not supported")
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        if hf.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=True is not supported")
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    theta, scaling = _rope_from_hf(hf, max_seq_len)
    n_heads = int(hf["num_attention_heads"])
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), d_ff=int(hf["intermediate_size"]),
        max_seq_len=max_seq_len, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=hf.get("head_dim") or None, qkv_bias=qkv_bias)
    if isinstance(hf.get("pad_token_id"), int) and 0 <= hf["pad_token_id"] < fields["vocab_size"]:
        fields["pad_id"] = hf["pad_token_id"]
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown ModelConfig overrides {unknown}")
    fields.update(overrides)
    return ModelConfig(**fields), arch, o_bias


# --------------------------------------------------------------------------- load
def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        raise FileNotFoundError(f"no *.safetensors weights in {path}"
                                + (f" (found {other}; only safetensors are supported)" if other else ""))
    tensors = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"weight shard {f} (listed in the index) does not exist")
        tensors.update(read_safetensors(f))
    return tensors


def load_hf_checkpoint(path, **overrides) -> tuple[ModelConfig, dict]:
    """Import a ``save_pretrained`` directory of LlamaForCausalLM / Qwen2ForCausalLM.

    Returns (ModelConfig, params) with params a plain nested dict for ``PolicyModel``.
    ``overrides`` replace ModelConfig fields (e.g. dtype="bfloat16", param_dtype="bfloat16",
    scan_layers=True, attention_impl="xla"); params are cast to ``param_dtype`` (float32 unless
    overridden) and stacked when scan_layers. Raises FileNotFoundError / ValueError naming the
    problem for a missing directory, config.json or weights, an unsupported architecture or RoPE
    type, a missing / unexpected tensor or a shape mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"HF checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"HF checkpoint path {path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in HF checkpoint directory {path}")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    cfg, _, o_bias = config_from_hf(hf, **overrides)
    tensors = _load_tensors(path)
    np_dtype = _NP_PARAM_DTYPES[cfg.param_dtype]
    used = set()

    def get(name, shape, transform=lambda w: w):
        if name not in tensors:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {path}")
        w = tensors[name]
        used.add(name)
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)} "
                             f"from config.json")
        return jnp.asarray(np.asarray(transform(np.asarray(w, np.float32))).astype(np_dtype))

    d, h, hkv, dh, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size)
    trunk = {"embed_tokens": {"embedding": get("model.embed_tokens.weight", (v, d))},
             "norm": {"scale": get("model.norm.weight", (d,))}}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        attn = {}
        for proj, heads in (("q_proj", h), ("k_proj", hkv), ("v_proj", hkv)):
            attn[proj] = {"kernel": get(p + f"self_attn.{proj}.weight", (heads * dh, d),
                                        lambda w, n=heads: w.T.reshape(d, n, dh))}
            if cfg.qkv_bias:
                attn[proj]["bias"] = get(p + f"self_attn.{proj}.bias", (heads * dh,),
                                         lambda w, n=heads: w.reshape(n, dh))
        attn["o_proj"] = {"kernel": get(p + "self_attn.o_proj.weight", (d, h * dh),
                                        lambda w: w.T.reshape(h, dh, d))}
        if o_bias:
            b = get(p + "self_attn.o_proj.bias", (d,))
            if np.any(np.asarray(b, np.float32) != 0):
                raise ValueError(f"tensor {p}self_attn.o_proj.bias is non-zero; an o_proj bias is "
                                 f"not supported")
        trunk[f"layers_{i}"] = {
            "input_layernorm": {"scale": get(p + "input_layernorm.weight", (d,))},
            "post_attention_layernorm": {"scale": get(p + "post_attention_layernorm.weight", (d,))},
            "self_attn": attn,
            "mlp": {"gate_proj": {"kernel": get(p + "mlp.gate_proj.weight", (f, d), np.transpose)},
                    "up_proj": {"kernel": get(p + "mlp.up_proj.weight", (f, d), np.transpose)},
                    "down_proj": {"kernel": get(p + "mlp.down_proj.weight", (d, f), np.transpose)}},
        }
    params = {"model": trunk}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (v, d), np.transpose)}
    elif "lm_head.weight" in tensors:       # tied checkpoints may still store a copy
        used.add("lm_head.weight")
    extra = sorted(k for k in set(tensors) - used if not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"unexpected tensors in {path} (not part of a {cfg.n_layers}-layer "
                         f"model): {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if cfg.scan_layers:
        from models.transformer import stack_layer_params
        params = stack_layer_params(params, cfg.n_layers)
    return cfg, params


# --------------------------------------------------------------------------- save
def _rope_to_hf(cfg: ModelConfig) -> dict:
    rs = cfg.rope_scaling_dict
    out = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs is None:
        return out
    if rs["type"] == "ntk":
        raise ValueError("rope_scaling type 'ntk' (static NTK-aware) has no Hugging Face "
                         "equivalent; cannot save it")
    out.update({"rope_type": rs["type"], "factor": rs["factor"]})
    if "original_max_seq_len" in rs:
        out["original_max_position_embeddings"] = rs["original_max_seq_len"]
    for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
              "low_freq_factor", "high_freq_factor"):
        if k in rs:
            out[k] = rs[k]
    return out


def save_hf_checkpoint(cfg: ModelConfig, params: dict, path,
                       architecture: str = "LlamaForCausalLM") -> None:
    """Write config.json (transformers-5 ``rope_parameters`` plus top-level ``rope_theta``) and
    model.safetensors that ``AutoModelForCausalLM.from_pretrained(path)`` loads. Weights are
    stored in cfg.param_dtype. Qwen2 always has q/k/v biases (zeros when cfg.qkv_bias is False);
    a Llama with qkv_bias is written with attention_bias=True and a zero o_proj bias."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not one of {sorted(ARCHITECTURES)}")
    if not isinstance(params, dict) or "model" not in params:
        raise ValueError("params must be a PolicyModel params dict with a 'model' entry")
    if "layers" in params["model"]:
        from models.transformer import unstack_layer_params
        params = unstack_layer_params(params)
    rope = _rope_to_hf(cfg)
    np_dtype = _NP_PARAM_DTYPES[cfg.param_dtype]
    d, h, hkv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qwen = architecture == "Qwen2ForCausalLM"

    def arr(x, transform=lambda w: w):
        return np.ascontiguousarray(transform(np.asarray(x, np.float32))).astype(np_dtype)

    trunk = params["model"]
    t = {"model.embed_tokens.weight": arr(trunk["embed_tokens"]["embedding"]),
         "model.norm.weight": arr(trunk["norm"]["scale"])}
    for i in range(cfg.n_layers):
        if f"layers_{i}" not in trunk:
            raise ValueError(f"params['model'] lacks layers_{i} (cfg.n_layers={cfg.n_layers})")
        lp, p = trunk[f"layers_{i}"], f"model.layers.{i}."
        for proj, heads in (("q_proj", h), ("k_proj", hkv), ("v_proj", hkv)):
            q = lp["self_attn"][proj]
            t[p + f"self_attn.{proj}.weight"] = arr(q["kernel"], lambda w: w.reshape(d, heads * dh).T)
            if cfg.qkv_bias or qwen:
                bias = q["bias"] if cfg.qkv_bias else np.zeros((heads, dh), np.float32)
                t[p + f"self_attn.{proj}.bias"] = arr(bias, lambda w: w.reshape(-1))
        t[p + "self_attn.o_proj.weight"] = arr(lp["self_attn"]["o_proj"]["kernel"],
                                               lambda w: w.reshape(h * dh, d).T)
        if cfg.qkv_bias and not qwen:
            t[p + "self_attn.o_proj.bias"] = np.zeros((d,), np_dtype)
        t[p + "input_layernorm.weight"] = arr(lp["input_layernorm"]["scale"])
        t[p + "post_attention_layernorm.weight"] = arr(lp["post_attention_layernorm"]["scale"])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            t[p + f"mlp.{proj}.weight"] = arr(lp["mlp"][proj]["kernel"], np.transpose)
    if not cfg.tie_embeddings:
        if "lm_head" not in params:
            raise ValueError("params lack 'lm_head' but cfg.tie_embeddings is False")
        t["lm_head.weight"] = arr(params["lm_head"]["kernel"], np.transpose)
    hf = {
        "architectures": [architecture], "model_type": ARCHITECTURES[architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": d, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": h, "num_key_value_heads": hkv,
        "head_dim": dh, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "dtype": cfg.param_dtype,
        "pad_token_id": cfg.pad_id,
    }
    if qwen:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    os.makedirs(path, exist_ok=True)
    Path(path, "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    write_safetensors(Path(path, "model.safetensors"), t, {"format": "pt"})
