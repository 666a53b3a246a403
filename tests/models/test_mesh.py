"""Mesh construction, logical -> mesh shardings (with the divisibility fallback), and a sharded
training step that matches the single-device one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from models.sharding import (data_sharding, fit_spec, make_mesh, mesh_shape, spec_shardings,
                             param_shardings_from_logical, replicated, shard_params)

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("vocab", "tensor"), ("head_dim", None), ("layers", None))
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 1)]
D_IN, D_HID, BATCH = 8, 16, 16
LOGICAL = {"w1": P("embed", "mlp"), "b1": P("mlp"), "w2": P("mlp", "embed"), "b2": P("embed"),
           "scale": None}


def _devices(shape):
    return jax.devices()[: int(np.prod(shape))]


def test_mesh_shapes_and_axes():
    assert len(jax.devices()) == 8
    for shape in MESHES:
        m = make_mesh(dict(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices=_devices(shape))
        assert m.axis_names == ("data", "fsdp", "tensor")
        assert tuple(m.devices.shape) == shape
        assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in _devices(shape))
    m = make_mesh((2, 2, 2))   # all devices by default; tuples accepted
    assert m.devices.size == 8


def test_mesh_errors():
    with pytest.raises(ValueError, match=r"2\*2\*1 = 4 but 8 devices"):
        make_mesh(dict(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match=r"mesh.fsdp must be a positive integer, got 0"):
        mesh_shape(dict(data=1, fsdp=0, tensor=1))
    with pytest.raises(ValueError, match="mesh.tensor is missing"):
        mesh_shape(dict(data=1, fsdp=1))


def test_config_dict_accepted():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4))
    assert mesh_shape(cfg) == (1, 2, 4)


def test_logical_to_mesh_shardings():
    mesh = make_mesh((1, 2, 4))
    params = _init_params()
    sh = param_shardings_from_logical(LOGICAL, mesh, RULES)
    assert sh["w1"].spec == P("fsdp", "tensor")
    assert sh["w2"].spec == P("tensor", "fsdp")
    assert sh["b1"].spec == P("tensor")
    assert sh["scale"].spec == P()
    placed = shard_params(params, LOGICAL, mesh, RULES)
    # w1 [8, 16] over fsdp=2 x tensor=4: each device holds a [4, 4] block.
    assert {s.data.shape for s in placed["w1"].addressable_shards} == {(4, 4)}
    np.testing.assert_array_equal(placed["w1"], params["w1"])


def test_non_divisible_dims_are_replicated():
    mesh = make_mesh((1, 2, 4))
    assert fit_spec(P("fsdp", "tensor"), (6, 16), mesh) == P("fsdp", "tensor")
    assert fit_spec(P("fsdp", "tensor"), (6, 10), mesh) == P("fsdp")
    assert fit_spec(P("fsdp", "tensor"), (5, 10), mesh) == P()
    assert fit_spec(P(("fsdp", "tensor")), (12,), mesh) == P()          # 12 % 8 != 0
    assert fit_spec(P(("fsdp", "tensor")), (16,), mesh) == P(("fsdp", "tensor"))
    shapes = {"w1": jax.ShapeDtypeStruct((5, 6), jnp.float32),      # 5 % 2, 6 % 4: both replicated
              "b1": jax.ShapeDtypeStruct((6,), jnp.float32),        # 6 % 4 != 0
              "w2": jax.ShapeDtypeStruct((16, 5), jnp.float32),     # only dim 0 kept
              "b2": jax.ShapeDtypeStruct((8,), jnp.float32), "scale": jax.ShapeDtypeStruct((), jnp.float32)}
    fallbacks = []
    sh = param_shardings_from_logical(LOGICAL, mesh, RULES, shapes=shapes, fallbacks=fallbacks)
    assert sh["w1"].spec == P() and sh["b1"].spec == P()
    assert sh["w2"].spec == P("tensor") and sh["b2"].spec == P("fsdp")
    assert sorted(p for p, _, _ in fallbacks) == ["['b1']", "['w1']", "['w2']"]
    # Actually placing a non-divisible array works (jax would reject the unfitted spec).
    x = jnp.arange(30.0).reshape(5, 6)
    with pytest.raises(ValueError):
        jax.device_put(x, NamedSharding(mesh, P("fsdp", "tensor")))
    y = shard_params({"w": x}, {"w": P("fsdp", "tensor")}, mesh)
    np.testing.assert_array_equal(y["w"], x)
    assert spec_shardings({"w": P("fsdp")}, mesh)["w"].spec == P("fsdp")


def _init_params():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"w1": jax.random.normal(k1, (D_IN, D_HID)) / np.sqrt(D_IN),
            "b1": jnp.zeros(D_HID),
            "w2": jax.random.normal(k2, (D_HID, D_IN)) / np.sqrt(D_HID),
            "b2": 0.1 * jax.random.normal(k3, (D_IN,)),
            "scale": jnp.float32(1.5)}


def _loss(p, x, y):
    h = jax.nn.gelu(x @ p["w1"] + p["b1"])
    out = p["scale"] * (h @ p["w2"] + p["b2"])
    return jnp.mean((out - y) ** 2)


def _sgd_step(p, x, y):
    loss, g = jax.value_and_grad(_loss)(p, x, y)
    return loss, jax.tree.map(lambda a, b: a - 0.1 * b, p, g)


def _numpy_loss(p, x, y):
    """float64 reference; jax.nn.gelu defaults to the tanh approximation."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    pre = x @ p["w1"] + p["b1"]
    h = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
    out = p["scale"] * (h @ p["w2"] + p["b2"])
    return np.mean((out - y) ** 2)


def _run(shape, steps=3):
    mesh = make_mesh(shape, devices=_devices(shape))
    params = _init_params()
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (BATCH, D_IN))
    y = jax.random.normal(ky, (BATCH, D_IN))
    p_sh = param_shardings_from_logical(LOGICAL, mesh, RULES, shapes=params)
    d_sh = data_sharding(mesh)
    params = jax.device_put(params, p_sh)
    x, y = jax.device_put(x, d_sh), jax.device_put(y, d_sh)
    step = jax.jit(_sgd_step, in_shardings=(p_sh, d_sh, d_sh), out_shardings=(replicated(mesh), p_sh))
    losses = []
    for _ in range(steps):
        loss, params = step(params, x, y)
        losses.append(float(loss))
    return mesh, losses, params, x


def test_sharded_train_step_matches_single_device():
    _, ref_losses, ref_params, x_ref = _run((1, 1, 1))
    # The single-device loss itself matches an independent NumPy computation (tanh gelu).
    p0 = _init_params()
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = np.asarray(jax.random.normal(kx, (BATCH, D_IN)), np.float64)
    y = np.asarray(jax.random.normal(ky, (BATCH, D_IN)), np.float64)
    np.testing.assert_allclose(ref_losses[0], _numpy_loss(p0, x, y), rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    for shape in MESHES[:-1]:
        mesh, losses, params, xs = _run(shape)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6)
        # Shardings are the expected ones.
        want = {"w1": P("fsdp", "tensor"), "b1": P("tensor"), "w2": P("tensor", "fsdp"),
                "b2": P("fsdp"), "scale": P()}
        for k, spec in want.items():
            assert params[k].sharding.is_equivalent_to(NamedSharding(mesh, spec), params[k].ndim), k
        assert xs.sharding.spec == P(("data", "fsdp"))
        n_batch = shape[0] * shape[1]
        assert {s.data.shape for s in xs.addressable_shards} == {(BATCH // n_batch, D_IN)}


def test_context_mesh_and_divisible_axes():
    from models.sharding import context_mesh, divisible_axes, on_mesh
    mesh = make_mesh((2, 2, 2))
    assert context_mesh() is None
    seen = on_mesh(lambda: context_mesh(), mesh)()
    assert seen is not None and dict(seen.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert jax.jit(on_mesh(lambda x: x + (context_mesh() is not None), mesh))(0) == 1  # in jit
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert on_mesh(lambda: context_mesh(), one)() is None          # nothing to split
    assert on_mesh(lambda: 1, None)() == 1
    assert divisible_axes(mesh, ("data", "fsdp"), 8) == ("data", "fsdp")
    assert divisible_axes(mesh, ("data", "fsdp"), 6) is None        # 6 % 4
    assert divisible_axes(mesh, ("tensor",), 2) == "tensor"
    dp = make_mesh((4, 1, 2))
    assert divisible_axes(dp, ("data", "fsdp"), 4) == "data"       # size-1 axes left out
    assert divisible_axes(dp, ("data", "fsdp"), 2) is None


def test_activation_layout_under_a_context_mesh():
    """``constrain_activation`` / ``gather_table`` pin the layout only under a context mesh: rows
    over the data axes, the heads dim over tensor, each when it divides; the table's vocab over
    tensor, its embedding axis whole (read back from the compiled outputs' shardings)."""
    from models.sharding import constrain_activation, gather_table, on_mesh
    x = np.arange(8 * 3 * 4 * 6, dtype=np.float32).reshape(8, 3, 4, 6)
    assert constrain_activation(x) is x and gather_table(x) is x            # no context mesh
    mesh = make_mesh((2, 2, 2))

    def specs(fn, a, in_spec):
        a = jax.device_put(a, NamedSharding(mesh, in_spec))
        out = jax.jit(on_mesh(fn, mesh))(a)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(a))      # values untouched
        return tuple(out.sharding.spec) + (None,) * (out.ndim - len(out.sharding.spec))

    # from an embedding-split input (what propagation from FSDP weights gives)
    assert specs(lambda a: constrain_activation(a, heads_dim=2), x, P(None, None, None, "fsdp")) \
        == (("data", "fsdp"), None, "tensor", None)
    assert specs(constrain_activation, x, P(None, None, None, "fsdp")) \
        == (("data", "fsdp"), None, None, None)
    odd = x[:6, :, :3]                                       # 6 rows over 4, 3 heads over 2
    assert specs(lambda a: constrain_activation(a, heads_dim=2), odd, P()) == (None,) * 4
    table = x.reshape(96, 6)[:64]
    assert specs(gather_table, table, P("tensor", "fsdp")) == ("tensor", None)
    assert specs(gather_table, table[:63], P(None, "fsdp")) == (None, None)  # 63 % 2
