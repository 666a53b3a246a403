"""TPU VM launcher: dry-run commands for one host and pod slices; quoting; missing gcloud."""
import os
import shlex
import subprocess
import sys

import pytest

from experiments.tpu_vm import launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--name", "rl-tpu", "--zone", "us-west4-a", "--project", "my-proj", "--dry-run"]


def _dry(capsys, *argv):
    assert launch.main([*argv, *BASE]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def _remote(cmd):
    """The --command string of an ssh argv."""
    (c,) = [a for a in cmd if a.startswith("--command=")]
    return c[len("--command="):]


def _simulate_worker(tmp_path, remote_cmd):
    """Run the remote --command in bash on a fake worker: HOME=tmp, a stub python3 that prints
    its argv and the env vars the launcher sets. Returns the printed lines."""
    home = tmp_path / "home"
    (home / "jax-agent-rl").mkdir(parents=True, exist_ok=True)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    stub = bindir / "python3"
    stub.write_text('#!/bin/bash\necho "PWD=$PWD"\necho "XLA_FLAGS=$XLA_FLAGS"\n'
                    'echo "JAX_DISTRIBUTED_AUTO=$JAX_DISTRIBUTED_AUTO"\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    out = subprocess.run(["bash", "-c", remote_cmd], capture_output=True, text=True, timeout=30,
                         env={"HOME": str(home), "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), str(home)


def test_host_counts():
    assert launch.num_hosts("v5litepod-8") == 1
    assert launch.num_hosts("v5litepod-4") == 1
    assert launch.num_hosts("v5litepod-32") == 8
    assert launch.num_hosts("v4-8") == 1
    assert launch.num_hosts("v4-32") == 4
    assert launch.num_hosts("v5p-16") == 2
    assert launch.num_hosts("v6e-8") == 1 and launch.num_hosts("v6e-16") == 4
    assert launch.num_hosts("v3-32") == 4
    with pytest.raises(ValueError, match="unknown --accelerator-type 'tpu9-8'"):
        launch.num_hosts("tpu9-8")


def test_create_single_host(capsys):
    (cmd,) = _dry(capsys, "create", "--accelerator-type", "v5litepod-8")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rl-tpu", "--zone=us-west4-a",
                   "--project=my-proj", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]
    (cmd,) = _dry(capsys, "create", "--accelerator-type", "v4-32", "--version", "tpu-vm-v4-base", "--spot")
    assert "--accelerator-type=v4-32" in cmd and "--version=tpu-vm-v4-base" in cmd and cmd[-1] == "--spot"


def test_copy_to_all_workers(capsys, tmp_path):
    tar, scp, ssh = _dry(capsys, "copy", "--repo", str(tmp_path))
    assert tar[:2] == ["tar", "-czf"] and tar[2].endswith("jax-agent-rl-rl-tpu.tar.gz")
    assert tar[-3:] == ["-C", str(tmp_path), "."] and "--exclude=.git" in tar and "--exclude=.venv" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == tar[2] and scp[6] == "rl-tpu:~/jax-agent-rl.tar.gz" and "--worker=all" in scp
    assert ssh[4:6] == ["ssh", "rl-tpu"] and "--worker=all" in ssh
    assert "tar -xzf" in _remote(ssh) and "-C \"$HOME\"/jax-agent-rl" in _remote(ssh)


def test_copy_tarball_really_excludes(tmp_path):
    """Run the tar step for real on a small fake repo (no gcloud involved)."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "big").write_text("no")
    (repo / "pkg" / "__pycache__").mkdir()
    args = launch.parse_args(["copy", "--repo", str(repo), "--name", f"t{os.getpid()}", "--zone", "z"])
    tar = launch.build_commands(args)[0]
    subprocess.run(tar, check=True)
    listing = subprocess.run(["tar", "-tzf", tar[2]], capture_output=True, text=True, check=True).stdout
    os.remove(tar[2])
    assert "./pkg/a.py" in listing and ".venv" not in listing and "__pycache__" not in listing


def test_install(capsys):
    (ssh,) = _dry(capsys, "install", "--extras", "hf")
    assert "--worker=all" in ssh
    assert _remote(ssh).endswith('python3 -m pip install -e ".[hf]" "jax[tpu]"')
    (ssh,) = _dry(capsys, "install")
    assert _remote(ssh).endswith('pip install -e . "jax[tpu]"')


def test_run_single_host(capsys, tmp_path):
    (ssh,) = _dry(capsys, "run", "--accelerator-type", "v5litepod-8", "--config",
                  "experiments/configs/default.py", "--workdir", "~/runs/grpo", "--config.total_updates=200")
    assert "--worker=all" in ssh
    remote = _remote(ssh)
    assert remote.startswith('cd "$HOME"/jax-agent-rl && python3 -m experiments.train')
    assert "JAX_DISTRIBUTED_AUTO" not in remote
    lines, home = _simulate_worker(tmp_path, remote)
    assert lines == [f"PWD={home}/jax-agent-rl", "XLA_FLAGS=", "JAX_DISTRIBUTED_AUTO=",
                     "-m", "experiments.train", "--config", "experiments/configs/default.py",
                     "--workdir", f"{home}/runs/grpo", "--config.total_updates=200"]


@pytest.mark.parametrize("acc,hosts", [("v5litepod-32", 8), ("v4-32", 4)])
def test_run_pod_slice(capsys, tmp_path, acc, hosts):
    assert launch.num_hosts(acc) == hosts
    (ssh,) = _dry(capsys, "run", "--accelerator-type", acc, "--config", "experiments/configs/default.py",
                  "--workdir", "/mnt/shared/run 1", "--env", "XLA_FLAGS=--a --b",
                  "--config.env.name=guess_number", "--config.rl.algorithm=$weird")
    assert "--worker=all" in ssh
    lines, home = _simulate_worker(tmp_path, _remote(ssh))
    assert lines == [f"PWD={home}/jax-agent-rl", "XLA_FLAGS=--a --b", "JAX_DISTRIBUTED_AUTO=1",
                     "-m", "experiments.train", "--config", "experiments/configs/default.py",
                     "--workdir", "/mnt/shared/run 1", "--config.env.name=guess_number",
                     "--config.rl.algorithm=$weird"]


def test_run_background(capsys, tmp_path):
    (ssh,) = _dry(capsys, "run", "--config", "c.py", "--workdir", "~/runs/x", "--background")
    remote = _remote(ssh)
    assert "nohup" in remote and '> "$HOME"/runs/x.log 2>&1' in remote and remote.endswith("&")
    lines, home = _simulate_worker(tmp_path, remote + " wait")
    assert lines == []                       # all output goes to the log
    import time
    log = os.path.join(home, "runs", "x.log")
    for _ in range(50):
        if os.path.exists(log) and "--workdir" in open(log).read():
            break
        time.sleep(0.1)
    assert open(log).read().splitlines()[-4:] == ["--config", "c.py", "--workdir", f"{home}/runs/x"]


def test_fetch_and_delete(capsys):
    (cmd,) = _dry(capsys, "fetch", "--workdir", "~/runs/x", "--dest", "local_runs")
    assert cmd[4:8] == ["scp", "--recurse", "rl-tpu:~/runs/x", "local_runs"] and "--worker=0" in cmd
    (cmd,) = _dry(capsys, "delete")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rl-tpu", "--zone=us-west4-a",
                   "--project=my-proj", "--quiet"]


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        launch.main(["create", "--accelerator-type", "tpu9-8", *BASE])
    assert "unknown --accelerator-type 'tpu9-8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.main(["delete", "--config.x=1", *BASE])
    assert "only `run` forwards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.main(["run", "--config", "c.py", "--workdir", "w", "--env", "NOEQUALS", *BASE])
    assert "--env expects KEY=VALUE" in capsys.readouterr().err


def test_missing_gcloud_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "experiments.tpu_vm.launch", "delete", "--name", "x",
                           "--zone", "z", "--gcloud", "/nonexistent/gcloud"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'/nonexistent/gcloud' not found on PATH" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr
