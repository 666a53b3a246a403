"""validate_config: every check fires with one clear line naming the field and the value."""
import ml_collections
import pytest

from rl_agents.validation import CHECKS, ConfigError, validate_config

ENVS = ["guess_number", "keychain", "maze"]


def base_config():
    # type_safe=False so that tests can put values of the wrong type in (as a dict config could).
    return ml_collections.ConfigDict(dict(
        seed=0, total_updates=10, eval_every=5, checkpoint_every=5, keep_checkpoints=2, log_every=1,
        mesh=dict(data=2, fsdp=2, tensor=2),
        env=dict(name="guess_number", kwargs=dict()),
        model=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, rope_theta=1e4,
                   dtype="float32", param_dtype="float32", attention_impl="auto", remat=False,
                   scan_layers=False),
        rollout=dict(num_groups=8, group_size=4, temperature=1.0, top_k=0, top_p=1.0, eval_episodes=16),
        rl=dict(algorithm="grpo", epochs=1, minibatches=2),
        optim=dict(lr=1e-3, warmup_steps=0, grad_clip=1.0, weight_decay=0.0),
    ), type_safe=False)


def _err(c, n=8, envs=ENVS):
    with pytest.raises(ConfigError) as e:
        validate_config(c, n, registered_envs=envs)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


def test_valid_config_passes():
    validate_config(base_config(), 8, registered_envs=ENVS)
    validate_config(base_config(), 8)   # no env list: name unchecked
    c = base_config()
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    validate_config(c, 1, registered_envs=ENVS)
    d = base_config().to_dict()          # plain nested dicts work too
    validate_config(d, 8, registered_envs=ENVS)
    d["mesh"]["data"] = 1
    with pytest.raises(ConfigError, match="= 1\\*2\\*2 = 4 but 8 devices"):
        validate_config(d, 8)


def test_project_default_config_is_valid():
    import envs
    from experiments.configs.default import get_config
    validate_config(get_config(), 1, registered_envs=envs.registered())


def test_mesh_product():
    c = base_config()
    c.mesh.tensor = 1
    assert _err(c) == "config.mesh: data*fsdp*tensor = 2*2*1 = 4 but 8 devices are visible"


@pytest.mark.parametrize("field,value", [
    ("mesh.data", 0), ("mesh.fsdp", -1), ("eval_every", 0), ("checkpoint_every", -5),
    ("log_every", 0), ("keep_checkpoints", 0), ("rollout.num_groups", 0), ("rollout.group_size", 0),
    ("rl.epochs", 0), ("rl.minibatches", 0), ("model.n_heads", 0), ("model.d_model", 2.5),
    ("rollout.eval_episodes", True), ("rl.max_nonfinite_updates", 0),
])
def test_non_positive_sizes(field, value):
    c = base_config()
    sec, _, key = field.rpartition(".")
    (c[sec] if sec else c)[key] = value
    msg = _err(c)
    assert msg.startswith(f"config.{field} must be a positive integer, got {value!r}")


@pytest.mark.parametrize("field", ["total_updates", "optim.warmup_steps", "rollout.top_k"])
def test_non_negative(field):
    c = base_config()
    sec, _, key = field.rpartition(".")
    (c[sec] if sec else c)[key] = -1
    assert _err(c) == f"config.{field} must be an integer >= 0, got -1"
    (c[sec] if sec else c)[key] = 0
    validate_config(c, 8, registered_envs=ENVS)


def test_missing_required_field():
    c = base_config()
    del c["checkpoint_every"]
    assert _err(c) == "config.checkpoint_every is missing"
    c = base_config()
    del c.mesh["tensor"]
    assert _err(c) == "config.mesh.tensor is missing"


def test_seed():
    c = base_config()
    c.seed = "zero"
    assert "config.seed" in _err(c) and "'zero'" in _err(c)


def test_batch_divisible_by_data_axes():
    c = base_config()
    c.mesh = dict(data=8, fsdp=1, tensor=1)
    c.rollout.num_groups = 3      # 3*4 = 12 rows over 8 shards
    assert _err(c) == ("config.rollout: batch num_groups*group_size = 3*4 = 12 is not divisible by "
                       "mesh.data*mesh.fsdp = 8")
    c.mesh = dict(data=1, fsdp=2, tensor=4)   # tensor does not split the batch
    c.rl.minibatches = 1
    validate_config(c, 8, registered_envs=ENVS)


@pytest.mark.parametrize("adv", ["grpo", "dr_grpo", "rloo", "gigpo", "reinforce_pp_baseline", "dapo"])
def test_group_relative_needs_groups(adv):
    c = base_config()
    c.rollout.group_size = 1
    c.rollout.num_groups = 16
    c.rl.algorithm = adv
    assert _err(c) == (f"config.rollout.group_size = 1 but rl.algorithm = {adv!r} is group-relative "
                       f"and needs group_size >= 2")
    c.rl.algorithm = "ppo"
    validate_config(c, 8, registered_envs=ENVS)


def test_minibatches():
    c = base_config()
    c.rl.minibatches = 3
    assert _err(c) == "config.rl.minibatches = 3 does not divide the batch num_groups*group_size = 32"
    c.rl.minibatches = 16     # 32/16 = 2 rows per minibatch over data*fsdp = 4
    assert _err(c) == ("config.rl.minibatches = 16: minibatch size 32/16 = 2 is not divisible by "
                       "mesh.data*mesh.fsdp = 4")
    c.rl.minibatches = 8
    validate_config(c, 8, registered_envs=ENVS)


def test_heads():
    c = base_config()
    c.model.n_kv_heads = 3
    assert _err(c) == "config.model.n_heads = 4 is not divisible by model.n_kv_heads = 3"
    c = base_config()
    c.model.d_model = 66
    assert _err(c) == "config.model.d_model = 66 is not divisible by model.n_heads = 4"


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan")])
def test_temperature(t):
    c = base_config()
    c.rollout.temperature = t
    msg = _err(c)
    assert msg.startswith(f"config.rollout.temperature must be > 0, got {t!r}") and "greedy" in msg


@pytest.mark.parametrize("p", [0.0, 1.5, -0.1])
def test_top_p(p):
    c = base_config()
    c.rollout.top_p = p
    assert _err(c) == f"config.rollout.top_p must be in (0, 1], got {p!r}"
    c.rollout.top_p = 1.0
    validate_config(c, 8, registered_envs=ENVS)


def test_env_name():
    c = base_config()
    c.env.name = "sokoban"
    assert _err(c) == ("config.env.name = 'sokoban' is not a registered environment "
                       "(registered: guess_number, keychain, maze)")


@pytest.mark.parametrize("field", ["model.dtype", "model.param_dtype"])
def test_dtypes(field):
    c = base_config()
    c.model[field.split(".")[1]] = "fp32"
    assert _err(c).startswith(f"config.{field} = 'fp32' is not a known dtype")
    c.model[field.split(".")[1]] = "bfloat16"
    validate_config(c, 8, registered_envs=ENVS)


def test_attention_impl():
    c = base_config()
    c.model.attention_impl = "flash"
    assert _err(c).startswith("config.model.attention_impl = 'flash' is not one of auto, xla, pallas")


def test_optim():
    c = base_config()
    c.optim.lr = 0.0
    assert _err(c) == "config.optim.lr must be > 0, got 0.0"
    c = base_config()
    c.optim.grad_clip = -1.0
    assert _err(c) == "config.optim.grad_clip must be >= 0, got -1.0"


def test_model_checkpoint_tags_and_lora_settings(tmp_path):
    c = base_config()
    c.model.hf_checkpoint = str(tmp_path / "none")
    assert _err(c) == (f"config.model.hf_checkpoint: directory {str(tmp_path / 'none')!r} "
                       f"does not exist")
    c = base_config()
    c.model.tags = "bytes"
    assert _err(c) == "config.model.tags = 'bytes' is not one of special, text"
    c = base_config()
    c.model.action_tokens = 1
    assert "config.model.action_tokens must be 0 (automatic) or an int >= 2" in _err(c)
    c = base_config()
    c.model.lora = ml_collections.ConfigDict(dict(rank=-1, alpha=8.0, targets="q_proj"))
    assert "config.model.lora.rank must be an int >= 0" in _err(c)
    c.model.lora.rank, c.model.lora.targets = 4, "q_proj,lm_head"
    assert "config.model.lora.targets = 'q_proj,lm_head': lm_head is not one of" in _err(c)
    c.model.lora.targets, c.model.lora.alpha = "q_proj", 0.0
    assert _err(c) == "config.model.lora.alpha must be > 0, got 0.0"
    c.model.lora.alpha, c.rl.algorithm = 8.0, "archer"
    assert "not supported with rl.algorithm = 'archer'" in _err(c)


def test_rollout_mode_and_correction_settings():
    c = base_config()
    c.rollout.mode = "async"
    assert _err(c) == "config.rollout.mode = 'async' is not one of sync, continuous"
    c.rollout.mode = "continuous"
    c.rollout.continuous = ml_collections.ConfigDict(dict(
        slot_groups=0, turns_per_update=4, max_staleness=-1, reprefill=False))
    assert _err(c) == "config.rollout.continuous.max_staleness = -1 must be an int >= 0"
    c = base_config()
    c.rl.correction = "importance"
    assert _err(c) == "config.rl.correction = 'importance' is not one of none, tis, mis, token_mis"


def test_every_check_is_exercised():
    # Guard against adding a check without a test: each name appears in this file.
    import inspect
    import sys
    src = inspect.getsource(sys.modules[__name__])
    fired = {"check_required": "is missing", "check_seed": "config.seed",
             "check_mesh_sizes": "mesh.data", "check_mesh_product": "devices are visible",
             "check_positive_sizes": "must be a positive integer",
             "check_non_negative": "must be an integer >= 0",
             "check_batch_divisible": "is not divisible by", "check_group_size": "group-relative",
             "check_minibatches": "rl.minibatches", "check_heads": "n_kv_heads",
             "check_dtypes": "not a known dtype", "check_attention_impl": "attention_impl",
             "check_temperature": "temperature", "check_top_p": "top_p", "check_optim": "optim.lr",
             "check_env_name": "registered environment",
             "check_hf_checkpoint": "hf_checkpoint",
             "check_rollout_mode": "rollout.mode", "check_correction": "rl.correction"}
    for check in CHECKS:
        name = check.__name__ if not check.__name__.startswith("check_ints") else None
        if name is not None:
            assert name in fired and fired[name] in src, name
    assert len(CHECKS) == len(fired)
