"""ModelConfig: the hyper-parameters of the Llama-style decoder (frozen, hashable, validated)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "pallas")
ROPE_TYPES = ("linear", "ntk", "yarn", "llama3")
# Keys each RoPE scaling type accepts besides "type" (all optional except "factor").
ROPE_KEYS = {
    "linear": ("factor",),
    "ntk": ("factor",),
    "yarn": ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor"),
}


def dtype_name(x: Any, field: str = "dtype") -> str:
    """Canonical name ("float32" / "bfloat16" / "float16") of a dtype given as name or dtype."""
    if isinstance(x, str):
        if x not in DTYPES:
            raise ValueError(f"ModelConfig.{field}={x!r} is not one of {sorted(DTYPES)}")
        return x
    try:
        name = jnp.dtype(x).name
    except TypeError as e:
        raise ValueError(f"ModelConfig.{field}={x!r} is not a dtype") from e
    if name not in DTYPES:
        raise ValueError(f"ModelConfig.{field}={x!r} ({name}) is not one of {sorted(DTYPES)}")
    return name


def _normalize_rope_scaling(rs: Any, max_seq_len: int) -> tuple | None:
    """dict (or a tuple of items) -> sorted tuple of (key, value) items; validated."""
    if rs is None:
        return None
    if isinstance(rs, tuple):
        try:
            rs = dict(rs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ModelConfig.rope_scaling must be None or a dict, got {rs!r}") from e
    if not isinstance(rs, dict):
        raise ValueError(f"ModelConfig.rope_scaling must be None or a dict, got {rs!r}")
    rs = dict(rs)
    if "rope_type" in rs and "type" not in rs:
        rs["type"] = rs.pop("rope_type")
    kind = rs.get("type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"ModelConfig.rope_scaling type {kind!r} is not one of {ROPE_TYPES} "
                         f"(use rope_scaling=None for plain RoPE)")
    unknown = sorted(set(rs) - {"type"} - set(ROPE_KEYS[kind]))
    if unknown:
        raise ValueError(f"ModelConfig.rope_scaling keys {unknown} are not used by type {kind!r}; "
                         f"allowed: {ROPE_KEYS[kind]}")
    if "factor" not in rs:
        raise ValueError(f"ModelConfig.rope_scaling of type {kind!r} needs a 'factor'")
    factor = rs["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) \
            or not math.isfinite(float(factor)) or float(factor) <= 0:
        raise ValueError(f"ModelConfig.rope_scaling factor must be a number > 0, got {factor!r}")
    out = {"type": kind}
    for k, v in rs.items():
        if k == "type":
            continue
        if k == "truncate":
            out[k] = bool(v)
        elif k == "original_max_seq_len":
            if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or int(v) != v or v < 1:
                raise ValueError(f"ModelConfig.rope_scaling original_max_seq_len must be a "
                                 f"positive int, got {v!r}")
            out[k] = int(v)
        elif v is None:
            continue
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
                raise ValueError(f"ModelConfig.rope_scaling {k} must be a number, got {v!r}")
            out[k] = float(v)
    if kind in ("yarn", "llama3"):
        out.setdefault("original_max_seq_len", int(max_seq_len))
    if kind == "llama3":
        out.setdefault("low_freq_factor", 1.0)
        out.setdefault("high_freq_factor", 4.0)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError(f"ModelConfig.rope_scaling llama3 high_freq_factor="
                             f"{out['high_freq_factor']} must exceed low_freq_factor="
                             f"{out['low_freq_factor']}")
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-style decoder hyper-parameters.

    ``rope_scaling``: None or a dict ``{"type": "linear"|"ntk"|"yarn"|"llama3", "factor": s,
    "original_max_seq_len": L0, ...}`` (yarn also: beta_fast=32, beta_slow=1, attention_factor,
    mscale, mscale_all_dim, truncate=True; llama3: low_freq_factor=1, high_freq_factor=4). It is
    stored as a sorted tuple of items so the config stays hashable; read it with
    ``cfg.rope_scaling_dict``. ``dtype`` / ``param_dtype`` are stored as names ("float32",
    "bfloat16", "float16"); dtypes are accepted too. ``head_dim`` defaults to d_model // n_heads.
    ``remat``: jax.checkpoint each layer. ``scan_layers``: nn.scan over layers (params stacked on
    a leading "layers" axis under ``model/layers``; otherwise ``model/layers_{i}``).
    ``pad_id``: token treated as padding by RewardModel when no segment_ids are given.
    ``vocab_limit``: None, or the number of real token ids (a tokenizer's ``len``) when the
    embedding has padded rows beyond them (Qwen2.5: 151,936 rows, 151,665 tokens): the policy's
    logits then cover ids ``[0, vocab_limit)`` only, so the padded rows are never sampled and
    every log-prob is normalised over the real tokens.
    """
    vocab_size: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 384
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_impl: str = "auto"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    head_dim: int | None = None
    qkv_bias: bool = False
    remat: bool = False
    scan_layers: bool = False
    pad_id: int = 0
    vocab_limit: int | None = None

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
            object.__setattr__(self, f, int(v))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads} (grouped-query attention needs "
                             f"n_heads % n_kv_heads == 0)")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                                 f"n_heads={self.n_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        hd = self.head_dim
        if isinstance(hd, bool) or not isinstance(hd, (int, np.integer)) or hd < 2 or hd % 2:
            raise ValueError(f"ModelConfig.head_dim={hd!r} must be a positive even int (RoPE "
                             f"rotates pairs of dimensions)")
        object.__setattr__(self, "head_dim", int(hd))
        for f in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) \
                    or not math.isfinite(float(v)) or float(v) <= 0:
                raise ValueError(f"ModelConfig.{f} must be a number > 0, got {v!r}")
            object.__setattr__(self, f, float(v))
        if self.rope_theta <= 1.0:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} must be > 1")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} is not one of "
                             f"{ATTENTION_IMPLS}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype, "param_dtype"))
        for f in ("tie_embeddings", "qkv_bias", "remat", "scan_layers"):
            v = getattr(self, f)
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{f} must be a bool, got {v!r}")
            object.__setattr__(self, f, bool(v))
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, (int, np.integer)) \
                or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ModelConfig.pad_id={self.pad_id!r} must be an int in "
                             f"[0, vocab_size={self.vocab_size})")
        object.__setattr__(self, "pad_id", int(self.pad_id))
        if self.vocab_limit is not None:
            vl = self.vocab_limit
            if isinstance(vl, bool) or not isinstance(vl, (int, np.integer)) \
                    or not 1 <= vl <= self.vocab_size:
                raise ValueError(f"ModelConfig.vocab_limit={vl!r} must be None or an int in "
                                 f"[1, vocab_size={self.vocab_size}]")
            object.__setattr__(self, "vocab_limit", None if int(vl) == self.vocab_size else int(vl))
        object.__setattr__(self, "rope_scaling",
                           _normalize_rope_scaling(self.rope_scaling, self.max_seq_len))

    @property
    def rope_scaling_dict(self) -> dict | None:
        """``rope_scaling`` as a dict (None for plain RoPE)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def compute_dtype(self):
        """Activation / matmul-input dtype (jnp dtype)."""
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        """Parameter storage dtype (jnp dtype)."""
        return DTYPES[self.param_dtype]

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        """JSON-able dict (rope_scaling as a dict); ``ModelConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
