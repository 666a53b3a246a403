"""The compiled (non-interpret) kernels lower for GPU (Pallas -> Triton) and TPU (Pallas ->
Mosaic) on this CPU-only machine. This catches unsupported ops, non-power-of-two Triton
tiles and Mosaic block-shape violations; the final Triton / Mosaic compilation needs the
device (benchmarks/gpu_kernels_check.py runs it on a GPU)."""
import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk

SD = jax.ShapeDtypeStruct
PLATFORM = {"gpu": "cuda", "tpu": "tpu"}


def lower(fn, *args, backend):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(PLATFORM[backend],)).as_text()
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    assert marker in text, f"no {marker} custom call in the lowered module"
    return text


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("t,s,h,hkv,d,causal,seg", [
    (100, 100, 8, 2, 64, True, True),     # odd T, GQA 4, packed segments
    (70, 130, 4, 1, 8, True, False),      # T != S causal, tiny head dim (padded)
    (130, 70, 2, 1, 32, False, False),    # non-causal cross attention, padded keys
    (200, 200, 8, 2, 64, False, True),    # non-causal segments
])
def test_flash_attention_lowers(backend, t, s, h, hkv, d, causal, seg):
    q, k = SD((2, t, h, d), jnp.bfloat16), SD((2, s, hkv, d), jnp.bfloat16)
    segs = SD((2, t), jnp.int32) if seg else None

    def loss(q, k, v, segs):
        o = pk.flash_attention(q, k, v, causal=causal, segment_ids=segs, interpret=False,
                               backend=backend)
        return o.astype(jnp.float32).sum()

    text = lower(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, segs, backend=backend)
    for name in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
        assert name in text


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_decode_and_scans_lower(backend):
    kw = dict(interpret=False, backend=backend)
    lower(lambda q, k, v, n: pk.flash_decode(q, k, v, n, **kw), SD((4, 8, 128), jnp.bfloat16),
          SD((4, 1000, 2, 128), jnp.bfloat16), SD((4, 1000, 2, 128), jnp.bfloat16),
          SD((4,), jnp.int32), backend=backend)
    # the cached model path: 4 query positions x 4 heads per kv head as one tile, with lse
    lower(lambda q, k, v, n: pk.flash_decode(q, k, v, n, return_lse=True, **kw),
          SD((4, 32, 128), jnp.bfloat16), SD((4, 1000, 2, 128), jnp.bfloat16),
          SD((4, 1000, 2, 128), jnp.bfloat16), SD((4,), jnp.int32), backend=backend)
    r = SD((37, 101), jnp.float32)
    lower(lambda r, v, g, lam: pk.gae(r, v, g, lam, **kw), r, SD((37, 102), jnp.float32), r, r,
          backend=backend)
    lower(lambda r, g, b: pk.discounted_returns(r, g, b, **kw), r, r, SD((37,), jnp.float32),
          backend=backend)
    lower(lambda r, v, m: pk.masked_gae(r, v, m, 0.99, 0.95, **kw), r, r,
          SD((37, 101), jnp.bool_), backend=backend)
