"""The non-finite guard: a NaN / inf loss or gradient skips the optimizer step, an update with
such a step is skipped whole (trained state bit-identical to before it, ``key`` / ``step``
advance, ``update/skipped_nonfinite`` = 1), and ``run_training`` stops after
``config.rl.max_nonfinite_updates`` skipped updates in a row with the latest checkpoint holding
the last finite parameters.

NaN rewards are injected by ``NanReward``, a test wrapper around the trainer's env (a second
trainer of the same config with the wrapped env shares the state's structure)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import models
from envs.wrappers import Wrapper
from experiments import run as run_lib
from experiments.checkpointing import Checkpointer
from experiments.configs.common import make_config
from experiments.configs import recipes
from rl_agents import process_rewards as pr
from rl_agents.nonfinite import all_finite
from rl_agents.trainer import make_trainer
from rl_agents.trainer import NONFINITE_STEP, minibatch_epochs

GOOD = 2      # clean updates before the NaN rewards start (host-loop tests)
LIMIT = 3     # config.rl.max_nonfinite_updates
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = dict(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, attention_impl="xla")


class NanReward(Wrapper):
    """The wrapped env with a NaN reward on every step."""

    def step(self, state, action):
        state, ts = self.env.step(state, action)
        return state, ts.replace(reward=jnp.full_like(ts.reward, jnp.nan))


def tiny_config(name: str):
    if name == "archer":
        c = recipes.recipe("guess_number", "archer")
        c.rl.archer.update(dict(replay_episodes=6, critic_batch=4, critic_updates=2))
    elif name == "supo":
        c = make_config("keychain", "grpo")
        c.env.kwargs = ml_collections.ConfigDict(dict(chain_len=2, n_distractors=1))
        c.context = ml_collections.ConfigDict(dict(mode="supo", working_len=40, summary_len=4,
                                                   max_summaries=1, overlong_mask=False))
    else:
        c = make_config("guess_number", name)
    c.update(dict(total_updates=10, eval_every=10, checkpoint_every=1, keep_checkpoints=10))
    c.model.update(TINY_MODEL)
    c.rollout.update(num_groups=2, group_size=2, eval_episodes=2)
    c.rl.update(epochs=1, minibatches=2, logprob_chunk=0, max_nonfinite_updates=LIMIT)
    c.optim.warmup_steps = 0
    c.bc.episodes = 0
    return c


_TRAINERS: dict = {}


def trainers(name: str):
    """``(config, clean trainer, trainer whose env returns NaN rewards)``, built once per name
    (the tests share their compiled updates)."""
    if name not in _TRAINERS:
        config = tiny_config(name)
        bad = make_trainer(config)
        bad.env = NanReward(bad.env)
        _TRAINERS[name] = (config, make_trainer(config), bad)
    return _TRAINERS[name]


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_equal_trees(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- one step
def test_minibatch_epochs_skips_nonfinite_steps():
    """Minibatches whose loss is NaN leave params and optimizer state (its count too) as they
    were; the other steps match a run on the finite minibatches alone."""
    x = jnp.arange(8.0)
    batch = {"x": x, "bad": jnp.asarray([0, 0, 1, 1, 0, 0, 0, 0], bool)}

    def loss_fn(p, mb):
        loss = jnp.mean((mb["x"] * p["w"] - 1.0) ** 2)
        return jnp.where(mb["bad"].any(), jnp.nan, loss), {}

    opt = optax.adam(0.1)
    w0 = {"w": jnp.ones(())}
    key = jax.random.PRNGKey(0)
    p, s, m = minibatch_epochs(loss_fn, opt, w0, opt.init(w0), batch, key, epochs=1,
                               minibatches=4, batch_size=8)
    perm = np.asarray(jax.random.permutation(jax.random.split(key, 1)[0], 8)).reshape(4, 2)
    flags = np.asarray(batch["bad"])[perm].any(1)
    np.testing.assert_array_equal(np.asarray(m[NONFINITE_STEP])[0], flags.astype(np.float32))
    assert 0 < flags.sum() < 4 and int(s[0].count) == 4 - flags.sum()
    ref, ref_s = w0, opt.init(w0)
    for idx in perm[~flags]:
        g = jax.grad(lambda q: loss_fn(q, {"x": x[idx], "bad": batch["bad"][idx]})[0])(ref)
        u, ref_s = opt.update(g, ref_s, ref)
        ref = optax.apply_updates(ref, u)
    np.testing.assert_allclose(p["w"], ref["w"], rtol=1e-6)


def test_prm_step_skipped_on_nan():
    from tests.rl_agents.test_process_rewards import tiny_policy
    model = tiny_policy(max_len=8, d_model=16)
    params = models.init_params(model, jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    b, t = 2, 8
    batch = dict(tokens=jnp.ones((b, t), jnp.int32), valid=jnp.ones((b, t), bool),
                 loss_mask=jnp.ones((b, t), bool), ref_logp=jnp.full((b, t), jnp.nan),
                 labels=jnp.asarray([0.0, 1.0]))
    s0 = opt.init(params)
    p1, s1, m = pr.prm_update(params, s0, batch, prm_model=model, optimizer=opt, beta=0.05)
    assert float(m["prm/nonfinite_step"]) == 1.0
    assert_equal_trees(host((p1, s1)), host((params, s0)))
    batch["ref_logp"] = jnp.zeros((b, t))
    _, _, m = pr.prm_update(params, s0, batch, prm_model=model, optimizer=opt, beta=0.05)
    assert float(m["prm/nonfinite_step"]) == 0.0


# ----------------------------------------------------------------------------- the jitted update
TRAINED = {"ppo": ("params", "opt_state"),
           "supo": ("params", "opt_state"),
           "archer": ("params", "opt_state", "extra")}


@pytest.mark.parametrize("name", ["ppo", "archer", "supo"])
def test_nan_batch_skips_the_update(name):
    """A batch with NaN rewards: the trained state is bit-identical to before the update,
    ``update/skipped_nonfinite`` = 1, key and step advance; a normal batch afterwards trains."""
    _, clean, bad = trainers(name)
    state = clean.init(jax.random.PRNGKey(0))
    before = host({f: getattr(state, f) for f in TRAINED[name]})
    key0 = np.asarray(state.key)
    state, m = bad.update(state)             # donates the state: compare with the host copy
    assert float(m["update/skipped_nonfinite"]) == 1.0
    assert float(m["update/nonfinite_steps"]) >= 1.0
    assert_equal_trees(host({f: getattr(state, f) for f in TRAINED[name]}), before)
    assert int(state.step) == 1 and not np.array_equal(np.asarray(state.key), key0)

    state, m = clean.update(state)
    assert float(m["update/skipped_nonfinite"]) == 0.0
    assert float(m["update/nonfinite_steps"]) == 0.0
    assert bool(all_finite(state.params)) and int(state.step) == 2
    # the step was taken (a group of equal rewards may have zero gradient: compare the
    # optimizer state, whose step count moves either way)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), host(state.opt_state),
                         before["opt_state"])
    assert any(jax.tree.leaves(moved))


# ----------------------------------------------------------------------------- the host loop
@pytest.fixture
def one_device(monkeypatch):
    """``run_training`` without a mesh (the test process has eight devices, tests/conftest.py)."""
    check = run_lib.check_config
    monkeypatch.setattr(run_lib, "check_config", lambda cfg: check(cfg, num_devices=1))
    monkeypatch.setattr(run_lib, "make_mesh", lambda m: None)


@pytest.mark.parametrize("name", ["ppo", "archer"])
def test_run_training_stops_and_keeps_last_good_checkpoint(name, tmp_path, monkeypatch,
                                                           one_device):
    """GOOD clean updates, then NaN rewards: the run stops at step GOOD + LIMIT with one line;
    the latest checkpoint holds the finite parameters of step GOOD."""
    config, clean, bad = trainers(name)

    def build_switching(cfg, mesh=None):
        """The clean trainer for updates 1..GOOD, NaN rewards after."""
        t = copy.copy(clean)
        t.update = lambda s: (clean if int(s.step) < GOOD else bad).update(s)
        return t

    monkeypatch.setattr(run_lib, "build_trainer", build_switching)
    wd = str(tmp_path / "wd")
    with pytest.raises(run_lib.NonFiniteError) as err:
        run_lib.run_training(config, wd, progress=False)
    last = GOOD + LIMIT
    msg = str(err.value)
    assert "\n" not in msg and f"{LIMIT} updates in a row" in msg and f"step {last}" in msg
    assert f"max_nonfinite_updates={LIMIT}" in msg and f"latest checkpoint: step {last - 1}" in msg

    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    assert [rows[s]["update/skipped_nonfinite"] for s in range(1, last + 1)] == \
        [0.0] * GOOD + [1.0] * LIMIT

    trainer, state, step = run_lib.restore_latest(config, wd, trainer=clean)
    assert step == last - 1            # the step that hit the limit is not saved
    ckpt = Checkpointer(os.path.join(wd, "checkpoints"), keep=10, save_every=1)
    good, _ = ckpt.restore(GOOD, trainer.abstract_state())
    init, _ = ckpt.restore(0, trainer.abstract_state())
    ckpt.close()
    assert bool(all_finite(state.params))
    assert_equal_trees(host(state.params), host(good.params))
    assert_equal_trees(host(state.opt_state), host(good.opt_state))
    assert not np.array_equal(*(jax.tree.leaves(host(p.params))[0] for p in (init, good)))


def test_train_cli_reports_nonfinite_stop(tmp_path):
    """``experiments.train`` turns a NonFiniteError into one ``error:`` line and exit status 1."""
    script = (
        "import sys\n"
        "from absl import app\n"
        "from experiments import run, train\n"
        "from experiments.configs import parse_flags\n"
        "def fail(config, workdir):\n"
        "    raise run.NonFiniteError('3 updates in a row had a non-finite loss')\n"
        "run.run_training = fail\n"
        "app.run(train.main, flags_parser=parse_flags)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", script, "--config",
                        os.path.join(ROOT, "experiments/configs/default.py"),
                        "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == \
        "error: 3 updates in a row had a non-finite loss"


def test_run_training_refuses_nonfinite_initial_params(tmp_path, monkeypatch, one_device):
    """Initial parameters with a NaN (e.g. a diverged BC warm start) are never saved."""

    def build_nan_init(cfg, mesh=None):
        t = copy.copy(trainers("ppo")[1])
        init = t.init
        t.init = lambda key, **kw: (lambda s: s.replace(params=jax.tree.map(
            lambda x: jnp.full_like(x, jnp.nan), s.params)))(init(key, **kw))
        return t

    monkeypatch.setattr(run_lib, "build_trainer", build_nan_init)
    wd = str(tmp_path / "wd")
    with pytest.raises(run_lib.NonFiniteError, match="initial parameters"):
        run_lib.run_training(trainers("ppo")[0], wd, progress=False)
    ckpt = Checkpointer(os.path.join(wd, "checkpoints"), keep=1, save_every=1)
    assert ckpt.all_steps() == []
    ckpt.close()
