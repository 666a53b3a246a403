"""Launch training on a GCP TPU VM (one host or a multi-host pod slice) with ``gcloud``.

    python -m experiments.tpu_vm.launch create  --name my-tpu --zone us-central2-b --accelerator-type v4-32
    python -m experiments.tpu_vm.launch copy    --name my-tpu --zone us-central2-b
    python -m experiments.tpu_vm.launch install --name my-tpu --zone us-central2-b
    python -m experiments.tpu_vm.launch run     --name my-tpu --zone us-central2-b --accelerator-type v4-32 \\
        --config experiments/configs/default.py --workdir ~/runs/grpo --config.total_updates=200
    python -m experiments.tpu_vm.launch fetch   --name my-tpu --zone us-central2-b --workdir ~/runs/grpo
    python -m experiments.tpu_vm.launch delete  --name my-tpu --zone us-central2-b

Every subcommand takes ``--dry-run``: print the exact commands (shell-quoted, one a line)
instead of running them. ``copy`` / ``install`` / ``run`` address ``--worker=all`` so every host
of a pod slice gets the same code and runs the same program (SPMD); on multi-host slices ``run``
sets ``JAX_DISTRIBUTED_AUTO=1`` so ``experiments.distributed.initialize_from_env`` calls
``jax.distributed.initialize()``, which auto-detects the TPU pod.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

__all__ = ["build_commands", "num_hosts", "default_version", "main"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAR_EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", "runs",
                "workdirs", "*.tar.gz")

# Runtime (software) version per TPU generation (see `gcloud compute tpus tpu-vm versions list`).
DEFAULT_VERSIONS = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}


def _split_type(accelerator_type: str) -> tuple[str, int]:
    m = re.fullmatch(r"(v2|v3|v4|v5litepod|v5p|v6e)-(\d+)", accelerator_type)
    if not m:
        raise ValueError(f"unknown --accelerator-type {accelerator_type!r} (expected e.g. v4-8, v4-32, "
                         f"v5litepod-8, v5p-16, v6e-8); pass --hosts N to use another type")
    return m.group(1), int(m.group(2))


def num_hosts(accelerator_type: str) -> int:
    """TPU VM hosts (workers) of a slice. The number after the dash counts TensorCores for
    v2 / v3 / v4 / v5p (8 per host for v2 / v3, 4 chips x 2 cores per host for v4 / v5p) and chips
    for v5e / v6e (up to 8 on one host, 4 chips per host in multi-host slices)."""
    gen, n = _split_type(accelerator_type)
    if gen in ("v2", "v3", "v4", "v5p"):
        return max(1, n // 8)
    return 1 if n <= 8 else n // 4


def default_version(accelerator_type: str) -> str:
    return DEFAULT_VERSIONS[_split_type(accelerator_type)[0]]


_SAFE = re.compile(r"[\w@%+=:,./-]+")


def _rq(token: str) -> str:
    """Quote a token for the remote shell with double quotes (so the whole ``--command`` prints
    as one readable single-quoted argument locally)."""
    if _SAFE.fullmatch(token):
        return token
    return '"' + re.sub(r'([\\"$`])', r"\\\1", token) + '"'


def _remote_path(path: str) -> str:
    """Quote a remote path, keeping a leading ``~/`` expandable (as ``$HOME``)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = _rq(path[2:])
        return '"$HOME/' + rest[1:] if rest.startswith('"') else '"$HOME"/' + rest
    return _rq(path)


def _common(args) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _ssh(args, command: str, worker: str = "all") -> list[str]:
    return [args.gcloud, "compute", "tpus", "tpu-vm", "ssh", args.name, *_common(args),
            f"--worker={worker}", f"--command={command}"]


def _tarball(args) -> str:
    return os.path.join(tempfile.gettempdir(), f"jax-agent-rl-{args.name}.tar.gz")


def build_commands(args) -> list[list[str]]:
    """The argv lists a subcommand runs, in order."""
    gc = [args.gcloud, "compute", "tpus", "tpu-vm"]
    remote_dir = args.remote_dir
    if args.cmd == "create":
        version = args.version or default_version(args.accelerator_type)
        cmd = [*gc, "create", args.name, *_common(args), f"--accelerator-type={args.accelerator_type}",
               f"--version={version}"]
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    if args.cmd == "copy":
        tar = ["tar", "-czf", _tarball(args), *[f"--exclude={e}" for e in TAR_EXCLUDES],
               "-C", args.repo, "."]
        remote_tar = f"{remote_dir.rstrip('/')}.tar.gz"
        scp = [*gc, "scp", _tarball(args), f"{args.name}:{remote_tar}", *_common(args), "--worker=all"]
        unpack = (f"mkdir -p {_remote_path(remote_dir)} && "
                  f"tar -xzf {_remote_path(remote_tar)} -C {_remote_path(remote_dir)}")
        return [tar, scp, _ssh(args, unpack)]
    if args.cmd == "install":
        pkg = "." if not args.extras else f".[{args.extras}]"
        install = (f"cd {_remote_path(remote_dir)} && python3 -m pip install -U pip && "
                   f"python3 -m pip install -e {_rq(pkg)} {_rq('jax[tpu]')}")
        return [_ssh(args, install)]
    if args.cmd == "run":
        hosts = args.hosts or num_hosts(args.accelerator_type)
        env = list(args.env or [])
        if hosts > 1:
            env.append("JAX_DISTRIBUTED_AUTO=1")
        train = ["python3", "-m", "experiments.train", "--config", args.config]
        assigns = [k + "=" + _rq(v) for k, v in (e.split("=", 1) for e in env)]  # KEY unquoted
        line = " ".join([*assigns, *(_rq(t) for t in train),
                         "--workdir", _remote_path(args.workdir), *(_rq(o) for o in args.overrides)])
        if args.background:
            log = _remote_path(args.workdir.rstrip("/") + ".log")
            line = (f"mkdir -p $(dirname {log}) && nohup {line} > {log} 2>&1 < /dev/null &")
        return [_ssh(args, f"cd {_remote_path(remote_dir)} && {line}")]
    if args.cmd == "fetch":
        return [[*gc, "scp", "--recurse", f"{args.name}:{args.workdir}", args.dest, *_common(args),
                 "--worker=0"]]
    if args.cmd == "delete":
        return [[*gc, "delete", args.name, *_common(args), "--quiet"]]
    raise ValueError(f"unknown subcommand {args.cmd!r}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    common.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"),
                        help="GCP project (default: gcloud's configured project)")
    common.add_argument("--accelerator-type", default="v5litepod-8",
                        help="e.g. v5litepod-8 (one host), v5litepod-32 / v4-32 (pod slices)")
    common.add_argument("--version", default=None, help="TPU runtime version (default per generation)")
    common.add_argument("--remote-dir", default="~/jax-agent-rl", help="code folder on every worker")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    common.add_argument("--gcloud", default="gcloud", help="gcloud executable")

    ap = argparse.ArgumentParser(prog="python -m experiments.tpu_vm.launch",
                                 description="Create, provision, run on and delete GCP TPU VMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", parents=[common], help="create the TPU VM")
    c.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    cp = sub.add_parser("copy", parents=[common], help="copy this repository to all workers")
    cp.add_argument("--repo", default=REPO_ROOT, help="local repository to copy")
    i = sub.add_parser("install", parents=[common], help="pip install the package + jax[tpu] on all workers")
    i.add_argument("--extras", default="", help="extras to install, e.g. 'hf'")
    r = sub.add_parser("run", parents=[common],
                       help="run experiments.train on all workers; extra --config.KEY=VALUE are forwarded")
    r.add_argument("--config", required=True, help="config file, relative to the repository")
    r.add_argument("--workdir", required=True, help="workdir on the workers (shared FS for pods)")
    r.add_argument("--hosts", type=int, default=None, help="override the host count of the slice")
    r.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra env var for the run")
    r.add_argument("--background", action="store_true",
                   help="nohup the run (log to WORKDIR.log) so it survives the ssh session")
    f = sub.add_parser("fetch", parents=[common], help="copy the workdir back from worker 0")
    f.add_argument("--workdir", required=True, help="remote workdir")
    f.add_argument("--dest", default=".", help="local destination folder")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM")
    return ap


def parse_args(argv=None):
    ap = _parser()
    args, unknown = ap.parse_known_args(argv)
    bad = [u for u in unknown if not (args.cmd == "run" and u.startswith("--config."))]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}"
                 + (" (only `run` forwards --config.KEY=VALUE overrides)" if args.cmd != "run" else ""))
    args.overrides = [u for u in unknown if u not in bad]
    if args.cmd == "run":
        for e in args.env or []:
            if "=" not in e or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e.split("=", 1)[0]):
                ap.error(f"--env expects KEY=VALUE, got {e!r}")
        if args.hosts is not None and args.hosts < 1:
            ap.error(f"--hosts must be >= 1, got {args.hosts}")
    try:
        if args.cmd == "create" and args.version is None or args.cmd == "run" and args.hosts is None:
            _split_type(args.accelerator_type)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    commands = build_commands(args)
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    if shutil.which(args.gcloud) is None:
        print(f"error: {args.gcloud!r} not found on PATH; install the Google Cloud SDK "
              f"(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, "
              f"or pass --dry-run to print the commands", file=sys.stderr)
        return 2
    if args.cmd == "fetch":
        os.makedirs(args.dest, exist_ok=True)
    for cmd in commands:
        print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"error: command failed with exit status {rc}: {shlex.join(cmd)}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
