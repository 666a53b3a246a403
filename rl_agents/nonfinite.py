"""Guarding the update against a non-finite loss or gradient (NaN / inf).

One bad batch (a NaN reward, an overflow) would otherwise write NaN into the parameters, the
optimizer state and every later checkpoint. Two levels, both inside the jitted update:

* ``guarded_step``: one optax step that leaves parameters and optimizer state unchanged when the
  loss or the gradient's global norm is not finite, or the caller says the batch is empty
  (every optimizer step of an update uses it: ``trainer.minibatch_epochs``, ArCHer's critic
  step, the PRIME PRM step).
* the update (``skip_nonfinite``): if any of its steps was not finite, or its new parameters
  are not, the trainer returns the trained state from before the update (parameters, optimizer states, PRM, ArCHer's
  critic target and replay buffer); ``key`` and ``step`` still advance. ``nonfinite_metrics``
  reports it as ``update/skipped_nonfinite`` (0 / 1) and ``update/nonfinite_steps``.

The state's structure is unchanged (no counters in the optimizer state, unlike
``optax.apply_if_finite``), so checkpoints and shardings are the same with or without the guard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from envs.wrappers import tree_select

__all__ = ["NONFINITE_STEP", "PRM_NONFINITE_STEP", "all_finite", "guarded_step",
           "skip_nonfinite", "nonfinite_metrics"]

#: Per-step flag in the stacked metrics of ``minibatch_epochs``: the step was not finite.
NONFINITE_STEP = "update/nonfinite_step"
#: The same flag of the PRIME PRM's step (``process_rewards.prm_update``).
PRM_NONFINITE_STEP = "prm/nonfinite_step"


def all_finite(tree) -> jax.Array:
    """bool ``[]``: no floating-point leaf of ``tree`` holds a NaN or an inf."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def guarded_step(optimizer, params, opt_state, loss, grads, empty=None):
    """One optax step that is skipped when ``loss`` or the gradient's global norm is not
    finite: ``(params, opt_state, grad_norm, bad)`` (the old ones when skipped; ``bad``: not
    finite). ``empty`` (bool ``[]``): the batch has nothing to learn from (no loss token / no
    row of weight > 0), so the step is skipped too — its gradient is zero, and an AdamW step on
    a zero gradient would still move the parameters along the moment estimates and decay them."""
    grad_norm = optax.global_norm(grads)
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    skip = bad if empty is None else bad | empty
    new_params, new_opt = tree_select(skip, (params, opt_state), (new_params, new_opt))
    return new_params, new_opt, grad_norm, bad


def skip_nonfinite(bad_steps, new, old, also=()):
    """The update-level guard → ``(skip, new or old)``: skip = any optimizer step of the update
    was not finite (``bad_steps`` > 0) or a floating leaf of ``new`` or ``also`` (e.g. fresh
    rewards that would enter a replay buffer) is NaN / inf; then ``old`` is returned in place of
    ``new`` (same structure)."""
    skip = (jnp.asarray(bad_steps) > 0) | ~all_finite((new, also))
    return skip, tree_select(skip, old, new)


def nonfinite_metrics(skip, bad_steps) -> dict:
    """The update's guard metrics: ``update/skipped_nonfinite`` (1.0: this update was skipped,
    its trained state is the one before it) and ``update/nonfinite_steps`` (how many optimizer
    steps of the update had a non-finite loss or gradient)."""
    return {"update/skipped_nonfinite": skip.astype(jnp.float32),
            "update/nonfinite_steps": jnp.asarray(bad_steps, jnp.float32)}
