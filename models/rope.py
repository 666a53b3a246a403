"""Rotary position embeddings (RoPE) and their context-extension scalings.

Plain RoPE: θ_i = b^(−2i/d), i = 0..d/2−1; a pair (x_i, x_{i+d/2}) at position m is rotated by
the angle m·θ_i (the "rotate-half" layout of Hugging Face Llama / Qwen2 checkpoints).

Scalings (s = factor, L0 = original context):
- linear / position interpolation: m → m/s, i.e. θ_i → θ_i / s.
- ntk (NTK-aware, static): b' = b · s^(d/(d−2)).
- yarn: θ_i' = θ_i/s · (1 − γ_i) + θ_i · γ_i with γ_i = 1 − ramp_i the extrapolation weight,
  ramp_i = clip((i − low) / (high − low), 0, 1), low/high = the dims where the wavelength
  2π/θ_i makes β_fast = 32 resp. β_slow = 1 rotations over L0:
  dim(r) = d·ln(L0/(2πr)) / (2 ln b) (floored / ceiled when ``truncate``, clipped to [0, d−1]).
  Attention temperature: q and k are both multiplied by mscale = 0.1·ln s + 1 (s > 1), so the
  logits grow by mscale² — exactly as Hugging Face applies ``attention_factor`` to cos / sin.
- llama3: wavelengths above L0/low_freq_factor are divided by s, below L0/high_freq_factor kept,
  smoothly interpolated in between.
- ABF ("adjusted base frequency") is just a larger ``rope_theta``.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     max_seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float64 NumPy) and the q/k multiplier (mscale)."""
    d = int(head_dim)
    base = float(theta)
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if scaling is None:
        return inv, 1.0
    kind = scaling.get("type", scaling.get("rope_type"))
    s = float(scaling["factor"])
    if kind == "linear":
        return inv / s, 1.0
    if kind == "ntk":
        base_ntk = base * s ** (d / (d - 2))
        return 1.0 / base_ntk ** (np.arange(0, d, 2, dtype=np.float64) / d), 1.0
    orig = float(scaling.get("original_max_seq_len") or max_seq_len or 0)
    if orig <= 0:
        raise ValueError(f"rope scaling {kind!r} needs original_max_seq_len, got {scaling!r}")
    if kind == "yarn":
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)

        def dim_for(rotations):
            return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_for(beta_fast), dim_for(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001                                   # avoid 0 / 0 (as Hugging Face)
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extrapolation = 1.0 - ramp
        inv = (inv / s) * (1.0 - extrapolation) + inv * extrapolation

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = scaling.get("attention_factor")
        if attn is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = get_mscale(s, m) / get_mscale(s, m_all) if (m and m_all) else get_mscale(s)
        return inv, float(attn)
    if kind == "llama3":
        lo, hi = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = orig / lo, orig / hi
        scaled = np.where(wavelen > low_wavelen, inv / s, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / s + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unknown rope scaling type {kind!r}; use linear, ntk, yarn or llama3")


def config_rope(cfg) -> tuple[np.ndarray, float]:
    """``rope_frequencies`` for a ModelConfig."""
    return rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict, cfg.max_seq_len)


def apply_rope(x, positions, inv_freq, mscale: float = 1.0):
    """Rotate x [B, T, H, D] at integer positions [B, T]: (x1, x2) → (x1 cos − x2 sin,
    x2 cos + x1 sin)·mscale with angle m·θ_i, x1 / x2 the first / second halves of D.
    Computed in float32, returned in x's dtype."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = (jnp.cos(ang) * mscale)[:, :, None, :]
    sin = (jnp.sin(ang) * mscale)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
