"""benchmarks.env_throughput: tiny smoke run, input layout, and argument checks."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import envs
from benchmarks import env_throughput as B


def test_batch_inputs_layout_matches_trajectory():
    env = envs.make("kv_search")
    states, acts, lengths = B.oracle_trajectory(env, 6)
    assert lengths.shape == (6,) and (lengths >= 1).all() and (lengths <= env.max_turns).all()
    s0, a = B.batch_inputs(states, acts, 3, 2, 2)
    assert a.shape == (2, 2, 3, env.action_len)
    # episode e * B + i is slot (e, i); its turn t action is a[e, t, i]
    assert np.array_equal(a[1, 1, 2], acts[1 * 3 + 2, 1])
    assert np.array_equal(s0.turn, np.zeros((2, 3), np.int32))
    assert np.array_equal(np.asarray(s0.chain)[1, 0], np.asarray(states.chain)[3, 0])
    assert B.episodes_per_call(3, 32) == 11 and B.episodes_per_call(40, 32) == 1


def test_rollout_runs_the_same_steps_as_the_env():
    env = envs.make("calculator")
    states, acts, _ = B.oracle_trajectory(env, 4)
    s0, a = B.batch_inputs(states, acts, 2, 2, 3)
    ts = jax.device_get(B.make_rollout(env)(s0, a))
    assert ts.observation.shape == (2, 3, 2, env.obs_len)
    for e in range(2):
        for i in range(2):
            s = jax.tree_util.tree_map(lambda x: x[e, i], s0)
            for t in range(3):
                s, want = env.step(s, a[e, t, i])
                assert np.array_equal(ts.observation[e, t, i], np.asarray(want.observation))
                assert ts.reward[e, t, i] == float(want.reward)


def test_batch_minor_layout_gives_the_same_timesteps():
    env = envs.make("maze")
    states, acts, _ = B.oracle_trajectory(env, 6)
    s0, a = B.batch_inputs(states, acts, 3, 2, 3)
    m0, ma = B.to_layout(s0, a, "minor")
    assert ma.shape == (2, 3, env.action_len, 3) and ma.flags["C_CONTIGUOUS"]
    assert np.asarray(m0.walls).shape == (2, env.size, env.size, 3)
    major = jax.device_get(B.make_rollout(env, "major")(s0, a))
    minor = jax.device_get(B.make_rollout(env, "minor")(m0, ma))
    assert np.array_equal(np.moveaxis(minor.observation, -1, 2), major.observation)
    for name in ("reward", "terminated", "truncated"):
        assert np.array_equal(getattr(minor, name), getattr(major, name))
    for k in major.info:
        assert np.array_equal(minor.info[k], major.info[k]), k
    with pytest.raises(ValueError, match="layout"):
        B.make_rollout(env, "diagonal")


def test_quick_table(capsys):
    out = B.main(["--envs", "maze", "--batches", "2", "--runs", "3", "--steps-per-call", "4",
                  "--cpus", "all", "--vector-width", "xla"])
    rows = [l for l in out.splitlines() if l.startswith("| maze")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "2" and cells[7].endswith("x") and cells[8].endswith("x")
    assert float(cells[4].replace(",", "")) > 0 and float(cells[5].replace(",", "")) > 0
    assert "lax.scan over E episodes" in capsys.readouterr().out


def test_sharded_column_checks_outputs_and_skips_indivisible_batches():
    """--devices 2: a sharded batch-minor side (its outputs are checked against one device's
    inside time_side_by_side) with its own steps/s and ratio; '-' where B is odd."""
    assert jax.local_device_count() >= 2          # tests/conftest.py: 8 host devices
    out = B.main(["--envs", "kv_search", "--batches", "1", "4", "--runs", "3",
                  "--steps-per-call", "4", "--devices", "2", "--cpus", "all", "--vector-width", "xla"])
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in out.splitlines()
            if l.startswith("| kv_search")]
    assert [r[1] for r in rows] == ["1", "4"] and all(len(r) == 12 for r in rows)
    assert rows[0][10:] == ["-", "-"]
    assert float(rows[1][10].replace(",", "")) > 0 and rows[1][11].endswith("x")
    s0 = B.shard_batch_minor({"x": np.zeros((2, 3, 4), np.int32)}, 2)["x"]
    assert len(s0.sharding.device_set) == 2 and s0.addressable_shards[0].data.shape == (2, 3, 2)


@pytest.mark.parametrize("argv,match", [(["--runs", "2"], "runs"), (["--batches", "0"], "batches"),
                                        (["--envs", "nope"], "no twin"),
                                        (["--steps-per-call", "0"], "steps-per-call"),
                                        (["--devices", "0"], "devices"),
                                        (["--devices", "64"], "xla_force_host_platform_device_count")])
def test_bad_arguments_raise(argv, match):
    with pytest.raises(ValueError, match=match):
        B.main(argv + ["--cpus", "all", "--vector-width", "xla"])


def test_cpus_option_checks_and_refuses_a_started_backend():
    """--cpus: bad values name themselves; pinning after JAX's CPU client exists (as in this
    test process) is refused, since XLA's pool could no longer be sized."""
    jax.devices()                                   # the client exists here
    for bad in ["0", "x", str(len(os.sched_getaffinity(0)) + 1)]:
        with pytest.raises(ValueError, match="--cpus"):
            B.pin_cpus(bad)
    with pytest.raises(ValueError, match="fresh process"):
        B.main(["--envs", "maze", "--batches", "2", "--runs", "3", "--cpus", "1",
                "--vector-width", "xla"])
    assert B.pin_cpus("all") is None


def test_cpus_without_affinity_support_warns_and_runs_unpinned(monkeypatch):
    """On an OS without sched_setaffinity (macOS) --cpus K warns and leaves the process as is."""
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    with pytest.warns(UserWarning, match="Linux only"):
        assert B.pin_cpus("1") is None


def test_vector_width_option(monkeypatch):
    """--vector-width: unknown values rejected; a width in XLA_FLAGS is kept; setting one after
    JAX's CPU client exists is refused (the flags were read already); 'xla' changes nothing."""
    jax.devices()
    with pytest.raises(ValueError, match="--vector-width"):
        B.set_vector_width("128")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert "as set in XLA_FLAGS" in B.set_vector_width("512")
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(ValueError, match="fresh process"):
        B.set_vector_width("512")
    assert "default" in B.set_vector_width("xla") and os.environ["XLA_FLAGS"] == ""


def test_pinned_run_in_a_fresh_process(tmp_path):
    """The default --cpus 1 in a fresh process: pinned before JAX starts, said in the notes."""
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks.env_throughput", "--envs", "kv_search",
                        "--batches", "2", "--runs", "3", "--steps-per-call", "4", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr[-2000:]
    first = sorted(os.sched_getaffinity(0))[0]
    assert f"process pinned to CPU(s) [{first}] before JAX started" in r.stdout
    assert "jitted side compiled with" in r.stdout
    assert "| kv_search | 2 |" in out.read_text()
