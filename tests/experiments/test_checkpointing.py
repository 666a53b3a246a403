"""Checkpointer round trips, retention, strict restore errors, and the SIGTERM guard."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.checkpointing import Checkpointer, CheckpointError, PreemptionGuard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: object
    key: jax.Array       # typed key
    raw_key: jax.Array   # legacy uint32 key


def _state(seed=0):
    k = jax.random.PRNGKey(seed)
    params = {"dense": {"w": jax.random.normal(k, (4, 3)), "b": jnp.arange(3.0)},
              "emb": jax.random.normal(jax.random.fold_in(k, 1), (5, 2)).astype(jnp.bfloat16)}
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(g, opt_state, params)
    return TrainState(step=jnp.int32(seed + 3), params=params, opt_state=opt_state,
                      key=jax.random.key(seed + 11), raw_key=jax.random.PRNGKey(seed + 12))


def _abstract(tree):
    return jax.eval_shape(lambda: tree)


def _assert_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_nested_state_with_keys(tmp_path):
    state = _state(1)
    ck = Checkpointer(tmp_path / "ck", keep=3, save_every=1)
    assert ck.latest_step() is None
    assert ck.save(5, state, {"config_fingerprint": "abc", "curriculum": [1, 2], "n": np.int64(4)})
    assert ck.latest_step() == 5
    # A fresh manager (new process after a restart) sees and restores it.
    ck2 = Checkpointer(tmp_path / "ck", keep=3, save_every=1)
    restored, meta = ck2.restore(5, _abstract(state), expected_fingerprint="abc")
    _assert_tree_equal(restored, state)
    assert isinstance(restored, TrainState)
    assert meta == {"config_fingerprint": "abc", "curriculum": [1, 2], "n": 4}
    # The restored typed key generates the same numbers as the original.
    np.testing.assert_array_equal(jax.random.uniform(restored.key, (3,)),
                                  jax.random.uniform(state.key, (3,)))
    # Restoring onto concrete arrays (not ShapeDtypeStructs) works too; step=None is the latest.
    restored2, _ = ck2.restore(None, state)
    _assert_tree_equal(restored2, state)


def test_python_int_and_numpy_leaves(tmp_path):
    tree = {"step": 7, "np": np.arange(4, dtype=np.int32), "x": jnp.ones((2,))}
    ck = Checkpointer(tmp_path, keep=1, save_every=1)
    ck.save(1, tree, {})
    out, meta = ck.restore(1, tree)
    assert out["step"] == 7 and isinstance(out["step"], int)
    np.testing.assert_array_equal(out["np"], tree["np"])
    assert meta == {}


def test_restore_with_shardings(tmp_path):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("a", "b"))
    P = jax.sharding.PartitionSpec
    x = jnp.arange(32.0).reshape(8, 4)
    ck = Checkpointer(tmp_path, keep=1, save_every=1)
    ck.save(2, {"x": x}, {})
    sh = jax.sharding.NamedSharding(mesh, P("a", "b"))
    out, _ = ck.restore(2, {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh)})
    assert out["x"].sharding == sh
    np.testing.assert_array_equal(out["x"], x)


def test_keep_n_and_interval(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, save_every=3)
    tree = {"a": jnp.zeros(2)}
    saved = [s for s in range(0, 11) if ck.save(s, {"a": jnp.full(2, float(s))}, {})]
    assert saved == [0, 3, 6, 9]
    assert ck.all_steps() == [6, 9]
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [6, 9]
    assert ck.save(10, tree, {}, force=True)           # force ignores the interval
    assert ck.all_steps() == [9, 10]
    assert not ck.save(10, tree, {}, force=True)       # an existing step is left alone
    out, _ = ck.restore(9, tree)
    np.testing.assert_array_equal(out["a"], [9.0, 9.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        Checkpointer("/tmp/unused_ck_dir_x", keep=0, save_every=1)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer("/tmp/unused_ck_dir_x", keep=1, save_every=0)


def test_mismatched_shape_dtype_structure(tmp_path):
    state = _state(0)
    ck = Checkpointer(tmp_path, keep=1, save_every=1)
    ck.save(1, state, {})
    bad = _abstract(state.replace(params={**state.params, "dense": {"w": jnp.zeros((4, 5)),
                                                                     "b": state.params["dense"]["b"]}}))
    with pytest.raises(CheckpointError) as e:
        ck.restore(1, bad)
    msg = str(e.value)
    assert "params/dense/w" in msg and "(4, 3)" in msg and "(4, 5)" in msg and str(tmp_path) in msg
    assert "\n" not in msg

    bad_dtype = _abstract(state.replace(params={**state.params,
                                                "emb": state.params["emb"].astype(jnp.float32)}))
    with pytest.raises(CheckpointError, match=r"params/emb.*bfloat16.*float32"):
        ck.restore(1, bad_dtype)

    missing = _abstract(state.replace(params={**state.params, "extra": jnp.zeros(2)}))
    with pytest.raises(CheckpointError, match="params/extra.*missing"):
        ck.restore(1, missing)

    fewer = _abstract(state.replace(params={"dense": state.params["dense"]}))
    with pytest.raises(CheckpointError, match="params/emb"):
        ck.restore(1, fewer)

    with pytest.raises(CheckpointError, match="step 4"):
        ck.restore(4, _abstract(state))


@pytest.mark.parametrize("damage", ["delete_data", "truncate_data", "delete_metadata", "delete_meta"])
def test_corrupted_checkpoint_raises(tmp_path, damage):
    state = {"w": jnp.arange(12.0).reshape(4, 3), "step": jnp.int32(2)}
    ck = Checkpointer(tmp_path, keep=2, save_every=1)
    ck.save(2, state, {"config_fingerprint": "f"})
    step_dir = os.path.join(str(tmp_path), "2")
    data = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
            if os.path.isfile(f) and os.sep + "d" + os.sep in f]
    assert data, "expected orbax data files"
    if damage == "delete_data":
        for f in data:
            os.remove(f)
    elif damage == "truncate_data":
        for f in data:
            with open(f, "r+b") as fh:
                fh.truncate(8)
    elif damage == "delete_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    else:
        shutil.rmtree(os.path.join(step_dir, "meta"))
    ck2 = Checkpointer(tmp_path, keep=2, save_every=1)
    assert ck2.latest_step() == 2    # still listed: restore must fail loudly, not re-init
    with pytest.raises(CheckpointError, match=f"{step_dir}.*damaged"):
        ck2.restore(2, state)


def test_fingerprint_mismatch(tmp_path):
    ck = Checkpointer(tmp_path, keep=1, save_every=1)
    tree = {"a": jnp.ones(3)}
    ck.save(1, tree, {"config_fingerprint": "aaaa"})
    with pytest.raises(CheckpointError, match=r"aaaa.*bbbb.*new --workdir"):
        ck.restore(1, tree, expected_fingerprint="bbbb")
    ck.restore(1, tree, expected_fingerprint="aaaa")
    ck.restore(1, tree)                                  # no expectation: no check
    ck.save(2, tree, {})
    ck.restore(2, tree, expected_fingerprint="bbbb")     # checkpoint without one: no check


def test_preemption_guard_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop and guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    # the SIGINT handler before the guard: Python's default, or SIG_IGN when the test process
    # was started in the background (nohup / `&`)
    before_int = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(catch_sigint=True) as g2:
        assert signal.getsignal(signal.SIGINT) is not before_int
        os.kill(os.getpid(), signal.SIGINT)
        assert g2.should_stop
    assert signal.getsignal(signal.SIGINT) is before_int


CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from experiments.checkpointing import Checkpointer, PreemptionGuard
    ck = Checkpointer(sys.argv[1], keep=2, save_every=1000)
    state = {"w": jnp.zeros(3), "key": jax.random.key(0)}
    step = 0
    with PreemptionGuard() as guard:
        print("READY", flush=True)
        while True:
            step += 1
            state = {"w": state["w"] + 1.0, "key": jax.random.split(state["key"])[0]}
            if guard.should_stop:
                ck.save(step, state, {"preempted": True}, force=True)
                print("SAVED", step, flush=True)
                sys.exit(0)
            time.sleep(0.01)
""")


def test_sigterm_saves_and_exits_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = ""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "ck")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    saved_step = int(out.split("SAVED")[1].split()[0])
    ck = Checkpointer(tmp_path / "ck", keep=2, save_every=1000)
    assert ck.latest_step() == saved_step
    state, meta = ck.restore(None, {"w": jnp.zeros(3), "key": jax.random.key(0)})
    assert meta == {"preempted": True}
    np.testing.assert_array_equal(state["w"], np.full(3, float(saved_step)))


def _toy_run(workdir, total, crash_after=None):
    """A miniature host loop (as experiments.run uses these modules): resume if possible, log,
    checkpoint every 5 steps; ``crash_after``: stop abruptly (no save) after that step."""
    from experiments.metrics import MetricsWriter

    @jax.jit
    def update(state):
        key, sub = jax.random.split(state["key"])
        g = jax.random.normal(sub, state["w"].shape)
        w = state["w"] - 0.1 * g
        return {"w": w, "key": key, "step": state["step"] + 1}, jnp.sum(w ** 2)

    ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=5)
    init = {"w": jnp.ones(4), "key": jax.random.key(0), "step": jnp.int32(0)}
    latest = ck.latest_step()
    state = ck.restore(latest, jax.eval_shape(lambda: init), expected_fingerprint="fp")[0] \
        if latest is not None else init
    start = int(state["step"])
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=False)
    for step in range(start + 1, total + 1):
        state, loss = update(state)
        writer.write(step, {"loss": loss})
        if crash_after is not None and step == crash_after:
            writer.close()
            return
        ck.save(step, state, {"config_fingerprint": "fp"}, force=step == total)
    writer.close()
    return state


def test_crash_and_resume_reproduces_uninterrupted_run(tmp_path):
    ref = _toy_run(str(tmp_path / "ref"), 10)
    _toy_run(str(tmp_path / "run"), 10, crash_after=7)       # last checkpoint: step 5
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert len(f.readlines()) == 7
    out = _toy_run(str(tmp_path / "run"), 10)
    with open(tmp_path / "ref" / "metrics.jsonl") as f1, open(tmp_path / "run" / "metrics.jsonl") as f2:
        a, b = f1.read(), f2.read()
    assert a == b and len(a.splitlines()) == 10
    np.testing.assert_array_equal(out["w"], ref["w"])
    assert Checkpointer(tmp_path / "run" / "checkpoints", keep=2, save_every=5).all_steps() == [5, 10]
