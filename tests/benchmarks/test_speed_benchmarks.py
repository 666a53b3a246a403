"""Smoke tests of the speed benchmarks (--quick) and checks of their FLOP accounting."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks import common, rollout_throughput, train_step
from envs import vocab

ROLLOUT_LINE = re.compile(r"^rollout (single|multi) B=(\d+): (\d+) generated tok/s, (\d+) total tok/s, "
                          r"(\d+\.\d)% of matmul peak$")
TRAIN_LINE = re.compile(r"^train_step: (\d+) tok/s, (\d+\.\d)% MFU$")


def test_rollout_quick_prints_one_line_per_case(tmp_path, capsys):
    out = tmp_path / "results.md"
    results = rollout_throughput.main(["--quick", "--out", str(out)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rollout ")
             and "/" not in ln.split(":")[0]]
    assert len(lines) == 2, lines
    for ln, r in zip(lines, results):
        m = ROLLOUT_LINE.match(ln)
        assert m, ln
        assert (m.group(1), int(m.group(2))) == (r["kind"], r["batch"])
        assert int(m.group(3)) > 0 and int(m.group(4)) >= int(m.group(3))
        assert 0.0 < float(m.group(5))
    envs_ = rollout_throughput.case_envs(quick=True)
    for r in results:
        env = envs_[r["kind"]]
        # <eos> is masked: every turn generates its full budget, all of it counted
        assert r["gen"] == r["batch"] * env.max_turns * env.action_len
        assert r["total"] == r["batch"] * (env.obs_len + env.max_turns * env.action_len
                                           + (env.max_turns - 1) * env.obs_len)
    text = out.read_text()
    assert "| case | B | generated tok/s |" in text and text.count("\n| single |") == 1


def test_train_step_quick_prints_line(tmp_path, capsys):
    out = tmp_path / "results.md"
    r = train_step.main(["--quick", "--out", str(out)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train_step:")]
    assert len(lines) == 1
    m = TRAIN_LINE.match(lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == round(r["tok_s"]) and float(m.group(2)) > 0
    assert "| B | T | d_model |" in out.read_text()


def test_bad_arguments_raise():
    with pytest.raises(SystemExit):
        rollout_throughput.main(["--quick", "--runs", "2"])
    with pytest.raises(SystemExit):
        train_step.main(["--quick", "--batch", "0"])
    with pytest.raises(ValueError, match="obs_len"):
        rollout_throughput.SyntheticTurnEnv(obs_len=0)
    with pytest.raises(ValueError, match="runs"):
        common.time_calls(lambda i: None, 0)


def test_flop_formulas_match_brute_force():
    cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                             d_ff=48, max_seq_len=64)
    lengths = np.array([0, 1, 5, 17])
    brute_attn = 0.0
    for n in lengths:
        for pos in range(n):                   # token at pos attends to pos + 1 keys
            brute_attn += cfg.n_layers * cfg.n_heads * (2 * cfg.head_dim * (pos + 1)) * 2
    assert common.causal_attention_flops(cfg, lengths).sum() == pytest.approx(brute_attn)
    assert common.forward_flops(cfg, 1000, lengths) == pytest.approx(2 * 1000 * lengths.sum() + brute_attn)
    with pytest.raises(ValueError, match="n_tokens"):
        common.causal_attention_flops(cfg, [-1])
    step = train_step.step_flops(cfg, 1000, batch=3, seq_len=7)
    assert step == pytest.approx(6 * 1000 * 21 + 3 * 2 * 3 * common.causal_attention_flops(cfg, 7))


def _tiny_policy(tie: bool):
    """(config, abstract params) of a 2-layer d16 policy, embeddings tied or not."""
    cfg = models.ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                             d_ff=24, max_seq_len=32, tie_embeddings=tie)
    return cfg, jax.eval_shape(lambda k: models.init_params(models.PolicyModel(cfg), k),
                               jax.random.PRNGKey(0))


@pytest.mark.parametrize("tie", [False, True])
def test_matmul_params_counts_all_but_the_embedding_table(tie):
    cfg, params = _tiny_policy(tie)
    d, f, h, kv, dh, v = 16, 24, 2, 1, 8, 64
    per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f + 2 * d
    expected = 2 * per_layer + d + d * v           # layers, final norm, lm_head (or tied table)
    assert common.matmul_params(params, cfg) == expected
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert common.matmul_params(params, cfg) == total - (0 if tie else v * d)
    with pytest.raises(ValueError, match="embed_tokens"):
        common.matmul_params({"w": jnp.zeros((3, 3))}, cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_matmul_shapes_cover_every_weight_matmul(tie):
    cfg, params = _tiny_policy(tie)
    shapes = rollout_throughput.matmul_shapes(params, cfg)
    # every per-token weight but the norm scales (2 per layer + the final norm, d each)
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    assert sum(k * n for _, k, n in shapes) == common.matmul_params(params, cfg) - norms
    o = [(k, n) for name, k, n in shapes if "o_proj" in name]
    assert o == [(cfg.n_heads * cfg.head_dim, cfg.d_model)] * cfg.n_layers
    assert any(n == cfg.vocab_size for _, _, n in shapes)


def test_rollout_roofline_quick(capsys):
    rollout_throughput.main(["--quick", "--roofline", "--cases", "multi"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("roofline ")]
    assert len(lines) == 1
    m = re.match(r"^roofline multi B=2: weight matmuls alone (\d+\.\d) ms per rollout .* -> "
                 r"ceiling (\d+) generated tok/s; measured (\d+) = (\d+)% of the ceiling$", lines[0])
    assert m, lines[0]
    assert float(m.group(1)) > 0 and int(m.group(2)) > 0 and int(m.group(3)) > 0


def test_train_step_roofline_quick(capsys):
    r = train_step.main(["--quick", "--roofline"])
    line = [ln for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("train_step roofline:")]
    assert len(line) == 1
    m = re.match(r"^train_step roofline: weight matmuls alone (\d+\.\d+) s of the (\d+\.\d+) s step "
                 r"\((\d+)%\), at (\d+) GFLOP/s \((\d+)% of peak\) -> MFU ceiling (\d+\.\d)% if "
                 r"the step did nothing else$", line[0])
    assert m, line[0]
    assert r["matmul_s"] > 0 and r["matmul_gflops"] > 0 and r["mfu_ceiling"] > 0


def test_matmuls_seconds_validates_and_times():
    assert common.matmuls_seconds([(4, 8, 16), (8, 16, 4)], repeats=2, runs=1) > 0
    with pytest.raises(ValueError, match="no shapes"):
        common.matmuls_seconds([], repeats=1, runs=1)
    with pytest.raises(ValueError, match=">= 1"):
        common.matmuls_seconds([(0, 8, 16)], repeats=1, runs=1)


def test_synthetic_env_contract():
    env = rollout_throughput.SyntheticTurnEnv(obs_len=5, action_len=3, max_turns=2)
    s, ts = env.reset(jax.random.PRNGKey(0))
    assert ts.observation.shape == (5,) and bool((ts.observation >= 2).all())
    act = jnp.full((3,), 7, jnp.int32)
    s, ts1 = env.step(s, act)
    assert bool((ts1.observation >= 2).all()) and not bool(ts1.done)
    s, ts2 = env.step(s, act)
    assert bool(ts2.truncated) and bool((ts2.observation == vocab.PAD).all())
    s3, ts3 = env.step(s, act)                      # no-op after the end
    assert int(s3.turn) == 2 and bool(ts3.done) and float(ts3.reward) == 0.0
    assert bool((ts3.observation == vocab.PAD).all())


def test_no_eos_policy_never_samples_eos():
    cfg = rollout_throughput.quick_model()
    model = rollout_throughput.NoEosPolicyModel(cfg)
    tokens = jnp.ones((2, 4), jnp.int32)

    @jax.jit
    def both(key):
        params = models.init_params(model, key)
        return (models.PolicyModel(cfg).apply({"params": params}, tokens),
                model.apply({"params": params}, tokens))

    plain, masked = both(jax.random.PRNGKey(0))
    stop = [vocab.PAD, vocab.EOS]      # both end a turn, so both are masked
    np.testing.assert_array_equal(np.delete(np.asarray(masked), stop, -1),
                                  np.delete(np.asarray(plain), stop, -1))
    assert bool((masked[..., stop] <= -1e8).all())


def test_append_markdown(tmp_path):
    p = tmp_path / "sub" / "t.md"
    common.append_markdown(str(p), "x", ["a", "b"], [[1, 2]], ["note"])
    common.append_markdown(str(p), "y", ["a", "b"], [[3, 4]])
    text = p.read_text()
    assert text.count("| a | b |") == 2 and "| 1 | 2 |" in text and "- note" in text
    with pytest.raises(ValueError, match="cells"):
        common.append_markdown(str(p), "z", ["a"], [[1, 2]])
    common.append_markdown(None, "ignored", ["a"], [[1]])


def test_continuous_rollouts_quick(tmp_path):
    """Sync and continuous rows for one task; a continuous update trains only on what
    completed, never more tokens than it generated in total."""
    from benchmarks import continuous_rollouts
    out = tmp_path / "cont"
    rows = continuous_rollouts.main(["--quick", "--envs", "guess_number", "--algos", "grpo",
                                     "--turns", "4", "--slots", "1", "--reprefill", "on",
                                     "--fill", "both", "--out", str(out)])
    assert [(r["mode"], r["turns_per_update"]) for r in rows] == [
        ("sync", 8), ("continuous + re-prefill", 4), ("continuous, until full + re-prefill", 4)]
    assert rows[1]["turn_steps"] == 4 and 0 <= rows[2]["turn_steps"] <= 4
    assert rows[0]["ratio"] == 1.0 and rows[0]["trained_tokens"] == rows[0]["generated_tokens"]
    for r in rows:
        assert r["sec_per_update"] > 0 and r["useful_tok_s"] == pytest.approx(
            r["trained_tokens"] / r["sec_per_update"])
        assert 0 < r["sec_rollout"] and r["trained_tokens"] <= r["generated_tokens"] + 1e-6
    assert "| guess_number | grpo (2) | continuous + re-prefill | 4 | 4 | 4.0 |" in (
        tmp_path / "cont.md").read_text()
