"""Logical-axis sharding rules for the models' parameters.

Every parameter carries logical axis names (``nn.with_logical_partitioning``): "vocab", "embed",
"heads", "kv_heads", "head_dim", "mlp", and "layers" for the stacked axis of scan_layers.
``LOGICAL_AXIS_RULES`` maps them onto the mesh axes ("data", "fsdp", "tensor"): weights are
FSDP-sharded along "embed" and tensor-parallel along heads / mlp / vocab.

Divisibility: a dimension whose size is not divisible by the product of the mesh axes it maps
to is replicated along those axes instead (``fit_spec``), so any model runs on any mesh; e.g.
vocab 64 over tensor 4 is sharded, n_kv_heads 2 over tensor 4 is replicated. ``param_shardings``
reports such fallbacks through its optional ``fallbacks`` list.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def _as_module(cfg_or_module) -> nn.Module:
    if isinstance(cfg_or_module, ModelConfig):
        from models.transformer import PolicyModel
        return PolicyModel(cfg_or_module)
    if isinstance(cfg_or_module, nn.Module):
        return cfg_or_module
    raise ValueError(f"expected a ModelConfig or a flax Module, got {type(cfg_or_module).__name__}")


def abstract_boxed_params(cfg_or_module, example_tokens=None):
    """ShapeDtypeStruct params with their ``nn.Partitioned`` boxes (no FLOPs, no memory)."""
    module = _as_module(cfg_or_module)
    tokens = jnp.zeros((1, 8), jnp.int32) if example_tokens is None else example_tokens
    return jax.eval_shape(lambda k: module.init(k, tokens), jax.random.PRNGKey(0))["params"]


def logical_param_specs(cfg_or_module, example_tokens=None) -> Any:
    """Pytree (same structure as the params) of PartitionSpecs in logical axis names."""
    return nn.get_partition_spec(abstract_boxed_params(cfg_or_module, example_tokens))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicate every dimension whose size is not divisible by its mesh axes' total size."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for entry, size in zip(entries, shape):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        out.append(entry if size % n == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def mesh_param_specs(cfg_or_module, mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES,
                     example_tokens=None) -> Any:
    """Pytree of PartitionSpecs in mesh axis names (fitted to ``mesh`` when given)."""
    boxed = abstract_boxed_params(cfg_or_module, example_tokens)
    logical = nn.get_partition_spec(boxed)
    specs = nn.logical_to_mesh(logical, tuple(rules))
    if mesh is None:
        return specs
    shapes = nn.meta.unbox(boxed)
    return jax.tree.map(lambda s, x: fit_spec(s, x.shape, mesh), specs, shapes,
                        is_leaf=lambda s: isinstance(s, PartitionSpec))


def param_shardings(module, mesh: Mesh, rules=LOGICAL_AXIS_RULES, example_tokens=None,
                    fallbacks: list | None = None) -> Any:
    """Pytree of NamedShardings for ``module``'s params on ``mesh`` (via
    ``nn.logical_to_mesh_sharding``), non-divisible dims replicated; if ``fallbacks`` is a list,
    ``(param path, rule spec, fitted spec, shape)`` is appended for each replicated fallback."""
    boxed = abstract_boxed_params(module, example_tokens)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, tuple(rules))
    shapes = nn.meta.unbox(boxed)

    def fit(path, sh, x):
        spec = fit_spec(sh.spec, x.shape, mesh)
        if fallbacks is not None and spec != fit_spec(sh.spec, (0,) * len(x.shape), mesh):
            fallbacks.append((jax.tree_util.keystr(path), sh.spec, spec, tuple(x.shape)))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(fit, shardings, shapes,
                                            is_leaf=lambda s: isinstance(s, NamedSharding))


def shard_params(params, shardings):
    """``jax.device_put`` the params with a matching NamedSharding pytree."""
    return jax.device_put(params, shardings)
