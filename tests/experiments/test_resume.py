"""Kill -9 mid-training, rerun the same command: identical metrics.jsonl and final parameters;
then ``experiments.eval`` on the trained workdir.

One uninterrupted run and one run killed with SIGKILL once ``metrics.jsonl`` shows step >= 3,
then restarted with the same command (it resumes from the last checkpoint, truncates the logged
steps after it and re-runs them). Every logged step's parsed dict and every final parameter
must be exactly equal. The runs use continuous rollouts, so the checkpoint the run resumes from
holds episodes in flight (env states, KV caches, turn records), which must continue exactly. Rerunning in that workdir with a different model is a clear error (exit
2, naming the field), never a silent re-initialisation. ``experiments.eval`` then reports greedy /
sampled success and pass@k and renders episodes. One test function: the runs share their
compilations (persistent cache) and workdirs. Subprocess settings: see test_cli.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from experiments import configs
from experiments.run import restore_latest
from tests.experiments.test_cli import (ABSL_INFO, ROOT, TINY, cli_env, eval_cmd, jax_cache,  # noqa: F401
                                       last_line, run, train_cmd)

TOTAL = 12
# continuous rollouts: the checkpoints hold episodes in flight (5 turn steps an update, episodes
# of up to 8 turns), which the resumed run must continue exactly
RUN = {"total_updates": TOTAL, "rollout.mode": "continuous", "rollout.continuous.turns_per_update": 5}


def read_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(ln)["step"] for ln in f if ln.endswith("\n") and ln.strip()]
    return max(steps, default=0)


def final_params(workdir):
    cfg = configs.load("default", {**TINY, **RUN})
    _, state, step = restore_latest(cfg, str(workdir))
    assert step == TOTAL
    return jax.tree.map(np.asarray, state.params)


@pytest.mark.slow   # ~60-100 s on 2 loaded cores: 6 subprocess runs (compilations cached)
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path, jax_cache):  # noqa: F811
    env = cli_env(jax_cache)
    ref_wd, wd = tmp_path / "uninterrupted", tmp_path / "killed"

    t0 = time.time()
    ref = run(train_cmd(ref_wd, RUN), env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    t_ref = time.time() - t0
    assert "final greedy success rate" in ref.stdout
    noisy = [ln for ln in ref.stderr.splitlines() if ABSL_INFO.match(ln)]
    assert not noisy, noisy[:3]                       # absl / orbax INFO logging is silenced
    stored = json.loads((ref_wd / "config.json").read_text())
    assert stored["model.d_model"] == 32 and stored["rl.algorithm"] == "ppo"
    assert (ref_wd / "tensorboard").is_dir()

    # the same command, killed with SIGKILL once step >= 3 is logged
    t0 = time.time()
    proc = subprocess.Popen(train_cmd(wd, RUN), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while last_step(wd) < 3:
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            assert time.time() - t0 < 300, "no step 3 within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = last_step(wd)
    assert 3 <= killed_at < TOTAL, killed_at          # really interrupted mid-run

    again = run(train_cmd(wd, RUN), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    resumed_from = int(again.stderr.split("resumed from", 1)[1].split("step", 1)[1].split()[0])
    assert 2 <= resumed_from <= killed_at and resumed_from % 2 == 0

    ref_rows, rows = read_rows(ref_wd), read_rows(wd)
    assert [r["step"] for r in ref_rows] == list(range(1, TOTAL + 1))
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
    for a, b in zip(ref_rows, rows):
        assert a == b, (a["step"], {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
    assert any("eval/success_rate" in r for r in rows)

    p_ref, p = final_params(ref_wd), final_params(wd)
    leaves_ref, leaves = jax.tree.leaves(p_ref), jax.tree.leaves(p)
    assert len(leaves) == len(leaves_ref) > 0
    for a, b in zip(leaves_ref, leaves):
        np.testing.assert_array_equal(a, b)
    # training moved the parameters (so the equality above is not vacuous)
    assert any(r["grad_norm"] > 0 for r in ref_rows) and len({r["loss"] for r in ref_rows}) > 1
    # the checkpoint resumed from carried episodes in flight into the re-run updates
    assert ref_rows[resumed_from - 1]["continuous/slots_in_episode"] > 0
    assert sum(r["continuous/groups_completed"] for r in ref_rows) > 0

    # resuming with a different model: exit 2 naming the field, the workdir is left alone
    before = sorted(os.listdir(wd / "checkpoints"))
    bad = run(train_cmd(wd, {**RUN, "model.d_model": 48}), env, timeout=120)
    assert bad.returncode == 2, bad.stderr[-3000:]
    line = last_line(bad.stderr)
    assert line.startswith("error: ") and "model.d_model: 32 -> 48" in line, line
    assert "Traceback" not in bad.stderr
    # without config.json (an older workdir) the checkpoint's config fingerprint still refuses
    os.remove(wd / "config.json")
    bad = run(train_cmd(wd, {**RUN, "model.d_model": 48}), env, timeout=120)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "written by a different config" in last_line(bad.stderr)
    assert sorted(os.listdir(wd / "checkpoints")) == before
    assert read_rows(wd) == rows
    print(f"uninterrupted run {t_ref:.0f} s; killed at step {killed_at}, resumed from {resumed_from}")

    # rerunning a finished run has nothing to do
    done = run(train_cmd(ref_wd, RUN), env)
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr[-3000:]
    assert read_rows(ref_wd) == ref_rows

    # experiments.eval on the trained workdir
    ev = run(eval_cmd(ref_wd, RUN, "--pass_k", "4", "--num_render", "2"), env)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert not [ln for ln in ev.stderr.splitlines() if ABSL_INFO.match(ln)]
    line = read_rows(ref_wd)[-1]
    assert line["mode"] == "eval" and line["step"] == TOTAL
    for k in ("eval/success_rate", "eval/sampled_success_rate", "eval/pass@4"):
        assert 0.0 <= line[k] <= 1.0, (k, line)
    assert "eval/greedy_return" in line and "eval/sampled_return" in line
    assert f"eval/success_rate: {line['eval/success_rate']}" in ev.stdout
    text = (ref_wd / "episodes.txt").read_text()
    assert text.count("# greedy episode") == 2 and text.count("# sampled episode") == 2
    body = text.split("# greedy episode 0", 1)[1].split("# greedy episode 1", 1)[0]
    assert "prompt:" in body and "turn 1:" in body    # a rendered prompt and its turns


def test_max_nonfinite_updates_is_a_run_length_key():
    """The non-finite stop limit may change on resume: it is outside the fingerprint and the
    config diff, like total_updates; a shaping key still changes both."""
    from experiments import configs
    from experiments.run import config_diff, config_fingerprint, flat_config

    a = configs.load("default")
    b = configs.load("default", {"rl.max_nonfinite_updates": 7, "total_updates": 5})
    c = configs.load("default", {"rl.kl_coef": 0.5})
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_diff(flat_config(a), flat_config(b)) == []
    assert config_fingerprint(a) != config_fingerprint(c)
    assert config_diff(flat_config(a), flat_config(c)) == ["rl.kl_coef: 0.04 -> 0.5"]
