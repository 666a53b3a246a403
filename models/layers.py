"""Building blocks: RMSNorm, a logically-partitioned dense layer, token embedding, SwiGLU MLP."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.sharding import constrain_activation, gather_table

default_init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · scale (statistics in float32, output in ``dtype``)."""
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
    """y = x · W (+ b), contracting the last ``n_in`` axes of x with the first of W.

    W has shape x.shape[-n_in:] + features and logical axes ``axes`` (one name per dimension of W);
    the bias has the logical axes of the output dimensions. Inputs are cast to ``dtype``, the
    product accumulates in float32 and is returned in ``out_dtype`` (default ``dtype``).
    """
    features: Sequence[int]
    axes: Sequence[str | None]
    n_in: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_dtype: Any = None
    kernel_init: Callable = default_init
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        features = tuple(self.features)
        in_shape = x.shape[x.ndim - self.n_in:]
        if len(self.axes) != len(in_shape) + len(features):
            raise ValueError(f"Dense {self.name}: axes={tuple(self.axes)} must name the "
                             f"{len(in_shape) + len(features)} kernel dims {in_shape + features}")
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
                            in_shape + features, self.param_dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
                                preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                self.bias_init, tuple(self.axes[self.n_in:])), features, self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.out_dtype or self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, d_model]; ``attend`` gives the tied output projection."""
    vocab_size: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            default_init, ("vocab", "embed")), (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, tokens):
        x = jnp.take(gather_table(self.embedding), tokens, axis=0)
        return constrain_activation(x).astype(self.dtype)

    def attend(self, x):
        """Logits x · Eᵀ in float32 (inputs in ``dtype``, float32 accumulation)."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x))."""
    d_ff: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense((self.d_ff,), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense((self.d_ff,), ("embed", "mlp"), name="up_proj", **kw)(x)
        h = (nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(self.dtype)
        return Dense((x.shape[-1],), ("mlp", "embed"), name="down_proj", **kw)(h)
