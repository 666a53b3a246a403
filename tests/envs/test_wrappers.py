"""AutoResetWrapper, EpisodeStatsWrapper and the batching helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from envs import vocab
from envs.base import Env, TimeStep
from envs.tasks.guess_number import GuessNumberEnv
from envs.wrappers import (AutoResetWrapper, EpisodeStatsWrapper, batch_oracle, batch_reset,
                           batch_step, oracle_rollout, state_done, tree_select)


@struct.dataclass
class CState:
    key: jax.Array
    turn: jax.Array
    done: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    target: jax.Array


class CounterEnv(Env):
    """Guess a digit token: reward 1 and terminated when action[0] == target, else -0.1."""
    name = "counter"
    obs_len, action_len, max_turns, format_penalty = 3, 2, 3, 0.1

    def reset(self, key):
        key, sub = jax.random.split(key)
        target = vocab.DIGIT_0 + jax.random.randint(sub, (), 0, 3)
        obs = jnp.array([vocab.TASK, 0, 0]).at[1].set(target)
        s = CState(key, jnp.int32(0), jnp.bool_(False), jnp.bool_(False), jnp.bool_(False), target)
        return s, TimeStep(obs, jnp.float32(0), jnp.bool_(False), jnp.bool_(False),
                           {"success": jnp.bool_(False), "format_error": jnp.bool_(False)})

    def step(self, s, a):
        hit = a[0] == s.target
        turn = s.turn + 1
        term = hit
        trunc = ~hit & (turn >= self.max_turns)
        new = s.replace(turn=turn, done=term | trunc, terminated=term, truncated=trunc)
        obs = jnp.array([vocab.OBS, 0, 0]).at[1].set(jnp.where(hit, vocab.YES, vocab.NO))
        ts = TimeStep(obs, jnp.where(hit, 1.0, -0.1).astype(jnp.float32), term, trunc,
                      {"success": hit, "format_error": jnp.bool_(False)})
        idle = TimeStep(jnp.array([vocab.OBS, 0, 0]), jnp.float32(0), s.terminated, s.truncated,
                        {"success": jnp.bool_(False), "format_error": jnp.bool_(False)})
        return tree_select(s.done, (s, idle), (new, ts))

    def oracle_action(self, s, key):
        return jnp.array([0, vocab.EOS]).at[0].set(s.target)


def random_actions(key, n_steps, n):
    return jnp.stack([vocab.DIGIT_0 + jax.random.randint(key, (n_steps, n), 0, 3),
                      jnp.full((n_steps, n), vocab.EOS)], axis=-1)


def rollout(env, key, n, n_steps):
    states, ts0 = batch_reset(env, key, n)
    acts = random_actions(jax.random.fold_in(key, 1), n_steps, n)

    def body(s, a):
        s, ts = jax.vmap(env.step)(s, a)
        return s, ts
    _, tss = jax.jit(lambda s, a: jax.lax.scan(body, s, a))(states, acts)
    return jax.device_get(tss)


def test_auto_reset_unbatched_semantics():
    env = AutoResetWrapper(CounterEnv())
    step = jax.jit(env.step)
    s, ts = env.reset(jax.random.PRNGKey(0))
    assert np.all(np.asarray(ts.info["final_observation"]) == vocab.PAD)
    target = int(s.target)
    s1, ts1 = step(s, jnp.array([target, vocab.EOS]))
    assert bool(ts1.terminated) and float(ts1.reward) == 1.0 and bool(ts1.info["success"])
    assert list(np.asarray(ts1.info["final_observation"])) == [vocab.OBS, vocab.YES, 0]
    # the state is a fresh episode reset with split(stepped key)[1]
    inner_s, _ = CounterEnv().step(s, jnp.array([target, vocab.EOS]))
    want_s, want_ts = CounterEnv().reset(jax.random.split(inner_s.key)[1])
    assert int(s1.turn) == 0 and not bool(s1.done)
    assert np.array_equal(np.asarray(ts1.observation), np.asarray(want_ts.observation))
    assert int(s1.target) == int(want_s.target)
    # a non-terminal step keeps the episode going
    wrong = vocab.DIGIT_0 + (int(s1.target) - vocab.DIGIT_0 + 1) % 3
    s2, ts2 = step(s1, jnp.array([wrong, vocab.EOS]))
    assert int(s2.turn) == 1 and not bool(ts2.done)
    assert list(np.asarray(ts2.observation)) == [vocab.OBS, vocab.NO, 0]
    # truncation also resets
    s3, ts3 = step(s2, jnp.array([wrong, vocab.EOS]))
    s4, ts4 = step(s3, jnp.array([wrong, vocab.EOS]))
    assert bool(ts4.truncated) and int(s4.turn) == 0 and ts4.observation[0] == vocab.TASK


@pytest.mark.parametrize("keyfn", [jax.random.key])   # typed keys: the harder case for tree_select
def test_cond_and_select_modes_agree(keyfn):
    base = CounterEnv()
    a = AutoResetWrapper(base, mode="cond")
    b = AutoResetWrapper(base, mode="select")
    key = keyfn(3)
    n, T = 16, 12
    sa, _ = jax.vmap(a.reset)(jax.random.split(key, n))
    sb, _ = jax.vmap(b.reset)(jax.random.split(key, n))
    acts = random_actions(jax.random.fold_in(key, 1), T, n)
    # batched (cond lowers to select) ...
    step_a, step_b = jax.jit(jax.vmap(a.step)), jax.jit(jax.vmap(b.step))
    n_done = 0
    for t in range(T):
        sa, ta = step_a(sa, acts[t])
        sb, tb = step_b(sb, acts[t])
        n_done += int(np.asarray(ta.done).sum())
        for x, y in zip(jax.tree_util.tree_leaves((ta, sa.target, sa.turn)),
                        jax.tree_util.tree_leaves((tb, sb.target, sb.turn))):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    assert n_done > n
    # ... and unbatched (cond really branches)
    s1 = jax.tree_util.tree_map(lambda x: x[0], jax.vmap(a.reset)(jax.random.split(key, n))[0])
    s2 = s1
    one_a, one_b = jax.jit(a.step), jax.jit(b.step)
    for t in range(T):
        s1, t1 = one_a(s1, acts[t, 0])
        s2, t2 = one_b(s2, acts[t, 0])
        assert np.array_equal(np.asarray(t1.observation), np.asarray(t2.observation))
        assert int(s1.target) == int(s2.target) and int(s1.turn) == int(s2.turn)


def test_cond_lowering_unbatched_vs_vmapped():
    env = AutoResetWrapper(CounterEnv())
    s, _ = env.reset(jax.random.PRNGKey(0))
    a = jnp.array([vocab.DIGIT_0, vocab.EOS])
    single = str(jax.make_jaxpr(env.step)(s, a))
    assert "cond[" in single                        # reset only runs in the taken branch
    sb = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), s)
    batched = str(jax.make_jaxpr(jax.vmap(env.step))(sb, jnp.stack([a, a])))
    assert "cond[" not in batched and "select_n" in batched   # documented: reset every step


def episode_stats_reference(rewards, dones, success):
    """Per-env running return / length / success, restarting after each done step."""
    T, n = rewards.shape
    ret, length, succ = np.zeros((T, n)), np.zeros((T, n), int), np.zeros((T, n), bool)
    r = np.zeros(n); L = np.zeros(n, int); s = np.zeros(n, bool)
    for t in range(T):
        r = r + rewards[t]; L = L + 1; s = s | success[t]
        ret[t], length[t], succ[t] = r, L, s
        r = np.where(dones[t], 0, r); L = np.where(dones[t], 0, L); s = np.where(dones[t], False, s)
    return ret, length, succ


def test_episode_stats_with_auto_reset_matches_reference():
    env = EpisodeStatsWrapper(AutoResetWrapper(CounterEnv()))
    assert env.obs_len == 3 and env.action_len == 2 and env.max_turns == 3 and env.name == "counter"
    tss = rollout(env, jax.random.PRNGKey(1), 64, 20)
    done = tss.terminated | tss.truncated
    ret, length, succ = episode_stats_reference(tss.reward, done, tss.info["success"])
    np.testing.assert_allclose(tss.info["episode_return"], ret, atol=1e-5)
    assert np.array_equal(tss.info["episode_length"], length)
    assert np.array_equal(tss.info["episode_success"], succ)
    assert done.sum() > 64  # several episodes per env
    assert np.all(tss.info["episode_length"][done] <= 3)


def test_episode_stats_without_auto_reset_freezes_totals():
    env = EpisodeStatsWrapper(GuessNumberEnv(n=4, max_turns=4))
    s, ts = env.reset(jax.random.PRNGKey(0))
    assert float(ts.info["episode_return"]) == 0.0 and int(ts.info["episode_length"]) == 0
    step = jax.jit(env.step)
    target = int(s.env_state.target)
    for text in ["< 2 ?", f"<answer> {target}", f"<answer> {target}", "< 1 ?"]:
        s, ts = step(s, jnp.asarray(vocab.pad_to(vocab.encode(text), env.action_len)))
    assert bool(ts.terminated) and bool(s.done)
    assert float(ts.info["episode_return"]) == pytest.approx(0.99)
    assert int(ts.info["episode_length"]) == 2 and bool(ts.info["episode_success"])
    assert "target" in env.render(s)
    a = env.oracle_action(s, jax.random.PRNGKey(0))
    assert a.shape == (env.action_len,)


def test_batch_helpers_and_errors():
    env = GuessNumberEnv()
    states, ts = batch_reset(env, jax.random.PRNGKey(0), 8)
    assert ts.observation.shape == (8, env.obs_len) and states.target.shape == (8,)
    acts = batch_oracle(env, states, jax.random.PRNGKey(1))
    states2, ts2 = batch_step(env, states, acts)
    assert np.all(np.asarray(states2.turn) == 1)
    with pytest.raises(ValueError, match="n must"):
        batch_reset(env, jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="actions must have shape"):
        batch_step(env, states, acts[:, :2])
    with pytest.raises(ValueError, match="mode"):
        AutoResetWrapper(env, mode="both")
    with pytest.raises(ValueError, match="Env"):
        AutoResetWrapper("guess_number")
    assert bool(jnp.all(state_done(states2) == states2.done))


def test_oracle_rollout_through_wrappers():
    env = EpisodeStatsWrapper(GuessNumberEnv(n=16))
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(0), 32))
    assert r["success"].all() and r["done"].all() and np.all(r["length"] == 5)
