"""Tests of envs.tasks.wordle.WordleEnv: feedback rule, candidate mask, oracle, semantics."""
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import vocab
from envs.tasks.wordle import WordleEnv, WordleState, wordle_feedback
from tests.envs.helpers import act, keys, text

_CACHE = {}


def get(**kw):
    """(env, jit(vmap(reset)), jit(vmap(step)), jit(step)) per knob setting, shared across tests."""
    k = tuple(sorted(kw.items()))
    if k not in _CACHE:
        env = WordleEnv(**kw)
        _CACHE[k] = (env, jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step)), jax.jit(env.step))
    return _CACHE[k]


def reference_feedback(guess: str, answer: str) -> str:
    """Standard Wordle marking, written directly: greens first, then yellows left to right."""
    marks = ["-"] * len(guess)
    unmatched = Counter(a for g, a in zip(guess, answer) if g != a)
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            marks[i] = "+"
    for i, g in enumerate(guess):
        if marks[i] != "+" and unmatched[g] > 0:
            marks[i] = "?"
            unmatched[g] -= 1
    return "".join(marks)


def as_idx(word):
    return jnp.array([ord(c) - ord("a") for c in word], jnp.int32)


CODE = {2: "+", 1: "?", 0: "-"}


@pytest.mark.parametrize("guess,answer,expected", [
    ("abcd", "cafe", "?-?-"), ("eeef", "cafe", "?--?"), ("aabb", "abab", "+??+"),
    ("aaaa", "abca", "+--+"), ("abca", "aaaa", "+--+"), ("bbaa", "aabc", "?-??"),
    ("cafe", "cafe", "++++"), ("dddd", "abce", "----"), ("aaab", "baaa", "?++?"),
])
def test_feedback_known_cases(guess, answer, expected):
    assert reference_feedback(guess, answer) == expected
    got = "".join(CODE[int(c)] for c in wordle_feedback(as_idx(guess), as_idx(answer)))
    assert got == expected


@pytest.mark.parametrize("alphabet,length", [(3, 5), (6, 4), (2, 6)])
def test_feedback_matches_reference_on_random_words(alphabet, length):
    rng = np.random.default_rng(alphabet * 10 + length)
    g = rng.integers(0, alphabet, (2000, length))
    a = rng.integers(0, alphabet, (2000, length))
    a[:100] = g[:100]                                         # edge case: solved
    got = np.asarray(jax.jit(jax.vmap(wordle_feedback))(jnp.asarray(g, jnp.int32), jnp.asarray(a, jnp.int32)))
    for i in range(2000):
        gs, as_ = "".join(chr(97 + x) for x in g[i]), "".join(chr(97 + x) for x in a[i])
        assert "".join(CODE[int(c)] for c in got[i]) == reference_feedback(gs, as_), (gs, as_)


def run_oracle(env, n, seed):
    def episode(key):
        k_reset, k_act = jax.random.split(key)
        state, _ = env.reset(k_reset)

        def body(carry, k):
            state, solved = carry
            state, ts = env.step(state, env.oracle_action(state, k))
            return (state, solved | ts.info["success"]), (ts.reward, ts.info["format_error"])

        (state, solved), (rewards, fe) = jax.lax.scan(body, (state, jnp.bool_(False)),
                                                      jax.random.split(k_act, env.max_turns))
        return solved, state.turn, rewards.sum(), fe.any()

    return jax.jit(jax.vmap(episode))(keys(n, seed))


def test_oracle_success_rate():
    env = get()[0]
    solved, turns, ret, fe = run_oracle(env, 1000, seed=1)
    rate = float(solved.mean())
    assert rate >= 0.99, rate
    assert not bool(fe.any())
    solved, turns, ret = map(np.asarray, (solved, turns, ret))
    np.testing.assert_allclose(ret[solved], 1.0 - env.turn_cost * (turns[solved] - 1), atol=1e-5)
    assert 3.0 < turns[solved].mean() < 5.0


def test_candidate_mask_matches_brute_force():
    env, reset, step, _ = get()
    n = 1024
    states, _ = reset(keys(n, 2))
    rng = np.random.default_rng(2)
    guesses = rng.integers(0, env.alphabet_size, (3, n, env.word_len))
    for t in range(3):
        a = np.full((n, env.action_len), vocab.PAD)
        a[:, :env.word_len] = guesses[t] + vocab.LETTER_A
        a[:, env.word_len] = vocab.EOS
        states, ts = step(states, jnp.asarray(a, jnp.int32))
    words = ["".join(chr(97 + x) for x in w) for w in env._all_words]
    cand = np.asarray(states.candidates)
    for i in range(20):
        hidden = "".join(chr(97 + x) for x in np.asarray(states.word[i]))
        played = [("".join(chr(97 + x) for x in guesses[t, i])) for t in range(3)]
        if any(p == hidden for p in played):
            continue
        fbs = [reference_feedback(p, hidden) for p in played]
        expected = np.array([all(reference_feedback(p, w) == f for p, f in zip(played, fbs)) for w in words])
        np.testing.assert_array_equal(cand[i], expected)
        assert int(ts.info["n_candidates"][i]) == expected.sum()
    # the hidden word is always a candidate
    idx = (np.asarray(states.word) * env.alphabet_size ** np.arange(env.word_len - 1, -1, -1)).sum(1)
    assert cand[np.arange(n), idx].all()


def handmade(env, word):
    return WordleState(key=jax.random.PRNGKey(0), turn=jnp.int32(0), done=jnp.bool_(False),
                       terminated=jnp.bool_(False), truncated=jnp.bool_(False), word=as_idx(word),
                       candidates=jnp.ones((env.n_words,), bool))


def test_handwritten_episode():
    env, _, _, step = get()
    state = handmade(env, "cafe")
    expected = [
        ("a b c d <eos>", "<obs> ? - ? -", -0.05, False, False),
        ("a b c <eos>", "<obs> <err>", -0.1, True, False),        # too short
        ("a b c g <eos>", "<obs> <err>", -0.1, True, False),      # g is outside a-f
        ("a b c d e <eos>", "<obs> <err>", -0.1, True, False),    # too long
        ("<answer> c a f <eos>", "<obs> <err>", -0.1, True, False),
        ("c a f e <eos>", "<obs> + + + +", 1.0, False, True),
    ]
    for a, obs, r, fe, solved in expected:
        state, ts = step(state, act(env, a))
        assert text(ts.observation) == obs, a
        assert float(ts.reward) == pytest.approx(r)
        assert bool(ts.info["format_error"]) == fe and bool(ts.info["success"]) == solved
        assert bool(ts.terminated) == solved and not bool(ts.truncated)
    assert int(state.turn) == 6 and bool(state.done)
    state2, ts = step(state, act(env, "c a f e <eos>"))
    assert text(ts.observation) == "<obs>" and float(ts.reward) == 0.0 and bool(ts.terminated)
    assert not bool(ts.info["success"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state2, state)


def test_truncation_after_max_turns():
    env, _, _, step = get()
    state = handmade(env, "aaaa")
    for t in range(env.max_turns):
        state, ts = step(state, act(env, "b b b b <eos>"))
        assert text(ts.observation) == "<obs> - - - -" and float(ts.reward) == pytest.approx(-0.05)
        assert bool(ts.truncated) == (t == env.max_turns - 1) and not bool(ts.terminated)
    assert bool(state.done) and int(ts.info["n_candidates"]) == 5 ** 4     # no b anywhere


def test_prompt_and_knobs():
    env, reset, _, _ = get()
    _, ts = reset(keys(1024, 0))
    assert text(ts.observation[0]) == "<task> wordle 4 <sep> abcdef"
    assert env.obs_len <= 24 and env.action_len <= 12 and env.max_turns == 6
    env5 = WordleEnv(word_len=5, alphabet_size=4, max_turns=8)
    assert vocab.decode(env5._prompt_tokens) == "<task> wordle 5 <sep> abcd" and env5.action_len == 7


def adversarial_actions(n, action_len, seed=0):
    rng = np.random.default_rng(seed)
    rand = rng.integers(-5, 80, (n, action_len))
    a = vocab.LETTER_A
    special = np.array([
        [vocab.PAD] * action_len, [vocab.EOS] * action_len, [a] * action_len,
        [np.iinfo(np.int32).max] * action_len, [np.iinfo(np.int32).min] * action_len,
        [a, a, a, a + 64, vocab.EOS, vocab.PAD], [a - 1, a, a, a, vocab.EOS, vocab.PAD],
        [a, a, a, a + 6, vocab.EOS, vocab.PAD],
    ])[:, :action_len]
    rand[: len(special)] = special
    valid = np.array([a, a + 1, a + 2, a + 3, vocab.EOS, vocab.PAD])
    rand[-1] = valid                                             # one valid guess for contrast
    return jnp.asarray(rand, jnp.int32)


def test_adversarial_actions_never_break_state():
    env, reset, step, _ = get()
    n = 1024
    states, _ = reset(keys(n, 3))
    acts = adversarial_actions(n, env.action_len)
    new_states, ts = step(states, acts)
    for a, b in zip(jax.tree_util.tree_leaves(states), jax.tree_util.tree_leaves(new_states)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert np.isfinite(np.asarray(ts.reward)).all()
    obs = np.asarray(ts.observation)
    assert ((obs >= 0) & (obs < vocab.size)).all()
    fe = np.asarray(ts.info["format_error"])
    assert fe[:8].all() and not fe[-1]
    np.testing.assert_allclose(np.asarray(ts.reward)[fe], -env.format_penalty)
    assert (obs[fe, :2] == [vocab.OBS, vocab.ERR]).all()
    np.testing.assert_array_equal(np.asarray(new_states.candidates)[fe], np.asarray(states.candidates)[fe])
    np.testing.assert_array_equal(np.asarray(new_states.word), np.asarray(states.word))


def test_vmap_1024_and_determinism():
    env, reset, step, _ = get()
    s1, t1 = reset(keys(1024, 4))
    s2, t2 = reset(keys(1024, 4))
    jax.tree_util.tree_map(np.testing.assert_array_equal, (s1, t1), (s2, t2))
    words = np.asarray(s1.word)
    assert len({w.tobytes() for w in words}) > 400
    counts = np.bincount(words.ravel(), minlength=6)
    assert counts.min() > 0.8 * counts.mean()                    # letters drawn uniformly
    acts = jnp.tile(act(env, "a b c d <eos>"), (1024, 1))
    a, ta = step(s1, acts)
    b, tb = step(s2, acts)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (a, ta), (b, tb))
    assert ta.observation.shape == (1024, env.obs_len) and int(a.turn.sum()) == 1024


def test_render():
    env = get()[0]
    line = env.render(handmade(env, "cafe"))
    assert "\n" not in line and "word=cafe" in line and "candidates=1296" in line


@pytest.mark.parametrize("kwargs,name", [
    (dict(word_len=0), "word_len"), (dict(alphabet_size=1), "alphabet_size"),
    (dict(alphabet_size=27), "alphabet_size"), (dict(word_len=8, alphabet_size=6), "exceeds"),
    (dict(max_turns=0), "max_turns"), (dict(turn_cost=-1.0), "turn_cost"),
])
def test_bad_knobs_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WordleEnv(**kwargs)
