"""A real 2-process JAX job on loopback (gloo CPU collectives) and the single-process helpers."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import distributed
from models.sharding import data_sharding, make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_BATCH, D = 8, 3


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH, D)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    w0 = np.array([0.1, 0.2, -0.3], np.float32)
    return x, y, w0


def _reference():
    """Independent NumPy float64 gradient step on the full batch: loss = mean((xw + b - y)^2)."""
    x, y, w0 = (a.astype(np.float64) for a in _data())
    b0 = 0.05
    r = x @ w0 + b0 - y
    loss = np.mean(r ** 2)
    gw, gb = 2 * x.T @ r / len(r), 2 * r.mean()
    return loss, w0 - 0.1 * gw, b0 - 0.1 * gb


WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from experiments import distributed
    assert distributed.initialize_from_env()            # reads JAX_COORDINATOR_ADDRESS etc.
    import jax, jax.numpy as jnp
    from models.sharding import make_mesh, data_sharding, put_global, replicated
    from experiments.metrics import MetricsWriter
    from tests.experiments.test_distributed import D, _data

    out_dir = sys.argv[1]
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=1))
    dsh = data_sharding(mesh)
    x, y, w0 = _data()
    rows = distributed.process_local_batch_slice(len(x), dsh)
    assert rows == distributed.process_local_batch_slice(len(x))   # contiguous per-process blocks
    gx = distributed.global_array_from_local(x[rows], mesh)
    gy = distributed.global_array_from_local(y[rows], mesh)
    assert gx.shape == x.shape and not gx.is_fully_addressable
    # put_global: arrays committed to one local device (identical on every process) -> global
    # arrays whose shards are plain per-device buffers (what orbax and jit expect).
    local = jax.device_put({"w": jnp.asarray(w0), "b": jnp.float32(0.05)}, jax.local_devices()[0])
    params = put_global(local, {"w": replicated(mesh), "b": replicated(mesh)})
    for a in jax.tree.leaves(params):
        assert [s.data.shape for s in a.addressable_shards] == [a.shape] * 2
    gx2 = put_global(jax.device_put(x, jax.local_devices()[0]), dsh)
    assert [s.data.shape for s in gx2.addressable_shards] == [(2, D)] * 2
    assert np.array_equal(distributed.host_value(gx2), x)   # gathered across processes
    assert np.array_equal(distributed.host_value(params["w"]), w0)

    def loss_fn(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def step(p, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        return loss, jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    loss, new = step(params, gx, gy)
    res = {"process": jax.process_index(), "rows": [rows.start, rows.stop], "loss": float(loss),
           "w": np.asarray(new["w"]).tolist(), "b": float(new["b"])}
    w = MetricsWriter(out_dir, enabled=distributed.is_main_process(), tensorboard=False)
    w.write(1, {"loss": loss})
    w.close()
    print("RESULT " + json.dumps(res), flush=True)
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_job_matches_single_process(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), PYTHONPATH=REPO)
        out = tmp_path / f"wd{pid}"
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(out)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr[-3000:]
            line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            assert line, stdout + stderr[-2000:]
            results.append(json.loads(line[0][len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    loss, w, b = _reference()
    assert [r["process"] for r in results] == [0, 1]
    assert [r["rows"] for r in results] == [[0, 4], [4, 8]]
    for r in results:
        np.testing.assert_allclose(r["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(r["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["b"], b, rtol=1e-5, atol=1e-6)
    assert results[0]["loss"] == results[1]["loss"]
    # Only process 0 wrote metrics.
    assert (tmp_path / "wd0" / "metrics.jsonl").read_text().strip() == json.dumps(
        {"step": 1, "loss": results[0]["loss"]})
    assert not (tmp_path / "wd1").exists()


def test_single_process_helpers(monkeypatch):
    for k in distributed.ENV_VARS + ("JAX_DISTRIBUTED_AUTO", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize_from_env() is False       # no-op on one host
    assert distributed.is_main_process()
    assert distributed.process_local_batch_slice(12) == slice(0, 12)
    assert distributed.process_local_batch_slice(12, process_index=2, process_count=3) == slice(8, 12)
    with pytest.raises(ValueError, match="global batch 10 is not divisible by the process count 4"):
        distributed.process_local_batch_slice(10, process_index=0, process_count=4)
    mesh = make_mesh((4, 2, 1))
    assert distributed.process_local_batch_slice(16, data_sharding(mesh)) == slice(0, 16)
    x, _, _ = _data()
    g = distributed.global_array_from_local({"x": x}, mesh)["x"]
    assert g.sharding.spec == data_sharding(mesh).spec
    np.testing.assert_array_equal(np.asarray(g), x)
    # Single-process step equals the NumPy reference too.
    _, y, w0 = _data()
    loss = jnp.mean((jnp.asarray(x) @ w0 + 0.05 - y) ** 2)
    np.testing.assert_allclose(loss, _reference()[0], rtol=1e-5)


def test_incomplete_env_is_a_clear_error(monkeypatch):
    for k in distributed.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, "
                                         "JAX_PROCESS_ID missing"):
        distributed.initialize_from_env()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "two")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer, got 'two'"):
        distributed.initialize_from_env()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID = 2 must be in \[0, JAX_NUM_PROCESSES = 2\)"):
        distributed.initialize_from_env()
    with pytest.raises(ValueError, match="together"):
        distributed.initialize_from_env("127.0.0.1:1", 2)
