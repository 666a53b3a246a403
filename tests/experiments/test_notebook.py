"""experiments/notebooks/quickstart.ipynb runs top to bottom (tiny config, CPU, no install)."""
from __future__ import annotations

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif "data" in o and "text/plain" in o["data"]:
            out.append(o["data"]["text/plain"])
    return "".join(out)


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("accelerator") == "TPU"
    workdir = tmp_path / "quickstart"
    env = dict(os.environ)
    env.update({
        "QUICKSTART_TINY": "1", "QUICKSTART_SKIP_INSTALL": "1", "QUICKSTART_WORKDIR": str(workdir),
        "JAX_PLATFORMS": "cpu",
        # one CPU device (not the 8 forced by tests/conftest.py); the suite's quick compilation
        # (JAX_DISABLE_MOST_OPTIMIZATIONS) is inherited
        "XLA_FLAGS": "",
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        "MPLBACKEND": "Agg",
    })
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                      resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)          # raises CellExecutionError naming the failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "install skipped" in _text(code[0])
    texts = "\n".join(_text(c) for c in code)
    assert "grpo on guess_number: 3 updates" in texts
    assert "final greedy success rate" in texts
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2                                   # success rate and loss curves
    episode = _text(code[-2])
    assert "greedy success on 8 new tasks" in episode
    assert len(episode.strip().splitlines()) >= 4             # the rendered prompt and turns
    byo = _text(code[-1])                                    # the offline own-model chain
    assert "RL through model.hf_checkpoint: final greedy success" in byo
    assert "'tokenizer': True" in byo
    assert (tmp_path / "quickstart_byo" / "export" / "tokenizer.json").is_file()
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval/success_rate" in rows[-1]
    assert (workdir / "plots" / "success_rate.png").is_file()
