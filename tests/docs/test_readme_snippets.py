"""The README's Python example runs as written (with tiny sizes substituted for speed)."""
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ('{"total_updates": 2, "bc.episodes": 64, "bc.epochs": 1, "bc.batch_size": 32, '
        '"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1, '
        '"model.d_ff": 64, "rollout.num_groups": 4}')


def python_blocks(path):
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_python_example_trains():
    blocks = python_blocks(os.path.join(REPO, "README.md"))
    assert len(blocks) == 1, "the README has one Python example"
    code = blocks[0]
    overrides = re.search(r'configs\.load\("default", (\{.*?\})\)', code)
    assert overrides, "the example loads the default config with an overrides dict"
    code = code.replace(overrides.group(1), TINY)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    success = np.asarray(namespace["metrics"]["rollout/success_rate"])
    assert success.shape == (2,)                       # one value per update
    assert int(namespace["state"].step) == 2
    assert ((0 <= success) & (success <= 1)).all()
