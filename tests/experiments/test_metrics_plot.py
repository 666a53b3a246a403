"""MetricsWriter (JSONL + TensorBoard, resume truncation, progress bar) and the plot CLI."""
import glob
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import plot
from experiments.metrics import MetricsWriter, read_metrics, to_python_scalar

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_write_converts_scalars_and_flushes(tmp_path):
    w = MetricsWriter(tmp_path)
    row = w.write(3, {"loss": jnp.float32(0.25), "n": np.int32(7), "acc": np.float64(0.5),
                      "arr1": jnp.ones((1,)), "bad": float("nan"), "flag": np.bool_(True)})
    assert row == {"step": 3, "loss": 0.25, "n": 7, "acc": 0.5, "arr1": 1.0,
                   "bad": row["bad"], "flag": True}
    assert math.isnan(row["bad"])
    # Flushed: readable before close.
    lines = _lines(tmp_path / "metrics.jsonl")
    assert lines == [{"step": 3, "loss": 0.25, "n": 7, "acc": 0.5, "arr1": 1.0, "bad": None, "flag": True}]
    assert type(lines[0]["loss"]) is float
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert math.isnan(rows[0]["bad"])
    w.close()
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    with pytest.raises(ValueError, match="closed"):
        w.write(4, {"loss": 1.0})


def test_non_scalar_metric_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="'vec'.*shape \\(3,\\)"):
            w.write(1, {"vec": np.zeros(3)})
    assert to_python_scalar(np.float32(1.5)) == 1.5


def _read_tb_scalars(logdir):
    """Minimal TFRecord reader (no tensorboard dependency): {tag: [(step, value), ...]}."""
    import struct
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            rec = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            ev = event_pb2.Event.FromString(rec)
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_scalars_written(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for s in range(1, 4):
            w.write(s, {"loss": 1.0 / s, "eval/success_rate": 0.1 * s})
    sc = _read_tb_scalars(str(tmp_path / "tensorboard"))
    assert sorted(sc) == ["eval/success_rate", "loss"]
    assert [s for s, _ in sc["eval/success_rate"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in sc["eval/success_rate"]], [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in sc["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "wd", enabled=False)
    assert w.write(1, {"loss": 1.0}) is None
    bar = w.progress(10)
    bar.update(1)
    bar.close()
    w.close()
    assert not os.path.exists(tmp_path / "wd")


def test_resume_truncates_future_lines(tmp_path):
    # Run 1: logs steps 1..7, killed; the last checkpoint is step 5.
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 8):
        w.write(s, {"loss": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss"')   # torn last line of a killed process
    # Run 2 resumes at 5 and re-logs 6, 7, 8.
    w = MetricsWriter(tmp_path, resume_step=5, tensorboard=False)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    for s in range(6, 9):
        w.write(s, {"loss": float(s)})
    w.close()
    lines = _lines(tmp_path / "metrics.jsonl")
    assert lines == [{"step": s, "loss": float(s)} for s in range(1, 9)]
    # Resume with nothing to drop leaves the file untouched; with no file, creates it.
    MetricsWriter(tmp_path, resume_step=8, tensorboard=False).close()
    assert _lines(tmp_path / "metrics.jsonl") == lines
    MetricsWriter(tmp_path / "new", resume_step=3, tensorboard=False).close()
    assert os.path.getsize(tmp_path / "new" / "metrics.jsonl") == 0


def test_progress_bar(tmp_path, capsys):
    w = MetricsWriter(tmp_path, tensorboard=False)
    bar = w.progress(total=20, initial=5)
    assert bar.n == 5 and bar.total == 20
    bar.update(3)
    assert bar.n == 8
    bar.close()
    err = capsys.readouterr().err
    assert "8/20" in err and "upd" in err


def _synthetic_run(path):
    rng = np.random.default_rng(0)
    with MetricsWriter(path, tensorboard=False) as w:
        for s in range(1, 41):
            m = {"loss": float(np.exp(-s / 10) + 0.01 * rng.random()), "loss/policy": rng.random(),
                 "rollout/success_rate": min(1.0, s / 40), "rollout/return": s / 4,
                 "policy/entropy": 1.0 / s, "policy/kl_ref": 0.001 * s, "grad_norm": rng.random()}
            if s % 10 == 0:
                m["eval/success_rate"] = s / 40
            w.write(s, m)


def test_families():
    assert plot.metric_family("eval/success_rate") == "success_rate"
    assert plot.metric_family("rollout/success_rate") == "success_rate"
    assert plot.metric_family("loss/value") == "loss"
    assert plot.metric_family("rollout/return") == "return"
    assert plot.metric_family("policy/kl_ref") == "kl"
    assert plot.metric_family("policy/entropy") == "entropy"
    assert plot.metric_family("rollout/len") == "length"
    assert plot.metric_family("grad_norm") == "grad_norm"
    assert plot.metric_family("policy/clip frac") == "policy_clip_frac"
    assert plot.metric_family("kludge") == "kludge"


def test_plot_writes_valid_pngs(tmp_path):
    from PIL import Image
    _synthetic_run(tmp_path)
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "experiments.plot", str(tmp_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["entropy.png", "grad_norm.png", "kl.png", "loss.png", "return.png",
                     "success_rate.png"]
    for p in paths:
        assert os.path.dirname(p) == str(out)
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            arr = np.asarray(im.convert("L"))
            assert arr.std() > 1.0   # something was drawn


def test_plot_default_out_dir(tmp_path):
    _synthetic_run(tmp_path)
    paths = plot.plot_metrics(str(tmp_path / "metrics.jsonl"))
    assert all(p.startswith(str(tmp_path / "plots")) for p in paths) and len(paths) == 6


def test_plot_errors(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot.main([str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err
