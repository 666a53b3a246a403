"""Registry of RL algorithms, keyed by ``config.rl.algorithm``.

An algorithm names its advantage estimator (see ``rl_agents.advantages``), whether it trains a
critic (value model), whether it uses DAPO's dynamic sampling, and which trainer runs it
(``rl_agents.summarization.make_trainer``: "default" = ``rl_agents.trainer.Trainer``,
"archer" = ``rl_agents.archer.ArcherTrainer``). Everything else (clip range,
aggregation, KL, entropy) is a loss setting in ``config.rl`` shared by all algorithms; the
configs in ``experiments/configs`` set each paper's recipe. ``unsupported_option(config)``
names the option combinations the trainers refuse.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Algorithm:
    advantage: str
    critic: bool
    dynamic_sampling: bool = False
    doc: str = ""
    trainer: str = "default"


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm("gae", True, doc="PPO with token-level GAE over agent tokens"),
    "turn_ppo": Algorithm("turn_gae", True, doc="PPO with turn-level GAE"),
    "bilevel_ppo": Algorithm("bilevel_gae", True, doc="RAGEN's bi-level GAE"),
    "grpo": Algorithm("grpo", False, doc="GRPO: group mean / std normalised outcome"),
    "dr_grpo": Algorithm("dr_grpo", False, doc="Dr. GRPO: group mean only"),
    "rloo": Algorithm("rloo", False, doc="REINFORCE leave-one-out"),
    "reinforce_pp": Algorithm("reinforce_pp", False, doc="REINFORCE++: batch-normalised returns"),
    "reinforce_pp_baseline": Algorithm("reinforce_pp_baseline", False,
                                       doc="REINFORCE++ with group-mean baseline"),
    "gigpo": Algorithm("gigpo", False, doc="GiGPO: episode group + step groups"),
    "dapo": Algorithm("grpo", False, dynamic_sampling=True,
                      doc="DAPO: GRPO advantages + dynamic sampling (clip-higher etc. in config)"),
    "archer": Algorithm("turn_gae", True, trainer="archer",
                        doc="ArCHer: off-policy turn-level TD critic (replay buffer, Polyak target) "
                            "whose turn GAE (λ=0: r + γV(s') − V(s)) drives a PPO-clip token policy"),
}


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
