"""Assertions for a user's own tests, in the style of ``chex``: scale invariance, orthogonal gradients,
Lemma 2.4's norm growth under the user's optimizer, and non-increasing effective learning rates.

Each takes the user's loss (``params -> scalar`` on a fixed batch, train mode) and the groups to check: a
label tree (``Label`` leaves, e.g. from :func:`rate_tuning.audit.audit` or ``model.labels()``) or a list
whose items are a parameter path (``'layer0/kernel'``) or a sequence of paths (one joint group). Each raises
``AssertionError`` with one line per failing group: the parameter paths, the measured value and the bound.

Tolerances come from the dtype and the operation count of the traced program
(:func:`rate_tuning.targets.roundoff_budget`, ``rho = sum_e u_e n_e``; docs/derivations.md, "Auditing a
model"): ``4 rho`` for a relative loss difference, ``2 rho`` for a cosine, and for the norm identity
``3 gamma_n + 6 u + 2 rho`` (three squared norms of ``n`` terms, the rounding of the step, and the radial part
of the computed gradient). By default the checks run in float64 (``x64=True``: inside ``jax.enable_x64``,
parameters cast to float64; parts of the model that compute in float32 are counted as float32).

Example (pytest)::

    from rate_tuning import audit, testing

    def test_my_model_keeps_its_invariances():
        model, variables, batch = my_factory()
        result = audit.audit(model, variables, batch)
        assert result.groups                                 # or compare with a stored tree
        loss = lambda p: my_loss(model, p, variables, batch)
        testing.assert_scale_invariant(loss, variables["params"], result.labels("channel"))
        testing.assert_gradient_orthogonal(loss, variables["params"], result.labels("channel"))
        tx = two_rate_sgd(result.labels("channel"), lr_w=1.0, lr_g=0.1)
        testing.assert_norm_growth(loss, variables["params"], result.labels("channel"), tx, steps=3)

Paper: Definition 2.1, the gradient lemma of Sec. 2 and Lemma 2.4 of Arora, Li & Lyu (ICLR 2019).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rate_tuning import groups as G
from rate_tuning.targets import roundoff_budget

SCALES = (1e-2, 0.5, 3.0, 1e2)


def _labels(params, groups) -> Any:
    """A label tree from a label tree or from a list of paths / path sequences (unknown paths: ValueError)."""
    leaves = jax.tree_util.tree_leaves(groups, is_leaf=G.is_label)
    if leaves and all(G.is_label(x) for x in leaves):
        G.flatten_labelled(params, groups)  # structure check, LabelError names the mismatch
        return groups
    if isinstance(groups, str):
        groups = [groups]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [G.path_str(p) for p, _ in flat]
    by_path = {}
    for item in groups:
        members = [item] if isinstance(item, str) else list(item)
        for p in members:
            if p not in paths:
                raise ValueError(f"no parameter {p!r}; parameters: {', '.join(paths[:12])}"
                                 + (" ..." if len(paths) > 12 else ""))
            by_path[p] = G.si("+".join(members))
    return jax.tree_util.tree_unflatten(treedef, [by_path.get(p, G.VARIANT_LABEL) for p in paths])


@contextlib.contextmanager
def _precision(x64: bool):
    with jax.enable_x64(x64):
        yield


def _cast(params, x64: bool):
    if not x64:
        return params
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact) else a, params)


def _where(params, labels) -> dict[str, str]:
    """Group name -> ``'a/kernel, b/kernel (group g)'``."""
    return {name: f"{', '.join(paths)} (group {name!r})" for name, paths in G.si_groups(params, labels).items()}


def _nonzero(what: str, params, labels) -> None:
    """A group that is zero at the given point makes every check vacuous: refuse it."""
    zero = [name for name, v in G.group_sq_norms(params, labels).items() if not np.any(np.asarray(v) > 0)]
    if zero:
        raise AssertionError(f"{what}: group(s) {', '.join(repr(z) for z in zero)} are zero at the given parameters, "
                             "so nothing can be checked; test at a point where they are not (e.g. after a few steps)")


def _fail(what: str, lines: list[str]) -> None:
    if lines:
        raise AssertionError(f"{what}: " + "; ".join(lines))


def _dtype_name(params) -> str:
    return str(jax.tree_util.tree_leaves(params)[0].dtype)


def assert_scale_invariant(loss: Callable, params, groups, *, scales: Sequence[float] = SCALES,
                           rtol: float | None = None, x64: bool = True, seed: int = 0) -> dict[str, float]:
    """``|L(c w_S) - L(w)| / max(|L|, 1) <= rtol`` for every group ``S`` and ``c`` in ``scales`` (Definition 2.1).

    Per-channel groups get ``c`` times a distinct random factor in ``[1/e, e]`` per channel. ``rtol``
    defaults to ``4 rho`` of the loss (module docstring). Returns the worst change per group.
    """
    with _precision(x64):
        params = _cast(params, x64)
        labels = _labels(params, groups)
        _nonzero("assert_scale_invariant", params, labels)
        f = jax.jit(loss)
        base = float(f(params))
        if not math.isfinite(base):
            raise AssertionError(f"assert_scale_invariant: the loss is {base} at the given parameters")
        tol = 4 * roundoff_budget(loss, params) if rtol is None else float(rtol)
        rng = np.random.default_rng(seed)
        sq = G.group_sq_norms(params, labels)
        worst, lines = {}, []
        for name, where in _where(params, labels).items():
            shape = np.shape(sq[name])
            changes = {}
            for c in scales:
                factor = c * np.exp(rng.uniform(-1, 1, size=shape)) if shape else c
                new = float(f(G.scale_groups(params, labels, {name: factor})))
                changes[c] = abs(new - base) / max(abs(base), 1.0)
            c_bad = max(changes, key=lambda c: changes[c] if math.isfinite(changes[c]) else math.inf)
            worst[name] = changes[c_bad]
            if not changes[c_bad] <= tol:
                lines.append(f"{where}: |L(c w) - L(w)| / max(|L|, 1) = {changes[c_bad]:.3e} at c = {c_bad:g} "
                             f"> bound {tol:.3e} ({_dtype_name(params)})")
    _fail("assert_scale_invariant", lines)
    return worst


def assert_gradient_orthogonal(loss: Callable, params, groups, *, rtol: float | None = None,
                               x64: bool = True) -> dict[str, float]:
    """``|<grad_S L, w_S>| <= rtol ||grad_S L|| ||w_S||`` for every group (per channel where labelled):
    the gradient lemma of Sec. 2 / Lemma 2.4 (1). ``rtol`` defaults to ``2 rho`` of the gradient. A gradient
    at round-off level (``||g|| ||w|| <= 1e3 eps max(|L|, 1)``) is not measured. Returns the worst |cos|."""
    with _precision(x64):
        params = _cast(params, x64)
        labels = _labels(params, groups)
        _nonzero("assert_gradient_orthogonal", params, labels)
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        tol = 2 * roundoff_budget(jax.value_and_grad(loss), params) if rtol is None else float(rtol)
        eps = float(np.finfo(np.dtype(_dtype_name(params))).eps)
        inner = G.group_inner(grads, params, labels)
        g_sq, w_sq = G.group_sq_norms(grads, labels), G.group_sq_norms(params, labels)
        worst, lines = {}, []
        for name, where in _where(params, labels).items():
            den = np.sqrt(np.asarray(g_sq[name]) * np.asarray(w_sq[name]))
            ok = den > 1e3 * eps * max(abs(float(value)), 1.0)
            cos = np.where(ok, np.abs(np.asarray(inner[name])) / np.where(ok, den, 1.0), 0.0)
            worst[name] = float(np.max(cos)) if np.size(cos) else 0.0
            if not worst[name] <= tol:
                ch = f" (channel {int(np.argmax(cos))})" if np.ndim(cos) else ""
                lines.append(f"{where}{ch}: |cos(grad, w)| = {worst[name]:.3e} > bound {tol:.3e} "
                             f"({_dtype_name(params)})")
    _fail("assert_gradient_orthogonal", lines)
    return worst


def _trajectory(loss, params, labels, tx, steps, batches):
    """``steps`` steps of ``tx``: per step and group ``(||w_t||^2, ||w_{t+1}||^2, ||w_{t+1} - w_t||^2)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batches = list(batches) if batches is not None else None
    if batches is not None and len(batches) < steps:
        raise ValueError(f"{steps} steps need {steps} batches, got {len(batches)}")
    f = (lambda p, b: loss(p)) if batches is None else loss

    @jax.jit
    def step(p, state, b):
        g = jax.grad(f)(p, b)
        updates, state = tx.update(g, state, p)
        new = optax.apply_updates(p, updates)
        diff = jax.tree_util.tree_map(jnp.subtract, new, p)
        return new, state, (G.group_sq_norms(p, labels), G.group_sq_norms(new, labels),
                            G.group_sq_norms(diff, labels))

    state, out, p = tx.init(params), [], params
    for t in range(steps):
        p, state, norms = step(p, state, None if batches is None else batches[t])
        out.append(jax.device_get(norms))
    return out, f


def assert_norm_growth(loss: Callable, params, labels, tx: optax.GradientTransformation, *, steps: int = 3,
                       batches: Iterable | None = None, rtol: float | None = None,
                       x64: bool = True) -> dict[str, float]:
    """Lemma 2.4 (2) over ``steps`` steps of the user's optimizer ``tx``, for every ``'si'`` group:
    ``||w_{t+1}||^2 = ||w_t||^2 + ||w_{t+1} - w_t||^2`` (for plain (S)GD, ``||w_t||^2 + lr^2 ||grad||^2``),
    measured as ``| ||w'||^2 - ||w||^2 - ||w' - w||^2 | / (||w'||^2 + ||w||^2 + ||w' - w||^2)``.

    The update must be orthogonal to ``w``: weight decay, momentum and adaptive optimizers break it. With
    ``batches``, ``loss(params, batch)`` is evaluated on ``batches[t]`` at step ``t`` (gradient and update
    on the same batch, as in the lemma); otherwise ``loss(params)``. ``rtol`` defaults to
    ``3 gamma_n + 6 u + 2 rho`` (``n`` the largest group). Returns the worst residual per group.
    """
    with _precision(x64):
        params = _cast(params, x64)
        labels = _labels(params, labels)
        traj, f = _trajectory(loss, params, labels, tx, steps, batches)
        dtype = np.dtype(_dtype_name(params))
        u = float(np.finfo(dtype).eps) / 2
        n = max((sum(math.prod(np.shape(x)[:-1] if lab.per_channel else np.shape(x)) for _, x, lab in
                     G.flatten_labelled(params, labels) if lab.kind == G.SI and lab.group == name)
                 for name in G.si_groups(params, labels)), default=1)
        b0 = None if batches is None else list(batches)[0]
        rho = roundoff_budget(jax.value_and_grad(f), params, b0)
        tol = (3 * n * u / (1 - n * u) + 6 * u + 2 * rho) if rtol is None else float(rtol)
        worst, lines = {}, []
        for name, where in _where(params, labels).items():
            res = [np.abs(new[name] - old[name] - d[name]) / np.maximum(new[name] + old[name] + d[name], 1e-300)
                   for old, new, d in traj]
            per_step = [float(np.max(r)) for r in res]
            worst[name] = max(per_step)
            if not worst[name] <= tol:
                t = int(np.argmax(per_step))
                lines.append(f"{where} at step {t}: | ||w'||^2 - ||w||^2 - ||w' - w||^2 | / (||w'||^2 + ||w||^2 + "
                             f"||w' - w||^2) = {worst[name]:.3e} > bound {tol:.3e} ({dtype}): the update is not "
                             "orthogonal to w (weight decay, momentum or an adaptive optimizer?)")
    _fail("assert_norm_growth", lines)
    return worst


def assert_effective_lr_nonincreasing(loss: Callable, params, labels, tx: optax.GradientTransformation, *,
                                      lr_w: float | Callable | None = None, steps: int = 3,
                                      batches: Iterable | None = None, rtol: float | None = None,
                                      x64: bool = True) -> dict[str, float]:
    """``lr_w(t + 1) / ||w_{t+1}||^2 <= lr_w(t) / ||w_t||^2`` for every ``'si'`` group over ``steps`` steps of
    ``tx`` (the auto-tuning of Lemma 2.4: norms only grow). ``lr_w``: the rate of the scale-invariant groups,
    a number or a schedule of the step (default: constant, so the check is that no norm decreases).
    Measured: the worst relative increase ``eff_{t+1} / eff_t - 1`` (0 or negative when it holds); ``rtol``
    defaults to ``3 gamma_n + 6 u`` (two squared norms and their ratio). Returns the worst increase."""
    with _precision(x64):
        params = _cast(params, x64)
        labels = _labels(params, labels)
        traj, _ = _trajectory(loss, params, labels, tx, steps, batches)
        sched = (lambda t: 1.0) if lr_w is None else (lr_w if callable(lr_w) else (lambda t: float(lr_w)))
        dtype = np.dtype(_dtype_name(params))
        u = float(np.finfo(dtype).eps) / 2
        n = max((x.size for _, x, lab in G.flatten_labelled(params, labels) if lab.kind == G.SI), default=1)
        tol = (3 * n * u / (1 - n * u) + 6 * u) if rtol is None else float(rtol)
        worst, lines = {}, []
        for name, where in _where(params, labels).items():
            eff = [(float(sched(t)) / np.asarray(old[name]), float(sched(t + 1)) / np.asarray(new[name]))
                   for t, (old, new, _) in enumerate(traj)]
            incr = [float(np.max(after / before - 1.0)) for before, after in eff]
            worst[name] = max(incr)
            if not worst[name] <= tol:
                t = int(np.argmax(incr))
                lines.append(f"{where} at step {t}: effective rate lr_w / ||w||^2 grew by a factor 1 + "
                             f"{worst[name]:.3e} > 1 + bound {tol:.3e} ({dtype})")
    _fail("assert_effective_lr_nonincreasing", lines)
    return worst


def assert_same_groups(params, labels, expected) -> None:
    """The two label trees have the same ``'si'`` groups (names ignored), per-channel flags, ``'variant'``
    and ``'frozen'`` leaves; the message lists every difference."""
    from rate_tuning.audit import compare_labels

    _fail("assert_same_groups", compare_labels(params, labels, expected))
