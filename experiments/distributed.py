"""Multi-host (multi-controller) JAX: initialisation, the main process, per-process batch slices.

Every process runs the same program; ``jax.devices()`` then lists the devices of all processes
and jitted computations over a global mesh run as one SPMD program. Each process feeds only the
rows of the global batch that its own devices hold (``global_array_from_local``).

Initialisation (:func:`initialize_from_env`), first match wins:

1. explicit arguments, or the env vars ``JAX_COORDINATOR_ADDRESS`` (``host:port``),
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (all three) -> ``jax.distributed.initialize(...)``
   with the gloo CPU collectives (so CPU processes on one machine form a real job);
2. ``JAX_DISTRIBUTED_AUTO=1`` (set by ``experiments/tpu_vm/launch.py`` on pod slices) or a
   multi-worker Cloud TPU environment (``TPU_WORKER_HOSTNAMES`` with several hosts) ->
   ``jax.distributed.initialize()`` with cluster auto-detection;
3. otherwise nothing: a single-process run.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["initialize_from_env", "is_main_process", "process_local_batch_slice",
           "global_array_from_local", "host_value", "ENV_VARS"]

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize_from_env(coordinator_address: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None, *,
                        local_device_ids: Sequence[int] | None = None,
                        initialization_timeout: int = 300) -> bool:
    """Join a multi-process JAX job if one is configured; returns whether it did.

    Must run before anything touches a JAX backend (``jax.devices()``, array creation).
    Calling it again after a successful initialisation is a no-op (returns True).
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("initialize_from_env: give coordinator_address, num_processes and "
                             f"process_id together, got {explicit}")
    else:
        present = [k for k in ENV_VARS if env.get(k)]
        if present:
            missing = [k for k in ENV_VARS if not env.get(k)]
            if missing:
                raise ValueError(f"multi-host env vars are incomplete: {', '.join(present)} set but "
                                 f"{', '.join(missing)} missing")
            coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
            num_processes = _int_env("JAX_NUM_PROCESSES", env["JAX_NUM_PROCESSES"])
            process_id = _int_env("JAX_PROCESS_ID", env["JAX_PROCESS_ID"])
    if coordinator_address is not None:
        num_processes, process_id = int(num_processes), int(process_id)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"JAX_PROCESS_ID = {process_id} must be in [0, JAX_NUM_PROCESSES = "
                             f"{num_processes})")
        if ":" not in str(coordinator_address):
            raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port, got {coordinator_address!r}")
        # CPU processes need a collectives backend to talk to each other; harmless elsewhere.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=str(coordinator_address),
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids,
                                   initialization_timeout=initialization_timeout)
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if env.get("JAX_DISTRIBUTED_AUTO", "") in ("1", "true", "True") or len(hosts) > 1:
        jax.distributed.initialize()   # Cloud TPU / SLURM / ... auto-detection
        return True
    return False


def is_main_process() -> bool:
    """True on process 0 (the one that logs, prints and writes metrics)."""
    return jax.process_index() == 0


def process_local_batch_slice(global_batch: int, sharding: jax.sharding.Sharding | None = None, *,
                              process_index: int | None = None,
                              process_count: int | None = None) -> slice:
    """Rows ``[start, stop)`` of a ``global_batch``-row batch that this process must supply.

    With ``sharding`` (a sharding of the batch array, e.g. ``mesh.data_sharding(mesh)``) the rows
    are those held by this process's devices (must be one contiguous block, which is the case
    for the batch axis of a ``("data", "fsdp", "tensor")`` mesh). Without it: block
    ``process_index`` of ``process_count`` equal blocks.
    """
    global_batch = int(global_batch)
    if sharding is not None:
        idx = sharding.addressable_devices_indices_map((global_batch,))
        rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                       for s in idx.values()})
        start, stop = rows[0][0], rows[0][1]
        for a, b in rows[1:]:
            if a > stop:
                raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows "
                                 f"{rows}; use a mesh whose batch axes follow process order")
            stop = max(stop, b)
        return slice(start, stop)
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by the process count {pc}")
    per = global_batch // pc
    return slice(pi * per, (pi + 1) * per)


def global_array_from_local(local: Any, mesh: jax.sharding.Mesh,
                            spec: jax.sharding.PartitionSpec | None = None,
                            global_shape: tuple[int, ...] | None = None) -> Any:
    """Global ``jax.Array`` (or pytree of them) from this process's rows via
    ``jax.make_array_from_process_local_data``. ``spec`` defaults to the batch axis over
    ``("data", "fsdp")``; ``global_shape`` defaults to stacking equal local blocks."""
    spec = jax.sharding.PartitionSpec(("data", "fsdp")) if spec is None else spec
    sharding = jax.sharding.NamedSharding(mesh, spec)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local)


def host_value(x: Any) -> np.ndarray:
    """The full value of ``x`` as a NumPy array, on every process.

    A fully addressable or fully replicated array reads a local copy; an array sharded across
    processes is gathered with ``process_allgather``, a collective: then every process must
    call this for the same arrays in the same order.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
