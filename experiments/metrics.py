"""Metrics sinks: ``workdir/metrics.jsonl`` (one JSON object a line), TensorBoard, a progress bar.

Only the main process writes (``enabled=False`` elsewhere). Resuming from a checkpoint at step
``N`` first drops every line with ``step > N`` from an existing ``metrics.jsonl``: those steps
are re-run (deterministically) and re-logged, so the file never holds duplicates.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsWriter", "read_metrics", "to_python_scalar"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_python_scalar(value: Any, name: str = "value"):
    """jax / numpy scalars (or size-1 arrays) -> Python ``float`` (``int``/``bool`` stay exact,
    strings pass through). Anything with more than one element raises ``ValueError``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {arr.shape}")
    return float(arr.reshape(()))


def _json_float(x):
    # Strict JSON has no NaN / inf literals: non-finite values are written as null.
    return None if isinstance(x, float) and not math.isfinite(x) else x


def read_metrics(path: str) -> list[dict]:
    """Parse a metrics.jsonl file (null values, i.e. non-finite metrics, come back as NaN)."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def _truncate_after(path: str, step: int) -> int:
    """Rewrite ``path`` without lines whose step > ``step`` (atomic replace). Returns #dropped.
    A trailing partial line (a crash mid-write) is dropped too."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                dropped += 1
                continue
            try:
                row_step = json.loads(line).get("step")
            except json.JSONDecodeError:
                dropped += 1
                continue
            if row_step is not None and row_step > step:
                dropped += 1
            else:
                kept.append(line)
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Append-only JSONL + TensorBoard scalar writer.

    ``write(step, {"loss": jnp.float32(...), ...})`` appends ``{"step": step, "loss": ...}`` and
    flushes (jax / numpy scalars become Python floats; NaN / inf are written as null). ``resume_step=N`` drops logged lines with ``step > N`` (and TensorBoard is told to
    purge those steps). Does nothing when ``enabled`` is False (non-main processes).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = bool(enabled)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None:
            _truncate_after(self.path, int(resume_step))
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            purge = int(resume_step) + 1 if resume_step is not None else None
            self._tb = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR), purge_step=purge,
                                     flush_secs=10)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict | None:
        """Append one line; returns the dict written (None when disabled)."""
        if not self.enabled:
            return None
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            if k == "step":
                continue
            row[str(k)] = to_python_scalar(v, str(k))
        self._file.write(json.dumps({k: _json_float(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=int(step))
        return row

    def progress(self, total: int, initial: int = 0, desc: str = "train"):
        """A tqdm bar on stderr with rate and ETA (``disable=True`` on non-main processes)."""
        from tqdm import tqdm
        return tqdm(total=int(total), initial=int(initial), desc=desc, unit="upd",
                    file=sys.stderr, mininterval=1.0, dynamic_ncols=True, disable=not self.enabled,
                    smoothing=0.1)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
