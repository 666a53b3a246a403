"""Straightforward NumPy (float64) Llama forward pass, written independently of models/ —
per-head loops, explicit masks, explicit rotation — as the reference for the JAX model."""
import math

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, inv, mscale):
    """x [T, D] at positions [T] (rotate-half layout)."""
    half = x.shape[-1] // 2
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang) * mscale, np.sin(ang) * mscale
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def forward(cfg, params, tokens, positions=None, segment_ids=None, inv_freq=None, mscale=1.0,
            head="policy"):
    """Logits [B, T, V] (or values [B, T] for head="value", hidden for head="hidden")."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    positions = np.tile(np.arange(t), (b, 1)) if positions is None else np.asarray(positions)
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if inv_freq is None:
        inv_freq = np.array([cfg.rope_theta ** (-2.0 * i / dh) for i in range(dh // 2)])
    trunk = params["model"]
    emb = f(trunk["embed_tokens"]["embedding"])
    out = []
    for bi in range(b):
        x = emb[tokens[bi]]
        for li in range(cfg.n_layers):
            lp = trunk[f"layers_{li}"]
            a = lp["self_attn"]
            y = _rms(x, f(lp["input_layernorm"]["scale"]), cfg.rms_norm_eps)
            proj = {}
            for name in ("q_proj", "k_proj", "v_proj"):
                w = f(a[name]["kernel"])
                r = np.einsum("td,dhk->thk", y, w)
                if "bias" in a[name]:
                    r = r + f(a[name]["bias"])
                proj[name] = r
            attn = np.zeros((t, h, dh))
            for hi in range(h):
                kv = hi // (h // hkv)
                q = _rope(proj["q_proj"][:, hi], positions[bi], inv_freq, mscale)
                k = _rope(proj["k_proj"][:, kv], positions[bi], inv_freq, mscale)
                v = proj["v_proj"][:, kv]
                for i in range(t):
                    vis = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i] and seg[bi, j] != 0]
                    if not vis:
                        continue
                    sc = np.array([q[i] @ k[j] for j in vis]) / math.sqrt(dh)
                    p = np.exp(sc - sc.max())
                    p /= p.sum()
                    attn[i, hi] = p @ v[vis]
            x = x + np.einsum("thk,hkd->td", attn, f(a["o_proj"]["kernel"]))
            y = _rms(x, f(lp["post_attention_layernorm"]["scale"]), cfg.rms_norm_eps)
            m = lp["mlp"]
            g = y @ f(m["gate_proj"]["kernel"])
            u = y @ f(m["up_proj"]["kernel"])
            x = x + (g / (1 + np.exp(-g)) * u) @ f(m["down_proj"]["kernel"])
        x = _rms(x, f(trunk["norm"]["scale"]), cfg.rms_norm_eps)
        if head == "hidden":
            out.append(x)
        elif head == "value":
            out.append(x @ f(params["value_head"]["kernel"])[:, 0] + f(params["value_head"]["bias"])[0])
        elif cfg.tie_embeddings:
            out.append(x @ emb.T)
        else:
            out.append(x @ f(params["lm_head"]["kernel"]))
    return np.stack(out)
