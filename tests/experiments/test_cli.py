"""``python -m experiments.train`` / ``experiments.eval`` start-up errors (subprocesses).

Unknown / ill-typed overrides, impossible meshes and batches, bad env knobs, a missing config
file or checkpoint: exit non-zero before anything is compiled, with one ``error:`` line naming
the field. (Training, eval on the trained workdir and resuming are in test_resume.py, which
shares the helpers below.)

Subprocesses see 2 forced CPU devices (not the 8 of tests/conftest.py), share a persistent JAX
compilation cache per test session, and compile as the suite does (they inherit
``JAX_DISABLE_MOST_OPTIMIZATIONS`` from tests/conftest.py: faster XLA:CPU codegen; the programs
compute the same).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join("experiments", "configs", "default.py")

#: A tiny run of the default config (GRPO -> PPO override so that every update has a gradient).
TINY = {
    "rl.algorithm": "ppo", "rl.epochs": 1, "rl.entropy_coef": 0.01,
    "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.d_ff": 64,
    "rollout.num_groups": 4, "rollout.group_size": 2, "rollout.eval_episodes": 8,
    "bc.episodes": 64, "bc.epochs": 2, "bc.batch_size": 32,
    "mesh.fsdp": 2,
    "checkpoint_every": 2, "eval_every": 4,
}
ABSL_INFO = re.compile(r"^I\d{4} ")


def cli_env(cache_dir: str, devices: int = 2) -> dict:
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    })
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_DISTRIBUTED_AUTO"):
        env.pop(k, None)
    return env


def overrides(d: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in d.items()]


def train_cmd(workdir, extra: dict | None = None, config: str = CONFIG) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config", config, "--workdir", str(workdir),
            *overrides({**TINY, **(extra or {})})]


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """One persistent compilation cache per test session (and xdist worker), shared by the
    modules that import this fixture."""
    path = tmp_path_factory.getbasetemp() / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


# ----------------------------------------------------------------------------- start-up errors
BAD = [
    ("unknown_field", {"rl.algorithmx": "ppo"}, 2, r"config\.rl\.algorithmx.*did you mean config\.rl\.algorithm"),
    ("ill_typed", {"total_updates": "abc"}, 2, r"--config\.total_updates=abc"),
    ("mesh_product", {"mesh.data": 3}, 2, r"config\.mesh: data\*fsdp\*tensor = 3\*2\*1 = 6 but 2 devices"),
    ("batch_not_divisible", {"rollout.num_groups": 3, "rollout.group_size": 3, "rl.minibatches": 1},
     2, r"config\.rollout: batch .* = 9 is not divisible by mesh\.data\*mesh\.fsdp = 2"),
    ("env_knob", {"env.kwargs.n": 1}, 2, r"config\.env\.kwargs: n must be"),
    ("algorithm", {"rl.algorithm": "nope"}, 2, r"config\.rl\.algorithm='nope' is not registered"),
    ("loss_aggregation", {"rl.agg": "sum"}, 2, r"config\.rl\.agg = 'sum' is not one of"),
]


@pytest.mark.parametrize("case, extra, devices, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_command_line_fails_with_one_line(case, extra, devices, pattern, tmp_path, jax_cache):
    wd = tmp_path / "wd"
    proc = run(train_cmd(wd, extra), cli_env(jax_cache, devices), timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("error: "), proc.stderr[-2000:]
    assert re.search(pattern, line), line
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (wd / "checkpoints").exists()          # failed before anything was written


def test_missing_config_file(tmp_path, jax_cache):
    proc = run(train_cmd(tmp_path / "wd", config="experiments/configs/nope.py"), cli_env(jax_cache))
    assert proc.returncode == 2
    assert re.search(r"--config=experiments/configs/nope\.py: cannot load", last_line(proc.stderr))
    assert "Traceback" not in proc.stderr


def test_eval_without_checkpoint(tmp_path, jax_cache):
    proc = run([sys.executable, "-m", "experiments.eval", "--config", CONFIG, "--workdir",
                str(tmp_path / "empty"), *overrides(TINY)], cli_env(jax_cache), timeout=120)
    assert proc.returncode == 2
    assert "no checkpoint under" in last_line(proc.stderr) and "Traceback" not in proc.stderr
    assert not (tmp_path / "empty").exists()


def eval_cmd(workdir, extra: dict | None = None, *flags_: str) -> list[str]:
    return [sys.executable, "-m", "experiments.eval", "--config", CONFIG, "--workdir", str(workdir),
            *flags_, *overrides({**TINY, **(extra or {})})]
