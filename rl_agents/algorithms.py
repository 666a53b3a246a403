"""Registry of RL algorithms, keyed by ``config.rl.algorithm``.

An algorithm names its advantage estimator (see ``rl_agents.advantages``), whether it trains a
critic (value model), whether it uses DAPO's dynamic sampling, and which trainer runs it
(``rl_agents.summarization.make_trainer``: "default" = ``rl_agents.trainer.Trainer``,
"archer" = ``rl_agents.archer.ArcherTrainer``). Everything else (clip range,
aggregation, KL, entropy) is a loss setting in ``config.rl`` shared by all algorithms; the
configs in ``experiments/configs`` set each paper's recipe.
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


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"config.rl.algorithm={name!r} is not registered; choose one of "
                         f"{sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
