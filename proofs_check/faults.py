"""Faults: deliberate errors in the code under test or in the theory's inputs, each of which named claims
must catch (DESIGN.md, "Faults").

A negative control breaks a *hypothesis* of a claim; a fault breaks the *code* (a library function of
``rate_tuning``, a routine of ``proofs_check`` the checks rely on, a constant the theory feeds the checks).
A claim that still passes under one of its faults is too weak, whatever its negative control says.

Faults are applied by patching module attributes at run time (:func:`applied`), never by editing files,
and each one is run in a fresh subprocess (:func:`run_matrix`), so that no patched function, compiled
program or cached run leaks into another fault or into the unmodified run. The kill matrix (claim x fault:
``caught`` / ``MISSED`` / ``caught (error)``) goes to ``faults.json`` and ``faults.md`` and into the report.

Usage::

    python -m proofs_check --faults [--quick] [--claims C4,C16] [--out DIR]

Registry: :data:`FAULTS` (name -> :class:`Fault`); :func:`faults_of` gives the faults a claim names.
A fault that no claim catches is a finding: strengthen the claim, do not drop the fault.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

__all__ = ["Fault", "FAULTS", "fault", "faults_of", "applied", "run_matrix", "matrix_ok"]


@dataclasses.dataclass(frozen=True)
class Fault:
    """One deliberate error.

    Attributes:
      name: short id (``'schedule-1/t'``).
      target: the patched attribute(s), dotted (``'rate_tuning.optim.inverse_sqrt'``).
      description: what is wrong, one line.
      kind: ``'code'`` (a function of the code under test) or ``'theory'`` (a constant or input of the
        theory the checks use).
      claims: the claim ids that must fail under it.
      patches: ``() -> [(owner, attribute, new value)]``; an owner that is a dict gets an item.
    """

    name: str
    target: str
    description: str
    kind: str
    claims: tuple[str, ...]
    patches: Callable[[], list[tuple[Any, str, Any]]]


FAULTS: dict[str, Fault] = {}


def fault(name: str, target: str, description: str, claims: Sequence[str], kind: str = "code"):
    """Decorator registering ``patches`` (``() -> [(owner, attribute, value)]``) as fault ``name``."""
    def register(patches):
        if name in FAULTS:
            raise ValueError(f"fault {name} registered twice")
        FAULTS[name] = Fault(name, target, description, kind, tuple(claims), patches)
        return patches
    return register


def faults_of(claim_id: str) -> list[Fault]:
    """The faults that claim ``claim_id`` must catch."""
    return [f for f in FAULTS.values() if claim_id in f.claims]


@contextlib.contextmanager
def applied(f: Fault) -> Iterator[None]:
    """Apply fault ``f`` for the duration of the block (patched attributes restored on exit)."""
    saved = []
    try:
        for owner, attr, value in f.patches():
            if isinstance(owner, dict):
                saved.append((owner, attr, owner[attr]))
                owner[attr] = value
            else:
                saved.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, old in reversed(saved):
            if isinstance(owner, dict):
                owner[attr] = old
            else:
                setattr(owner, attr, old)


def _mod(name: str):
    return importlib.import_module(name)


# -------------------------------------------------------------------------------------------------------
# rate_tuning.optim
# -------------------------------------------------------------------------------------------------------


@fault("schedule-1/t", "rate_tuning.optim.inverse_sqrt (and optim.SCHEDULES)",
       "the SGD schedule lr/(t+1) in place of lr/sqrt(t+1)", ("C4", "C16", "C18"))
def _schedule_1_over_t():
    optim = _mod("rate_tuning.optim")
    import jax.numpy as jnp

    def inverse_t(lr):
        optim.check_learning_rate("lr", lr)
        return lambda count: lr / (jnp.asarray(count, dtype=jnp.result_type(float)) + 1.0)

    return [(optim, "inverse_sqrt", inverse_t), (optim.SCHEDULES, "inverse_sqrt", inverse_t)]


def _wrap_two_rate(transform: Callable):
    optim = _mod("rate_tuning.optim")
    original = optim.two_rate_sgd

    @functools.wraps(original)
    def faulty(labels, lr_w, lr_g, **kw):
        a, b, kw = transform(lr_w, lr_g, kw)
        return original(labels, a, b, **kw)

    return [(optim, "two_rate_sgd", faulty)]


@fault("swap-rates", "rate_tuning.optim.two_rate_sgd", "lr_w and lr_g swapped inside the optimizer",
       ("C8", "C9", "C22"))
def _swap_rates():
    return _wrap_two_rate(lambda lr_w, lr_g, kw: (lr_g, lr_w, kw))


@fault("hidden-momentum", "rate_tuning.optim.two_rate_sgd", "heavy-ball momentum 0.5 applied when none is asked",
       ("C4", "C6", "C7"))
def _hidden_momentum():
    return _wrap_two_rate(lambda lr_w, lr_g, kw: (lr_w, lr_g, dict(kw, momentum=kw.get("momentum") or 0.5)))


@fault("hidden-weight-decay", "rate_tuning.optim.two_rate_sgd",
       "coupled weight decay 1e-3 applied when none is asked", ("C4", "C5", "C17", "I2"))
def _hidden_weight_decay():
    return _wrap_two_rate(lambda lr_w, lr_g, kw: (lr_w, lr_g, dict(kw, weight_decay=kw.get("weight_decay") or 1e-3)))


@fault("projection-off", "rate_tuning.optim.project_si_groups",
       "the sphere projection of the App. D baseline does nothing", ("C4", "C10", "C11", "C23"))
def _projection_off():
    optim = _mod("rate_tuning.optim")
    import optax

    def identity(labels):
        del labels
        return optax.GradientTransformation(lambda params: optim.ProjectState(),
                                            lambda updates, state, params=None: (updates, state))

    return [(optim, "project_si_groups", identity)]


# -------------------------------------------------------------------------------------------------------
# rate_tuning.metrics, groups, models
# -------------------------------------------------------------------------------------------------------


@fault("eff-lr-1/norm", "rate_tuning.metrics.effective_lr", "the effective rate as lr/||w|| instead of lr/||w||^2",
       ("C5",))
def _eff_lr_over_norm():
    metrics = _mod("rate_tuning.metrics")
    G = _mod("rate_tuning.groups")
    import jax.numpy as jnp
    return [(metrics, "effective_lr",
             lambda lr_w, params, labels: {k: lr_w / jnp.sqrt(v) for k, v in G.group_sq_norms(params, labels).items()})]


@fault("intrinsic-unscaled", "rate_tuning.metrics.intrinsic_grad_sq_norms",
       "the intrinsic gradient norm without the ||w||^2 factor (the gradient at theta, not at V)", ("C9", "C10"))
def _intrinsic_unscaled():
    metrics = _mod("rate_tuning.metrics")
    G = _mod("rate_tuning.groups")
    import jax.numpy as jnp

    def faulty(grads, params, labels):
        g_sq = G.group_sq_norms(grads, labels)
        per = {k: jnp.sum(v) for k, v in g_sq.items()}
        per[G.VARIANT] = metrics.variant_sq_norm(grads, labels)
        return per, sum(per.values(), jnp.zeros(()))

    return [(metrics, "intrinsic_grad_sq_norms", faulty)]


@fault("angle-x2", "rate_tuning.metrics.angular_update", "the angular update doubled", ("C7",))
def _angle_x2():
    metrics = _mod("rate_tuning.metrics")
    original = metrics.angular_update
    return [(metrics, "angular_update", lambda old, new, labels: {k: 2.0 * v for k, v in
                                                                  original(old, new, labels).items()})]


@fault("verify-labels-off", "rate_tuning.groups.verify_labels", "verify_labels returns at once (verifies nothing)",
       ("C20", "C22"))
def _verify_labels_off():
    G = _mod("rate_tuning.groups")
    return [(G, "verify_labels", lambda *args, **kwargs: {})]


@fault("last-bn-labelled-si", "rate_tuning.models._BNNetBase._head_labels",
       "the model presets label the last BN's (gamma, beta) scale-invariant", ("C20", "C22"))
def _last_bn_si():
    models = _mod("rate_tuning.models")
    G = _mod("rate_tuning.groups")
    original = models._BNNetBase._head_labels

    def faulty(self, grouping):
        tree = original(self, grouping)
        if "bn_out" in tree:
            tree["bn_out"] = {k: G.si("bn_out:affine") for k in tree["bn_out"]}
        return tree

    return [(models._BNNetBase, "_head_labels", faulty)]


@fault("per-channel-merged", "rate_tuning.groups.si_groups / group reductions",
       "per-channel groups reduced as one group (per_channel ignored)", ("C21",))
def _per_channel_merged():
    G = _mod("rate_tuning.groups")
    return [(G, "_group_axes", lambda leaf, label: tuple(range(leaf.ndim)))]


# -------------------------------------------------------------------------------------------------------
# rate_tuning.layers (BatchNorm)
# -------------------------------------------------------------------------------------------------------


@fault("bn-epsilon-1e-5", "rate_tuning.layers.normalize",
       "exact and smooth BN get flax's epsilon 1e-5 added to the variance", ("C1", "C2", "C19"))
def _bn_epsilon():
    layers = _mod("rate_tuning.layers")
    original = layers.normalize
    return [(layers, "normalize", lambda x, offset, axis_name=None: original(x, offset + 1e-5, axis_name))]


@fault("bn-jvp-no-ymean", "rate_tuning.layers.normalize (its custom JVP)",
       "the BN derivative without its y mean(y dx) term", ("C1", "C3", "C21"))
def _bn_jvp():
    layers = _mod("rate_tuning.layers")
    import jax

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def normalize(x, offset, axis_name=None):
        mean = layers._batch_mean(x, axis_name)
        xc = x - mean
        var = layers._batch_mean(xc * xc, axis_name)
        return xc * jax.lax.rsqrt(var + offset), mean, var

    @normalize.defjvp
    def _jvp(axis_name, primals, tangents):
        x, offset = primals
        dx, d_offset = tangents
        y, mean, var = normalize(x, offset, axis_name)
        r = jax.lax.rsqrt(var + offset)
        d_mean = layers._batch_mean(dx, axis_name)
        s = layers._batch_mean(y * dx, axis_name)
        dy = r * (dx - d_mean - y * (0.5 * r * d_offset))   # the fault: y * s dropped
        return (y, mean, var), (dy, d_mean, 2 * s / r)

    return [(layers, "normalize", normalize)]


@fault("smooth-bn-epsilon-dropped", "rate_tuning.layers.normalize",
       "the smooth BN's eps ||w||^2 is dropped (smooth BN becomes exact BN)", ("C19", "A1"))
def _smooth_dropped():
    layers = _mod("rate_tuning.layers")
    original = layers.normalize
    return [(layers, "normalize", lambda x, offset, axis_name=None: original(x, 0.0 * offset, axis_name))]


# -------------------------------------------------------------------------------------------------------
# proofs_check: curvature, theory constants
# -------------------------------------------------------------------------------------------------------


@fault("lanczos-half", "proofs_check.curvature.lanczos", "Lanczos stopped at half its steps", ("C13", "I3"))
def _lanczos_half():
    curvature = _mod("proofs_check.curvature")
    original = curvature.lanczos

    @functools.wraps(original)
    def half(matvec, dim_or_example, num_steps, key, **kw):
        return original(matvec, dim_or_example, max(1, int(num_steps) // 2), key, **kw)

    return [(curvature, "lanczos", half)]


@fault("hvp-x1.01", "proofs_check.curvature.hvp", "Hessian-vector products scaled by 1.01", ("C3", "C13", "I3"))
def _hvp_scaled():
    curvature = _mod("proofs_check.curvature")
    original = curvature.hvp
    import jax
    return [(curvature, "hvp", lambda loss, params, v: jax.tree_util.tree_map(lambda x: 1.01 * x,
                                                                               original(loss, params, v)))]


@fault("gd-constants/10", "proofs_check.checks.gd.gd_constants",
       "the GD theorem's constants C, bbar_i and Delta divided by 10", ("C9", "C10", "C12", "C14"), kind="theory")
def _gd_constants_div10():
    gd = _mod("proofs_check.checks.gd")
    original = gd.gd_constants

    def faulty(*args, **kw):
        k = original(*args, **kw)
        return dataclasses.replace(k, C=k.C / 10, Delta=k.Delta / 10, b_bar=tuple(b / 10 for b in k.b_bar))

    return [(gd, "gd_constants", faulty)]


@fault("smoothness-bound/10", "proofs_check.checks.gd.multi_group_bounds, rayleigh_bounds",
       "the analytic smoothness bound L^ww of the GD problems divided by 10", ("C14",), kind="theory")
def _smoothness_div10():
    gd = _mod("proofs_check.checks.gd")
    patches = []
    for name in ("multi_group_bounds", "rayleigh_bounds"):
        original = getattr(gd, name)

        def faulty(*a, _original=original, **kw):
            bd = _original(*a, **kw)
            return dataclasses.replace(bd, L_ww=bd.L_ww / 10)

        patches.append((gd, name, faulty))
    return patches


@fault("lr-g-threshold-x2", "proofs_check.checks.gd._lr_g",
       "the scale-variant rate set from a threshold 4/L^gg instead of 2/L^gg", ("C15",), kind="theory")
def _lr_g_x2():
    gd = _mod("proofs_check.checks.gd")
    return [(gd, "_lr_g", lambda c_g, L_gg: 4.0 * c_g / L_gg)]


@fault("sgd-gradient-bound/10", "proofs_check.checks.sgd.a_priori_gradient_bound",
       "the a-priori bound of the stochastic gradient at unit norm divided by 10", ("C16",), kind="theory")
def _sgd_bound_div10():
    sgd = _mod("proofs_check.checks.sgd")
    original = sgd.a_priori_gradient_bound
    def faulty(*a, **kw):
        G_det, floor = original(*a, **kw)
        return G_det / 10, floor / 100   # the bound of ||grad F_z|| (sqrt(G_det^2 + floor)) divided by 10

    return [(sgd, "a_priori_gradient_bound", faulty)]


# -------------------------------------------------------------------------------------------------------
# beyond the paper (C24-C27): the optimizer options they use, and the formulas of checks/followups.py
# -------------------------------------------------------------------------------------------------------


@fault("weight-decay-x1.1", "rate_tuning.optim.two_rate_sgd",
       "the coupled weight decay applied as 1.1 lambda", ("C24", "C25", "C26"))
def _weight_decay_x11():
    return _wrap_two_rate(lambda lr_w, lr_g, kw: (lr_w, lr_g, dict(kw, weight_decay=1.1 * kw.get("weight_decay", 0.0))))


@fault("momentum-dampened", "rate_tuning.optim.two_rate_sgd",
       "heavy-ball momentum as an average (buffer <- m buffer + (1 - m) g: the rates times 1 - m)",
       ("C24", "C25", "C26"))
def _momentum_dampened():
    def scale(lr, k):
        return (lambda count: k * lr(count)) if callable(lr) else k * lr

    def transform(lr_w, lr_g, kw):
        k = 1.0 - (kw.get("momentum") or 0.0)
        return scale(lr_w, k), scale(lr_g, k), kw

    return _wrap_two_rate(transform)


@fault("projection-drift", "rate_tuning.optim.project_si_groups",
       "the sphere projection rescales to 1.01 times the pre-step norm (the effective rate decays)", ("C27",))
def _projection_drift():
    optim = _mod("rate_tuning.optim")
    G = _mod("rate_tuning.groups")
    import jax
    import jax.numpy as jnp
    import optax

    def drifting(labels):
        def update(updates, state, params=None):
            new = jax.tree_util.tree_map(lambda w, u: w + u, params, updates)
            old_sq, new_sq = G.group_sq_norms(params, labels), G.group_sq_norms(new, labels)
            projected = G.scale_groups(new, labels, {k: 1.01 * jnp.sqrt(old_sq[k] / new_sq[k]) for k in old_sq})
            return jax.tree_util.tree_map(lambda p, w: p - w, projected, params), state

        return optax.GradientTransformation(lambda params: optim.ProjectState(), update)

    return [(optim, "project_si_groups", drifting)]


@fault("exp-lr-momentum-free-root", "proofs_check.checks.followups.exp_lr_alpha",
       "the exponential schedule's alpha = 1 - eta lambda also with momentum (the root of Li & Arora's quadratic "
       "ignored)", ("C24",), kind="theory")
def _exp_lr_root():
    followups = _mod("proofs_check.checks.followups")
    import math
    return [(followups, "exp_lr_alpha", lambda eta, lam, momentum=0.0: (1.0 - eta * lam, math.log1p(-eta * lam)))]


@fault("equilibrium-factor-2-dropped", "proofs_check.checks.followups.equilibrium_norm4",
       "the equilibrium ||w||^4 without its factor 1/(2 - eta lambda/(1 + alpha))", ("C25",), kind="theory")
def _equilibrium_factor():
    followups = _mod("proofs_check.checks.followups")
    original = followups.equilibrium_norm4
    def faulty(eta, lam, L, momentum=None):
        return original(eta, lam, L, momentum) * (2.0 - eta * lam / (1.0 + (momentum or 0.0)))

    return [(followups, "equilibrium_norm4", faulty)]


@fault("angular-update-without-2", "proofs_check.checks.followups.angular_update_limit",
       "the angular update sqrt(lambda eta / (1 + alpha)) (the factor 2 dropped)", ("C26",), kind="theory")
def _angular_without_2():
    followups = _mod("proofs_check.checks.followups")
    import math
    return [(followups, "angular_update_limit",
             lambda eta, lam, momentum=None: math.sqrt(lam * eta / (1.0 + (momentum or 0.0))))]


@fault("regime-thresholds-x10", "proofs_check.checks.followups.classify_regime",
       "the regime rule's angle thresholds ten times larger (1 and 10 rad)", ("C27",), kind="theory")
def _regime_thresholds():
    followups = _mod("proofs_check.checks.followups")

    def faulty(mean_angle):
        if not mean_angle < 10.0 * followups.ANGLE_NO_TRAINING:
            return 2
        return 0 if mean_angle < 10.0 * followups.ANGLE_CONVERGED else 1

    return [(followups, "classify_regime", faulty)]


# -------------------------------------------------------------------------------------------------------
# running: one subprocess per fault
# -------------------------------------------------------------------------------------------------------

CAUGHT, MISSED, ERRORED = "caught", "MISSED", "caught (error)"


def _child(name: str, claim_ids: list[str], quick: bool) -> dict:
    """Apply fault ``name`` in this process and run ``claim_ids``: ``{claim: {verdict, seconds, failing}}``."""
    from proofs_check import claims as C
    registry = C.load_all()
    f = FAULTS[name]
    out = {}
    with applied(f):
        for cid in claim_ids:
            t0 = time.perf_counter()
            try:
                res = C.run(registry[cid], quick=quick)
                bad = [e for e in res.evidence if not e.ok]
                out[cid] = {"verdict": CAUGHT if bad else MISSED, "seconds": time.perf_counter() - t0,
                            "failing": [("control not violated: " if e.negative_control else "") + e.setting
                                        for e in bad[:3]], "failing_count": len(bad),
                            "records": len(res.evidence)}
            except Exception as exc:  # a crash under a fault is noticed too, but reported as such
                out[cid] = {"verdict": ERRORED, "seconds": time.perf_counter() - t0,
                            "failing": [f"{type(exc).__name__}: {exc}"[:300]], "failing_count": 0, "records": 0,
                            "traceback": traceback.format_exc()[-2000:]}
    return out


def run_matrix(claim_ids: Sequence[str], quick: bool, progress: Callable[[str], None] = print,
               timeout: float = 1800.0) -> dict:
    """Run every fault against the claims (of ``claim_ids``) that name it, one subprocess per fault.

    Returns ``{'faults': {name: {description, target, kind, claims: {cid: cell}}}, 'unnamed': [claims that
    name no fault], 'seconds': ...}``.
    """
    start = time.perf_counter()
    selected = set(claim_ids)
    result = {"faults": {}, "quick": bool(quick)}
    for f in FAULTS.values():
        ids = [c for c in f.claims if c in selected]
        if not ids:
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "cells.json")
            cmd = [sys.executable, "-m", "proofs_check.faults", "--child", f.name, "--claims", ",".join(ids),
                   "--json", path] + (["--quick"] if quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0 and os.path.exists(path):
                with open(path) as fh:
                    cells = json.load(fh)
            else:
                cells = {c: {"verdict": ERRORED, "seconds": 0.0, "failing": [proc.stderr[-500:]], "failing_count": 0,
                             "records": 0} for c in ids}
        result["faults"][f.name] = {"description": f.description, "target": f.target, "kind": f.kind,
                                    "claims": cells, "seconds": time.perf_counter() - t0}
        cells_txt = "  ".join(f"{c}:{'caught' if v['verdict'] != MISSED else 'MISSED'}" for c, v in cells.items())
        progress(f"{f.name:<26} {time.perf_counter() - t0:6.1f} s  {cells_txt}")
    named = {c for f in FAULTS.values() for c in f.claims}
    result["unnamed"] = [c for c in claim_ids if c not in named]
    result["seconds"] = time.perf_counter() - start
    return result


def matrix_ok(result: dict) -> bool:
    """Every cell caught and every selected claim names at least one fault."""
    return not result["unnamed"] and all(cell["verdict"] != MISSED for f in result["faults"].values()
                                         for cell in f["claims"].values())


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="proofs_check.faults", description="run claims under one fault (internal)")
    p.add_argument("--child", required=True)
    p.add_argument("--claims", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    cells = _child(a.child, a.claims.split(","), a.quick)
    with open(a.json, "w") as fh:
        json.dump(cells, fh)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
