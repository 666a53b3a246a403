"""Bradley–Terry reward model: loss vs NumPy, preference data, learning, learned-reward relabel."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
import models
from envs import vocab
from rl_agents import reward_models as R
from rl_agents.rollout import Trajectory


def tiny_cfg(max_len=160, d_model=64, n_layers=2):
    return models.ModelConfig(vocab_size=vocab.size, d_model=d_model, n_layers=n_layers, n_heads=4,
                              n_kv_heads=2, d_ff=2 * d_model, max_seq_len=max_len,
                              attention_impl="xla")


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def random_rows(rng, n, t, lengths=(5, 13)):
    lens = np.append(rng.choice(lengths, size=n - 1), t)       # one full row (no padding)
    valid = np.arange(t)[None] < lens[:, None]
    tokens = np.where(valid, rng.integers(2, vocab.size, size=(n, t)), vocab.PAD).astype(np.int32)
    return tokens, valid


@functools.partial(jax.jit, static_argnums=0)
def _apply(rm, params, row):
    return rm.apply({"params": params}, row)


def per_row_scores(rm, params, tokens, valid):
    """Independent reference: each row scored alone, unpadded, read at its last position."""
    apply = functools.partial(_apply, rm)
    out = []
    for tok, v in zip(tokens, valid):
        row = jnp.asarray(tok[v])[None]
        x = apply(params, row)          # no padding: the last position is the last token
        out.append(float(x[0]))
    return np.array(out)


# ------------------------------------------------------------------------------ loss
def test_bt_loss_from_scores_matches_numpy_incl_extremes():
    rng = np.random.default_rng(0)
    rc = np.concatenate([rng.normal(size=50) * 3, [100.0, -100.0, 0.0]]).astype(np.float32)
    rr = np.concatenate([rng.normal(size=50) * 3, [-100.0, 100.0, 0.0]]).astype(np.float32)
    ref = -np.mean(np_log_sigmoid(rc.astype(np.float64) - rr))
    got = float(R.bt_loss_from_scores(jnp.asarray(rc), jnp.asarray(rr)))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # equal scores: log 2
    np.testing.assert_allclose(float(R.bt_loss_from_scores(jnp.zeros(4), jnp.zeros(4))), np.log(2), rtol=1e-6)


def test_bt_loss_matches_numpy_on_padded_rows():
    rng = np.random.default_rng(1)
    cfg = tiny_cfg(max_len=24, d_model=32)
    rm = models.RewardModel(cfg)
    params = R.init_reward_params(rm, jax.random.PRNGKey(0))
    # a non-zero head so scores differ across rows
    params = jax.tree.map(lambda x: x, params)
    params["reward_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["reward_head"]["kernel"].shape)
    ct, cv = random_rows(rng, 6, 24)
    rt, rv = random_rows(rng, 6, 24)
    batch = dict(chosen_tokens=ct, chosen_valid=cv, rejected_tokens=rt, rejected_valid=rv)
    sc = per_row_scores(rm, params, ct, cv)
    sr = per_row_scores(rm, params, rt, rv)
    assert np.std(sc - sr) > 1e-3
    ref = -np.mean(np_log_sigmoid(sc - sr))
    loss = jax.jit(R.bt_loss, static_argnums=0)(rm, params, batch)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4, atol=1e-5)
    scores = jax.jit(R.sequence_scores, static_argnums=0)(rm, params, ct, cv)
    np.testing.assert_allclose(np.asarray(scores), sc, rtol=1e-4, atol=1e-5)
    # accuracy: fraction of strictly higher chosen scores
    assert R.preference_accuracy(rm, params, batch) == pytest.approx(np.mean(sc > sr))


# ------------------------------------------------------------------------------ pairs + learning
def question_answers(tokens, valid):
    """{k: "yes"/"no"} for each question "< k ?" in a decoded guess_number episode."""
    text = vocab.decode(tokens[valid])
    return {int(k): a for k, a in re.findall(r"< (\d+) \? <eos> <obs> <(yes|no)>", text)}


@pytest.fixture(scope="module")
def gn_pairs():
    env = envs.make("guess_number")
    train = R.make_preference_pairs(env, jax.random.PRNGKey(0), 160, epsilon=0.7)
    held_out = R.make_preference_pairs(env, jax.random.PRNGKey(12345), 160, epsilon=0.7)
    return env, train, held_out


def test_preference_pairs_are_valid(gn_pairs):
    env, train, held_out = gn_pairs
    n, t = train["chosen_tokens"].shape
    assert (n, t) == (160, env.max_episode_tokens)
    for c in R.PAIR_COLUMNS[:4]:
        assert train[c].shape == (n, t)
    assert (train["rejected_return"] < train["chosen_return"]).all()
    # the chosen episodes are the oracle's: all solve the task with the top return
    assert train["chosen_return"].min() > 0.9
    # chosen and rejected of a pair share the task instance (same hidden number): every question
    # "< k ?" that both episodes asked got the same yes / no answer
    shared = 0
    for i in range(n):
        qa_c = question_answers(train["chosen_tokens"][i], train["chosen_valid"][i])
        qa_r = question_answers(train["rejected_tokens"][i], train["rejected_valid"][i])
        for q in set(qa_c) & set(qa_r):
            assert qa_c[q] == qa_r[q], (i, q)
            shared += 1
    assert shared > n // 2
    # held-out pairs come from other keys: not the same rows
    assert not np.array_equal(train["rejected_tokens"], held_out["rejected_tokens"])
    ds = R.pairs_to_dataset(train)
    back = R.pairs_from_dataset(ds)
    for c in R.PAIR_COLUMNS:
        np.testing.assert_array_equal(back[c], train[c])


def test_learned_rm_ranks_oracle_above_perturbed_on_held_out_pairs(gn_pairs):
    env, train, held_out = gn_pairs
    rm = models.RewardModel(tiny_cfg(env.max_episode_tokens))
    params = R.init_reward_params(rm, jax.random.PRNGKey(2))
    before = R.preference_accuracy(rm, params, held_out)
    params, metrics = R.train_reward_model(rm, params, train, jax.random.PRNGKey(3), epochs=3,
                                           batch_size=32, lr=1e-3)
    assert metrics["rm/loss"][-1] < metrics["rm/loss"][0]
    after = R.preference_accuracy(rm, params, held_out)
    print(f"held-out preference accuracy {before:.3f} -> {after:.3f}; bt loss {metrics['rm/loss']}")
    assert after >= 0.95
    assert after > before


def test_validation_errors():
    env = envs.make("guess_number")
    with pytest.raises(ValueError, match="epsilon"):
        R.make_preference_pairs(env, jax.random.PRNGKey(0), 4, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        R.make_preference_pairs(env, jax.random.PRNGKey(0), 4, epsilon=1.5)
    with pytest.raises(ValueError, match="n_pairs"):
        R.make_preference_pairs(env, jax.random.PRNGKey(0), 0)
    bad = dict(chosen_tokens=np.ones((4, 5), np.int32), chosen_valid=np.ones((4, 5), bool),
               rejected_tokens=np.ones((4, 6), np.int32), rejected_valid=np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="shape"):
        R.preference_accuracy(models.RewardModel(tiny_cfg(8, 32, 1)), None, bad)
    ok = {k: v[:, :5] for k, v in bad.items()}
    with pytest.raises(ValueError, match="batch_size"):
        R.train_reward_model(tiny_cfg(8, 32, 1), None, ok, jax.random.PRNGKey(0), batch_size=8)
    ok["rejected_valid"] = ok["rejected_valid"].copy()
    ok["rejected_valid"][2] = False
    with pytest.raises(ValueError, match="rejected_valid row 2"):
        R.train_reward_model(tiny_cfg(8, 32, 1), None, ok, jax.random.PRNGKey(0), batch_size=2)


# ------------------------------------------------------------------------------ learned reward
def synthetic_trajectory():
    """Three hand-laid rows, T = 10, K = 3 (P prompt, A agent, O observation, . pad):
       row 0: P P A A O A A O . .   two turns, last agent token of turn 1 at index 6
       row 1: P A A A O . . . . .   one turn, turn end at index 3
       row 2: P P . . . . . . . .   no turn taken
    """
    rng = np.random.default_rng(5)
    lay = ["PPAAOAAO..", "PAAAO.....", "PP........"]
    turns = [[-1, -1, 0, 0, 0, 1, 1, 1, -1, -1], [-1, 0, 0, 0, 0] + [-1] * 5, [-1] * 10]
    valid = np.array([[c != "." for c in row] for row in lay])
    mask = np.array([[c == "A" for c in row] for row in lay])
    tokens = np.where(valid, rng.integers(2, vocab.size, size=(3, 10)), vocab.PAD).astype(np.int32)
    turn_ids = np.array(turns, np.int32)
    turn_end = np.zeros((3, 10), bool)
    turn_end[0, [3, 6]] = True
    turn_end[1, 3] = True
    lengths = np.array([2, 1, 0], np.int32)
    k = 3
    turn_valid = np.arange(k)[None] < lengths[:, None]
    env_rewards = np.where(turn_end, 0.5, 0.0).astype(np.float32)
    return Trajectory(
        tokens=jnp.asarray(tokens), valid=jnp.asarray(valid), loss_mask=jnp.asarray(mask),
        behaviour_logp=jnp.zeros((3, 10)), rewards=jnp.asarray(env_rewards),
        turn_ids=jnp.asarray(turn_ids), turn_end=jnp.asarray(turn_end),
        turn_rewards=jnp.asarray(np.where(turn_valid, 0.5, 0.0), jnp.float32),
        turn_valid=jnp.asarray(turn_valid), turn_obs_hash=jnp.zeros((3, k), jnp.uint32),
        turn_format_error=jnp.zeros((3, k), bool), episode_return=jnp.asarray(0.5 * lengths, jnp.float32),
        episode_length=jnp.asarray(lengths), success=jnp.array([True, False, False]),
        terminated=jnp.array([True, True, False]), truncated=jnp.zeros(3, bool),
        group_ids=jnp.arange(3, dtype=jnp.int32))


def test_learned_reward_on_synthetic_trajectory():
    traj = synthetic_trajectory()
    rm = models.RewardModel(tiny_cfg(16, 32, 1))
    params = R.init_reward_params(rm, jax.random.PRNGKey(0))
    params["reward_head"]["bias"] = params["reward_head"]["bias"] + 0.3
    scores = per_row_scores(rm, params, np.asarray(traj.tokens), np.asarray(traj.valid))
    rewards, relabelled = jax.jit(
        lambda t: (R.learned_reward_fn(rm, params)(t), R.relabel_with_learned_reward(rm, params, t)))(traj)
    rewards = np.asarray(rewards)
    expected = np.zeros((3, 10), np.float32)
    expected[0, 6] = scores[0]
    expected[1, 3] = scores[1]
    np.testing.assert_allclose(rewards, expected, rtol=1e-4, atol=1e-6)
    assert (rewards[2] == 0).all()          # no turn: no reward at all

    np.testing.assert_allclose(np.asarray(relabelled.rewards), expected, rtol=1e-4, atol=1e-6)
    exp_turn = np.zeros((3, 3), np.float32)
    exp_turn[0, 1] = scores[0]
    exp_turn[1, 0] = scores[1]
    np.testing.assert_allclose(np.asarray(relabelled.turn_rewards), exp_turn, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(relabelled.episode_return), [scores[0], scores[1], 0.0],
                               rtol=1e-4, atol=1e-6)
    # consistency: token rewards sum to turn rewards sum to the return; env fields untouched
    np.testing.assert_allclose(np.asarray(relabelled.rewards).sum(-1),
                               np.asarray(relabelled.turn_rewards).sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(relabelled.success), np.asarray(traj.success))


def test_save_load_roundtrip(tmp_path):
    cfg = tiny_cfg(16, 32, 1)
    rm = models.RewardModel(cfg)
    params = R.init_reward_params(rm, jax.random.PRNGKey(7))
    R.save_reward_model(str(tmp_path / "rm"), cfg, params)
    cfg2, params2 = R.load_reward_model(str(tmp_path / "rm"))
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    with pytest.raises(ValueError, match="rm_checkpoint"):
        R.load_reward_model(str(tmp_path / "nothing"))


def test_learned_rm_ranks_oracle_above_perturbed_on_held_out_maze_pairs():
    """The same held-out check on maze (partially observed navigation): the RM must rank the
    oracle episode above the ε-perturbed one of the same maze on pairs it was not trained on."""
    env = envs.make("maze")
    train = R.make_preference_pairs(env, jax.random.PRNGKey(0), 160, epsilon=0.7)
    held_out = R.make_preference_pairs(env, jax.random.PRNGKey(12345), 160, epsilon=0.7)
    assert (train["rejected_return"] < train["chosen_return"]).all()
    rm = models.RewardModel(tiny_cfg(env.max_episode_tokens))
    params = R.init_reward_params(rm, jax.random.PRNGKey(2))
    before = R.preference_accuracy(rm, params, held_out)
    params, metrics = R.train_reward_model(rm, params, train, jax.random.PRNGKey(3), epochs=3,
                                           batch_size=32, lr=1e-3)
    after = R.preference_accuracy(rm, params, held_out)
    print(f"maze held-out preference accuracy {before:.3f} -> {after:.3f}")
    assert after >= 0.95
    assert after > before
