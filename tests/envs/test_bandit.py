"""Tests of envs.tasks.bandit.BanditEnv: payoffs, regret, success, oracle, robustness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import vocab
from envs.tasks.bandit import BanditEnv, BanditState
from tests.envs.helpers import act, keys, text

_CACHE = {}


def get(**kw):
    """(env, jit(vmap(reset)), jit(vmap(step)), jit(step)) per knob setting, shared across tests."""
    k = tuple(sorted(kw.items()))
    if k not in _CACHE:
        env = BanditEnv(**kw)
        _CACHE[k] = (env, jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step)), jax.jit(env.step))
    return _CACHE[k]


def play(env, n, seed, policy):
    """jit(vmap) over n episodes, scan over max_turns; returns per-turn arms, rewards, infos."""
    def episode(key):
        k_reset, k_act = jax.random.split(key)
        state0, _ = env.reset(k_reset)

        def body(state, k):
            if policy == "oracle":
                a = env.oracle_action(state, k)
            else:
                arm = jax.random.randint(k, (), 0, env.n_arms)
                a = jnp.array([vocab.DIGIT_0, vocab.EOS, vocab.PAD], jnp.int32).at[0].add(arm)
            state, ts = env.step(state, a)
            return state, (a[0] - vocab.DIGIT_0, ts.reward, ts.truncated, ts.terminated, ts.info)

        state, out = jax.lax.scan(body, state0, jax.random.split(k_act, env.max_turns))
        return state0, state, out

    return jax.device_get(jax.jit(jax.vmap(episode))(keys(n, seed)))


def test_oracle_zero_regret_full_success():
    env = get()[0]
    s0, s, (arms, rewards, trunc, term, info) = play(env, 1000, 1, "oracle")
    assert info["success"][:, -1].mean() >= 0.99 and info["success"][:, -1].all()
    assert not info["success"][:, :-1].any()                     # success only on the final step
    np.testing.assert_array_equal(info["regret"], 0.0)
    assert trunc[:, -1].all() and not trunc[:, :-1].any() and not term.any()
    np.testing.assert_array_equal(arms, np.broadcast_to(np.asarray(s0.best)[:, None], arms.shape))
    assert abs(rewards.mean() - env.p_best) < 0.02                 # best arm pays with p_best


def test_random_policy_has_positive_regret_and_matches_reference():
    env = get()[0]
    s0, s, (arms, rewards, trunc, term, info) = play(env, 1000, 2, "random")
    probs, best = np.asarray(s0.probs), np.asarray(s0.best)
    n, t = arms.shape
    p_pulled = probs[np.arange(n)[:, None], arms]
    ref_step = probs[np.arange(n), best][:, None] - p_pulled
    np.testing.assert_allclose(info["step_regret"], ref_step, atol=1e-6)
    np.testing.assert_allclose(info["regret"], np.cumsum(ref_step, axis=1), atol=1e-5)
    expected = t * (1 - 1 / env.n_arms) * env.gap
    assert info["regret"][:, -1].mean() > 0
    assert abs(info["regret"][:, -1].mean() - expected) < 0.05 * expected
    # success = the best arm strictly most pulled (NumPy reference)
    counts = np.stack([(arms == k).sum(1) for k in range(env.n_arms)], 1)
    others = np.where(np.arange(env.n_arms)[None] == best[:, None], -1, counts)
    ref_success = counts[np.arange(n), best] > others.max(1)
    np.testing.assert_array_equal(info["success"][:, -1], ref_success)
    assert 0.05 < ref_success.mean() < 0.5
    np.testing.assert_array_equal(np.asarray(s.counts), counts)
    # payoffs are Bernoulli(p_arm): empirical frequencies by arm type
    is_best = arms == best[:, None]
    assert abs(rewards[is_best].mean() - env.p_best) < 0.03
    assert abs(rewards[~is_best].mean() - env.p_other) < 0.02


def test_probabilities_and_gap_knob():
    env, reset, _, _ = get(n_arms=7, gap=0.2, max_turns=30)
    s, ts = reset(keys(1024, 3))
    probs = np.asarray(s.probs)
    np.testing.assert_allclose(probs.max(1), 0.6, atol=1e-6)
    np.testing.assert_allclose(np.sort(probs, 1)[:, :-1], 0.4, atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(1), np.asarray(s.best))
    hist = np.bincount(np.asarray(s.best), minlength=7)
    assert hist.min() > 0.7 * hist.mean()
    assert text(ts.observation[0]) == "<task> bandit 7 <sep> 30"


def handmade(best=2, probs=(0.25, 0.25, 0.75, 0.25), seed=0):
    return BanditState(key=jax.random.PRNGKey(seed), turn=jnp.int32(0), done=jnp.bool_(False),
                       terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                       probs=jnp.array(probs, jnp.float32), best=jnp.int32(best),
                       counts=jnp.zeros(len(probs), jnp.int32), regret=jnp.float32(0.0))


def test_handwritten_episode():
    env, _, _, step = get(max_turns=5)
    state = handmade()
    payoffs = env.payoffs
    script = [("0 <eos>", False, 0.5), ("2 <eos>", False, 0.0), ("x <eos>", True, 0.75),
              ("7 <eos>", True, 0.75), ("2 <eos>", False, 0.0)]
    total = 0.0
    for t, (a, fe, step_regret) in enumerate(script):
        pay = np.asarray(payoffs(state))
        state, ts = step(state, act(env, a))
        total += step_regret
        if fe:
            assert text(ts.observation) == "<obs> <err>" and float(ts.reward) == pytest.approx(-0.1)
        else:
            arm = int(a[0])
            assert text(ts.observation) == f"<obs> {arm} = {pay[arm]}"
            assert float(ts.reward) == float(pay[arm])
        assert bool(ts.info["format_error"]) == fe
        assert float(ts.info["step_regret"]) == pytest.approx(step_regret)
        assert float(ts.info["regret"]) == pytest.approx(total)
        assert not bool(ts.terminated) and bool(ts.truncated) == (t == 4)
        assert bool(ts.info["success"]) == (t == 4)                # arm 2 pulled twice, arm 0 once
    assert np.asarray(state.counts).tolist() == [1, 0, 2, 0]
    state2, ts = step(state, act(env, "2 <eos>"))
    assert text(ts.observation) == "<obs>" and float(ts.reward) == 0.0 and bool(ts.truncated)
    assert not bool(ts.info["success"]) and float(ts.info["regret"]) == pytest.approx(total)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state2, state)


def test_tie_is_not_success():
    env, _, _, step = get(max_turns=2)
    state = handmade()
    state, _ = step(state, act(env, "2 <eos>"))
    state, ts = step(state, act(env, "1 <eos>"))
    assert bool(ts.truncated) and not bool(ts.info["success"])


def test_payoff_is_deterministic_given_key_and_turn():
    env, _, _, step = get()
    state = handmade(seed=5)
    seq = []
    for _ in range(40):
        s_a, ta = step(state, act(env, "1 <eos>"))
        s_b, tb = step(state, act(env, "1 <eos>"))
        assert float(ta.reward) == float(tb.reward)
        seq.append(float(ta.reward))
        state = s_a.replace(done=jnp.bool_(False), truncated=jnp.bool_(False))
    assert 0 < sum(seq) < 40                                         # not constant
    other = handmade(seed=6)
    seq2 = []
    for _ in range(40):
        other, t2 = step(other, act(env, "1 <eos>"))
        other = other.replace(done=jnp.bool_(False), truncated=jnp.bool_(False))
        seq2.append(float(t2.reward))
    assert seq != seq2


def adversarial_actions(n, action_len, seed=0):
    rng = np.random.default_rng(seed)
    rand = rng.integers(-5, 80, (n, action_len))
    d = vocab.DIGIT_0
    special = np.array([
        [vocab.PAD] * 3, [vocab.EOS] * 3, [d] * 3, [np.iinfo(np.int32).max] * 3, [np.iinfo(np.int32).min] * 3,
        [d + 4, vocab.EOS, 0], [d - 1, vocab.EOS, 0], [d + 64, vocab.EOS, 0], [d, d, vocab.EOS],
    ])
    rand[: len(special)] = special
    rand[-1] = [d + 3, vocab.EOS, vocab.PAD]
    return jnp.asarray(rand, jnp.int32)


def test_adversarial_actions_never_break_state():
    env, reset, step, _ = get()
    n = 1024
    states, _ = reset(keys(n, 3))
    acts = adversarial_actions(n, env.action_len)
    new_states, ts = step(states, acts)
    for x, y in zip(jax.tree_util.tree_leaves(states), jax.tree_util.tree_leaves(new_states)):
        assert x.shape == y.shape and x.dtype == y.dtype
    assert np.isfinite(np.asarray(ts.reward)).all() and np.isfinite(np.asarray(ts.info["regret"])).all()
    obs = np.asarray(ts.observation)
    assert ((obs >= 0) & (obs < vocab.size)).all()
    fe = np.asarray(ts.info["format_error"])
    assert fe[:9].all() and not fe[-1]
    np.testing.assert_allclose(np.asarray(ts.reward)[fe], -env.format_penalty)
    np.testing.assert_allclose(np.asarray(ts.info["step_regret"])[fe], env.p_best)
    assert (np.asarray(new_states.counts)[fe] == 0).all()


def test_vmap_1024_and_determinism():
    env, reset, step, _ = get()
    s1, t1 = reset(keys(1024, 4))
    s2, t2 = reset(keys(1024, 4))
    jax.tree_util.tree_map(np.testing.assert_array_equal, (s1, t1), (s2, t2))
    acts = jnp.tile(act(env, "0 <eos>"), (1024, 1))
    a, ta = step(s1, acts)
    b, tb = step(s2, acts)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (a, ta), (b, tb))
    assert ta.observation.shape == (1024, env.obs_len) and int(a.counts[:, 0].sum()) == 1024
    assert text(t1.observation[0]) == "<task> bandit 4 <sep> 16"
    assert env.obs_len <= 24 and env.action_len <= 12


def test_render():
    env = get()[0]
    line = env.render(handmade())
    assert "\n" not in line and "best=2" in line and "0.75" in line


@pytest.mark.parametrize("kwargs,name", [
    (dict(n_arms=1), "n_arms"), (dict(n_arms=11), "n_arms"), (dict(gap=0.0), "gap"), (dict(gap=1.5), "gap"),
    (dict(max_turns=0), "max_turns"), (dict(max_turns=100), "max_turns"),
    (dict(format_penalty=-1), "format_penalty"),
])
def test_bad_knobs_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BanditEnv(**kwargs)
