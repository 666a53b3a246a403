"""The plain-Python MazeTwin and the jitted MazeEnv agree step by step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import vocab
from envs.python_twins.maze import MazeTwin
from envs.tasks.maze import DIR_TOKENS, MazeEnv


def trajectories(env, n, seed, policy):
    """jit(vmap) over n episodes, scan over max_turns + 2 turns (the last ones on done states)."""
    n_turns = env.max_turns + 2

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        state0, ts0 = env.reset(k_reset)

        def body(state, k):
            k_oracle, k_kind, k_dir, k_tok = jax.random.split(k, 4)
            if policy == "oracle":
                a = env.oracle_action(state, k_oracle)
            else:   # 75%: a direction + <eos>; 25%: random in-vocab tokens
                d = jax.random.randint(k_dir, (), 0, 4)
                good = jnp.zeros(env.action_len, jnp.int32)
                good = good.at[0].set(jnp.asarray(DIR_TOKENS)[d]).at[1].set(vocab.EOS)
                junk = jax.random.randint(k_tok, (env.action_len,), 0, vocab.size)
                a = jnp.where(jax.random.uniform(k_kind) < 0.75, good, junk)
            state, ts = env.step(state, a)
            return state, (a, ts)

        _, (acts, tss) = jax.lax.scan(body, state0, jax.random.split(k_act, n_turns))
        return state0, ts0.observation, acts, tss

    return jax.device_get(jax.jit(jax.vmap(episode))(jax.random.split(jax.random.PRNGKey(seed), n)))


@pytest.mark.parametrize("kwargs", [dict(), dict(generator="perfect", size=7, max_illegal=0, step_cost=0.05)])
@pytest.mark.parametrize("policy", ["random", "oracle"])
def test_twin_agrees_with_jitted_env(kwargs, policy):
    env = MazeEnv(**kwargs)
    n = 128
    state0, prompts, acts, tss = trajectories(env, n, seed=7, policy=policy)
    n_success = n_illegal = n_error = 0
    for i in range(n):
        s0 = jax.tree_util.tree_map(lambda x: x[i], state0)
        twin = MazeTwin.from_state(s0, env)
        assert vocab.pad_to(vocab.encode(twin.prompt()), env.obs_len) == prompts[i].tolist()
        for t in range(acts.shape[1]):
            obs, reward, term, trunc, info = twin.step(vocab.decode(acts[i, t], skip_pad=False))
            where = f"seed {i} turn {t}: {vocab.decode(acts[i, t])!r}"
            assert vocab.pad_to(vocab.encode(obs), env.obs_len) == tss.observation[i, t].tolist(), where
            assert reward == pytest.approx(float(tss.reward[i, t]), abs=1e-6), where
            assert (term, trunc) == (bool(tss.terminated[i, t]), bool(tss.truncated[i, t])), where
            for k in ("success", "format_error", "illegal_move", "distance"):
                assert info[k] == tss.info[k][i, t].item(), (where, k)
            n_success += info["success"]
            n_illegal += info["illegal_move"]
            n_error += info["format_error"]
    # the trajectories exercised every branch
    if policy == "oracle":
        assert n_success == n and n_illegal == 0 and n_error == 0
    else:
        assert n_illegal > 0 and n_error > 0 and n_success > 0


def test_twin_defaults_and_oracle_command():
    env = MazeEnv()
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(11))
    twin = MazeTwin.from_state(state)                     # MazeEnv defaults
    assert (twin.max_turns, twin.max_illegal, twin.step_cost) == (env.max_turns, env.max_illegal, env.step_cost)
    assert twin.distance[twin.pos] == int(state.dist[tuple(np.asarray(state.pos))])
    turns = 0
    while not twin.done:
        obs, reward, term, trunc, info = twin.step(twin.oracle_command() + " <eos>")
        turns += 1
    assert info["success"] and reward == 1.0 and turns == int(state.dist[tuple(np.asarray(state.start))])
    assert twin.step("n <eos>") == ("<obs>", 0.0, True, False, {"success": False, "format_error": False,
                                                                "illegal_move": False, "distance": 0})
