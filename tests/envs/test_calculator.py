"""CalculatorEnv: oracle, robustness, batching, determinism and hand-written semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import vocab
from envs.tasks.calculator import CalculatorEnv, value_bounds
from envs.wrappers import batch_reset, oracle_rollout
from tests.envs.helpers import act, adversarial_np, run_mixed


ENV = CalculatorEnv()
N_BATCH = 1024


def test_oracle_success_1000_seeds():
    env = CalculatorEnv()
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(0), 1000))
    assert r["success"].mean() >= 0.99 and r["format_errors"].sum() == 0
    assert np.all(r["length"] == env.n_ops + 1)
    np.testing.assert_allclose(r["return"], 1.0 - 0.01 * env.n_ops, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(n_ops=1), dict(n_ops=4, operand_max=10, max_mul=2),
                                    dict(n_ops=3, ops="-", operand_max=100)])


def test_oracle_other_knobs(kwargs):
    env = CalculatorEnv(**kwargs)
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(1), 300))
    assert r["success"].all()
    assert env.obs_len <= 24 and env.action_len <= 14


def test_prompts_evaluate_to_the_hidden_value():
    """Reference: Python's own parser evaluates the decoded prompt."""
    env = CalculatorEnv(n_ops=3, operand_max=15, max_mul=2)
    states, ts = batch_reset(env, jax.random.PRNGKey(2), 500)
    st, obs = jax.device_get((states, ts.observation))
    n_mul = 0
    for i in range(500):
        text = vocab.decode(obs[i])
        assert text.startswith("<task> ")
        expr = text[len("<task> "):]
        assert eval(expr, {"__builtins__": {}}) == int(st.values[i, -1]), expr   # noqa: S307
        assert expr.count("*") <= 2 and expr.count("(") == 2
        assert np.all((st.operands[i] >= 0) & (st.operands[i] < 15))
        n_mul += expr.count("*")
    assert n_mul > 100
    assert np.abs(st.values).max() <= max(env.value_bounds)


def test_value_bounds_reference():
    assert value_bounds(2, 19, True, 1) == [19, 361, 722]
    assert value_bounds(2, 19, False, 0) == [19, 38, 57]
    assert value_bounds(3, 9, True, 3) == [9, 81, 729, 6561]
    with pytest.raises(ValueError, match="operand limit"):
        CalculatorEnv(n_ops=4, operand_max=20, max_mul=4)


def test_adversarial_actions_never_crash():
    env = ENV
    n, turns = N_BATCH, env.max_turns + 3   # jit(vmap) x 1024
    rng = np.random.default_rng(4)
    near = np.asarray([vocab.pad_to(vocab.encode(t), env.action_len) for t in [
        "<calc> 1234 + 1", "<calc> 5 / 3", "<calc> - - 5 + 3", "<calc> 5 +", "<answer> -",
        "<answer> 12345", "<calc> 12 + 7 <eos>", "<answer> - 0 <eos>"]], np.int32)
    adv = adversarial_np(rng, n, turns, env.action_len)
    pick = rng.random((n, turns)) < 0.35
    adv[pick] = near[rng.integers(0, len(near), pick.sum())]
    s0, _ = env.reset(jax.random.PRNGKey(0))
    final, (ts, states) = run_mixed(env, n, turns, seed=3, adv=adv)
    assert np.all(np.isfinite(ts.reward))
    assert ts.observation.min() >= 0 and ts.observation.max() < vocab.size
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(final)):
        assert a.shape == b.shape[1:] and a.dtype == b.dtype
    fe = ts.info["format_error"]
    assert fe.any() and (~fe).any() and ts.info["success"].any()
    np.testing.assert_allclose(ts.reward[fe], -env.format_penalty)
    assert np.all((states.progress >= 0) & (states.progress <= env.n_ops))
    assert np.all(states.done[:, 1:] >= states.done[:, :-1])


def test_determinism_by_key():
    env = ENV
    a = run_mixed(env, N_BATCH, env.max_turns + 3, seed=7)
    b = run_mixed(env, N_BATCH, env.max_turns + 3, seed=7)
    c = run_mixed(env, N_BATCH, env.max_turns + 3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not np.array_equal(a[1][0].observation, c[1][0].observation)
    assert not np.array_equal(a[0].operands, c[0].operands)


def test_hand_written_episode():
    env = CalculatorEnv()
    s, _ = env.reset(jax.random.PRNGKey(0))
    # ( 12 + 7 ) * 3 = 57
    s = s.replace(operands=jnp.array([12, 7, 3], jnp.int32), ops=jnp.array([0, 2], jnp.int32),
                  sides=jnp.array([False, False]), values=jnp.array([12, 19, 57], jnp.int32))
    expr, n = env.expression(s)
    assert vocab.decode(np.asarray(expr)[: int(n)]) == "( 12 + 7 ) * 3"
    step = jax.jit(env.step)
    script = [("<calc> 7 + 12", "<obs> <result> 19", -0.01, 1),      # commutative order counts
              ("<calc> 3 - 100 <eos>", "<obs> <result> - 97", -0.01, 1),
              ("<calc> - 999 * - 999", "<obs> <result> 998001", -0.01, 1),
              ("<calc> 1000 + 1", "<obs> <err>", -0.1, 1),           # operand too long
              ("<calc> 3 * 19", "<obs> <result> 57", -0.01, 2),
              ]
    s_trunc = s
    for a, obs, rew, prog in script:
        s, ts = step(s, act(env, a))
        assert vocab.decode(ts.observation) == obs, a
        assert float(ts.reward) == pytest.approx(rew) and int(ts.info["progress"]) == prog, a
    assert bool(ts.truncated) and not bool(ts.terminated)       # max_turns = 5
    s = s_trunc
    s, ts = step(s, act(env, "<answer> 56"))
    assert bool(ts.terminated) and float(ts.reward) == 0.0 and vocab.decode(ts.observation) == "<obs> <no>"
    s = s_trunc
    s, ts = step(s, act(env, "<answer> 057"))        # leading zeros are the same number
    assert bool(ts.info["success"]) and float(ts.reward) == 1.0
    s2, ts2 = step(s, act(env, "<answer> 57"))
    assert float(ts2.reward) == 0.0 and vocab.decode(ts2.observation) == "<obs>"


def test_negative_answer_and_wrong_answer_reward():
    env = CalculatorEnv(wrong_answer_reward=-0.5)
    s, _ = env.reset(jax.random.PRNGKey(0))
    s = s.replace(operands=jnp.array([2, 9, 4], jnp.int32), ops=jnp.array([1, 2], jnp.int32),
                  sides=jnp.array([False, True]), values=jnp.array([2, -7, -28], jnp.int32))
    assert vocab.decode(np.asarray(env.expression(s)[0])) == "4 * ( 2 - 9 )"
    _, ts = env.step(s, act(env, "<answer> 28"))
    assert float(ts.reward) == -0.5 and bool(ts.terminated)
    _, ts = env.step(s, act(env, "<answer> - 28"))
    assert float(ts.reward) == 1.0
    s1, ts = env.step(s, act(env, "<calc> 9 - 2"))     # '-' is not commutative
    assert int(ts.info["progress"]) == 0


def test_bad_knobs_registry_render():
    for bad in [dict(n_ops=0), dict(operand_max=1), dict(ops="+/"), dict(ops=""), dict(max_mul=-1),
                dict(call_cost=2.0), dict(wrong_answer_reward=0.5), dict(max_turns=0)]:
        with pytest.raises(ValueError, match=list(bad)[0]):
            CalculatorEnv(**bad)
    with pytest.raises(ValueError, match="max_mul"):
        CalculatorEnv(ops="*", max_mul=1)
    env = envs.make("calculator", n_ops=3)
    s, _ = env.reset(jax.random.PRNGKey(0))
    assert "calculator:" in env.render(s) and f"= {int(s.values[-1])}" in env.render(s)
