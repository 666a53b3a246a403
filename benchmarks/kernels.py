#!/usr/bin/env python
"""Pallas kernels vs their XLA references: time, achieved FLOP/s (or GB/s) and temp memory.

    python benchmarks/kernels.py [--quick] [--json FILE]

On GPU / TPU both the compiled Pallas kernel and the XLA reference are timed, with the
fraction of the device's peak (bf16 dense FLOP/s for attention, HBM bandwidth for decode and
the scans; peaks from the table in gpu_kernels_check.py). On CPU only the XLA path is timed:
Pallas runs in interpret mode there, which is a correctness path, not a speed path.
Temp memory is XLA's compiled ``memory_analysis().temp_size_in_bytes`` (the [B, H, T, S]
score tensor for XLA attention, ~0 for the kernel). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from benchmarks.gpu_kernels_check import device_peaks, temp_bytes, timeit  # noqa: E402


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def attention_cases(quick):
    # (B, T, H, Hkv, D, causal)
    if quick:
        return [(1, 256, 4, 2, 64, True), (2, 128, 4, 4, 32, False)]
    return [(4, 2048, 16, 4, 128, True), (8, 1024, 8, 8, 64, False),
            (1, 8192, 16, 4, 128, True)]


def decode_cases(quick):
    return [(4, 512, 8, 2, 64)] if quick else [(64, 4096, 16, 4, 128), (8, 32768, 32, 8, 128)]


def scan_cases(quick):
    return [(64, 128)] if quick else [(1024, 2048), (64, 16384)]


def run(quick: bool):
    backend = jax.default_backend()
    kernels = backend != "cpu"
    kind = getattr(jax.devices()[0], "device_kind", backend)
    peak, bw = device_peaks(kind)
    dtype = jnp.bfloat16 if kernels else jnp.float32
    rows = []

    def add(case, impl, fn, args, work, unit, ref_peak):
        try:
            t = timeit(jax.jit(fn), *args)
            tb = temp_bytes(fn, *args)
        except Exception as e:  # noqa: BLE001
            rows.append({"case": case, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
            return
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        rows.append({"case": case, "impl": impl, "ms": t * 1e3, "rate": work / t / scale,
                     "unit": unit, "frac_peak": (work / t / ref_peak) if ref_peak else None,
                     "temp_MB": None if tb is None else tb / 2**20})

    for b, t, h, hkv, d, causal in attention_cases(quick):
        ks = jax.random.split(jax.random.PRNGKey(t), 4)
        q, k, v = (_rand(ks[0], (b, t, h, d), dtype), _rand(ks[1], (b, t, hkv, d), dtype),
                   _rand(ks[2], (b, t, hkv, d), dtype))
        do = _rand(ks[3], (b, t, h, d), dtype)
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        case = f"attention B{b} T{t} H{h}/{hkv} D{d} {'causal' if causal else 'full'} " \
               f"{jnp.dtype(dtype).name}"

        def xla(q, k, v, causal=causal):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

        def kern(q, k, v, causal=causal):
            return pk.flash_attention(q, k, v, causal=causal)

        def fb(f):
            return lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)

        impls = [("xla", xla)] + ([("pallas", kern)] if kernels else [])
        for name, f in impls:
            add(case + " fwd", name, f, (q, k, v), flops, "TFLOP/s", peak)
            add(case + " fwd+bwd", name, fb(f), (q, k, v, do), 3.5 * flops, "TFLOP/s", peak)

    for b, s, h, hkv, d in decode_cases(quick):
        ks = jax.random.split(jax.random.PRNGKey(s), 3)
        q = _rand(ks[0], (b, h, d), dtype)
        kc, vc = _rand(ks[1], (b, s, hkv, d), dtype), _rand(ks[2], (b, s, hkv, d), dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        nbytes = 2 * b * s * hkv * d * jnp.dtype(dtype).itemsize
        case = f"decode B{b} S{s} H{h}/{hkv} D{d} {jnp.dtype(dtype).name}"
        add(case, "xla", pk.decode_reference, (q, kc, vc, lengths), nbytes, "GB/s", bw)
        if kernels:
            add(case, "pallas", pk.flash_decode, (q, kc, vc, lengths), nbytes, "GB/s", bw)

    for b, t in scan_cases(quick):
        rng = np.random.default_rng(0)
        r = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(b, t + 1)), jnp.float32)
        g = jnp.asarray(0.99 * (rng.uniform(size=(b, t)) > 0.01), jnp.float32)
        m = jnp.asarray(rng.uniform(size=(b, t)) < 0.6)
        nbytes = 4 * b * t * 4
        scans = [
            ("gae", lambda r, v, g: pk.gae_reference(r, v, g, 0.95),
             lambda r, v, g: pk.gae(r, v, g, 0.95), (r, v, g)),
            ("discounted_returns", lambda r, v, g: pk.discounted_returns_reference(r, g, v[:, -1]),
             lambda r, v, g: pk.discounted_returns(r, g, v[:, -1]), (r, v, g)),
            ("masked_gae", lambda r, v, m: pk.masked_gae_reference(r, v, m, 0.99, 0.95),
             lambda r, v, m: pk.masked_gae(r, v, m, 0.99, 0.95), (r, v[:, :-1], m)),
        ]
        for name, ref, kern, args in scans:
            case = f"{name} B{b} T{t} f32"
            add(case, "xla (lax.scan)", ref, args, nbytes, "GB/s", bw)
            if kernels:
                add(case, "pallas", kern, args, nbytes, "GB/s", bw)
    return kind, backend, kernels, peak, bw, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kind, backend, kernels, peak, bw, rows = run(args.quick)
    print(f"# Pallas kernels vs XLA on {kind} (jax {jax.__version__}, backend {backend})\n")
    if not kernels:
        print("CPU backend: Pallas kernels only run in interpret mode here (a correctness "
              "path, not a speed path), so only the XLA reference is timed.\n")
    else:
        print(f"Peaks: {peak and peak / 1e12} TFLOP/s bf16 dense, {bw and bw / 1e12} TB/s HBM "
              "(spec sheet by device_kind; '-' if unknown).\n")
    print("| case | impl | ms | rate | frac of peak | temp MB |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['impl']} | ERROR {r['error']} | | | |")
            continue
        frac = "-" if r["frac_peak"] is None else f"{r['frac_peak']:.3f}"
        mem = "-" if r["temp_MB"] is None else f"{r['temp_MB']:.1f}"
        print(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {r['rate']:.4g} {r['unit']} | "
              f"{frac} | {mem} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device_kind": kind, "backend": backend, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
