"""Pallas kernels: flash attention (+ decode) and advantage scans, each with a jnp reference.

Every kernel takes ``interpret=None`` (interpret mode on CPU, compiled on GPU / TPU) and an
optional ``backend`` ("gpu", "tpu", "cpu") that selects layout and compiler parameters, so a
CPU-only machine can lower the GPU / TPU kernels (see tests/pallas_kernels/test_lowering.py).
"""
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.decode import decode_reference, flash_decode
from pallas_kernels.scans import (discounted_returns, discounted_returns_reference, gae,
                                  gae_reference, masked_gae, masked_gae_reference)

__all__ = [
    "BlockSizes", "flash_attention", "attention_reference", "flash_decode", "decode_reference",
    "gae", "gae_reference", "discounted_returns", "discounted_returns_reference", "masked_gae",
    "masked_gae_reference",
]
