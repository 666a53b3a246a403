#!/usr/bin/env python
"""Compiled check of the Pallas kernels on a GPU (or TPU): correctness, then speed.

Run from the repository root:  python3 benchmarks/gpu_kernels_check.py [--quick] [--json F]

(a) correctness: compiled flash_attention forward + dq/dk/dv (GQA, segment ids, odd T,
    T != S causal, non-power-of-two head dim, bf16 and f32), flash_decode, gae,
    discounted_returns and masked_gae against the jnp references; prints the relative max
    abs error (max|a - b| / max|b|) and PASS / FAIL per case.
(b) speed: kernel vs XLA at B=4, T=S=2048, H=16, Hkv=4, D=128 bf16 causal (fwd and fwd+bwd),
    decode B=64, S=4096, and gae / masked_gae B=1024, T=2048; ms, TFLOP/s (or GB/s) and the
    fraction of the device's peak (from a device table, plus a measured 8192^3 bf16 matmul).
Every case is wrapped in try/except so one failure does not hide the others. Prints markdown
tables; exits 1 if any correctness case failed. Total runtime is a few minutes at most.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402

# Dense bf16 peak FLOP/s and HBM bandwidth by device_kind substring (vendor spec sheets).
PEAKS = [  # (substring, bf16 dense FLOP/s, bytes/s)
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.0e12),
    ("L4", 121e12, 0.3e12),
    ("TPU v5 lite", 197e12, 0.82e12),
    ("TPU v5", 459e12, 2.76e12),
    ("TPU v4", 275e12, 1.2e12),
    ("TPU v6", 918e12, 1.64e12),
]


def device_peaks(kind: str):
    for sub, flops, bw in PEAKS:
        if sub.lower() in kind.lower():
            return flops, bw
    return None, None


def timeit(fn, *args, iters=20, min_time=0.2):
    """Median-free steady-state time: compile + warm up, then n back-to-back calls / n."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    n = max(3, min(iters, int(min_time / max(one, 1e-6))))
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def rel_err(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-6))


RESULTS = {"correctness": [], "speed": [], "errors": []}


def record_check(name, errs: dict, tol):
    worst = max(errs.values())
    ok = worst <= tol
    RESULTS["correctness"].append({"case": name, "errors": errs, "tol": tol, "pass": ok})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: "
          + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()) + f" (tol {tol:g})", flush=True)


def record_error(name, exc):
    RESULTS["correctness" if not name.startswith("speed") else "speed"].append(
        {"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000], "pass": False})
    RESULTS["errors"].append(name)
    print(f"[ERROR] {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    traceback.print_exc(limit=6)


def rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ============================================================================================
# (a) correctness
# ============================================================================================
def check_attention(b, t, s, h, hkv, d, causal, seg, dtype, bs=None):
    name = (f"flash_attention B{b} T{t} S{s} H{h}/{hkv} D{d} causal={causal} seg={seg} "
            f"{jnp.dtype(dtype).name}" + ("" if bs is None else f" {bs}"))
    try:
        ks = jax.random.split(jax.random.PRNGKey(t + s + d), 4)
        q, k, v = rand(ks[0], (b, t, h, d), dtype), rand(ks[1], (b, s, hkv, d), dtype), \
            rand(ks[2], (b, s, hkv, d), dtype)
        do = rand(ks[3], (b, t, h, d), dtype)
        segs = None
        if seg:
            rng = np.random.default_rng(0)
            cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
            one = np.zeros(t, np.int32)
            for i, c in enumerate(cuts):
                one[c:] = i + 1
            one[int(0.9 * t):] = 0                         # padded tail
            segs = np.stack([one] + [np.roll(one, 7)] * (b - 1))
            if b > 1:
                segs[1, :] = 0                             # a fully padded row
            segs = jnp.asarray(segs, jnp.int32)

        def kern(q, k, v, do):
            o, vjp = jax.vjp(lambda a, b_, c: pk.flash_attention(
                a, b_, c, causal=causal, segment_ids=segs, block_sizes=bs), q, k, v)
            return (o, *vjp(do))

        def ref(q, k, v, do):
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            o, vjp = jax.vjp(lambda a, b_, c: pk.attention_reference(
                a, b_, c, causal=causal, segment_ids=segs), f32(q), f32(k), f32(v))
            return (o, *vjp(f32(do)))

        got = jax.jit(kern)(q, k, v, do)
        want = jax.jit(ref)(q, k, v, do)
        errs = {n: rel_err(a, b_) for n, a, b_ in zip(("out", "dq", "dk", "dv"), got, want)}
        record_check(name, errs, 3e-2 if dtype == jnp.bfloat16 else 2e-3)
    except Exception as e:  # noqa: BLE001
        record_error(name, e)


def check_decode(b, s, h, hkv, d, dtype, block_k=None):
    name = f"flash_decode B{b} S{s} H{h}/{hkv} D{d} {jnp.dtype(dtype).name}"
    try:
        ks = jax.random.split(jax.random.PRNGKey(s), 3)
        q = rand(ks[0], (b, h, d), dtype)
        kc, vc = rand(ks[1], (b, s, hkv, d), dtype), rand(ks[2], (b, s, hkv, d), dtype)
        lengths = jnp.asarray(np.random.default_rng(1).integers(0, s + 1, size=b), jnp.int32)
        lengths = lengths.at[0].set(0).at[1].set(s)
        got = jax.jit(lambda *a: pk.flash_decode(*a, block_k=block_k))(q, kc, vc, lengths)
        want = jax.jit(pk.decode_reference)(q.astype(jnp.float32), kc.astype(jnp.float32),
                                            vc.astype(jnp.float32), lengths)
        errs = {"out": rel_err(got, want),
                "len0_nonzero": float(np.abs(np.asarray(got[0], np.float32)).max())}
        record_check(name, errs, 3e-2 if dtype == jnp.bfloat16 else 2e-3)
    except Exception as e:  # noqa: BLE001
        record_error(name, e)


def check_scans(b, t):
    rng = np.random.default_rng(b + t)
    r = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t + 1)), jnp.float32)
    g = jnp.asarray(0.99 * (rng.uniform(size=(b, t)) > 0.05), jnp.float32)
    lam = jnp.asarray(rng.uniform(0.5, 1, size=(b, t)), jnp.float32)
    m = jnp.asarray(rng.uniform(size=(b, t)) < 0.6)
    cases = {
        "gae (scalar lam)": (lambda: pk.gae(r, v, g, 0.95), lambda: pk.gae_reference(r, v, g, 0.95)),
        "gae (per-step lam)": (lambda: pk.gae(r, v, g, lam), lambda: pk.gae_reference(r, v, g, lam)),
        "discounted_returns": (lambda: pk.discounted_returns(r, g, v[:, -1]),
                               lambda: pk.discounted_returns_reference(r, g, v[:, -1])),
        "masked_gae": (lambda: pk.masked_gae(r, v[:, :-1], m, 0.99, 0.9),
                       lambda: pk.masked_gae_reference(r, v[:, :-1], m, 0.99, 0.9)),
    }
    for nm, (kern, ref) in cases.items():
        name = f"{nm} B{b} T{t}"
        try:
            record_check(name, {"out": rel_err(jax.jit(kern)(), jax.jit(ref)())}, 1e-4)
        except Exception as e:  # noqa: BLE001
            record_error(name, e)


# ============================================================================================
# (b) speed
# ============================================================================================
def speed_row(name, t_kernel, t_ref, work, unit, peak, ref_name, mem=None):
    row = {"case": name, "kernel_ms": None if t_kernel is None else t_kernel * 1e3,
           "ref_ms": None if t_ref is None else t_ref * 1e3, "ref": ref_name, "unit": unit}
    if t_kernel:
        row["kernel_rate"] = work / t_kernel / (1e12 if unit == "TFLOP/s" else 1e9)
        row["kernel_frac_peak"] = (work / t_kernel / peak) if peak else None
    if t_ref:
        row["ref_rate"] = work / t_ref / (1e12 if unit == "TFLOP/s" else 1e9)
        row["ref_frac_peak"] = (work / t_ref / peak) if peak else None
    if mem:
        row.update(mem)
    RESULTS["speed"].append(row)
    print(f"[SPEED] {json.dumps(row)}", flush=True)


def temp_bytes(fn, *args):
    try:
        ma = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(ma.temp_size_in_bytes) if ma is not None else None
    except Exception:  # noqa: BLE001
        return None


def safe_time(name, fn, *args):
    try:
        return timeit(jax.jit(fn), *args)
    except Exception as e:  # noqa: BLE001
        record_error(f"speed {name}", e)
        return None


def measure_matmul_peak():
    try:
        n = 8192
        a = rand(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
        t = timeit(jax.jit(lambda x, y: x @ y), a, a, iters=10)
        return 2 * n ** 3 / t
    except Exception as e:  # noqa: BLE001
        record_error("speed matmul peak", e)
        return None


def speed_attention(b, t, h, hkv, d, peak, sweep):
    dtype = jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v = rand(ks[0], (b, t, h, d), dtype), rand(ks[1], (b, t, hkv, d), dtype), \
        rand(ks[2], (b, t, hkv, d), dtype)
    do = rand(ks[3], (b, t, h, d), dtype)
    fwd_flops = 4 * b * h * t * t * d / 2            # causal: half of QK^T and PV
    shape = f"B{b} T=S{t} H{h}/{hkv} D{d} bf16 causal"

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def fwdbwd(f):
        def g(q, k, v, do):
            o, vjp = jax.vjp(f, q, k, v)
            return vjp(do)
        return g

    t_xla = safe_time("xla fwd", xla, q, k, v)
    t_xla_b = safe_time("xla fwd+bwd", fwdbwd(xla), q, k, v, do)
    t_cud = safe_time("cudnn fwd", cudnn, q, k, v) if jax.default_backend() == "gpu" else None
    t_cud_b = (safe_time("cudnn fwd+bwd", fwdbwd(cudnn), q, k, v, do)
               if jax.default_backend() == "gpu" else None)
    configs = [None] + (sweep if sweep else [])
    for bs in configs:
        label = "default" if bs is None else str(bs)

        def kern(q, k, v, bs=bs):
            return pk.flash_attention(q, k, v, causal=True, block_sizes=bs)

        tk = safe_time(f"pallas fwd {label}", kern, q, k, v)
        tkb = safe_time(f"pallas fwd+bwd {label}", fwdbwd(kern), q, k, v, do)
        mem = {"kernel_temp_MB": None, "ref_temp_MB": None}
        if bs is None:
            tb = temp_bytes(fwdbwd(kern), q, k, v, do)
            tr = temp_bytes(fwdbwd(xla), q, k, v, do)
            mem = {"kernel_temp_MB": tb and tb / 2**20, "ref_temp_MB": tr and tr / 2**20}
        speed_row(f"attention fwd {shape} [{label}]", tk, t_xla, fwd_flops, "TFLOP/s", peak,
                  "jax.nn.dot_product_attention(xla)")
        speed_row(f"attention fwd+bwd {shape} [{label}]", tkb, t_xla_b, 3.5 * fwd_flops,
                  "TFLOP/s", peak, "jax.nn.dot_product_attention(xla)", mem)
    if t_cud or t_cud_b:
        speed_row(f"attention fwd {shape} [cudnn, for comparison]", t_cud, t_xla, fwd_flops,
                  "TFLOP/s", peak, "xla")
        speed_row(f"attention fwd+bwd {shape} [cudnn, for comparison]", t_cud_b, t_xla_b,
                  3.5 * fwd_flops, "TFLOP/s", peak, "xla")


def speed_decode(b, s, h, hkv, d, bw, sweep=False):
    dtype = jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    q = rand(ks[0], (b, h, d), dtype)
    kc, vc = rand(ks[1], (b, s, hkv, d), dtype), rand(ks[2], (b, s, hkv, d), dtype)
    lengths = jnp.full((b,), s, jnp.int32)
    tk = safe_time("pallas decode", lambda *a: pk.flash_decode(*a), q, kc, vc, lengths)
    tr = safe_time("xla decode", pk.decode_reference, q, kc, vc, lengths)
    nbytes = 2 * b * s * hkv * d * 2                 # K and V read once, bf16
    speed_row(f"decode B{b} S{s} H{h}/{hkv} D{d} bf16 (full cache)", tk, tr, nbytes, "GB/s",
              bw, "decode_reference (XLA)")
    for ns, bk in ([(2, 64), (4, 64), (1, 128), (2, 128)] if sweep else []):
        tk = safe_time(f"pallas decode splits={ns} block_k={bk}",
                       lambda *a, ns=ns, bk=bk: pk.flash_decode(*a, num_splits=ns, block_k=bk),
                       q, kc, vc, lengths)
        speed_row(f"decode B{b} S{s} [num_splits={ns}, block_k={bk}]", tk, tr, nbytes, "GB/s",
                  bw, "decode_reference (XLA)")


def speed_scans(b, t, bw, sweep=False):
    rng = np.random.default_rng(0)
    r = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t + 1)), jnp.float32)
    g = jnp.asarray(0.99 * (rng.uniform(size=(b, t)) > 0.01), jnp.float32)
    m = jnp.asarray(rng.uniform(size=(b, t)) < 0.6)
    nbytes = 4 * b * t * 4                            # r, g, v in; adv out
    tk = safe_time("pallas gae", lambda r, v, g: pk.gae(r, v, g, 0.95), r, v, g)
    tr = safe_time("lax.scan gae", lambda r, v, g: pk.gae_reference(r, v, g, 0.95), r, v, g)
    speed_row(f"gae B{b} T{t} f32", tk, tr, nbytes, "GB/s", bw, "gae_reference (lax.scan)")
    for bb in ((8, 32, 64) if sweep else ()):
        tk = safe_time(f"pallas gae block_b={bb}",
                       lambda r, v, g, bb=bb: pk.gae(r, v, g, 0.95, block_b=bb), r, v, g)
        speed_row(f"gae B{b} T{t} f32 [block_b={bb}]", tk, tr, nbytes, "GB/s", bw,
                  "gae_reference (lax.scan)")
    vv = v[:, :-1]
    tk = safe_time("pallas masked_gae", lambda r, v, m: pk.masked_gae(r, v, m, 0.99, 0.95),
                   r, vv, m)
    tr = safe_time("lax.scan masked_gae",
                   lambda r, v, m: pk.masked_gae_reference(r, v, m, 0.99, 0.95), r, vv, m)
    speed_row(f"masked_gae B{b} T{t} f32", tk, tr, nbytes, "GB/s", bw,
              "masked_gae_reference (lax.scan)")


def fmt(x, p=3):
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def print_tables(kind, peak_table, peak_mm, bw):
    print("\n## Correctness (compiled kernels vs jnp references; relative max abs error)\n")
    print("| case | errors | tol | result |\n|---|---|---|---|")
    for c in RESULTS["correctness"]:
        errs = c.get("errors")
        es = ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) if errs else c.get("error", "")
        print(f"| {c['case']} | {es[:300]} | {c.get('tol', '-')} | "
              f"{'PASS' if c['pass'] else 'FAIL'} |")
    print(f"\n## Speed on {kind} (peak used for fractions: "
          f"{fmt(peak_table and peak_table / 1e12, 0)} TFLOP/s spec bf16 dense, measured "
          f"8192^3 bf16 matmul {fmt(peak_mm and peak_mm / 1e12, 0)} TFLOP/s; HBM "
          f"{fmt(bw and bw / 1e12, 2)} TB/s spec)\n")
    print("| case | kernel ms | rate | frac of peak | ref ms | ref rate | ref frac | speedup |"
          " temp MB kernel / ref |\n|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS["speed"]:
        if "error" in r:
            print(f"| {r['case']} | ERROR: {r['error'][:200]} | | | | | | | |")
            continue
        sp = (r["ref_ms"] / r["kernel_ms"]) if r.get("ref_ms") and r.get("kernel_ms") else None
        unit = r["unit"]
        mem = (f"{fmt(r.get('kernel_temp_MB'), 0)} / {fmt(r.get('ref_temp_MB'), 0)}"
               if "kernel_temp_MB" in r else "")
        print(f"| {r['case']} | {fmt(r['kernel_ms'])} | {fmt(r.get('kernel_rate'), 1)} {unit} |"
              f" {fmt(r.get('kernel_frac_peak'))} | {fmt(r['ref_ms'])} |"
              f" {fmt(r.get('ref_rate'), 1)} | {fmt(r.get('ref_frac_peak'))} |"
              f" {fmt(sp, 2)}x | {mem} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller speed shapes")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a few block sizes")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    args = ap.parse_args()
    t_start = time.time()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {kind}", flush=True)
    if jax.default_backend() == "cpu":
        print("No GPU/TPU: the compiled kernels cannot run here (Pallas interprets on CPU). "
              "Run this on a GPU; exiting.")
        return 0

    # (a) correctness
    for dtype in (jnp.bfloat16, jnp.float32):
        check_attention(2, 257, 257, 8, 2, 64, True, False, dtype)        # odd T, GQA 4
    check_attention(2, 384, 384, 4, 4, 128, True, True, jnp.bfloat16)    # segments + padding
    check_attention(2, 200, 200, 8, 2, 64, False, True, jnp.float32)     # non-causal segments
    check_attention(1, 100, 300, 4, 1, 128, True, False, jnp.float32)    # T < S causal, MQA
    check_attention(1, 300, 100, 4, 2, 80, True, False, jnp.bfloat16)    # T > S, D=80 padded
    check_attention(1, 130, 70, 2, 1, 32, False, False, jnp.bfloat16)    # cross, T > S
    check_decode(8, 1000, 16, 4, 128, jnp.bfloat16)                       # S padded
    check_decode(5, 512, 8, 8, 64, jnp.float32)
    check_decode(3, 300, 4, 1, 16, jnp.float32)                           # G=4 -> 16 rows
    check_scans(300, 257)
    check_scans(7, 33)
    n_fail = sum(not c["pass"] for c in RESULTS["correctness"])
    print(f"correctness: {len(RESULTS['correctness']) - n_fail} pass, {n_fail} fail "
          f"({time.time() - t_start:.0f}s)", flush=True)

    peak_table, bw = device_peaks(kind)
    peak_mm = None
    if not args.no_speed:
        peak_mm = measure_matmul_peak()
        peak = peak_table or peak_mm
        sweep = None
        if args.sweep:
            B = pk.BlockSizes  # noqa: N806
            sweep = [B(64, 64, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2),
                     B(128, 64, num_warps=8, num_stages=3, num_warps_bwd=4, num_stages_bwd=3),
                     B(128, 128, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2,
                       block_q_dq=128, block_k_dq=64, block_q_dkv=64, block_k_dkv=128),
                     B(64, 128, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2,
                       block_q_dq=64, block_k_dq=128, block_q_dkv=128, block_k_dkv=64),
                     B(64, 32, num_warps=4, num_stages=4, num_warps_bwd=4, num_stages_bwd=1,
                       block_q_dq=32, block_k_dq=64, block_q_dkv=32, block_k_dkv=64)]
        if args.quick:
            speed_attention(2, 1024, 8, 2, 128, peak, sweep)
            speed_decode(16, 2048, 16, 4, 128, bw, args.sweep)
            speed_scans(256, 512, bw, args.sweep)
        else:
            speed_attention(4, 2048, 16, 4, 128, peak, sweep)
            speed_decode(64, 4096, 16, 4, 128, bw, args.sweep)
            speed_scans(1024, 2048, bw, args.sweep)
    print_tables(kind, peak_table, peak_mm, bw)
    print(f"\ntotal {time.time() - t_start:.0f}s")
    RESULTS.update({"device_kind": kind, "jax": jax.__version__, "peak_table": peak_table,
                    "peak_matmul_measured": peak_mm, "hbm_bw": bw})
    out = args.json or (os.path.join(os.environ["OUT"], "gpu_kernels_check.json")
                        if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
