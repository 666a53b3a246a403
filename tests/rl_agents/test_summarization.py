"""SUPO: summarise-and-continue rollout, segment layout, log-prob parity, advantages, masking."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import envs
from envs import vocab
from rl_agents import losses
from rl_agents.trainer import make_trainer
from rl_agents.summarization import (SupoConfig, SupoContext, collect_supo_demos, demo_rows,
                                     oracle_summary, prepare_supo_batch,
                                     render_supo_trajectory, segment_rows, supo_oracle_policy,
                                     supo_run_episodes)

ENV_KW = dict(chain_len=3, n_distractors=2, value_len=2)   # obs_len 12, action_len 4, 60 real tokens
SUMMARY_LEN = 3


@pytest.fixture(scope="module")
def env():
    e = envs.make("keychain", **ENV_KW)
    JITTED[e] = (jax.jit(e.reset), jax.jit(e.step), jax.jit(e.oracle_action))
    return e


JITTED = {}    # env -> jitted (reset, step, oracle_action) for the plain-Python reference


def supo_config(**context):
    from experiments.configs.common import make_config
    c = make_config("keychain", "grpo")
    c.env.kwargs = ml_collections.ConfigDict(ENV_KW)
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, attention_impl="xla"))
    c.rollout.update(dict(num_groups=2, group_size=2, eval_episodes=4, temperature=0.8))
    c.rl.update(dict(epochs=1, minibatches=2))
    c.bc.update(dict(episodes=8, epochs=1, batch_size=8, epsilon=0.0))
    c.context = ml_collections.ConfigDict(dict(mode="supo", working_len=40, summary_len=SUMMARY_LEN,
                                               max_summaries=1, max_summaries_eval=5, overlong_mask=True))
    c.context.update(context)
    return c


def nonpad(x):
    x = [int(t) for t in np.asarray(x)]
    return x[:x.index(vocab.PAD)] if vocab.PAD in x else x


def until_eos(x):
    x = nonpad(x)
    return x[:x.index(vocab.EOS) + 1] if vocab.EOS in x else x


def reference_episode(env, reset_key, L, M, S):
    """Plain-Python SUPO with the oracle, one env call at a time: the segments as token lists."""
    reset, step, oracle = JITTED[env]
    state, ts = reset(reset_key)
    prompt = nonpad(ts.observation)
    segs, ctx, n_sum, success, cut = [list(prompt)], len(prompt), 0, False, False
    A, O, R = env.action_len, env.obs_len, 1 + S
    for _ in range(env.max_turns):
        if ctx + A + O + R > L and n_sum < M:
            p = int(state.progress)
            if p < env.chain_len:
                item = [vocab.LETTER_A + int(c) for c in np.asarray(state.chain[p])]
            else:
                item = [vocab.DIGIT_0 + int(d) for d in np.asarray(state.value)]
            body = item + [vocab.EOS]
            segs[-1] += [vocab.SUMMARIZE] + body
            segs.append(prompt + [vocab.SUMMARY] + body)
            ctx, n_sum = len(segs[-1]), n_sum + 1
        elif ctx + A + O > L:
            cut = True
            break
        action = until_eos(oracle(state, jax.random.PRNGKey(0)))
        state, ts = step(state, jnp.asarray(vocab.pad_to(action, A), jnp.int32))
        obs = nonpad(ts.observation)
        segs[-1] += action + obs
        ctx += len(action) + len(obs)
        success |= bool(ts.info["success"])
        if bool(ts.terminated | ts.truncated):
            break
    return segs, success, n_sum, cut


def traj_segments(traj, row):
    s, L = traj.num_segments, traj.working_len
    toks = np.asarray(traj.tokens[row]).reshape(s, L)
    valid = np.asarray(traj.valid[row]).reshape(s, L)
    return [list(map(int, toks[i][valid[i]])) for i in range(s) if valid[i].any()]


# ------------------------------------------------------------------------------------------
# Oracle rollouts: hand-checked episode and a plain-Python reference
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle_traj(env):
    """8 oracle episodes at L = 40 (< the 60 tokens an episode needs), up to 3 summaries."""
    return collect_supo_demos(env, SupoConfig(40, SUMMARY_LEN, 3), jax.random.PRNGKey(0), 8)


@pytest.fixture(scope="module")
def oracle_run(env):
    """One compiled oracle rollout (shapes of L = 64, M = 3; 4 tasks × 4 episodes) for any
    traced (L, M) limits and noise ε."""
    big = SupoConfig(64, SUMMARY_LEN, 3)
    run = jax.jit(lambda k, lim, eps: supo_run_episodes(env, supo_oracle_policy(env, big, eps), k, 4, 4,
                                                        cfg=big, limits=lim))
    return lambda key, L, M, eps=0.0: run(key, (jnp.int32(L), jnp.int32(M)), jnp.float32(eps))


def test_oracle_summarizes_and_succeeds_where_plain_context_fails(env, oracle_traj, oracle_run):
    L, traj = 40, oracle_traj
    assert L < env.episode_tokens_needed and L < 60
    assert traj.success.all() and not traj.hit_summary_cap.any()
    assert (np.asarray(traj.num_summaries) == 3).all()          # one turn per segment at L = 40
    # hand check of episode 0 (chain k0 -> k1 -> k2 -> value)
    state, ts = env.reset(jax.random.split(jax.random.split(jax.random.PRNGKey(0))[0], 8)[0])
    prompt = nonpad(ts.observation)
    key = lambda i: [vocab.LETTER_A + int(c) for c in np.asarray(state.chain[i])]
    value = [vocab.DIGIT_0 + int(d) for d in np.asarray(state.value)]
    rec = lambda i: nonpad(state.records[i])
    S, E, Z, Y = vocab.SEARCH, vocab.EOS, vocab.SUMMARIZE, vocab.SUMMARY
    expected = [
        prompt + [S] + key(0) + [E] + rec(0) + [Z] + key(1) + [E],
        prompt + [Y] + key(1) + [E] + [S] + key(1) + [E] + rec(1) + [Z] + key(2) + [E],
        prompt + [Y] + key(2) + [E] + [S] + key(2) + [E] + rec(2) + [Z] + value + [E],
        prompt + [Y] + value + [E] + [vocab.ANSWER] + value + [E, vocab.OBS, vocab.YES],
    ]
    assert traj_segments(traj, 0) == expected
    assert all(len(s) <= L for s in expected)
    assert "<summarize>" in render_supo_trajectory(traj, 0)
    # the same working length without summaries: the context fills up, every episode fails
    plain = oracle_run(jax.random.PRNGKey(0), L, 0)
    assert not plain.success.any() and plain.hit_summary_cap.all() and plain.truncated.all()
    assert (np.asarray(plain.num_summaries) == 0).all()
    # the traced-limits path (other shapes) gives the same segments as the direct config
    same = oracle_run(jax.random.PRNGKey(0), L, 3)
    assert same.success.all() and (np.asarray(same.num_summaries) == 3).all()
    reset_keys = jax.random.split(jax.random.split(jax.random.PRNGKey(0))[0], 4)
    state, ts = env.reset(reset_keys[1])
    segs, *_ = reference_episode(env, reset_keys[1], L, 3, SUMMARY_LEN)
    assert traj_segments(same, 4) == segs and traj_segments(same, 5) == segs   # task 1, two rollouts
    prompt, rec0 = nonpad(ts.observation), nonpad(state.records[0])
    k0 = [vocab.LETTER_A + int(c) for c in np.asarray(state.chain[0])]
    assert traj_segments(plain, 4) == [prompt + [S] + k0 + [E] + rec0]


def test_oracle_rollout_matches_python_reference(env, oracle_run):
    """Several (L, M) through the traced limits against a plain-Python SUPO loop."""
    key = jax.random.PRNGKey(4)
    reset_keys = jnp.repeat(jax.random.split(jax.random.split(key)[0], 4), 4, axis=0)
    outcomes = set()
    for L, M in [(40, 3), (40, 1), (36, 3), (48, 0)]:
        traj = oracle_run(key, L, M)
        assert traj.tokens.shape == (16, 4 * 64)
        for b in range(0, 16, 3):
            segs, success, n_sum, cut = reference_episode(env, reset_keys[b], L, M, SUMMARY_LEN)
            assert traj_segments(traj, b) == segs, (L, M, b)
            assert bool(traj.success[b]) == success and int(traj.num_summaries[b]) == n_sum
            assert bool(traj.hit_summary_cap[b]) == cut
            outcomes.add((success, cut))
    assert outcomes == {(True, False), (False, True)}


# ------------------------------------------------------------------------------------------
# Model rollouts: layout / masks and log-prob parity (the key correctness check)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_rollout(env):
    """A random tiny model sampled (τ = 0.8) through ``Trainer.evaluate`` (SUPO context): training cap 1,
    eval cap 3 summaries, L = 40."""
    trainer = make_trainer(supo_config(max_summaries=1, max_summaries_eval=3))
    params = trainer.init_params(jax.random.PRNGKey(0))["policy"]
    metrics, traj = trainer.evaluate(params, jax.random.PRNGKey(1), episodes=8, greedy=False)
    return trainer, params, metrics, traj


def test_model_rollout_layout_and_masks(env, model_rollout):
    trainer, _, _, traj = model_rollout
    cfg = trainer.context.supo_eval
    b, S, L = 8, cfg.num_segments, cfg.working_len
    assert traj.tokens.shape == (b, S * L) and traj.segment_valid.shape == (b, S)
    tok = np.asarray(traj.tokens).reshape(b, S, L)
    valid = np.asarray(traj.valid).reshape(b, S, L)
    loss = np.asarray(traj.loss_mask).reshape(b, S, L)
    summ = np.asarray(traj.summary_mask).reshape(b, S, L)
    tids = np.asarray(traj.turn_ids).reshape(b, S, L)
    n_sum = np.asarray(traj.num_summaries)
    assert n_sum.max() >= 2, "the test needs episodes with several summaries"
    assert (n_sum <= cfg.max_summaries).all()
    prompt_len = 12
    for i in range(b):
        nseg = int(np.asarray(traj.segment_valid[i]).sum())
        assert np.asarray(traj.segment_valid[i])[:nseg].all() and nseg == n_sum[i] + 1
        for s in range(S):
            n = valid[i, s].sum()
            assert valid[i, s, :n].all() and not valid[i, s, n:].any()      # compact
            assert (tok[i, s, n:] == vocab.PAD).all()
            assert not (loss[i, s] & ~valid[i, s]).any() and not (summ[i, s] & ~loss[i, s]).any()
            assert (tids[i, s][summ[i, s]] == -1).all() and (tids[i, s][loss[i, s] & ~summ[i, s]] >= 0).all()
            if n == 0:
                continue
            row = tok[i, s, :n]
            assert row[0] == vocab.TASK and not loss[i, s, :prompt_len].any()
            if s > 0:
                assert row[prompt_len] == vocab.SUMMARY
            z = np.flatnonzero(summ[i, s])
            if s < nseg - 1:     # closed by a summary: <summarize> (no loss), then the summary
                assert len(z) >= 1 and (z == np.arange(z[0], n)).all()
                assert row[z[0] - 1] == vocab.SUMMARIZE and not loss[i, s, z[0] - 1]
            else:
                assert len(z) == 0
        # the summary written at the end of segment s opens segment s + 1
        for s in range(nseg - 1):
            written = tok[i, s][summ[i, s]]
            head = tok[i, s + 1, prompt_len + 1: prompt_len + 1 + len(written)]
            np.testing.assert_array_equal(written, head)
        # every agent turn's tokens are in exactly one segment: per-turn counts match
        assert (np.asarray(traj.turn_segment[i])[np.asarray(traj.turn_valid[i])] <= n_sum[i]).all()
    cap, term = np.asarray(traj.hit_summary_cap), np.asarray(traj.terminated)
    assert (cap | term | (np.asarray(traj.episode_length) == env.max_turns)).all()
    assert (n_sum[cap] == cfg.max_summaries).all() and (np.asarray(traj.truncated) == (~term)).all()


def test_logprob_parity_on_segment_rows(model_rollout):
    """A causal forward pass over each segment row recomputes the sampler's log-probs of every
    agent token (actions and summaries) within 1e-5."""
    trainer, params, _, traj = model_rollout
    model, sampling = trainer.policy, trainer.sampling
    rows = segment_rows(traj)
    logits = jax.jit(lambda p, t, v: model.apply({"params": p}, t, segment_ids=v.astype(jnp.int32)))(
        params, rows["tokens"], rows["valid"])
    logp = np.asarray(losses.sequence_logprobs(logits / sampling.temperature, rows["tokens"]))
    mask = np.asarray(rows["loss_mask"])
    summ = np.asarray(rows["summary_mask"])
    old = np.asarray(rows["behaviour_logp"])
    assert summ.sum() >= 5 and (mask & ~summ).sum() >= 20
    err = np.abs(logp - old)[mask]
    assert err.max() < 1e-5, err.max()
    assert np.abs(old[summ]).min() > 0                          # summary tokens were sampled
    assert (old[~mask] == 0).all()


# ------------------------------------------------------------------------------------------
# Advantages broadcast to segments and overlong masking
# ------------------------------------------------------------------------------------------
def numpy_grpo(returns, groups, eps=1e-6):
    out = np.zeros_like(returns)
    for g in np.unique(groups):
        idx = groups == g
        r = returns[idx]
        out[idx] = 0.0 if len(r) < 2 else (r - r.mean()) / (r.std(ddof=1) + eps)
    return out


def test_group_advantage_broadcast_and_overlong_masking(env, oracle_run):
    n_groups, g = 4, 4
    traj = oracle_run(jax.random.PRNGKey(2), 48, 1, 0.3)
    cfg = SupoConfig(64, SUMMARY_LEN, 3)                            # the shapes of oracle_run
    trunc = np.asarray(traj.truncated)
    assert trunc.any() and np.asarray(traj.success).any() and np.asarray(traj.hit_summary_cap).any()
    weight = np.ones(n_groups * g, np.float32)
    weight[1] = 0.0                                              # e.g. dropped by dynamic sampling
    prepare = jax.jit(prepare_supo_batch, static_argnames=("estimator", "overlong_mask"))
    batch = prepare(traj, jnp.asarray(weight), "grpo", overlong_mask=True)
    S, L = cfg.num_segments, cfg.working_len
    assert batch["tokens"].shape == (n_groups * g * S, L)
    expected = numpy_grpo(np.asarray(traj.episode_return), np.asarray(traj.group_ids))
    adv = np.asarray(batch["advantages"]).reshape(-1, S, L)
    loss_ep = np.asarray(traj.loss_mask).reshape(-1, S, L)
    mask = np.asarray(batch["loss_mask"]).reshape(-1, S, L)
    for i in range(n_groups * g):
        np.testing.assert_allclose(adv[i][loss_ep[i]], expected[i], rtol=1e-5, atol=1e-6)
        assert (adv[i][~loss_ep[i]] == 0).all()
        keep = weight[i] > 0 and not trunc[i]
        np.testing.assert_array_equal(mask[i], loss_ep[i] & keep)
    assert np.asarray(traj.num_summaries).max() == 1
    two_seg = [i for i in range(n_groups * g) if np.asarray(traj.segment_valid[i])[:2].all() and not trunc[i]]
    assert two_seg and all(mask[i, 1].any() and mask[i, 0].any() for i in two_seg)
    # without overlong masking the truncated episodes stay in the loss
    unmasked = prepare(traj, jnp.asarray(weight), "grpo", overlong_mask=False)
    m2 = np.asarray(unmasked["loss_mask"]).reshape(-1, S, L)
    assert all(m2[i].any() for i in range(n_groups * g) if trunc[i] and weight[i] > 0)
    # the batch rows are the rollout's rows (old log-probs and tokens reshaped, not recomputed)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]).reshape(-1, S * L), np.asarray(traj.tokens))


# ------------------------------------------------------------------------------------------
# Trainer: update, and evaluation with more summary rounds than training
# ------------------------------------------------------------------------------------------
def test_eval_allows_more_summaries_than_training(model_rollout):
    trainer, _, metrics, traj = model_rollout
    assert trainer.context.supo.max_summaries == 1 and trainer.context.supo_eval.max_summaries == 3
    assert traj.segment_valid.shape == (8, 4) and traj.tokens.shape == (8, 4 * 40)
    assert int(np.asarray(traj.num_summaries).max()) > trainer.context.supo.max_summaries
    assert float(metrics["eval/summaries"]) == pytest.approx(float(traj.num_summaries.mean()))
    assert np.isfinite(float(metrics["eval/success_rate"]))


@pytest.mark.slow
def test_trainer_update(env):
    """BC warm start on oracle segments, one PPO update over segment rows, eval."""
    trainer = make_trainer(supo_config())
    assert isinstance(trainer.context, SupoContext) and trainer.batch_size == 4 * 2
    state = trainer.init(jax.random.PRNGKey(0))
    state, metrics = trainer.update(state)
    for k in ("loss", "rollout/success_rate", "rollout/summaries", "rollout/hit_summary_cap",
              "rollout/overlong_masked"):
        assert np.isfinite(float(metrics[k])), k
    assert int(state.step) == 1 and float(metrics["rollout/summaries"]) <= 1.0


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_clear_errors(env, oracle_traj):
    with pytest.raises(ValueError, match="working_len=30"):
        SupoConfig(30, SUMMARY_LEN, 2).validate(env)
    SupoConfig(30, SUMMARY_LEN, 0).validate(env)                  # no summaries: prompt fits
    with pytest.raises(ValueError, match="max_summaries"):
        SupoConfig(40, SUMMARY_LEN, -1)
    with pytest.raises(ValueError, match="summary_len"):
        SupoConfig(40, 0, 1)
    state, _ = env.reset(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="summary_len=2"):
        oracle_summary(env, state, 2)
    body = oracle_summary(env, state, 5)
    assert nonpad(body) == [vocab.LETTER_A + int(c) for c in np.asarray(state.chain[0])] + [vocab.EOS]
    other = envs.make("guess_number")
    with pytest.raises(ValueError, match="guess_number"):
        oracle_summary(other, other.reset(jax.random.PRNGKey(0))[0], 4)
    with pytest.raises(ValueError, match="mode='bogus'"):
        make_trainer(supo_config(mode="bogus"))
    with pytest.raises(ValueError, match="ppo"):
        c = supo_config()
        c.rl.algorithm = "ppo"
        make_trainer(c)
    with pytest.raises(ValueError, match="pad_to=10"):
        demo_rows(oracle_traj, pad_to=10)
    rows = demo_rows(oracle_traj, pad_to=48)                       # 8 episodes × 4 segments
    assert rows["tokens"].shape == (32, 48) and rows["loss_mask"].sum(1).min() > 0
