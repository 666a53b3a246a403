"""envs.base.finish_step (the shared end of every task's step) against a direct reference."""
import jax
import numpy as np
from flax import struct

from envs import vocab
from envs.base import Env, finish_step


@struct.dataclass
class S:
    key: jax.Array
    turn: jax.Array
    done: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    count: jax.Array


class Tiny(Env):
    obs_len = 5
    max_turns = 3


def test_finish_step_matches_reference_on_every_flag_combination():
    env = Tiny()
    rng = np.random.default_rng(0)
    n = 256
    turn = rng.integers(0, 5, n).astype(np.int32)
    term0, trunc0 = rng.random(n) < 0.3, rng.random(n) < 0.3
    done0 = term0 | trunc0
    states = S(key=jax.random.split(jax.random.PRNGKey(0), n), turn=turn, done=done0,
               terminated=term0, truncated=trunc0, count=rng.integers(0, 9, n).astype(np.int32))
    terminated = rng.random(n) < 0.5
    obs = rng.integers(0, 64, (n, env.obs_len)).astype(np.int32)
    reward = rng.standard_normal(n).astype(np.float32)

    def f(s, t, o, r):
        return finish_step(env, s, terminated=t, observation=o, reward=r, info={"x": s.count + 1},
                           idle_info={"x": s.count}, count=s.count + 10)
    new, ts = jax.device_get(jax.jit(jax.vmap(f))(states, terminated, obs, reward))
    for i in range(n):
        if done0[i]:                                           # no-op on a done state
            assert new.turn[i] == turn[i] and new.count[i] == states.count[i]
            assert (new.terminated[i], new.truncated[i], new.done[i]) == (term0[i], trunc0[i], True)
            assert list(ts.observation[i]) == [vocab.OBS] + [vocab.PAD] * (env.obs_len - 1)
            assert ts.reward[i] == 0.0 and ts.info["x"][i] == states.count[i]
            assert (ts.terminated[i], ts.truncated[i]) == (term0[i], trunc0[i])
        else:
            t1 = turn[i] + 1
            tr = (not terminated[i]) and t1 >= env.max_turns
            assert new.turn[i] == t1 and new.count[i] == states.count[i] + 10
            assert (new.terminated[i], new.truncated[i]) == (terminated[i], tr)
            assert new.done[i] == (terminated[i] or tr)
            assert list(ts.observation[i]) == list(obs[i]) and ts.reward[i] == reward[i]
            assert (ts.terminated[i], ts.truncated[i]) == (terminated[i], tr)
            assert ts.info["x"][i] == states.count[i] + 1
        assert np.array_equal(new.key[i], np.asarray(states.key)[i])
    assert ts.reward.dtype == np.float32 and ts.terminated.dtype == bool
    assert done0.any() and (~done0).any()
