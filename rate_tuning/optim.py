"""The paper's two-rate (S)GD as optax transformations.

Update rule (PAPER §1, the update of Lemma 2.4)::

    w^(i)_{t+1} = w^(i)_t - lr_w(t) * grad_{w^(i)} F_{z_t}(theta_t)      ('si' leaves)
    g_{t+1}     = g_t     - lr_g(t) * grad_g F_{z_t}(theta_t)            ('variant' leaves)
    frozen leaves never move.

No momentum and no weight decay in the theory; both exist here as options because the negative controls
and the follow-up claims (C24-C26) need them. ``project=True`` gives the sphere-projected baseline of
App. D (claim C23): each scale-invariant group is rescaled to its pre-step norm after the step, so its
effective learning rate ``lr_w / ||w_0||^2`` stays fixed and nothing is auto-tuned.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from rate_tuning import groups as G

LearningRate = Union[float, Callable[[Any], Any]]


def constant(lr: float) -> optax.Schedule:
    """``lr(t) = lr``."""
    check_learning_rate("lr", lr)
    return optax.constant_schedule(lr)


def inverse_sqrt(lr: float) -> optax.Schedule:
    """``lr(t) = lr / sqrt(t + 1)``, ``t = 0`` at the first step: the SGD schedule of the paper (C16, C18)."""
    check_learning_rate("lr", lr)
    return lambda count: lr / jnp.sqrt(jnp.asarray(count, dtype=jnp.result_type(float)) + 1.0)


SCHEDULES = {"constant": constant, "inverse_sqrt": inverse_sqrt}


def schedule(name: str, lr: float) -> optax.Schedule:
    """The schedule called ``name`` (``'constant'`` or ``'inverse_sqrt'``) with base rate ``lr``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](lr)


def check_learning_rate(name: str, lr: LearningRate) -> None:
    """Raise ``ValueError`` unless ``lr`` (a number, or a schedule's value at step 0) is finite and > 0.

    A traced value (a learning rate passed as an argument of a jitted or vmapped function) cannot be
    inspected and is accepted: validate the concrete values before tracing (see :mod:`rate_tuning.sweep`).
    """
    value = lr(0) if callable(lr) else lr
    if isinstance(value, jax.core.Tracer):
        return
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {lr!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class ProjectState(NamedTuple):
    """:func:`project_si_groups` keeps no state."""


def project_si_groups(labels) -> optax.GradientTransformation:
    """Rescale each scale-invariant group back to its pre-step norm after the step (App. D baseline).

    Given updates ``u`` and params ``w``, returns ``u'`` with ``w + u' = (w + u) * ||w|| / ||w + u||`` per
    ``'si'`` group (per channel for per-channel groups); other leaves are untouched. Chain it after the
    step. Example::

        tx = optax.chain(two_rate_sgd(labels, 1.0, 0.1), project_si_groups(labels))
    """
    def init_fn(params):
        del params
        return ProjectState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_si_groups needs params")
        new = jax.tree_util.tree_map(lambda w, u: w + u, params, updates)
        old_sq, new_sq = G.group_sq_norms(params, labels), G.group_sq_norms(new, labels)
        ratio = {k: jnp.sqrt(old_sq[k] / new_sq[k]) for k in old_sq}
        projected = G.scale_groups(new, labels, ratio)
        return jax.tree_util.tree_map(lambda p, w: p - w, projected, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def two_rate_sgd(labels, lr_w: LearningRate, lr_g: LearningRate, *, weight_decay: float = 0.0,
                 momentum: float | None = None, project: bool = False) -> optax.GradientTransformation:
    """GD/SGD with rate ``lr_w`` on ``'si'`` leaves, ``lr_g`` on ``'variant'`` leaves, nothing on ``'frozen'``.

    ``w <- w - lr(t) * (grad + weight_decay * w)`` (coupled weight decay, optional; breaks Lemma 2.4),
    with optional heavy-ball ``momentum``, and with ``project=True`` the sphere-projected baseline.

    Args:
      labels: a label tree (:mod:`rate_tuning.groups`) with the params' structure.
      lr_w, lr_g: positive floats or optax schedules (see :func:`inverse_sqrt`).
      weight_decay: coupled L2 coefficient ``lambda >= 0`` applied to every trainable leaf.
      momentum: ``None`` (the paper) or a heavy-ball coefficient in ``[0, 1)``.
      project: renormalise each ``'si'`` group to its pre-step norm after the step (C23).

    Example::

        tx = two_rate_sgd(labels, lr_w=10.0, lr_g=0.1)
        opt_state = tx.init(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    Paper: the update analysed in Lemma 2.4 and the GD/SGD theorems (Arora, Li & Lyu 2019).
    """
    check_learning_rate("lr_w", lr_w)
    check_learning_rate("lr_g", lr_g)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if momentum is not None and not (0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")

    def sgd(lr):
        steps = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        return optax.chain(*steps, optax.sgd(lr, momentum=momentum))

    tx = optax.partition({G.SI: sgd(lr_w), G.VARIANT: sgd(lr_g), G.FROZEN: optax.set_to_zero()},
                         G.kinds(labels))
    return optax.chain(tx, project_si_groups(labels)) if project else tx
