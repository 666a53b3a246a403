"""PRIME implicit process rewards, their online update, combination, and Clip / Delta."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import envs
import models
from envs import vocab
from rl_agents import process_rewards as PR
from rl_agents.rollout import oracle_policy, run_episodes


def tiny_policy(max_len=64, d_model=32):
    cfg = models.ModelConfig(vocab_size=vocab.size, d_model=d_model, n_layers=1, n_heads=2,
                             n_kv_heads=1, d_ff=2 * d_model, max_seq_len=max_len,
                             attention_impl="xla")
    return models.PolicyModel(cfg)


_init = jax.jit(models.init_params, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens, valid):
    return model.apply({"params": params}, tokens, segment_ids=valid.astype(jnp.int32))


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logp(logits, tokens):
    """entry t = log softmax(logits[t-1])[tokens[t]], entry 0 = 0 (loops, float64)."""
    b, t, _ = logits.shape
    ls = np_log_softmax(logits)
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            out[i, j] = ls[i, j - 1, tokens[i, j]]
    return out


def np_softplus(x):
    return np.logaddexp(0.0, x)


def random_batch(rng, b=4, t=12):
    lens = rng.integers(3, t + 1, size=b)
    valid = np.arange(t)[None] < lens[:, None]
    tokens = np.where(valid, rng.integers(2, vocab.size, size=(b, t)), vocab.PAD).astype(np.int32)
    mask = valid & (rng.random((b, t)) < 0.6)
    mask[:, 0] = False
    return tokens, valid, mask


# ============================================================================ implicit PRM
def test_implicit_process_rewards_match_numpy():
    rng = np.random.default_rng(0)
    model = tiny_policy()
    prm = _init(model, jax.random.PRNGKey(1))
    ref = _init(model, jax.random.PRNGKey(2))
    tokens, valid, mask = random_batch(rng)
    beta, temp = 0.3, 0.7
    ref_logp = np_token_logp(np.asarray(_logits(model, ref, tokens, valid)) / temp, tokens)
    prm_lp = np_token_logp(np.asarray(_logits(model, prm, tokens, valid)) / temp, tokens)
    expected = np.where(mask, beta * (prm_lp - ref_logp), 0.0)
    got = jax.jit(PR.implicit_process_rewards, static_argnums=0)(
        model, prm, jnp.asarray(ref_logp, jnp.float32), tokens, valid, mask, beta, temp)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
    # PRM initialised from the reference: every process reward is exactly 0
    zero = jax.jit(lambda p: PR.implicit_process_rewards(
        model, p, PR.prm_logprobs(model, p, tokens, valid, temp), tokens, valid, mask, beta, temp))(ref)
    assert (np.asarray(zero) == 0).all()


def test_prm_loss_from_rewards_matches_numpy():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(9, 7)) * 2
    r[0] = 30.0                              # extreme summed rewards stay finite
    r[1] = -30.0
    mask = rng.random((9, 7)) < 0.7
    y = rng.integers(0, 2, size=9).astype(np.float64)
    w = rng.random(9)
    s = np.where(mask, r, 0.0).sum(-1)
    per = -(y * -np_softplus(-s) + (1 - y) * -np_softplus(s))       # −[y log σ(s) + (1−y) log σ(−s)]
    loss, m = PR.prm_loss_from_rewards(jnp.asarray(r, jnp.float32), mask, y)
    np.testing.assert_allclose(float(loss), per.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["prm/accuracy"]), np.mean((s > 0) == (y > 0.5)), rtol=1e-6)
    loss_w, _ = PR.prm_loss_from_rewards(jnp.asarray(r, jnp.float32), mask, y, w)
    np.testing.assert_allclose(float(loss_w), (w * per).sum() / w.sum(), rtol=1e-5)


def test_prm_loss_matches_numpy_end_to_end():
    rng = np.random.default_rng(2)
    model = tiny_policy()
    prm = _init(model, jax.random.PRNGKey(3))
    ref = _init(model, jax.random.PRNGKey(4))
    tokens, valid, mask = random_batch(rng, b=5)
    ref_logp = np_token_logp(np.asarray(_logits(model, ref, tokens, valid)), tokens)
    prm_lp = np_token_logp(np.asarray(_logits(model, prm, tokens, valid)), tokens)
    beta = 0.5
    s = np.where(mask, beta * (prm_lp - ref_logp), 0.0).sum(-1)
    y = np.array([1, 0, 1, 1, 0], np.float64)
    expected = np.mean(y * np_softplus(-s) + (1 - y) * np_softplus(s))
    batch = dict(tokens=tokens, valid=valid, loss_mask=mask, ref_logp=jnp.asarray(ref_logp, jnp.float32),
                 labels=y)
    loss, _ = jax.jit(lambda p: PR.prm_loss(model, p, batch, beta=beta))(prm)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        PR.prm_loss(model, prm, {k: v for k, v in batch.items() if k != "labels"}, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        PR.implicit_process_rewards(model, prm, batch["ref_logp"], tokens, valid, mask, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        PR.implicit_process_rewards(model, prm, batch["ref_logp"][:, :-1], tokens, valid, mask, 0.1)


def auc(scores, labels):
    s, y = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.fixture(scope="module")
def gn_traj():
    env = envs.make("guess_number")
    traj = jax.jit(lambda k: run_episodes(env, oracle_policy(env, 0.3), k, 48))(jax.random.PRNGKey(0))
    return env, traj


def test_online_prm_update_separates_successes_from_failures(gn_traj):
    """A few PRIME updates on fixed rollouts (ε-noisy oracle on guess_number, ~half successes):
    the summed implicit reward goes from all-zero (AUC 0.5) to separating successes from
    failures (accuracy of its sign and AUC > 0.9 on the training set)."""
    env, traj = gn_traj
    y = np.asarray(traj.success, np.float32)
    assert 0.25 < y.mean() < 0.75
    t = int(traj.valid.sum(-1).max())
    model = tiny_policy(env.max_episode_tokens)
    ref = _init(model, jax.random.PRNGKey(1))
    tokens, valid, mask = traj.tokens[:, :t], traj.valid[:, :t], traj.loss_mask[:, :t]
    batch = dict(tokens=tokens, valid=valid, loss_mask=mask, labels=jnp.asarray(y),
                 ref_logp=jax.jit(PR.prm_logprobs, static_argnums=0)(model, ref, tokens, valid))
    opt = optax.adam(3e-3)
    beta = 0.05
    params, opt_state = ref, opt.init(ref)
    rewards = jax.jit(lambda p: PR.implicit_process_rewards(model, p, batch["ref_logp"], tokens,
                                                            valid, mask, beta))
    s0 = np.asarray(rewards(params)).sum(-1)
    assert auc(s0, y) == 0.5 and (s0 == 0).all()
    losses_ = []
    for _ in range(20):
        params, opt_state, m = PR.prm_update(params, opt_state, batch, prm_model=model,
                                             optimizer=opt, beta=beta)
        losses_.append(float(m["prm/loss"]))
    s = np.asarray(rewards(params)).sum(-1)
    acc = np.mean((s > 0) == (y > 0.5))
    print(f"PRM loss {losses_[0]:.3f} -> {losses_[-1]:.3f}; accuracy {acc:.3f}, AUC {auc(s, y):.3f}")
    assert losses_[-1] < losses_[0] - 0.1
    assert acc > 0.9 and auc(s, y) > 0.9
    # off the agent tokens the process reward is 0
    assert (np.asarray(rewards(params))[~np.asarray(mask)] == 0).all()


def test_prm_step_skipped_without_a_row_to_learn_from(gn_traj):
    """row_weight all 0 (an update that completed no continuous group): params and AdamW state
    stay as they were — after a real step the moments are non-zero and a zero-gradient step
    would move the PRM; one row of weight 1 trains."""
    env, traj = gn_traj
    t = int(traj.valid.sum(-1).max())
    model = tiny_policy(env.max_episode_tokens)
    ref = _init(model, jax.random.PRNGKey(1))
    tokens, valid, mask = traj.tokens[:, :t], traj.valid[:, :t], traj.loss_mask[:, :t]
    b = tokens.shape[0]
    batch = dict(tokens=tokens, valid=valid, loss_mask=mask,
                 labels=jnp.asarray(traj.success, jnp.float32),
                 ref_logp=jax.jit(PR.prm_logprobs, static_argnums=0)(model, ref, tokens, valid))
    opt = optax.adamw(3e-3, weight_decay=0.1)
    step = lambda p, s, w: PR.prm_update(p, s, dict(batch, row_weight=w), prm_model=model,
                                         optimizer=opt, beta=0.05)
    p1, s1, _ = step(ref, opt.init(ref), jnp.ones((b,)))
    p2, s2, _ = step(p1, s1, jnp.zeros((b,)))
    jax.tree.map(np.testing.assert_array_equal, (p2, s2), (p1, s1))
    p3, _, _ = step(p1, s1, jnp.zeros((b,)).at[0].set(1.0))
    assert any(np.any(np.asarray(a) != np.asarray(c))
               for a, c in zip(jax.tree.leaves(p3), jax.tree.leaves(p1)))


def test_apply_process_rewards_on_a_rollout(gn_traj):
    """The trainer-facing entry point: PRM step on the success labels, shaped process rewards
    added consistently to token rewards, turn rewards and returns."""
    env, traj = gn_traj
    t = int(traj.valid.sum(-1).max())
    traj = jax.tree.map(lambda x: x[:16], traj)
    traj = traj.replace(**{f: getattr(traj, f)[:, :t] for f in
                           ("tokens", "valid", "loss_mask", "behaviour_logp", "rewards", "turn_ids",
                            "turn_end")})
    model = tiny_policy(env.max_episode_tokens)
    ref = _init(model, jax.random.PRNGKey(1))
    opt = optax.adam(1e-2)
    ref_logp = jax.jit(PR.prm_logprobs, static_argnums=0)(model, ref, traj.tokens, traj.valid)
    cfg = dict(beta=0.1, coef=0.5, transform="delta", clip_eta=0.0, granularity="turn",
               update="before")

    @jax.jit
    def apply(prm_state, traj):
        return PR.apply_process_rewards(traj, model, prm_state, ref_logp, optimizer=opt,
                                        **PR.process_kwargs(cfg))

    new, prm, m = apply({"params": ref, "opt_state": opt.init(ref)}, traj)

    @jax.jit
    def expected_shaped(params):      # the same pieces, composed by hand
        proc = PR.implicit_process_rewards(model, params, ref_logp, traj.tokens, traj.valid,
                                           traj.loss_mask, 0.1)
        return PR.shape_process_rewards(proc, traj.loss_mask, traj.turn_ids, traj.turn_end,
                                        traj.turn_valid, kind="delta", granularity="turn")

    shaped = expected_shaped(prm["params"])
    assert float(jnp.abs(shaped).max()) > 0
    np.testing.assert_allclose(np.asarray(new.rewards - traj.rewards), 0.5 * np.asarray(shaped),
                               rtol=1e-5, atol=1e-6)
    d_turn = np.asarray(new.turn_rewards - traj.turn_rewards)
    d_ep = np.asarray(new.episode_return - traj.episode_return)
    np.testing.assert_allclose(d_turn.sum(-1), d_ep, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.rewards - traj.rewards).sum(-1), d_ep, rtol=1e-4, atol=1e-5)
    assert (d_turn[~np.asarray(traj.turn_valid)] == 0).all()
    assert {"prm/loss", "prm/accuracy", "rollout/process_return"} <= set(m)
    with pytest.raises(ValueError, match="lacks"):
        PR.process_kwargs({"beta": 0.1})


def test_prime_process_rewards_update_orders():
    rng = np.random.default_rng(3)
    model = tiny_policy()
    ref = _init(model, jax.random.PRNGKey(5))
    tokens, valid, mask = random_batch(rng)
    batch = dict(tokens=tokens, valid=valid, loss_mask=mask, labels=np.array([1., 0., 1., 0.]),
                 ref_logp=jax.jit(PR.prm_logprobs, static_argnums=0)(model, ref, tokens, valid))
    opt = optax.sgd(0.1)

    @jax.jit
    def all_orders(params):
        out = {u: PR.prime_process_rewards(model, params, opt.init(params), batch, optimizer=opt,
                                           beta=0.1, update=u) for u in ("none", "after", "before")}
        p_after = out["after"][1]
        out["after_then_none"] = PR.implicit_process_rewards(
            model, p_after, batch["ref_logp"], tokens, valid, mask, 0.1)
        return out

    out = all_orders(ref)
    r_none, r_after, r_before = out["none"][0], out["after"][0], out["before"][0]
    m = out["after"][3]
    assert (np.asarray(r_none) == 0).all() and (np.asarray(r_after) == 0).all()   # PRM == ref
    assert np.abs(np.asarray(r_before)).max() > 0                                  # updated first
    np.testing.assert_allclose(
        np.asarray(r_before),
        np.asarray(out["after_then_none"]), rtol=1e-5, atol=1e-7)
    # "before" and "after" take the same step: identical new params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                                         atol=1e-7),
                 out["before"][1], out["after"][1])
    assert "prm/loss" in m
    with pytest.raises(ValueError, match="update"):
        PR.prime_process_rewards(model, ref, opt.init(ref), batch, optimizer=opt, beta=0.1,
                                 update="sometimes")


# ============================================================================ combination
def test_combine_and_turn_sums_match_loops():
    rng = np.random.default_rng(4)
    b, t, k = 5, 20, 4
    outcome = rng.normal(size=(b, t)).astype(np.float32)
    proc = rng.normal(size=(b, t)).astype(np.float32)
    mask = rng.random((b, t)) < 0.5
    turn_ids = np.sort(rng.integers(-1, k + 1, size=(b, t)), axis=1).astype(np.int32)  # incl. −1 and K
    coef = 0.3
    exp = outcome + coef * np.where(mask, proc, 0.0)
    np.testing.assert_allclose(np.asarray(PR.combine_rewards(outcome, proc, mask, coef)), exp, rtol=1e-6)
    exp_turn = np.zeros((b, k))
    for i in range(b):
        for j in range(t):
            if mask[i, j] and 0 <= turn_ids[i, j] < k:
                exp_turn[i, turn_ids[i, j]] += proc[i, j]
    got = PR.process_rewards_to_turns(proc, mask, turn_ids, k)
    np.testing.assert_allclose(np.asarray(got), exp_turn, rtol=1e-5, atol=1e-6)
    turn_rewards = rng.normal(size=(b, k)).astype(np.float32)
    ep = turn_rewards.sum(-1)
    r2, tr2, ep2 = PR.add_process_rewards(outcome, turn_rewards, ep, proc, mask, turn_ids, coef)
    np.testing.assert_allclose(np.asarray(r2), exp, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tr2), turn_rewards + coef * exp_turn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ep2), ep + coef * np.where(mask, proc, 0).sum(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="num_turns"):
        PR.process_rewards_to_turns(proc, mask, turn_ids, 0)
    with pytest.raises(ValueError, match="shapes"):
        PR.combine_rewards(outcome, proc[:, :-1], mask, coef)


# ============================================================================ Clip / Delta
def np_clip(r, mask, eta):
    out = np.zeros_like(r, dtype=np.float64)
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            if mask[i, j]:
                e = eta[i, 0] if np.ndim(eta) == 2 else eta
                out[i, j] = min(r[i, j] - e, 0.0)
    return out


def np_delta(r, mask):
    out = np.zeros_like(r, dtype=np.float64)
    for i in range(r.shape[0]):
        idx = [j for j in range(r.shape[1]) if mask[i, j]]
        for a, j in enumerate(idx):
            out[i, j] = r[i, j] - (r[i, idx[a + 1]] if a + 1 < len(idx) else 0.0)
    return out


@pytest.mark.parametrize("shape", [(6, 9), (4, 40), (1, 1), (3, 2)])
def test_clip_and_delta_match_loops(shape):
    rng = np.random.default_rng(shape[1])
    r = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape) < 0.6
    mask[0] = False                                # a row with no valid step
    if shape[0] > 1:
        mask[1] = False
        mask[1, -1] = True                         # a row with a single valid step (the last)
    for eta in (0.0, 0.4, -0.2):
        np.testing.assert_allclose(np.asarray(PR.clip_process_rewards(r, mask, eta)),
                                   np_clip(r, mask, eta), rtol=1e-6, atol=1e-7)
    eta_rows = rng.normal(size=(shape[0], 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(PR.clip_process_rewards(r, mask, eta_rows)),
                               np_clip(r, mask, eta_rows), rtol=1e-6, atol=1e-7)
    mean = r[mask].mean() if mask.any() else 0.0
    np.testing.assert_allclose(np.asarray(PR.clip_process_rewards(r, mask, "mean")),
                               np_clip(r, mask, mean), rtol=1e-5, atol=1e-6)
    d = np.asarray(jax.jit(PR.delta_process_rewards)(r, mask))
    np.testing.assert_allclose(d, np_delta(r, mask), rtol=1e-6, atol=1e-6)
    # telescoping: each row's total is its first valid step's reward; reward-to-go from step t is r_t
    for i in range(shape[0]):
        idx = np.flatnonzero(mask[i])
        total = r[i, idx[0]] if len(idx) else 0.0
        np.testing.assert_allclose(d[i].sum(), total, rtol=1e-5, atol=1e-6)
        for j in idx:
            np.testing.assert_allclose(d[i, j:].sum(), r[i, j], rtol=1e-5, atol=1e-6)
    assert (d[~mask] == 0).all()
    np.testing.assert_array_equal(np.asarray(PR.transform_process_rewards(r, mask, "delta")), d)
    np.testing.assert_array_equal(np.asarray(PR.transform_process_rewards(r, mask, "none")),
                                  np.where(mask, r, 0.0))


def test_shape_process_rewards_turn_and_token_granularity():
    """Turn granularity = loops: sum each turn's agent-token rewards, transform over the valid
    turns, put each turn's value on its turn-end token; token granularity = the plain transform."""
    rng = np.random.default_rng(9)
    b, k, a, o = 3, 4, 3, 2
    t = 1 + k * (a + o)
    lengths = np.array([4, 2, 0])
    turn_valid = np.arange(k)[None] < lengths[:, None]
    mask = np.zeros((b, t), bool)
    turn_end = np.zeros((b, t), bool)
    turn_ids = np.full((b, t), -1, np.int32)
    for i in range(b):
        for j in range(lengths[i]):
            s0 = 1 + j * (a + o)
            n_act = rng.integers(1, a + 1)
            mask[i, s0:s0 + n_act] = True
            turn_end[i, s0 + n_act - 1] = True
            turn_ids[i, s0:s0 + a + o] = j
    r = np.where(mask, rng.normal(size=(b, t)), 0.0).astype(np.float32)
    for kind, ref_fn in (("clip", lambda x, m: np_clip(x, m, 0.2)), ("delta", np_delta),
                         ("none", lambda x, m: np.where(m, x, 0.0))):
        per_turn = np.zeros((b, k))
        for i in range(b):
            for j in range(t):
                if mask[i, j]:
                    per_turn[i, turn_ids[i, j]] += r[i, j]
        per_turn = ref_fn(per_turn, turn_valid)
        expected = np.zeros((b, t))
        for i in range(b):
            for j in range(t):
                if turn_end[i, j]:
                    expected[i, j] = per_turn[i, turn_ids[i, j]]
        got = PR.shape_process_rewards(r, mask, turn_ids, turn_end, turn_valid, kind=kind, eta=0.2,
                                       granularity="turn")
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
        got_tok = PR.shape_process_rewards(r, mask, turn_ids, turn_end, turn_valid, kind=kind,
                                           eta=0.2, granularity="token")
        np.testing.assert_allclose(np.asarray(got_tok), ref_fn(r, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="granularity"):
        PR.shape_process_rewards(r, mask, turn_ids, turn_end, turn_valid, granularity="episode")


def test_transform_validation():
    r = np.zeros((2, 3), np.float32)
    m = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="kind"):
        PR.transform_process_rewards(r, m, "square")
    with pytest.raises(ValueError, match="eta"):
        PR.clip_process_rewards(r, m, "median")
    with pytest.raises(ValueError, match="shapes"):
        PR.delta_process_rewards(r, m[:, :2])


# ---------------------------------------------------------------------------- reward hacking
# A toy PRM that gives every correct-looking step a positive reward: useful steps 0.6 / 0.7, the
# final answer 0.8, and "useless" restatement steps 0.3 each. Both episodes are correct
# (outcome 1.0); the padded one inserts three useless turns.
USEFUL = [0.6, 0.7, 0.8]
PAD_STEP = 0.3
OUTCOME = 1.0


def _episodes(where: str):
    concise = list(USEFUL)
    if where == "end":          # useless steps just before the answer
        padded = USEFUL[:2] + [PAD_STEP] * 3 + USEFUL[2:]
    elif where == "middle":
        padded = USEFUL[:1] + [PAD_STEP] * 3 + USEFUL[1:]
    else:                       # "start": useless steps first
        padded = [PAD_STEP] * 3 + USEFUL
    k = max(len(concise), len(padded)) + 2
    r = np.zeros((2, k), np.float32)
    valid = np.zeros((2, k), bool)
    r[0, :len(concise)], valid[0, :len(concise)] = concise, True
    r[1, :len(padded)], valid[1, :len(padded)] = padded, True
    return r, valid


def _returns(transformed, valid):
    """Undiscounted return from first principles: outcome + Σ of the (transformed) step rewards."""
    return [OUTCOME + sum(float(transformed[i, j]) for j in range(transformed.shape[1]) if valid[i, j])
            for i in range(transformed.shape[0])]


def _token_layout(r_turn, valid_turn, action_len=3, obs_len=2, prompt=2):
    """Spread the per-turn rewards onto a token row: each turn = action tokens (reward on its last
    one) then observation tokens; the process-reward mask is the turn-end tokens."""
    b, k = r_turn.shape
    t = prompt + k * (action_len + obs_len)
    r = np.zeros((b, t), np.float32)
    m = np.zeros((b, t), bool)
    for i in range(b):
        for j in range(k):
            if valid_turn[i, j]:
                pos = prompt + j * (action_len + obs_len) + action_len - 1
                r[i, pos], m[i, pos] = r_turn[i, j], True
    return r, m


@pytest.mark.parametrize("where", ["end", "middle", "start"])
@pytest.mark.parametrize("granularity", ["turn", "token"])
def test_clip_and_delta_remove_the_incentive_to_pad(where, granularity):
    r, valid = _episodes(where)
    if granularity == "token":
        r, valid = _token_layout(r, valid)
    raw = _returns(np.where(valid, r, 0.0), valid)
    assert raw[1] > raw[0] + 0.5           # unbounded step rewards: padding pays (+0.9)
    for eta in ("mean", 0.0, 0.5):
        c = np.asarray(PR.clip_process_rewards(r, valid, eta))
        ret = _returns(c, valid)
        assert ret[0] >= ret[1], (eta, ret)
        assert (c <= 0).all()
    c = _returns(np.asarray(PR.clip_process_rewards(r, valid, "mean")), valid)
    assert c[0] > c[1]                      # with η = mean step reward padding strictly loses
    d = np.asarray(PR.delta_process_rewards(r, valid))
    ret = _returns(d, valid)
    assert ret[0] >= ret[1], ret
    first = [r[i][valid[i]][0] for i in range(2)]
    np.testing.assert_allclose(ret, [OUTCOME + f for f in first], rtol=1e-6)
