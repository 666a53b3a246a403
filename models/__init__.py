"""Pure-functional Flax models: policy / value / reward heads on a Llama-style trunk."""
from models._lead_core import (LOGICAL_AXIS_RULES, KVCache, ModelConfig, PolicyModel,
                               RewardModel, ValueModel, count_params, decode_step, init_cache,
                               init_params, init_reward_from_policy, init_value_from_policy,
                               prefill)
