"""Test helpers: NumPy-random params (no JAX RNG compiles: fast on a busy CPU) and cached jitted
forward functions."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def random_params(model, seed=0, scale=0.2):
    """Params with the model's exact tree / shapes / dtypes, filled from NumPy: N(0, scale²)
    everywhere, norm scales 1 + N(0, scale²) — every weight (biases included) matters."""
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"])
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = rng.standard_normal(s.shape) * scale
        if jax.tree_util.keystr(path).endswith("['scale']"):
            x = x + 1.0
        return jnp.asarray(x, s.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def fwd(model):
    """jax.jit(model.apply) with params as the first argument, cached per (hashable) module."""
    return jax.jit(lambda params, *a, **kw: model.apply({"params": params}, *a, **kw))
