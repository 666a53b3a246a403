"""benchmarks.learning: the results table (fresh-episode column) and argument checks."""
import pytest

from benchmarks import learning


def _result(**kw):
    r = dict(task="calculator", algorithm="ppo", bc_success=0.5, bc_epsilon=0.4, final_success=0.9,
             final_fresh_success=0.875, final_fresh_episodes=1024, best_success=0.95, wall_s=600.0,
             env_steps=12345, updates=100)
    r.update(kw)
    return r


def test_table_reports_fresh_episode_success():
    text = learning.table([_result(), _result(task="kv_search", final_fresh_success=None,
                                              final_fresh_episodes=0)])
    rows = [l for l in text.splitlines() if l.startswith("| calculator") or l.startswith("| kv_search")]
    header = [l for l in text.splitlines() if l.startswith("| task")][0]
    assert "final, fresh episodes" in header
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == "0.900" and cells[4] == "0.875 (n=1,024)" and cells[5] == "0.950"
    assert [c.strip() for c in rows[1].strip("|").split("|")][4] == "–"


@pytest.mark.parametrize("argv", [["--eval_every", "0"], ["--eval_episodes", "0"],
                                  ["--final_episodes", "-1"]])
def test_bad_arguments_raise(argv, tmp_path):
    with pytest.raises(ValueError, match="final_episodes"):
        learning.main(argv + ["--results_dir", str(tmp_path)])


def test_max_updates_stops_early_with_the_schedule_of_total_updates(tmp_path):
    """--max_updates 1 of total_updates 3: one update, curve [BC, update 1]; a bad value raises."""
    quick = {"bc.episodes": "64", "bc.epochs": "1", "total_updates": "3", "model.d_model": "32",
             "model.d_ff": "64", "model.n_layers": "1", "rollout.eval_episodes": "8"}
    r = learning.run_one("guess_number", "grpo", minutes=5, eval_every=1, eval_episodes=8,
                         overrides=quick, max_updates=1)
    assert r["updates"] == 1 and [p["update"] for p in r["curve"]] == [0, 1]
    assert r["metric_means"] == {"update/empty_step_frac": 0.0}    # a synchronous run logs it
    with pytest.raises(ValueError, match="max_updates"):
        learning.main(["--max_updates", "0", "--results_dir", str(tmp_path)])


@pytest.mark.parametrize("argv,pattern", [
    (["--set", "rollout.mdoe=sync"], r"did you mean config.rollout.mode"),
    (["--set", "rollout.continuous.until_full=maybe"], r"'maybe' cannot be read as bool"),
    (["--runs", "guess_number"], r"is not TASK:ALGORITHM")])
def test_bad_set_or_runs_fail_before_any_run(argv, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        learning.main(argv + ["--results_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
