"""BC / SFT warm start, filtered BC and RAFT (``rl_agents.bc``).

Demos are checked against an independent replay: each stored row is walked by the turn grammar
(prompt; per turn an action up to its ``<eos>``, then the env's observation) while the env is
stepped with the parsed actions, so the expected loss mask, rewards and success come from the
env, not from the rollout code. Losses are checked against NumPy, selections against Python.
Tiny models (d_model 32, one layer) on ``guess_number`` with n = 8 (3 questions + 1 answer,
6 turns) keep the whole file well under two minutes on a shared 2-core CPU.
"""
import math
import re
import types

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
import models
from envs import vocab
from rl_agents import bc
from rl_agents.rollout import rollout
from rl_agents.sampling import SamplingConfig

# task -> (action regex, observation regex) over ``vocab.decode`` text
GRAMMAR = {
    "guess_number": (r"(< \d+ \?|<answer> \d+) <eos>", r"<obs> (<yes>|<no>|<err>)"),
    "kv_search": (r"(<search> [a-z] \d [a-z]|<answer> [a-z] \d) <eos>",
                  r"<obs> (<result> ([a-z] \d|<no>)|<yes>|<no>|<err>)"),
}


_ENVS = {}
_FNS = {}
SFT_LOSS = jax.jit(bc.sft_loss, static_argnums=0)
SFT_LOSS_GRAD = jax.jit(jax.value_and_grad(bc.sft_loss, argnums=1), static_argnums=0)


_APPLY = jax.jit(lambda model, params, tokens: model.apply({"params": params}, tokens), static_argnums=0)


def logits_of(model, params, tokens):
    """Plain causal forward pass (positions arange(T), no segment ids), jitted."""
    return _APPLY(model, params, jnp.asarray(tokens))


def gn_env():
    """One shared ``guess_number`` (n = 8) instance, so jitted replays compile once."""
    if "gn" not in _ENVS:
        _ENVS["gn"] = envs.make("guess_number", n=8)
    return _ENVS["gn"]


def env_fns(env):
    """Jitted, vmapped reset / step / oracle of ``env`` (cached per instance)."""
    if id(env) not in _FNS:
        _FNS[id(env)] = (env, jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step)),
                         jax.jit(jax.vmap(env.oracle_action)))
    return _FNS[id(env)][1:]


def tiny_model(env):
    cfg = models.ModelConfig(vocab_size=vocab.size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             d_ff=64, max_seq_len=env.max_episode_tokens, attention_impl="xla")
    model = models.PolicyModel(cfg)
    return model, models.init_params(model, jax.random.PRNGKey(0))


def demo_reset_keys(key, n):
    """The reset keys ``run_episodes`` derives for ``n`` groups of one episode."""
    return jax.random.split(jax.random.split(key)[0], n)


def replay(env, traj, reset_keys):
    """Independent replay of every row of ``traj`` (see the module doc). Returns a dict of
    per-row expected ``loss_mask`` [B,T], ``episode_return`` [B], ``success`` [B], ``turns`` [B],
    ``prompt_len`` [B], and per-turn lists of (active rows, parsed actions, oracle actions)."""
    reset, step, oracle = env_fns(env)
    tokens = np.asarray(traj.tokens)
    b, t = tokens.shape
    a = env.action_len
    state, ts = reset(reset_keys)
    prompt = np.asarray(ts.observation)
    cursor = (prompt != vocab.PAD).sum(1)
    prompt_len = cursor.copy()
    for i in range(b):
        np.testing.assert_array_equal(tokens[i, :cursor[i]], prompt[i, :cursor[i]])
    mask = np.zeros((b, t), bool)
    done = np.zeros(b, bool)
    ret = np.zeros(b, np.float64)
    success = np.zeros(b, bool)
    turns = np.zeros(b, int)
    per_turn = []
    okeys = jax.random.split(jax.random.PRNGKey(0), b)
    for _ in range(env.max_turns):
        active = ~done
        if not active.any():
            break
        expert = np.asarray(oracle(state, okeys))
        actions = np.full((b, a), vocab.PAD, np.int32)
        for i in np.flatnonzero(active):
            seg = tokens[i, cursor[i]:cursor[i] + a]
            ends = np.flatnonzero(seg == vocab.EOS)
            assert len(ends), f"row {i}: no <eos> within {a} tokens of an action: {seg}"
            n = ends[0] + 1
            actions[i, :n] = seg[:n]
            mask[i, cursor[i]:cursor[i] + n] = True
            cursor[i] += n
        state, ts = step(state, jnp.asarray(actions))
        obs = np.asarray(ts.observation)
        for i in np.flatnonzero(active):
            o = obs[i][obs[i] != vocab.PAD]
            np.testing.assert_array_equal(tokens[i, cursor[i]:cursor[i] + len(o)], o)
            cursor[i] += len(o)
        ret += np.where(active, np.asarray(ts.reward, np.float64), 0.0)
        success |= active & np.asarray(ts.info["success"])
        turns += active
        done |= active & np.asarray(ts.terminated | ts.truncated)
        per_turn.append((active, actions, expert))
    assert done.all()
    np.testing.assert_array_equal(cursor, np.asarray(traj.valid).sum(1))
    return dict(loss_mask=mask, episode_return=ret, success=success, turns=turns, per_turn=per_turn,
                prompt_len=prompt_len)


def runs(mask_row):
    """Maximal [start, stop) runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate([[0], mask_row.astype(int), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def seq_logp_np(logits, tokens):
    """NumPy float64: entry t = log softmax(logits[t-1])[tokens[t]], entry 0 = 0."""
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    tokens = np.asarray(tokens)
    out = np.zeros(tokens.shape)
    for t in range(1, tokens.shape[1]):
        out[:, t] = x[np.arange(len(tokens)), t - 1, tokens[:, t]] - lse[:, t - 1]
    return out


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gn():
    env = gn_env()
    model, params = tiny_model(env)
    return env, model, params


GN_DEMO_KEY = jax.random.PRNGKey(1)


@pytest.fixture(scope="module")
def gn_demos(gn):
    env, _, _ = gn
    return bc.collect_demos(env, GN_DEMO_KEY, 128, 0.0)


NOISY_KEY, NOISY_EPS, NOISY_N = jax.random.PRNGKey(8), 0.6, 256


@pytest.fixture(scope="module")
def noisy_demos():
    """ε = 0.6 demos drawn with the demo key that ``warm_start(NOISY_KEY)`` uses."""
    return bc.collect_demos(gn_env(), jax.random.split(NOISY_KEY)[0], NOISY_N, NOISY_EPS)


@pytest.fixture(scope="module")
def half_trained(gn, gn_demos):
    """4 epochs of SFT: a policy that is sometimes right (for RAFT) — and the first stage of
    ``trained``."""
    env, model, params = gn
    arrays = bc.dataset_arrays(bc.to_dataset(gn_demos))
    new, metrics = bc.sft_train(model, params, arrays, jax.random.PRNGKey(2), epochs=4,
                                batch_size=16, lr=1e-2)
    return new, metrics, arrays


@pytest.fixture(scope="module")
def trained(gn, half_trained):
    """25 epochs of SFT on 128 oracle demos in all (4 + 21)."""
    env, model, _ = gn
    half, _, arrays = half_trained
    new, metrics = bc.sft_train(model, half, arrays, jax.random.PRNGKey(3), epochs=21,
                                batch_size=16, lr=1e-2)
    return new, metrics, arrays


@pytest.fixture(scope="module")
def greedy_success(gn):
    env, model, _ = gn
    run = jax.jit(lambda p, k: rollout(env, model, p, k, num_groups=64,
                                       sampling=SamplingConfig(greedy=True)))
    return lambda params: float(run(params, jax.random.PRNGKey(99)).success.mean())


# ---------------------------------------------------------------------------- collect_demos
@pytest.mark.parametrize("name", ["guess_number", "kv_search"])
def test_oracle_demos_succeed_mask_only_actions_and_replay(name):
    env = gn_env() if name == "guess_number" else envs.make(name)
    key, b = jax.random.PRNGKey(7), 24
    traj = bc.collect_demos(env, key, b, epsilon=0.0)
    assert traj.tokens.shape == (b, env.max_episode_tokens)
    assert bool(traj.success.all())
    rep = replay(env, traj, demo_reset_keys(key, b))
    tokens, valid, mask = (np.asarray(x) for x in (traj.tokens, traj.valid, traj.loss_mask))
    # the loss mask is exactly the agent's action tokens found by the turn grammar
    np.testing.assert_array_equal(mask, rep["loss_mask"])
    # every action was the oracle's (ε = 0)
    for active, acts, expert in rep["per_turn"]:
        np.testing.assert_array_equal(acts[active], expert[active])
    np.testing.assert_allclose(np.asarray(traj.episode_return), rep["episode_return"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(traj.success), rep["success"])
    assert rep["success"].all()
    np.testing.assert_array_equal(np.asarray(traj.episode_length), rep["turns"])
    # text view: masked runs are commands ending in <eos>; the rest after the prompt is
    # observations; the mask never covers <pad>, <obs>, <task> or the prompt
    act_re, obs_re = (re.compile(rf"^{g}$") for g in GRAMMAR[name])
    for i in range(b):
        n = valid[i].sum()
        assert valid[i, :n].all() and not valid[i, n:].any()
        assert (tokens[i, n:] == vocab.PAD).all() and not mask[i, n:].any()
        assert not np.isin(tokens[i][mask[i]], [vocab.PAD, vocab.OBS, vocab.TASK]).any()
        spans = runs(mask[i])
        assert len(spans) == rep["turns"][i]
        for j, (s, e) in enumerate(spans):
            assert act_re.match(vocab.decode(tokens[i, s:e])), vocab.decode(tokens[i, s:e])
            stop = spans[j + 1][0] if j + 1 < len(spans) else n
            assert obs_re.match(vocab.decode(tokens[i, e:stop])), vocab.decode(tokens[i, e:stop])
        assert spans[0][0] == rep["prompt_len"][i] > 0 and tokens[i, 0] == vocab.TASK


def test_epsilon_perturbs_that_fraction_of_turns_and_success_follows_binomial(gn_demos, noisy_demos):
    """guess_number n = 8: the oracle needs 4 turns of the 6; a perturbed turn is (almost
    always) a format error that wastes a turn without changing the state, so the success rate
    is P(Binomial(6, 1 − ε) ≥ 4): 1 at ε = 0, 0.157 at ε = 0.6."""
    env = gn_env()
    need, k = 4, env.max_turns
    rates = []
    cases = ((0.0, GN_DEMO_KEY, gn_demos), (NOISY_EPS, jax.random.split(NOISY_KEY)[0], noisy_demos))
    for eps, key, traj in cases:
        b = traj.tokens.shape[0]
        rep = replay(env, traj, demo_reset_keys(key, b))
        np.testing.assert_array_equal(np.asarray(traj.loss_mask), rep["loss_mask"])
        np.testing.assert_array_equal(np.asarray(traj.success), rep["success"])
        np.testing.assert_allclose(np.asarray(traj.episode_return), rep["episode_return"], atol=1e-5)
        perturbed = sum(int((acts != expert).any(-1)[active].sum()) for active, acts, expert in rep["per_turn"])
        taken = sum(int(active.sum()) for active, _, _ in rep["per_turn"])
        assert abs(perturbed / taken - eps) < 0.05, (eps, perturbed, taken)
        expected = sum(math.comb(k, j) * (1 - eps) ** j * eps ** (k - j) for j in range(need, k + 1))
        rate = float(traj.success.mean())
        assert abs(rate - expected) < 0.08, (eps, rate, expected)
        rates.append(rate)
        # rows draw independent keys: many distinct episodes
        assert len({tuple(r) for r in np.asarray(traj.tokens)}) >= 8
    assert perturbed > 0 and rates[0] == 1.0 and rates[1] < 0.3


def test_collect_demos_validates():
    env = gn_env()
    for bad in (-0.1, 1.5, float("nan"), "0.2", None):
        with pytest.raises(ValueError, match="epsilon"):
            bc.collect_demos(env, jax.random.PRNGKey(0), 4, epsilon=bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_episodes"):
            bc.collect_demos(env, jax.random.PRNGKey(0), bad)


# -------------------------------------------------------------------------------- datasets
def test_to_dataset_columns_dtypes_and_round_trip(noisy_demos):
    demos = noisy_demos                       # mixed success, varied returns
    assert 0 < float(demos.success.mean()) < 1
    ds = bc.to_dataset(demos)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == list(bc.DATASET_COLUMNS)
    b, t = demos.tokens.shape
    assert ds.num_rows == b
    assert ds.features["episode_return"].dtype.startswith("float")
    assert ds.features["success"].dtype == "bool"
    assert all(len(r) == t for r in ds["tokens"]) and all(len(r) == t for r in ds["loss_mask"])
    arr = bc.dataset_arrays(ds)
    for c in bc.DATASET_COLUMNS:
        src = np.asarray(getattr(demos, c))
        assert arr[c].shape == src.shape, c
        np.testing.assert_array_equal(arr[c], src, err_msg=c)
    assert arr["tokens"].dtype.kind == "i" and arr["episode_return"].dtype.kind == "f"
    assert arr["valid"].dtype == bool and arr["loss_mask"].dtype == bool and arr["success"].dtype == bool
    # a selected subset reads back as the same rows
    idx = [5, 0, 77]
    sub = bc.dataset_arrays(ds.select(idx))
    np.testing.assert_array_equal(sub["tokens"], np.asarray(demos.tokens)[idx])
    with pytest.raises(ValueError, match="loss_mask"):
        bc.dataset_arrays(ds.remove_columns(["loss_mask"]))


def synthetic_dataset(seed=0, n=60, t=7):
    rng = np.random.default_rng(seed)
    cols = dict(tokens=rng.integers(0, vocab.size, (n, t)).astype(np.int32),
                valid=rng.random((n, t)) < 0.8, loss_mask=rng.random((n, t)) < 0.3,
                episode_return=rng.choice(np.float32([-0.3, -0.1, 0.0, 0.25, 0.5, 0.97, 1.0]), n),
                success=rng.random(n) < 0.4)
    return bc.to_dataset(types.SimpleNamespace(**cols)), cols


@pytest.mark.parametrize("success_only,min_return", [
    (True, None), (False, 0.25), (True, 0.5), (False, None), (False, -0.1), (True, 0.97)])
def test_filter_dataset_matches_numpy(success_only, min_return):
    ds, cols = synthetic_dataset()
    ret = cols["episode_return"].astype(np.float64)
    if min_return is not None:   # thresholds equal to a stored value: ties are kept (≥)
        min_return = float(np.float32(min_return))
        assert (ret == min_return).any()
    keep = np.ones(len(ret), bool)
    if success_only:
        keep &= cols["success"]
    if min_return is not None:
        keep &= ret >= min_return
    assert 0 < keep.sum()
    out = bc.dataset_arrays(bc.filter_dataset(ds, success_only=success_only, min_return=min_return))
    for c in bc.DATASET_COLUMNS:
        np.testing.assert_array_equal(out[c], cols[c][keep], err_msg=c)


def test_filter_dataset_empty_raises():
    ds, cols = synthetic_dataset()
    with pytest.raises(ValueError, match="no episodes"):
        bc.filter_dataset(ds, min_return=1.5)
    ds2 = bc.to_dataset(types.SimpleNamespace(**{**cols, "success": np.zeros(60, bool)}))
    with pytest.raises(ValueError, match="success_only=True"):
        bc.filter_dataset(ds2, success_only=True)


# ------------------------------------------------------------------------------------- SFT
def test_sft_loss_matches_numpy(gn, gn_demos, half_trained):
    env, model, params = gn
    tokens = jnp.asarray(gn_demos.tokens[:6])
    valid = jnp.asarray(gn_demos.valid[:6])
    rng = np.random.default_rng(0)
    masks = {"agent": np.asarray(gn_demos.loss_mask[:6]),
             "random": (rng.random(tokens.shape) < 0.4) & np.asarray(valid) & (np.arange(tokens.shape[1]) > 0),
             "one_token": np.eye(tokens.shape[0], tokens.shape[1], k=12, dtype=bool)}
    for p in (params, half_trained[0]):
        # plain forward pass (no segment ids): with left-aligned rows it equals the padded one
        # on every real token
        lp = seq_logp_np(logits_of(model, p, tokens), tokens)
        for name, m in masks.items():
            ref = -(lp * m).sum() / m.sum()
            got = float(SFT_LOSS(model, p, tokens, valid, jnp.asarray(m)))
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), name
    empty = jnp.zeros(tokens.shape, bool)
    assert float(SFT_LOSS(model, params, tokens, valid, empty)) == 0.0


def test_chunked_sft_loss_equals_the_full_logits_one(gn, gn_demos):
    """bc.logprob_chunk > 0 (no [B,T,V] logits) gives the same loss and gradient as the full
    logits, for chunks that do and do not divide T−1."""
    env, model, params = gn
    args = [jnp.asarray(getattr(gn_demos, c)[:6]) for c in ("tokens", "valid", "loss_mask")]
    full, g_full = jax.value_and_grad(lambda p: bc.sft_loss(model, p, *args))(params)
    for chunk in (7, 128):
        got, g = jax.value_and_grad(lambda p: bc.sft_loss(model, p, *args, chunk))(params)
        assert float(got) == pytest.approx(float(full), rel=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_sft_train_full_batch_step_is_one_clipped_adam_step(gn, gn_demos):
    """epochs = 1, batch_size = N: one Adam step from zero moments on the clipped gradient of
    the token-mean loss over all N rows: Δθ = −lr · ĝ / (|ĝ| + 1e-8), ĝ = g · min(1, 1/‖g‖)."""
    env, model, params = gn
    n, lr = 8, 3e-3
    arrays = {c: np.asarray(getattr(gn_demos, c))[:n] for c in ("tokens", "valid", "loss_mask")}
    new, metrics = bc.sft_train(model, params, arrays, jax.random.PRNGKey(3), epochs=1,
                                batch_size=n, lr=lr)
    loss, g = SFT_LOSS_GRAD(
        model, params, *(jnp.asarray(arrays[c]) for c in ("tokens", "valid", "loss_mask")))
    assert metrics["bc/sft_loss"] == [pytest.approx(float(loss), rel=1e-5)]
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
    norm = math.sqrt(sum((x ** 2).sum() for x in leaves))
    scale = min(1.0, 1.0 / norm)
    for p0, p1, gl in zip(jax.tree.leaves(params), jax.tree.leaves(new), leaves):
        gc = gl * scale
        delta = np.asarray(p1, np.float64) - np.asarray(p0, np.float64)
        big = np.abs(gc) > 1e-5      # tiny gradients: the sign is rounding-sensitive
        np.testing.assert_allclose(delta[big], (-lr * gc / (np.abs(gc) + 1e-8))[big], rtol=1e-3, atol=1e-7)
        assert (np.abs(delta) <= lr * (1 + 1e-4)).all()


def test_sft_train_learns_guess_number(gn, half_trained, trained, greedy_success):
    env, model, params = gn
    half, half_metrics, arrays = half_trained
    new, metrics, _ = trained
    hist = half_metrics["bc/sft_loss"] + metrics["bc/sft_loss"]
    assert len(hist) == 25 and all(np.isfinite(hist))
    assert all(b < a for a, b in zip(hist[:4], hist[1:4])), hist     # steady at the start
    assert hist[-1] < 0.01 * hist[0], hist
    data = [jnp.asarray(arrays[c]) for c in ("tokens", "valid", "loss_mask")]
    losses = [float(SFT_LOSS(model, p, *data)) for p in (params, half, new)]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.05 * losses[0], losses
    before, after = greedy_success(params), greedy_success(new)
    assert before < 0.3, before
    assert after >= 0.8, (before, after, hist)


def test_sft_train_cosine_decay_is_the_half_cosine_schedule(gn, gn_demos):
    """decay="cosine": lr_k = lr · ½(1 + cos(π k / K)) over all K = epochs · steps Adam steps —
    the same parameters as a hand-written schedule, and different ones from constant lr."""
    env, model, params = gn
    n, lr, epochs, bs = 16, 3e-3, 3, 4
    arrays = {c: np.asarray(getattr(gn_demos, c))[:n] for c in ("tokens", "valid", "loss_mask")}
    K = epochs * (n // bs)
    key = jax.random.PRNGKey(5)
    cos, _ = bc.sft_train(model, params, arrays, key, epochs=epochs, batch_size=bs, lr=lr,
                          decay="cosine")
    ref, _ = bc.sft_train(model, params, arrays, key, epochs=epochs, batch_size=bs,
                          lr=lambda k: lr * 0.5 * (1 + jnp.cos(jnp.pi * k / K)))
    const, _ = bc.sft_train(model, params, arrays, key, epochs=epochs, batch_size=bs, lr=lr)
    for a, b, c in zip(jax.tree.leaves(cos), jax.tree.leaves(ref), jax.tree.leaves(const)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    diff = max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(cos), jax.tree.leaves(const)))
    assert diff > 1e-4, diff
    with pytest.raises(ValueError, match="decay"):
        bc.sft_train(model, params, arrays, key, epochs=1, batch_size=bs, lr=lr, decay="linear")
    with pytest.raises(ValueError, match="number lr"):
        bc.sft_train(model, params, arrays, key, epochs=1, batch_size=bs, lr=lambda k: lr, decay="cosine")


def test_sft_train_validates(gn):
    env, model, params = gn
    arrays = dict(tokens=np.zeros((4, 9), np.int32), valid=np.ones((4, 9), bool),
                  loss_mask=np.ones((4, 9), bool))
    cases = [("batch_size", dict(batch_size=0)), ("batch_size", dict(batch_size=-2)),
             ("epochs", dict(epochs=0)), ("lr", dict(lr=0.0)), ("lr", dict(lr=float("inf"))),
             ("batch_size=5 exceeds", dict(batch_size=5))]
    for field, kw in cases:
        args = dict(epochs=1, batch_size=2, lr=1e-3) | kw
        with pytest.raises(ValueError, match=field):
            bc.sft_train(model, params, arrays, jax.random.PRNGKey(0), **args)
    with pytest.raises(ValueError, match="loss_mask"):
        bc.sft_train(model, params, {k: v for k, v in arrays.items() if k != "loss_mask"},
                     jax.random.PRNGKey(0), epochs=1, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match="shape"):
        bc.sft_train(model, params, arrays | {"valid": np.ones((4, 8), bool)},
                     jax.random.PRNGKey(0), epochs=1, batch_size=2, lr=1e-3)


# ------------------------------------------------------------------------------------ RAFT
def test_raft_select_matches_python():
    rng = np.random.default_rng(1)
    for g, size in ((5, 4), (3, 1), (1, 7)):
        r = rng.choice(np.float32([0.0, 0.5, 1.0]), g * size)      # many ties: first one wins
        traj = types.SimpleNamespace(episode_return=jnp.asarray(r))
        ref = [k * size + max(range(size), key=lambda j: (r[k * size + j], -j)) for k in range(g)]
        np.testing.assert_array_equal(np.asarray(bc.raft_select(traj, size)), ref)
    with pytest.raises(ValueError, match="group_size"):
        bc.raft_select(types.SimpleNamespace(episode_return=jnp.zeros(6)), 4)
    with pytest.raises(ValueError, match="group_size"):
        bc.raft_select(types.SimpleNamespace(episode_return=jnp.zeros(6)), 0)


def test_raft_round_keeps_each_groups_best_success_and_raises_its_likelihood(gn, half_trained,
                                                                           monkeypatch):
    """From a half-trained policy (sampled successes ≈ 10%): the round keeps, of each group, its
    first best-return row, and only when it is a success (guess_number: a success out-scores
    any failure, so exactly the groups with a success); SFT on them raises their likelihood."""
    env, model, _ = gn
    params = half_trained[0]
    seen, sft_inputs = [], []
    select, train = bc.raft_select, bc.sft_train
    monkeypatch.setattr(bc, "raft_select", lambda traj, g: seen.append(traj) or select(traj, g))
    monkeypatch.setattr(bc, "sft_train", lambda m, p, arrays, k, **kw: sft_inputs.append((arrays, kw))
                        or train(m, p, arrays, k, **kw))
    groups, size = 16, 8
    sampling = SamplingConfig(temperature=1.0)
    new, metrics = bc.raft_round(env, model, params, jax.random.PRNGKey(21), num_groups=groups,
                                 group_size=size, sampling=sampling, epochs=4, batch_size=2, lr=3e-3)
    (traj,) = seen    # the rollout the round drew (selection is recomputed below, in Python)
    assert traj.tokens.shape == (groups * size, env.max_episode_tokens)
    np.testing.assert_array_equal(np.asarray(traj.group_ids), np.repeat(np.arange(groups), size))
    ret = np.asarray(traj.episode_return).reshape(groups, size)
    succ = np.asarray(traj.success).reshape(groups, size)
    assert 0 < succ.mean() < 0.5, "the test wants a mixed sample"
    best = [int(np.flatnonzero(ret[k] == ret[k].max())[0]) for k in range(groups)]
    chosen = [k * size + best[k] for k in range(groups) if succ[k, best[k]]]
    assert [c // size for c in chosen] == [k for k in range(groups) if succ[k].any()]
    assert metrics["raft/kept"] == len(chosen) >= 2
    (arrays, kw), = sft_inputs                 # SFT ran on exactly those rows, in group order
    for c in bc.DATASET_COLUMNS:
        np.testing.assert_array_equal(arrays[c], np.asarray(getattr(traj, c))[chosen], err_msg=c)
    assert kw == dict(epochs=4, batch_size=2, lr=3e-3)
    assert metrics["raft/sample_success"] == pytest.approx(float(succ.mean()))
    hist = metrics["bc/sft_loss"]
    assert len(hist) == 4 and hist[-1] < hist[0], hist
    tokens, mask = (np.asarray(getattr(traj, c))[chosen] for c in ("tokens", "loss_mask"))

    def loglik(p):
        return (seq_logp_np(logits_of(model, p, tokens), tokens) * mask).sum(1)

    before, after = loglik(params), loglik(new)
    # the rows were sampled from ``params`` (τ = 1): their behaviour log-probs sum to ``before``
    np.testing.assert_allclose((np.asarray(traj.behaviour_logp)[chosen] * mask).sum(1), before,
                               rtol=1e-4, atol=1e-4)
    assert after.mean() > before.mean() + 0.3, (before, after)
    assert (after > before).mean() >= 0.7, (before, after)


def test_raft_round_validates(gn):
    env, model, params = gn
    base = dict(num_groups=2, group_size=2, sampling=SamplingConfig(), epochs=1, batch_size=2, lr=1e-3)
    for field, val in (("num_groups", 0), ("group_size", 0), ("epochs", 0), ("batch_size", 0), ("lr", -1.0)):
        with pytest.raises(ValueError, match=field):
            bc.raft_round(env, model, params, jax.random.PRNGKey(0), **(base | {field: val}))


# ------------------------------------------------------------------------------ warm start
def bc_cfg(**kw):
    return types.SimpleNamespace(**(dict(episodes=32, epsilon=0.2, success_only=False, epochs=2,
                                         batch_size=8, lr=1e-2) | kw))


@pytest.mark.parametrize("field,value", [
    ("episodes", 0), ("episodes", -4), ("epsilon", -0.01), ("epsilon", 1.2), ("epsilon", float("nan")),
    ("epochs", 0), ("batch_size", 0), ("batch_size", 33), ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")),
    ("decay", "linear")])
def test_warm_start_rejects_bad_config(gn, field, value, monkeypatch):
    env, model, params = gn

    def no_collect(*a, **kw):
        raise AssertionError("demos were collected before the config was checked")

    monkeypatch.setattr(bc, "collect_demos", no_collect)
    with pytest.raises(ValueError, match=rf"bc\.{field}"):
        bc.warm_start(env, model, params, jax.random.PRNGKey(0), bc_cfg(**{field: value}))


def test_warm_start_is_collect_filter_sft(gn, noisy_demos, monkeypatch):
    """warm_start(key) = sft_train(filter(to_dataset(collect_demos(k1))), k2) with
    (k1, k2) = split(key); demos are a deterministic function of the key (the ``noisy_demos``
    fixture drew them with k1 in an earlier call)."""
    env, model, params = gn
    cfg = bc_cfg(episodes=NOISY_N, epsilon=NOISY_EPS, success_only=True, epochs=2, batch_size=8)
    calls = {}
    collect, train = bc.collect_demos, bc.sft_train

    def spy_collect(*a, **kw):
        calls["demos"] = collect(*a, **kw)
        return calls["demos"]

    def spy_train(model_, params_, arrays, key_, **kw):
        calls["sft"] = (arrays, key_, kw)
        return train(model_, params_, arrays, key_, **kw)

    monkeypatch.setattr(bc, "collect_demos", spy_collect)
    monkeypatch.setattr(bc, "sft_train", spy_train)
    got, metrics = bc.warm_start(env, model, params, NOISY_KEY, cfg)
    _, k2 = jax.random.split(NOISY_KEY)
    demos = noisy_demos
    for x, y in zip(jax.tree.leaves(calls["demos"]), jax.tree.leaves(demos)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    succ = np.asarray(demos.success)
    assert 0.05 < succ.mean() < 0.5
    arrays, k_sft, kw = calls["sft"]
    assert kw == dict(epochs=2, batch_size=8, lr=1e-2, decay="constant", verbose=False,
                      adapters_only=False, logprob_chunk=0)
    np.testing.assert_array_equal(np.asarray(k_sft), np.asarray(k2))
    for c in bc.DATASET_COLUMNS:      # exactly the successful demos, in order
        np.testing.assert_array_equal(arrays[c], np.asarray(getattr(demos, c))[succ], err_msg=c)
    assert len(metrics["bc/sft_loss"]) == 2 and metrics["bc/sft_loss"][1] < metrics["bc/sft_loss"][0]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
    bc.warm_start(env, model, params, NOISY_KEY, bc_cfg(**{**vars(cfg), "decay": "cosine"}))
    assert calls["sft"][2]["decay"] == "cosine"          # bc.decay reaches sft_train
