"""Config validation before anything is compiled: one clear line per mistake.

``check_config(config, num_devices)`` is the one start-up check (``experiments.train`` and
``rl_agents.make_trainer`` run it): :func:`validate_config` (the structural :data:`CHECKS`:
sizes, mesh = device count, divisibility, dtypes, optimizer) and then the registries (algorithm,
policy loss, aggregation, KL estimator, estimator hyper-parameters, env knobs, option
combinations, BC). The first problem raises :class:`ConfigError` (a ``ValueError``) naming the
field and its value, e.g.::

    config.mesh: data*fsdp*tensor = 2*2*1 = 4 but 8 devices are visible

Each structural check is a small function ``check(config, ctx) -> str | None`` (the error line
or None). Fields missing from the config are reported for the required keys and skipped
otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["ConfigError", "check_config", "validate_config", "CHECKS", "DTYPES", "LR_DECAYS",
           "batch_size"]


class ConfigError(ValueError):
    """An invalid experiment config (the message is one line naming field and value)."""


DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTION_IMPLS = ("auto", "xla", "pallas")
#: ``config.optim.decay`` values (read by ``rl_agents.trainer.lr_schedule``).
LR_DECAYS = ("constant", "cosine", "linear")
REQUIRED = ("seed", "total_updates", "eval_every", "checkpoint_every", "mesh.data", "mesh.fsdp",
            "mesh.tensor")

_MISSING = object()


@dataclass(frozen=True)
class Context:
    num_devices: int
    registered_envs: tuple[str, ...] | None


def _get(config: Any, dotted: str) -> Any:
    """``config.a.b`` for ConfigDicts, dicts or plain objects; ``_MISSING`` when absent."""
    node = config
    for part in dotted.split("."):
        if hasattr(node, "keys") and hasattr(node, "__getitem__"):
            try:
                node = node[part]
            except KeyError:
                return _MISSING
        else:
            node = getattr(node, part, _MISSING)
            if node is _MISSING:
                return _MISSING
    return node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or (
        hasattr(v, "dtype") and getattr(v, "shape", None) == () and str(v.dtype).startswith("int"))


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or _is_int(v)


def batch_size(config: Any) -> int:
    """Rollouts per update: ``rollout.num_groups * rollout.group_size``."""
    return int(_get(config, "rollout.num_groups")) * int(_get(config, "rollout.group_size"))


# ----------------------------------------------------------------------------- checks
def check_required(config, ctx):
    for f in REQUIRED:
        if _get(config, f) is _MISSING:
            return f"config.{f} is missing"
    return None


def _positive_ints(fields: Sequence[str], minimum: int = 1):
    def check(config, ctx):
        for f in fields:
            v = _get(config, f)
            if v is _MISSING:
                continue
            if not _is_int(v) or int(v) < minimum:
                kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                return f"config.{f} must be {kind}, got {v!r}"
        return None
    check.__name__ = f"check_ints_ge_{minimum}"
    return check


check_mesh_sizes = _positive_ints(("mesh.data", "mesh.fsdp", "mesh.tensor"))
check_positive_sizes = _positive_ints((
    "eval_every", "checkpoint_every", "log_every", "keep_checkpoints",
    "rollout.num_groups", "rollout.group_size", "rollout.eval_episodes",
    "rl.epochs", "rl.minibatches", "rl.max_nonfinite_updates",
    "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff"))
check_non_negative = _positive_ints(("total_updates", "optim.warmup_steps", "rollout.top_k"), minimum=0)


def check_seed(config, ctx):
    v = _get(config, "seed")
    if v is not _MISSING and not _is_int(v):
        return f"config.seed must be an integer, got {v!r}"
    return None


def check_mesh_product(config, ctx):
    d, f, t = (int(_get(config, f"mesh.{a}")) for a in ("data", "fsdp", "tensor"))
    if d * f * t != ctx.num_devices:
        return (f"config.mesh: data*fsdp*tensor = {d}*{f}*{t} = {d * f * t} but "
                f"{ctx.num_devices} devices are visible")
    return None


def check_batch_divisible(config, ctx):
    if _get(config, "rollout.num_groups") is _MISSING or _get(config, "rollout.group_size") is _MISSING:
        return None
    n, g = int(_get(config, "rollout.num_groups")), int(_get(config, "rollout.group_size"))
    shards = int(_get(config, "mesh.data")) * int(_get(config, "mesh.fsdp"))
    if (n * g) % shards:
        return (f"config.rollout: batch num_groups*group_size = {n}*{g} = {n * g} is not divisible by "
                f"mesh.data*mesh.fsdp = {shards}")
    return None


def check_group_size(config, ctx):
    from rl_agents.algorithms import ALGORITHMS

    name, g = _get(config, "rl.algorithm"), _get(config, "rollout.group_size")
    algo = ALGORITHMS.get(name) if isinstance(name, str) else None
    if algo is not None and algo.group_relative and g is not _MISSING and int(g) < 2:
        return (f"config.rollout.group_size = {g} but rl.algorithm = {name!r} is group-relative and "
                f"needs group_size >= 2")
    return None


def check_minibatches(config, ctx):
    mb = _get(config, "rl.minibatches")
    if mb is _MISSING or _get(config, "rollout.num_groups") is _MISSING \
            or _get(config, "rollout.group_size") is _MISSING:
        return None
    b, mb = batch_size(config), int(mb)
    if b % mb:
        return f"config.rl.minibatches = {mb} does not divide the batch num_groups*group_size = {b}"
    shards = int(_get(config, "mesh.data")) * int(_get(config, "mesh.fsdp"))
    if (b // mb) % shards:
        return (f"config.rl.minibatches = {mb}: minibatch size {b}/{mb} = {b // mb} is not divisible "
                f"by mesh.data*mesh.fsdp = {shards}")
    return None


def check_heads(config, ctx):
    h, kv = _get(config, "model.n_heads"), _get(config, "model.n_kv_heads")
    if h is not _MISSING and kv is not _MISSING and int(h) % int(kv):
        return f"config.model.n_heads = {h} is not divisible by model.n_kv_heads = {kv}"
    d = _get(config, "model.d_model")
    if _get(config, "model.head_dim") is _MISSING and h is not _MISSING and d is not _MISSING \
            and int(d) % int(h):
        return f"config.model.d_model = {d} is not divisible by model.n_heads = {h}"
    return None


def check_dtypes(config, ctx):
    for f in ("model.dtype", "model.param_dtype", "rollout.dtype"):
        v = _get(config, f)
        if v is not _MISSING and v not in DTYPES:
            return f"config.{f} = {v!r} is not a known dtype (one of {', '.join(DTYPES)})"
    return None


def check_attention_impl(config, ctx):
    v = _get(config, "model.attention_impl")
    if v is not _MISSING and v not in ATTENTION_IMPLS:
        return f"config.model.attention_impl = {v!r} is not one of {', '.join(ATTENTION_IMPLS)}"
    return None


def check_temperature(config, ctx):
    v = _get(config, "rollout.temperature")
    if v is not _MISSING and (not _is_num(v) or not math.isfinite(float(v)) or float(v) <= 0):
        return (f"config.rollout.temperature must be > 0, got {v!r} (greedy decoding is the "
                f"separate eval flag, not temperature 0)")
    return None


def check_top_p(config, ctx):
    v = _get(config, "rollout.top_p")
    if v is not _MISSING and (not _is_num(v) or not 0.0 < float(v) <= 1.0):
        return f"config.rollout.top_p must be in (0, 1], got {v!r}"
    return None


def check_rollout_mode(config, ctx):
    mode = _get(config, "rollout.mode")
    if mode is _MISSING or mode == "sync":
        return None
    if mode != "continuous":
        return f"config.rollout.mode = {mode!r} is not one of sync, continuous"
    for f, lo in (("slot_groups", 0), ("turns_per_update", 0), ("max_staleness", 0)):
        v = _get(config, f"rollout.continuous.{f}")
        if v is _MISSING or not _is_int(v) or v < lo:
            shown = "missing" if v is _MISSING else repr(v)
            return f"config.rollout.continuous.{f} = {shown} must be an int >= {lo}"
    for f in ("until_full", "reprefill"):
        v = _get(config, f"rollout.continuous.{f}")
        if not isinstance(v, bool):
            shown = "missing" if v is _MISSING else repr(v)
            return f"config.rollout.continuous.{f} = {shown} must be True or False"
    from rl_agents.continuous import slot_groups
    slots = slot_groups(config) * _get(config, "rollout.group_size")
    shards = _get(config, "mesh.data") * _get(config, "mesh.fsdp")
    if slots % shards:
        return (f"config.rollout.continuous.slot_groups: {slots} slots (slot_groups x group_size) "
                f"are not divisible by mesh.data x mesh.fsdp = {shards}")
    from rl_agents.algorithms import ALGORITHMS
    algo = ALGORITHMS.get(_get(config, "rl.algorithm"))
    ctx_mode = _get(config, "context.mode")
    if (algo is not None and (algo.dynamic_sampling or algo.stage)) or ctx_mode == "supo":
        return (f"config.rollout.mode = 'continuous' is not supported with config.rl.algorithm = "
                f"{_get(config, 'rl.algorithm')!r}"
                + (" and context.mode = 'supo'" if ctx_mode == "supo" else "")
                + " (dynamic sampling, ArCHer's stage and SUPO sample their own batches)")
    return None


def check_correction(config, ctx):
    from rl_agents.off_policy import CORRECTIONS
    v = _get(config, "rl.correction")
    if v is not _MISSING and v not in CORRECTIONS:
        return f"config.rl.correction = {v!r} is not one of {', '.join(CORRECTIONS)}"
    cap = _get(config, "rl.correction_cap")
    if cap is not _MISSING and (not _is_num(cap) or not float(cap) > 1.0):
        return f"config.rl.correction_cap = {cap!r} must be a number > 1"
    return None


def check_optim(config, ctx):
    lr = _get(config, "optim.lr")
    if lr is not _MISSING and (not _is_num(lr) or not math.isfinite(float(lr)) or float(lr) <= 0):
        return f"config.optim.lr must be > 0, got {lr!r}"
    decay = _get(config, "optim.decay")
    if decay is not _MISSING and decay not in LR_DECAYS:
        return f"config.optim.decay = {decay!r} is not one of {', '.join(LR_DECAYS)}"
    frac = _get(config, "optim.final_lr_fraction")
    if frac is not _MISSING and (not _is_num(frac) or not 0.0 <= float(frac) <= 1.0):
        return f"config.optim.final_lr_fraction must be in [0, 1], got {frac!r}"
    for f in ("optim.grad_clip", "optim.weight_decay"):
        v = _get(config, f)
        if v is not _MISSING and v is not None and (not _is_num(v) or float(v) < 0):
            return f"config.{f} must be >= 0, got {v!r}"
    return None


def check_env_name(config, ctx):
    name = _get(config, "env.name")
    if name is _MISSING or ctx.registered_envs is None:
        return None
    if name not in ctx.registered_envs:
        return (f"config.env.name = {name!r} is not a registered environment "
                f"(registered: {', '.join(sorted(ctx.registered_envs))})")
    return None


def check_hf_checkpoint(config, ctx):
    path = _get(config, "model.hf_checkpoint")
    tags = _get(config, "model.tags")
    if tags is not _MISSING and tags not in ("special", "text"):
        return f"config.model.tags = {tags!r} is not one of special, text"
    at = _get(config, "model.action_tokens")
    if at is not _MISSING and (not _is_int(at) or int(at) < 0 or int(at) == 1):
        return f"config.model.action_tokens must be 0 (automatic) or an int >= 2, got {at!r}"
    rank = _get(config, "model.lora.rank")
    if rank is not _MISSING:
        if not _is_int(rank) or int(rank) < 0:
            return f"config.model.lora.rank must be an int >= 0 (0: off), got {rank!r}"
        alpha = _get(config, "model.lora.alpha")
        if int(rank) > 0:
            if not _is_num(alpha) or not float(alpha) > 0:
                return f"config.model.lora.alpha must be > 0, got {alpha!r}"
            from models.lora import TARGETS
            targets = [t.strip() for t in str(_get(config, "model.lora.targets")).split(",")]
            bad = [t for t in targets if t not in TARGETS]
            if bad or not targets:
                return (f"config.model.lora.targets = {_get(config, 'model.lora.targets')!r}: "
                        f"{bad[0] if bad else '(empty)'} is not one of {', '.join(TARGETS)}")
            if _get(config, "rl.algorithm") == "archer":
                return ("config.model.lora.rank > 0 is not supported with rl.algorithm = "
                        "'archer' (its stage trains the policy with its own optimizer)")
    if path is _MISSING or not path:
        name = _get(config, "env.name")
        if ctx.registered_envs is not None and name in ctx.registered_envs:
            import envs
            if envs.env_class(name).phrases:
                return (f"config.env.name = {name!r} is a task in words: it needs a tokenizer, "
                        f"set config.model.hf_checkpoint (the 64-symbol model cannot read it)")
        return None
    if not isinstance(path, str):
        return f"config.model.hf_checkpoint must be a directory path, got {path!r}"
    from rl_agents.pretrained import check_checkpoint_dir
    problem = check_checkpoint_dir(path)
    if problem:
        return f"config.model.hf_checkpoint: {problem}"
    mode = _get(config, "context.mode")
    if mode not in (_MISSING, "full"):
        return (f"config.context.mode = {mode!r} is not supported with model.hf_checkpoint "
                f"(summarization writes the symbol vocabulary's own tags)")
    if _get(config, "reward.source") == "learned":
        return ("config.reward.source = 'learned' is not supported with model.hf_checkpoint (the "
                "reward model is built in the symbol vocabulary)")
    return None


#: The checks, in order; the first failure is raised (later checks may assume earlier ones).
CHECKS: tuple[Callable[[Any, Context], str | None], ...] = (
    check_required, check_seed, check_mesh_sizes, check_mesh_product, check_positive_sizes,
    check_non_negative, check_batch_divisible, check_group_size, check_minibatches, check_heads,
    check_dtypes, check_attention_impl, check_temperature, check_top_p, check_rollout_mode, check_correction, check_optim, check_env_name,
    check_hf_checkpoint,
)


def validate_config(config: Any, num_devices: int, registered_envs: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` with one line for the first problem in ``config``.

    ``num_devices``: ``jax.device_count()`` (all processes); ``registered_envs``:
    ``envs.registered()`` (None: the env name is not checked).
    """
    ctx = Context(int(num_devices), None if registered_envs is None else tuple(registered_envs))
    for check in CHECKS:
        msg = check(config, ctx)
        if msg is not None:
            raise ConfigError(msg)


def check_config(config, num_devices: int | None = None) -> None:
    """Everything that can be checked without compiling; raises :class:`ConfigError` (one line
    naming the field) for the first problem. ``num_devices``: ``jax.device_count()`` if None."""
    import jax

    import envs
    from rl_agents import losses
    from rl_agents.advantages import estimator_hparams
    from rl_agents.algorithms import get_algorithm, unsupported_option
    from rl_agents.bc import BC_DECAYS

    validate_config(config, jax.device_count() if num_devices is None else num_devices,
                    registered_envs=envs.registered())
    rl = config.rl
    try:
        algorithm = get_algorithm(rl.algorithm)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    unsupported = unsupported_option(config)
    if unsupported is not None:
        raise ConfigError(unsupported)
    if rl.get("policy_loss", "ppo") not in losses.POLICY_LOSSES:
        raise ConfigError(f"config.rl.policy_loss = {rl.policy_loss!r} is not one of "
                          f"{sorted(losses.POLICY_LOSSES)}")
    if rl.agg not in losses.AGGREGATIONS:
        raise ConfigError(f"config.rl.agg = {rl.agg!r} is not one of {sorted(losses.AGGREGATIONS)}")
    if rl.kl_kind not in losses.KL_ESTIMATORS:
        raise ConfigError(f"config.rl.kl_kind = {rl.kl_kind!r} is not one of "
                          f"{sorted(losses.KL_ESTIMATORS)}")
    for f in ("kl_coef", "entropy_coef", "value_coef", "value_clip", "dual_clip", "eps_low",
              "eps_high", "target_kl"):
        if float(rl.get(f, 0.0)) < 0:
            raise ConfigError(f"config.rl.{f} must be >= 0, got {rl[f]!r}")
    if rl.dual_clip and float(rl.dual_clip) <= 1.0:
        raise ConfigError(f"config.rl.dual_clip = {rl.dual_clip!r}: dual-clip needs c > 1 (0: off)")
    if int(rl.overlong_cache_len) < 0:
        raise ConfigError(f"config.rl.overlong_cache_len must be >= 0, got {rl.overlong_cache_len!r}")
    if algorithm.dynamic_sampling and float(rl.oversample) < 1.0:
        raise ConfigError(f"config.rl.oversample = {rl.oversample!r} must be >= 1 (dynamic sampling)")
    allowed = estimator_hparams(algorithm.estimator)
    unknown = sorted(set(rl.advantage_kwargs.keys()) - set(allowed))
    if unknown:
        raise ConfigError(f"config.rl.advantage_kwargs.{unknown[0]} is not a hyper-parameter of the "
                          f"{algorithm.estimator!r} advantage ({rl.algorithm}); it takes {sorted(allowed)}")
    try:
        envs.make(config.env.name, **dict(config.env.kwargs))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.env.kwargs: {' '.join(str(e).split())}") from None
    bc = config.bc
    if int(bc.episodes) < 0:
        raise ConfigError(f"config.bc.episodes must be >= 0, got {bc.episodes!r}")
    if int(bc.episodes) > 0:
        if int(bc.batch_size) < 1 or int(bc.epochs) < 1:
            raise ConfigError(f"config.bc.batch_size and config.bc.epochs must be >= 1, got "
                              f"{bc.batch_size!r}, {bc.epochs!r}")
        if int(bc.batch_size) > int(bc.episodes):
            raise ConfigError(f"config.bc.batch_size = {bc.batch_size} exceeds config.bc.episodes = "
                              f"{bc.episodes} (no full SFT batch)")
        if not 0.0 <= float(bc.epsilon) <= 1.0:
            raise ConfigError(f"config.bc.epsilon must be in [0, 1], got {bc.epsilon!r}")
        if int(bc.get("logprob_chunk", -1)) < -1:
            raise ConfigError(f"config.bc.logprob_chunk must be -1 (automatic), 0 (full logits) "
                              f"or a chunk length > 0, got {bc.logprob_chunk!r}")
        if bc.get("decay", "constant") not in BC_DECAYS:
            raise ConfigError(f"config.bc.decay = {bc.decay!r} is not one of {', '.join(BC_DECAYS)}")
