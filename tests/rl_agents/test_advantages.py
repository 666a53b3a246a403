"""Advantage estimators vs. straightforward NumPy (Python-loop) references on random multi-turn
layouts: padding inside chunks, episodes ending mid-sequence, singleton / all-equal groups,
arbitrary non-contiguous group ids."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_agents.advantages import (ADVANTAGE_ESTIMATORS, AdvantageInputs, compute_advantages,
                                  estimator_hparams, needs_critic)

ATOL = 2e-5


# ------------------------------------------------------------------------------------------
# Random multi-turn batches (NumPy), independent of the code under test
# ------------------------------------------------------------------------------------------
def make_batch(seed, group_ids, *, K=4, A=4, O=3, P=3, hash_vocab=3, token_rewards=False,
               tail=2):
    """Rows: P prompt tokens, then K chunks of [A action slots | O observation slots]; each
    turn uses 1..A action slots (the rest are padding inside the chunk); episodes stop after
    1..K turns (no agent tokens after). Garbage values/rewards sit off the agent tokens."""
    rng = np.random.default_rng(seed)
    group_ids = np.asarray(group_ids, np.int32)
    B = len(group_ids)
    T = P + K * (A + O) + tail
    mask = np.zeros((B, T), bool)
    turn_end = np.zeros((B, T), bool)
    turn_ids = np.full((B, T), -1, np.int32)
    turn_rewards = np.zeros((B, K), np.float32)
    turn_valid = np.zeros((B, K), bool)
    rewards = rng.normal(size=(B, T)).astype(np.float32) * 5.0   # garbage off the agent tokens
    values = rng.normal(size=(B, T)).astype(np.float32)
    hashes = rng.integers(0, hash_vocab, size=(B, K)).astype(np.uint32)
    for b in range(B):
        n_turns = 1 + (b % K) if b < K else int(rng.integers(1, K + 1))
        for k in range(n_turns):
            start = P + k * (A + O)
            n_act = int(rng.integers(1, A + 1))
            mask[b, start:start + n_act] = True
            turn_end[b, start + n_act - 1] = True
            # turn id over the whole chunk (action, its padding, the observation)
            turn_ids[b, start:start + A + O] = k
            turn_valid[b, k] = True
            turn_rewards[b, k] = float(rng.choice([0.0, 1.0, -0.1, rng.normal()]))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = turn_rewards[b, turn_ids[b, t]] if turn_end[b, t] else 0.0
                if token_rewards:
                    r += 0.05 * rng.normal()
                rewards[b, t] = r
    episode_return = turn_rewards.sum(1)
    return dict(rewards=rewards, values=values, loss_mask=mask, turn_ids=turn_ids,
                turn_end=turn_end, group_ids=group_ids, turn_rewards=turn_rewards,
                turn_valid=turn_valid, turn_obs_hash=hashes, episode_return=episode_return)


def to_inputs(d):
    return AdvantageInputs(**{k: jnp.asarray(v) for k, v in d.items()})


GROUPS = [7, 7, 7, 100, -3, 100, 7, 42, 42, -3, 100, 5]   # arbitrary ids, shuffled, one singleton


# ------------------------------------------------------------------------------------------
# NumPy references
# ------------------------------------------------------------------------------------------
def ref_gae(d, gamma, lam):
    r, v, m = d["rewards"], d["values"], d["loss_mask"]
    A = np.zeros_like(r, dtype=np.float64)
    for b in range(r.shape[0]):
        next_v, next_a = 0.0, 0.0
        for t in reversed(np.nonzero(m[b])[0]):
            delta = r[b, t] + gamma * next_v - v[b, t]
            A[b, t] = delta + gamma * lam * next_a
            next_v, next_a = v[b, t], A[b, t]
    return A, (A + v) * m


def ref_turn_gae(d, gamma, lam, value_at="first"):
    """Turn GAE with V(s_k) read at turn k's first agent token (``value_at="first"``: the state
    before the turn) or, for comparisons, at its turn-end token (``"end"``)."""
    r, v, m, tid, te = (d[k] for k in ("rewards", "values", "loss_mask", "turn_ids", "turn_end"))
    A = np.zeros(r.shape)
    R = np.zeros(r.shape)
    for b in range(r.shape[0]):
        turns = []
        for t in range(r.shape[1]):
            if te[b, t] and m[b, t]:
                k = tid[b, t]
                own = [s for s in range(r.shape[1]) if m[b, s] and tid[b, s] == k]
                rk = sum(r[b, s] for s in own)
                turns.append((k, rk, v[b, own[0]] if value_at == "first" else v[b, t]))
        adv = [0.0] * len(turns)
        nxt_v, nxt_a = 0.0, 0.0
        for i in reversed(range(len(turns))):
            k, rk, vk = turns[i]
            adv[i] = rk + gamma * nxt_v - vk + gamma * lam * nxt_a
            nxt_v, nxt_a = vk, adv[i]
        for i, (k, rk, vk) in enumerate(turns):
            sel = m[b] & (tid[b] == k)
            A[b, sel] = adv[i]
            R[b, sel] = adv[i] + vk
    return A, R


def np_masked_whiten(x, m, eps=1e-8):
    vals = x[m]
    mean = vals.mean()
    var = ((vals - mean) ** 2).sum() / max(len(vals) - 1, 1)
    return np.where(m, (x - mean) / np.sqrt(var + eps), 0.0)


def ref_bilevel(d, gamma_turn, lam_turn, gamma, lam, whiten):
    """Transliteration of RAGEN's compute_bi_level_gae_advantage_return with its eos positions
    taken from turn_end (and separate λ for the turn level)."""
    r, v, m, te = d["rewards"], d["values"], d["loss_mask"], d["turn_end"]
    r = np.where(m, r, 0.0)
    B, T = r.shape
    adv = np.zeros((B, T))
    ret = np.zeros((B, T))
    upd = r.astype(np.float64).copy()
    for b in range(B):
        eos = [t for t in range(T) if te[b, t] and m[b, t]]
        last = 0.0
        for i in range(len(eos) - 1, -1, -1):
            cur = eos[i]
            nv = v[b, eos[i + 1]] if i < len(eos) - 1 else 0.0
            delta = upd[b, cur] + gamma_turn * nv - v[b, cur]
            last = delta + gamma_turn * lam_turn * last
            adv[b, cur] = last
        for pos in eos:
            upd[b, pos] = adv[b, pos] + v[b, pos]
        last = 0.0
        valid = [t for t in range(T) if m[b, t]]
        for i in range(len(valid) - 1, -1, -1):
            cur = valid[i]
            if cur not in eos:
                nv = v[b, valid[i + 1]]
            else:
                nv = 0.0
                last = 0.0
            delta = upd[b, cur] + gamma * nv - v[b, cur]
            last = delta + gamma * lam * last
            adv[b, cur] = last
            ret[b, cur] = last + v[b, cur]
    if whiten:
        adv = np_masked_whiten(adv, m)
    return adv, ret


def np_groups(ids):
    groups = {}
    for i, g in enumerate(ids):
        groups.setdefault(int(g), []).append(i)
    return groups


def ref_grpo_seq(ret, ids, eps=1e-6, ddof=1, use_std=True):
    out = np.zeros(len(ret))
    for members in np_groups(ids).values():
        x = ret[members].astype(np.float64)
        if len(members) == 1:
            continue
        a = x - x.mean()
        if use_std:
            a = a / (x.std(ddof=ddof) + eps)
        out[members] = a
    return out


def ref_rloo_seq(ret, ids):
    out = np.zeros(len(ret))
    for members in np_groups(ids).values():
        n = len(members)
        for i in members:
            if n > 1:
                out[i] = ret[i] - sum(ret[j] for j in members if j != i) / (n - 1)
    return out


def ref_rtg(d, gamma):
    r, m = d["rewards"], d["loss_mask"]
    G = np.zeros(r.shape)
    for b in range(r.shape[0]):
        acc = 0.0
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                acc = r[b, t] + gamma * acc
                G[b, t] = acc
    return G


def ref_gigpo(d, gamma, omega, norm, eps=1e-6):
    use_std = norm == "std"
    ret, ids = d["episode_return"], d["group_ids"]
    a_ep = ref_grpo_seq(ret, ids, eps=eps, use_std=use_std)
    B, K = d["turn_rewards"].shape
    disc = np.zeros((B, K))
    for b in range(B):
        for k in range(K):
            if d["turn_valid"][b, k]:
                disc[b, k] = sum(gamma ** (j - k) * d["turn_rewards"][b, j]
                                 for j in range(k, K) if d["turn_valid"][b, j])
    step_groups = {}
    for b in range(B):
        for k in range(K):
            if d["turn_valid"][b, k]:
                step_groups.setdefault((int(ids[b]), int(d["turn_obs_hash"][b, k])), []).append((b, k))
    a_step = np.zeros((B, K))
    for members in step_groups.values():
        x = np.array([disc[b, k] for b, k in members])
        if len(members) == 1:
            continue
        a = x - x.mean()
        if use_std:
            a = a / (x.std(ddof=1) + eps)
        for (b, k), ai in zip(members, a):
            a_step[b, k] = ai
    m, tid = d["loss_mask"], d["turn_ids"]
    A = np.zeros(m.shape)
    for b in range(B):
        for t in range(m.shape[1]):
            if m[b, t]:
                A[b, t] = a_ep[b] + omega * a_step[b, tid[b, t]]
    return A


def bcast(seq, m):
    return np.where(m, np.asarray(seq)[:, None], 0.0)


# ------------------------------------------------------------------------------------------
# Token-level / turn-level / bi-level GAE
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.9, 0.8), (2, 1.0, 1.0),
                                            (3, 0.0, 0.5)])
def test_gae_matches_reference(seed, gamma, lam):
    d = make_batch(seed, GROUPS, token_rewards=True)
    adv, ret = compute_advantages("gae", to_inputs(d), gamma=gamma, lam=lam)
    ra, rr = ref_gae(d, gamma, lam)
    np.testing.assert_allclose(adv, ra, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(ret, rr, atol=ATOL, rtol=1e-5)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32


def test_gae_lambda_one_is_reward_to_go_minus_value():
    """γ = λ = 1: A_t = Σ_{agent t' ≥ t} r_t' − V_t (the textbook Monte-Carlo identity)."""
    d = make_batch(4, GROUPS, token_rewards=True)
    adv, ret = compute_advantages("gae", to_inputs(d), gamma=1.0, lam=1.0)
    m = d["loss_mask"]
    expect = np.where(m, ref_rtg(d, 1.0) - d["values"], 0.0)
    np.testing.assert_allclose(adv, expect, atol=ATOL)
    np.testing.assert_allclose(ret, np.where(m, ref_rtg(d, 1.0), 0.0), atol=ATOL)


def test_gae_skips_observation_tokens_by_hand():
    """Two turns, obs tokens between: the recursion jumps from the last action token of turn 0
    to the first of turn 1; V after the final agent token is 0."""
    m = np.array([[0, 1, 1, 0, 0, 1, 0, 0]], bool)
    r = np.array([[9, 0, 1, 9, 9, 2, 9, 9]], np.float32)
    v = np.array([[5, .5, .25, 7, 7, 1., 7, 7]], np.float32)
    d = make_batch(0, [0])
    d.update(rewards=r, values=v, loss_mask=m, turn_end=np.array([[0, 0, 1, 0, 0, 1, 0, 0]], bool),
             turn_ids=np.array([[-1, 0, 0, 0, 0, 1, 1, -1]], np.int32))
    d["turn_rewards"], d["turn_valid"] = d["turn_rewards"][:, :2], d["turn_valid"][:, :2]
    d["turn_obs_hash"] = d["turn_obs_hash"][:, :2]
    g, l = 0.9, 0.5
    a5 = 2 - 1.0
    a2 = 1 + g * 1.0 - .25 + g * l * a5
    a1 = 0 + g * .25 - .5 + g * l * a2
    adv, ret = compute_advantages("gae", to_inputs(d), gamma=g, lam=l)
    np.testing.assert_allclose(adv[0], [0, a1, a2, 0, 0, a5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(ret[0], [0, a1 + .5, a2 + .25, 0, 0, a5 + 1, 0, 0], atol=1e-6)


@pytest.mark.parametrize("seed,gamma,lam", [(0, 0.99, 0.9), (1, 1.0, 1.0), (2, 0.5, 0.0)])
def test_turn_gae_matches_reference(seed, gamma, lam):
    d = make_batch(seed, GROUPS, token_rewards=seed == 1)
    adv, ret = compute_advantages("turn_gae", to_inputs(d), gamma=gamma, lam=lam)
    ra, rr = ref_turn_gae(d, gamma, lam)
    np.testing.assert_allclose(adv, ra, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(ret, rr, atol=ATOL, rtol=1e-5)
    # constant over each turn's agent tokens
    m, tid = d["loss_mask"], d["turn_ids"]
    for b in range(m.shape[0]):
        for k in set(tid[b][m[b]]):
            assert np.ptp(np.asarray(adv)[b][m[b] & (tid[b] == k)]) == 0
    # the value read at the turn end (it has seen the action) gives other advantages here
    assert not np.allclose(adv, ref_turn_gae(d, gamma, lam, value_at="end")[0], atol=1e-3)


def test_turn_gae_baseline_is_the_value_before_the_turn():
    """Changing the values anywhere but at a turn's first agent token leaves the advantages
    unchanged; changing the value at the first agent token moves exactly the advantage of that
    turn by −1 (λ = 0 isolates one turn: A_k = R_k + γV(s_{k+1}) − V(s_k))."""
    d = make_batch(3, GROUPS)
    m, tid = d["loss_mask"], d["turn_ids"]
    first = np.zeros_like(m)
    for b in range(m.shape[0]):
        for k in set(tid[b][m[b]]):
            first[b, np.nonzero(m[b] & (tid[b] == k))[0][0]] = True
    base, _ = compute_advantages("turn_gae", to_inputs(d), gamma=0.9, lam=0.0)
    other = dict(d, values=np.where(first, d["values"], d["values"] + 7.0).astype(np.float32))
    np.testing.assert_allclose(compute_advantages("turn_gae", to_inputs(other), gamma=0.9,
                                                  lam=0.0)[0], base, atol=1e-5)
    b, t = np.argwhere(first & (tid == 1))[0]
    bumped = dict(d, values=d["values"].copy())
    bumped["values"][b, t] += 1.0
    adv, _ = compute_advantages("turn_gae", to_inputs(bumped), gamma=0.9, lam=0.0)
    diff = np.asarray(adv) - np.asarray(base)
    turn1 = m[b] & (tid[b] == 1)
    np.testing.assert_allclose(diff[b, turn1], -1.0, atol=1e-5)
    turn0 = m[b] & (tid[b] == 0)
    np.testing.assert_allclose(diff[b, turn0], 0.9, atol=1e-5)   # γ·ΔV(s_1) in turn 0's δ
    diff[b, turn0 | turn1] = 0.0
    np.testing.assert_allclose(diff, 0.0, atol=1e-5)


def test_turn_gae_defaults_are_published_values():
    assert estimator_hparams("turn_gae") == {"gamma": 0.99, "lam": 0.9}
    d = make_batch(5, GROUPS)
    adv, _ = compute_advantages("turn_gae", to_inputs(d))
    np.testing.assert_allclose(adv, ref_turn_gae(d, 0.99, 0.9)[0], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("seed,kw", [
    (0, {}),
    (1, dict(gamma_turn=0.9, lam_turn=0.7, gamma_token=0.95, lam_token=0.8)),
    (2, dict(whiten=False)),
    (3, dict(whiten=False, gamma_turn=1.0)),
])
def test_bilevel_gae_matches_ragen_reference(seed, kw):
    d = make_batch(seed, GROUPS, token_rewards=True)
    full = dict(gamma_turn=0.95, lam_turn=1.0, gamma_token=1.0, lam_token=1.0, whiten=True)
    full.update(kw)
    adv, ret = compute_advantages("bilevel_gae", to_inputs(d), **kw)
    ra, rr = ref_bilevel(d, full["gamma_turn"], full["lam_turn"], full["gamma_token"],
                         full["lam_token"], full["whiten"])
    np.testing.assert_allclose(adv, ra, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ret, rr, atol=ATOL, rtol=1e-5)
    if full["whiten"]:
        a = np.asarray(adv)[d["loss_mask"]]
        assert abs(a.mean()) < 1e-5 and abs(a.std(ddof=1) - 1) < 1e-3


def test_bilevel_turn_end_token_carries_turn_advantage():
    """Without whitening, the turn-end token's advantage is the turn-level GAE advantage."""
    d = make_batch(6, GROUPS)
    adv, _ = compute_advantages("bilevel_gae", to_inputs(d), whiten=False, gamma_turn=0.9,
                                lam_turn=0.8)
    # turn-level GAE over turn ends (rewards sit only on turn ends here) = turn_gae's advantage
    ta, _ = ref_turn_gae(d, 0.9, 0.8, value_at="end")
    e = d["turn_end"] & d["loss_mask"]
    np.testing.assert_allclose(np.asarray(adv)[e], ta[e], atol=ATOL)


def test_bilevel_first_agent_token_is_against_the_value_before_the_turn():
    """γ_token = λ_token = 1, no whitening: a turn's first agent token f gets
    Σ_{f≤t<e} r_t + (A_turn + V_e) − V_f, V_f = values[f] = V(s_k); moving V_f by +1 moves
    exactly that token's advantage by −1."""
    d = make_batch(7, GROUPS, token_rewards=True)
    kw = dict(whiten=False, gamma_turn=0.9, lam_turn=0.8)
    adv = np.asarray(compute_advantages("bilevel_gae", to_inputs(d), **kw)[0])
    r, v, m, tid, te = (d[k] for k in ("rewards", "values", "loss_mask", "turn_ids", "turn_end"))
    checked, multi = 0, []
    for b in range(m.shape[0]):
        ends = np.nonzero(te[b] & m[b])[0]
        a_turn, nxt_v, nxt_a = {}, 0.0, 0.0       # turn level over the turn ends (RAGEN)
        for e in ends[::-1]:
            a_turn[e] = r[b, e] + 0.9 * nxt_v - v[b, e] + 0.9 * 0.8 * nxt_a
            nxt_v, nxt_a = v[b, e], a_turn[e]
        for k in set(tid[b][m[b]]):
            own = np.nonzero(m[b] & (tid[b] == k))[0]
            f, e = own[0], own[-1]
            assert te[b, e]
            want = r[b, own[:-1]].sum() + a_turn[e] + v[b, e] - v[b, f]
            np.testing.assert_allclose(adv[b, f], want, atol=1e-4)
            checked += 1
            if len(own) > 1:
                multi.append((b, f))
    assert checked > 10 and multi
    b, f = multi[0]
    bumped = dict(d, values=d["values"].copy())
    bumped["values"][b, f] += 1.0
    diff = np.asarray(compute_advantages("bilevel_gae", to_inputs(bumped), **kw)[0]) - adv
    assert np.nonzero(np.abs(diff) > 1e-5) == (np.array([b]), np.array([f]))
    np.testing.assert_allclose(diff[b, f], -1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Group-relative outcome estimators
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unbiased", [True, False])
def test_grpo_matches_reference(unbiased):
    d = make_batch(0, GROUPS)
    d["episode_return"][[4, 9]] = 0.5    # group -3: all equal → 0 (no NaN)
    adv, ret = compute_advantages("grpo", to_inputs(d), unbiased=unbiased)
    seq = ref_grpo_seq(d["episode_return"], d["group_ids"], ddof=1 if unbiased else 0)
    np.testing.assert_allclose(adv, bcast(seq, d["loss_mask"]), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(ret, adv)
    assert np.all(np.asarray(adv)[[4, 9]] == 0) and np.all(np.isfinite(adv))
    assert np.all(np.asarray(adv)[11] == 0)   # singleton group 5


def test_grpo_published_formula_two_member_group():
    """Rewards (1, 0): mean 0.5; unbiased std √0.5 → ±0.5/(√0.5+ε) ≈ ±0.7071 (TRL / verl's
    torch.std); population std 0.5 → ±0.5/(0.5+ε) ≈ ±1."""
    d = make_batch(0, [3, 3], K=2)
    d["episode_return"] = np.array([1.0, 0.0], np.float32)
    eps = 1e-6
    adv, _ = compute_advantages("grpo", to_inputs(d))
    m = d["loss_mask"]
    np.testing.assert_allclose(np.asarray(adv)[0][m[0]], 0.5 / (np.sqrt(0.5) + eps), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv)[1][m[1]], -0.5 / (np.sqrt(0.5) + eps), rtol=1e-6)
    adv, _ = compute_advantages("grpo", to_inputs(d), unbiased=False)
    np.testing.assert_allclose(np.asarray(adv)[0][m[0]], 0.5 / (0.5 + eps), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv)[1][m[1]], -0.5 / (0.5 + eps), rtol=1e-6)


def test_all_equal_groups_are_exactly_zero():
    """0.1 repeated is not exactly representable: a mean-then-subtract implementation leaves a
    rounding residue that eps would blow up; pairwise differences give exact zeros."""
    d = make_batch(1, [1, 1, 1, 2, 2, 2, 2])
    d["episode_return"][:] = 0.1
    for name in ("grpo", "dr_grpo", "rloo", "gigpo"):
        adv, _ = compute_advantages(name, to_inputs(d), **({"norm": "std"} if name == "gigpo" else {}))
        if name != "gigpo":
            assert np.all(np.asarray(adv) == 0), name
        assert np.all(np.isfinite(adv)), name


def test_dr_grpo_and_rloo_match_reference():
    d = make_batch(2, GROUPS)
    m = d["loss_mask"]
    adv, _ = compute_advantages("dr_grpo", to_inputs(d))
    np.testing.assert_allclose(adv, bcast(ref_grpo_seq(d["episode_return"], d["group_ids"],
                                                       use_std=False), m), atol=ATOL)
    adv, _ = compute_advantages("rloo", to_inputs(d))
    np.testing.assert_allclose(adv, bcast(ref_rloo_seq(d["episode_return"], d["group_ids"]), m),
                               atol=ATOL)
    # RLOO = n/(n−1) × Dr. GRPO within a group of size n
    d2 = make_batch(3, [0, 0, 0, 0])
    a_rloo, _ = compute_advantages("rloo", to_inputs(d2))
    a_dr, _ = compute_advantages("dr_grpo", to_inputs(d2))
    np.testing.assert_allclose(a_rloo, 4 / 3 * np.asarray(a_dr), atol=1e-5)


def test_rloo_hand_example():
    d = make_batch(0, [9, 9, 9, 4], K=2)
    d["episode_return"] = np.array([1.0, 0.0, 2.0, 5.0], np.float32)
    adv, _ = compute_advantages("rloo", to_inputs(d))
    first = np.asarray(adv)[np.arange(4), np.argmax(d["loss_mask"], 1)]
    np.testing.assert_allclose(first, [1 - 1.0, 0 - 1.5, 2 - 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_reference(gamma):
    d = make_batch(3, GROUPS, token_rewards=True)
    m = d["loss_mask"]
    adv, ret = compute_advantages("reinforce_pp", to_inputs(d), gamma=gamma)
    G = ref_rtg(d, gamma)
    np.testing.assert_allclose(adv, np_masked_whiten(G, m), atol=1e-4)
    np.testing.assert_allclose(ret, np.where(m, G, 0.0), atol=ATOL)


def test_reinforce_pp_baseline_matches_reference():
    d = make_batch(4, GROUPS, token_rewards=True)
    m = d["loss_mask"]
    adv, ret = compute_advantages("reinforce_pp_baseline", to_inputs(d))
    G = ref_rtg(d, 1.0)
    ids, er = d["group_ids"], d["episode_return"]
    gmean = np.array([er[ids == g].mean() for g in ids])
    np.testing.assert_allclose(adv, np_masked_whiten(G - gmean[:, None], m), atol=1e-4)
    np.testing.assert_allclose(ret, np.where(m, G, 0.0), atol=ATOL)


# ------------------------------------------------------------------------------------------
# GiGPO
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,kw", [(0, {}), (1, dict(norm="std")),
                                     (2, dict(gamma=0.8, omega=0.5)), (3, dict(gamma=1.0))])
def test_gigpo_matches_reference(seed, kw):
    d = make_batch(seed, GROUPS, hash_vocab=2)
    full = dict(gamma=0.95, omega=1.0, norm="mean")
    full.update(kw)
    adv, ret = compute_advantages("gigpo", to_inputs(d), **kw)
    expect = ref_gigpo(d, full["gamma"], full["omega"], full["norm"])
    np.testing.assert_allclose(adv, expect, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(ret, adv)


def test_gigpo_step_groups_hand_example():
    """Group {0,1}: both see hash 11 at turn 0 (a step group of 2), trajectory 0 sees 22 at
    turn 1 alone (0). Trajectory 2 (other group) also sees 11: not in the same step group."""
    d = make_batch(0, [0, 0, 1], K=2)
    d["turn_valid"] = np.array([[1, 1], [1, 0], [1, 0]], bool)
    d["turn_rewards"] = np.array([[0.0, 1.0], [0.5, 0.0], [3.0, 0.0]], np.float32)
    d["turn_obs_hash"] = np.array([[11, 22], [11, 22], [11, 11]], np.uint32)
    d["episode_return"] = d["turn_rewards"].sum(1)
    # rebuild token layout to match the turn structure above
    P, A, O = 3, 4, 3
    T = d["rewards"].shape[1]
    for key in ("loss_mask", "turn_end"):
        d[key] = np.zeros((3, T), bool)
    d["turn_ids"] = np.full((3, T), -1, np.int32)
    for b in range(3):
        for k in range(2):
            if d["turn_valid"][b, k]:
                s = P + k * (A + O)
                d["loss_mask"][b, s:s + 2] = True
                d["turn_end"][b, s + 1] = True
                d["turn_ids"][b, s:s + A + O] = k
    g = 0.95
    R00, R10 = 0.0 + g * 1.0, 0.5
    a_step00 = R00 - (R00 + R10) / 2
    a_ep = [1.0 - 0.75, 0.5 - 0.75, 0.0]
    adv, _ = compute_advantages("gigpo", to_inputs(d))
    adv = np.asarray(adv)
    s0, s1 = P, P + A + O
    np.testing.assert_allclose(adv[0, s0:s0 + 2], a_ep[0] + a_step00, atol=1e-6)
    np.testing.assert_allclose(adv[0, s1:s1 + 2], a_ep[0] + 0.0, atol=1e-6)   # alone → 0
    np.testing.assert_allclose(adv[1, s0:s0 + 2], a_ep[1] - a_step00, atol=1e-6)
    np.testing.assert_allclose(adv[2, s0:s0 + 2], 0.0, atol=1e-6)            # singleton
    assert np.all(adv[~d["loss_mask"]] == 0)


# ------------------------------------------------------------------------------------------
# Shared properties, registry and validation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_zero_outside_mask_finite_and_jittable(name):
    d = make_batch(7, GROUPS, token_rewards=True)
    x = to_inputs(d)
    adv, ret = compute_advantages(name, x)
    assert adv.shape == ret.shape == d["rewards"].shape
    assert np.all(np.asarray(adv)[~d["loss_mask"]] == 0)
    assert np.all(np.asarray(ret)[~d["loss_mask"]] == 0)
    assert np.all(np.isfinite(adv)) and np.all(np.isfinite(ret))
    jitted = jax.jit(functools.partial(compute_advantages, name))
    adv_j, ret_j = jitted(x)
    np.testing.assert_allclose(adv_j, adv, atol=1e-5)
    np.testing.assert_allclose(ret_j, ret, atol=1e-5)


def test_off_mask_inputs_are_ignored():
    d = make_batch(8, GROUPS, token_rewards=True)
    d2 = {k: v.copy() for k, v in d.items()}
    off = ~d["loss_mask"]
    d2["rewards"][off] = 123.0
    d2["values"][off] = -77.0
    for name in ("gae", "turn_gae", "bilevel_gae", "reinforce_pp"):
        a1, r1 = compute_advantages(name, to_inputs(d))
        a2, r2 = compute_advantages(name, to_inputs(d2))
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(r1, r2)


def test_needs_critic():
    assert {n for n in ADVANTAGE_ESTIMATORS if needs_critic(n)} == {"gae", "turn_gae", "bilevel_gae"}
    with pytest.raises(ValueError, match="gea"):
        needs_critic("gea")


def test_unknown_name_lists_registered():
    d = make_batch(0, [0, 0])
    with pytest.raises(ValueError, match="not registered.*'gae'.*'gigpo'"):
        compute_advantages("gpro", to_inputs(d))


def test_unknown_hparams_are_named():
    d = make_batch(0, [0, 0])
    with pytest.raises(ValueError, match=r"\['lambda'\].*'gae'"):
        compute_advantages("gae", to_inputs(d), gamma=1.0, **{"lambda": 0.9})
    with pytest.raises(ValueError, match=r"\['gamma'\]"):
        compute_advantages("grpo", to_inputs(d), gamma=1.0)


@pytest.mark.parametrize("name,kw,field", [
    ("gae", dict(gamma=1.5), "gamma"), ("gae", dict(lam=-0.1), "lam"),
    ("gigpo", dict(norm="median"), "norm"), ("grpo", dict(eps=0.0), "eps"),
    ("bilevel_gae", dict(whiten="yes"), "whiten"), ("turn_gae", dict(gamma="0.9"), "gamma"),
])
def test_bad_hparam_values(name, kw, field):
    d = make_batch(0, [0, 0])
    with pytest.raises(ValueError, match=field):
        compute_advantages(name, to_inputs(d), **kw)


def test_bad_input_shapes_are_named():
    d = make_batch(0, [0, 0, 1])
    d["group_ids"] = d["group_ids"][:2]
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", to_inputs(d))
    d = make_batch(0, [0, 0, 1])
    d["turn_valid"] = d["turn_valid"][:, :2]
    with pytest.raises(ValueError, match="turn_valid"):
        compute_advantages("gigpo", to_inputs(d))


def test_pallas_masked_gae_option():
    pk = pytest.importorskip("pallas_kernels")
    if not hasattr(pk, "masked_gae"):
        pytest.skip("pallas_kernels.masked_gae not available yet")
    d = make_batch(9, GROUPS, token_rewards=True)
    a1, r1 = compute_advantages("gae", to_inputs(d), gamma=0.99, lam=0.9)
    a2, r2 = compute_advantages("gae", to_inputs(d), gamma=0.99, lam=0.9, use_pallas=True)
    np.testing.assert_allclose(a2, a1, atol=1e-5)
    np.testing.assert_allclose(r2, r1, atol=1e-5)
