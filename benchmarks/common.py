"""Shared pieces of the speed benchmarks: timing, the in-run matmul peak, FLOP counts, tables.

FLOP conventions (model FLOPs, as in MFU accounting, not the hardware work XLA happens to do):

* one forward token costs ``2·N`` for the dense weights, N = ``matmul_params(params, cfg)``:
  every parameter that is a matmul operand (all layer weights and the output projection /
  ``lm_head``, or the tied embedding once when ``tie_embeddings``); the embedding *lookup* is a
  gather and costs nothing, norms' scales are counted (negligible);
* attention adds ``4·n_layers·n_heads·head_dim·ctx`` per forward token (q·kᵀ and p·v, 2 FLOPs
  per multiply-add each), ctx = the number of positions the token attends to (causal: its own
  position + 1). ``causal_attention_flops(cfg, n)`` sums this over a row of n tokens:
  ``4·L·H·Dh·n(n+1)/2``;
* training (forward + backward) costs 3× the forward: ``6·N·tokens + 3·attention``.

The matmul peak is measured in the same process as the benchmark (the machine may be shared and
loaded): the median time of a jitted float32 ``[n,n] @ [n,n]`` (n = 2048 by default) gives
``peak = 2·n³ / t``.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def block(tree):
    """Wait for every array in ``tree`` (``jax.block_until_ready`` on the pytree)."""
    return jax.block_until_ready(tree)


def time_calls(fn: Callable[[int], Any], runs: int) -> list[float]:
    """Wall seconds of ``fn(i)`` for i in range(runs), each result blocked on."""
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs={runs!r} must be a positive int")
    out = []
    for i in range(runs):
        t0 = time.perf_counter()
        block(fn(i))
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(xs))


def matmul_peak(n: int = 2048, runs: int = 5, dtype=jnp.float32) -> float:
    """Measured matmul FLOP/s: ``2·n³ / median(t)`` for a jitted ``[n,n] @ [n,n]`` in ``dtype``
    at the default matmul precision (compiled and run once before timing)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    # default precision, like the models' matmuls (jax_default_matmul_precision applies to
    # both; on GPU float32 defaults to TF32, on CPU it is exact float32)
    f = jax.jit(lambda x, y: jnp.matmul(x, y))
    block(f(a, b))
    t = median(time_calls(lambda i: f(a, b), runs))
    return 2.0 * n ** 3 / t


def _path_names(path) -> list[str]:
    names = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                names.append(str(getattr(p, attr)))
                break
    return names


def matmul_params(params, cfg) -> int:
    """Scalars of ``params`` that take part in a matmul per token (see module doc): all leaves
    except the embedding table (a leaf whose path names ``embed_tokens``), plus the tied
    embedding once as the output projection when ``cfg.tie_embeddings``."""
    n = 0
    emb = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = int(np.prod(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))
        if any("embed_tokens" in name for name in _path_names(path)):
            emb += size
        else:
            n += size
    if emb == 0:
        raise ValueError("matmul_params: no 'embed_tokens' leaf found in params; cannot tell "
                         "the embedding table apart")
    if getattr(cfg, "tie_embeddings", False):
        n += cfg.vocab_size * cfg.d_model
    return n


def causal_attention_flops(cfg, n_tokens) -> np.ndarray:
    """Forward attention FLOPs of causal rows of ``n_tokens`` tokens (array-like of lengths):
    ``4·L·H·Dh·n(n+1)/2`` each."""
    n = np.asarray(n_tokens, np.float64)
    if np.any(n < 0):
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens!r}")
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n * (n + 1) / 2.0


def forward_flops(cfg, n_matmul_params: int, row_lengths) -> float:
    """Model FLOPs of one forward pass over causal rows of the given lengths:
    ``Σ_rows 2·N·n + 4·L·H·Dh·n(n+1)/2``."""
    n = np.asarray(row_lengths, np.float64)
    return float(2.0 * n_matmul_params * n.sum() + causal_attention_flops(cfg, n).sum())


def matmuls_seconds(shapes: Sequence[tuple[int, int, int]], repeats: int, runs: int,
                    dtype=jnp.float32) -> float:
    """Median seconds per repeat of the matmuls ``[M, K] @ [K, N]`` for every (M, K, N) in
    ``shapes``, alone, ``repeats`` times in one jitted ``lax.scan`` (per-call dispatch amortised;
    the carry perturbs the inputs so nothing is hoisted, every output is summed into it so
    nothing is dropped). A floor on the time any program spends on those matmuls here."""
    if not shapes:
        raise ValueError("matmuls_seconds: no shapes")
    if any(min(s) < 1 for s in shapes):
        raise ValueError(f"matmuls_seconds: dims must be >= 1, got {list(shapes)}")
    key = jax.random.PRNGKey(3)
    xs = [jax.random.normal(jax.random.fold_in(key, 2 * i), (m, k), dtype)
          for i, (m, k, _) in enumerate(shapes)]
    ws = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (k, n), dtype)
          for i, (_, k, n) in enumerate(shapes)]

    @jax.jit
    def run(xs, ws):
        def body(c, _):
            outs = [jnp.dot(x + c.astype(dtype), w, preferred_element_type=jnp.float32)
                    for x, w in zip(xs, ws)]
            return 1e-30 * sum(jnp.sum(o) for o in outs), None
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), None, length=repeats)[0]

    block(run(xs, ws))
    return median(time_calls(lambda i: run(xs, ws), runs)) / repeats


def machine_note() -> str:
    """One line describing the host and its load (numbers on a shared machine vary)."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    dev = jax.devices()[0]
    return (f"{platform.node()} · {platform.processor() or platform.machine()} · "
            f"{os.cpu_count()} CPUs · load avg {load} · jax {jax.__version__} · "
            f"{dev.platform}:{getattr(dev, 'device_kind', '')}")


def append_markdown(path: str | None, title: str, header: Sequence[str],
                    rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    """Append a markdown section (``### title``, notes, a table) to ``path`` (no-op if None)."""
    if not path:
        return
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {r!r} has {len(r)} cells, header has {len(header)}")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [f"### {title} ({stamp})", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    lines.append("")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
