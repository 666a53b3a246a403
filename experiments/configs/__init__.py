"""Experiment configs (one ``NAME.py`` with ``get_config()`` per (task, algorithm) pair) and the
command-line parsing shared by ``experiments.train`` / ``experiments.eval``.

    from experiments import configs
    configs.available()                                  # ['bandit_reinforce_pp', ..., 'default', ...]
    cfg = configs.load("kv_search_dapo", {"total_updates": 5, "model.d_model": 64})

On the command line the same overrides are ``--config.total_updates=5 --config.model.d_model=64``
(absl ``config_flags``; the config is locked, so a misspelt field is an error, not a new key).
:func:`parse_flags` turns every flag / override error into one ``error: ...`` line on stderr
naming the flag and exits with status 2 (absl would print a traceback for unknown fields).

Choosing another algorithm or task gives that choice's own settings: the config files take a
big_vision-style argument (``--config experiments/configs/default.py:algo=ppo,env=kv_search``,
``recipes.config_arg``) and build the chosen recipe before the overrides apply; the overrides
``--config.rl.algorithm=ppo`` / ``--config.env.name=kv_search`` are routed into that argument
(:func:`route_choices`), and so are ``load``'s ``rl.algorithm`` / ``env.name`` overrides.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any, Mapping, Sequence

import ml_collections

__all__ = ["CONFIG_DIR", "HELPER_MODULES", "available", "config_path", "load", "parse_flags",
           "override_error", "route_choices", "parse_set_args", "apply_overrides", "task_config"]

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
#: Modules of this package that build configs but are not configs themselves.
HELPER_MODULES = ("__init__", "common", "recipes")


def available() -> list[str]:
    """Names of the runnable config files (``experiments/configs/NAME.py`` with ``get_config``)."""
    names = []
    for f in sorted(os.listdir(CONFIG_DIR)):
        name, ext = os.path.splitext(f)
        if ext == ".py" and name not in HELPER_MODULES:
            names.append(name)
    return names


def config_path(name: str) -> str:
    """``experiments/configs/NAME.py`` (what ``--config`` takes)."""
    if name not in available():
        raise ValueError(f"unknown config {name!r}; available: {', '.join(available())}")
    return os.path.join(CONFIG_DIR, f"{name}.py")


def task_config(task: str, algorithm: str) -> ml_collections.ConfigDict:
    """The config of ``algorithm`` on ``task``: the file ``TASK_ALGORITHM.py`` when there is
    one, else the published ``recipes.recipe(task, algorithm)`` (unlocked, no overrides)."""
    name = f"{task}_{algorithm}"
    if name in available():
        return importlib.import_module(f"experiments.configs.{name}").get_config()
    from experiments.configs.recipes import recipe
    return recipe(task, algorithm)


def load(name: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` of config ``name`` with dotted-key ``overrides`` applied (type-checked
    like the command line: an unknown key raises ValueError naming it)."""
    if name not in available():
        raise ValueError(f"unknown config {name!r}; available: {', '.join(available())}")
    overrides = dict(overrides or {})
    choices = {k: overrides[f] for k, f in _choice_fields().items() if f in overrides}
    module = importlib.import_module(f"experiments.configs.{name}")
    arg = ",".join(f"{k}={v}" for k, v in choices.items())
    cfg = module.get_config(arg) if arg else module.get_config()
    for key, value in overrides.items():
        missing = _missing_field(cfg, key)
        if missing is not None:
            raise ValueError(f"config {name!r} has no field {missing}")
        parent, _, leaf = key.rpartition(".")
        node = _walk(cfg, parent) if parent else cfg
        try:
            setattr(node, leaf, value)
        except TypeError as e:
            raise ValueError(f"config.{key} = {value!r}: {e}") from None
    cfg.lock()
    return cfg


# ----------------------------------------------------------------------------- --set KEY=VALUE
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_set_args(items: Sequence[str]) -> dict:
    """``["KEY=VALUE", ...]`` (the repeated ``--set`` of the benchmarks and experiment scripts)
    → ``{KEY: VALUE}``; ValueError (one line) on an item without ``=``."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not KEY=VALUE")
        out[key] = text
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, str]):
    """Set ``{KEY: text}`` on ``cfg`` in place, each text converted to the type of the value it
    replaces: bool from true / false (1 / 0, yes / no; any case), int, float, str; a ``None``
    or container field from a Python literal (else the text). ValueError (one line) naming an
    unknown key (with a did-you-mean) or a text that is not of the field's type."""
    import ast
    for key, text in overrides.items():
        text = str(text)
        missing = _missing_field(cfg, key)
        if missing is not None:
            raise ValueError(f"--set {key}={text}: the config has no field {missing}")
        parent, _, leaf = key.rpartition(".")
        node = _walk(cfg, parent) if parent else cfg
        old = node[leaf]
        try:
            if isinstance(old, bool):
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError(text)
                value = text.lower() in _TRUE
            elif isinstance(old, (int, float, str)):
                value = type(old)(text)
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text
        except ValueError:
            raise ValueError(f"--set {key}={text}: {text!r} cannot be read as {type(old).__name__} "
                             f"(config.{key} = {old!r})") from None
        setattr(node, leaf, value)
    return cfg


# ----------------------------------------------------------------------------- choices
def _choice_fields() -> dict:
    from experiments.configs.recipes import ARG_KEYS
    return ARG_KEYS


def _parse_arg(arg: str) -> dict:
    out = {}
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def route_choices(argv: Sequence[str], flag: str = "config") -> list[str]:
    """``argv`` with ``--config.rl.algorithm=X`` / ``--config.env.name=Y`` also passed to the
    config file as its argument (``--config FILE.py:algo=X,env=Y``), so the file builds the
    chosen algorithm's / task's recipe and the remaining overrides apply on top (the overrides
    stay: they set the same values). Raises ValueError (one line) when the file's argument
    already chooses differently, or the file does not take the choice (a one-task file and
    ``--config.env.name``)."""
    argv = list(argv)
    spec = _config_spec(argv, flag)
    if spec is None:
        return argv
    fields = {f: k for k, f in _choice_fields().items()}
    chosen = {}
    for key, raw in _config_overrides(argv, flag):
        if key in fields and "=" in raw:
            chosen[fields[key]] = (raw.split("=", 1)[1], raw)
    if not chosen:
        return argv
    path, colon, arg = spec.partition(":")
    given = _parse_arg(arg)
    for k, (value, raw) in chosen.items():
        if k in given and given[k] != value:
            raise ValueError(f"{raw} contradicts --{flag}={spec} ({k}={given[k]})")
        given[k] = value
    new_arg = ",".join(f"{k}={v}" for k, v in given.items())
    new_spec = f"{path}:{new_arg}"
    module = _load_module(path)
    if module is None:
        return argv               # absl reports the file that cannot be loaded
    try:
        module.get_config(new_arg)
    except Exception as e:  # noqa: BLE001 - the file's own one-line reason
        raw = " ".join(c[1] for c in chosen.values())
        raise ValueError(f"{raw}: {' '.join(str(e).split())}") from None
    out = []
    skip_next = False
    for i, a in enumerate(argv):
        if skip_next:
            skip_next = False
            out.append(new_spec)
            continue
        if a in (f"--{flag}", f"-{flag}") and i + 1 < len(argv) and argv[i + 1] == spec:
            skip_next = True
            out.append(a)
        elif a in (f"--{flag}={spec}", f"-{flag}={spec}"):
            out.append(a.split("=", 1)[0] + "=" + new_spec)
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------- flag parsing
def _walk(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _missing_field(cfg, dotted: str) -> str | None:
    """``None`` if ``cfg`` has the field ``dotted``, else a description of the first missing
    component with a did-you-mean suggestion."""
    node, done = cfg, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = "config." + ".".join(done + [part])
            close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
            hint = f" (did you mean config.{'.'.join(done + [close[0]])}?)" if close else ""
            if not hasattr(node, "keys"):
                hint = f" (config.{'.'.join(done)} is a {type(node).__name__} value, not a group)"
            elif not keys:
                hint = f" (config.{'.'.join(done)} is empty in this config file)"
            return f"{where!r}{hint}"
        node = node[part]
        done.append(part)
    return None


def _config_spec(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of ``--config=PATH`` / ``--config PATH`` in ``argv``."""
    args = list(argv[1:])
    for i, arg in enumerate(args):
        for prefix in (f"--{flag}=", f"-{flag}="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
        if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(args):
            return args[i + 1]
    return None


def _load_module(path: str):
    """The config file at ``path`` as a module; None if it cannot be loaded."""
    import importlib.util

    try:
        mod_spec = importlib.util.spec_from_file_location("_config_file", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 - absl reports the load error itself
        return None


def _load_file(spec: str):
    """``get_config()`` of a ``path.py[:arg]`` config spec; None if it cannot be loaded."""
    path, _, arg = spec.partition(":")
    module = _load_module(path)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - only used to explain another error
        return None


def _config_overrides(argv: Sequence[str], flag: str = "config") -> list[tuple[str, str]]:
    """``[(dotted_key, raw_arg)]`` of the ``--config.KEY[=VALUE]`` arguments in ``argv``."""
    out = []
    prefix = f"--{flag}."
    for arg in argv[1:]:
        a = "--" + arg[1:] if arg.startswith(f"-{flag}.") else arg
        if a.startswith(prefix):
            out.append((a[len(prefix):].split("=", 1)[0], arg))
    return out


def override_error(exc: BaseException, argv: Sequence[str], flag: str = "config") -> str:
    """One line describing why parsing ``argv`` failed (naming the bad ``--config.KEY``)."""
    from absl import flags as absl_flags

    cfg = None
    if flag in absl_flags.FLAGS:
        try:
            cfg = absl_flags.FLAGS[flag].value
        except Exception:  # noqa: BLE001 - not parsed yet
            cfg = None
    if cfg is None:                  # overrides failed part-way: load the file again
        spec = _config_spec(argv, flag)
        cfg = _load_file(spec) if spec else None
    if cfg is not None and hasattr(cfg, "keys"):
        for key, raw in _config_overrides(argv, flag):
            missing = _missing_field(cfg, key)
            if missing is not None:
                return f"{raw}: the config has no field {missing}"
    msg = str(exc).strip().splitlines()
    first = msg[0].strip("'\"") if msg else type(exc).__name__
    return f"invalid command line ({type(exc).__name__}: {first})"


def _load_error(argv: Sequence[str], exc: BaseException) -> str:
    # config_flags words it "Failed loading config file ...\n  Attempted ...\n  [Errno 2] ..."
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return (f"--config={_config_spec(argv) or ''}: cannot load the config file "
            f"({type(root).__name__}: {lines[-1] if lines else ''})")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl ``flags_parser`` for ``app.run``: parse ``argv`` or exit(2) with one error line."""
    from absl import flags as absl_flags

    try:
        argv = route_choices(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        rest = absl_flags.FLAGS(list(argv))
        if "config" in absl_flags.FLAGS:
            # config_flags defers a config file's load error to the first access
            list(absl_flags.FLAGS.config.keys())
        return rest
    except absl_flags.Error as e:
        line = " ".join(str(e).split())
        print(f"error: {line} (see --helpfull)", file=sys.stderr)
    except OSError as e:           # the config file is missing / unreadable
        print(f"error: {_load_error(argv, e)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - overrides of unknown fields, a failing get_config()
        spec = _config_spec(argv)
        if spec and _load_file(spec) is None:
            print(f"error: {_load_error(argv, e)}", file=sys.stderr)
        else:
            print(f"error: {override_error(e, argv)}", file=sys.stderr)
    sys.exit(2)
