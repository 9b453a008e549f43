"""Which parameters are scale-invariant, as label trees, and a numerical probe of those labels.

A *label tree* has the structure of the params; each leaf is a :class:`Label`:

* ``Label('si', group=name)``: the leaf belongs to the scale-invariant group ``name``. Leaves that share
  a group name form one group (e.g. the ``(gamma, beta)`` of an inner BN layer, PAPER App. D). With
  ``per_channel=True`` every index along the last axis (the output channel of a Dense or Conv kernel) is
  a group of its own.
* ``Label('variant')``: scale-variant, trained with ``lr_g``.
* ``Label('frozen')``: never updated.

Definition 2.1 of the paper: ``w`` is scale-invariant for ``F`` if ``F(c w, theta') = F(w, theta')`` for all
``c > 0``. :func:`verify_labels` checks that, and ``<grad_w F, w> = 0`` (the paper's Sec. 2 lemma), for
every ``'si'`` group on a real batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SI = "si"
VARIANT = "variant"
FROZEN = "frozen"
KINDS = (SI, VARIANT, FROZEN)


@dataclasses.dataclass(frozen=True)
class Label:
    """Leaf of a label tree: the kind of a parameter and, for ``'si'``, the group it belongs to."""

    kind: str
    group: str | None = None
    per_channel: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"label kind {self.kind!r} is not one of {KINDS}")
        if self.kind == SI and not self.group:
            raise ValueError("an 'si' label needs a group name")
        if self.kind != SI and (self.group is not None or self.per_channel):
            raise ValueError(f"only 'si' labels carry a group, got {self!r}")


def si(group: str, per_channel: bool = False) -> Label:
    """Label of a leaf in the scale-invariant group ``group``."""
    return Label(SI, group, per_channel)


VARIANT_LABEL = Label(VARIANT)
FROZEN_LABEL = Label(FROZEN)


class LabelError(ValueError):
    """A label tree that does not match the params, or an ``'si'`` label the loss contradicts."""


def path_str(path) -> str:
    """A jax key path as ``'layer0/kernel'``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def is_label(x) -> bool:
    return isinstance(x, Label)


def flatten_labelled(params, labels) -> list[tuple[str, Any, Label]]:
    """``[(path, leaf, label), ...]`` in tree order; a :class:`LabelError` naming the first mismatch."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    label_leaves = jax.tree_util.tree_flatten_with_path(labels, is_leaf=is_label)[0]
    p_paths = [path_str(p) for p, _ in leaves]
    l_paths = [path_str(p) for p, _ in label_leaves]
    if p_paths != l_paths:
        missing = [p for p in p_paths if p not in set(l_paths)]
        extra = [p for p in l_paths if p not in set(p_paths)]
        what = (f"no label for parameter {missing[0]}" if missing
                else f"a label for {extra[0]}, which is not a parameter" if extra
                else "labels in a different order than the parameters")
        raise LabelError(f"label tree does not match the params: {what}")
    out = []
    for (path, leaf), (_, label) in zip(leaves, label_leaves):
        name = path_str(path)
        if not is_label(label):
            raise LabelError(f"label of parameter {name} is {label!r}, not a rate_tuning.groups.Label")
        if label.per_channel and np.ndim(leaf) < 1:
            raise LabelError(f"parameter {name} is a scalar: it cannot be grouped per channel")
        out.append((name, leaf, label))
    return out


def kinds(labels):
    """The tree of kind strings (``'si'``/``'variant'``/``'frozen'``) that ``optax.partition`` takes."""
    return jax.tree_util.tree_map(lambda l: l.kind, labels, is_leaf=is_label)


def si_groups(params, labels) -> dict[str, list[str]]:
    """Each scale-invariant group's name mapped to the paths of its leaves, in tree order."""
    groups: dict[str, list[str]] = {}
    per_channel: dict[str, bool] = {}
    for path, _, label in flatten_labelled(params, labels):
        if label.kind == SI:
            groups.setdefault(label.group, []).append(path)
            per_channel[label.group] = per_channel.get(label.group, False) or label.per_channel
    for name, paths in groups.items():
        if per_channel[name] and len(paths) > 1:
            raise LabelError(f"per-channel group {name!r} spans several parameters: {', '.join(paths)}")
    return groups


def _group_axes(leaf, label: Label) -> tuple[int, ...]:
    """Axes summed over to get a group's squared norm: all of them, or all but the channel axis."""
    nd = np.ndim(leaf)
    return tuple(range(nd - 1)) if label.per_channel else tuple(range(nd))


def group_inner(a, b, labels) -> dict[str, jax.Array]:
    """``<a^(i), b^(i)>`` for every scale-invariant group ``i`` (a vector for per-channel groups).

    ``a`` and ``b`` have the params' structure (params, gradients, updates). Pure and jit-safe.
    """
    out: dict[str, jax.Array] = {}
    flat_b = jax.tree_util.tree_leaves(b)
    for (_, leaf_a, label), leaf_b in zip(flatten_labelled(a, labels), flat_b):
        if label.kind == SI:
            v = jnp.sum(leaf_a * leaf_b, axis=_group_axes(leaf_a, label))
            out[label.group] = out[label.group] + v if label.group in out else v
    return out


def group_sq_norms(tree, labels) -> dict[str, jax.Array]:
    """``||w^(i)||^2`` of every scale-invariant group of ``tree`` (params, gradients or updates)."""
    return group_inner(tree, tree, labels)


def scale_groups(tree, labels, factors: dict[str, Any]):
    """Multiply every ``'si'`` leaf of ``tree`` by its group's entry of ``factors``.

    A per-channel factor (a vector) broadcasts along the last axis; groups missing from ``factors`` and
    non-``'si'`` leaves are returned unchanged.
    """
    def scale(leaf, label):
        if label.kind != SI or label.group not in factors:
            return leaf
        return leaf * jnp.asarray(factors[label.group], dtype=leaf.dtype)

    return jax.tree_util.tree_map(scale, tree, _aligned_labels(tree, labels))


def _aligned_labels(tree, labels):
    """``labels`` re-shaped onto ``tree``'s treedef (checks the two match first)."""
    flat = flatten_labelled(tree, labels)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), [l for _, _, l in flat])


def per_channel(params, labels):
    """The per-output-channel grouping of a label tree: every single-leaf ``'si'`` group whose leaf has
    ``ndim >= 2`` (a Dense or Conv kernel) becomes one group per output channel (last axis); multi-leaf
    groups, such as a BN layer's ``(gamma, beta)``, stay whole.

    Valid when each output channel of the kernel feeds its own BN channel (PAPER C21).
    """
    flat = flatten_labelled(params, labels)
    counts: dict[str, int] = {}
    for _, _, l in flat:
        if l.kind == SI:
            counts[l.group] = counts.get(l.group, 0) + 1
    new = [si(l.group, per_channel=True) if l.kind == SI and counts[l.group] == 1 and np.ndim(leaf) >= 2
           else l for _, leaf, l in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)


def _tolerance(dtype) -> float:
    """sqrt(machine epsilon) of ``dtype``.

    Round-off in a forward pass of a small BN network is a modest multiple of eps (float64: ~1e-14 seen),
    while a parameter that is not scale-invariant moves the loss by a relative 1e-4 (epsilon-BN) to O(1)
    (no BN) over c in [1e-3, 1e3]. sqrt(eps) (float64: 1.5e-8, float32: 3.5e-4) lies between the two by
    orders of magnitude in float64, the dtype in which labels should be verified.
    """
    return float(np.sqrt(np.finfo(dtype).eps))


def verify_labels(loss_fn: Callable, params, labels, *, scales: Sequence[float] = (1e-3, 1e-1, 10.0, 1e3),
                  tol: float | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Check every ``'si'`` group numerically, on the batch ``loss_fn`` closes over (train-mode BN).

    For each group ``i`` and each ``c`` in ``scales`` (per-channel groups: ``c`` times a random factor in
    ``[1/e, e]`` per channel), checks ``|L(c w^(i)) - L(w)| <= tol * max(|L(w)|, 1)`` (Definition 2.1) and
    ``|<grad_i L, w^(i)>| <= tol * ||grad_i L|| ||w^(i)||`` (Sec. 2 lemma, claim C1).

    Args:
      loss_fn: ``params -> scalar`` loss on a fixed batch.
      params, labels: the params and their label tree.
      scales: the factors ``c``.
      tol: relative tolerance; default ``sqrt(eps)`` of the params' dtype (see ``_tolerance``).
      seed: seed of the per-channel factors.

    Returns:
      ``{group: {'invariance': worst relative loss change, 'cosine': worst |cos(grad, w)|}}``.

    Raises:
      LabelError: one line naming the parameter path(s), the violation and the tolerance.
    """
    groups = si_groups(params, labels)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    tol = _tolerance(dtype) if tol is None else tol
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    loss_fn = jax.jit(loss_fn)
    base = max(abs(float(loss)), 1.0)
    inner = group_inner(grads, params, labels)
    g_sq, w_sq = group_sq_norms(grads, labels), group_sq_norms(params, labels)
    rng = np.random.default_rng(seed)
    report, failures = {}, []
    for name, paths in groups.items():
        plural = len(paths) > 1
        where = (f"parameter{'s' if plural else ''} {', '.join(paths)} (group {name!r}) "
                 f"{'are' if plural else 'is'}")
        shape = np.shape(w_sq[name])
        worst, worst_c = 0.0, None
        for c in scales:
            factor = c * np.exp(rng.uniform(-1, 1, size=shape)) if shape else c
            change = abs(float(loss_fn(scale_groups(params, labels, {name: factor}))) - float(loss)) / base
            if not change <= worst:  # also catches NaN
                worst, worst_c = change, c
        scale = np.sqrt(np.asarray(g_sq[name]) * np.asarray(w_sq[name]))
        tiny = scale <= 1e3 * np.finfo(dtype).eps * base  # gradient at round-off level: cosine meaningless
        cos = np.where(tiny, 0.0, np.abs(np.asarray(inner[name])) / np.where(tiny, 1.0, scale))
        worst_cos = float(np.max(cos))
        if not worst <= tol:
            failures.append(f"{where} labelled 'si' but the loss is not scale-invariant in it: "
                            f"|L(c*w) - L(w)|/max(|L|,1) = {worst:.2e} at c = {worst_c:g} > tolerance {tol:.1e}")
        elif not worst_cos <= tol:
            failures.append(f"{where} labelled 'si' but the gradient is not orthogonal to it: "
                            f"|cos(grad, w)| = {worst_cos:.2e} > tolerance {tol:.1e}")
        report[name] = {"invariance": worst, "cosine": worst_cos}
    if failures:
        more = f" (and {len(failures) - 1} more: {'; '.join(failures[1:])})" if len(failures) > 1 else ""
        raise LabelError(failures[0] + more)
    return report
