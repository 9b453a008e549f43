"""The claims that hold for any network, checked on a user's model: ``python -m proofs_check --model MODULE:FACTORY``.

The model comes from a factory (:mod:`rate_tuning.targets`, "The factory contract"); its scale-invariant
groups from :func:`rate_tuning.audit.audit_target`. On those groups, in float64, on the factory's batch in
train mode, at the given parameters and at a generic point near them (every leaf plus 20 % of its rms):

* C1  ``<grad_{w_i} L, w_i> = 0`` per group (worst ``|cos|``);
* C2  ``c grad_{w_i} L(c W) = grad_{w_i} L(W)`` and the other blocks unchanged, every group scaled by ``c``;
* C4  Lemma 2.4 (2), ``||w'||^2 = ||w||^2 + lr^2 ||g||^2`` at every step of :func:`rate_tuning.optim.two_rate_sgd`
  (full-batch GD with a constant rate, and SGD over sub-batches with ``lr / sqrt(t + 1)``);
* C5  norms never decrease, effective rates ``lr_t / ||w_t||^2`` never increase, along the same runs;
* C21 per output channel, where the audit found channels invariant: ``|cos|``, the loss under a distinct
  factor per channel, and the norm identity after one step;
* I3  the smoothness measurement, on models with at most :data:`I3_MAX_GROUPS` groups: ``L^ww``, ``L^gw``,
  ``L^gg`` estimated by Lanczos on the unit set along a GD run, and the one-step descent inequality of the
  GD proof with them at every step of that run.

Every quantity is computed here from raw parameters and gradients (numpy, float64), never read from the
library's records. Tolerances: ``rho`` is the round-off budget of the traced program
(:func:`rate_tuning.targets.roundoff_budget`); ``2 rho`` for a cosine, ``4 rho`` for a relative loss change
and for the gradient relation (two gradients), ``3 gamma_n + 6 u + 2 rho`` for the norm identity
(:func:`proofs_check.numerics.tol_norm_identity` plus the radial part of the computed gradient), ``3 gamma_n +
6 u`` for a norm that must not decrease. Each claim has negative controls that break one hypothesis: weight
decay in the loss or the optimizer, momentum, a scale-variant leaf labelled ``'si'``, the almost-invariant
groups labelled ``'si'``, factors along a kernel's input axis, a tenth of the smoothness constants.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from proofs_check.claims import Claim, ClaimResult
from proofs_check.evidence import Evidence
from proofs_check.numerics import gamma, tol_norm_identity, unit_roundoff, x64
from rate_tuning import audit as A
from rate_tuning import groups as G
from rate_tuning import optim
from rate_tuning import targets as T

APPLICABLE = ("C1", "C2", "C4", "C5", "C21", "I3")
QUICK = {"steps": 4, "c_values": (1e-2, 0.5, 3.0, 1e2), "span": 100.0, "weight_decay": 5e-4, "num_points": 8}
FULL = {"steps": 20, "c_values": tuple(float(c) for c in np.logspace(-3, 3, 7) if not np.isclose(c, 1.0)),
        "span": 1000.0, "weight_decay": 5e-4, "num_points": 48}
U = unit_roundoff("float64")


@dataclasses.dataclass
class Case:
    """A user's model ready for the checks: float64 loss of ``(params, batch)``, the points, the labels."""

    name: str
    loss: Callable
    points: list
    batch: Any
    sub_batches: list
    audit: A.AuditResult
    layer: Any
    channel: Any
    rho_g: float
    rho_l: float
    value_and_grad: Callable = None
    cache: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.value_and_grad = jax.jit(jax.value_and_grad(self.loss, allow_int=True))
        self.value = jax.jit(self.loss)

    def grad(self, params, batch=None, lam: float = 0.0):
        """``(L, grad L)`` in numpy; ``lam``: weight decay ``lam/2 ||theta||^2`` added (a control)."""
        value, g = self.value_and_grad(params, self.batch if batch is None else batch)
        g = jax.tree_util.tree_map(lambda a, p: _np(a) + lam * _np(p), g, params)
        return float(value) + lam / 2 * _sq(params), g


def _np(a) -> np.ndarray:
    a = np.asarray(a)
    return np.zeros(a.shape) if a.dtype == jax.dtypes.float0 else a.astype(np.float64)


def _sq(tree) -> float:
    return sum(float(np.sum(np.square(_np(x)))) for x in jax.tree_util.tree_leaves(tree))


def _dot(a, b, labels) -> dict[str, np.ndarray]:
    """``<a_i, b_i>`` per SI group (a vector over channels for per-channel groups), in numpy."""
    out: dict[str, np.ndarray] = {}
    for (_, x, lab), y in zip(G.flatten_labelled(a, labels), jax.tree_util.tree_leaves(b)):
        if lab.kind == G.SI:
            x, y = _np(x), _np(y)
            v = np.sum(x * y, axis=tuple(range(x.ndim - 1)) if lab.per_channel else None)
            out[lab.group] = out[lab.group] + v if lab.group in out else v
    return out


def _scale(tree, labels, factors: dict):
    flat = G.flatten_labelled(tree, labels)
    new = [_np(x) * np.asarray(factors[lab.group]) if lab.kind == G.SI and lab.group in factors else x
           for _, x, lab in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), new)


def _relabel(labels, params, changes: dict):
    flat = G.flatten_labelled(params, labels)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                        [changes.get(p, lab) for p, _, lab in flat])


def _worst(values) -> float:
    arrays = [np.atleast_1d(np.asarray(v, np.float64)).ravel() for v in values]
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return 0.0 if not flat.size else (float("nan") if np.isnan(flat).any() else float(flat.max()))


def _ev(cid, case, setting, measured, tol, *, control=None, relation="<=", bound=0.0, **details) -> Evidence:
    if control:
        details = {"breaks": control, **details}
    return Evidence(claim=cid, setting=f"{case.name}: {setting}", measured=float(measured), bound=float(bound),
                    relation=relation, tolerance=float(tol), dtype="float64", bn="model",
                    negative_control=bool(control), details=details)


def prepare(spec: str, seed: int = 0) -> Case:
    """Load and audit ``MODULE:FACTORY``; raises :class:`rate_tuning.targets.AuditError` on bad input."""
    t = T.load_factory(spec)
    result = A.audit_target(t, seed=seed)
    with x64():
        cast = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) \
            else jnp.asarray(a)  # noqa: E731
        params = jax.tree_util.tree_map(cast, t.params)
        batch = jax.tree_util.tree_map(cast, t.batch)
        rng = np.random.default_rng(1000 + seed)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        generic = [x + 0.2 * (float(np.sqrt(np.mean(np.square(x)))) or 0.1) * rng.standard_normal(x.shape)
                   if jnp.issubdtype(x.dtype, jnp.inexact) else x for x in leaves]
        points = [params, jax.tree_util.tree_unflatten(treedef, generic)]
        n = int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0]) if np.ndim(jax.tree_util.tree_leaves(batch)[0]) else 0
        subs = [jax.tree_util.tree_map(lambda a: a[i:i + 8], batch) for i in range(0, n - 7, 8)] if n >= 16 else []
        rho_g = T.roundoff_budget(jax.value_and_grad(t.loss, allow_int=True), params, batch)
        rho_l = T.roundoff_budget(t.loss, params, batch)
    return Case(t.name, t.loss, points, batch, subs, result, result.labels("layer"), result.labels("channel"),
                rho_g, rho_l)


def _cos(case, labels, lam=0.0) -> tuple[float, int]:
    """Worst ``|cos(grad_i, w_i)|`` over the SI groups and points (per channel where labelled)."""
    worst, measured = [], 0
    for p in case.points:
        value, g = case.grad(p, lam=lam)
        inner, gg, ww = _dot(g, p, labels), _dot(g, g, labels), _dot(p, p, labels)
        for k in inner:
            den = np.sqrt(np.atleast_1d(gg[k]) * np.atleast_1d(ww[k]))
            ok = den > 1e3 * 2 * U * max(abs(value), 1.0)
            measured += int(ok.sum())
            worst.append(np.abs(np.atleast_1d(inner[k]))[ok] / den[ok])
    return _worst(worst), measured


def _variant_as_si(case):
    """The layer labels with the scale-variant leaf of largest ``|cos(grad, w)|`` at the generic point
    labelled ``'si'`` (a leaf with no gradient would not show anything), or ``(None, None)``."""
    p = case.points[1]
    _, g = case.grad(p)
    best, best_cos = None, 0.0
    for (path, x, lab), gl in zip(G.flatten_labelled(p, case.layer), jax.tree_util.tree_leaves(g)):
        x, gl = _np(x), _np(gl)
        den = math.sqrt(float(np.sum(x * x)) * float(np.sum(gl * gl)))
        cos = abs(float(np.sum(x * gl))) / den if den > 0 else 0.0
        if lab.kind == G.VARIANT and cos > best_cos:
            best, best_cos = path, cos
    if best is None:
        return None, None
    return best, _relabel(case.layer, p, {best: G.si("wrongly_si")})


C1_CONTROLS = ("weight decay lam/2 ||theta||^2 in the loss", "a scale-variant leaf labelled 'si'",
               "the almost-invariant groups labelled 'si'")


def check_c1(case: Case, settings: dict) -> list[Evidence]:
    tol = 2 * case.rho_g
    ev = []
    for grouping, labels in (("layer", case.layer), ("channel", case.channel)):
        worst, n = _cos(case, labels)
        ev.append(_ev("C1", case, f"audited {grouping} grouping, worst |cos(grad, w)| at the given and a generic point",
                      worst, tol, groups_measured=n, rho=case.rho_g,
                      **({"audit": case.audit.to_dict()} if grouping == "layer" else {})))
    lam = settings["weight_decay"]
    ev.append(_ev("C1", case, f"weight decay {lam:g} in the loss; control", _cos(case, case.layer, lam)[0], tol,
                  control=C1_CONTROLS[0]))
    path, wrong = _variant_as_si(case)
    if wrong is not None:
        ev.append(_ev("C1", case, f"{path} (scale-variant) labelled 'si'; control", _cos(case, wrong)[0], tol,
                      control=C1_CONTROLS[1]))
    if case.audit.almost:
        almost = case.audit.labels("layer", include_almost=True)
        ev.append(_ev("C1", case, "almost-invariant groups labelled 'si'; control", _cos(case, almost)[0], tol,
                      control=C1_CONTROLS[2], groups=[g.name for g in case.audit.almost]))
    return ev


C2_CONTROLS = ("weight decay lam/2 ||theta||^2 in the loss", "a scale-variant leaf labelled 'si'")


def _c2_error(case, labels, c, lam=0.0) -> float:
    """Worst per-block ``||c grad_i L(cW) - grad_i L(W)|| / ||grad_i L(W)||`` (the rest: unscaled)."""
    errs = []
    for p in case.points:
        names = {lab.group for _, _, lab in G.flatten_labelled(p, labels) if lab.kind == G.SI}
        _, g0 = case.grad(p, lam=lam)
        _, g1 = case.grad(_scale(p, labels, {k: c for k in names}), lam=lam)
        g1 = _scale(g1, labels, {k: c for k in names})
        flat0 = G.flatten_labelled(g0, labels)
        blocks: dict[str, list] = {}
        for (_, a, lab), b in zip(flat0, jax.tree_util.tree_leaves(g1)):
            blocks.setdefault(lab.group if lab.kind == G.SI else lab.kind, []).append((_np(a), _np(b)))
        for pairs in blocks.values():
            num = math.sqrt(sum(float(np.sum((b - a) ** 2)) for a, b in pairs))
            den = math.sqrt(sum(float(np.sum(a ** 2)) for a, _ in pairs))
            errs.append(num / den if den > 0 else num)
    return _worst(errs)


def check_c2(case: Case, settings: dict) -> list[Evidence]:
    tol = 4 * case.rho_g
    cs = settings["c_values"]
    per_c = {f"{c:g}": _c2_error(case, case.layer, c) for c in cs}
    ev = [_ev("C2", case, f"every audited group scaled by c in {tuple(cs)}, worst relative error per block",
              _worst(per_c.values()), tol, error_per_c=per_c)]
    lam = settings["weight_decay"]
    ev.append(_ev("C2", case, f"weight decay {lam:g} in the loss; control",
                  max(_c2_error(case, case.layer, c, lam) for c in cs), tol, control=C2_CONTROLS[0]))
    path, wrong = _variant_as_si(case)
    if wrong is not None:
        ev.append(_ev("C2", case, f"{path} (scale-variant) labelled 'si' and scaled too; control",
                      max(_c2_error(case, wrong, c) for c in cs), tol, control=C2_CONTROLS[1]))
    return ev


def _rates(case, labels) -> tuple[float, float]:
    """``lr_w = 0.3 median(||w_i|| / ||g_i||)`` (the growth term is then visible) and a small ``lr_g``."""
    p = case.points[1]
    _, g = case.grad(p)
    ww, gg = _dot(p, p, labels), _dot(g, g, labels)
    pairs = [(np.ravel(ww[k]), np.ravel(gg[k])) for k in ww]
    ratios = [float(np.sqrt(w / g)) for ws, gs in pairs for w, g in zip(ws, gs) if g > 0] or [1.0]  # no gradient: no rate
    variant = [math.sqrt(float(np.sum(_np(x) ** 2)) / max(float(np.sum(_np(y) ** 2)), 1e-300))
               for (_, x, lab), y in zip(G.flatten_labelled(p, labels), jax.tree_util.tree_leaves(g))
               if lab.kind == G.VARIANT and np.any(_np(y))]
    return 0.3 * float(np.median(ratios)), 0.01 * float(np.median(variant)) if variant else 1e-3


def _run(case, labels, tx, lr_fn, steps, batches) -> list[dict]:
    """``steps`` steps of ``tx`` from the generic point; per step the norms, the gradient norms (computed
    here, on the step's batch) and the rate ``lr_fn(t)``, per SI group."""
    p, state, out = case.points[1], tx.init(case.points[1]), []
    for t in range(steps):
        batch = batches[t % len(batches)] if batches else None
        _, g = case.grad(p, batch)
        updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        new = optax.apply_updates(p, updates)
        out.append({"w": _dot(p, p, labels), "w_new": _dot(new, new, labels), "g": _dot(g, g, labels),
                    "lr": lr_fn(t)})
        p = new
    return out


def _identity(run) -> float:
    res = [np.abs(s["w_new"][k] - s["w"][k] - s["lr"] ** 2 * s["g"][k]) /
           (s["w_new"][k] + s["w"][k] + s["lr"] ** 2 * s["g"][k]) for s in run for k in s["w"]]
    return _worst(res)


def _largest_group(params, labels) -> int:
    sizes = {}
    for _, x, lab in G.flatten_labelled(params, labels):
        if lab.kind == G.SI:
            n = math.prod(np.shape(x)[:-1]) if lab.per_channel else int(np.size(x))
            sizes[lab.group] = sizes.get(lab.group, 0) + n
    return max(sizes.values(), default=1)


C4_CONTROLS = ("weight decay in the optimizer (lr_w * lam = 0.1)", "heavy-ball momentum 0.9")


def _trajectories(case, settings, labels):
    key = ("trajectories", settings["steps"])
    if key not in case.cache:
        case.cache[key] = _compute_trajectories(case, settings, labels)
    return case.cache[key]


def _compute_trajectories(case, settings, labels):
    lr_w, lr_g = _rates(case, labels)
    steps = settings["steps"]
    gd = optim.two_rate_sgd(labels, lr_w, lr_g)
    runs = [("full-batch GD, constant lr_w", _run(case, labels, gd, lambda t: lr_w, steps, None), None)]
    if case.sub_batches:
        sgd = optim.two_rate_sgd(labels, optim.inverse_sqrt(lr_w), optim.inverse_sqrt(lr_g))
        runs.append((f"SGD over {len(case.sub_batches)} sub-batches of 8, lr_w / sqrt(t + 1)",
                     _run(case, labels, sgd, lambda t: lr_w / math.sqrt(t + 1), steps, case.sub_batches), None))
    wd = optim.two_rate_sgd(labels, lr_w, lr_g, weight_decay=0.1 / lr_w)
    runs.append(("GD with weight decay (control)", _run(case, labels, wd, lambda t: lr_w, steps, None), "wd"))
    mom = optim.two_rate_sgd(labels, lr_w, lr_g, momentum=0.9)
    runs.append(("GD with momentum 0.9 (control)", _run(case, labels, mom, lambda t: lr_w, steps, None), "mom"))
    return lr_w, runs


def check_c4(case: Case, settings: dict) -> list[Evidence]:
    labels = case.layer
    n = _largest_group(case.points[0], labels)
    tol = tol_norm_identity(n, "float64") + 2 * case.rho_g
    lr_w, runs = _trajectories(case, settings, labels)
    ev = []
    for what, run, control in runs:
        ctrl = {"wd": C4_CONTROLS[0], "mom": C4_CONTROLS[1]}.get(control)
        ev.append(_ev("C4", case, f"{what}, {len(run)} steps, lr_w = {lr_w:.3g}: worst "
                      "| ||w'||^2 - ||w||^2 - lr^2 ||g||^2 | / (||w'||^2 + ||w||^2 + lr^2 ||g||^2)",
                      _identity(run), tol, control=ctrl, largest_group=n))
    return ev


C5_CONTROLS = ("weight decay in the optimizer (lr_w * lam = 0.2): norms shrink",)


def check_c5(case: Case, settings: dict) -> list[Evidence]:
    labels = case.layer
    n = _largest_group(case.points[0], labels)
    tol = 3 * gamma(n, "float64") + 6 * U
    lr_w, runs = _trajectories(case, settings, labels)
    lr_g = _rates(case, labels)[1]
    shrink = optim.two_rate_sgd(labels, lr_w, lr_g, weight_decay=0.2 / lr_w)
    runs = [r for r in runs if r[2] is None]
    runs.append(("GD with weight decay (control)", _run(case, labels, shrink, lambda t: lr_w, settings["steps"],
                                                       None), C5_CONTROLS[0]))
    ev = []
    for what, run, control in runs:
        drop = _worst((s["w"][k] - s["w_new"][k]) / s["w"][k] for s in run for k in s["w"])
        rise = _worst((run[t + 1]["lr"] / run[t + 1]["w"][k]) / (run[t]["lr"] / run[t]["w"][k]) - 1
                      for t in range(len(run) - 1) for k in run[t]["w"])
        ev.append(_ev("C5", case, f"{what}, {len(run)} steps: worst relative decrease of ||w_t||^2", drop, tol,
                      control=control))
        if control is None:
            ev.append(_ev("C5", case, f"{what}, {len(run)} steps: worst relative increase of lr_t / ||w_t||^2", rise,
                          tol))
    return ev


C21_CONTROLS = ("distinct factors along a kernel's input axis", "one step with weight decay (lr_w * lam = 0.1)")


def check_c21(case: Case, settings: dict) -> list[Evidence]:
    labels = case.channel
    per_ch = [(p, x) for p, x, lab in G.flatten_labelled(case.points[1], labels) if lab.per_channel]
    tol_c, tol_l = 2 * case.rho_g, 4 * case.rho_l
    worst, n = _cos(case, labels)
    ev = [_ev("C21", case, "per-channel groups, worst |cos(grad_k, w_k)|", worst, tol_c, channels=n)]
    span = settings["span"]
    rng = np.random.default_rng(21)
    p = case.points[1]
    ww = _dot(p, p, labels)
    factors = {k: np.exp(rng.uniform(-math.log(span), math.log(span), np.shape(v))) for k, v in ww.items()
               if np.ndim(v) == 1}
    base = float(case.value(p, case.batch))
    change = abs(float(case.value(_scale(p, labels, factors), case.batch)) - base) / max(abs(base), 1.0)
    ev.append(_ev("C21", case, f"a distinct factor in [1/{span:g}, {span:g}] per channel, "
                  "|L(D w) - L(w)| / max(|L|, 1)",
                  change, tol_l))
    n_max = _largest_group(p, labels)
    lr_w, lr_g = _rates(case, labels)
    for lam, control in ((0.0, None), (0.1 / lr_w, C21_CONTROLS[1])):
        run = _run(case, labels, optim.two_rate_sgd(labels, lr_w, lr_g, weight_decay=lam), lambda t: lr_w, 1, None)
        ev.append(_ev("C21", case, f"one step, lr_w = {lr_w:.3g}"
                      + (f", weight decay {lam:.3g}; control" if lam else "")
                      + ", per-channel norm identity", _identity(run), tol_norm_identity(n_max, "float64") + tol_c,
                      control=control))
    rows = [(path, x) for path, x in per_ch if np.ndim(x) >= 2 and np.shape(x)[-2] >= 2]
    if rows:
        path, x = rows[-1]
        shape = [1] * np.ndim(x)
        shape[-2] = np.shape(x)[-2]
        fac = np.exp(rng.uniform(-math.log(span), math.log(span), shape))
        mix = _relabel(labels, p, {path: G.si("input_axis")})
        new = float(case.value(_scale(p, mix, {"input_axis": fac}), case.batch))
        ev.append(_ev("C21", case, f"{path} scaled along its input axis by distinct factors; control",
                      abs(new - base) / max(abs(base), 1.0), tol_l, control=C21_CONTROLS[0]))
    return ev


I3_MAX_GROUPS = 6
"""The smoothness constants need ``m (m + 3) / 2 + 1`` Lanczos runs per point: measured on models with at
most this many groups."""
I3_CONTROLS = ("the smoothness constants: 1/10 of the estimated L^ww, L^gw, L^gg",)


def check_i3(case: Case, settings: dict) -> list[Evidence]:
    """The one-step descent inequality of the GD proof (PAPER §4.1, I3) along ``2 steps`` full-batch GD steps,
    with ``L^ww``, ``L^gw``, ``L^gg`` estimated by Lanczos at unit-normalised points of the run's segments
    (:func:`proofs_check.curvature.smoothness_constants`; a lower estimate of the sup in A1). Measured:
    ``max_t (L_{t+1} - RHS_t) / scale_t`` with ``scale_t = |L_t| + |L_{t+1}| + first + second``; tolerance
    ``4 gamma_N`` (``N`` parameters). A ReLU or max-pool network is only piecewise C^2: the constants are
    then those of the pieces the samples fall in."""
    from proofs_check import curvature

    labels = case.layer
    lr_w, lr_g = _rates(case, labels)
    steps = 2 * settings["steps"]
    tx = optim.two_rate_sgd(labels, lr_w, lr_g)
    p, rows = case.points[1], []
    state, snaps = tx.init(p), [p]
    for _ in range(steps):
        value, g = case.grad(p)
        ww, gg = _dot(p, p, labels), _dot(g, g, labels)
        b2 = sum(float(np.sum(_np(y) ** 2)) for (_, _, lab), y in
                 zip(G.flatten_labelled(p, labels), jax.tree_util.tree_leaves(g)) if lab.kind == G.VARIANT)
        rows.append({"L": value, "rho": {k: lr_w / float(ww[k]) for k in ww},
                     "a": {k: math.sqrt(float(ww[k] * gg[k])) for k in ww}, "b": math.sqrt(b2)})
        updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        snaps.append(p)
    final = float(case.value(p, case.batch))
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *snaps)

    def sampler(key):
        kt, ks = jax.random.split(key)
        t, s = jax.random.randint(kt, (), 0, steps), jax.random.uniform(ks, (), jnp.float64)
        return jax.tree_util.tree_map(lambda a: a[t] + s * (a[t + 1] - a[t]), stacked)

    C = curvature.smoothness_constants(lambda q: case.loss(q, case.batch), sampler, labels,
                                       settings["num_points"], jax.random.key(3), lanczos_steps=20)
    names = list(C.groups)
    n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(case.points[0]))
    ev = []
    for factor, control in ((1.0, None), (0.1, I3_CONTROLS[0])):
        Lww, Lgw, Lgg = factor * np.asarray(C.L_ww), factor * np.asarray(C.L_gw), factor * C.L_gg
        viol = []
        for t, r in enumerate(rows):
            ra = np.array([r["rho"][k] * r["a"][k] for k in names])
            first = sum(r["rho"][k] * r["a"][k] ** 2 for k in names) + lr_g * r["b"] ** 2
            second = 0.5 * (ra @ Lww @ ra + 2 * lr_g * r["b"] * float(ra @ Lgw) + Lgg * lr_g ** 2 * r["b"] ** 2)
            nxt = rows[t + 1]["L"] if t + 1 < len(rows) else final
            viol.append((nxt - r["L"] + first - second) / (abs(r["L"]) + abs(nxt) + first + second))
        ev.append(_ev("I3", case, f"{steps} GD steps, lr_w = {lr_w:.3g}, lr_g = {lr_g:.3g}, constants x{factor:g} "
                      f"from {C.num_points} segment points: max_t (L_(t+1) - RHS_t) / scale_t", max(viol),
                      4 * gamma(n_params, "float64"), control=control, L_ww=np.asarray(C.L_ww).tolist(),
                      L_gw=np.asarray(C.L_gw).tolist(), L_gg=C.L_gg, groups=names,
                      steps_violated=int(np.sum(np.asarray(viol) > 4 * gamma(n_params, "float64")))))
    return ev


CLAIMS = {
    "C1": ("Sec. 2 gradient lemma [R]; Lemma 2.4 (1) [Q]", "<grad_{w_i} L, w_i> = 0 for every audited group",
           C1_CONTROLS, check_c1),
    "C2": ("Sec. 2 gradient lemma [R/D]", "c grad_{w_i} L(cW) = grad_{w_i} L(W), other blocks unchanged",
           C2_CONTROLS, check_c2),
    "C4": ("Lemma 2.4 (2) [Q]", "||w_{t+1}||^2 = ||w_t||^2 + lr_t^2 ||grad_t||^2 per audited group, GD and SGD",
           C4_CONTROLS, check_c4),
    "C5": ("Lemma 2.4 consequence [D]", "||w_t|| non-decreasing, lr_t / ||w_t||^2 non-increasing",
           C5_CONTROLS, check_c5),
    "C21": ("Lemma 2.4 per output channel [D]", "each audited per-channel group: |cos| = 0, invariance under "
            "distinct channel factors, the norm identity", C21_CONTROLS, check_c21),
    "I3": ("proof of the GD theorem, one-step descent inequality (PAPER §4.1, I3) [D]",
           "L_{t+1} <= L_t - sum_i rho_i a_i^2 - lr_g b^2 + 1/2 [rho a]^T L^ww [rho a] + ... with the smoothness "
           "constants measured on the model (A1)", I3_CONTROLS, check_i3),
}


def applicable(case: Case) -> list[str]:
    """The claims that apply: none without a group; C21 where a group is per channel; I3 (the smoothness
    measurement) with at most :data:`I3_MAX_GROUPS` groups."""
    if not case.audit.groups:
        return []
    has_channel = any(g.per_channel for g in case.audit.groups)
    return [c for c in APPLICABLE if (c != "C21" or has_channel)
            and (c != "I3" or len(case.audit.groups) <= I3_MAX_GROUPS)]


def run(case: Case, ids, quick: bool = True, on_result: Callable | None = None):
    """Run claims ``ids`` on ``case``; returns ``(results, errors)`` as :func:`proofs_check.report.write_report`
    takes them (a check that raises fails its claim with the traceback)."""
    import traceback

    results, errors = [], {}
    settings = QUICK if quick else FULL
    for cid in ids:
        ref, statement, controls, check = CLAIMS[cid]
        claim = Claim(cid, ref, f"{statement} (model {case.name}, groups from the audit)",
                      "the audited groups are scale-invariant: train-mode loss on the factory's batch, float64",
                      controls, lambda s, c=check: c(case, s), dict(QUICK), dict(FULL))
        start = time.perf_counter()
        try:
            with x64():
                evidence = check(case, dict(settings))
        except Exception:
            evidence, errors[cid] = [], traceback.format_exc()
        results.append(ClaimResult(claim, evidence, time.perf_counter() - start))
        if on_result:
            on_result(results[-1], errors.get(cid))
    return results, errors


def main(spec: str, *, claims: str | None = None, out: str = "report", quick: bool = False,
         command: str | None = None) -> int:
    """``python -m proofs_check --model MODULE:FACTORY``: audit the model, run the claims that apply, write the
    report. Exit status: 0 every claim passes and every control is violated (or no claim applies: no
    scale-invariant group), 1 otherwise, 2 on bad input (one line)."""
    import sys

    from proofs_check import report as R

    def error(message: str) -> int:
        print(f"proofs_check: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2

    wanted = None
    if claims is not None:
        wanted = list(dict.fromkeys(c.strip().upper() for c in claims.split(",") if c.strip()))
        bad = [c for c in wanted if c not in APPLICABLE]
        if not wanted or bad:
            return error(f"claim {', '.join(bad) or '(none)'} does not apply to --model; "
                         f"applicable: {', '.join(APPLICABLE)}")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # nnx.BatchNorm: float64 statistics into float32 running averages
            warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
            case = prepare(spec)
    except T.AuditError as e:
        return error(str(e))
    print(case.audit.table(), flush=True)
    ids = applicable(case)
    if wanted is not None:
        missing = [c for c in wanted if c not in ids]
        if missing:
            return error(f"claim {', '.join(missing)} does not apply to {case.name}: "
                         + ("no scale-invariant group" if not ids else
                            f"no per-channel group, or more than {I3_MAX_GROUPS} groups for I3"))
        ids = wanted
    if not ids:
        print(f"no claim applies to {case.name}: the audit found no scale-invariant group (nothing written)")
        return 0

    def line(result, err):
        controls = [e for e in result.evidence if e.negative_control]
        verdict = "PASS" if R.claim_ok(result, err) else ("ERROR" if err else "FAIL")
        print(f"{result.claim.id:<5} {verdict:<5} {len(result.evidence) - len(controls):>3} records  "
              f"{sum(R.record_ok(e) for e in controls)}/{len(controls)} controls confirmed  "
              f"{result.seconds:7.1f} s", flush=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
        results, errors = run(case, ids, quick, on_result=line)
    try:
        paths = R.write_report(results, out, quick=quick, errors=errors, command=command,
                               wall_seconds=time.perf_counter() - start)
    except OSError as exc:
        return error(f"could not write the report to {out}: {exc}")
    status = R.exit_status(results, errors)
    print(f"{'PASS' if status == 0 else 'FAIL'}: report written to {paths['report']}")
    return status
