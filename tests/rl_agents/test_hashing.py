"""hash_tokens: exact FNV-1a, equal rows equal, no collisions on random distinct rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_agents.hashing import hash_tokens


def ref_fnv1a(row):
    h = 2166136261
    for t in row:
        for byte in int(np.int32(t)).to_bytes(4, "little", signed=True):
            h = ((h ^ byte) * 16777619) % 2 ** 32
    return h


def test_matches_python_fnv1a_reference():
    rng = np.random.default_rng(0)
    rows = rng.integers(-5, 70000, size=(20, 9)).astype(np.int32)
    got = np.asarray(hash_tokens(jnp.asarray(rows)))
    assert got.dtype == np.uint32
    assert got.tolist() == [ref_fnv1a(r) for r in rows]
    # the textbook FNV-1a value of the empty input is the offset basis
    assert int(hash_tokens(jnp.zeros((0,), jnp.int32))) == 2166136261


def test_no_collisions_on_distinct_rows_and_equal_rows_equal():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 64, size=(4000, 12)).astype(np.int32)
    rows = np.unique(rows, axis=0)
    h = np.asarray(jax.jit(hash_tokens)(jnp.asarray(rows)))
    assert len(set(h.tolist())) == len(rows)
    dup = np.concatenate([rows[:50], rows[:50]])
    hd = np.asarray(hash_tokens(jnp.asarray(dup)))
    np.testing.assert_array_equal(hd[:50], hd[50:])


def test_order_and_padding_sensitive_and_batched_shapes():
    a = jnp.array([3, 1, 2, 0, 0], jnp.int32)
    assert hash_tokens(a) != hash_tokens(a[jnp.array([1, 0, 2, 3, 4])])
    assert hash_tokens(a) != hash_tokens(jnp.array([3, 1, 2, 0, 1], jnp.int32))
    x = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=(3, 4, 6)), jnp.int32)
    h = hash_tokens(x)
    assert h.shape == (3, 4)
    np.testing.assert_array_equal(h[1], hash_tokens(x[1]))
    with pytest.raises(ValueError, match="float32"):
        hash_tokens(jnp.zeros((2, 3), jnp.float32))
