"""LoRA adapters on the policy's projections, with qwix (the library Tunix uses).

    policy = lora.apply_lora(models.PolicyModel(cfg), rank=16, alpha=32.0)
    params = lora.add_adapters(policy, base_params, key)     # base + fresh adapters (B = 0)
    mask = lora.adapter_mask(params)                         # True on the adapter leaves
    plain = lora.merge(params, rank=16, alpha=32.0)          # W + (α/r)·A·B, adapters dropped

``qwix.LoraProvider`` intercepts the ``dot_general`` of every ``Dense`` whose module path
matches ``targets`` (default: the attention and MLP projections) and adds
``(α / r) · (x·A)·B`` to its output; the adapter params ``kernel_lora_a`` [..., in, r] and
``kernel_lora_b`` [..., r, out] (in / out: the flattened contracting / output dims of the
kernel; a leading layer axis when the layers are scanned) sit beside each ``kernel``. B starts at
zero, so a fresh adapter leaves the model unchanged: the base weights *are* the initial
policy, and the reference policy needs no copy of them.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_A, _B = "kernel_lora_a", "kernel_lora_b"


def check_lora(rank, alpha, targets: Sequence[str] = TARGETS) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad:
        raise ValueError(f"LoRA targets {list(targets)!r} must be a non-empty subset of "
                         f"{list(TARGETS)}")


def apply_lora(model, rank: int, alpha: float, targets: Sequence[str] = TARGETS):
    """``model`` (a linen module) with LoRA on the ``Dense`` layers named in ``targets``."""
    import qwix

    check_lora(rank, alpha, targets)
    provider = qwix.LoraProvider(module_path=f".*/({'|'.join(targets)})$", rank=rank,
                                 alpha=float(alpha))
    return qwix.apply_lora_to_model(model, provider)


def _is_adapter(path) -> bool:
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name in (_A, _B)


def adapter_mask(params) -> Any:
    """A tree of bools like ``params``: True on the adapter leaves."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _is_adapter(p), params)


def freeze_base(params):
    """``params`` with ``stop_gradient`` on every non-adapter leaf (gradients reach the adapters
    only; XLA drops the base weights' gradient computations)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if _is_adapter(p) else jax.lax.stop_gradient(x), params)


def adapters(params) -> dict:
    """The adapter leaves, ``{path string: array}``."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): x for p, x in leaves if _is_adapter(p)}


def with_adapters(params, new: dict):
    """``params`` with its adapter leaves replaced from ``new`` (as returned by ``adapters``)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: new[jax.tree_util.keystr(p)] if _is_adapter(p) else x, params)


def add_adapters(lora_model, base_params: dict, key) -> dict:
    """The full param tree of ``lora_model``: ``base_params`` plus freshly initialised adapters
    (A: qwix's He-uniform, B: zeros)."""
    from flax import linen as nn

    def init(k):
        return nn.meta.unbox(lora_model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])

    shapes = jax.eval_shape(init, key)
    fresh = jax.jit(init)(key)
    base_leaves = {jax.tree_util.keystr(p): x
                   for p, x in jax.tree_util.tree_flatten_with_path(base_params)[0]}

    def pick(path, shape, new):
        if _is_adapter(path):
            return new
        k = jax.tree_util.keystr(path)
        if k not in base_leaves:
            raise ValueError(f"base params lack {k} (a PolicyModel of another config?)")
        if tuple(base_leaves[k].shape) != tuple(shape.shape):
            raise ValueError(f"base param {k} has shape {tuple(base_leaves[k].shape)}, the model "
                             f"expects {tuple(shape.shape)}")
        return base_leaves[k]

    return jax.tree_util.tree_map_with_path(pick, shapes, fresh)


def merge(params: dict, rank: int, alpha: float) -> dict:
    """Plain ``PolicyModel`` params: each adapted kernel W becomes W + (α/r)·A·B (reshaped to
    W's shape: the contracting dims lead W, as in ``models.layers.Dense``); adapters dropped."""
    scale = float(alpha) / int(rank)

    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in (_A, _B)}
        if _A in node and _B in node:
            w = node["kernel"]
            a = np.asarray(node[_A], np.float32)
            b = np.asarray(node[_B], np.float32)
            delta = np.einsum("...cr,...rm->...cm", a, b) * scale
            out["kernel"] = jnp.asarray((np.asarray(w, np.float32) + delta.reshape(w.shape))
                                        .astype(np.asarray(w).dtype))
        return out

    return walk(params)
