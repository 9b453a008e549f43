"""The train and eval steps of the paper's two-rate (S)GD, and how a diverging step is reported.

* :class:`TrainState`: flax's ``TrainState`` plus the BatchNorm running statistics ``batch_stats``. The
  label tree is a Python object and stays *out* of the pytree: the steps close over it.
* :func:`make_train_step`: a jitted ``train_step(state, x, y) -> (state, metrics)``; the metrics are the
  per-step record (:func:`rate_tuning.record.step_record`, flattened by :func:`~rate_tuning.record.summarize`)
  of the gradient the step applies, computed inside the step.
* :func:`make_eval_step`: eval-mode (running statistics) loss and accuracy.
* :func:`finite_flags`, :func:`finite_groups`, :func:`divergence_message`, :class:`DivergenceError`: a
  non-finite loss, gradient or parameter, found by a few reductions inside the step and named by group.

:mod:`rate_tuning.parallel` places these steps on a mesh; :mod:`rate_tuning.train` drives them.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from rate_tuning import groups as G
from rate_tuning import models
from rate_tuning import record as R

FINITE = "finite"
"""Key of the finiteness flags in a step's metrics (with ``check_finite``); never written to metrics.jsonl."""


class TrainState(train_state.TrainState):
    """flax's ``TrainState`` (step, params, tx, opt_state) plus the BatchNorm running statistics."""

    batch_stats: Any


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient or parameter; the message names the step and the parameter groups.

    Attributes: ``step`` (the step whose update went bad) and ``groups`` (the names in the message).
    """

    def __init__(self, message: str, step: int, groups: list[str]):
        super().__init__(message)
        self.step = step
        self.groups = groups


def accuracy(logits, y) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def _group_name(path: str, label) -> str:
    return label.group if label.kind == G.SI else path


def finite_groups(params, labels) -> list[tuple[str, str]]:
    """``[(name, kind), ...]``: the groups the divergence check reports, in tree order. A scale-invariant
    group is named by its group name (e.g. ``'layer0:kernel'``), every other leaf by its path (e.g.
    ``'bn_out/scale'``); ``kind`` is ``'si'``, ``'variant'`` or ``'frozen'``."""
    seen: dict[str, str] = {}
    for path, _, label in G.flatten_labelled(params, labels):
        seen.setdefault(_group_name(path, label), label.kind)
    return list(seen.items())


def finite_flags(loss, grads, new_params, labels) -> jax.Array:
    """Booleans ``[loss finite, gradient of each group finite..., parameter of each group finite...]``, the
    groups in the order of :func:`finite_groups`; a few cheap reductions, pure and jit-safe."""
    def by_group(tree):
        flags: dict[str, jax.Array] = {}
        for path, leaf, label in G.flatten_labelled(tree, labels):
            name = _group_name(path, label)
            ok = jnp.all(jnp.isfinite(leaf))
            flags[name] = flags[name] & ok if name in flags else ok
        return list(flags.values())

    return jnp.stack([jnp.isfinite(loss), *by_group(grads), *by_group(new_params)])


def make_train_step(model: nn.Module, labels, lr_w: optax.Schedule, *, max_traces: int | None = None,
                    check_finite: bool = False, jit: bool = True):
    """A jitted ``train_step(state, x, y) -> (state, metrics)`` of the two-rate (S)GD in ``state.tx``.

    Train-mode BN (batch statistics): the loss, its gradient, the optimizer update and the new running
    statistics. ``metrics``: ``loss``, ``accuracy`` and :func:`rate_tuning.record.summarize` of the step's
    :func:`rate_tuning.record.step_record`; with ``check_finite`` also ``metrics['finite']``
    (:func:`finite_flags`).

    Args:
      model: the linen model.
      labels: its label tree (a closure constant, not traced).
      lr_w: the schedule of the scale-invariant groups (the one in ``state.tx``), evaluated at ``state.step``.
      max_traces: if set, wrap the step in ``chex.assert_max_traces(n=max_traces)``, so a retrace raises
        (chex counts per definition site: call ``chex.clear_trace_counter()`` first).
      check_finite: add the ``finite`` flags (off by default: the metrics stay all floats).
      jit: return the jitted step (default); ``False`` gives the plain function, for a caller that jits it
        once itself with shardings (:func:`rate_tuning.parallel.make_parallel_train_step`).
    """
    def train_step(state: TrainState, x, y):
        def loss_fn(params):
            return models.batch_loss(model, params, state.batch_stats, x, y, train=True)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
        rec = R.step_record(state.params, new_state.params, grads, labels, lr_w(state.step), loss=loss)
        summary = R.summarize(rec)
        out = {R.LOSS: summary.pop(R.LOSS), "accuracy": accuracy(logits, y), **summary}
        if check_finite:
            out[FINITE] = finite_flags(loss, grads, new_state.params, labels)
        return new_state, out

    if max_traces is not None:
        train_step = chex.assert_max_traces(train_step, n=max_traces)
    return jax.jit(train_step) if jit else train_step


def make_eval_step(model: nn.Module):
    """A jitted ``eval_step(state, x, y) -> {'loss', 'accuracy'}`` in eval mode (running BN statistics)."""
    @jax.jit
    def eval_step(state: TrainState, x, y):
        loss, (logits, _) = models.batch_loss(model, state.params, state.batch_stats, x, y, train=False)
        return {"loss": loss, "accuracy": accuracy(logits, y)}

    return eval_step


def _describe_group(name: str, kind: str, lr_w: float, lr_g: float) -> str:
    what = {G.SI: f"scale-invariant, lr_w={lr_w:g}", G.VARIANT: f"scale-variant, lr_g={lr_g:g}",
            G.FROZEN: "frozen"}[kind]
    return f"'{name}' ({what})"


def divergence_message(step: int, flags, groups: list[tuple[str, str]], lr_w: float, lr_g: float,
                       last_checkpoint: str | None, max_named: int = 3) -> tuple[str, list[str]]:
    """The one-line message of a step whose :func:`finite_flags` are ``flags``, and the groups it names.

    The first cause is named: the gradient's groups (with the loss, if it is non-finite too), else the
    loss, else the groups of the parameters after the update. Scale-variant groups are listed first,
    then scale-invariant, then frozen; at most ``max_named`` in the message (all in the returned list).
    Example: ``diverged at step 2: non-finite loss and gradient in 7 groups: 'bn_out/bias' (scale-variant,
    lr_g=1e+100), ... and 4 more; the last good checkpoint checkpoints/step_00000002 is kept``.
    """
    flags = np.asarray(flags, dtype=bool)
    n = len(groups)
    order = {G.VARIANT: 0, G.SI: 1, G.FROZEN: 2}

    def bad(offset):
        return sorted((i for i in range(n) if not flags[offset + i]), key=lambda i: order[groups[i][1]])

    def listing(idx):
        shown = ", ".join(_describe_group(*groups[i], lr_w, lr_g) for i in idx[:max_named])
        more = f" and {len(idx) - max_named} more" if len(idx) > max_named else ""
        return f"group {shown}" if len(idx) == 1 else f"{len(idx)} groups: {shown}{more}"

    loss_bad, grad_bad, param_bad = not flags[0], bad(1), bad(1 + n)
    if grad_bad:
        what, idx = f"non-finite {'loss and ' if loss_bad else ''}gradient in {listing(grad_bad)}", grad_bad
    elif loss_bad:
        what, idx = "non-finite loss", []
    else:
        what, idx = f"non-finite parameter after the update in {listing(param_bad)}", param_bad
    kept = (f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint
            else "no checkpoint was written")
    return f"diverged at step {step}: {what}; {kept}", [groups[i][0] for i in idx]


__all__ = ["DivergenceError", "FINITE", "TrainState", "accuracy", "divergence_message", "finite_flags",
           "finite_groups", "make_eval_step", "make_train_step"]
