"""Llama-style decoder (lead's compact implementation; see models/__init__.py)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("linear", "ntk", "yarn")


def _dtype(x):
    if isinstance(x, str):
        if x not in _DTYPES:
            raise ValueError(f"unknown dtype {x!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[x]
    return jnp.dtype(x).type if x is not None else jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                                 f"n_heads={self.n_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.attention_impl not in ("auto", "xla", "pallas"):
            raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}; use auto, xla or pallas")
        _dtype(self.dtype), _dtype(self.param_dtype)
        rs = self.rope_scaling
        if isinstance(rs, dict):
            if rs.get("type") not in ROPE_TYPES:
                raise ValueError(f"ModelConfig.rope_scaling type {rs.get('type')!r} is not one of {ROPE_TYPES}")
            if not float(rs.get("factor", 0)) > 0:
                raise ValueError(f"ModelConfig.rope_scaling factor must be > 0, got {rs.get('factor')!r}")
            object.__setattr__(self, "rope_scaling", tuple(sorted(rs.items())))
        elif rs is not None and not isinstance(rs, tuple):
            raise ValueError(f"ModelConfig.rope_scaling must be None or a dict, got {rs!r}")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def compute_dtype(self):
        return _dtype(self.dtype)

    @property
    def params_dtype(self):
        return _dtype(self.param_dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies θ_i = b^(−2i/d) after scaling, and the attention scale (YaRN mscale)."""
    d = cfg.head_dim
    base = float(cfg.rope_theta)
    rs = cfg.rope_scaling_dict
    idx = np.arange(0, d, 2, dtype=np.float64) / d
    if rs is None:
        return 1.0 / base ** idx, 1.0
    s = float(rs["factor"])
    if rs["type"] == "linear":
        return 1.0 / base ** idx / s, 1.0
    if rs["type"] == "ntk":
        return 1.0 / (base * s ** (d / (d - 2))) ** idx, 1.0
    # YaRN
    orig = float(rs.get("original_max_seq_len", cfg.max_seq_len))
    beta_fast, beta_slow = float(rs.get("beta_fast", 32.0)), float(rs.get("beta_slow", 1.0))
    inv = 1.0 / base ** idx

    def dim_for(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    inv = inv / s * (1 - extrap) + inv * extrap
    mscale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv, mscale


def apply_rope(x, positions, inv_freq, mscale=1.0):
    """x [B,T,H,D] rotated by angle m·θ_i (half-split layout as in HF Llama)."""
    ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B,T,D/2]
    cos = (jnp.cos(ang) * mscale)[:, :, None, :]
    sin = (jnp.sin(ang) * mscale)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * w.astype(jnp.float32)).astype(self.dtype)


def _dense(features, axes, name, cfg, use_bias=False):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return nn.DenseGeneral(features, use_bias=use_bias, dtype=cfg.compute_dtype,
                           param_dtype=cfg.params_dtype, kernel_init=init,
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:] if isinstance(features, int) else axes[1:]),
                           name=name)


def xla_attention(q, k, v, mask, scale):
    """q [B,T,H,D], k/v [B,S,Hkv,D], mask [B,T,S] bool → [B,T,H,D]; GQA by grouping q heads."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, t, hkv, g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None].any(-1, keepdims=True), p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


def _resolve_impl(impl):
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    return impl


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache=None, lengths=None):
        cfg = self.cfg
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = _dense((h, d), ("embed", "heads", "head_dim"), "q_proj", cfg, cfg.qkv_bias)(x)
        k = _dense((hkv, d), ("embed", "kv_heads", "head_dim"), "k_proj", cfg, cfg.qkv_bias)(x)
        v = _dense((hkv, d), ("embed", "kv_heads", "head_dim"), "v_proj", cfg, cfg.qkv_bias)(x)
        inv_freq, mscale = rope_inv_freq(cfg)
        q = apply_rope(q, positions, inv_freq, mscale)
        k = apply_rope(k, positions, inv_freq, mscale)
        scale = 1.0 / math.sqrt(d)
        new_cache = None
        if layer_cache is None:
            impl = _resolve_impl(cfg.attention_impl)
            if impl == "pallas":
                from pallas_kernels import flash_attention
                o = flash_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=scale)
            else:
                t = x.shape[1]
                causal = jnp.tril(jnp.ones((t, t), bool))
                mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]) \
                    & (segment_ids[:, None, :] != 0)
                o = xla_attention(q, k, v, mask, scale)
        else:
            ck, cv = layer_cache
            c = x.shape[1]
            write = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0))
            ck = write(ck, k.astype(ck.dtype), lengths)
            cv = write(cv, v.astype(cv.dtype), lengths)
            slots = jnp.arange(ck.shape[1])
            limit = lengths[:, None] + jnp.arange(c)[None]            # [B,C]
            mask = slots[None, None, :] <= limit[:, :, None]            # [B,C,S]
            o = xla_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, scale)
            new_cache = (ck, cv)
        o = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("heads", "head_dim", "embed")),
                            name="o_proj")(o)
        return o, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.d_ff, ("embed", "mlp"), "gate_proj", cfg)(x)
        up = _dense(cfg.d_ff, ("embed", "mlp"), "up_proj", cfg)(x)
        return _dense(cfg.d_model, ("mlp", "embed"), "down_proj", cfg)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache=None, lengths=None):
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="input_layernorm")(x)
        a, new_cache = Attention(cfg, name="self_attn")(h, positions, segment_ids, layer_cache, lengths)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="post_attention_layernorm")(x)
        return x + MLP(cfg, name="mlp")(h), new_cache


@struct.dataclass
class KVCache:
    k: jax.Array        # [L, B, S, Hkv, D]
    v: jax.Array
    lengths: jax.Array  # int32 [B]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                   jnp.zeros((batch_size,), jnp.int32))


class Trunk(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache: KVCache | None = None):
        cfg = self.cfg
        embed = self.param("embed_tokens", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
            cfg.params_dtype)
        x = jnp.take(embed, tokens, axis=0).astype(cfg.compute_dtype)
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        new_k, new_v = [], []
        for i in range(cfg.n_layers):
            lc = None if cache is None else (cache.k[i], cache.v[i])
            x, nc = layer_cls(cfg, name=f"layers_{i}")(
                x, positions, segment_ids, lc, None if cache is None else cache.lengths)
            if nc is not None:
                new_k.append(nc[0])
                new_v.append(nc[1])
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="norm")(x)
        return x, embed, (None if cache is None else (jnp.stack(new_k), jnp.stack(new_v)))


def _inputs(cfg, tokens, positions, segment_ids, cache, valid):
    b, t = tokens.shape
    if cache is not None:
        positions = cache.lengths[:, None] + jnp.arange(t)[None]
        segment_ids = jnp.ones((b, t), jnp.int32) if valid is None else valid.astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    return positions, segment_ids


def _new_cache(cache, kv, valid, t):
    if cache is None:
        return None
    n = t if valid is None else valid.sum(-1).astype(jnp.int32)
    return KVCache(kv[0], kv[1], cache.lengths + n)


class PolicyModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, valid=None):
        cfg = self.cfg
        positions, segment_ids = _inputs(cfg, tokens, positions, segment_ids, cache, valid)
        x, embed, kv = Trunk(cfg, name="model")(tokens, positions, segment_ids, cache)
        if cfg.tie_embeddings:
            logits = x.astype(jnp.float32) @ embed.astype(jnp.float32).T
        else:
            logits = _dense(cfg.vocab_size, ("embed", "vocab"), "lm_head", cfg)(x).astype(jnp.float32)
        new = _new_cache(cache, kv, valid, tokens.shape[1])
        return logits if cache is None else (logits, new)


class ValueModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, valid=None):
        cfg = self.cfg
        positions, segment_ids = _inputs(cfg, tokens, positions, segment_ids, cache, valid)
        x, _, kv = Trunk(cfg, name="model")(tokens, positions, segment_ids, cache)
        v = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.params_dtype, name="value_head",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x.astype(jnp.float32))[..., 0]
        new = _new_cache(cache, kv, valid, tokens.shape[1])
        return v if cache is None else (v, new)


class RewardModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        cfg = self.cfg
        pad_seg = segment_ids
        positions, segment_ids = _inputs(cfg, tokens, positions, segment_ids, None, None)
        x, _, _ = Trunk(cfg, name="model")(tokens, positions, segment_ids, None)
        r = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.params_dtype, name="reward_head",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x.astype(jnp.float32))[..., 0]
        real = (pad_seg != 0) if pad_seg is not None else (tokens != cfg.pad_id)
        t = tokens.shape[1]
        last = jnp.max(jnp.where(real, jnp.arange(t)[None], 0), axis=1)
        return jnp.take_along_axis(r, last[:, None], axis=1)[:, 0]


def prefill(model, params, tokens, cache: KVCache, valid=None):
    return model.apply({"params": params}, tokens, cache=cache, valid=valid)


def decode_step(model, params, token, cache: KVCache, valid=None):
    out, cache = model.apply({"params": params}, token[:, None], cache=cache,
                             valid=None if valid is None else valid[:, None])
    return out[:, 0], cache


def init_params(model, key, batch: int = 1, seq: int = 8):
    return nn.meta.unbox(model.init(key, jnp.zeros((batch, seq), jnp.int32))["params"])


def _copy_trunk(policy_params, head_params):
    out = dict(head_params)
    out["model"] = policy_params["model"]
    return out


init_value_from_policy = _copy_trunk
init_reward_from_policy = _copy_trunk

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None), ("layers", None),
)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
