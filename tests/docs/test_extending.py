"""docs/extending.md runs as written: a new env, estimator and algorithm registered and trained,
a model size built. Run in a subprocess: the registrations must not leak into other tests."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_extending_page_runs(tmp_path):
    with open(os.path.join(REPO, "docs", "extending.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 4
    script = "\n".join(blocks) + '''
import numpy as np
import envs
from rl_agents.algorithms import ALGORITHMS
assert "echo" in envs.registered() and ALGORITHMS["median_grpo"].estimator == "group_median"
assert int(state.step) == 3
sr = np.asarray(metrics["rollout/success_rate"])
assert sr.shape == (3,) and ((0 <= sr) & (sr <= 1)).all()
# the registered estimator is the one the update used: a group-median baseline on a group
# of returns (0, 0, 1, 1) is 0.5 and of (0, 0, 0, 1) is 0
from rl_agents.advantages import AdvantageInputs, compute_advantages
import jax.numpy as jnp
b, t, k = 8, 2, 1
x = AdvantageInputs(rewards=jnp.zeros((b, t)), values=jnp.zeros((b, t)),
                    loss_mask=jnp.ones((b, t), bool), turn_ids=jnp.zeros((b, t), jnp.int32),
                    turn_end=jnp.ones((b, t), bool), group_ids=jnp.repeat(jnp.arange(2), 4),
                    turn_rewards=jnp.zeros((b, k)), turn_valid=jnp.ones((b, k), bool),
                    turn_obs_hash=jnp.zeros((b, k), jnp.uint32),
                    episode_return=jnp.array([0., 0., 1., 1., 0., 0., 0., 1.]))
adv, _ = compute_advantages("group_median", x, scale=2.0)
np.testing.assert_allclose(np.asarray(adv[:, 0]), [-1, -1, 1, 1, 0, 0, 0, 2])
print("OK")
'''
    path = tmp_path / "extending.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK"), proc.stdout[-2000:]
