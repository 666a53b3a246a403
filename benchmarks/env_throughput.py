"""Env-steps per second: jit(vmap(env.step)) against the plain-Python twin, side by side.

    python -m benchmarks.env_throughput            # batches 1, 64, 1024, 4096, 5 runs
    python -m benchmarks.env_throughput --quick    # batches 1, 64, 1024, 3 runs
    python -m benchmarks.env_throughput --envs calculator --batches 1024 --out results.md

Every module of ``envs/python_twins`` that defines a class with ``from_state(state, env)`` and
``step(text)`` and whose module name is a registered env is benchmarked (kv_search,
calculator, maze, ...). For each env:

* T = the median length of oracle episodes (turns after an episode's end are no-op steps, the
  same for both sides); E = ceil(K / T) episodes per env slot, K = ``--steps-per-call``
  (default 32). Oracle trajectories of E·B episodes are generated beforehand with one
  ``jit(vmap)`` + ``lax.scan``: their reset states and the actions of their first T turns.
* jitted, in two batch layouts (``make_rollout``): a compiled function that runs ``lax.scan``
  over the E episodes, each a ``lax.scan`` over its T turns of ``vmap(env.step)`` on B envs,
  with the pre-generated action tokens (E·T = K steps per call, as PureJaxRL measures: the
  Python dispatch of one call is spread over K steps instead of being what is measured). A
  timed run is one untimed call, then R calls back to back for at least ``--min-time``
  seconds (``calls_per_run``), reported per call. Every
  TimeStep (observation, reward, flags, info) is an output, as a rollout keeps them; the
  result is blocked on. Batch-major is ``vmap(env.step)`` (states ``[B, ...]``); batch-minor is
  ``vmap(env.step, in_axes=-1, out_axes=-1)`` (states ``[..., B]``, actions ``[L, B]``): the
  same function, with each per-env quantity a contiguous row of B lanes that XLA:CPU
  vectorizes. Inputs are moved to each layout before timing.
* twin, per timed run: E·B twin objects built from the same reset states (not timed), then a
  plain Python loop over episodes, turns and twins calling ``twin.step(text)`` with the action
  strings prepared before timing (``vocab.decode`` of the same action tokens). The twin's own
  parsing and formatting are timed, since they are its cost.
* the timed runs alternate (major, minor, twin, major, ...), so that all sides see the same load.
* ``--cpus K`` (default 1): before JAX starts, the process is pinned to K of its allowed CPUs
  (``os.sched_setaffinity``), so XLA:CPU's intra-op thread pool has K threads and the twin runs
  on the same CPUs: one core against one core. With more threads XLA splits every small
  per-step kernel across them, and the synchronisation costs more than it saves at these sizes
  (measured at B=1024 on the 2-core VM: pinned to one core, 1.3-1.8x the env-steps/s of the
  default 2-thread pool). ``--cpus all`` leaves the affinity and the pool as they are.
* ``--vector-width`` (default ``auto``): XLA:CPU's preferred SIMD width for the jitted side,
  set through ``XLA_FLAGS=--xla_cpu_prefer_vector_width=W`` before JAX starts; ``auto`` picks
  512 on CPUs with AVX-512 (``avx512f`` in /proc/cpuinfo), else leaves XLA's default (256);
  ``xla`` always leaves it. A width already in ``XLA_FLAGS`` is kept. (Measured on the
  AVX-512 VM at B=1024, batch-minor: 512-bit vectors 1.1-1.5x the env-steps/s of 256-bit.)
* ``--devices N`` (N > 1; needs ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one
  host device per core) adds a third jitted side: the batch-minor call with its batch axis
  sharded over N devices (``NamedSharding``, no communication: every env is independent), so
  XLA runs N shards on N cores at once (use it with ``--cpus N``). Its ratio compares the
  whole CPU against the twin's one process; the other columns stay single-device.

Reported: env-steps per second (B·E·T / seconds), the median of ``--runs`` runs, the ratio,
and the ratio of process CPU seconds (XLA may use several threads, the twin one).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import pkgutil
import statistics
import sys
import time
import warnings

import jax
import numpy as np

import envs
from benchmarks.common import append_markdown, machine_note
from envs import vocab
from envs.python_twins import __path__ as _twins_path

DEFAULT_STEPS_PER_CALL = 32


def discover_twins() -> dict[str, type]:
    """{env name: twin class} for every twin module with the from_state / step interface."""
    found = {}
    for mod in sorted(m.name for m in pkgutil.iter_modules(_twins_path)):
        if mod not in envs.registered():
            continue
        module = importlib.import_module(f"envs.python_twins.{mod}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "from_state", None)) \
                    and callable(getattr(cls, "step", None)):
                found[mod] = cls
                break
    return found


def oracle_trajectory(env, n: int, seed: int = 0):
    """States before each turn, actions and episode lengths of n oracle episodes (numpy)."""
    turns = env.max_turns

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        s0, _ = env.reset(k_reset)

        def body(s, k):
            a = env.oracle_action(s, k)
            s2, ts = env.step(s, a)
            return s2, (s, a, ts.terminated | ts.truncated)
        _, (states, acts, done) = jax.lax.scan(body, s0, jax.random.split(k_act, turns))
        return states, acts, done

    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    states, acts, done = jax.device_get(jax.jit(jax.vmap(episode))(keys))
    lengths = np.argmax(done, axis=1) + 1
    lengths = np.where(done.any(axis=1), lengths, turns)
    return states, acts, lengths


def episodes_per_call(T: int, steps_per_call: int) -> int:
    """E = ceil(K / T): whole episodes of T turns per call, at least K steps."""
    return max(1, math.ceil(steps_per_call / T))


LAYOUTS = ("major", "minor")


def shard_batch_minor(tree, devices: int):
    """``device_put`` batch-minor arrays (batch axis last) sharded over the first ``devices``
    devices along that axis."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("b",))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, P(*([None] * (np.ndim(x) - 1)), "b"))), tree)


def make_rollout(env, layout: str = "major"):
    """jit((reset states, actions) -> TimeSteps) over E episodes x T turns of B envs.

    ``layout="major"``: batch-major, ``vmap(env.step)`` on states ``[E, B, ...]`` and actions
    ``[E, T, B, L]``, TimeSteps ``[E, T, B, ...]`` (the default vmap layout; what
    ``rl_agents.rollout`` uses). ``layout="minor"``: batch-minor (struct of arrays),
    ``vmap(env.step, in_axes=-1, out_axes=-1)`` on states ``[E, ..., B]`` and actions
    ``[E, T, L, B]``, TimeSteps ``[E, T, ..., B]``: every per-env value is a contiguous row of
    B lanes, so XLA:CPU's loops over the batch vectorize (see ``to_layout``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ax = 0 if layout == "major" else -1
    vstep = jax.vmap(env.step, in_axes=(ax, ax), out_axes=ax)

    def episode(_, xs):
        s0, acts = xs
        return None, jax.lax.scan(vstep, s0, acts)[1]

    return jax.jit(lambda s0, acts: jax.lax.scan(episode, None, (s0, acts))[1])


def to_layout(s0, acts, layout: str):
    """Batch-major inputs (states [E, B, ...], actions [E, T, B, L], numpy) in ``layout``:
    unchanged for "major"; for "minor" the batch axis moved last (states [E, ..., B], actions
    [E, T, L, B]), contiguous."""
    if layout == "major":
        return s0, acts
    if layout != "minor":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    s0 = jax.tree_util.tree_map(lambda x: np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1)), s0)
    return s0, np.ascontiguousarray(np.moveaxis(acts, 2, -1))


def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


DEFAULT_MIN_TIME = 0.05


def calls_per_run(fn, min_time: float) -> int:
    """R = ceil(min_time / t): back-to-back calls of ``fn`` (t = the median of 3 calls) that
    make one timed run last at least ``min_time`` seconds."""
    ts = [_timed(fn)[0] for _ in range(3)]
    return max(1, math.ceil(min_time / max(statistics.median(ts), 1e-9)))


def time_side_by_side(env, twin_cls, s0, acts, runs: int, devices: int = 1,
                      min_time: float = DEFAULT_MIN_TIME) -> dict[str, tuple[float, float]]:
    """{layout | "sharded" | "twin": (median wall s, median process CPU s)} of the same
    B x E x T steps.

    s0: reset states [E, B, ...] (numpy), acts: [E, T, B, L]; each of ``LAYOUTS`` is a
    jitted side (``make_rollout``, inputs moved to its layout before timing); with
    ``devices`` > 1 (and B divisible by it) also "sharded": batch-minor with the batch axis
    sharded over that many devices (same outputs). The runs alternate (major, minor, ...,
    twin, major, ...) so that all sides see the same machine load. A jitted side's run is one
    untimed call, then R back-to-back calls timed together (R = ``calls_per_run``: at least
    ``min_time`` seconds), reported per call: its steady rate, as inside a training program,
    not the first call after the twin's Python loop has had the CPU (measured: a single call
    right after 0.1 s of Python runs at 40-65% of the back-to-back rate).
    """
    E, T, B = acts.shape[:3]
    jitted, warm = {}, {}
    for layout in LAYOUTS:
        rollout = make_rollout(env, layout)
        dev_in = jax.device_put(to_layout(s0, acts, layout))
        warm[layout] = jax.block_until_ready(rollout(*dev_in))   # compile + warm up
        jitted[layout] = (rollout, dev_in)
    if devices > 1 and B % devices == 0:
        rollout = jitted["minor"][0]                  # the same function, on sharded inputs
        dev_in = shard_batch_minor(to_layout(s0, acts, "minor"), devices)
        out = jax.block_until_ready(rollout(*dev_in))
        if not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree_util.tree_leaves(out),
                                   jax.tree_util.tree_leaves(warm["minor"]))):
            raise AssertionError(f"{env.name}: the sharded rollout's outputs differ from one device's")
        jitted["sharded"] = (rollout, dev_in)
    texts = [[[vocab.decode(acts[e, t, i], skip_pad=False) for i in range(B)] for t in range(T)]
             for e in range(E)]
    firsts = [[jax.tree_util.tree_map(lambda x: x[e, i], s0) for i in range(B)] for e in range(E)]

    def twin_loop(twins):
        for e in range(E):
            row_twins = twins[e]
            for t in range(T):
                row = texts[e][t]
                for i, tw in enumerate(row_twins):
                    tw.step(row[i])

    reps = {layout: calls_per_run(lambda: jax.block_until_ready(rollout(*dev_in)), min_time)
            for layout, (rollout, dev_in) in jitted.items()}

    def back_to_back(rollout, dev_in, r):
        out = None
        for _ in range(r):
            out = rollout(*dev_in)
        jax.block_until_ready(out)

    out = {**{layout: [] for layout in jitted}, "twin": []}
    for _ in range(runs):
        for layout, (rollout, dev_in) in jitted.items():
            r = reps[layout]
            jax.block_until_ready(rollout(*dev_in))                   # untimed
            w, c = _timed(lambda: back_to_back(rollout, dev_in, r))
            out[layout].append((w / r, c / r))
        twins = [[twin_cls.from_state(s, env) for s in row] for row in firsts]   # not timed
        out["twin"].append(_timed(lambda: twin_loop(twins)))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in out.items()}


def batch_inputs(states, acts, B: int, E: int, T: int):
    """Episodes [0, E*B) as reset states [E, B, ...] and actions [E, T, B, L] (numpy)."""
    s0 = jax.tree_util.tree_map(lambda x: x[:E * B, 0].reshape((E, B) + x.shape[2:]), states)
    a = acts[:E * B, :T].reshape((E, B, T) + acts.shape[2:]).swapaxes(1, 2)
    return s0, np.ascontiguousarray(a)


def _jax_started() -> bool:
    """JAX's backends (the XLA CPU client) already exist in this process (False when JAX's
    private ``backends_are_initialized`` has moved: the check is then skipped)."""
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        return False
    return backends_are_initialized()


def pin_cpus(spec: str) -> list[int] | None:
    """Pin this process to the first K allowed CPUs (``spec`` = "K"), or leave it ("all").

    Must run before JAX creates its CPU client: XLA sizes its intra-op pool from the affinity
    mask then, and threads started earlier keep theirs. Returns the CPUs, or None for "all".
    """
    if spec == "all":
        return None
    try:
        k = int(spec)
    except ValueError:
        raise ValueError(f"--cpus must be a positive int or 'all', got {spec!r}") from None
    if not (hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")):
        warnings.warn(f"--cpus {spec}: this OS has no sched_setaffinity (Linux only); running "
                      f"unpinned, as with --cpus all (pin with the OS's own tools instead)")
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= k <= len(allowed):
        raise ValueError(f"--cpus must be in [1, {len(allowed)}] (the CPUs this process may use: "
                         f"{allowed}) or 'all', got {spec!r}")
    if _jax_started():
        raise ValueError(f"--cpus {spec}: JAX's CPU client already exists in this process, so its "
                         f"thread pool can no longer be sized; run the benchmark in a fresh "
                         f"process (python -m benchmarks.env_throughput) or pass --cpus all")
    cpus = allowed[:k]
    os.sched_setaffinity(0, cpus)
    return cpus


VECTOR_WIDTHS = ("auto", "256", "512", "xla")


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def set_vector_width(choice: str) -> str:
    """Set XLA:CPU's preferred vector width (``VECTOR_WIDTHS``) in ``XLA_FLAGS`` before JAX
    starts; returns a note saying what the jitted side compiles with."""
    if choice not in VECTOR_WIDTHS:
        raise ValueError(f"--vector-width must be one of {VECTOR_WIDTHS}, got {choice!r}")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_prefer_vector_width" in flags:
        return "XLA vector width as set in XLA_FLAGS"
    width = {"256": 256, "512": 512, "xla": None}.get(choice, 512 if _has_avx512() else None)
    if width is None:
        return "XLA's default vector width (256 bits)"
    if _jax_started():
        raise ValueError(f"--vector-width {choice}: JAX's CPU client already exists in this "
                         f"process, so XLA_FLAGS can no longer take effect; run the benchmark in "
                         f"a fresh process or pass --vector-width xla")
    os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_prefer_vector_width={width}").strip()
    return f"XLA_FLAGS --xla_cpu_prefer_vector_width={width}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batches 1, 64, 1024 and 3 runs")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (>= 3)")
    p.add_argument("--envs", nargs="+", default=None, help="subset of the discovered twins")
    p.add_argument("--steps-per-call", type=int, default=DEFAULT_STEPS_PER_CALL,
                   help="K: env steps per jitted call (whole episodes: ceil(K / T) of them)")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    p.add_argument("--min-time", type=float, default=DEFAULT_MIN_TIME,
                   help="seconds: a jitted side's timed run repeats its call back to back for at "
                        "least this long (reported per call)")
    p.add_argument("--devices", type=int, default=1,
                   help="also time batch-minor sharded over this many host devices (one per core; "
                        "run with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--cpus", default="1",
                   help="pin the process (jitted side and twin) to this many CPUs before JAX "
                        "starts, sizing XLA's intra-op pool (default 1: one core against one "
                        "core); 'all' leaves the affinity as it is")
    p.add_argument("--vector-width", default="auto", choices=VECTOR_WIDTHS,
                   help="XLA:CPU's preferred SIMD width for the jitted side, set before JAX "
                        "starts (auto: 512 with AVX-512, else XLA's default; xla: leave it)")
    args = p.parse_args(argv)
    vector_note = set_vector_width(args.vector_width)
    pinned = pin_cpus(args.cpus)
    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    if args.devices > jax.local_device_count():
        raise ValueError(f"--devices {args.devices} but JAX sees {jax.local_device_count()} device(s); "
                         f"run with XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
    batches = args.batches or ([1, 64, 1024] if args.quick else [1, 64, 1024, 4096])
    runs = args.runs or (3 if args.quick else 5)
    if runs < 3:
        raise ValueError(f"--runs must be >= 3 (median of at least 3 runs), got {runs}")
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches must be positive, got {batches}")
    if args.steps_per_call < 1:
        raise ValueError(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
    if not args.min_time >= 0:
        raise ValueError(f"--min-time must be >= 0 seconds, got {args.min_time}")
    twins = discover_twins()
    if args.envs:
        unknown = sorted(set(args.envs) - set(twins))
        if unknown:
            raise ValueError(f"no twin for {unknown}; available: {sorted(twins)}")
        twins = {k: v for k, v in twins.items() if k in args.envs}

    title = "Env throughput (env-steps/s): jit(vmap(step)) vs plain-Python twin"
    notes = [machine_note(),
             f"median of {runs} runs; jitted: one call = lax.scan over E episodes x lax.scan over "
             f"T turns of vmap(step) on B envs (E = ceil({args.steps_per_call} / T), "
             f"pre-generated actions, all TimeSteps output, blocked on; a timed run = one untimed "
             f"call then calls back to back for >= {args.min_time:g} s, per call), batch-major "
             f"(vmap(step)) and batch-minor (vmap(step, in_axes=-1, out_axes=-1)); twin: Python "
             f"loop over the same B x E x T steps; CPU ratio = twin / jitted process CPU "
             f"seconds, batch-minor",
             (f"process pinned to CPU(s) {pinned} before JAX started (XLA intra-op pool of "
              f"{len(pinned)} thread(s); the twin on the same CPU(s))" if pinned else
              f"process not pinned: XLA's intra-op pool uses the CPUs it found "
              f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} "
              f"available)"),
             f"jitted side compiled with {vector_note}"]
    header = ["env", "batch", "turns T", "episodes E", "jitted steps/s (batch-major)",
              "jitted steps/s (batch-minor)", "twin steps/s", "major / twin", "minor / twin",
              "CPU ratio"]
    if args.devices > 1:
        notes.append(f"sharded: batch-minor with the batch axis sharded over {args.devices} host "
                     f"devices (one per core; the whole CPU against the twin's one process); "
                     f"'-' where B is not divisible by {args.devices}")
        header += [f"jitted steps/s (batch-minor, {args.devices} devices)", "sharded / twin"]
    lines = [title, *[f"  {n}" for n in notes], "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    print("\n".join(lines), flush=True)
    rows = []
    for name, twin_cls in twins.items():
        env = envs.make(name)
        _, _, lengths = oracle_trajectory(env, 256, seed=1)
        T = max(1, int(np.median(lengths)))
        E = episodes_per_call(T, args.steps_per_call)
        states, acts, _ = oracle_trajectory(env, E * max(batches))
        for B in batches:
            s0, a = batch_inputs(states, acts, B, E, T)
            t = time_side_by_side(env, twin_cls, s0, a, runs, devices=args.devices,
                                  min_time=args.min_time)
            (jw, _), (mw, mc), (tw, tc) = t["major"], t["minor"], t["twin"]
            n = B * E * T
            row = [name, B, T, E, f"{n / jw:,.0f}", f"{n / mw:,.0f}", f"{n / tw:,.0f}",
                   f"{tw / jw:,.1f}x", f"{tw / mw:,.1f}x", f"{tc / mc:,.1f}x"]
            if args.devices > 1:
                sw = t["sharded"][0] if "sharded" in t else None
                row += [f"{n / sw:,.0f}", f"{tw / sw:,.1f}x"] if sw else ["-", "-"]
            rows.append(row)
            line = "| " + " | ".join(str(c) for c in row) + " |"
            lines.append(line)
            print(line, flush=True)
    append_markdown(args.out, title, header, rows, notes)
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
