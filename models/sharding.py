"""The device mesh and every sharding built on it (one module for the library and experiments).

Mesh ``("data", "fsdp", "tensor")`` (``make_mesh``):

* ``data``  : pure data parallelism (params replicated across it),
* ``fsdp``  : data parallelism whose params / optimizer state are sharded (ZeRO-3 style),
* ``tensor``: Megatron-style tensor parallelism (heads / MLP hidden / vocab split).

The batch axis is split over ``("data", "fsdp")`` (``data_sharding``). Every parameter carries
logical axis names (``nn.with_logical_partitioning``): "vocab", "embed", "heads", "kv_heads",
"head_dim", "mlp", and "layers" for the stacked axis of scan_layers. ``LOGICAL_AXIS_RULES``
maps them onto the mesh axes: weights are FSDP-sharded along "embed" and tensor-parallel along
heads / mlp / vocab.

Divisibility: a dimension whose size is not divisible by the product of the mesh axes it maps
to is replicated along those axes instead (``fit_spec``), so any model runs on any mesh; e.g.
vocab 64 over tensor 4 is sharded, n_kv_heads 2 over tensor 4 is replicated. ``param_shardings``
and ``param_shardings_from_logical`` report such fallbacks through an optional ``fallbacks``
list.

Context mesh: ``on_mesh(fn, mesh)`` traces ``fn`` with the mesh as JAX's abstract context
mesh; ``context_mesh()`` reads it (the Pallas attention kernels run per shard under it, since
XLA does not partition a Pallas call, and the model pins its activation layout with
``constrain_activation`` / ``gather_table``).

Multi-process: ``put_global`` places host values identical on every process onto a global
sharding. The mesh changes no random draw and no data order, only the float order of the
sharded reductions (docs/determinism.md).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig

__all__ = ["AXES", "BATCH_AXES", "TENSOR_AXIS", "LOGICAL_AXIS_RULES", "on_mesh", "context_mesh",
           "divisible_axes", "constrain_activation", "gather_table", "mesh_shape", "make_mesh",
           "data_sharding", "replicated", "fit_spec", "abstract_boxed_params", "logical_param_specs",
           "mesh_param_specs", "param_shardings", "param_shardings_from_logical",
           "spec_shardings", "shard_params", "put_global"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"

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


def _axes_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replace each mesh-axis entry of ``spec`` whose dimension is not divisible by the mesh
    axes' total size with ``None`` (replicated along that dimension)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        raise ValueError(f"PartitionSpec {spec} has more entries than the array has dims {tuple(shape)}")
    out = [e if e is None or int(d) % _axes_size(mesh, e) == 0 else None
           for e, d in zip(entries, shape)]
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


# ----------------------------------------------------------------------------- mesh
def mesh_shape(mesh_cfg: Any) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` from a ConfigDict / dict / object with those fields, or a 3-tuple."""
    if isinstance(mesh_cfg, (tuple, list)):
        if len(mesh_cfg) != 3:
            raise ValueError(f"mesh: expected (data, fsdp, tensor), got {tuple(mesh_cfg)}")
        vals = tuple(mesh_cfg)
    else:
        get = (mesh_cfg.get if isinstance(mesh_cfg, Mapping) or hasattr(mesh_cfg, "get")
               else lambda k, d=None: getattr(mesh_cfg, k, d))
        vals = tuple(get(a, None) for a in AXES)
    for name, v in zip(AXES, vals):
        if v is None:
            raise ValueError(f"mesh.{name} is missing")
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ValueError(f"mesh.{name} must be a positive integer, got {v!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` of shape ``(data, fsdp, tensor)`` over ``devices`` (default: all devices).

    Uses ``mesh_utils.create_device_mesh`` (topology-aware on TPU / GPU) and falls back to a
    plain reshape in device order when that does not apply (e.g. a subset of CPU devices).
    """
    shape = mesh_shape(mesh_cfg)
    devs = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devs):
        raise ValueError(f"mesh: data*fsdp*tensor = {shape[0]}*{shape[1]}*{shape[2]} = "
                         f"{math.prod(shape)} but {len(devs)} devices are given")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(shape, devices=devs, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - unusual topologies: keep the given order
        arr = np.asarray(devs, dtype=object).reshape(shape)
    return Mesh(arr, AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``("data", "fsdp")``, other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- context mesh
def on_mesh(fn, mesh: Mesh | None):
    """``fn`` traced with ``mesh`` as the context (abstract) mesh, which code that shards by
    hand reads with :func:`context_mesh` (the Pallas kernels' per-shard calls in
    ``models.attention``). Works inside and outside ``jax.jit``; ``mesh=None`` returns ``fn``."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced_on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_on_mesh


def context_mesh():
    """The context mesh (``on_mesh``, ``jax.set_mesh``) when it spans more than one device,
    else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh


def divisible_axes(mesh, axes: Sequence[str], size: int):
    """The axes of ``axes`` in ``mesh`` with more than one device, as a PartitionSpec entry,
    when ``size`` divides evenly over them; None (replicated) when there are none or it does
    not divide."""
    present = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not present or size % _axes_size(mesh, present):
        return None
    return present if len(present) > 1 else present[0]


# ----------------------------------------------------------------------------- activation layout
# Under a context mesh the model pins its activations to the layout FSDP / tensor parallelism
# expect: rows over the data axes, attention heads over ``tensor``, the embedding axis whole.
# Left to itself, XLA's sharding propagation follows the weights (split along the embedding
# axis over fsdp) into the activations and, around the per-shard kernels and the kv-head
# projections that do not divide over ``tensor``, can only reach the layout the next op needs
# by rematerialising a tensor in full on every device.


def constrain_activation(x, heads_dim: int | None = None):
    """``x`` [B, ...] with rows split over the data axes and, when ``heads_dim`` is given, that
    dimension over ``tensor`` (each only when it divides), the rest replicated. Unchanged
    without a context mesh (``on_mesh``)."""
    mesh = context_mesh()
    if mesh is None:
        return x
    spec = [divisible_axes(mesh, BATCH_AXES, x.shape[0])] + [None] * (x.ndim - 1)
    if heads_dim is not None:
        spec[heads_dim] = divisible_axes(mesh, (TENSOR_AXIS,), x.shape[heads_dim])
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def gather_table(table):
    """An embedding table [vocab, d] as a lookup reads it under a context mesh: vocab split over
    ``tensor`` when it divides, the embedding axis gathered (FSDP's all-gather of a weight
    before its use, made explicit). Unchanged without a context mesh."""
    mesh = context_mesh()
    if mesh is None:
        return table
    return jax.lax.with_sharding_constraint(
        table, PartitionSpec(divisible_axes(mesh, (TENSOR_AXIS,), table.shape[0]), None))


# ----------------------------------------------------------------------------- pytrees of specs
def _padded(spec: PartitionSpec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def param_shardings_from_logical(logical_specs: Any, mesh: Mesh, rules: Sequence[tuple],
                                 shapes: Any = None, fallbacks: list | None = None) -> Any:
    """Logical ``PartitionSpec`` tree -> ``NamedSharding`` tree via ``flax.linen.logical_to_mesh_sharding``.

    ``rules``: ``((logical, mesh_axis | tuple | None), ...)`` e.g. ``models.LOGICAL_AXIS_RULES``.
    ``shapes``: the matching tree of arrays / ``ShapeDtypeStruct`` (or anything with ``.shape``);
    when given, non-divisible dimensions are replicated (see :func:`fit_spec`) and, if
    ``fallbacks`` is a list, ``(path, mesh spec before the fallback, shape)`` of each such leaf is
    appended to it.
    ``None`` leaves in ``logical_specs`` mean fully replicated.
    """
    import flax.linen as nn
    specs = jax.tree.map(lambda s: PartitionSpec() if s is None else s, logical_specs,
                         is_leaf=lambda s: s is None or _is_spec(s))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))
    if shapes is None:
        return shardings

    def fit(path, sh, leaf):
        spec = fit_spec(sh.spec, leaf.shape, mesh)
        n = len(leaf.shape)
        if fallbacks is not None and _padded(spec, n) != _padded(sh.spec, n):
            fallbacks.append((jax.tree_util.keystr(path), _padded(sh.spec, n), tuple(leaf.shape)))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(fit, shardings, shapes,
                                            is_leaf=lambda x: isinstance(x, NamedSharding))


def spec_shardings(specs: Any, mesh: Mesh, shapes: Any = None) -> Any:
    """Mesh-axis ``PartitionSpec`` tree (already in mesh axis names) -> ``NamedSharding`` tree,
    with the same divisibility fallback when ``shapes`` is given."""
    specs = jax.tree.map(lambda s: PartitionSpec() if s is None else s, specs,
                         is_leaf=lambda s: s is None or _is_spec(s))
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, x.shape, mesh)),
                        specs, shapes, is_leaf=_is_spec)


def shard_params(params: Any, specs_tree: Any, mesh: Mesh, rules: Sequence[tuple] | None = None) -> Any:
    """``device_put`` ``params`` with the shardings of ``specs_tree``.

    With ``rules`` the specs are logical names (converted by :func:`param_shardings_from_logical`),
    without they are mesh axis names. Non-divisible dimensions are replicated.
    """
    if rules is not None:
        shardings = param_shardings_from_logical(specs_tree, mesh, rules, shapes=params)
    else:
        shardings = spec_shardings(specs_tree, mesh, shapes=params)
    return put_global(params, shardings)


def put_global(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also holds in a multi-process job.

    Each process must hold the full value of every leaf (the same on all processes, e.g. an
    init computed identically everywhere); it builds the shards of its own devices from that
    copy (``jax.make_array_from_callback``, no communication). Plain ``device_put`` of an array
    committed to one local device onto a sharding that spans other processes' devices either
    refuses or, for a replicated target, yields an array whose per-device buffers carry the
    global sharding (orbax then fails with "An argument array had 2 shard(s)"). Leaves that
    already span several processes are resharded by ``device_put``; typed PRNG keys go
    through their key data. One process: plain ``device_put``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)
