"""Pure-functional Flax models: a Llama-style decoder trunk with policy / value / reward heads,
KV-cached decoding, RoPE scalings, logical-axis sharding rules and Hugging Face checkpoint I/O."""
from models.config import ModelConfig
from models.hf_io import load_hf_checkpoint, save_hf_checkpoint
from models.kv_cache import KVCache, decode_step, init_cache, prefill
from models.rope import apply_rope, rope_frequencies
from models.sharding import (LOGICAL_AXIS_RULES, logical_param_specs, mesh_param_specs,
                             param_shardings, shard_params)
from models.transformer import (PolicyModel, RewardModel, Trunk, ValueModel, count_params,
                                init_params, init_reward_from_policy, init_value_from_policy,
                                policy_hidden, stack_layer_params, unstack_layer_params)

__all__ = [
    "ModelConfig", "PolicyModel", "ValueModel", "RewardModel", "Trunk", "KVCache", "init_cache",
    "prefill", "decode_step", "init_params", "init_value_from_policy", "init_reward_from_policy",
    "policy_hidden", "stack_layer_params", "unstack_layer_params", "count_params", "load_hf_checkpoint",
    "save_hf_checkpoint", "LOGICAL_AXIS_RULES", "logical_param_specs", "mesh_param_specs",
    "param_shardings", "shard_params", "rope_frequencies", "apply_rope",
]
