"""KvSearchEnv: oracle, robustness, batching, determinism, KB structure and hand-written semantics."""
import jax
import numpy as np
import pytest

import envs
from envs import vocab
from envs.tasks.kv_search import KvSearchEnv
from envs.wrappers import batch_reset, oracle_rollout
from tests.envs.helpers import act, run_mixed


ENV = KvSearchEnv(noise=0.3)
N_BATCH = 1024


def code_text(c):
    return f"{chr(97 + int(c) // 10)}{int(c) % 10}"


def test_oracle_success_1000_seeds():
    env = KvSearchEnv()
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(0), 1000))
    assert r["success"].mean() >= 0.99 and r["format_errors"].sum() == 0
    assert np.all(r["length"] == env.hops + 1)
    np.testing.assert_allclose(r["return"], 1.0 - 0.01 * env.hops, atol=1e-5)


@pytest.mark.slow
def test_oracle_with_noise_and_more_hops():
    env = KvSearchEnv(hops=3, n_entities=12, noise=0.2, max_turns=12)
    r = jax.device_get(oracle_rollout(env, jax.random.PRNGKey(1), 500))
    assert r["success"].mean() >= 0.99
    assert r["length"].mean() > env.hops + 1.2     # noise forces some re-searches


def test_kb_structure():
    env = KvSearchEnv(hops=3, n_entities=8, n_relations=3, n_distractors=10)
    states, ts = batch_reset(env, jax.random.PRNGKey(2), 200)
    st = jax.device_get(states)
    for i in range(200):
        codes, table = st.ent_codes[i], st.table[i]
        assert len(set(codes.tolist())) == 8 and len(set(st.rel_letters[i].tolist())) == 3
        chain, rels = st.chain[i], st.chain_rels[i]
        assert len(set(chain.tolist())) == 4
        for h in range(3):
            assert table[chain[h], rels[h]] == chain[h + 1]
        assert (table >= 0).sum() == 3 + 10
        prompt = vocab.decode(ts.observation[i])
        want = f"<task> {code_text(codes[chain[0]])} " + "".join(
            chr(97 + st.rel_letters[i][r]) for r in rels) + " ?"
        assert vocab.encode(prompt) == vocab.encode(want)


def test_adversarial_actions_never_crash():
    env = ENV
    s0, _ = env.reset(jax.random.PRNGKey(0))
    final, (ts, states) = run_mixed(env, N_BATCH, env.max_turns + 3, seed=3)   # jit(vmap) x 1024
    assert np.all(np.isfinite(ts.reward))
    assert ts.observation.min() >= 0 and ts.observation.max() < vocab.size
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(final)):
        assert a.shape == b.shape[1:] and a.dtype == b.dtype
    fe = ts.info["format_error"]
    assert fe.any() and (~fe).any() and ts.info["success"].any()
    np.testing.assert_allclose(ts.reward[fe], -env.format_penalty)
    assert np.all(states.table == states.table[:, :1])          # the KB never changes
    assert np.all((states.hop >= 0) & (states.hop <= env.hops))
    assert np.all(states.done[:, 1:] >= states.done[:, :-1])


def test_determinism_by_key():
    env = ENV
    a = run_mixed(env, N_BATCH, env.max_turns + 3, seed=7)
    b = run_mixed(env, N_BATCH, env.max_turns + 3, seed=7)
    c = run_mixed(env, N_BATCH, env.max_turns + 3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not np.array_equal(a[1][0].observation, c[1][0].observation)
    assert not np.array_equal(a[0].ent_codes, c[0].ent_codes)


def test_hand_written_episode():
    env = KvSearchEnv(n_distractors=0)
    s, ts = env.reset(jax.random.PRNGKey(4))
    step = jax.jit(env.step)
    codes = [code_text(c) for c in s.ent_codes]
    rels = [chr(97 + int(r)) for r in s.rel_letters]
    e0, e1, e2 = (codes[int(c)] for c in s.chain)
    r1, r2 = (rels[int(r)] for r in s.chain_rels)
    unknown_rel = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in rels)
    wrong = next(c for c in codes if c != e2)
    script = [
        (f"<search> {e0} {unknown_rel}", "<obs> <result> <no>", -0.01, 0),
        ("<search> z", "<obs> <err>", -0.1, 0),
        (f"<search> {e0} {r1} <eos>", f"<obs> <result> {e1}", -0.01, 1),
        (f"<search> {e0}", "<obs> <err>", -0.1, 1),
        (f"<search> {e1} {r2}", f"<obs> <result> {e2}", -0.01, 2),
    ]
    for a, obs, rew, hop in script:
        s, ts = step(s, act(env, a))
        assert vocab.encode(vocab.decode(ts.observation)) == vocab.encode(obs), a
        assert float(ts.reward) == pytest.approx(rew) and int(ts.info["hop"]) == hop, a
        assert not bool(ts.done)
    assert int(ts.info["n_searches"]) == 3
    s_wrong, ts_w = step(s, act(env, f"<answer> {wrong}"))
    assert bool(ts_w.terminated) and float(ts_w.reward) == 0.0 and not bool(ts_w.info["success"])
    assert vocab.decode(ts_w.observation) == "<obs> <no>"
    s, ts = step(s, act(env, f"<answer> {e2}"))
    assert bool(ts.terminated) and float(ts.reward) == 1.0 and bool(ts.info["success"])
    s2, ts2 = step(s, act(env, f"<answer> {e2}"))
    assert float(ts2.reward) == 0.0 and bool(ts2.terminated) and not bool(ts2.info["success"])
    assert vocab.decode(ts2.observation) == "<obs>" and int(s2.turn) == int(s.turn)


def test_noise_is_wrong_and_deterministic():
    env = KvSearchEnv(noise=1.0, n_distractors=0)
    s, _ = env.reset(jax.random.PRNGKey(7))
    a = env.oracle_action(s, None)
    _, ts1 = env.step(s, a)
    _, ts2 = env.step(s, a)
    assert np.array_equal(np.asarray(ts1.observation), np.asarray(ts2.observation))
    true = code_text(s.ent_codes[int(s.chain[1])])
    shown = vocab.decode(ts1.observation).replace("<obs> <result> ", "").replace(" ", "")
    assert shown != true and shown in [code_text(c) for c in s.ent_codes]
    assert int(ts1.info["hop"]) == 0    # corrupted result does not count as found


def test_truncation_and_knobs():
    env = KvSearchEnv(max_turns=2)
    s, _ = env.reset(jax.random.PRNGKey(0))
    for i in range(2):
        s, ts = env.step(s, act(env, "<search> a 0 a"))
    assert bool(ts.truncated) and not bool(ts.terminated)
    for bad in [dict(hops=0), dict(n_entities=2, hops=2), dict(n_relations=27), dict(noise=1.5),
                dict(n_distractors=-1), dict(max_turns=0)]:
        with pytest.raises(ValueError, match=list(bad)[0]):
            KvSearchEnv(**bad)
    assert isinstance(envs.make("kv_search", hops=3), KvSearchEnv)
    text = env.render(s)
    assert "chain" in text and "->" in text
