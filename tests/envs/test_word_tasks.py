"""Tasks in words (word_problems, kb_qa): the text says what the state holds, read back by
independent Python readers of the sentences; oracles; tools; errors."""
import re

import jax
import numpy as np
import pytest

import envs
from envs import vocab
from envs.tasks import kb_qa, word_problems

N = 256


def _act(env, text):
    return np.asarray(vocab.pad_to(vocab.encode(text + " <eos>"), env.action_len), np.int32)


def _text(env, row):
    return vocab.decode(np.asarray(row), phrases=env.phrases)


# ----------------------------------------------------------------------------- word_problems
def read_story(text: str) -> int:
    """The count a story ends with, read from its sentences alone (a reference reader)."""
    assert text.startswith("<task> ")
    sentences = re.findall(r"[^.?]+[.?]", text[len("<task> "):])
    m = re.fullmatch(r"(\w+) has (\d+) (\w+) with (\d+) (\w+) each\.", sentences[0].strip())
    if m:
        count, item = int(m[2]) * int(m[4]), m[5]
    else:
        m = re.fullmatch(r"(\w+) has (\d+) (\w+)\.", sentences[0].strip())
        count, item = int(m[2]), m[3]
    name = m[1]
    for s in sentences[1:-1]:
        s = s.strip()
        if (m := re.fullmatch(r"(She|He) (buys|finds) (\d+) more\.", s)):
            count += int(m[3])
        elif (m := re.fullmatch(r"(\w+) gives (her|him) (\d+) more\.", s)):
            assert m[1] != name
            count += int(m[3])
        elif (m := re.fullmatch(r"(She|He) gives (\d+) to (\w+)\.", s)):
            assert m[3] != name
            count -= int(m[2])
        elif (m := re.fullmatch(r"(She|He) (loses|sells) (\d+)\.", s)):
            count -= int(m[3])
        else:
            raise AssertionError(f"unknown sentence {s!r}")
        assert count >= 0
    assert sentences[-1].strip() == f"How many {item} does {name} have now?"
    return count


@pytest.mark.parametrize("kw", [{}, {"n_ops": 3}, {"n_ops": 1, "ops": "+"}])
def test_word_problem_text_says_the_answer(kw):
    env = word_problems.WordProblemsEnv(**kw)
    state, ts = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(0), N))
    prompts = np.asarray(ts.observation)
    answers = np.asarray(state.values[:, -1])
    seen = set()
    for row, ans in zip(prompts, answers):
        text = _text(env, row)
        assert read_story(text) == ans, text
        seen |= {w for w in ("each.", "buys", "finds", "her", "to", "loses", "sells") if w in text}
    assert len(prompts[0]) == env.obs_len and (prompts[:, 0] == vocab.TASK).all()
    if not kw:        # every sentence form occurs
        assert seen == {"each.", "buys", "finds", "her", "to", "loses", "sells"}, seen


def test_word_problem_oracle_and_tool():
    env = envs.make("word_problems")
    keys = jax.random.split(jax.random.PRNGKey(1), N)
    state, _ = jax.vmap(env.reset)(keys)
    step, oracle = jax.jit(jax.vmap(env.step)), jax.jit(jax.vmap(env.oracle_action))
    ret = np.zeros(N)
    for _ in range(env.max_turns):
        state, ts = step(state, oracle(state, keys))
        ret += np.asarray(ts.reward)
    assert np.asarray(state.terminated).all()
    np.testing.assert_allclose(ret, 1.0 - 0.01 * env.n_ops, atol=1e-6)
    s, ts = env.reset(jax.random.PRNGKey(3))
    s2, t = env.step(s, _act(env, "<calc> 12 * 3"))
    assert _text(env, t.observation) == "<obs> <result> 36" and float(t.reward) == pytest.approx(-0.01)
    wrong = int(s.values[-1]) + 1
    s3, t = env.step(s, _act(env, f"<answer> {wrong}"))
    assert _text(env, t.observation) == "<obs> <no>" and bool(t.terminated) and not t.info["success"]
    s3, t = env.step(s, _act(env, "<answer> cat"))
    assert _text(env, t.observation) == "<obs> <err>" and float(t.reward) == pytest.approx(-0.1)
    assert env.step_obs_len < env.obs_len


def test_word_problem_bad_knobs():
    with pytest.raises(ValueError, match="holds '\\+'"):
        envs.make("word_problems", ops="-*")
    with pytest.raises(ValueError, match="n_ops"):
        envs.make("word_problems", n_ops=5)


# ----------------------------------------------------------------------------- kb_qa
def read_question(text: str):
    """(subject, relations innermost first) from the question's words alone."""
    m = re.fullmatch(r"<task> Who is the (.+) of (\w+)\?", text)
    return m[2], list(reversed(m[1].split(" of the ")))


def read_facts(text: str, person: str) -> dict:
    assert text.startswith("<obs> <result> ")
    facts = re.findall(r"(\w+)'s (\w+) is (\w+)\.", text)
    assert facts and all(p == person for p, _, _ in facts)
    return {r: q for _, r, q in facts}


@pytest.mark.parametrize("kw", [{}, {"hops": 3, "relations": 4, "people": 5}])
def test_kb_question_answered_from_the_searched_facts(kw):
    """An agent that reads only the texts (the question, then each search result) and searches
    person after person reaches the env's answer in hops + 1 turns."""
    env = kb_qa.KbQaEnv(**kw)
    state, ts = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(2), 64))
    step = jax.jit(env.step)
    for b in range(64):
        s = jax.tree_util.tree_map(lambda x: x[b], state)
        subject, rels = read_question(_text(env, ts.observation[b]))
        assert len(rels) == env.hops and subject in kb_qa.NAMES[:env.people]
        person = subject
        for r in rels:
            s, t = step(s, _act(env, f"<search> {person}"))
            facts = read_facts(_text(env, t.observation), person)
            assert len(facts) == env.relations
            person = facts[r]
        s, t = step(s, _act(env, f"<answer> {person}"))
        assert bool(t.info["success"]) and float(t.reward) == 1.0
        assert kb_qa.NAMES[int(s.chain[-1])] == person and int(s.progress) == env.hops


def test_kb_oracle_and_errors():
    env = envs.make("kb_qa")
    keys = jax.random.split(jax.random.PRNGKey(4), N)
    state, _ = jax.vmap(env.reset)(keys)
    kb = np.asarray(state.kb)
    assert (kb != np.arange(env.people)[None, :, None]).all() and kb.max() < env.people
    step, oracle = jax.jit(jax.vmap(env.step)), jax.jit(jax.vmap(env.oracle_action))
    ret = np.zeros(N)
    for _ in range(env.max_turns):
        state, ts = step(state, oracle(state, keys))
        ret += np.asarray(ts.reward)
    np.testing.assert_allclose(ret, 1.0 - 0.01 * env.hops, atol=1e-6)
    s, _ = env.reset(jax.random.PRNGKey(5))
    answer = kb_qa.NAMES[int(s.chain[-1])]
    other = next(n for n in kb_qa.NAMES[:env.people] if n != answer)
    for text, obs, reward, done in [("<search> zed", "<obs> <no>", -0.01, False),
                                    ("<search> an", "<obs> <no>", -0.01, False),
                                    ("<search> anna", "<obs> <no>", -0.01, False),
                                    ("<search>", "<obs> <err>", -0.1, False),
                                    ("<search> 12", "<obs> <err>", -0.1, False),
                                    (f"<answer> {other}", "<obs> <no>", 0.0, True),
                                    (f"<answer> {answer}", "<obs> <yes>", 1.0, True)]:
        _, t = env.step(s, _act(env, text))
        assert (_text(env, t.observation), float(t.reward), bool(t.done)) == \
            (obs, pytest.approx(reward), done), text
    small = envs.make("kb_qa", people=4)            # names beyond the world are not found
    s, _ = small.reset(jax.random.PRNGKey(0))
    _, t = small.step(s, _act(small, "<search> hugo"))
    assert _text(small, t.observation) == "<obs> <no>"
    with pytest.raises(ValueError, match="hops"):
        envs.make("kb_qa", hops=0)


def test_words_need_a_checkpoint():
    from experiments.configs.recipes import recipe
    from rl_agents.validation import ConfigError, validate_config
    for name in ("word_problems", "kb_qa"):
        cfg = recipe(name, "grpo")
        with pytest.raises(ConfigError, match=f"env.name = '{name}' is a task in words.*"
                                              "hf_checkpoint"):
            validate_config(cfg, 1, envs.registered())
    assert vocab.decode([vocab.TASK, vocab.size + 0, vocab.size + 4],
                        phrases=word_problems.PHRASES) == "<task> Ann Eva"
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 64\)"):
        vocab.decode([vocab.size])
