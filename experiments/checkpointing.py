"""Orbax checkpoints of the training state plus a small JSON ``meta`` dict, and preemption.

Layout: ``DIR/<step>/state`` (orbax ``StandardSave`` of the state pytree) and
``DIR/<step>/meta`` (``JsonSave`` of ``meta``). Orbax writes each step into a temporary
directory and renames it when complete, and :meth:`Checkpointer.save` waits for that before
returning, so a process killed at any point (even SIGKILL) never leaves a partial step that
:meth:`Checkpointer.latest_step` would report.

Restoring is strict: the stored tree must have exactly the leaf paths, shapes and dtypes of the
given abstract state, else :class:`CheckpointError` names the first mismatching leaf. A step
whose files are damaged raises :class:`CheckpointError` naming the step directory; nothing is
ever silently re-initialised.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "PreemptionGuard"]


class CheckpointError(ValueError):
    """A checkpoint cannot be restored onto the requested state (or is damaged)."""


# ----------------------------------------------------------------------------- tree helpers
def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path) or "<root>"


def _flat(tree) -> dict[str, Any]:
    """``{'a/b/0': leaf}``; dict keys, attribute names and sequence indices all become strings,
    so a flax dataclass / namedtuple state matches the nested dicts orbax stores."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(p): leaf for p, leaf in leaves}


def _is_key_dtype(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored_form(leaf) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) as orbax stores the leaf (typed PRNG keys are stored as their key data)."""
    dtype = getattr(leaf, "dtype", None)
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    if dtype is not None and _is_key_dtype(dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    if dtype is None:  # Python scalar: orbax stores it as a 0-d scalar; its width is free.
        return shape, None
    return shape, np.dtype(dtype)


def _default_sharding() -> jax.sharding.Sharding:
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _as_abstract(leaf, default):
    """Concrete jax arrays / ShapeDtypeStructs -> ShapeDtypeStruct with a sharding; numpy arrays
    and Python scalars stay as they are (orbax restores them as the same type)."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return leaf


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    return x


# ----------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Orbax ``CheckpointManager`` for ``(state pytree, meta dict)`` with keep-N and an interval.

    ``save(step, ...)`` writes when ``step % save_every == 0`` or ``force``; the ``keep`` newest
    steps are kept. All processes of a multi-host job must call ``save`` / ``restore`` together.
    """

    def __init__(self, directory: str, *, keep: int, save_every: int):
        if int(keep) < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep!r}")
        if int(save_every) < 1:
            raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            save_interval_steps=self.save_every,
            create=True,
            cleanup_tmp_directories=True,   # drop the temp dirs of a save that was killed
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    # -- queries
    def all_steps(self) -> list[int]:
        """Completed (committed) steps, ascending."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    # -- save
    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Save ``state`` and ``meta`` at ``step`` if due (``step % save_every == 0``) or ``force``.

        Returns whether a checkpoint was written. A step that already exists is left as it is
        (returns False). Blocks until the step directory is committed (atomic rename).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"Checkpointer.save: step must be >= 0, got {step}")
        if step in self.all_steps():
            return False
        if not force and step % self.save_every != 0:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_jsonable(dict(meta or {}))))
        saved = bool(self._manager.save(step, args=args, force=force))
        self._manager.wait_until_finished()
        return saved

    # -- restore
    def _check_structure(self, step: int, abstract_state: Any) -> None:
        path = self.step_dir(step)
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:  # missing / unreadable _METADATA
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete (cannot read its "
                                  f"metadata: {type(e).__name__}: {e})") from e
        if stored is None:
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete (no state metadata)")
        stored_tree = getattr(stored, "tree", stored)
        have, want = _flat(stored_tree), _flat(abstract_state)
        for name in sorted(set(want) | set(have)):
            if name not in have:
                raise CheckpointError(f"checkpoint {path} does not match the state: leaf '{name}' "
                                      f"(shape {_stored_form(want[name])[0]}) is missing from the checkpoint")
            if name not in want:
                raise CheckpointError(f"checkpoint {path} does not match the state: the checkpoint has "
                                      f"leaf '{name}' (shape {tuple(have[name].shape)}) that the state lacks")
            w_shape, w_dtype = _stored_form(want[name])
            h_shape = tuple(have[name].shape)
            h_dtype = np.dtype(have[name].dtype) if getattr(have[name], "dtype", None) is not None else None
            if w_shape != h_shape:
                raise CheckpointError(f"checkpoint {path} does not match the state: leaf '{name}' has "
                                      f"shape {h_shape} in the checkpoint but {w_shape} in the state")
            if w_dtype is not None and h_dtype is not None and w_dtype != h_dtype:
                raise CheckpointError(f"checkpoint {path} does not match the state: leaf '{name}' has "
                                      f"dtype {h_dtype} in the checkpoint but {w_dtype} in the state")

    def restore(self, step: int | None, abstract_state: Any, *,
                expected_fingerprint: str | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` of ``step`` (``None``: the latest) onto ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (their ``sharding`` is used;
        none: one device / replicated) or concrete arrays with the wanted structure. If both
        ``expected_fingerprint`` and ``meta['config_fingerprint']`` are given they must agree.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        step = int(step)
        path = self.step_dir(step)
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {self.all_steps()})")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete (cannot read meta: "
                                  f"{type(e).__name__}: {e})") from e
        meta = dict(meta or {})
        stored_fp = meta.get("config_fingerprint")
        if expected_fingerprint is not None and stored_fp is not None and stored_fp != expected_fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written by a different config (fingerprint {stored_fp} != "
                f"{expected_fingerprint}); use a new --workdir for a changed config")
        self._check_structure(step, abstract_state)
        default = _default_sharding()
        target = jax.tree.map(lambda x: _as_abstract(x, default), abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete (restore failed: "
                                  f"{type(e).__name__}: {str(e)[:300]})") from e
        return restored.state, meta

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- preemption
class PreemptionGuard:
    """Turns SIGTERM (TPU / spot preemption; optionally SIGINT) into a flag the host loop polls.

    ``with PreemptionGuard() as guard: for ...: ...; if guard.should_stop: save; break``.
    The previous handlers are restored on exit. In a multi-process job ``should_stop`` is a
    collective (any process signalled -> all stop, so all save together): every process must
    read it the same number of times, e.g. once per iteration. ``stop_requested`` is the
    local flag without communication.
    """

    def __init__(self, signals: tuple[int, ...] | None = None, *, catch_sigint: bool = False):
        if signals is None:
            signals = (signal.SIGTERM, signal.SIGINT) if catch_sigint else (signal.SIGTERM,)
        self.signals = tuple(signals)
        self.stop_requested = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self.stop_requested = True
        self.received = signum

    def request_stop(self) -> None:
        """Set the flag by hand (tests, or a time budget)."""
        self.stop_requested = True

    @property
    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.stop_requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.stop_requested, np.int32))
        return bool(np.any(flags))

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered on the main thread (signal handlers)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
