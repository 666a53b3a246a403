"""Continuous rollouts (``rollout.mode = "continuous"``) against the synchronous rollout.

With greedy decoding the random numbers only pick tasks, so a continuous rollout whose slots
start the same tasks must produce exactly the synchronous rollout's episodes: in one update,
carried over two updates (same parameters; with and without re-prefilling the caches), and
through a full buffer whose groups wait for the next update. Staleness drops, the trainer's
update and a checkpoint round trip of the carried episodes are tested too.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.wrappers import Wrapper
from rl_agents import continuous as C
from rl_agents import make_trainer
from rl_agents.rollout import model_policy, run_episodes
from rl_agents.sampling import SamplingConfig
from rl_agents.validation import ConfigError, check_config
from tests.rl_agents import probes

GREEDY = SamplingConfig(greedy=True)
GROUPS, G = 4, 2
FIELDS = ("tokens", "valid", "loss_mask", "rewards", "turn_ids", "turn_end", "turn_rewards",
          "turn_valid", "turn_obs_hash", "turn_format_error", "episode_return",
          "episode_length", "success", "terminated", "truncated", "group_ids")


@pytest.fixture(scope="module")
def setup():
    c = probes.tiny("kv_search", "grpo", groups=GROUPS, group_size=G)
    tr = make_trainer(c)
    params = tr.fresh_state(jax.random.PRNGKey(0)).params["policy"]
    # larger weights: peaked greedy choices, so episodes differ from task to task
    params = jax.tree.map(lambda x: 3.0 * x, params)
    return tr, params


@functools.lru_cache(maxsize=None)
def _jitted(env, policy, settings, capacity):
    """One compiled rollout per (settings, capacity), reused across calls and tests."""
    return jax.jit(lambda params, carried, key, version: C.continue_rollout(
        env, policy, params, GREEDY, carried, key, version, settings, group_size=G,
        capacity=capacity))


def _continue(tr, params, carried, key, version, settings, capacity=GROUPS):
    return _jitted(tr.env, tr.policy, settings, capacity)(params, carried, key,
                                                          jnp.int32(version))


@functools.lru_cache(maxsize=None)
def _jitted_sync(env, model):
    return jax.jit(lambda params, reset_keys: run_episodes(
        env, model_policy(model, params, env, GREEDY), jax.random.PRNGKey(9), GROUPS, G,
        reset_keys=reset_keys))


def _sync(tr, params, start_key):
    """The synchronous rollout of the tasks the continuous one starts with ``start_key``."""
    return _jitted_sync(tr.env, tr.policy)(params, jax.random.split(start_key, GROUPS))


def _first_start_key(key):
    return jax.random.split(key)[0]       # continue_rollout's key for the update's first starts


def _assert_same(got, want, rows_got=slice(None), rows_want=slice(None), fields=FIELDS):
    """Equal fields; ``turn_obs_hash`` on the episode's turns (the synchronous rollout keeps
    recording the last hash after an episode ends, the continuous one leaves 0)."""
    turns = np.asarray(want.turn_valid)[rows_want]
    for f in fields:
        a, b = np.asarray(getattr(got, f))[rows_got], np.asarray(getattr(want, f))[rows_want]
        if f == "turn_obs_hash":
            a, b = a[turns], b[turns]
        np.testing.assert_array_equal(a, b, err_msg=f)
    np.testing.assert_allclose(np.asarray(got.behaviour_logp)[rows_got],
                               np.asarray(want.behaviour_logp)[rows_want], atol=1e-5)


def _whole_episodes_update(tr, params, max_staleness, capacity=GROUPS):
    """A first update of max_turns turn steps from empty slots, and the synchronous rollout
    of the same tasks."""
    settings = C.ContinuousSettings(GROUPS, tr.env.max_turns, max_staleness, reprefill=False,
                                     until_full=False)
    carried = C.init_carried(tr.env, tr.policy, settings, G)
    key = jax.random.PRNGKey(3)
    out = _continue(tr, params, carried, key, 0, settings, capacity=capacity)
    return settings, out, _sync(tr, params, _first_start_key(key))


def test_one_update_equals_the_synchronous_rollout(setup):
    tr, params = setup
    _, (carried, traj, weight, m), want = _whole_episodes_update(tr, params, 0)
    assert len(set(np.asarray(want.tokens).sum(-1).tolist())) > 1    # not all alike
    _assert_same(traj, want)
    np.testing.assert_array_equal(np.asarray(weight), np.ones(GROUPS * G))
    assert int(m["continuous/groups_completed"]) == GROUPS
    assert int(m["continuous/trained_tokens"]) == int(want.loss_mask.sum())
    assert int(m["continuous/generated_tokens"]) == int(want.loss_mask.sum())
    assert float(m["continuous/staleness_max"]) == 0
    # the emitted groups' slots started fresh tasks, not yet acted on
    assert bool(carried.has_episode.all()) and int(carried.turn.max()) == 0


@pytest.mark.parametrize("reprefill", [False, True])
def test_episodes_carried_over_an_update_boundary(setup, reprefill):
    """2 turn steps in update 0, the rest in update 1 (same parameters): the episodes equal the
    synchronous ones; the first two turns' tokens are 1 update stale."""
    tr, params = setup
    k = tr.env.max_turns
    s0 = C.ContinuousSettings(GROUPS, 2, max_staleness=1, reprefill=reprefill, until_full=False)
    s1 = s0._replace(turns_per_update=k - 2)
    carried = C.init_carried(tr.env, tr.policy, s0, G)
    key0, key1 = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    carried, _, w0, m0 = _continue(tr, params, carried, key0, 0, s0)
    assert int(m0["continuous/groups_completed"]) == 0 and not np.asarray(w0).any()
    assert int(m0["continuous/slots_in_episode"]) == GROUPS * G
    carried, traj, w1, m1 = _continue(tr, params, carried, key1, 1, s1)
    want = _sync(tr, params, _first_start_key(key0))
    assert int(m1["continuous/groups_completed"]) == GROUPS
    for f in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(traj, f)), np.asarray(getattr(want, f)),
                                      err_msg=f)
    np.testing.assert_allclose(np.asarray(traj.behaviour_logp), np.asarray(want.behaviour_logp),
                               atol=1e-4 if reprefill else 1e-5)
    version = np.asarray(traj.behaviour_version)
    mask = np.asarray(want.loss_mask)
    np.testing.assert_array_equal(version[mask], np.where(np.asarray(want.turn_ids)[mask] < 2, 0, 1))
    assert (version[~mask] == -1).all()
    first_two = np.asarray(want.loss_mask & (want.turn_ids < 2)).sum()
    assert float(m1["continuous/staleness_max"]) == 1
    np.testing.assert_allclose(float(m1["continuous/staleness_mean"]),
                               first_two / float(want.loss_mask.sum()), rtol=1e-6)


def test_a_full_buffer_keeps_complete_groups_for_the_next_update(setup):
    tr, params = setup
    settings, (carried, traj, w, m), want = _whole_episodes_update(tr, params, 1, capacity=2)
    assert int(m["continuous/groups_completed"]) == 2 and int(m["continuous/groups_waiting"]) == 2
    _assert_same(traj, want, slice(0, 2 * G), slice(0, 2 * G))
    # next update: the two waiting groups fill the buffer first (groups 0, 1 restarted)
    carried, traj, w, m = _continue(tr, params, carried, jax.random.PRNGKey(5), 1, settings,
                                    capacity=2)
    assert int(m["continuous/groups_completed"]) == 2
    _assert_same(traj, want, slice(0, 2 * G), slice(2 * G, 4 * G), fields=FIELDS[:-1])
    np.testing.assert_array_equal(np.asarray(traj.group_ids), np.repeat(np.arange(2), G))


class _Horizons(Wrapper):
    """The wrapped task truncated after a number of turns drawn from the reset key (1 ..
    max_turns): episodes of a greedy untrained model then end at different turns."""

    def reset(self, key):
        state, ts = self.env.reset(key)
        horizon = jax.random.randint(jax.random.fold_in(key, 1), (), 1, self.max_turns + 1)
        return (state, horizon, jnp.zeros((), jnp.int32)), ts

    def step(self, state, action):
        inner, horizon, t = state
        inner, ts = self.env.step(inner, action)
        return (inner, horizon, t + 1), ts.replace(truncated=ts.truncated | (t + 1 >= horizon))


def test_until_full_stops_when_the_buffer_is_full(setup):
    """``until_full``: the update's turn steps stop at the step where the capacity-th group
    completes (groups complete at their longest member's length, in slot order on ties); the
    buffer holds exactly those groups' synchronous episodes, the others stay in flight."""
    tr, params = setup
    env = _Horizons(tr.env)
    settings = C.ContinuousSettings(GROUPS, 0, max_staleness=1, reprefill=False, until_full=True)
    carried = C.init_carried(env, tr.policy, settings, G)
    key = jax.random.PRNGKey(3)
    carried, traj, w, m = _jitted(env, tr.policy, settings, 2)(params, carried, key,
                                                                jnp.int32(0))
    want = _jitted_sync(env, tr.policy)(params, jax.random.split(_first_start_key(key), GROUPS))
    group_len = np.asarray(want.episode_length).reshape(GROUPS, G).max(-1)
    order = sorted(range(GROUPS), key=lambda i: (group_len[i], i))
    assert len(set(group_len.tolist())) > 1                  # the groups end at different steps
    assert int(m["continuous/turn_steps"]) == group_len[order[1]] < env.max_turns
    assert int(m["continuous/groups_completed"]) == 2 and np.asarray(w).all()
    for slot, group in enumerate(order[:2]):
        _assert_same(traj, want, slice(slot * G, (slot + 1) * G), slice(group * G, (group + 1) * G),
                     fields=FIELDS[:-1])
    # the other groups are still in flight, at the turn the update stopped
    in_flight = np.asarray(carried.turn).reshape(GROUPS, G)[order[2:]]
    assert (in_flight.max(-1) == group_len[order[1]]).all()
    assert not np.asarray(carried.done).reshape(GROUPS, G)[order[2:]].all(-1).any()


def test_stale_episodes_are_dropped_and_counted(setup):
    tr, params = setup
    settings = C.ContinuousSettings(GROUPS, 2, max_staleness=1, reprefill=False,
                                     until_full=False)
    carried = C.init_carried(tr.env, tr.policy, settings, G)
    dropped = []
    for v in range(4):       # 6-turn episodes, 2 turns an update: update 2 finds them 2 stale
        carried, _, w, m = _continue(tr, params, carried, jax.random.PRNGKey(v), v, settings)
        dropped.append(int(m["continuous/groups_dropped_stale"]))
        assert not np.asarray(w).any()
    assert dropped == [0, 0, GROUPS, 0]


def _cont_config(**cont):
    c = probes.tiny("kv_search", "grpo", groups=GROUPS, group_size=G)
    c.rollout.mode = "continuous"
    c.rollout.continuous.update({**dict(slot_groups=GROUPS, turns_per_update=3, max_staleness=2),
                                 **cont})
    c.rl.kl_coef = 0.0
    return c


@functools.lru_cache(maxsize=None)
def _cont_trainer():
    """The continuous trainer of ``_cont_config()`` on one device (its update compiled once)."""
    return make_trainer(_cont_config())


def test_trainer_update_and_checkpoint_round_trip(tmp_path):
    """The update carries the episodes in ``TrainState.rollout``; 4 updates in a row equal 2,
    a checkpoint save / restore (orbax), and 2 more."""
    from experiments.checkpointing import Checkpointer

    tr = _cont_trainer()
    state = tr.fresh_state(jax.random.PRNGKey(0))
    straight = []
    s = state
    for _ in range(4):
        s, m = tr.update(s)
        straight.append(jax.tree.map(np.asarray, m))
    assert sum(float(m["continuous/groups_completed"]) for m in straight) > 0
    assert float(straight[0]["continuous/slots_in_episode"]) > 0
    s = tr.fresh_state(jax.random.PRNGKey(0))
    for _ in range(2):
        s, _ = tr.update(s)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1, save_every=1)
    ckpt.save(2, s, force=True)
    restored, _ = ckpt.restore(2, tr.abstract_state())
    assert isinstance(restored.rollout, C.CarriedRollout)
    for i in (2, 3):
        restored, m = tr.update(restored)
        for name, v in straight[i].items():
            np.testing.assert_array_equal(np.asarray(m[name]), v, err_msg=name)


def test_bad_continuous_settings_give_one_line():
    c = _cont_config()
    c.rollout.mode = "async"
    with pytest.raises(ConfigError, match=r"config.rollout.mode = 'async' is not one of"):
        check_config(c, num_devices=1)
    c = _cont_config(turns_per_update=-1)
    with pytest.raises(ConfigError, match=r"config.rollout.continuous.turns_per_update = -1 must"):
        check_config(c, num_devices=1)
    c = _cont_config()
    del c.rollout.continuous["until_full"]
    with pytest.raises(ConfigError, match=r"rollout.continuous.until_full = missing must be True"):
        check_config(c, num_devices=1)
    c = probes.tiny("kv_search", "dapo", groups=GROUPS, group_size=G)
    c.rollout.mode = "continuous"
    with pytest.raises(ConfigError, match=r"rollout.mode = 'continuous' is not supported"):
        check_config(c, num_devices=1)
    c = _cont_config(slot_groups=3)
    c.mesh.data = 4
    with pytest.raises(ConfigError, match=r"6 slots .* not divisible by mesh.data x mesh.fsdp = 4"):
        check_config(c, num_devices=4)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (forced) devices")
def test_carried_rollout_is_the_same_on_a_mesh():
    """Slots sharded over (data 2, fsdp 2): the same sampled tokens in the carried records
    and the same metrics as on one device after updates that carry episodes over."""
    from models.sharding import make_mesh
    from rl_agents.trainer import Trainer

    out = []
    for shape in ((1, 1, 1), (2, 2, 1)):
        c = _cont_config()
        c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        tr = (_cont_trainer() if shape == (1, 1, 1)
              else Trainer(c, make_mesh(c.mesh, jax.devices()[:4])))
        state = tr.place(tr.fresh_state(jax.random.PRNGKey(0)))
        metrics = []
        for _ in range(2):
            state, m = tr.update(state)
            metrics.append(jax.tree.map(float, m))
        out.append((np.asarray(state.rollout.rec["action"]), metrics))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
