"""``benchmarks.train_step --compile-depth`` and ``--logprob-chunk`` (smoke tests, tiny shapes)."""
import re

import pytest

from benchmarks import train_step

LINE = re.compile(r"^compile_depth: layers=(\d+) scan_layers=(True|False): trace\+lower "
                  r"(\d+\.\d\d) s, compile (\d+\.\d\d) s, total (\d+\.\d\d) s$")


def test_compile_depth_prints_one_line_per_depth_and_mode(tmp_path, capsys):
    out = tmp_path / "r.md"
    r = train_step.main(["--compile_depth", "--depths", "1", "2", "--batch", "1", "--seq-len", "8",
                         "--out", str(out)])["compile_depth"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("compile_depth:")]
    assert len(lines) == 4 == len(r)
    seen = []
    for ln, row in zip(lines, r):
        m = LINE.match(ln)
        assert m, ln
        seen.append((int(m.group(1)), m.group(2) == "True"))
        assert float(m.group(3)) > 0 and float(m.group(4)) > 0
        assert float(m.group(5)) == pytest.approx(row["lower_s"] + row["compile_s"], abs=0.011)
    assert seen == [(1, False), (2, False), (1, True), (2, True)]
    assert "| layers | scan_layers |" in out.read_text()


@pytest.mark.parametrize("chunk", ["0", "5"])
def test_train_step_logprob_chunk_modes(chunk, capsys):
    r = train_step.main(["--quick", "--logprob-chunk", chunk])
    assert r["tok_s"] > 0
    assert f"logprob_chunk={chunk}" in capsys.readouterr().out


def test_bad_compile_depth_arguments():
    with pytest.raises(SystemExit):
        train_step.main(["--compile-depth", "--depths", "0"])
    with pytest.raises(SystemExit):
        train_step.main(["--quick", "--logprob-chunk", "-1"])
