"""envs.make / envs.registered: names, lazy imports, errors, and the shared Env contract."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import envs
from envs import vocab
from envs.base import Env

ALL = ["guess_number", "kv_search", "calculator", "maze", "wordle", "keychain", "bandit",
       "word_problems", "kb_qa"]


def test_registered_names():
    assert envs.registered() == ALL


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown env name 'nope'.*guess_number.*bandit"):
        envs.make("nope")
    with pytest.raises(ValueError, match="unknown env name"):
        envs.make(3)


def test_bad_kwargs_are_named():
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['bogus'\].*hops"):
        envs.make("kv_search", bogus=1)
    with pytest.raises(ValueError, match="hops"):
        envs.make("kv_search", hops=0)


def test_lazy_import():
    code = ("import sys, envs; m = 'envs.tasks.calculator'; assert m not in sys.modules; "
            "env = envs.make('calculator'); assert m in sys.modules; print(type(env).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CalculatorEnv"


@pytest.mark.parametrize("name", ALL)
def test_every_env_follows_the_contract(name):
    try:
        cls = envs.env_class(name)
    except ModuleNotFoundError as e:   # a task module that is not there
        pytest.skip(f"{name}: {e}")
    env = envs.make(name)
    assert isinstance(env, Env) and isinstance(env, cls) and env.name == name
    # tasks in words (phrases) have longer prompts; their observations are rendered by a tokenizer
    assert env.obs_len <= (32 if env.phrases else 24) and env.action_len <= 12, (env.obs_len,
                                                                                 env.action_len)
    assert all(isinstance(p, str) and p for p in env.phrases)
    assert env.step_obs_len is None or 1 <= env.step_obs_len <= env.obs_len

    def reset_oracle_step(key):
        s, ts = env.reset(key)
        a = env.oracle_action(s, jax.random.fold_in(key, 1))
        s2, ts2 = env.step(s, a)
        return s, ts, a, s2, ts2

    s, ts, a, s2, ts2 = jax.jit(reset_oracle_step)(jax.random.PRNGKey(0))   # one compile per env
    assert ts.observation.shape == (env.obs_len,) and ts.observation[0] == vocab.TASK
    assert not bool(ts.terminated) and not bool(ts.truncated) and float(ts.reward) == 0.0
    assert a.shape == (env.action_len,)
    assert ts2.observation.shape == (env.obs_len,) and ts2.observation[0] == vocab.OBS
    assert set(ts.info) == set(ts2.info) and {"success", "format_error"} <= set(ts.info)
    for x, y in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(s2)):
        assert np.shape(x) == np.shape(y) and x.dtype == y.dtype
    assert isinstance(env.render(s2), str)


def test_render_episode():
    from envs.render import action_text, decode_safe, render_episode
    from envs.tasks.guess_number import GuessNumberEnv
    env = GuessNumberEnv(n=8)
    s, ts = env.reset(jax.random.PRNGKey(0))
    s = s.replace(target=np.int32(5))
    acts, obs, rews, dones = [], [], [], []
    for text in ["< 4 ?", "< 6 ?", "<answer> 5", "<answer> 5"]:
        a = np.asarray(vocab.pad_to(vocab.encode(text + " <eos>"), env.action_len))
        s, t = env.step(s, a)
        acts.append(a); obs.append(t.observation); rews.append(t.reward); dones.append(t.done)
    out = render_episode(env, ts.observation, np.stack(acts), np.stack(obs), np.array(rews),
                         dones=np.array(dones))
    lines = out.split("\n")
    assert lines[0].startswith("guess_number episode (obs_len=")
    assert lines[1] == "  prompt: <task> guess 8 <sep> 6"
    assert "turn 1: < 4 ? <eos>" in lines[2] and "<obs> <no>" in lines[2] and "-0.01" in lines[2]
    assert "turn 3: <answer> 5 <eos>" in lines[4] and "<obs> <yes>" in lines[4] and "done" in lines[4]
    assert lines[-1] == "  return +0.98 over 3 turns" and len(lines) == 6   # stops at done
    assert decode_safe([vocab.OBS, 99, vocab.YES, -1]) == "<obs> #99 <yes> #-1"
    assert action_text([vocab.PAD, 5]) == "<pad>" and action_text([vocab.ANSWER, vocab.EOS, 9]) == "<answer> <eos>"
    with pytest.raises(ValueError, match="same number of turns"):
        render_episode(env, ts.observation, np.stack(acts), np.stack(obs)[:2], np.array(rews))
