"""GuessNumberEnv: oracle, robustness, batching, determinism and hand-written semantics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import vocab
from envs.tasks.guess_number import GuessNumberEnv
from envs.wrappers import oracle_rollout
from tests.envs.helpers import act, run_mixed


ENV = GuessNumberEnv()
N_BATCH = 1024


def test_oracle_success_1000_seeds():
    env = GuessNumberEnv()
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(0), 1000))
    assert r["success"].mean() >= 0.99
    assert r["format_errors"].sum() == 0
    assert np.all(r["length"] <= math.ceil(math.log2(env.n)) + 1)
    np.testing.assert_allclose(r["return"], 1.0 - 0.01 * (r["length"] - 1), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 100])
def test_oracle_other_sizes(n):
    env = GuessNumberEnv(n=n)
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(n), 200))
    assert r["success"].all()


def test_adversarial_actions_never_crash():
    env = ENV
    s0, _ = env.reset(jax.random.PRNGKey(0))
    final, (ts, states) = run_mixed(env, N_BATCH, env.max_turns + 3, seed=1)   # jit(vmap) x 1024
    assert np.all(np.isfinite(ts.reward))
    assert ts.observation.min() >= 0 and ts.observation.max() < vocab.size
    assert ts.observation.shape == (N_BATCH, env.max_turns + 3, env.obs_len)
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(final)):
        assert a.shape == b.shape[1:] and a.dtype == b.dtype
    fe = ts.info["format_error"]
    assert fe.any() and (~fe).any() and ts.info["success"].any()
    np.testing.assert_allclose(ts.reward[fe], -env.format_penalty)
    assert np.all(ts.observation[fe][:, :2] == [vocab.OBS, vocab.ERR])
    # invariants: lo <= target < hi always; done is absorbing; turn never exceeds max_turns
    assert np.all((states.lo <= states.target) & (states.target < states.hi))
    assert np.all(states.turn <= env.max_turns)
    d = states.done
    assert np.all(d[:, 1:] >= d[:, :-1])
    assert np.all(ts.terminated | ts.truncated == d)


def test_determinism_by_key():
    env = ENV
    a = run_mixed(env, N_BATCH, env.max_turns + 3, seed=7)
    b = run_mixed(env, N_BATCH, env.max_turns + 3, seed=7)
    c = run_mixed(env, N_BATCH, env.max_turns + 3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not np.array_equal(a[1][0].observation, c[1][0].observation)
    t = a[0].target
    assert t.min() >= 0 and t.max() < 32 and len(np.unique(t)) == 32
    assert np.bincount(t, minlength=32).min() > 10   # roughly uniform (expected 32 each)


def test_prompt_and_hand_written_episode():
    env = GuessNumberEnv()
    s, ts = env.reset(jax.random.PRNGKey(0))
    assert vocab.decode(ts.observation) == "<task> guess 32 <sep> 8"
    assert ts.observation.shape == (env.obs_len,) and env.action_len == 5 and env.max_turns == 8
    s = s.replace(target=jnp.int32(21))
    step = jax.jit(env.step)
    script = [("< 16 ?", "<obs> <no>", -0.01), ("< 24 ? <eos>", "<obs> <yes>", -0.01),
              ("< 024 ?", "<obs> <err>", -0.1),            # too many digits
              ("< 22", "<obs> <err>", -0.1), ("? 22", "<obs> <err>", -0.1),
              ("<answer> 21 <eos>", "<obs> <yes>", 1.0)]
    for i, (a, obs, rew) in enumerate(script):
        s, ts = step(s, act(env, a))
        assert vocab.decode(ts.observation) == obs, a
        assert float(ts.reward) == pytest.approx(rew), a
        assert bool(ts.terminated) == (i == len(script) - 1)
        assert bool(ts.info["format_error"]) == (rew == -0.1)
    assert bool(ts.info["success"]) and int(ts.info["n_questions"]) == 2
    assert (int(s.lo), int(s.hi)) == (16, 24)
    # a step on a done state is a no-op
    s2, ts2 = step(s, act(env, "<answer> 21"))
    assert vocab.decode(ts2.observation) == "<obs>" and float(ts2.reward) == 0.0
    assert bool(ts2.terminated) and not bool(ts2.info["success"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), s, s2))


def test_wrong_answer_and_truncation():
    env = GuessNumberEnv(n=10, max_turns=3)
    s, _ = env.reset(jax.random.PRNGKey(0))
    s = s.replace(target=jnp.int32(4))
    step = jax.jit(env.step)
    s1, ts = step(s, act(env, "<answer> 5"))
    assert bool(ts.terminated) and not bool(ts.truncated) and float(ts.reward) == 0.0
    assert not bool(ts.info["success"])
    for i in range(3):
        s, ts = step(s, act(env, "< 09 ?"))   # leading zero allowed: 9
        assert vocab.decode(ts.observation) == "<obs> <yes>"
    assert bool(ts.truncated) and not bool(ts.terminated) and int(s.hi) == 9


def test_bad_knobs_and_registry():
    with pytest.raises(ValueError, match="n"):
        GuessNumberEnv(n=1)
    with pytest.raises(ValueError, match="max_turns"):
        GuessNumberEnv(max_turns=0)
    with pytest.raises(ValueError, match="question_cost"):
        GuessNumberEnv(question_cost=-1)
    env = envs.make("guess_number", n=64)
    assert isinstance(env, GuessNumberEnv) and env.n == 64 and env.max_turns == 9
    with pytest.raises(ValueError, match="action"):
        env.step(env.reset(jax.random.PRNGKey(0))[0], jnp.zeros(3, jnp.int32))


def test_render():
    env = GuessNumberEnv()
    s, _ = env.reset(jax.random.PRNGKey(0))
    text = env.render(s)
    assert f"target={int(s.target)}" in text and "[0, 32)" in text
