"""The per-step record: the one definition of every quantity measured at a step, and its one set of names.

Every loop of the project that records the paper's per-step quantities (the training loop
:mod:`rate_tuning.train`, the compiled sweeps :mod:`rate_tuning.sweep`, the trajectories of
:mod:`proofs_check.trajectories` and the GD-theorem runner of :mod:`proofs_check.checks.gd`) takes them
from :func:`step_record`, which takes each from :mod:`rate_tuning.metrics`. Change a formula there and
all four change (a test checks this).

For the update ``theta_t -> theta_{t+1}`` made with the gradient ``g_t`` at ``theta_t`` and the rate
``lr_w(t)`` of the scale-invariant groups, per scale-invariant group ``i`` (per-channel groups: a vector
with one entry per channel; PAPER §1, §2.4):

============================  =============================================================================
key                           quantity
============================  =============================================================================
``w_sq``                      ``||w_t^(i)||^2``, before the step
``w_sq_next``                 ``||w_{t+1}^(i)||^2``, after it
``grad_sq``                   ``||g_t^(i)||^2``, the applied gradient
``eff_lr``                    ``lr_w(t) / ||w_t^(i)||^2`` (:func:`rate_tuning.metrics.effective_lr`)
``angle``                     angle between ``w_t^(i)`` and ``w_{t+1}^(i)`` (:func:`~rate_tuning.metrics.angular_update`)
``lemma24_residual``          ``||w_{t+1}||^2 - ||w_t||^2 - lr_w(t)^2 ||g_t||^2``: 0 for plain (S)GD (Lemma 2.4, C4)
``grad_sq_intrinsic_groups``  ``||grad_{w^(i)} L(V_t; g_t)||^2``, key ``'variant'`` for the scale-variant block
============================  =============================================================================

and the scalars ``loss`` (the loss differentiated at ``theta_t``), ``lr_w`` and ``grad_sq_intrinsic``
(``||grad L(V_t; g_t)||^2``, the convergence measure of the GD and SGD theorems, C9-C18).

:func:`summarize` turns a record into the flat form of ``metrics.jsonl`` (``norm/<i>``, ``eff_lr/<i>``,
``angle/<i>``: means over channels; ``lemma24_residual``: the largest absolute residual of all groups).
All functions are pure and jit-safe.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rate_tuning import groups as G
from rate_tuning import metrics as M

LOSS = "loss"
LR_W = "lr_w"
W_SQ = "w_sq"
W_SQ_NEXT = "w_sq_next"
GRAD_SQ = "grad_sq"
EFF_LR = "eff_lr"
ANGLE = "angle"
NORM = "norm"
LEMMA24 = "lemma24_residual"
INTRINSIC = "grad_sq_intrinsic"
INTRINSIC_GROUPS = "grad_sq_intrinsic_groups"

PER_GROUP = (W_SQ, W_SQ_NEXT, GRAD_SQ, EFF_LR, ANGLE, LEMMA24, INTRINSIC_GROUPS)
"""The keys of :func:`step_record` whose values are dicts keyed by group name."""


def intrinsic(grads, params, labels) -> tuple[dict[str, jax.Array], jax.Array]:
    """``(per group, total)`` of ``||grad L(V; g)||^2`` at ``params`` from the gradient ``grads`` there
    (:func:`rate_tuning.metrics.intrinsic_grad_sq_norms`)."""
    return M.intrinsic_grad_sq_norms(grads, params, labels)


def step_record(params, new_params, grads, labels, lr_w, *, loss=None) -> dict[str, Any]:
    """The per-step quantities of the update ``params -> new_params`` made with ``grads`` (table above).

    Args:
      params, new_params: ``theta_t`` and ``theta_{t+1}``.
      grads: the gradient applied at ``theta_t``.
      labels: the label tree (:mod:`rate_tuning.groups`).
      lr_w: ``lr_w(t)``, the rate of the scale-invariant groups at this step (a scalar, may be traced).
      loss: the loss at ``theta_t`` (recorded under ``loss`` when given).
    """
    leaves = jax.tree_util.tree_leaves(params)
    if leaves:  # in the params' dtype: a huge rate (1e30 in float32) squares to inf, not to a cast warning
        lr_w = jnp.asarray(lr_w, jnp.result_type(*leaves))
    w_sq = G.group_sq_norms(params, labels)
    w_sq_next = G.group_sq_norms(new_params, labels)
    grad_sq = G.group_sq_norms(grads, labels)
    per_group, total = intrinsic(grads, params, labels)
    rec: dict[str, Any] = {
        LR_W: jnp.asarray(lr_w),
        W_SQ: w_sq,
        W_SQ_NEXT: w_sq_next,
        GRAD_SQ: grad_sq,
        EFF_LR: M.effective_lr(lr_w, params, labels),
        ANGLE: M.angular_update(params, new_params, labels),
        LEMMA24: {k: w_sq_next[k] - w_sq[k] - lr_w ** 2 * grad_sq[k] for k in w_sq},
        INTRINSIC_GROUPS: per_group,
        INTRINSIC: total,
    }
    if loss is not None:
        rec[LOSS] = loss
    return rec


def summarize(rec: dict[str, Any]) -> dict[str, jax.Array]:
    """The flat scalars of a :func:`step_record` written to ``metrics.jsonl``.

    ``loss`` (if recorded), ``lr_w``, ``grad_sq_intrinsic``, ``lemma24_residual`` (``max |residual|`` over
    groups and channels; 0 without groups) and per group ``norm/<i>`` (``||w_t||``), ``eff_lr/<i>`` and
    ``angle/<i>``, each the mean over the channels of a per-channel group.
    """
    out: dict[str, jax.Array] = {}
    if LOSS in rec:
        out[LOSS] = rec[LOSS]
    out[LR_W] = rec[LR_W]
    out[INTRINSIC] = rec[INTRINSIC]
    residuals = [jnp.max(jnp.abs(v)) for v in rec[LEMMA24].values()]
    out[LEMMA24] = jnp.max(jnp.stack(residuals)) if residuals else jnp.zeros_like(rec[INTRINSIC])
    for k, v in rec[W_SQ].items():
        out[f"{NORM}/{k}"] = jnp.mean(jnp.sqrt(v))
        out[f"{EFF_LR}/{k}"] = jnp.mean(rec[EFF_LR][k])
        out[f"{ANGLE}/{k}"] = jnp.mean(rec[ANGLE][k])
    return out


__all__ = ["ANGLE", "EFF_LR", "GRAD_SQ", "INTRINSIC", "INTRINSIC_GROUPS", "LEMMA24", "LOSS", "LR_W", "NORM",
           "PER_GROUP", "W_SQ", "W_SQ_NEXT", "intrinsic", "step_record", "summarize"]
