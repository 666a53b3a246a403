"""Package metadata for the JAX-native RL-for-LLM-agents codebase."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6.0",
    "flax>=0.12.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "chex>=0.1.88",
    "ml-collections>=1.0.0",
    "qwix>=0.1.8",          # LoRA adapters (models.lora)
    "tokenizers>=0.20",     # local tokenizer training (models.tokenizer_training)
    "transformers>=4.45",
    "safetensors>=0.4",
    "datasets>=3.0",
    "sentencepiece>=0.2",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "numpy>=1.26",
]

EXTRAS = {
    # torch (CPU) is only used by the Hugging Face parity tests.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch>=2.1",
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "rlax>=0.1.6"],
    "hf": ["torch>=2.1", "huggingface-hub>=0.24"],
}

setup(
    name="jax-agent-rl",
    version="0.1.0",
    description="One-XLA-program reinforcement learning for multi-turn, tool-using LLM agents",
    packages=find_packages(include=["models*", "envs*", "rl_agents*", "pallas_kernels*",
                                    "experiments*", "benchmarks*"]),
    package_data={"experiments": ["notebooks/*.ipynb", "tpu_vm/*.sh"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
