"""Per-step quantities of the paper's analysis, as pure jit-safe functions of pytrees.

For a scale-invariant group ``w^(i)`` (PAPER §1, §2.4):

* norm ``||w^(i)||`` and effective learning rate ``lr_w / ||w^(i)||^2``;
* angular update ``angle(w_t, w_{t+1})``;
* the normalised point ``V = (w^(i) / ||w^(i)||)_i`` and the gradient there. By scale invariance
  (``grad L(c w) = grad L(w) / c``, the Sec. 2 lemma)::

      ||grad L(V; g)||^2 = sum_i ||w^(i)||^2 ||grad_{w^(i)} L(theta)||^2 + ||grad_g L(theta)||^2,

  the convergence measure of the GD and SGD theorems ("intrinsic gradient norm").

Dict keys are group names; per-channel groups give vectors (one entry per channel).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rate_tuning import groups as G


def group_norms(params, labels) -> dict[str, jax.Array]:
    """``||w^(i)||`` per scale-invariant group."""
    return {k: jnp.sqrt(v) for k, v in G.group_sq_norms(params, labels).items()}


def effective_lr(lr_w, params, labels) -> dict[str, jax.Array]:
    """``lr_w / ||w^(i)||^2`` per scale-invariant group (``lr_w``: the rate of this step)."""
    return {k: lr_w / v for k, v in G.group_sq_norms(params, labels).items()}


def angular_update(old, new, labels) -> dict[str, jax.Array]:
    """Angle in radians between ``w^(i)_t`` and ``w^(i)_{t+1}`` per group.

    Computed as ``2 atan2(d, sqrt(4 - d^2))`` with ``d = ||u - v||`` of the unit vectors ``u, v``
    (``||u + v||^2 = 4 - d^2``, the parallelogram law): accurate for tiny angles, where ``arccos`` of the
    cosine loses half the digits, and to round-off up to pi/2 (beyond, the absolute error grows to about
    ``sqrt(eps)`` near pi). One fused reduction over ``old`` and ``new``, no normalised copies.
    """
    u, v = normalize(old, labels), normalize(new, labels)
    diff = G.group_sq_norms(jax.tree_util.tree_map(jnp.subtract, u, v), labels)
    return {k: 2.0 * jnp.arctan2(jnp.sqrt(d), jnp.sqrt(jnp.maximum(4.0 - d, 0.0))) for k, d in diff.items()}


def normalize(params, labels):
    """The normalised point ``V``: each scale-invariant group divided by its norm; the rest unchanged."""
    inv = {k: 1.0 / jnp.sqrt(v) for k, v in G.group_sq_norms(params, labels).items()}
    return G.scale_groups(params, labels, inv)


def variant_sq_norm(tree, labels) -> jax.Array:
    """``sum ||leaf||^2`` over the ``'variant'`` leaves of ``tree`` (0 when there are none)."""
    total = jnp.zeros(())
    for _, leaf, label in G.flatten_labelled(tree, labels):
        if label.kind == G.VARIANT:
            total = total + jnp.sum(jnp.square(leaf))
    return total


def intrinsic_grad_sq_norms(grads, params, labels) -> tuple[dict[str, jax.Array], jax.Array]:
    """``||grad_{w^(i)} L(V; g)||^2`` per group (key ``'variant'``: the scale-variant block) and their total.

    Uses ``grad_{w^(i)} L(V; g) = ||w^(i)|| grad_{w^(i)} L(theta)`` (exact for scale-invariant groups);
    frozen leaves are excluded. ``grads`` is the gradient at ``params``.
    """
    w_sq, g_sq = G.group_sq_norms(params, labels), G.group_sq_norms(grads, labels)
    per_group = {k: jnp.sum(w_sq[k] * g_sq[k]) for k in w_sq}
    per_group[G.VARIANT] = variant_sq_norm(grads, labels)
    total = sum(per_group.values(), jnp.zeros(()))
    return per_group, total
