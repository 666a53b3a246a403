"""ArCHer: turn TD targets / advantages / boundary positions vs NumPy references, the replay ring
buffer vs a Python reference, the critic's TD fit on a fixed replay, and the jitted update."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from envs import vocab
from experiments.configs import recipes
from rl_agents import archer as ar
from rl_agents.rollout import assemble_trajectory
from rl_agents.trainer import make_trainer
from rl_agents.trainer import Trainer


def tiny_config(**archer):
    c = recipes.recipe("guess_number", "archer")
    c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, attention_impl="xla")
    c.rollout.update(num_groups=4, group_size=1)
    c.rl.update(epochs=1, minibatches=2, logprob_chunk=0)
    c.rl.archer.update({**dict(replay_episodes=6, critic_batch=4, critic_updates=2), **archer})
    c.bc.episodes = 0
    return c


# ----------------------------------------------------------------------------- references
def np_turn_targets(r, v, tv, gamma):
    b, k = r.shape
    y = np.zeros((b, k))
    for i in range(b):
        for j in range(k):
            if tv[i, j]:
                boot = v[i, j + 1] if j + 1 < k and tv[i, j + 1] else 0.0
                y[i, j] = r[i, j] + gamma * boot
    return y


def np_turn_advantages(r, v, tv, gamma, lam):
    b, k = r.shape
    a = np.zeros((b, k))
    for i in range(b):
        n = int(tv[i].sum())
        nxt = 0.0
        for j in reversed(range(n)):
            v_next = v[i, j + 1] if j + 1 < n else 0.0
            delta = r[i, j] + gamma * v_next - v[i, j]
            nxt = delta + gamma * lam * nxt
            a[i, j] = nxt
    return a


def random_turns(rng, b=7, k=5):
    lengths = rng.integers(0, k + 1, size=b)
    lengths[0], lengths[1] = k, 1                  # a full-length row and a one-turn row
    tv = np.arange(k)[None] < lengths[:, None]
    r = rng.normal(size=(b, k)).astype(np.float32)
    v = rng.normal(size=(b, k)).astype(np.float32)
    return r, v, tv


@pytest.mark.parametrize("gamma,lam", [(0.95, 0.0), (0.9, 0.7), (1.0, 1.0)])
def test_turn_targets_and_advantages_match_numpy(gamma, lam):
    rng = np.random.default_rng(0)
    r, v, tv = random_turns(rng)
    y = np.asarray(ar.turn_td_targets(r, v, tv, gamma))
    np.testing.assert_allclose(y, np_turn_targets(r, v, tv, gamma), rtol=1e-5, atol=1e-6)
    a = np.asarray(ar.turn_advantages(r, v, tv, gamma, lam))
    np.testing.assert_allclose(a, np_turn_advantages(r, v, tv, gamma, lam), rtol=1e-5, atol=1e-5)
    # padded turns: zero target and advantage whatever their reward / value; last turns do not
    # bootstrap (λ = 0: A = r − V there)
    assert not np.any(y[~tv]) and not np.any(a[~tv])
    n = tv.sum(1)
    rows = np.nonzero(n > 0)[0]
    last = n[rows] - 1
    np.testing.assert_allclose(y[rows, last], r[rows, last], rtol=1e-6)
    if lam == 0.0:
        np.testing.assert_allclose(a[rows, last], r[rows, last] - v[rows, last], rtol=1e-5,
                                   atol=1e-6)
        # one-step advantage = TD target − V on every valid turn
        np.testing.assert_allclose(np.where(tv, y - v, 0.0), a, rtol=1e-5, atol=1e-5)
    loss = float(ar.critic_td_loss(v, y, tv))
    np.testing.assert_allclose(loss, ((v - y)[tv] ** 2).mean(), rtol=1e-5)
    assert float(ar.critic_td_loss(v, y, np.zeros_like(tv))) == 0.0


def test_turn_state_positions_match_the_records():
    """V(s_k) is read at the last token before turn k's tokens: with the per-turn records of a
    rollout (random action / observation lengths incl. empty actions, episodes ending early,
    padded prompts) assembled into compact rows, pos_k = |prompt| + Σ_{j<k}(|a_j| + |o_j|) − 1."""
    import types

    rng = np.random.default_rng(1)
    b, k, a, o, p = 6, 4, 3, 3, 4
    env = types.SimpleNamespace(obs_len=o)
    n_turns = rng.integers(1, k + 1, size=b)
    n_turns[0] = k
    active = np.arange(k)[None] < n_turns[:, None]
    n_act = rng.integers(0, a + 1, size=(b, k))
    n_act[:, 0] = np.maximum(n_act[:, 0], 1)
    n_obs = rng.integers(0, o + 1, size=(b, k))
    n_prompt = rng.integers(1, p + 1, size=b)
    act_valid = (np.arange(a)[None, None] < n_act[..., None]) & active[..., None]
    obs_valid = (np.arange(o)[None, None] < n_obs[..., None]) & active[..., None]
    prompt_valid = np.arange(p)[None] < n_prompt[:, None]
    tok = lambda shape, m: np.where(m, rng.integers(2, vocab.size, size=shape), vocab.PAD)
    rec = dict(action=tok((b, k, a), act_valid), action_valid=act_valid,
               logp=np.zeros((b, k, a), np.float32), obs=tok((b, k, o), obs_valid),
               obs_valid=obs_valid, reward=rng.normal(size=(b, k)).astype(np.float32) * active,
               active=active, obs_hash=np.zeros((b, k), np.uint32),
               format_error=np.zeros((b, k), bool), success=np.zeros((b, k), bool),
               terminated=np.zeros((b, k), bool), truncated=np.zeros((b, k), bool))
    rec = {name: jnp.asarray(v) for name, v in rec.items()}
    prompt = jnp.asarray(tok((b, p), prompt_valid))
    traj = assemble_trajectory(env, prompt, jnp.asarray(prompt_valid), rec,
                               jnp.arange(b, dtype=jnp.int32))
    pos = np.asarray(ar.turn_state_positions(traj.valid, traj.turn_ids, k))
    n_act_kept = np.where(active, n_act, 0)
    for i in range(b):
        for j in range(n_turns[i]):
            want = n_prompt[i] + (n_act_kept[i, :j] + n_obs[i, :j]).sum() - 1
            assert pos[i, j] == want, (i, j, pos[i, j], want)
    # broadcasting the turn advantages reaches exactly the agent tokens of each turn
    adv = np.arange(1, k + 1, dtype=np.float32)[None].repeat(b, 0)
    mask, tid = np.asarray(traj.loss_mask), np.asarray(traj.turn_ids)
    got = np.asarray(ar.broadcast_turns(adv, traj.turn_ids, traj.loss_mask))
    np.testing.assert_array_equal(got, np.where(mask, tid + 1, 0))
    assert mask.sum() == n_act_kept.sum()
    # the PPO critics read the same state: turn_gae's V(s_k) is values[] (the head shifted by
    # one, trainer.sequence_values) at turn k's first agent token = the head at pos_k
    from rl_agents.advantages import per_turn_first
    head = rng.normal(size=traj.tokens.shape).astype(np.float32)
    shifted = np.concatenate([np.zeros((b, 1), np.float32), head[:, :-1]], axis=1)
    v_first = np.asarray(per_turn_first(jnp.asarray(shifted), traj.loss_mask, traj.turn_ids, k))
    has_agent = active & (n_act_kept > 0)
    np.testing.assert_array_equal(v_first[has_agent], np.take_along_axis(head, pos, 1)[has_agent])
    assert has_agent.sum() > b


# ----------------------------------------------------------------------------- replay buffer
def test_replay_ring_buffer_matches_python_reference():
    cap = 5
    example = dict(x=np.zeros((1, 3), np.int32), y=np.zeros((1,), np.float32))
    buf = ar.replay_init(example, cap)
    ref, ptr, size, counter = [None] * cap, 0, 0, 0
    for n in (3, 3, 2, 5, 1):
        rows = dict(x=np.arange(counter, counter + 3 * n, dtype=np.int32).reshape(n, 3),
                    y=np.arange(counter, counter + n, dtype=np.float32))
        counter += 3 * n
        buf = ar.replay_insert(buf, rows)
        for r in range(n):
            ref[ptr] = (rows["x"][r], rows["y"][r])
            ptr, size = (ptr + 1) % cap, min(size + 1, cap)
        assert (int(buf.ptr), int(buf.size)) == (ptr, size)
        for s in range(size):
            np.testing.assert_array_equal(np.asarray(buf.data["x"][s]), ref[s][0])
            assert float(buf.data["y"][s]) == ref[s][1]
    with pytest.raises(ValueError, match="capacity"):
        ar.replay_insert(buf, dict(x=np.zeros((6, 3), np.int32), y=np.zeros((6,), np.float32)))


def test_replay_sample_draws_only_filled_slots():
    buf = ar.replay_init(dict(x=np.zeros((1, 2), np.float32)), 8)
    buf = ar.replay_insert(buf, dict(x=np.arange(6, dtype=np.float32).reshape(3, 2)))
    rows, idx = ar.replay_sample(buf, jax.random.PRNGKey(0), 300)
    idx = np.asarray(idx)
    assert idx.min() >= 0 and idx.max() <= 2 and set(idx.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(np.asarray(rows["x"]), np.asarray(buf.data["x"])[idx])
    buf = ar.replay_insert(buf, dict(x=np.ones((7, 2), np.float32)))     # wraps: full
    _, idx = ar.replay_sample(buf, jax.random.PRNGKey(1), 400)
    assert set(np.asarray(idx).tolist()) == set(range(8))


# ----------------------------------------------------------------------------- critic fit
def test_critic_td_fits_known_values_on_a_fixed_replay():
    """Deterministic 1–2-turn episodes (the prompt token p fixes both rewards, the observation
    and the length): TD from the replay must drive V(s_0) → r_0 + γ·r_1 and V(s_1) → r_1."""
    gamma = 0.9
    trainer = make_trainer(tiny_config(critic_updates=1, critic_batch=16, replay_episodes=16,
                                       critic_lr=3e-3, tau=0.5))
    p = np.arange(2, 18) % 14 + 2                                          # 16 episodes
    r0 = (p % 3) / 2.0
    obs = (p * 7) % 8 + 2
    r1 = (obs % 2).astype(np.float64)
    two = p % 4 != 0
    b, t, k = len(p), 12, 3
    tokens = np.zeros((b, t), np.int32)
    tid = np.full((b, t), -1, np.int32)
    for i in range(b):
        seq = [(5, -1), (int(p[i]), -1), (3, 0), (vocab.EOS, 0), (int(obs[i]), 0), (4, 0)]
        if two[i]:
            seq += [(3, 1), (vocab.EOS, 1), (6, 1)]
        for j, (tok, tt) in enumerate(seq):
            tokens[i, j], tid[i, j] = tok, tt
    valid = tokens != 0
    tv = np.stack([np.ones(b, bool), two, np.zeros(b, bool)], 1)
    rewards = np.stack([r0, np.where(two, r1, 0.0), np.zeros(b)], 1).astype(np.float32)
    rows = dict(tokens=jnp.asarray(tokens), valid=jnp.asarray(valid),
                state_pos=ar.turn_state_positions(valid, tid, k),
                turn_rewards=jnp.asarray(rewards), turn_valid=jnp.asarray(tv))
    replay = ar.replay_insert(ar.replay_init(rows, 16), rows)
    key = jax.random.PRNGKey(0)
    value = models.init_params(trainer.value_model, key)          # random trunk, zero head
    stage = trainer.stage
    carry = (value, stage.critic_optimizer.init(value), jax.tree.map(jnp.copy, value), replay)
    stage.archer = dataclasses.replace(stage.archer, gamma=gamma)

    @jax.jit
    def fit(carry, key):
        return jax.lax.scan(stage.critic_step, carry, jax.random.split(key, 150))

    (value, _, target, _), metrics = fit(carry, key)
    loss = np.asarray(metrics["critic/td_loss"])
    assert loss[-10:].mean() < 0.05 * loss[:5].mean(), loss[[0, 4, -10, -1]]
    v = np.asarray(stage.critic_turn_values(value, rows["tokens"], rows["valid"],
                                              rows["state_pos"]))
    want = np.stack([r0 + gamma * np.where(two, r1, 0.0), np.where(two, r1, 0.0)], 1)
    got = np.where(tv[:, :2], v[:, :2], 0.0)
    np.testing.assert_allclose(got, want, atol=0.12)
    assert not np.allclose(np.asarray(jax.tree.leaves(target)[0]),
                           np.asarray(jax.tree.leaves(carry[2])[0]))


# ----------------------------------------------------------------------------- trainer
def test_config_validation_names_the_bad_value():
    for kw, msg in [(dict(tau=0.0), "tau=0.0"), (dict(tau=1.5), "tau=1.5"),
                    (dict(replay_episodes=3), "replay_episodes=3"),
                    (dict(critic_batch=7), "critic_batch=7"),
                    (dict(critic_updates=0), "critic_updates=0"),
                    (dict(critic_lr=-1.0), "critic_lr=-1.0")]:
        with pytest.raises(ValueError, match=msg):
            make_trainer(tiny_config(**kw))
    with pytest.raises(ValueError, match="whiten=1"):
        ar.archer_config({"archer": {"whiten": 1}}, 4)
    with pytest.raises(ValueError, match="lam=-0.5"):
        ar.archer_config({"advantage_kwargs": {"lam": -0.5}}, 4)
    assert ar.archer_config({}, 4) == ar.ArcherConfig()
    c = tiny_config()
    c.rl.archer.critic_stepz = 3
    with pytest.raises(ValueError, match="critic_stepz"):
        make_trainer(c)
    c = tiny_config()
    c.rl.advantage_kwargs.gamma = 1.5
    with pytest.raises(ValueError, match="gamma=1.5"):
        make_trainer(c)


def test_make_trainer_dispatch():
    """The algorithm's record names its stage: archer runs ``ArcherStage`` (its own state in
    ``TrainState.extra``), ppo none."""
    tr = make_trainer(tiny_config())
    assert isinstance(tr.stage, ar.ArcherStage)
    assert isinstance(jax.eval_shape(tr.fresh_state, jax.random.PRNGKey(0)).extra, ar.ArcherExtra)
    c = tiny_config()
    c.rl.algorithm = "ppo"
    assert make_trainer(c).stage is None


def _leaf_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_update_jitted_no_recompile_params_change_deterministic():
    """Two updates run with one compilation; the policy, critic and target change; the replay
    fills as a ring; the same state gives bit-identical results, another key different ones.
    (One ``init``: each ``init`` re-compiles the model init, seconds of CPU.)"""
    trainer = make_trainer(tiny_config())
    s0 = trainer.init(jax.random.PRNGKey(0))
    twin = jax.tree.map(jnp.copy, s0)                    # s0's buffers are donated below
    other = jax.tree.map(jnp.copy, s0).replace(key=jax.random.PRNGKey(1))
    before = jax.tree.map(np.asarray, (s0.params, s0.extra.target_value))
    s1, m1 = trainer.update(s0)
    m1 = jax.tree.map(np.asarray, m1)
    p1 = jax.tree.map(np.asarray, s1.params)
    assert trainer.update._cache_size() == 1
    s2, m2 = trainer.update(s1)
    jax.block_until_ready(m2)
    assert trainer.update._cache_size() == 1            # second call: no recompilation
    assert int(s2.step) == 2 and int(s2.extra.replay.size) == 6 and int(s2.extra.replay.ptr) == 2
    assert _leaf_diff(before[0]["policy"], s2.params["policy"]) > 0
    assert _leaf_diff(before[0]["value"], s2.params["value"]) > 0
    assert _leaf_diff(before[1], s2.extra.target_value) > 0
    assert _leaf_diff(before[0]["value"], s2.extra.target_value) < _leaf_diff(before[0]["value"],
                                                                         s2.params["value"])
    for name in ("critic/td_loss", "loss/policy", "actor/turn_advantage_abs", "replay/size"):
        assert np.isfinite(float(m2[name])), name
    # same state → bit-identical update; another key → different rollouts and params
    t1, n1 = trainer.update(twin)
    np.testing.assert_equal(jax.tree.map(np.asarray, dict(n1)), dict(m1))
    assert _leaf_diff(p1, t1.params) == 0.0
    o1, _ = trainer.update(other)
    assert _leaf_diff(p1, o1.params) > 0
    assert trainer.update._cache_size() == 1


def test_trainer_runs_the_archer_stage_not_turn_gae_ppo():
    """``Trainer`` itself (no subclass) runs ArCHer's stage for ``rl.algorithm="archer"``."""
    from benchmarks.learning import load_config
    tr = Trainer(load_config("maze", "archer"))
    assert isinstance(tr.stage, ar.ArcherStage) and tr.stage.archer.critic_updates == 8
