"""``python -m experiments.train`` as a real 2-process JAX job (gloo on loopback, one CPU device
per process, ``--config.mesh.data=2``) against one process holding 2 devices.

1. The 2-process job trains 3 updates (BC warm start, updates, greedy eval every 2 steps,
   checkpoints at 0, 2 and 3): both processes exit 0, only process 0 prints, shows progress
   and writes ``metrics.jsonl`` (each step once).
2. Its logged metrics (loss, rollout metrics, ``eval/*``) equal those of the one-process run
   with the same mesh (rtol 1e-5; measured: bit-identical).
3. Rerunning the 2-process command with ``total_updates=5`` resumes from its step-3 checkpoint;
   steps 4 and 5 and the final parameters equal the uninterrupted one-process run's.

The one-process reference (5 updates) runs alongside the first 2-process job. Subprocess
settings (forced devices, persistent compilation cache, fast XLA codegen): see test_cli.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time

import jax
import numpy as np
import pytest

from experiments import configs
from experiments.run import restore_latest
from tests.experiments.test_cli import ROOT, TINY, cli_env, jax_cache, train_cmd  # noqa: F401
from tests.experiments.test_distributed import _free_port

RTOL = 1e-5
TIMEOUT_S = 480
#: The README command's mesh (data=2), a run just long enough for two evals and a resume, and
#: a BC warm start good enough (guess_number with n=4) that success rates and returns are not
#: all 0 (rollout 0.125-0.375, greedy eval 0.125-0.375), so comparing them means something.
RUN = {"mesh.data": 2, "mesh.fsdp": 1, "eval_every": 2, "checkpoint_every": 2, "env.kwargs.n": 4,
       "bc.episodes": 256, "bc.batch_size": 64, "bc.epochs": 8, "bc.lr": 1e-2, "bc.epsilon": 0.1}


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_two_process_job(workdir, total: int, cache: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for pid in range(2):
        env = cli_env(cache, devices=1)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(start(train_cmd(workdir, {**RUN, "total_updates": total}), env))
    return procs


def finish(procs: list[subprocess.Popen], everything: list[subprocess.Popen]) -> list[tuple]:
    """``(stdout, stderr)`` of each of ``procs`` (all must exit 0); on any failure every process
    of ``everything`` is killed and the failing one's stderr is shown."""
    out = []
    try:
        for i, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{stderr[-4000:]}"
            out.append((stdout, stderr))
    finally:
        if len(out) < len(procs):
            for p in everything:
                if p.poll() is None:
                    p.kill()
    return out


def printed(stdout: str) -> list[str]:
    """Lines a process printed, without gloo's own connection line."""
    return [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith("[Gloo]")]


def rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def assert_rows_close(got: dict, want: dict, keys) -> float:
    """Every key of ``keys`` equal within RTOL; returns the largest relative difference."""
    worst = 0.0
    for k in keys:
        a, b = got[k], want[k]
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-7), (got["step"], k, a, b)
        worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def final_params(workdir, total: int):
    cfg = configs.load("default", {**TINY, **RUN, "total_updates": total})
    _, state, step = restore_latest(cfg, str(workdir))
    assert step == total
    return jax.tree.map(np.asarray, state.params)


@pytest.mark.slow   # 100 s of CPU (2.5-4 min on 2 busy cores): 2-process job, resume, 1 process
def test_two_process_training_matches_one_process_and_resumes(tmp_path, jax_cache):  # noqa: F811
    mp_wd, sp_wd = tmp_path / "two_processes", tmp_path / "one_process"
    t0 = time.time()
    job = start_two_process_job(mp_wd, 3, jax_cache)
    ref = start(train_cmd(sp_wd, {**RUN, "total_updates": 5}), cli_env(jax_cache, devices=2))
    (out0, err0), (out1, err1) = finish(job, job + [ref])
    t_job = time.time() - t0
    finish([ref], [ref])
    t_ref = time.time() - t0

    # -- 1. the 2-process job: only process 0 prints, shows progress, writes metrics
    assert "final greedy success rate" in out0, out0 + err0[-2000:]
    assert printed(out1) == [], out1
    assert "train:" in err0 and "[bc]" in err0
    assert "train:" not in err1 and "[bc]" not in err1, err1[-2000:]
    mp = rows(mp_wd)
    assert [r["step"] for r in mp] == [1, 2, 3]
    assert ["eval/success_rate" in r for r in mp] == [False, True, True]
    assert steps(mp_wd) == [0, 2, 3]

    # -- 2. the same metrics as one process holding both devices
    sp = {r["step"]: r for r in rows(sp_wd)}
    assert sorted(sp) == [1, 2, 3, 4, 5]
    worst = 0.0
    for r in mp[:2]:
        assert r.keys() == sp[r["step"]].keys()
        worst = max(worst, assert_rows_close(r, sp[r["step"]], set(r) - {"step"}))
    # step 3 ended the 2-process run (eval at the last step); the reference ran on to 5
    assert set(mp[2]) - set(sp[3]) == {k for k in mp[2] if k.startswith("eval/")}
    worst = max(worst, assert_rows_close(mp[2], sp[3], set(sp[3]) - {"step"}))
    assert any(r["rollout/success_rate"] > 0 for r in mp), mp
    assert any(r.get("eval/success_rate", 0) > 0 for r in mp), mp

    # -- 3. the same command with more updates resumes from the 2-process checkpoint
    t1 = time.time()
    job = start_two_process_job(mp_wd, 5, jax_cache)
    (out0, err0), (out1, _) = finish(job, job)
    t_resume = time.time() - t1
    assert f"resumed from {mp_wd / 'checkpoints'} step 3" in err0, err0[-2000:]
    assert "final greedy success rate" in out0 and printed(out1) == []
    resumed = rows(mp_wd)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed[:3] == mp
    for r in resumed[3:]:
        assert r.keys() == sp[r["step"]].keys()
        worst = max(worst, assert_rows_close(r, sp[r["step"]], set(r) - {"step"}))
    assert steps(mp_wd) == [3, 4, 5]   # keep_checkpoints = 3
    got, want = final_params(mp_wd, 5), final_params(sp_wd, 5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), got, want)
    print(f"largest relative metric difference, 2 processes vs 1: {worst:.2e}; wall s: "
          f"2-process job {t_job:.0f}, with the 1-process run {t_ref:.0f}, resume {t_resume:.0f}")
