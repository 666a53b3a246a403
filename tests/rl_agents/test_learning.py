"""Learning regression tests (slow): RL must improve on a noisy-BC start.

PPO on 2-hop ``kv_search`` from a BC warm start on ε = 0.6 noisy oracle demos (4 BC epochs:
greedy ≈ 0.95, sampled ≈ 0.08) must raise the sampled success by ≥ 25 points within 40 updates
(≈ 1.5–4 minutes on a 2-core CPU) and end at ≥ 80% greedy success, no more than 5 points below
the BC start. The budget is fixed in updates, never asserted in seconds. The BC start is
chosen where it does not depend on the CPU: after 3 epochs the greedy success of the same run
was 0.67 on one machine and 0.02 on another (float summation order), which left RL nothing to
start from.
"""
import jax
import pytest

from benchmarks.learning import load_config
from rl_agents.trainer import Trainer

UPDATES = 40

pytestmark = pytest.mark.usefixtures("optimized_compilation")   # minutes of running, not compiling


def greedy_success(trainer, params, episodes=256):
    m, _ = trainer.evaluate(params, jax.random.PRNGKey(1234), episodes=episodes, greedy=True)
    return float(m["eval/success_rate"])


def train_from_bc(trainer, updates: int):
    """BC warm start (``trainer.init``), then ``updates`` RL updates: (greedy success at the BC
    start, sampled success of every update, greedy success at the end)."""
    state = trainer.init(jax.random.PRNGKey(0))
    bc = greedy_success(trainer, state.params["policy"])
    sampled = []
    for _ in range(updates):
        state, metrics = trainer.update(state)
        sampled.append(float(metrics["rollout/success_rate"]))
    return bc, sampled, greedy_success(trainer, state.params["policy"])


@pytest.mark.slow
def test_ppo_reaches_80_percent_on_kv_search_from_noisy_bc():
    """The learning benchmark's kv_search PPO settings (README learning table (d)), 40 updates."""
    c = load_config("kv_search", "ppo")
    c.bc.epsilon, c.bc.epochs = 0.6, 4
    c.total_updates = UPDATES
    c.rl.target_kl = 0.02
    c.optim.decay, c.optim.final_lr_fraction = "cosine", 0.1
    bc, sampled, final = train_from_bc(Trainer(c), UPDATES)
    late = sum(sampled[-5:]) / 5
    assert final >= 0.8, (bc, final, sampled)
    assert final >= bc - 0.05, (bc, final, sampled)
    assert late >= sampled[0] + 0.25, (sampled, bc, final)


@pytest.mark.slow
def test_archer_improves_sampled_success_on_kv_search():
    """ArCHer (turn-level TD critic driving the token policy) from BC on ε = 0.6 demos on 2-hop
    ``kv_search`` (greedy ≈ 0.95, sampled ≈ 0.3): 20 updates raise the sampled success by
    ≥ 25 points to ≥ 60% (0.3 → 0.8 in the README's comparison run) without greedy success
    falling more than 5 points below the BC start."""
    from rl_agents.trainer import make_trainer
    c = load_config("kv_search", "archer")
    c.bc.epsilon = 0.6
    bc, sampled, final = train_from_bc(make_trainer(c), 20)
    late = sum(sampled[-5:]) / 5
    assert late >= sampled[0] + 0.25 and late >= 0.6, (sampled, bc, final)
    assert final >= bc - 0.05, (bc, final, sampled)
