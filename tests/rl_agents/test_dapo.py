"""DAPO pieces vs. NumPy / Python references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rl_agents.dapo import (gather_groups, informative_groups, overlong_penalty,
                            select_informative_groups)


def ref_penalty(L, max_len, cache_len):
    if L <= max_len - cache_len:
        return 0.0
    if L <= max_len:
        return ((max_len - cache_len) - L) / cache_len
    return -1.0


def test_overlong_penalty_matches_piecewise_reference():
    max_len, cache = 20, 8
    lengths = np.arange(0, 30)
    got = np.asarray(overlong_penalty(jnp.asarray(lengths), max_len, cache))
    np.testing.assert_allclose(got, [ref_penalty(L, max_len, cache) for L in lengths], atol=1e-7)
    assert got[12] == 0.0 and got[13] == pytest.approx(-1 / 8) and got[16] == pytest.approx(-0.5)
    assert got[20] == -1.0 and got[29] == -1.0
    assert np.all(np.diff(got) <= 0)
    assert got.dtype == np.float32


def test_overlong_penalty_jit_and_validation():
    f = jax.jit(lambda L: overlong_penalty(L, 10, 4))
    np.testing.assert_allclose(f(jnp.array([6, 7, 9, 10, 11])), [0, -0.25, -0.75, -1, -1])
    for bad in [dict(max_len=0, cache_len=1), dict(max_len=10, cache_len=0),
                dict(max_len=10, cache_len=11)]:
        with pytest.raises(ValueError, match="cache_len|max_len"):
            overlong_penalty(jnp.array([1]), **bad)


def ref_select(success, n_keep):
    g = success.shape[1]
    informative = [i for i, s in enumerate(success) if 0 < int(s.sum()) < g]
    rest = [i for i in range(len(success)) if i not in informative]
    order = (informative + rest)[:n_keep]
    return np.array(order), np.array([i in informative for i in order])


@pytest.mark.parametrize("seed", range(6))
def test_select_informative_groups_matches_reference(seed):
    rng = np.random.default_rng(seed)
    N, G = 10, 4
    success = rng.random((N, G)) < 0.5
    success[rng.random(N) < 0.5] = rng.random() < 0.5           # many all-equal groups
    for n_keep in (1, 3, 6, 10):
        idx, keep = jax.jit(select_informative_groups, static_argnums=1)(jnp.asarray(success), n_keep)
        r_idx, r_keep = ref_select(success, n_keep)
        np.testing.assert_array_equal(idx, r_idx)
        np.testing.assert_array_equal(keep, r_keep)
        assert idx.dtype == jnp.int32 and keep.dtype == jnp.bool_


def test_select_informative_groups_edge_cases():
    none = jnp.ones((4, 3), bool)
    idx, keep = select_informative_groups(none, 2)
    np.testing.assert_array_equal(idx, [0, 1])
    assert not np.any(keep)
    s = jnp.array([[1, 1], [0, 1], [0, 0], [1, 0]], bool)
    np.testing.assert_array_equal(informative_groups(s), [False, True, False, True])
    idx, keep = select_informative_groups(s, 3)
    np.testing.assert_array_equal(idx, [1, 3, 0])
    np.testing.assert_array_equal(keep, [True, True, False])
    with pytest.raises(ValueError, match="n_keep=5"):
        select_informative_groups(s, 5)
    with pytest.raises(ValueError, match="group_success"):
        select_informative_groups(jnp.ones(4, bool), 1)
    # shaped returns are refused: the filter reads success labels only
    with pytest.raises(ValueError, match="bool"):
        select_informative_groups(jnp.array([[1.0, 0.99], [0.0, -0.01]]), 1)


def test_gather_groups_matches_numpy():
    rng = np.random.default_rng(0)
    N, G = 5, 3
    tree = {"tokens": rng.integers(0, 9, size=(N * G, 7)), "ret": rng.normal(size=(N * G,)).astype(np.float32),
            "nested": (rng.normal(size=(N * G, 2, 2)),)}
    idx = np.array([3, 0, 3])
    out = gather_groups(jax.tree.map(jnp.asarray, tree), jnp.asarray(idx), G)
    rows = np.concatenate([np.arange(i * G, (i + 1) * G) for i in idx])
    for k in ("tokens", "ret"):
        np.testing.assert_array_equal(out[k], tree[k][rows])
    np.testing.assert_allclose(out["nested"][0], tree["nested"][0][rows])
    with pytest.raises(ValueError, match=r"\['bad'\].*group_size=3"):
        gather_groups({"bad": jnp.zeros((7,))}, jnp.asarray(idx), G)


def test_dynamic_sampling_end_to_end_under_jit():
    """Oversampled groups → keep the informative ones → gathered rows line up with their groups;
    shaped returns that differ inside an all-fail / all-success group do not make it informative."""
    from rl_agents.dapo import dynamic_sampling

    N, G, n_keep = 6, 2, 3
    success = jnp.array([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1], [1, 0]], bool)
    ret = jnp.array([[1., .98], [0., 1.], [-.01, -.3], [1., 0.], [.99, 1.], [1., -.02]])

    @struct.dataclass
    class Rows:
        success: jax.Array
        ret: jax.Array
        row: jax.Array
        group_ids: jax.Array

    rows = Rows(success=success.reshape(-1), ret=ret.reshape(-1), row=jnp.arange(N * G),
                group_ids=jnp.repeat(jnp.arange(N), G) * 10)
    out, weight, metrics = jax.jit(dynamic_sampling, static_argnums=(1, 2))(rows, n_keep, G)
    np.testing.assert_array_equal(out.row, [2, 3, 6, 7, 10, 11])
    np.testing.assert_array_equal(out.group_ids, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(weight, np.ones(6))
    assert float(metrics["dapo/kept_fraction"]) == pytest.approx(3 / 6)
    out, weight, metrics = dynamic_sampling(rows, 5, G)       # too few informative: filler
    np.testing.assert_array_equal(out.row[6:], [0, 1, 4, 5])
    np.testing.assert_array_equal(weight, [1] * 6 + [0] * 4)
