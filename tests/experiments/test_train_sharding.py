"""The jitted RL update gives the same result on every device mesh (8 forced CPU devices).

``Trainer(config, mesh).update`` (in/out shardings from ``models.LOGICAL_AXIS_RULES``) is run
once from the same initial state on meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,2,4) and
compared with (1,1,1): loss / metrics and the updated parameters agree within 1e-5 (float32).
Measured differences are ~3e-7: only the order of the cross-device reductions changes (XLA
splits the batch sums over data / fsdp and the matmul contractions over tensor), which moves
float32 results by a few ulps; random draws do not depend on the sharding.

The config is tiny (d_model 32, one layer, PPO with a critic so that every part of the loss and
every parameter gets a gradient, lr 1e-2 so the step moves parameters by ~1e-2 >> 1e-5).
``n_kv_heads = 2`` on ``tensor = 4`` exercises the replication fallback for non-divisible dims.

A whole short run (BC warm start + three updates, ``Trainer(config, mesh).init`` then
``update``) on (2,1,1) and (2,2,2) is compared with (1,1,1): the post-BC state is bitwise equal
(BC runs on one device), every update samples exactly the same tokens, and metrics / parameters
agree within 1e-5 (docs/determinism.md).

The update is compiled as the whole suite is (``JAX_DISABLE_MOST_OPTIMIZATIONS``, set in
tests/conftest.py: LLVM codegen only; the SPMD partitioning under test is unchanged).
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import models
from experiments.configs.common import make_config
from models.sharding import make_mesh
from rl_agents.trainer import Trainer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
TOL = 1e-5
#: what XLA's SPMD partitioner logs when it can only reshard a tensor by replicating it
REMAT = "Involuntary full rematerialization"


def tiny_config():
    c = make_config("kv_search", "ppo")
    c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
    c.rollout.update(num_groups=16, group_size=1)     # batch 16; minibatch 8 = data*fsdp of (8,1,1)
    c.rl.update(epochs=1, minibatches=2, entropy_coef=0.01, kl_coef=0.01, kl_in_reward=True)
    c.optim.update(lr=1e-2, warmup_steps=1)
    c.bc.episodes = 0
    return c


def run_update(shape, host_state, attention_impl="xla"):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)),
                     devices=jax.devices()[:math.prod(shape)])
    config = tiny_config()
    config.model.attention_impl = attention_impl
    trainer = Trainer(config, mesh)
    state = jax.device_put(host_state, trainer.state_shardings)
    compiled = trainer.update.lower(state).compile()
    new_state, metrics = compiled(state)
    return trainer, new_state, {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def host_state():
    trainer = Trainer(tiny_config())
    return jax.tree.map(np.asarray, jax.jit(trainer.fresh_state)(jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def reference(host_state):
    _, state, metrics = run_update((1, 1, 1), host_state)
    return jax.tree.map(np.asarray, state.params), metrics


def _norm(spec, ndim):
    """PartitionSpec -> tuple of per-dim entries (None / tuple of mesh axes), length ndim."""
    out = []
    for e in tuple(spec) + (None,) * (ndim - len(spec)):
        out.append(None if e is None else (e,) if isinstance(e, str) else tuple(e))
    return tuple(out)


def expected_specs(trainer, params, mesh_shape):
    """Independent mapping: logical axes (flax boxes) -> mesh axes by the rules table, a
    dimension replicated when its size is not divisible by its mesh axes' total size."""
    rules = dict(models.LOGICAL_AXIS_RULES)
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    tokens = np.zeros((1, 8), np.int32)
    boxed = {"policy": jax.eval_shape(lambda k: trainer.policy.init(k, tokens), jax.random.PRNGKey(0))["params"],
             "value": jax.eval_shape(lambda k: trainer.value_model.init(k, tokens), jax.random.PRNGKey(0))["params"]}
    logical = nn.get_partition_spec(boxed)

    def one(spec, leaf):
        dims = []
        for name, d in zip(tuple(spec) + (None,) * (leaf.ndim - len(spec)), leaf.shape):
            axes = rules.get(name) if name is not None else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            dims.append(axes if axes and d % math.prod(sizes[a] for a in axes) == 0 else None)
        return tuple(dims)

    return jax.tree.map(one, logical, params, is_leaf=lambda s: isinstance(s, P))


def _leaf(tree, suffix):
    hits = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jax.tree_util.keystr(p).replace("']['", "/").endswith(suffix + "']")]
    assert len(hits) >= 1, f"no parameter ending in {suffix}"
    return hits[0][1]


def test_reference_update_is_not_trivial(host_state, reference):
    params, metrics = reference
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(host_state.params)))
    assert moved > 100 * TOL, moved          # the comparison below can fail
    assert metrics["grad_norm"] > 0 and metrics["loss/value"] > 0
    assert abs(metrics["loss/policy"]) > 0 and np.isfinite(metrics["loss"])


def test_pallas_kernels_run_per_shard_in_the_sharded_update(host_state, reference, capfd):
    """attention_impl="pallas" on (2,2,2): the update (decode through ``flash_decode``, the loss
    through ``flash_attention``) is traced with the mesh as context, so both kernels run per shard
    (``shard_map`` → ``sdy.manual_computation`` in the lowered program: the decode step's, the
    loss's forward and its gradient), and it matches the single-device XLA update. The pinned
    activation layout leaves the partitioner no tensor to rematerialise in full."""
    ref_params, ref_metrics = reference
    capfd.readouterr()
    trainer, state, metrics = run_update((2, 2, 2), host_state, attention_impl="pallas")
    assert REMAT not in capfd.readouterr().err
    lowered = trainer.update.lower(trainer.abstract_state()).as_text()
    assert lowered.count("sdy.manual_computation") >= 3
    for k, v in metrics.items():
        assert abs(v - ref_metrics[k]) <= TOL * max(1.0, abs(ref_metrics[k])), (k, v, ref_metrics[k])
    got = jax.tree.map(np.asarray, state.params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_update_matches_single_device(shape, host_state, reference, capfd):
    ref_params, ref_metrics = reference
    capfd.readouterr()
    trainer, state, metrics = run_update(shape, host_state)
    assert REMAT not in capfd.readouterr().err      # e.g. 2 kv heads over tensor 4 on (1,2,4)
    assert set(metrics) == set(ref_metrics)
    for k, v in metrics.items():
        assert abs(v - ref_metrics[k]) <= TOL * max(1.0, abs(ref_metrics[k])), (k, v, ref_metrics[k])
    got = jax.tree.map(np.asarray, state.params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))
    assert int(state.step) == 1

    # Parameter shardings follow models.LOGICAL_AXIS_RULES (with the divisibility fallback).
    want = expected_specs(trainer, got, shape)
    for (path, leaf), w in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                               jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple))):
        assert _norm(leaf.sharding.spec, leaf.ndim) == w, (jax.tree_util.keystr(path), leaf.sharding.spec, w)
    d, f, t = shape
    up = _leaf(state.params["policy"], "mlp/up_proj/kernel")           # [embed, mlp]
    assert _norm(up.sharding.spec, 2) == (("fsdp",), ("tensor",))
    assert up.addressable_shards[0].data.shape == (32 // f, 64 // t)
    k_proj = _leaf(state.params["policy"], "k_proj/kernel")             # [embed, kv_heads=2, head_dim]
    q_proj = _leaf(state.params["policy"], "q_proj/kernel")             # [embed, heads=4, head_dim]
    assert _norm(q_proj.sharding.spec, 3)[:2] == (("fsdp",), ("tensor",))
    # 2 kv heads cannot be split 4 ways: replicated along that dim (4 query heads can)
    assert _norm(k_proj.sharding.spec, 3)[1] == (None if t == 4 else ("tensor",))
    # the optimizer moments are sharded like their parameters
    mu_up = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             if ".mu" in jax.tree_util.keystr(p) and "up_proj" in jax.tree_util.keystr(p)
             and "policy" in jax.tree_util.keystr(p)]
    assert len(mu_up) == 1 and mu_up[0].sharding.spec == up.sharding.spec


# ------------------------------------------------------------------ a whole short run per mesh
RUN_MESHES = [(2, 1, 1), (2, 2, 2)]
RUN_UPDATES = 3


def run_config():
    """``tiny_config`` with a BC warm start (64 demos, 2 epochs) and three updates. PPO with a
    critic: every update has a gradient even when all sampled returns are equal."""
    c = tiny_config()
    c.bc.update(episodes=64, batch_size=16, epochs=2)
    c.total_updates = RUN_UPDATES
    return c


class RecordingTrainer(Trainer):
    """A Trainer that hands every sampled token batch to the host (in update order)."""

    def __init__(self, config, mesh):
        self.sampled: list[np.ndarray] = []
        super().__init__(config, mesh)

    def _sample_groups(self, params, key, *, num_groups, group_size):
        traj = super()._sample_groups(params, key, num_groups=num_groups, group_size=group_size)
        jax.debug.callback(lambda t: self.sampled.append(np.asarray(t)), traj.tokens)
        return traj


def run_short(shape):
    """``Trainer(config, mesh).init`` (BC warm start included) and ``RUN_UPDATES`` updates:
    (initial state, final state, metrics per update, sampled tokens per update) on the host."""
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)),
                     devices=jax.devices()[:math.prod(shape)])
    trainer = RecordingTrainer(run_config(), mesh)
    state = trainer.init(jax.random.PRNGKey(0))
    init = jax.tree.map(np.array, state)      # copies: the update donates the state
    compiled = trainer.update.lower(state).compile()
    metrics = []
    for _ in range(RUN_UPDATES):
        state, m = compiled(state)
        metrics.append({k: float(v) for k, v in m.items()})
    jax.effects_barrier()
    return init, jax.tree.map(np.asarray, state), metrics, trainer.sampled


@pytest.fixture(scope="module")
def short_reference():
    return run_short((1, 1, 1))


def test_short_run_reference_is_not_trivial(short_reference):
    init, final, metrics, sampled = short_reference
    no_bc = run_config()
    no_bc.bc.episodes = 0
    before_bc = jax.jit(Trainer(no_bc).init)(jax.random.PRNGKey(0))
    bc_moved = max(float(np.max(np.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(init.params), jax.tree.leaves(before_bc.params)))
    assert bc_moved > 1e-3, bc_moved
    assert len(sampled) == RUN_UPDATES and sampled[0].shape[0] == 16
    assert not np.array_equal(sampled[0], sampled[1])
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(final.params), jax.tree.leaves(init.params)))
    assert moved > 100 * TOL, moved
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


@pytest.mark.parametrize("shape", RUN_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_short_run_matches_single_device(shape, short_reference):
    """BC + three updates on a mesh: the BC state is bitwise the single-device one (BC runs on
    one device whatever the mesh), every update samples exactly the same tokens (random bits
    depend on the global row, not on the shard), and losses / parameters differ only by the
    float order of the sharded reductions."""
    ref_init, ref_final, ref_metrics, ref_sampled = short_reference
    init, final, metrics, sampled = run_short(shape)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(init)[0], jax.tree.leaves(ref_init)):
        np.testing.assert_array_equal(a, b, err_msg=f"initial state {jax.tree_util.keystr(path)}")
    assert len(sampled) == RUN_UPDATES
    for u, (a, b) in enumerate(zip(sampled, ref_sampled)):
        np.testing.assert_array_equal(a, b, err_msg=f"tokens sampled in update {u + 1}")
    for u, (m, r) in enumerate(zip(metrics, ref_metrics)):
        for k, v in m.items():
            assert abs(v - r[k]) <= TOL * max(1.0, abs(r[k])), (u + 1, k, v, r[k])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final.params)[0],
                            jax.tree.leaves(ref_final.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))
