"""Llama-style decoder trunk and its policy / value / reward heads.

Parameter tree (names follow Hugging Face so the checkpoint mapping is obvious)::

    model/embed_tokens/embedding                 [vocab, d_model]
    model/layers_{i}/input_layernorm/scale       [d_model]          (scan_layers: model/layers/...
    model/layers_{i}/self_attn/{q,k,v}_proj/kernel [d_model, heads, head_dim]  with a leading
    model/layers_{i}/self_attn/{q,k,v}_proj/bias   [heads, head_dim] (qkv_bias)  n_layers axis)
    model/layers_{i}/self_attn/o_proj/kernel     [heads, head_dim, d_model]
    model/layers_{i}/post_attention_layernorm/scale
    model/layers_{i}/mlp/{gate,up}_proj/kernel   [d_model, d_ff];  mlp/down_proj/kernel [d_ff, d_model]
    model/norm/scale
    lm_head/kernel [d_model, vocab] (PolicyModel, untied) | value_head/* | reward_head/*

Block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)); final RMSNorm.
Inputs: tokens int32 [B, T]; positions [B, T] (default arange(T)); segment_ids int32 [B, T]
(default ones): a token attends to earlier-or-equal positions of the row with the same id; id 0
is padding (its outputs are finite garbage and never reach real tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models.attention import Attention
from models.config import ModelConfig
from models.kv_cache import KVCache, check_cache, chunk_positions, write_chunk
from models.layers import MLP, Dense, Embed, RMSNorm


class DecoderLayer(nn.Module):
    """One pre-norm block; returns (x, new chunk K/V or None)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, lengths):
        cfg = self.cfg
        kw = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        h = RMSNorm(name="input_layernorm", **kw)(x)
        a, new_kv = Attention(cfg, name="self_attn")(h, positions, segment_ids, layer_cache, lengths)
        x = x + a
        h = RMSNorm(name="post_attention_layernorm", **kw)(x)
        x = x + MLP(cfg.d_ff, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="mlp")(h)
        return x, new_kv


class Trunk(nn.Module):
    """Embedding, n_layers decoder blocks (unrolled or nn.scan, optionally rematerialised) and the
    final norm. ``__call__`` returns (hidden [B,T,D] in cfg.dtype, per-layer chunk K/V
    [L,B,T,Hkv,Dh] pair when a cache is given else None)."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.params_dtype)
        layer_cls = DecoderLayer
        if cfg.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.n_layers)]
        self.norm = RMSNorm(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype)

    def __call__(self, tokens, positions, segment_ids, cache: KVCache | None = None,
                 kv_len: int | None = None):
        """``kv_len`` (static, with a cache): attend only over cache slots [0, kv_len) — exact
        when every row's length <= kv_len (later slots are masked anyway)."""
        x = self.embed_tokens(tokens)
        lengths = None if cache is None else cache.lengths
        s = None if cache is None else (cache.k.shape[2] if kv_len is None else kv_len)
        if self.cfg.scan_layers:
            kv_in = None if cache is None else (cache.k[:, :, :s], cache.v[:, :, :s])
            x, new_kv = self.layers(x, kv_in, positions, segment_ids, lengths)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                lc = None if cache is None else (cache.k[i, :, :s], cache.v[i, :, :s])
                x, kv = layer(x, lc, positions, segment_ids, lengths)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_kv = (jnp.stack(ks), jnp.stack(vs)) if ks else None
        return self.norm(x), new_kv

    def attend(self, x):
        """Tied output projection: float32 logits x · Eᵀ."""
        return self.embed_tokens.attend(x)


def _prepare(cfg: ModelConfig, tokens, positions, segment_ids, cache, valid):
    """Default / check positions and segment ids; with a cache: positions = lengths + arange(C)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [B, T], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    b, t = tokens.shape
    if cache is not None:
        if positions is not None or segment_ids is not None:
            raise ValueError("with a cache, positions / segment_ids are implied by cache.lengths "
                             "and valid; pass neither")
        check_cache(cfg, cache, b)
        if valid is not None and tuple(valid.shape) != (b, t):
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {(b, t)}")
        return tokens, chunk_positions(cache, t), jnp.ones((b, t), jnp.int32)
    if valid is not None:
        raise ValueError("valid is only used with a cache; use segment_ids for padding")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    elif tuple(jnp.shape(positions)) != (b, t):
        raise ValueError(f"positions has shape {tuple(jnp.shape(positions))}, expected {(b, t)}")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    elif tuple(jnp.shape(segment_ids)) != (b, t):
        raise ValueError(f"segment_ids has shape {tuple(jnp.shape(segment_ids))}, expected {(b, t)}")
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids).astype(jnp.int32)


class _Headed(nn.Module):
    """Shared call logic: trunk → head; with a cache returns (out, new cache), or with
    ``write=False`` (out, (k_chunk, v_chunk)) for the caller to store; ``kv_len`` (static) limits
    the attention to cache slots [0, kv_len) (exact when kv_len >= max(cache.lengths));
    ``head_at`` (int32 [B]) applies the head at one position per row only: out [B, ...] (a
    policy's [B, V] logits without the [B, T, V] buffer); ``hidden_only`` returns the trunk's
    final hidden states [B, T, D] without the head (no cache)."""
    cfg: ModelConfig

    def head(self, trunk: Trunk, x):
        raise NotImplementedError

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 valid=None, kv_len: int | None = None, write: bool = True, head_at=None,
                 hidden_only: bool = False):
        tokens, positions, seg = _prepare(self.cfg, tokens, positions, segment_ids, cache, valid)
        if kv_len is not None and (cache is None or isinstance(kv_len, bool)
                                   or not isinstance(kv_len, int)
                                   or not 1 <= kv_len <= cache.max_len):
            raise ValueError(f"kv_len={kv_len!r} needs a cache and must be an int in "
                             f"[1, max_len={None if cache is None else cache.max_len}]")
        trunk = Trunk(self.cfg, name="model")
        x, new_kv = trunk(tokens, positions, seg, cache, kv_len)
        if hidden_only:             # the trunk's final hidden states (policy_hidden)
            return x
        if head_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(head_at, jnp.int32)[:, None, None], axis=1)
            out = self.head(trunk, x)[:, 0]
        else:
            out = self.head(trunk, x)
        if cache is None:
            return out
        if not write:       # the caller stores the chunk: (out, (k_chunk, v_chunk) [L,B,C,Hkv,D])
            return out, new_kv
        return out, write_chunk(cache, new_kv[0], new_kv[1], valid)


class PolicyModel(_Headed):
    """Language model: float32 logits [B, T, vocab] (tied to the embedding if tie_embeddings;
    [B, T, vocab_limit] when ``cfg.vocab_limit`` is set)."""

    def head(self, trunk, x):
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits = trunk.attend(x)
        else:
            logits = Dense((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.compute_dtype,
                           param_dtype=cfg.params_dtype, out_dtype=jnp.float32, name="lm_head")(x)
        return logits if cfg.vocab_limit is None else logits[..., :cfg.vocab_limit]


class ValueModel(_Headed):
    """Per-token scalar value V(x_{≤t}): float32 [B, T]; head zero-initialised (V ≡ 0 at init)."""

    def head(self, trunk, x):
        return Dense((1,), ("embed", None), use_bias=True, dtype=jnp.float32,
                     param_dtype=self.cfg.params_dtype, kernel_init=nn.initializers.zeros,
                     name="value_head")(x)[..., 0]


def last_token_index(tokens, segment_ids, pad_id: int):
    """Index [B] of each row's last non-padding token (segment_ids != 0 if given, else
    token != pad_id); 0 for an all-padding row."""
    real = (segment_ids != 0) if segment_ids is not None else (tokens != pad_id)
    t = tokens.shape[1]
    return jnp.max(jnp.where(real, jnp.arange(t)[None, :], 0), axis=1)


class RewardModel(nn.Module):
    """Sequence score: a scalar head on the trunk read at the last non-padding token → float32
    [B] (last position with segment_ids != 0 when given, else last token != cfg.pad_id)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        cfg = self.cfg
        tokens, positions, seg = _prepare(cfg, tokens, positions, segment_ids, None, None)
        x, _ = Trunk(cfg, name="model")(tokens, positions, seg, None)
        r = Dense((1,), ("embed", None), use_bias=True, dtype=jnp.float32,
                  param_dtype=cfg.params_dtype, name="reward_head")(x)[..., 0]
        idx = last_token_index(tokens, None if segment_ids is None else seg, cfg.pad_id)
        return jnp.take_along_axis(r, idx[:, None], axis=1)[:, 0]


def policy_hidden(model: nn.Module, params: dict, tokens, positions=None, segment_ids=None):
    """The policy's final hidden states and its unembedding, so that
    ``einsum("btd,dv->btv", hidden, unembed, preferred_element_type=float32)`` equals
    ``model.apply({"params": params}, tokens, positions, segment_ids)`` (the float32 logits)
    without ever building them (for chunked log-probs).

    Returns ``(hidden [B,T,D] in cfg.dtype, unembed [D,V] in cfg.dtype)``: unembed is
    ``lm_head/kernel``, or ``embed_tokens/embedding``ᵀ when ``cfg.tie_embeddings``. ``params``
    are the plain (unboxed) PolicyModel params. Same argument checks as the model's call.
    """
    if not isinstance(model, PolicyModel):
        raise ValueError(f"policy_hidden: model must be a PolicyModel, got {type(model).__name__}")
    cfg = model.cfg
    if not isinstance(params, dict) or "model" not in params:
        raise ValueError(f"policy_hidden: params must be a PolicyModel params dict with a 'model' "
                         f"(trunk) entry, got "
                         f"{list(params) if isinstance(params, dict) else type(params).__name__}")
    if cfg.tie_embeddings:
        unembed = jnp.asarray(params["model"]["embed_tokens"]["embedding"]).T
    else:
        if "lm_head" not in params:
            raise ValueError("policy_hidden: untied PolicyModel params lack 'lm_head' (was the "
                             "config's tie_embeddings changed?)")
        unembed = jnp.asarray(params["lm_head"]["kernel"])
    tokens, positions, seg = _prepare(cfg, tokens, positions, segment_ids, None, None)
    # through the model itself, so that a wrapped model (LoRA: models.lora) applies its wrapping
    hidden = model.apply({"params": params}, tokens, positions, seg, hidden_only=True)
    if cfg.vocab_limit is not None:
        unembed = unembed[:, :cfg.vocab_limit]
    return hidden, unembed.astype(cfg.compute_dtype)


# --------------------------------------------------------------------------- params helpers
def init_params(model: nn.Module, key, batch: int = 1, seq: int = 8) -> dict:
    """Plain (unboxed) params dict of ``model`` — the thing under "params"."""
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((batch, seq), jnp.int32))["params"]))
    return init(key)


def count_params(params) -> int:
    """Total number of scalars in a params pytree (boxed or not)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(nn.meta.unbox(params))))


def _copy_trunk(policy_params: dict, head_params: dict, what: str) -> dict:
    for name, p in (("policy_params", policy_params), (f"{what}_params", head_params)):
        if not isinstance(p, dict) or "model" not in p:
            raise ValueError(f"{name} must be a params dict with a 'model' (trunk) entry, got "
                             f"keys {list(p) if isinstance(p, dict) else type(p).__name__}")
    src, dst = policy_params["model"], head_params["model"]
    if jax.tree.structure(src) != jax.tree.structure(dst):
        raise ValueError(f"trunk structures differ between policy and {what} params (different "
                         f"n_layers / scan_layers / qkv_bias?)")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(src), jax.tree.leaves(dst)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"trunk param {jax.tree_util.keystr(path)} has shape {np.shape(a)} "
                             f"in the policy but {np.shape(b)} in the {what} model")
    out = dict(head_params)
    out["model"] = jax.tree.map(lambda a, b: jnp.array(a, dtype=jnp.asarray(b).dtype), src, dst)
    return out


def init_value_from_policy(policy_params: dict, value_params: dict) -> dict:
    """Value params whose trunk (embedding, layers, final norm) is a copy of the policy's; the
    value head is kept. Copies own their buffers (safe to donate both)."""
    return _copy_trunk(policy_params, value_params, "value")


def init_reward_from_policy(policy_params: dict, reward_params: dict) -> dict:
    """Reward-model params with the policy's trunk copied in and the reward head kept."""
    return _copy_trunk(policy_params, reward_params, "reward")


def stack_layer_params(params: dict, n_layers: int) -> dict:
    """Unrolled params (model/layers_{i}) → scan_layers params (model/layers, leading L axis)."""
    trunk = dict(params["model"])
    missing = [f"layers_{i}" for i in range(n_layers) if f"layers_{i}" not in trunk]
    if missing:
        raise ValueError(f"stack_layer_params: params['model'] lacks {missing}")
    layers = [trunk.pop(f"layers_{i}") for i in range(n_layers)]
    trunk["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    out = dict(params)
    out["model"] = trunk
    return out


def unstack_layer_params(params: dict) -> dict:
    """scan_layers params (model/layers with a leading L axis) → unrolled model/layers_{i}."""
    trunk = dict(params["model"])
    if "layers" not in trunk:
        raise ValueError("unstack_layer_params: params['model'] has no stacked 'layers' entry")
    stacked = trunk.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        trunk[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    out = dict(params)
    out["model"] = trunk
    return out
