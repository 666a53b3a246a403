"""Rollout: layout, loss mask, log-prob parity with the trainer's forward pass, early ends,
sampling that does not depend on how the batch is sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import envs
import models
from envs import vocab
from rl_agents import losses
from rl_agents.rollout import action_valid_mask, oracle_policy, rollout, run_episodes
from rl_agents.sampling import SamplingConfig, sample_tokens


def tiny_model(env, **kw):
    cfg = models.ModelConfig(vocab_size=vocab.size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=64, max_seq_len=env.max_episode_tokens, attention_impl="xla", **kw)
    model = models.PolicyModel(cfg)
    return model, models.init_params(model, jax.random.PRNGKey(0))


def split_turns(traj, b):
    """Python reconstruction of one row: prompt, then (action, observation) per turn."""
    toks = np.asarray(traj.tokens[b])[np.asarray(traj.valid[b])]
    mask = np.asarray(traj.loss_mask[b])[np.asarray(traj.valid[b])]
    turn_ids = np.asarray(traj.turn_ids[b])[np.asarray(traj.valid[b])]
    prompt = toks[turn_ids == -1]
    turns = []
    for k in range(int(traj.episode_length[b])):
        sel = turn_ids == k
        turns.append((toks[sel & mask], toks[sel & ~mask]))
    return prompt, turns


@pytest.mark.parametrize("name", ["guess_number", "maze"])
def test_oracle_rollout_replays_env_exactly(name):
    """Agent tokens are exactly the actions and never the env's; replaying the actions through
    the env reproduces every observation and reward; layout is compact with pads after."""
    env = envs.make(name)
    key = jax.random.PRNGKey(3)
    traj = jax.jit(lambda k: run_episodes(env, oracle_policy(env), k, 8, 2))(key)
    assert traj.success.mean() > 0.99
    reset_keys = jnp.repeat(jax.random.split(jax.random.split(key)[0], 8), 2, axis=0)
    for b in range(16):
        valid = np.asarray(traj.valid[b])
        n = valid.sum()
        assert valid[:n].all() and not valid[n:].any()
        assert (np.asarray(traj.tokens[b])[n:] == vocab.PAD).all()
        state, ts = env.reset(reset_keys[b])
        prompt, turns = split_turns(traj, b)
        np.testing.assert_array_equal(prompt, np.asarray(ts.observation)[np.asarray(ts.observation) != vocab.PAD])
        total = 0.0
        for k, (act, obs) in enumerate(turns):
            assert act[-1] == vocab.EOS and vocab.EOS not in act[:-1]
            assert len(obs) == 0 or obs[0] == vocab.OBS          # observations never carry loss
            action = jnp.asarray(vocab.pad_to(list(act), env.action_len), jnp.int32)
            state, ts = env.step(state, action)
            o = np.asarray(ts.observation)
            np.testing.assert_array_equal(obs, o[o != vocab.PAD])
            assert float(traj.turn_rewards[b, k]) == pytest.approx(float(ts.reward))
            total += float(ts.reward)
        assert bool(ts.done)
        assert float(traj.episode_return[b]) == pytest.approx(total, abs=1e-5)
        # rewards sit on each turn's last agent token
        assert float(traj.rewards[b].sum()) == pytest.approx(total, abs=1e-5)
        ends = np.flatnonzero(np.asarray(traj.turn_end[b]))
        assert len(ends) == len(turns)
        assert all(traj.tokens[b, e] == vocab.EOS for e in ends)
        # turns after the end are invalid and empty
        assert not np.asarray(traj.turn_valid[b, len(turns):]).any()
        assert (np.asarray(traj.turn_rewards[b, len(turns):]) == 0).all()
    # group members share the task instance
    np.testing.assert_array_equal(traj.tokens[0][: env.obs_len], traj.tokens[1][: env.obs_len])
    np.testing.assert_array_equal(traj.group_ids, np.repeat(np.arange(8), 2))


@pytest.mark.parametrize("sampler_attention", ["xla", "pallas"])
def test_sampler_logprobs_match_trainer_forward(sampler_attention):
    """The rollout's behaviour log-probs equal the trainer's XLA forward on the sampled tokens,
    also when the sampler's cached attention is the Pallas decode kernel (interpret mode here)."""
    env = envs.make("guess_number")
    model, params = tiny_model(env)
    sampler = models.PolicyModel(model.cfg.replace(attention_impl=sampler_attention))
    sampling = SamplingConfig(temperature=0.7)
    traj = jax.jit(lambda p, k: rollout(env, sampler, p, k, num_groups=4, group_size=2,
                                        sampling=sampling))(params, jax.random.PRNGKey(1))
    logits = model.apply({"params": params}, traj.tokens, segment_ids=traj.valid.astype(jnp.int32))
    logp = losses.sequence_logprobs(logits / 0.7, traj.tokens)
    m = np.asarray(traj.loss_mask)
    assert m.sum() > 20
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(traj.behaviour_logp)[m], atol=1e-5)
    assert (np.asarray(traj.behaviour_logp)[~m] == 0).all()
    # every active turn has >= 1 agent token, ends with EOS or fills the budget
    for b in range(8):
        ends = np.flatnonzero(np.asarray(traj.turn_end[b]))
        assert len(ends) == int(traj.episode_length[b])


def test_random_policy_episodes_end_and_pad():
    """An untrained model emits garbage: episodes end by truncation or format errors and are
    padded; a finished row gets no more tokens."""
    env = envs.make("maze")
    model, params = tiny_model(env)
    traj = jax.jit(lambda p, k: rollout(env, model, p, k, num_groups=16))(params, jax.random.PRNGKey(2))
    n_turns = np.asarray(traj.turn_valid).sum(-1)
    np.testing.assert_array_equal(n_turns, traj.episode_length)
    assert (np.asarray(traj.terminated) | np.asarray(traj.truncated)).all()
    # turn_valid is a prefix
    tv = np.asarray(traj.turn_valid)
    assert (np.cumprod(tv, axis=1) == tv).all()
    # agent tokens per turn never exceed the action budget
    for b in range(16):
        ids = np.asarray(traj.turn_ids[b])[np.asarray(traj.loss_mask[b])]
        assert np.bincount(ids, minlength=env.max_turns).max() <= env.action_len


def test_greedy_rollout_deterministic_and_no_recompile():
    env = envs.make("guess_number")
    model, params = tiny_model(env)
    f = jax.jit(lambda p, k: rollout(env, model, p, k, num_groups=4, sampling=SamplingConfig(greedy=True)))
    a = f(params, jax.random.PRNGKey(0))
    b = f(params, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert f._cache_size() == 1


def test_action_valid_mask():
    a = jnp.array([[5, 6, vocab.EOS, 7, vocab.PAD], [5, vocab.PAD, 6, 7, 8], [vocab.EOS, 1, 1, 0, 0]])
    np.testing.assert_array_equal(action_valid_mask(a), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")
@pytest.mark.parametrize("partitionable", [True, False], ids=["threefry_partitionable", "legacy"])
def test_sampled_tokens_do_not_depend_on_the_batch_sharding(partitionable):
    """One key draws the whole [B, V] batch; the random bits of an element are a function of
    the key and its global index, so rows split over 8 devices draw exactly the tokens (and
    log-probs) they draw on one device, with ``jax_threefry_partitionable`` on (the default)
    or off (off only adds communication: the bits are gathered)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("rows",))
    key = jax.random.PRNGKey(5)
    with jax.threefry_partitionable(partitionable):
        logits = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (32, vocab.size))
        sharded = jax.device_put(logits, NamedSharding(mesh, P("rows")))
        for cfg in (SamplingConfig(), SamplingConfig(temperature=0.7, top_k=8, top_p=0.9)):
            draw = jax.jit(lambda x, k, cfg=cfg: sample_tokens(x, k, cfg))
            tokens, logp = draw(logits, key)
            s_tokens, s_logp = draw(sharded, key)
            assert s_tokens.sharding.spec == P("rows")
            np.testing.assert_array_equal(np.asarray(s_tokens), np.asarray(tokens))
            np.testing.assert_array_equal(np.asarray(s_logp), np.asarray(logp))
            assert len(np.unique(np.asarray(tokens))) > 4
