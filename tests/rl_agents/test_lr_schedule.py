"""rl_agents.trainer.lr_schedule: warm-up then constant / cosine / linear decay, vs closed forms."""
import math

import ml_collections
import numpy as np
import pytest

from experiments.configs.common import make_config
from rl_agents.validation import ConfigError, validate_config
from rl_agents.trainer import lr_schedule


def optim(**kw):
    d = dict(lr=1e-3, warmup_steps=0, decay="constant", final_lr_fraction=0.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def reference(step, lr, warmup, decay, frac, total):
    if step < warmup:
        return lr * step / warmup
    if decay == "constant":
        return lr
    t = min(step - warmup, total - warmup) / max(total - warmup, 1)
    end = lr * frac
    if decay == "linear":
        return lr + (end - lr) * t
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_matches_closed_form(decay, warmup):
    total, lr, frac = 40, 3e-4, 0.1
    sched = lr_schedule(optim(lr=lr, warmup_steps=warmup, decay=decay, final_lr_fraction=frac), total)
    for step in [0, 1, warmup, warmup + 1, 20, total - 1, total, total + 15]:
        got = float(sched(step)) if callable(sched) else float(sched)
        np.testing.assert_allclose(got, reference(step, lr, warmup, decay, frac, total), rtol=1e-5,
                                   atol=1e-12, err_msg=f"step {step}")


def test_constant_without_warmup_is_a_float():
    assert lr_schedule(optim(lr=2e-3), 100) == 2e-3


def test_decay_reaches_the_final_fraction_at_the_last_step():
    for decay in ("cosine", "linear"):
        sched = lr_schedule(optim(decay=decay, final_lr_fraction=0.25, warmup_steps=3), 50)
        np.testing.assert_allclose(float(sched(50)), 0.25e-3, rtol=1e-6)
        assert float(sched(3)) == pytest.approx(1e-3) and float(sched(26)) < 1e-3


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="'step'"):
        lr_schedule(optim(decay="step"), 10)
    c = make_config("guess_number", "grpo")
    c.optim.decay = "exponential"
    with pytest.raises(ConfigError, match="config.optim.decay = 'exponential'"):
        validate_config(c, 1)
    c = make_config("guess_number", "grpo")
    c.optim.final_lr_fraction = 1.5
    with pytest.raises(ConfigError, match="final_lr_fraction must be in"):
        validate_config(c, 1)


def test_trainer_decays_over_every_optimizer_step_of_the_run():
    import jax.numpy as jnp

    from rl_agents.trainer import Trainer

    c = make_config("guess_number", "ppo")
    c.total_updates, c.rl.epochs, c.rl.minibatches = 2, 2, 2       # 8 optimizer steps in all
    c.optim.update(lr=1e-2, warmup_steps=0, decay="linear", final_lr_fraction=0.0, grad_clip=1e9)
    opt = Trainer(c).optimizer
    w = {"w": jnp.zeros(())}
    state, sizes = opt.init(w), []
    for _ in range(10):             # constant gradient: Adam's step is ≈ lr_k
        upd, state = opt.update({"w": jnp.ones(())}, state, w)
        sizes.append(-float(upd["w"]))
    np.testing.assert_allclose(sizes[:9], [1e-2 * (1 - k / 8) for k in range(9)], rtol=1e-4, atol=1e-9)
    assert sizes[9] == 0.0
