"""The algorithm registry: one record per ``config.rl.algorithm``.

An algorithm is an ``Algorithm`` record, not a trainer subclass. It names

* ``estimator``: its advantage estimator (``rl_agents.advantages.ADVANTAGE_ESTIMATORS``);
* ``policy_loss``: its default policy loss (``rl_agents.losses.POLICY_LOSSES``; a config may
  choose another with ``rl.policy_loss``);
* ``critic``: whether a value model is trained; ``group_relative``: whether its estimator
  compares the G rollouts of one task instance (then ``rollout.group_size`` >= 2);
* ``dynamic_sampling``: DAPO's oversample-and-filter stage before the update;
* ``stage``: an extra stage with its own state, by name (``"archer"``: the off-policy turn
  critic of ``rl_agents.archer``, which replaces the estimator's advantages);
* ``rl`` / ``advantage_kwargs``: its published recipe, the ``config.rl`` settings and estimator
  hyper-parameters that ``experiments.configs.recipes.recipe`` writes into a config;
* ``paper``: where the method comes from.

``unsupported_option(config)`` names the option combinations the update refuses.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Mapping


def _frozen(d: Mapping) -> types.MappingProxyType:
    return types.MappingProxyType({k: (_frozen(v) if isinstance(v, Mapping) else v)
                                   for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    estimator: str
    critic: bool
    group_relative: bool
    rl: Mapping = dataclasses.field(default_factory=dict)
    advantage_kwargs: Mapping = dataclasses.field(default_factory=dict)
    policy_loss: str = "ppo"
    dynamic_sampling: bool = False
    stage: str | None = None
    paper: str = ""
    doc: str = ""

    def __post_init__(self):
        object.__setattr__(self, "rl", _frozen(self.rl))
        object.__setattr__(self, "advantage_kwargs", _frozen(self.advantage_kwargs))


#: KL to the reference policy as a per-token reward penalty (k1, β = 0.01).
_KL_IN_REWARD = dict(kl_coef=0.01, kl_kind="k1", kl_in_reward=True)
_CRITIC_LOSS = dict(value_coef=0.5, value_clip=0.2)

_REGISTRY = (
    Algorithm("ppo", "gae", critic=True, group_relative=False,
              rl=dict(agg="token-mean", **_CRITIC_LOSS, **_KL_IN_REWARD),
              advantage_kwargs=dict(gamma=1.0, lam=0.95),
              paper="https://arxiv.org/abs/1707.06347",
              doc="PPO with token-level GAE over agent tokens"),
    Algorithm("turn_ppo", "turn_gae", critic=True, group_relative=False,
              rl=dict(agg="token-mean", **_CRITIC_LOSS, **_KL_IN_REWARD),
              advantage_kwargs=dict(gamma=0.99, lam=0.9),
              doc="PPO with turn-level GAE, V(s_k) read before the turn"),
    Algorithm("bilevel_ppo", "bilevel_gae", critic=True, group_relative=False,
              rl=dict(agg="token-mean", **_CRITIC_LOSS, **_KL_IN_REWARD),
              advantage_kwargs=dict(gamma_turn=0.95, lam_turn=1.0, gamma_token=1.0,
                                    lam_token=1.0, whiten=True),
              paper="https://arxiv.org/abs/2504.20073",
              doc="RAGEN's bi-level GAE"),
    Algorithm("grpo", "grpo", critic=False, group_relative=True,
              rl=dict(agg="seq-mean-token-mean", kl_coef=0.04, kl_kind="k3", kl_in_reward=False),
              advantage_kwargs=dict(eps=1e-6, unbiased=True),
              paper="https://arxiv.org/abs/2402.03300",
              doc="GRPO: group mean / std normalised outcome"),
    Algorithm("dr_grpo", "dr_grpo", critic=False, group_relative=True,
              rl=dict(agg="seq-mean-token-sum-norm", kl_coef=0.0),
              paper="https://arxiv.org/abs/2503.20783",
              doc="Dr. GRPO: group mean only, length-unbiased aggregation"),
    Algorithm("rloo", "rloo", critic=False, group_relative=True,
              rl=dict(agg="token-mean", **_KL_IN_REWARD),
              paper="https://arxiv.org/abs/2402.14740",
              doc="REINFORCE leave-one-out"),
    Algorithm("reinforce_pp", "reinforce_pp", critic=False, group_relative=False,
              rl=dict(agg="token-mean", **_KL_IN_REWARD), advantage_kwargs=dict(gamma=1.0),
              paper="https://arxiv.org/abs/2501.03262",
              doc="REINFORCE++: batch-normalised returns"),
    Algorithm("reinforce_pp_baseline", "reinforce_pp_baseline", critic=False,
              group_relative=True, rl=dict(agg="token-mean", **_KL_IN_REWARD),
              advantage_kwargs=dict(gamma=1.0),
              paper="https://arxiv.org/abs/2501.03262",
              doc="REINFORCE++ with group-mean baseline"),
    Algorithm("gigpo", "gigpo", critic=False, group_relative=True,
              rl=dict(agg="token-mean", kl_coef=0.01, kl_kind="k3", kl_in_reward=False),
              advantage_kwargs=dict(gamma=0.95, omega=1.0, norm="mean"),
              paper="https://arxiv.org/abs/2505.10978",
              doc="GiGPO: episode group + step groups"),
    Algorithm("dapo", "grpo", critic=False, group_relative=True, dynamic_sampling=True,
              rl=dict(eps_low=0.2, eps_high=0.28, agg="token-mean", kl_coef=0.0, oversample=2.0),
              advantage_kwargs=dict(eps=1e-6, unbiased=True),
              paper="https://arxiv.org/abs/2503.14476",
              doc="DAPO: GRPO advantages, clip-higher, token-mean, dynamic sampling, overlong "
                  "penalty"),
    Algorithm("gspo", "grpo", critic=False, group_relative=True, policy_loss="gspo",
              rl=dict(eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean", kl_coef=0.0),
              advantage_kwargs=dict(eps=1e-6, unbiased=True),
              paper="https://arxiv.org/abs/2507.18071",
              doc="GSPO: GRPO advantages, sequence-level length-normalised importance ratio "
                  "clipped per sequence"),
    Algorithm("cispo", "grpo", critic=False, group_relative=True, policy_loss="cispo",
              rl=dict(eps_low=1.0, eps_high=0.28, agg="token-mean", kl_coef=0.0),
              advantage_kwargs=dict(eps=1e-6, unbiased=True),
              paper="https://arxiv.org/abs/2506.13585",
              doc="CISPO: GRPO advantages, REINFORCE token loss weighted by the clipped "
                  "stop-gradient importance ratio (no lower bound)"),
    Algorithm("archer", "turn_gae", critic=True, group_relative=False, stage="archer",
              rl=dict(agg="token-mean", kl_coef=0.0,
                      archer=dict(tau=0.1, replay_episodes=512, critic_updates=8,
                                  critic_batch=32, critic_lr=5e-4, whiten=False)),
              advantage_kwargs=dict(gamma=0.95, lam=0.0),
              paper="https://arxiv.org/abs/2402.19446",
              doc="ArCHer: off-policy turn-level TD critic (replay buffer, Polyak target) whose "
                  "turn advantage r + γV(s') − V(s) drives a PPO-clip token policy"),
)

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in _REGISTRY}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` to ``ALGORITHMS`` (then ``config.rl.algorithm = algorithm.name`` and
    ``recipe(env, algorithm.name)`` work). Its estimator and policy loss must be registered;
    a name already taken raises ValueError."""
    from rl_agents.advantages import ADVANTAGE_ESTIMATORS, needs_critic
    from rl_agents.losses import POLICY_LOSSES

    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    if algorithm.estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm {algorithm.name!r}: estimator {algorithm.estimator!r} is not "
                         f"registered (rl_agents.advantages.register_estimator)")
    if algorithm.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"algorithm {algorithm.name!r}: policy loss {algorithm.policy_loss!r} is "
                         f"not one of {sorted(POLICY_LOSSES)}")
    if needs_critic(algorithm.estimator) and not algorithm.critic:
        raise ValueError(f"algorithm {algorithm.name!r}: estimator {algorithm.estimator!r} reads "
                         f"critic values; set critic=True")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def _get(node, dotted: str, default=None):
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def unsupported_option(config) -> str | None:
    """The one-line reason (naming the field) why a trainer refuses ``config``'s combination
    of algorithm and options, or None. The rest of the estimator × option matrix is supported:
    each option is folded into what the estimator reads (docs/algorithms.md, "What each option
    changes").

    * ``reward.source = "learned"`` with dynamic sampling (``dapo``): the filter keeps groups by
      the env's success labels (0 < #successes < G); with a learned reward the outcome the
      policy is trained on is the RM's score, so filtering on env success would select on a
      signal the run is not supposed to see.
    * ``context.mode = "supo"`` (summarization) with a critic, KL-in-reward, the overlong
      penalty (SUPO masks overlong episodes instead), a learned reward or PRIME process
      rewards: its segment rows get their outcome advantage from the episode's return only.
    """
    name = _get(config, "rl.algorithm")
    if name not in ALGORITHMS:
        return None                                    # get_algorithm names the problem
    algorithm = ALGORITHMS[name]
    source = _get(config, "reward.source", "env")
    process = bool(_get(config, "reward.process.enabled", False))
    kl_in_reward = float(_get(config, "rl.kl_coef", 0.0)) > 0 and bool(
        _get(config, "rl.kl_in_reward", False))
    if algorithm.dynamic_sampling and source == "learned":
        return (f"config.reward.source='learned' is not supported with config.rl.algorithm="
                f"{name!r}: dynamic sampling keeps groups by the env's success labels "
                f"(0 < #successes < G), not by the learned reward")
    if _get(config, "context.mode", "full") == "supo":
        if algorithm.critic:
            return (f"config.rl.algorithm={name!r} trains a critic; SUPO (config.context.mode="
                    f"'supo') supports the critic-free outcome estimators (e.g. grpo)")
        if kl_in_reward:
            return ("config.rl.kl_in_reward=True is not supported with SUPO (config.context."
                    "mode='supo'); use the KL loss (kl_in_reward=False)")
        if int(_get(config, "rl.overlong_cache_len", 0)) > 0:
            return (f"config.rl.overlong_cache_len={_get(config, 'rl.overlong_cache_len')}: "
                    f"DAPO's overlong penalty is not used with SUPO (config.context.mode="
                    f"'supo' masks overlong episodes)")
        if source == "learned":
            return ("config.reward.source='learned' is not supported with SUPO "
                    "(config.context.mode='supo'): its advantages read the env's outcome")
        if process:
            return ("config.reward.process.enabled=True is not supported with SUPO "
                    "(config.context.mode='supo'): its advantages read the env's outcome")
    return None


def check_options(config) -> None:
    """Raise ValueError with ``unsupported_option(config)``'s line, if any."""
    msg = unsupported_option(config)
    if msg is not None:
        raise ValueError(msg)


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"config.rl.algorithm={name!r} is not registered; choose one of "
                         f"{sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
