"""The plain-Python twins of kv_search and calculator agree with the jitted envs step by step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import token_ops as T
from envs import vocab
from envs.python_twins.calculator import CalculatorTwin
from envs.python_twins.kv_search import KvSearchTwin
from envs.tasks.calculator import OP_TOKENS, CalculatorEnv
from envs.tasks.kv_search import KvSearchEnv

N_SEEDS = 128


def kv_random_action(env, s, r):
    """Plausible commands on the episode's own codes (often right, often wrong) or junk tokens.

    ``r``: this turn's pre-drawn randomness (NumPy, see ``draws``)."""
    ent = env.entity_tokens(s, r["i0"] % env.n_entities)
    rel = jnp.where(r["u1"] < 0.8, env.relation_token(s, r["i1"] % env.n_relations),
                    T.letter_token(r["i1"] % 26))
    search = T.make_row([vocab.SEARCH, ent, rel, vocab.EOS], env.action_len)
    answer = T.make_row([vocab.ANSWER, ent, vocab.EOS], env.action_len)
    u = r["u0"]
    return jnp.where(u < 0.55, search, jnp.where(u < 0.65, answer,
                     jnp.where(u < 0.8, env.oracle_action(s, None), r["junk"])))


def calc_random_action(env, s, r):
    pool = jnp.concatenate([s.operands, s.values, r["ints"]])
    a = T.take(pool, r["i0"] % pool.shape[0])
    b = T.take(pool, r["i1"] % pool.shape[0])
    at, an = T.int_to_tokens_var(a, env.operand_digits)
    bt, bn = T.int_to_tokens_var(b, env.operand_digits)
    op = T.take(jnp.asarray(OP_TOKENS + (vocab.DIVIDE,)), r["i2"] % 4)
    call = T.make_row([vocab.CALC, (at, an), op, (bt, bn), vocab.EOS], env.action_len)
    v = s.values[-1] + r["i3"] % 3 - 1
    vt, vn = T.int_to_tokens_var(v, env.answer_digits)
    answer = T.make_row([vocab.ANSWER, (vt, vn), vocab.EOS], env.action_len)
    u = r["u0"]
    return jnp.where(u < 0.5, call, jnp.where(u < 0.6, answer,
                     jnp.where(u < 0.8, env.oracle_action(s, None), r["junk"])))


def draws(rng, n, turns, action_len):
    """Per-turn randomness of the random policies, drawn with NumPy outside the jitted program."""
    return {"u0": rng.random((n, turns)).astype(np.float32),
            "u1": rng.random((n, turns)).astype(np.float32),
            **{f"i{k}": rng.integers(0, 1 << 20, (n, turns)).astype(np.int32) for k in range(4)},
            "ints": rng.integers(-999, 1000, (n, turns, 4)).astype(np.int32),
            "junk": rng.integers(-3, 70, (n, turns, action_len)).astype(np.int32)}


def trajectories(env, policy, seed):
    """One jit(vmap) over 2 * N_SEEDS episodes: the first half oracle, the second half random."""
    n_turns = env.max_turns + 2
    r = draws(np.random.default_rng(seed), 2 * N_SEEDS, n_turns, env.action_len)

    def episode(key, use_oracle, r):
        s0, ts0 = env.reset(key)

        def body(s, r_t):
            a = jnp.where(use_oracle, env.oracle_action(s, None), policy(env, s, r_t))
            s, ts = env.step(s, a)
            return s, (a, ts)
        _, (acts, tss) = jax.lax.scan(body, s0, r)
        return s0, ts0.observation, acts, tss

    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * N_SEEDS)
    use_oracle = jnp.arange(2 * N_SEEDS) < N_SEEDS
    return jax.device_get(jax.jit(jax.vmap(episode))(keys, use_oracle, r))


CASES = [
    pytest.param("kv", KvSearchEnv, KvSearchTwin, dict(noise=0.2), kv_random_action, id="kv"),
    pytest.param("kv_noisy", KvSearchEnv, KvSearchTwin, dict(hops=3, noise=0.3, n_distractors=12),
                 kv_random_action, marks=pytest.mark.slow, id="kv_noisy"),
    pytest.param("calc", CalculatorEnv, CalculatorTwin, dict(), calc_random_action, id="calc"),
    pytest.param("calc_hard", CalculatorEnv, CalculatorTwin,
                 dict(n_ops=3, operand_max=12, max_mul=2, wrong_answer_reward=-0.5),
                 calc_random_action, marks=pytest.mark.slow, id="calc_hard"),
]


@pytest.mark.parametrize("name,env_cls,twin_cls,kwargs,random_policy", CASES)
def test_twin_agrees_with_jitted_env(name, env_cls, twin_cls, kwargs, random_policy):
    env = env_cls(**kwargs)
    counts = {"success": 0, "format_error": 0, "steps": 0}
    state0, prompts, acts, tss = trajectories(env, random_policy, seed=11)
    for i in range(2 * N_SEEDS):
        oracle = i < N_SEEDS
        s0 = jax.tree_util.tree_map(lambda x: x[i], state0)
        twin = twin_cls.from_state(s0, env)
        assert vocab.pad_to(vocab.encode(twin.prompt()), env.obs_len) == prompts[i].tolist()
        for t in range(acts.shape[1]):
            a = acts[i, t]      # ids outside the vocab -> <err> (as token_ops.sanitize)
            text = vocab.decode(np.where((a >= 0) & (a < vocab.size), a, vocab.ERR), skip_pad=False)
            if oracle and not twin.done:   # the twin's own oracle issues the same command
                assert vocab.encode(twin.oracle_command()) == vocab.encode(text.split("<pad>")[0])
            obs, reward, term, trunc, info = twin.step(text)
            where = f"{name} seed {i} turn {t}: {text!r}"
            assert vocab.pad_to(vocab.encode(obs), env.obs_len) == tss.observation[i, t].tolist(), where
            assert reward == pytest.approx(float(tss.reward[i, t]), abs=1e-6), where
            assert (term, trunc) == (bool(tss.terminated[i, t]), bool(tss.truncated[i, t])), where
            assert set(info) == set(tss.info), where
            for k in info:
                assert info[k] == tss.info[k][i, t].item(), (where, k)
            counts["success"] += info["success"]
            counts["format_error"] += info["format_error"]
            counts["steps"] += 1
    # both policies exercised successes and format errors
    assert counts["success"] >= N_SEEDS and counts["format_error"] > 20, counts
