"""Every experiment config is runnable, follows its recipe, and has no field that nothing reads."""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os

import pytest

import envs
from experiments import configs
from experiments.configs import recipes
from experiments.run import build_trainer, check_config, flat_config
from rl_agents.validation import validate_config
from rl_agents.advantages import estimator_hparams
from rl_agents.algorithms import ALGORITHMS
from rl_agents.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = configs.available()
# Code that reads configs (the config builders themselves do not count as readers).
SOURCE_DIRS = ("rl_agents", "experiments", "envs", "models", "pallas_kernels")


def _get(name):
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def test_config_files_are_found():
    assert "default" in NAMES
    expected = {"guess_number_grpo", "guess_number_ppo", "calculator_ppo", "calculator_grpo",
                "kv_search_ppo", "kv_search_grpo", "kv_search_dapo", "maze_gigpo", "maze_ppo",
                "wordle_grpo", "bandit_reinforce_pp", "keychain_grpo"}
    assert expected <= set(NAMES), sorted(expected - set(NAMES))
    for name in NAMES:   # every non-helper module of the package is a config
        assert callable(getattr(importlib.import_module(f"experiments.configs.{name}"),
                                "get_config", None)), name


@pytest.mark.parametrize("name", NAMES)
def test_config_is_runnable(name):
    cfg = _get(name)
    validate_config(cfg, 1, envs.registered())
    check_config(cfg, num_devices=1)
    trainer = build_trainer(cfg)            # env, models, optimizer; nothing compiled
    assert isinstance(trainer, Trainer)
    assert (trainer.num_groups, trainer.group_size) == (cfg.rollout.num_groups, cfg.rollout.group_size)
    assert (trainer.value_model is not None) == ALGORITHMS[cfg.rl.algorithm].critic
    for key in ("seed", "total_updates", "eval_every", "checkpoint_every"):
        assert key in cfg
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 1, 1)


@pytest.mark.parametrize("name", [n for n in NAMES if "_" in n and n.split("_")[0] in
                                  {e.split("_")[0] for e in envs.registered()}])
def test_config_name_matches_env_and_algorithm(name):
    cfg = _get(name)
    algo = next((a for a in sorted(ALGORITHMS, key=len, reverse=True) if name.endswith("_" + a)),
                None)
    if algo is None:      # e.g. keychain_supo: a method on top of an algorithm
        return
    assert cfg.rl.algorithm == algo
    assert name == f"{cfg.env.name}_{algo}"


def test_recipes():
    dapo = _get("kv_search_dapo")
    assert (dapo.rl.algorithm, dapo.rl.eps_low, dapo.rl.eps_high) == ("dapo", 0.2, 0.28)
    assert dapo.rl.kl_coef == 0.0 and dapo.rl.agg == "token-mean"
    assert dapo.rl.overlong_cache_len > 0 and dapo.rl.oversample > 1
    env = envs.make("kv_search", **dict(dapo.env.kwargs))
    assert dapo.rl.overlong_cache_len < env.max_turns * env.action_len
    dr = _get("guess_number_dr_grpo")
    assert dr.rl.agg == "seq-mean-token-sum-norm" and dr.rl.kl_coef == 0.0
    grpo = _get("kv_search_grpo")
    assert (grpo.rl.agg, grpo.rl.kl_kind, grpo.rl.kl_coef) == ("seq-mean-token-mean", "k3", 0.04)
    assert grpo.rollout.temperature == 0.5       # sampled success at 1.0 too low to learn from
    ppo = _get("maze_ppo")
    assert dict(ppo.rl.advantage_kwargs) == {"gamma": 1.0, "lam": 0.95}
    assert ppo.rl.kl_in_reward and ppo.rl.kl_coef == 0.01
    gigpo = _get("maze_gigpo")
    assert dict(gigpo.rl.advantage_kwargs) == {"gamma": 0.95, "omega": 1.0, "norm": "mean"}
    rpp = _get("bandit_reinforce_pp")
    assert rpp.rollout.group_size == 1 and rpp.rl.kl_in_reward
    with pytest.raises(ValueError, match="'not_an_algorithm' is not registered"):
        recipes.recipe("maze", "not_an_algorithm")


def test_env_kwargs_expose_every_knob():
    for name in envs.registered():
        kw = recipes.env_kwargs(name)
        params = [p for p in inspect.signature(envs.env_class(name).__init__).parameters
                  if p != "self"]
        assert set(kw.keys()) == set(params), name
        env = envs.make(name, **dict(kw))            # defaults (placeholders are None) work
        assert env.max_turns >= 1
    kw = recipes.env_kwargs("kv_search", hops=3)
    assert kw.hops == 3 and kw.max_turns is None
    kw.max_turns = 9                                 # a typed placeholder accepts its type
    assert envs.make("kv_search", **dict(kw)).max_turns == 9
    with pytest.raises(ValueError, match="no knob"):
        recipes.env_kwargs("kv_search", hopz=3)


def test_load_applies_and_checks_overrides():
    cfg = configs.load("kv_search_ppo", {"model.d_model": 64, "env.kwargs.hops": 3})
    assert cfg.model.d_model == 64 and cfg.env.kwargs.hops == 3
    with pytest.raises(ValueError, match=r"config.model.d_modl.*did you mean config.model.d_model"):
        configs.load("kv_search_ppo", {"model.d_modl": 64})
    with pytest.raises(ValueError, match="model.d_model"):
        configs.load("kv_search_ppo", {"model.d_model": "wide"})
    with pytest.raises(ValueError, match="unknown config"):
        configs.load("no_such_config")


# ----------------------------------------------------------------------------- no dead fields
@functools.lru_cache(maxsize=1)
def _read_names() -> frozenset[str]:
    """Field names something can read, from the package sources (configs excluded): attribute
    names, constant subscript / ``getattr`` / ``get`` / ``.get`` keys, and the strings of module-level
    key lists (``AXES = ("data", "fsdp", "tensor")``, read as ``cfg[k] for k in AXES``)."""
    names: set[str] = set()
    for top in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if os.path.join("experiments", "configs") in dirpath:
                continue
            for f in files:
                if not f.endswith(".py"):
                    continue
                with open(os.path.join(dirpath, f)) as fh:
                    tree = ast.parse(fh.read())
                for node in tree.body:      # key lists, e.g. AXES = ("data", "fsdp", "tensor")
                    if (isinstance(node, (ast.Assign, ast.AnnAssign))
                            and isinstance(node.value, (ast.Tuple, ast.List, ast.Set))
                            and all(isinstance(t, ast.Name) and t.id.isupper()
                                    for t in (node.targets if isinstance(node, ast.Assign)
                                              else [node.target]))):
                        names.update(str(e.value) for e in node.value.elts
                                     if isinstance(e, ast.Constant) and isinstance(e.value, str))
                for node in ast.walk(tree):
                    if isinstance(node, ast.Attribute):
                        names.add(node.attr)
                    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                        names.add(str(node.slice.value))
                    elif isinstance(node, ast.Call):
                        args = node.args
                        if (isinstance(node.func, ast.Name) and node.func.id == "getattr"
                                and len(args) >= 2 and isinstance(args[1], ast.Constant)):
                            names.add(str(args[1].value))
                        elif (args and isinstance(args[0], ast.Constant) and "get" in (
                                getattr(node.func, "attr", None), getattr(node.func, "id", None))):
                            names.add(str(args[0].value))
    return frozenset(names)


@pytest.mark.parametrize("name", NAMES)
def test_every_config_field_is_read(name):
    read = _read_names()
    cfg = _get(name)
    algorithm = ALGORITHMS[cfg.rl.algorithm]
    env_params = set(inspect.signature(envs.env_class(cfg.env.name).__init__).parameters) - {"self"}
    unread = []
    for key in flat_config(cfg):
        parts = key.split(".")
        if parts[:2] == ["env", "kwargs"] and len(parts) == 3:
            ok = parts[2] in env_params                 # passed to envs.make(name, **kwargs)
        elif parts[:2] == ["rl", "advantage_kwargs"] and len(parts) == 3:
            ok = parts[2] in estimator_hparams(algorithm.estimator)   # compute_advantages(**kw)
        else:
            ok = all(p in read for p in parts)
        if not ok:
            unread.append(key)
    assert not unread, f"config {name}: fields that nothing reads: {unread}"


def test_dead_field_detector_can_fail():
    read = _read_names()
    assert {"d_model", "kl_coef", "overlong_cache_len", "log_every", "eval_episodes"} <= read
    assert "definitely_not_a_read_field" not in read
    assert "get_config" not in read        # configs/ is not scanned: builders are not readers


# ----------------------------------------------------------------------------- choosing a recipe
RECIPE_KEYS = ("rollout.num_groups", "rollout.group_size", "rl.agg", "rl.kl_coef", "rl.kl_kind",
               "rl.kl_in_reward", "rl.value_coef", "rl.value_clip", "rl.eps_high",
               "rl.policy_loss", "rl.overlong_cache_len")


def _field(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _parse(argv):
    """The config absl's ``config_flags`` builds from ``argv`` after ``route_choices``."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()   # override flags are declared from the argv, as sys.argv in train
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    fv(configs.route_choices(argv))
    return fv.config


@pytest.mark.parametrize("algo", ["ppo", "dapo", "archer"])
def test_choosing_an_algorithm_on_the_command_line_gives_its_recipe(algo):
    """``--config.rl.algorithm=ALGO`` on default.py: ALGO's own recipe (group size, KL, loss and
    estimator settings) with default.py's edits on top, not GRPO's settings under ALGO's name."""
    path = configs.config_path("default")
    cfg = _parse(["train", "--config", path, f"--config.rl.algorithm={algo}",
                  "--config.total_updates=7"])
    want = recipes.recipe("guess_number", algo)
    grpo = recipes.recipe("guess_number", "grpo")
    for key in RECIPE_KEYS:
        assert _field(cfg, key) == _field(want, key), key
    assert dict(cfg.rl.advantage_kwargs) == dict(want.rl.advantage_kwargs)
    assert any(_field(want, k) != _field(grpo, k) for k in RECIPE_KEYS)    # the test can fail
    assert cfg.bc.epsilon == 0.4 and cfg.rollout.temperature == 0.5    # default.py's edits
    assert cfg.total_updates == 7                                       # overrides on top
    # the file's argument and configs.load give the same config
    assert cfg.to_json() == _parse(["train", f"--config={path}:algo={algo}",
                                    "--config.total_updates=7"]).to_json()
    assert configs.load("default", {"rl.algorithm": algo, "total_updates": 7}).to_json() == \
        cfg.to_json()


def test_choosing_a_task_and_contradictions():
    path = configs.config_path("default")
    cfg = _parse(["train", "--config", path, "--config.env.name=kv_search",
                  "--config.rl.algorithm=ppo"])
    want = recipes.recipe("kv_search", "ppo")
    assert cfg.env.to_json() == want.env.to_json() and cfg.rl.algorithm == "ppo"
    with pytest.raises(ValueError, match=r"--config.rl.algorithm=ppo contradicts .*algo=grpo"):
        configs.route_choices(["train", f"--config={path}:algo=grpo", "--config.rl.algorithm=ppo"])
    one_task = configs.config_path("calculator_grpo")
    with pytest.raises(ValueError, match=r"--config.env.name=maze: config argument 'env' is not "
                                         r"taken by this config file"):
        configs.route_choices(["train", "--config", one_task, "--config.env.name=maze"])
    assert _parse(["train", "--config", one_task, "--config.rl.algorithm=rloo"]).to_json() == \
        configs.load("calculator_rloo").to_json()


def test_set_overrides_take_the_fields_types():
    """``--set KEY=VALUE`` of the benchmarks: texts become the replaced field's type (a bool from
    "False" is False, not ``bool("False")``); bad keys and values give one line."""
    cfg = configs.load("guess_number_grpo")
    cfg.unlock()
    overrides = configs.parse_set_args([
        "rollout.continuous.until_full=False", "rollout.mode=continuous", "total_updates=7",
        "optim.lr=2e-4", "rl.kl_coef=1", "bc.epsilon=0.25"])
    configs.apply_overrides(cfg, overrides)
    assert cfg.rollout.continuous.until_full is False and cfg.rollout.mode == "continuous"
    assert cfg.total_updates == 7 and cfg.optim.lr == 2e-4 and cfg.bc.epsilon == 0.25
    assert isinstance(cfg.rl.kl_coef, float) and cfg.rl.kl_coef == 1.0
    configs.apply_overrides(cfg, {"rollout.continuous.until_full": "TRUE"})
    assert cfg.rollout.continuous.until_full is True
    with pytest.raises(ValueError, match=r"'maybe' cannot be read as bool"):
        configs.apply_overrides(cfg, {"rollout.continuous.until_full": "maybe"})
    with pytest.raises(ValueError, match=r"'1.5' cannot be read as int"):
        configs.apply_overrides(cfg, {"total_updates": "1.5"})
    with pytest.raises(ValueError, match=r"did you mean config.rollout.mode"):
        configs.apply_overrides(cfg, {"rollout.mdoe": "sync"})
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        configs.parse_set_args(["total_updates"])


def test_task_config_is_the_file_when_there_is_one_else_the_recipe():
    assert configs.task_config("kv_search", "ppo").to_dict() == _get("kv_search_ppo").to_dict()
    assert "maze_grpo" not in NAMES
    assert configs.task_config("maze", "grpo").to_dict() == recipes.recipe("maze", "grpo").to_dict()
