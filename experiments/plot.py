"""Learning curves from a run: ``python -m experiments.plot WORKDIR [--out DIR]``.

Reads ``WORKDIR/metrics.jsonl`` and writes one PNG per metric family (x = update step):
``success_rate`` (``rollout/success_rate``, ``eval/success_rate``, ...), ``loss`` (``loss``,
``loss/policy``, ...), ``return``, ``kl``, ``entropy``, ``length`` and one file for every other
metric. Prints the written paths, one a line. ``--out`` defaults to ``WORKDIR/plots``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from experiments.metrics import METRICS_FILE, read_metrics

__all__ = ["metric_family", "group_families", "plot_metrics", "main"]

# (family, regex on the full metric name); the first match wins.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("success_rate", r"success"),
    ("loss", r"loss"),
    ("return", r"return|reward"),
    ("kl", r"(^|[/_])kl([/_]|$)"),
    ("entropy", r"entropy"),
    ("length", r"(^|[/_])(len|length|turns|tokens)([/_]|$)"),
)


def metric_family(name: str) -> str:
    """Family (PNG name) of a metric: a known family above, else the sanitised metric name."""
    for family, pattern in FAMILIES:
        if re.search(pattern, name):
            return family
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def group_families(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in sorted(names):
        out.setdefault(metric_family(n), []).append(n)
    return out


def _metrics_path(path: str) -> str:
    p = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no metrics file: {p} does not exist (is {path!r} a training workdir?)")
    return p


def plot_metrics(path: str, out_dir: str | None = None) -> list[str]:
    """Write one PNG per metric family; returns their paths (sorted by family)."""
    mpath = _metrics_path(path)
    rows = read_metrics(mpath)
    if not rows:
        raise ValueError(f"metrics file {mpath} is empty: nothing to plot")
    if any("step" not in r for r in rows):
        raise ValueError(f"metrics file {mpath} has a line without 'step'")
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(r["step"])
            ys.append(float(v))
    if not series:
        raise ValueError(f"metrics file {mpath} has no numeric metrics besides 'step'")
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(mpath)), "plots")
    os.makedirs(out_dir, exist_ok=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for family, names in sorted(group_families(series).items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for n in names:
            xs, ys = series[n]
            sparse = len(xs) < 30
            ax.plot(xs, ys, marker="o" if sparse else None, markersize=3, linewidth=1.2, label=n)
        ax.set_xlabel("update step")
        ax.set_ylabel(family)
        if family == "success_rate":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"{family} ({os.path.basename(os.path.dirname(os.path.abspath(mpath))) or mpath})",
                     fontsize=10)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{family}.png")
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="training workdir holding metrics.jsonl (or the file itself)")
    ap.add_argument("--out", default=None, help="output folder for the PNGs (default WORKDIR/plots)")
    args = ap.parse_args(argv)
    try:
        paths = plot_metrics(args.workdir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
