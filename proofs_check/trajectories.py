"""Run an optax optimizer on a loss under ``jax.lax.scan`` and record what the dynamics checks need.

The optimizer is whatever users train with (in practice :func:`rate_tuning.optim.two_rate_sgd`); this
module only drives it and measures. One step ``t`` (PAPER §1, the update of Lemma 2.4)::

    g_t      = grad F_t(theta_t)                         (the gradient actually applied)
    u_t, s   = tx.update(g_t, s, theta_t)
    theta_t+1 = theta_t + u_t

where ``F_t`` is

* the full loss ``L`` (gradient descent; the default),
* ``stochastic(theta, key_t)`` with a fresh ``key_t`` per step (SGD: gradient and update on the same
  sample ``z_t``), or
* ``step_loss(theta, t)`` (e.g. the ``t``-th mini-batch of a BN network in train mode).

A BN network on a fixed batch in train mode is just ``loss(params)`` (batch statistics are recomputed in
every call, so running statistics never enter).

Per step and per scale-invariant group ``i`` it records (:class:`Trajectory`): ``||w_t||^2`` before and after
the step, ``||g_t||^2`` and ``<g_t, w_t>`` of the applied gradient, ``||u_t||^2`` and ``<u_t, w_t>``, the
learning rates ``lr_w(count)``, ``lr_g(count)`` at the optimizer's step count, ``F_t(theta_t)``, the intrinsic
gradient norm ``||grad_{w_i} F_t(V_t; g_t)||^2`` (:func:`rate_tuning.metrics.intrinsic_grad_sq_norms`),
the effective learning rate ``lr_w(t)/||w_t||^2`` and the angular update; optionally the params every
``snapshot_every`` steps, and the full loss when the step loss differs from it.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019
(Lemma 2.4, claims C4-C8, C13, the one-step bound I3).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rate_tuning import groups as G
from rate_tuning import metrics as M
from rate_tuning import record as R

__all__ = ["Trajectory", "run", "optimizer_count"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Per-step records of one run (numpy arrays; leading axis = step ``t = 0..T-1``).

    The shared per-step quantities come from :func:`rate_tuning.record.step_record`, under its names.

    Per-group dicts are keyed by SI group name; a per-channel group gives ``(T, C)`` arrays. With
    ``record='path'`` the per-group dicts are empty and the per-group totals None.

    Attributes:
      steps: ``T``.
      dtype: dtype of the params (``'float64'`` or ``'float32'``).
      groups: SI group names.
      loss: ``F_t(theta_t)``, the loss that was differentiated at step ``t`` (before the step).
      final_loss: ``F(theta_T)`` with the full loss (or, for ``step_loss``, ``step_loss(theta_T, T)``).
      full_loss: ``L(theta_t)`` when the step loss is not the full loss and ``full_loss=True``, else None.
      full_intrinsic_total: ``||grad L(V_t; g_t)||^2`` with the full loss (same condition), else None.
      count: the optimizer's step count before the step (``t`` when the state has none).
      lr_w, lr_g: learning rates of step ``t``: the schedule at ``count`` (NaN if not given).
      w_sq, w_sq_next: ``||w_t^(i)||^2`` and ``||w_{t+1}^(i)||^2``.
      grad_sq, grad_dot_w: ``||g_t^(i)||^2`` and ``<g_t^(i), w_t^(i)>`` of the applied gradient.
      update_sq, update_dot_w: ``||u_t^(i)||^2`` and ``<u_t^(i), w_t^(i)>``.
      grad_sq_intrinsic_groups: ``||grad_{w^(i)} F_t(V_t; g_t)||^2`` per group, key ``'variant'`` for the g-block.
      grad_sq_intrinsic: their sum (None with ``record='path'``).
      eff_lr: ``lr_w(t) / ||w_t^(i)||^2``.
      angle: angle between ``w_t^(i)`` and ``w_{t+1}^(i)`` (radians).
      variant_grad_sq: ``||g_t^{(variant)}||^2`` (the scale-variant block of the applied gradient).
      snapshot_steps: steps ``t`` at which ``snapshots`` were taken (multiples of ``snapshot_every``).
      snapshots: params before step ``t`` for ``t`` in ``snapshot_steps`` (leaves stacked on axis 0), or None.
      final_params: ``theta_T``.
      final_opt_state: the optimizer state after the last step (pass it back to :func:`run` to continue).
      step_keys: raw key data of the per-step keys (SGD), ``(T, ...)`` uint32, or None.
    """

    steps: int
    dtype: str
    groups: tuple[str, ...]
    loss: np.ndarray
    final_loss: float
    full_loss: np.ndarray | None
    full_intrinsic_total: np.ndarray | None
    count: np.ndarray
    lr_w: np.ndarray
    lr_g: np.ndarray
    w_sq: dict[str, np.ndarray]
    w_sq_next: dict[str, np.ndarray]
    grad_sq: dict[str, np.ndarray]
    grad_dot_w: dict[str, np.ndarray]
    update_sq: dict[str, np.ndarray]
    update_dot_w: dict[str, np.ndarray]
    grad_sq_intrinsic_groups: dict[str, np.ndarray]
    grad_sq_intrinsic: np.ndarray
    eff_lr: dict[str, np.ndarray]
    angle: dict[str, np.ndarray]
    variant_grad_sq: np.ndarray
    snapshot_steps: np.ndarray
    snapshots: PyTree | None
    final_params: PyTree
    final_opt_state: Any
    step_keys: np.ndarray | None


def optimizer_count(opt_state) -> jax.Array | None:
    """The first integer leaf named ``count`` in an optax state (e.g. ``ScaleByScheduleState.count``).

    This is the step number at which optax evaluates learning-rate schedules; None when the state has
    none (constant learning rates).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if path and getattr(path[-1], "name", None) == "count" and jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
            return leaf
    return None


def _as_schedule(lr) -> Callable | None:
    if lr is None:
        return None
    return lr if callable(lr) else (lambda count: lr)


def _hashable(x):
    """A cache-key part: numbers by value, everything else by identity (the object is kept alive)."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return ("v", x)
    return ("id", id(x))


# Compiled scans, keyed by the identity of the loss/optimizer objects and the static options; the value
# keeps those objects alive so that their ids cannot be reused while the entry exists.
_COMPILED: dict = {}
_COMPILED_MAX = 128

RECORDS = ("full", "path")


def _compiled(key_parts: tuple, keep_alive: tuple, build: Callable):
    if key_parts not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key_parts] = (build(), keep_alive)
    return _COMPILED[key_parts][0]


def run(loss_or_problem, params: PyTree, labels: PyTree | None, tx: optax.GradientTransformation, steps: int, *,
        stochastic: bool | Callable | None = None, step_loss: Callable | None = None, key: jax.Array | None = None,
        lr_w=None, lr_g=None, snapshot_every: int = 0, full_loss: bool = False, opt_state=None,
        record: str = "full") -> Trajectory:
    """Run ``tx`` for ``steps`` steps from ``params`` under ``lax.scan`` and record per-step quantities.

    The compiled scan is cached on the identity of ``loss``/``tx``/``stochastic``/``step_loss``/``labels``
    and the static options, so a second call with other initial params, key or optimizer state (same
    shapes) does not recompile: build ``tx`` once and reuse it.

    Args:
      loss_or_problem: a ``params -> scalar`` loss, or a :class:`proofs_check.problems.Problem`.
      params: initial params.
      labels: label tree (:mod:`rate_tuning.groups`); None takes the problem's.
      tx: the optimizer, e.g. ``rate_tuning.optim.two_rate_sgd(labels, lr_w, lr_g)``.
      steps: number of steps ``T``.
      stochastic: SGD. True uses the problem's ``stochastic_loss``; a callable ``(params, key) -> scalar``
        is used as is. One key per step (split from ``key``); gradient and update use the same sample.
      step_loss: deterministic per-step loss ``(params, t) -> scalar`` (e.g. mini-batch ``t``; ``t`` counts
        from 0 in every call); exclusive with ``stochastic``.
      key: PRNG key of the SGD samples (required with ``stochastic``).
      lr_w, lr_g: the learning rates ``tx`` was built with (floats or optax schedules), for the records;
        evaluated at the optimizer's ``count``.
      snapshot_every: keep the params every ``k`` steps (0: never); ``steps`` must be a multiple of ``k``.
      full_loss: with ``stochastic`` or ``step_loss``, also record the full loss and its intrinsic gradient
        norm at every step (one more gradient per step).
      opt_state: the optimizer state to start from (default ``tx.init(params)``); pass a previous
        trajectory's ``final_opt_state`` (and ``final_params``) to continue a run exactly.
      record: ``'full'`` (every per-step quantity) or ``'path'`` (only ``loss``, ``count``, the learning
        rates and the snapshots: cheaper to compile; the per-group dicts are then empty).

    Returns:
      A :class:`Trajectory` of numpy arrays.

    Example::

        prob = problems.sphere_function()
        tx = two_rate_sgd(prob.labels, 0.5, 0.1)
        traj = run(prob, prob.init(jax.random.key(0)), None, tx, 200, lr_w=0.5, lr_g=0.1)
        traj.w_sq["w"]  # non-decreasing (Lemma 2.4)
    """
    problem = None if callable(loss_or_problem) else loss_or_problem
    loss = loss_or_problem if problem is None else problem.loss
    labels = problem.labels if labels is None else labels
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if record not in RECORDS:
        raise ValueError(f"record must be one of {RECORDS}, got {record!r}")
    if stochastic is not None and stochastic is not False and step_loss is not None:
        raise ValueError("give either stochastic or step_loss, not both")
    if stochastic is True:
        if problem is None or problem.stochastic_loss is None:
            raise ValueError("stochastic=True needs a Problem with a stochastic_loss")
        stochastic = problem.stochastic_loss
    sgd = callable(stochastic)
    if not sgd:
        stochastic = None
    if sgd and key is None:
        raise ValueError("stochastic runs need a key")
    k = int(snapshot_every)
    if k < 0 or (k and steps % k):
        raise ValueError(f"steps ({steps}) must be a multiple of snapshot_every ({k})")
    full = record == "full"
    track_full = bool(full_loss) and (sgd or step_loss is not None) and full
    group_names = tuple(G.si_groups(params, labels))
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))

    def build():
        sched_w, sched_g = _as_schedule(lr_w), _as_schedule(lr_g)

        def one_step(carry, t):
            params, opt_state, key = carry
            rec = {}
            if sgd:
                key, sub = jax.random.split(key)
                f = lambda p: stochastic(p, sub)  # noqa: E731
                rec["step_key"] = jax.random.key_data(sub)
            elif step_loss is not None:
                f = lambda p: step_loss(p, t)  # noqa: E731
            else:
                f = loss
            value, grads = jax.value_and_grad(f)(params)
            count = optimizer_count(opt_state)
            count = t if count is None else count
            updates, opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            dt = jnp.result_type(*jax.tree_util.tree_leaves(params))
            lr_w_t = jnp.asarray(sched_w(count) if sched_w else jnp.nan, dt)
            lr_g_t = jnp.asarray(sched_g(count) if sched_g else jnp.nan, dt)
            rec.update(loss=value, count=count, lr_w=lr_w_t, lr_g=lr_g_t)
            if full:
                q = R.step_record(params, new_params, grads, labels, lr_w_t)
                rec.update({k: q[k] for k in (R.W_SQ, R.W_SQ_NEXT, R.GRAD_SQ, R.EFF_LR, R.ANGLE, R.INTRINSIC_GROUPS,
                                              R.INTRINSIC)})
                rec.update(grad_dot_w=G.group_inner(grads, params, labels), update_sq=G.group_sq_norms(updates, labels),
                           update_dot_w=G.group_inner(updates, params, labels),
                           variant_grad_sq=M.variant_sq_norm(grads, labels))
            if track_full:
                full_value, full_grads = jax.value_and_grad(loss)(params)
                rec["full_loss"] = full_value
                rec["full_intrinsic_total"] = R.intrinsic(full_grads, params, labels)[1]
            return (new_params, opt_state, key), rec

        def chunk(carry, ts):
            snap = carry[0]
            carry, rec = jax.lax.scan(one_step, carry, ts)
            return carry, (rec, snap)

        def scan_all(params, opt_state, key):
            carry = (params, opt_state, key)
            ts = jnp.arange(steps)
            if k:
                carry, (rec, snaps) = jax.lax.scan(chunk, carry, ts.reshape(steps // k, k))
                rec = jax.tree_util.tree_map(lambda x: x.reshape((steps,) + x.shape[2:]), rec)
            else:
                carry, rec = jax.lax.scan(one_step, carry, ts)
                snaps = None
            final, final_state = carry[0], carry[1]
            final_loss = step_loss(final, steps) if step_loss is not None else loss(final)
            return rec, snaps, final, final_state, final_loss

        return jax.jit(scan_all), jax.jit(tx.init)

    cache_key = ("scan", _hashable(loss), _hashable(tx), _hashable(stochastic), _hashable(step_loss),
                 _hashable(labels), _hashable(lr_w), _hashable(lr_g), steps, k, track_full, record)
    scan_all, init = _compiled(cache_key, (loss, tx, stochastic, step_loss, labels, lr_w, lr_g), build)
    if opt_state is None:
        opt_state = init(params)
    if key is None:
        key = jax.random.key(0)
    rec, snaps, final, final_state, final_loss = jax.device_get(scan_all(params, opt_state, key))
    np_dict = lambda name: {g: np.asarray(v) for g, v in rec[name].items()} if full else {}  # noqa: E731
    return Trajectory(
        steps=steps,
        dtype=str(jnp.dtype(dtype)),
        groups=group_names,
        loss=np.asarray(rec["loss"]),
        final_loss=float(final_loss),
        full_loss=np.asarray(rec["full_loss"]) if track_full else None,
        full_intrinsic_total=np.asarray(rec["full_intrinsic_total"]) if track_full else None,
        count=np.asarray(rec["count"]),
        lr_w=np.asarray(rec["lr_w"]),
        lr_g=np.asarray(rec["lr_g"]),
        w_sq=np_dict("w_sq"),
        w_sq_next=np_dict("w_sq_next"),
        grad_sq=np_dict("grad_sq"),
        grad_dot_w=np_dict("grad_dot_w"),
        update_sq=np_dict("update_sq"),
        update_dot_w=np_dict("update_dot_w"),
        grad_sq_intrinsic_groups=np_dict(R.INTRINSIC_GROUPS),
        grad_sq_intrinsic=np.asarray(rec[R.INTRINSIC]) if full else None,
        eff_lr=np_dict(R.EFF_LR),
        angle=np_dict(R.ANGLE),
        variant_grad_sq=np.asarray(rec["variant_grad_sq"]) if full else None,
        snapshot_steps=np.arange(0, steps, k) if k else np.zeros((0,), np.int64),
        snapshots=jax.tree_util.tree_map(np.asarray, snaps) if k else None,
        final_params=jax.tree_util.tree_map(np.asarray, final),
        final_opt_state=final_state,
        step_keys=np.asarray(rec["step_key"]) if sgd else None,
    )
