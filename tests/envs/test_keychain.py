"""Tests of envs.tasks.keychain.KeychainEnv: generation, oracle, semantics, robustness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import vocab
from envs.tasks.keychain import KeychainEnv
from tests.envs.helpers import act, keys, text

_CACHE = {}


def get(**kw):
    """(env, jit(vmap(reset)), jit(vmap(step)), jit(step)) per knob setting, shared across tests."""
    k = tuple(sorted(kw.items()))
    if k not in _CACHE:
        env = KeychainEnv(**kw)
        _CACHE[k] = (env, jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step)), jax.jit(env.step))
    return _CACHE[k]


def first(tree, i=0):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def run_oracle(env, n, seed):
    def episode(key):
        k_reset, k_act = jax.random.split(key)
        state, ts0 = env.reset(k_reset)

        def body(carry, k):
            state, solved = carry
            state, ts = env.step(state, env.oracle_action(state, k))
            return (state, solved | ts.info["success"]), ts.reward

        (state, solved), rewards = jax.lax.scan(body, (state, jnp.bool_(False)),
                                                jax.random.split(k_act, env.max_turns))
        return solved, state.turn, rewards.sum()

    return jax.jit(jax.vmap(episode))(keys(n, seed))


@pytest.mark.parametrize("kwargs", [dict(), dict(chain_len=1, key_len=1, n_distractors=0)])
def test_oracle_follows_the_chain(kwargs):
    env = get(**kwargs)[0]
    solved, turns, ret = run_oracle(env, 1000, seed=1)
    assert float(solved.mean()) >= 0.99 and bool(solved.all())
    np.testing.assert_array_equal(np.asarray(turns), env.chain_len + 1)
    np.testing.assert_allclose(np.asarray(ret), 1.0)
    assert env.episode_tokens_needed == env.obs_len + (env.chain_len + 1) * (env.action_len + env.obs_len)


def test_defaults_sizes():
    env = KeychainEnv()
    assert (env.obs_len, env.action_len, env.max_turns) == (22, 5, 14)
    assert env.episode_tokens_needed == 211 and env.episode_tokens_needed <= env.max_episode_tokens


@pytest.mark.parametrize("kwargs", [dict(), dict(key_len=1, chain_len=10, n_distractors=9),
                                    dict(key_len=3, chain_len=4, n_distractors=3, value_len=5)])
def test_records_hide_the_next_key_among_decoys(kwargs):
    env, reset, _, _ = get(**kwargs)
    states, ts = reset(keys(1024, 2))
    chains, records = np.asarray(states.chain), np.asarray(states.records)
    values, prompts = np.asarray(states.value), np.asarray(ts.observation)
    kl, nd = env.key_len, env.n_distractors
    slot_hist = np.zeros(nd + 1)
    for i in range(150):
        keyset = {tuple(k) for k in chains[i]}
        assert len(keyset) == env.chain_len                                   # distinct keys
        assert text(prompts[i]) == "<task> keychain <result> " + "".join(chr(97 + c) for c in chains[i, 0])
        for j in range(env.chain_len - 1):
            row = records[i, j]
            assert row[0] == vocab.OBS
            body = row[1:1 + (nd + 1) * (kl + 1)].reshape(nd + 1, kl + 1)
            assert (row[1 + (nd + 1) * (kl + 1):] == vocab.PAD).all()
            markers, codes = body[:, 0], body[:, 1:] - vocab.LETTER_A
            assert (markers == vocab.RESULT).sum() == 1 and set(markers) <= {vocab.RESULT, vocab.SEP}
            real = int(np.argmax(markers == vocab.RESULT))
            slot_hist[real] += 1
            np.testing.assert_array_equal(codes[real], chains[i, j + 1])
            for s in range(nd + 1):
                assert ((codes[s] >= 0) & (codes[s] < 26)).all()
                if s != real:
                    assert tuple(codes[s]) not in keyset                      # decoys are never keys
        goal = records[i, env.chain_len - 1]
        assert list(goal[:2 + env.value_len]) == [vocab.OBS, vocab.GOAL] + list(values[i] + vocab.DIGIT_0)
        assert (goal[2 + env.value_len:] == vocab.PAD).all()
    if nd:
        assert slot_hist.min() > 0.6 * slot_hist.mean()                       # the slot is random


def test_handwritten_episode():
    env, reset, _, step = get(chain_len=3, n_distractors=2, max_turns=12)
    states, _ = reset(keys(1024, 5))
    state = first(states)
    k = ["".join(chr(97 + c) for c in row) for row in np.asarray(state.chain)]
    value = "".join(str(int(d)) for d in np.asarray(state.value))
    recs = [text(r) for r in np.asarray(state.records)]
    decoy = next(tok for tok in recs[0].split() if tok.isalpha() and tok != k[1])
    spaced = lambda s: " ".join(s)                                       # noqa: E731
    wrong = "".join(str((int(c) + 1) % 10) for c in value)
    script = [
        (f"<search> {spaced(k[0])} <eos>", recs[0], 0.0, 1, False),
        (f"<search> {spaced(decoy)} <eos>", "<obs> <no>", 0.0, 1, False),           # a decoy
        (f"<search> {k[0][0]} <eos>", "<obs> <err>", -0.1, 1, False),               # key too short
        (f"<search> {spaced(k[0])} <eos>", recs[0], 0.0, 1, False),                 # again: same record
        (f"<search> {spaced(k[1])} <eos>", recs[1], 0.0, 2, False),
        (f"<answer> {spaced(value[:2])} <eos>", "<obs> <err>", -0.1, 2, False),     # value too short
        ("<calc> 1 <eos>", "<obs> <err>", -0.1, 2, False),
        (f"<search> {spaced(k[2])} <eos>", f"<obs> <goal> {value}", 0.0, 3, False),
    ]
    for a, obs, r, progress, term in script:
        state, ts = step(state, act(env, a))
        assert text(ts.observation) == obs, a
        assert float(ts.reward) == pytest.approx(r) and int(ts.info["progress"]) == progress
        assert bool(ts.info["format_error"]) == (r < 0)
        assert bool(ts.terminated) == term and not bool(ts.truncated)
    before = state
    state, ts = step(before, act(env, f"<answer> {spaced(wrong)} <eos>"))
    assert text(ts.observation) == "<obs> <no>" and float(ts.reward) == 0.0
    assert bool(ts.terminated) and not bool(ts.info["success"])
    state, ts = step(before, act(env, f"<answer> {spaced(value)} <eos>"))
    assert text(ts.observation) == "<obs> <yes>" and float(ts.reward) == 1.0
    assert bool(ts.terminated) and bool(ts.info["success"])
    state2, ts = step(state, act(env, f"<answer> {spaced(value)} <eos>"))           # done: no-op
    assert text(ts.observation) == "<obs>" and float(ts.reward) == 0.0 and bool(ts.terminated)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state2, state)


def test_truncation():
    env, reset, _, step = get(chain_len=3, n_distractors=2, max_turns=12)
    state = first(reset(keys(1024, 5))[0])
    for t in range(env.max_turns):
        state, ts = step(state, act(env, "<search> z z <eos>"))
        assert bool(ts.truncated) == (t == env.max_turns - 1) and not bool(ts.terminated)
    assert bool(state.done)


def last_key_agent(prompt_text, last_obs_text, chain_len_unknown=True):
    """A memoryless policy that sees only the prompt and the latest observation (what a
    [task prompt + summary] context keeps): search the key after <result>, answer after <goal>."""
    toks = last_obs_text.split() if last_obs_text else prompt_text.split()
    if "<goal>" in toks:
        return "<answer> " + " ".join(toks[toks.index("<goal>") + 1]) + " <eos>"
    return "<search> " + " ".join(toks[toks.index("<result>") + 1]) + " <eos>"


def test_last_read_key_is_enough_to_continue():
    """The design point for summarization: each step only needs the last key read."""
    env, reset, _, step = get()
    states, tss = reset(keys(1024, 6))
    for i in range(40):
        state, prompt, last = first(states, i), text(tss.observation[i]), None
        for _ in range(env.chain_len + 1):
            state, ts = step(state, act(env, last_key_agent(prompt, last)))
            last = text(ts.observation)
        assert bool(ts.info["success"]), env.render(state)


def adversarial_actions(n, action_len, seed=0):
    rng = np.random.default_rng(seed)
    rand = rng.integers(-5, 80, (n, action_len))
    a, s = vocab.LETTER_A, vocab.SEARCH
    special = np.array([
        [vocab.PAD] * 5, [vocab.EOS] * 5, [s] * 5, [np.iinfo(np.int32).max] * 5, [np.iinfo(np.int32).min] * 5,
        [s, a, a + 64, vocab.EOS, 0], [s, a - 1, a, vocab.EOS, 0],
        [vocab.ANSWER, vocab.DIGIT_0, 99, 17, vocab.EOS],
        [s, a, a, a, vocab.EOS],
    ])
    rand[: len(special)] = special
    rand[-1] = [s, a, a, vocab.EOS, vocab.PAD]                    # a valid (probably unknown) key
    return jnp.asarray(rand, jnp.int32)


def test_adversarial_actions_never_break_state():
    env, reset, step, _ = get()
    n = 1024
    states, _ = reset(keys(n, 3))
    acts = adversarial_actions(n, env.action_len)
    new_states, ts = step(states, acts)
    for x, y in zip(jax.tree_util.tree_leaves(states), jax.tree_util.tree_leaves(new_states)):
        assert x.shape == y.shape and x.dtype == y.dtype
    assert np.isfinite(np.asarray(ts.reward)).all()
    obs = np.asarray(ts.observation)
    assert ((obs >= 0) & (obs < vocab.size)).all()
    fe = np.asarray(ts.info["format_error"])
    assert fe[:9].all() and not fe[-1]
    np.testing.assert_allclose(np.asarray(ts.reward)[fe], -env.format_penalty)
    assert (obs[fe, :2] == [vocab.OBS, vocab.ERR]).all()
    np.testing.assert_array_equal(np.asarray(new_states.records), np.asarray(states.records))
    np.testing.assert_array_equal(np.asarray(new_states.progress)[fe], 0)


def test_vmap_1024_and_determinism():
    env, reset, step, _ = get()
    s1, t1 = reset(keys(1024, 4))
    s2, t2 = reset(keys(1024, 4))
    jax.tree_util.tree_map(np.testing.assert_array_equal, (s1, t1), (s2, t2))
    assert len({c.tobytes() for c in np.asarray(s1.chain)}) == 1024
    assert len({v.tobytes() for v in np.asarray(s1.value)}) > 600
    acts = jax.vmap(env.oracle_action)(s1, keys(1024, 0))
    a, ta = step(s1, acts)
    b, tb = step(s2, acts)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (a, ta), (b, tb))
    assert bool(ta.info["found"].all()) and int(a.progress.sum()) == 1024


def test_render():
    env, reset, _, _ = get()
    state = first(reset(keys(1024, 4))[0])
    line = env.render(state)
    assert "\n" not in line and line.count("->") == env.chain_len and "progress=0/6" in line


@pytest.mark.parametrize("kwargs,name", [
    (dict(key_len=0), "key_len"), (dict(key_len=4), "key_len"), (dict(chain_len=0), "chain_len"),
    (dict(key_len=1, chain_len=14), "chain_len"), (dict(n_distractors=-1), "n_distractors"),
    (dict(value_len=0), "value_len"), (dict(max_turns=0), "max_turns"),
    (dict(format_penalty=-1), "format_penalty"),
])
def test_bad_knobs_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KeychainEnv(**kwargs)
