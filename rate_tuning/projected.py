"""SGDP and AdamP (Heo et al., ICLR 2021) as optax transformations, and a label-driven variant.

The rule (Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers
on Scale-invariant Weights", ICLR 2021; reference code: the ``adamp`` package on PyPI, by the authors).
For every parameter ``w`` with at least two dimensions, with ``g`` the gradient and ``p`` the step the base
optimizer proposes (SGD momentum buffer, or Adam's ``m / (sqrt(v) + eps)``)::

    channel test:  max_c |cos(g_c, w_c)| < delta / sqrt(n_c)     (n_c: entries of one output channel)
    layer test:    |cos(g, w)|           < delta / sqrt(n)       (n: entries of the whole parameter)
    the first test that holds:  p <- p - w_hat <w_hat, p>,   w_hat = w / (||w|| + eps) per channel / layer
                                weight decay multiplied by wd_ratio
    none holds:                 p unchanged, full weight decay

``|cos|`` is ``|<g, w>| / (max(||g||, eps) max(||w||, eps))``. A small cosine means the parameter is
(numerically) scale-invariant: ``<grad, w> = 0`` for every scale-invariant group (the Sec. 2 lemma of Arora,
Li & Lyu 2019; claim C1), and projecting the step onto the tangent space then stops the step from growing
``||w||`` (the "slowdown" of the effective step size ``lr/||w||^2`` that momentum makes worse).

Layout: a flax kernel is ``(..., in, out)``, so the output channel is the **last** axis (torch's weights
are ``(out, in, ...)``: the channel is the first). The rule is the same on the transposed array.

Two faithful details of the reference code, kept here so that the two agree to round-off:

* SGDP without Nesterov projects the momentum **buffer itself** (``d_p`` is the buffer, projected in
  place); with Nesterov the projected step is ``g + momentum * buf`` and the buffer stays unprojected.
* Weight decay is applied to the weights directly, ``w <- w (1 - lr wd r)`` (SGDP: ``w (1 - lr wd r /
  (1 - momentum))``), ``r = wd_ratio`` where projected, else 1. Here it is a term ``wd r w`` of the
  direction that ``scale_by_learning_rate`` multiplies by ``-lr``: the same update.

The label-driven variant (``labels=`` a label tree, :mod:`rate_tuning.groups`) skips the cosine test and
projects exactly the scale-invariant groups the labels name: whole groups (a group may span several leaves,
e.g. the ``(gamma, beta)`` of an inner BN layer, which the cosine test never sees: it only looks at
parameters of two or more dimensions) or single output channels (``per_channel``). Verify the labels first
with :func:`rate_tuning.groups.verify_labels`; the projection there is exact (``w <w, p> / ||w||^2``).
``'frozen'`` leaves get no update.

Example::

    tx = sgdp(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)            # the authors' rule
    tx = adamp(1e-3, weight_decay=1e-2, labels=model.labels("layer"))          # the groups the labels name
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

:func:`cosine_decisions` and :func:`label_agreement` measure how often the cosine test agrees with the labels.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rate_tuning import groups as G

__all__ = ["NONE", "CHANNEL", "LAYER", "LABEL", "NOT_TESTED", "ScaleBySGDPState", "ScaleByAdamPState",
           "cosine_decisions", "label_agreement", "project_step", "scale_by_sgdp", "scale_by_adamp", "sgdp",
           "adamp"]

NOT_TESTED, NONE, CHANNEL, LAYER, LABEL = -1, 0, 1, 2, 3
"""Decision codes per leaf: not tested (fewer than two dimensions), not projected, projected per output
channel, projected as a whole layer, projected because the labels say so (label-driven variant)."""


class ScaleBySGDPState(NamedTuple):
    """State of :func:`scale_by_sgdp`: the momentum buffer and the last step's decision per leaf."""

    momentum: optax.Updates
    projected: Any


class ScaleByAdamPState(NamedTuple):
    """State of :func:`scale_by_adamp`: step count, Adam's moments and the last step's decision per leaf."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    projected: Any


# ---------------------------------------------------------------------------------------------------------
# the cosine test and the projection (one leaf)
# ---------------------------------------------------------------------------------------------------------


def _cosine(x, y, axes, eps):
    """``|<x, y>| / (max(||x||, eps) max(||y||, eps))`` reduced over ``axes`` (torch's cosine_similarity)."""
    nx = jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axes)), eps)
    ny = jnp.maximum(jnp.sqrt(jnp.sum(y * y, axis=axes)), eps)
    return jnp.abs(jnp.sum(x * y, axis=axes) / (nx * ny))


def _tangent(w, p, axes, eps):
    """``p - w_hat <w_hat, p>`` with ``w_hat = w / (||w|| + eps)``, norms and inner products over ``axes``."""
    w_hat = w / (jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True)) + eps)
    return p - w_hat * jnp.sum(w_hat * p, axis=axes, keepdims=True)


def _decide(g, w, delta: float, eps: float):
    """The decision code of one leaf (:data:`CHANNEL`, :data:`LAYER` or :data:`NONE`; a traced int32)."""
    if jnp.ndim(w) < 2:
        return jnp.asarray(NOT_TESTED, jnp.int32)
    channel_axes, all_axes = tuple(range(w.ndim - 1)), tuple(range(w.ndim))
    n_c, n = math.prod(w.shape[:-1]), math.prod(w.shape)
    by_channel = jnp.max(_cosine(g, w, channel_axes, eps)) < delta / math.sqrt(n_c)
    by_layer = _cosine(g, w, all_axes, eps) < delta / math.sqrt(n)
    return jnp.where(by_channel, CHANNEL, jnp.where(by_layer, LAYER, NONE)).astype(jnp.int32)


def project_step(g, w, p, *, delta: float = 0.1, eps: float = 1e-8):
    """The authors' rule on one parameter: ``(projected step, decision code)``.

    ``g`` the gradient, ``w`` the weight, ``p`` the proposed step (all one shape, output channel last).
    Parameters with fewer than two dimensions are returned unchanged with :data:`NOT_TESTED`.
    """
    code = _decide(g, w, delta, eps)
    if jnp.ndim(w) < 2:
        return p, code
    channel_axes, all_axes = tuple(range(w.ndim - 1)), tuple(range(w.ndim))
    out = jnp.where(code == CHANNEL, _tangent(w, p, channel_axes, eps),
                    jnp.where(code == LAYER, _tangent(w, p, all_axes, eps), p))
    return out, code


def cosine_decisions(grads, params, *, delta: float = 0.1, eps: float = 1e-8):
    """The cosine test's decision for every leaf (a tree of int32 codes, :data:`NOT_TESTED` .. :data:`LAYER`)."""
    return jax.tree_util.tree_map(lambda g, w: _decide(g, w, delta, eps), grads, params)


def label_agreement(decisions, labels) -> dict[str, int]:
    """Counts comparing the cosine test's decisions with a (verified) label tree, one entry per leaf.

    ``tested_si_projected`` / ``tested_si_missed``: leaves of two or more dimensions labelled ``'si'`` that
    the test projected / did not; ``tested_other_projected`` / ``tested_other_kept``: the same for leaves
    labelled ``'variant'`` or ``'frozen'``; ``untested_si``: leaves labelled ``'si'`` that the test never
    looks at (fewer than two dimensions, e.g. a BN layer's ``(gamma, beta)``); ``untested_other``.
    Decisions are concrete arrays (call outside ``jit``, or sum the counts of many steps).
    """
    flat_d = jax.tree_util.tree_leaves(decisions)
    out = dict(tested_si_projected=0, tested_si_missed=0, tested_other_projected=0, tested_other_kept=0,
               untested_si=0, untested_other=0)
    for code, label in zip(flat_d, jax.tree_util.tree_leaves(labels, is_leaf=G.is_label)):
        code = int(code)
        si = label.kind == G.SI
        if code == NOT_TESTED:
            out["untested_si" if si else "untested_other"] += 1
        elif code in (CHANNEL, LAYER):
            out["tested_si_projected" if si else "tested_other_projected"] += 1
        else:
            out["tested_si_missed" if si else "tested_other_kept"] += 1
    return out


# ---------------------------------------------------------------------------------------------------------
# projection of a whole tree: by the cosine test, or by labels
# ---------------------------------------------------------------------------------------------------------


def _project_tree(grads, params, steps, labels, delta, eps):
    """``(projected steps, decision codes, wd factor per leaf: 1 or 'projected')`` for the whole tree.

    Cosine mode (``labels`` None): :func:`project_step` per leaf. Label mode: every ``'si'`` group's step
    minus its component along the group (exact: ``w <w, p> / ||w||^2``, per channel for per-channel
    groups); 'frozen' leaves get a zero step.
    """
    if labels is None:
        pairs = jax.tree_util.tree_map(lambda g, w, p: project_step(g, w, p, delta=delta, eps=eps),
                                       grads, params, steps)
        treedef = jax.tree_util.tree_structure(params)
        flat = treedef.flatten_up_to(pairs)
        new = treedef.unflatten([a for a, _ in flat])
        codes = treedef.unflatten([c for _, c in flat])
        return new, codes
    inner = G.group_inner(params, steps, labels)
    sq = G.group_sq_norms(params, labels)
    coef = {k: -inner[k] / jnp.where(sq[k] > 0, sq[k], 1.0) for k in sq}
    radial = G.scale_groups(params, labels, coef)
    treedef = jax.tree_util.tree_structure(params)
    flat = G.flatten_labelled(params, labels)
    new, codes = [], []
    for (_, _, label), p, r in zip(flat, treedef.flatten_up_to(steps), treedef.flatten_up_to(radial)):
        if label.kind == G.SI:
            new.append(p + r)
            codes.append(jnp.asarray(LABEL, jnp.int32))
        elif label.kind == G.FROZEN:
            new.append(jnp.zeros_like(p))
            codes.append(jnp.asarray(NONE, jnp.int32))
        else:
            new.append(p)
            codes.append(jnp.asarray(NONE, jnp.int32))
    return treedef.unflatten(new), treedef.unflatten(codes)


def _with_decay(direction, params, codes, labels, weight_decay, wd_ratio):
    """``direction + weight_decay * r * w`` per leaf, ``r = wd_ratio`` where projected, else 1 (frozen: 0)."""
    if _is_zero(weight_decay):
        return direction
    frozen = ([l.kind == G.FROZEN for l in jax.tree_util.tree_leaves(labels, is_leaf=G.is_label)]
              if labels is not None else None)
    treedef = jax.tree_util.tree_structure(params)
    out = []
    for i, (d, w, c) in enumerate(zip(treedef.flatten_up_to(direction), treedef.flatten_up_to(params),
                                      treedef.flatten_up_to(codes))):
        if frozen is not None and frozen[i]:
            out.append(d)
            continue
        r = jnp.where(c > NONE, wd_ratio, 1.0).astype(w.dtype)
        out.append(d + (weight_decay * r) * w)
    return treedef.unflatten(out)


def _check(name, value, low=0.0, high=None, closed_high=False):
    """``ValueError`` unless ``value`` is a finite number in the range; traced values (e.g. from
    ``optax.inject_hyperparams`` inside ``jit``) cannot be inspected and are let through."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = math.isfinite(v) and v >= low and (high is None or (v <= high if closed_high else v < high))
    if not ok:
        rng = f"[{low}, {high}{']' if closed_high else ')'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")


def _check_projection(weight_decay, delta, wd_ratio, eps) -> None:
    """The arguments SGDP and AdamP share, each a finite number >= 0."""
    for name, value in (("weight_decay", weight_decay), ("delta", delta), ("wd_ratio", wd_ratio), ("eps", eps)):
        _check(name, value)


def _is_zero(x) -> bool:
    """Whether ``x`` is a concrete zero (a traced hyperparameter never is)."""
    return not isinstance(x, jax.core.Tracer) and float(x) == 0.0


# ---------------------------------------------------------------------------------------------------------
# SGDP
# ---------------------------------------------------------------------------------------------------------


def scale_by_sgdp(momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                  nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1,
                  *, labels=None) -> optax.GradientTransformation:
    """SGDP's direction (to be scaled by ``-lr``): momentum, projection, weight decay.

    ``buf <- momentum buf + (1 - dampening) g``; ``d = g + momentum buf`` (Nesterov) or ``buf``; ``d`` projected
    by the cosine test (or the labels); output ``d + wd r / (1 - momentum) * w``. Without Nesterov the buffer
    stored is the projected ``d`` (as in the reference code). Needs ``params``.

    Args:
      momentum, dampening, nesterov: as ``torch.optim.SGD`` (buffer starts at zero).
      weight_decay: ``wd``; ``r = wd_ratio`` on projected parameters.
      eps, delta: the cosine test's ``eps`` and threshold ``delta / sqrt(dim)``.
      labels: a label tree: project the ``'si'`` groups it names instead of testing cosines.
    """
    _check("momentum", momentum, 0.0, 1.0)
    _check("dampening", dampening, 0.0, 1.0, closed_high=True)
    _check_projection(weight_decay, delta, wd_ratio, eps)

    def init_fn(params):
        if labels is not None:
            G.flatten_labelled(params, labels)  # a LabelError now rather than at the first step
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        codes = jax.tree_util.tree_map(lambda _: jnp.asarray(NONE, jnp.int32), params)
        return ScaleBySGDPState(zeros, codes)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_sgdp needs params")
        grads = updates
        buf = jax.tree_util.tree_map(lambda b, g: momentum * b + (1.0 - dampening) * g, state.momentum, grads)
        step = jax.tree_util.tree_map(lambda g, b: g + momentum * b, grads, buf) if nesterov else buf
        step, codes = _project_tree(grads, params, step, labels, delta, eps)
        if not nesterov:
            buf = step  # the reference code projects the buffer in place
        direction = _with_decay(step, params, codes, labels, weight_decay / (1.0 - momentum), wd_ratio)
        return direction, ScaleBySGDPState(buf, codes)

    return optax.GradientTransformation(init_fn, update_fn)


def sgdp(learning_rate, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
         nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1, *,
         labels=None) -> optax.GradientTransformation:
    """SGDP: ``optax.chain(scale_by_sgdp(...), optax.scale_by_learning_rate(learning_rate))``.

    The defaults are the authors' (``adamp.SGDP``: ``eps=1e-8, delta=0.1, wd_ratio=0.1``); ``learning_rate``
    is a number or an optax schedule. Equal to ``adamp.SGDP`` to round-off (``tests/test_projected.py``).

    Example::

        tx = sgdp(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        tx = sgdp(0.1, momentum=0.9, labels=model.labels("layer"))   # project the labelled groups

    Reference: Heo et al., "AdamP", ICLR 2021 (Algorithm: SGDP).
    """
    return optax.chain(scale_by_sgdp(momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio,
                                     labels=labels),
                       optax.scale_by_learning_rate(learning_rate))


# ---------------------------------------------------------------------------------------------------------
# AdamP
# ---------------------------------------------------------------------------------------------------------


def scale_by_adamp(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False, *,
                   labels=None) -> optax.GradientTransformation:
    """AdamP's direction (to be scaled by ``-lr``): Adam with bias correction, projection, weight decay.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``, ``p = m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
    (Nesterov: ``(b1 m + (1 - b1) g)`` in place of ``m``); ``p`` projected by the cosine test (or the labels);
    output ``p / (1 - b1^t) + wd r w``. The moments are never projected. Needs ``params``.
    """
    _check("b1", b1, 0.0, 1.0)
    _check("b2", b2, 0.0, 1.0)
    _check_projection(weight_decay, delta, wd_ratio, eps)

    def init_fn(params):
        if labels is not None:
            G.flatten_labelled(params, labels)
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        codes = jax.tree_util.tree_map(lambda _: jnp.asarray(NONE, jnp.int32), params)
        return ScaleByAdamPState(jnp.zeros((), jnp.int32), zeros(), zeros(), codes)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adamp needs params")
        grads = updates
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, grads)
        t = count.astype(jnp.result_type(float))
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        num = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, mu, grads) if nesterov else mu
        step = jax.tree_util.tree_map(
            lambda n, v: n / (jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + eps), num, nu)
        step, codes = _project_tree(grads, params, step, labels, delta, eps)
        step = jax.tree_util.tree_map(lambda s: s / bc1.astype(s.dtype), step)
        direction = _with_decay(step, params, codes, labels, weight_decay, wd_ratio)
        return direction, ScaleByAdamPState(count, mu, nu, codes)

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False, *,
          labels=None) -> optax.GradientTransformation:
    """AdamP: ``optax.chain(scale_by_adamp(...), optax.scale_by_learning_rate(learning_rate))``.

    The defaults are the authors' (``adamp.AdamP``: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, delta=0.1,
    wd_ratio=0.1``). Equal to ``adamp.AdamP`` to round-off (``tests/test_projected.py``).

    Example::

        tx = adamp(1e-3, weight_decay=1e-2)
        tx = adamp(1e-3, weight_decay=1e-2, labels=model.labels("layer"))

    Reference: Heo et al., "AdamP", ICLR 2021 (Algorithm: AdamP).
    """
    return optax.chain(scale_by_adamp(b1, b2, eps, weight_decay, delta, wd_ratio, nesterov, labels=labels),
                       optax.scale_by_learning_rate(learning_rate))
