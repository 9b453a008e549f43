"""Checks of the training dynamics: Lemma 2.4 along trajectories and its consequences (C4-C8, C13, I3).

Every check runs the optimizer users train with (:func:`rate_tuning.optim.two_rate_sgd`) through
:func:`proofs_check.trajectories.run` and compares what it recorded with the paper's identities. Checks run
in float64 (:func:`proofs_check.numerics.x64` at their entry); the float32 records run with x64 off, as
training does. Every tolerance is derived next to its check and in ``docs/derivations.md``, from the unit
round-off ``u = eps / 2`` and ``gamma_n = n u / (1 - n u)``, the bound on the relative error of a sum of
``n`` non-negative terms (Higham, §3.1; :mod:`proofs_check.numerics`).

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from proofs_check import curvature, problems
from proofs_check import trajectories as traj
from proofs_check.claims import claim
from proofs_check.curves import curve, magnitude
from proofs_check.evidence import Evidence
from proofs_check.numerics import fan_in_normal, gamma, numpy_init, tol_norm_identity, unit_roundoff, x64
from rate_tuning import groups as G
from rate_tuning import metrics as M
from rate_tuning import optim

# -------------------------------------------------------------------------------------------------------
# tolerances, helpers
# -------------------------------------------------------------------------------------------------------


def tol_gradient_rescaled(n: int, dtype) -> float:
    """Extra tolerance when the intrinsic gradient is evaluated at ``V_t`` instead of ``r_t grad L(w_t)`` (C6).

    Derivation: the two computed gradients each carry a relative error ``<= gamma_n`` (the same dot-product
    bound) and the squared norm of ``n`` terms another ``gamma_n``: ``a^2`` is known to ``3 gamma_n``; it
    enters the residual with weight ``rho^2 a^2 / (1 + rho^2 a^2) <= 1``; plus ``2u`` for the divisions.
    """
    return 3.0 * gamma(n, dtype) + 2.0 * unit_roundoff(dtype)


def _group_sizes(params, labels) -> dict[str, int]:
    """Number of scalars summed in each SI group's squared norm."""
    sizes: dict[str, int] = {}
    for _, leaf, label in G.flatten_labelled(params, labels):
        if label.kind == G.SI:
            n = int(np.prod(np.shape(leaf)[:-1])) if label.per_channel else int(np.size(leaf))
            sizes[label.group] = sizes.get(label.group, 0) + n
    return sizes


def _worst_ratio(values: dict[str, np.ndarray], tols: dict[str, float], sign: int = 0):
    """``(value, tol, group, step)`` at the group/step with the worst ``value / tol``.

    ``sign=0``: worst ``|value|``; ``+1``: most positive value; ``-1``: most negative value.
    """
    best = None
    for g, v in values.items():
        v = np.asarray(v, np.float64).reshape(len(v), -1).max(axis=1) if sign > 0 else \
            np.asarray(v, np.float64).reshape(len(v), -1).min(axis=1) if sign < 0 else \
            np.abs(np.asarray(v, np.float64)).reshape(len(v), -1).max(axis=1)
        score = (sign or 1) * v / tols[g]
        t = int(np.nanargmax(np.where(np.isnan(score), np.inf, score)))
        cand = (float(v[t]), tols[g], g, t, float(np.where(np.isnan(score[t]), np.inf, score[t])))
        if best is None or cand[4] > best[4]:
            best = cand
    return best[:4]


# -------------------------------------------------------------------------------------------------------
# the runs (cached: C4-C7 share trajectories)
# -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _problem(name: str) -> problems.Problem:
    return {
        "sphere": lambda: problems.sphere_function(dim=20, seed=0),
        "rayleigh": lambda: problems.rayleigh_quotient(dim=8, seed=0),
        "multi": lambda: problems.multi_group(),
        "bn_linear": lambda: problems.bn_linear_regression(),
        "bn_logistic": lambda: problems.bn_logistic_regression(),
        "epsilon_bn": lambda: problems.epsilon_bn(epsilon=1e-5),
    }[name]()


@functools.lru_cache(maxsize=None)
def _mlp(preset: str, dtype: str, n: int = 256, batch: int = 32, width: int = 16):
    """A small BN MLP (64 -> ``width`` -> 10, App. D head) on ``n`` digits images.

    Returns ``(loss, step_loss, init, labels, bn)`` with ``init(seed) -> params``: ``loss`` is the mean
    cross-entropy on the fixed ``n``-example batch, train-mode BN (batch statistics); ``step_loss(params, t)``
    the same on mini-batch
    ``t mod (n / batch)`` of a fixed permutation (SGD over mini-batches: gradient and update on the same
    batch). Params are drawn with numpy (kernels ``N(0, 1/fan_in)``, BN ``gamma = 1``, ``beta = 0``, the
    frozen classifier of ``fully_si`` with columns of norm ``classifier_norm``): compiling flax's init
    costs seconds.
    """
    from rate_tuning import data, models

    dt = jnp.dtype(dtype)
    ds = data.digits(seed=0, flatten=True)
    perm = np.random.default_rng(0).permutation(n)
    x = np.asarray(ds.x_train[:n], dtype=dt)[perm]
    y = np.asarray(ds.y_train[:n], dtype=np.int32)[perm]
    model = models.build("mlp", preset, widths=(width,), num_classes=10, param_dtype=dt)
    shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), jnp.asarray(x[:batch]))

    def init(seed: int):
        rng = np.random.default_rng(seed)

        def draw(path, leaf):
            name = G.path_str(path)
            if name.endswith("kernel"):
                frozen = preset == "fully_si" and name.startswith("params/classifier")
                return fan_in_normal(rng, leaf.shape, model.classifier_norm if frozen else None).astype(dt)
            return (np.ones if name.endswith(("scale", "var")) else np.zeros)(leaf.shape, dt)

        return jax.tree_util.tree_map_with_path(draw, shapes)

    stats = init(0)["batch_stats"]  # unused in train mode (batch statistics), needed by apply
    labels = model.labels("layer")
    xb, yb = x.reshape(n // batch, batch, -1), y.reshape(n // batch, batch)

    def loss(p):
        return models.batch_loss(model, p, stats, jnp.asarray(x), jnp.asarray(y))[0]

    def step_loss(p, t):
        i = jnp.mod(t, n // batch)
        return models.batch_loss(model, p, stats, jnp.asarray(xb)[i], jnp.asarray(yb)[i])[0]

    return loss, step_loss, (lambda seed: init(seed)["params"]), labels, models.PRESETS[preset].bn


# name -> (source, optimiser kwargs); source: a problem name or 'mlp:<preset>'
_LR = {"lr_w": 1.0, "lr_g": 0.1}
SETTINGS: dict[str, dict[str, Any]] = {
    # scale-invariant runs: GD (full loss), SGD with a constant and an inverse-sqrt schedule
    "sphere/gd": dict(source="sphere", mode="gd", scale=0.3, **_LR),
    "multi/gd": dict(source="multi", mode="gd", scale=0.5, **_LR),
    "bn_linear/gd": dict(source="bn_linear", mode="gd", scale=0.5, **_LR),
    "rayleigh/gd": dict(source="rayleigh", mode="gd", scale=0.3, **_LR),
    "multi/sgd-const": dict(source="multi", mode="sgd", scale=0.5, **_LR),
    "multi/sgd-isqrt": dict(source="multi", mode="sgd", schedule="inverse_sqrt", scale=0.5, **_LR),
    "bn_logistic/sgd-const": dict(source="bn_logistic", mode="sgd", scale=0.5, **_LR),
    "bn_logistic/sgd-isqrt": dict(source="bn_logistic", mode="sgd", schedule="inverse_sqrt", scale=0.5, **_LR),
    "mlp-paper/gd": dict(source="mlp:paper", mode="gd", **_LR),
    "mlp-fully_si/gd": dict(source="mlp:fully_si", mode="gd", **_LR),
    "mlp-paper/sgd-isqrt": dict(source="mlp:paper", mode="sgd", schedule="inverse_sqrt", **_LR),
    "mlp-fully_si/sgd-isqrt": dict(source="mlp:fully_si", mode="sgd", schedule="inverse_sqrt", **_LR),
    # negative controls: each breaks one hypothesis of Lemma 2.4
    "sphere/gd+weight_decay": dict(source="sphere", mode="gd", scale=3.0, lr_w=0.1, lr_g=0.1, weight_decay=0.05),
    "sphere/gd+momentum": dict(source="sphere", mode="gd", scale=0.3, momentum=0.9, **_LR),
    "sphere/gd+projected": dict(source="sphere", mode="gd", scale=0.3, project=True, **_LR),
    "epsilon_bn/gd": dict(source="epsilon_bn", mode="gd", scale=0.5, **_LR),
}


def _loss_and_params(spec: dict, dtype: str, seed: int) -> dict:
    """``{'loss', 'stochastic', 'step_loss', 'params', 'labels', 'bn'}`` of a setting's source."""
    src = spec["source"]
    if src.startswith("mlp:"):
        loss, step_loss, init, labels, bn = _mlp(src[4:], dtype)
        params = init(seed)
        return dict(loss=loss, stochastic=None, step_loss=step_loss, params=params, labels=labels, bn=bn)
    prob = _problem(src)
    params = numpy_init(prob, seed, spec.get("scale", 1.0), dtype)
    bn = "exact" if src.startswith("bn_") else "standard" if src == "epsilon_bn" else "none"
    return dict(loss=prob.loss, stochastic=prob.stochastic_loss, step_loss=None, params=params, labels=prob.labels,
                bn=bn)


@functools.lru_cache(maxsize=None)
def _tx(source: str, dtype: str, lr_w: float, lr_g: float, schedule: str, weight_decay: float,
        momentum: float | None, project: bool):
    """The optimizer (cached so that a second run of the same setting reuses the compiled scan)."""
    labels = _mlp(source[4:], dtype)[3] if source.startswith("mlp:") else _problem(source).labels
    sw, sg = optim.schedule(schedule, lr_w), optim.schedule(schedule, lr_g)
    tx = optim.two_rate_sgd(labels, sw, sg, weight_decay=weight_decay, momentum=momentum, project=project)
    return tx, sw, sg


@functools.lru_cache(maxsize=None)
def _trajectory(name: str, steps: int, seed: int = 0, dtype: str = "float64", snapshot_every: int = 1):
    """Run setting ``name`` (:data:`SETTINGS`); float32 runs with x64 off, as training does."""
    spec = SETTINGS[name]
    with x64(dtype == "float64"):
        src = _loss_and_params(spec, dtype, seed)
        tx, sw, sg = _tx(spec["source"], dtype, spec["lr_w"], spec["lr_g"], spec.get("schedule", "constant"),
                         spec.get("weight_decay", 0.0), spec.get("momentum"), spec.get("project", False))
        sgd = spec["mode"] == "sgd"
        stochastic = src["stochastic"] if sgd else None
        step_loss = src["step_loss"] if sgd and stochastic is None else None
        tr = traj.run(src["loss"], src["params"], src["labels"], tx, steps, stochastic=stochastic, step_loss=step_loss,
                      key=jax.random.key(1000 + seed) if stochastic else None, lr_w=sw, lr_g=sg,
                      snapshot_every=snapshot_every)
    return tr, src["labels"], src["bn"], src["params"]


def _setting_line(name: str, steps: int, seed: int, dtype: str) -> str:
    spec = SETTINGS[name]
    src = spec["source"]
    desc = src if src.startswith("mlp:") else _problem(src).name
    opt = f"{spec['mode'].upper()} lr_w={spec['lr_w']:g} lr_g={spec['lr_g']:g} {spec.get('schedule', 'constant')}"
    for k in ("weight_decay", "momentum", "project"):
        if spec.get(k):
            opt += f" {k}={spec[k]}"
    if "scale" in spec:
        opt += f" ||w0||={spec['scale']:g}"
    if spec["mode"] == "sgd":
        opt += " (cyclic mini-batches of 32 of 256 digits)" if src.startswith("mlp:") else " (a fresh sample per step)"
    if src.startswith("mlp:"):
        desc = f"BN MLP 64-16-10 ({src[4:]} preset, exact BN, train mode) on 256 digits"
    return f"{name}: {desc}, {opt}, {steps} steps, seed {seed}, {dtype}"


# -------------------------------------------------------------------------------------------------------
# C4: Lemma 2.4 (2)
# -------------------------------------------------------------------------------------------------------


def rate_closed_form(name: str, steps: int) -> np.ndarray:
    """``lr_w(t)`` of setting ``name`` at steps ``t = 0..T-1``, written here from the setting (the theory's
    schedule), never read from the optimizer's own schedule object: ``lr_w`` (constant) or
    ``lr_w / sqrt(t + 1)`` (the SGD theorem's schedule, PAPER §4.2), ``t = 0`` at the first step."""
    spec = SETTINGS[name]
    t = np.arange(steps, dtype=np.float64)
    if spec.get("schedule", "constant") == "inverse_sqrt":
        return spec["lr_w"] / np.sqrt(t + 1.0)
    return np.full(steps, float(spec["lr_w"]))


def norm_residuals(tr: traj.Trajectory, lr_t: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``(||w_{t+1}||^2 - ||w_t||^2 - lr_t^2 ||g_t||^2) / ||w_{t+1}||^2`` per group and step (float64), with the
    closed-form rates ``lr_t`` (:func:`rate_closed_form`; default the trajectory's recorded rates)."""
    out = {}
    lr_t = tr.lr_w if lr_t is None else lr_t
    for g in tr.groups:
        w0 = tr.w_sq[g].astype(np.float64)
        w1 = tr.w_sq_next[g].astype(np.float64)
        lr = np.asarray(lr_t, np.float64).reshape((-1,) + (1,) * (w0.ndim - 1))
        out[g] = (w1 - w0 - lr**2 * tr.grad_sq[g].astype(np.float64)) / w1
    return out


def _c4_record(name, steps, seed, dtype, control=None):
    tr, labels, bn, p0 = _trajectory(name, steps, seed, dtype)
    sizes = _group_sizes(p0, labels)
    # tolerance per group: tol_norm_identity(n_i) (see its docstring and docs/derivations.md, C4)
    tols = {g: tol_norm_identity(sizes[g], dtype) for g in tr.groups}
    res = norm_residuals(tr, rate_closed_form(name, steps))
    value, tol, group, step = _worst_ratio(res, tols)
    details = {"group": group, "step": step, "group_size": sizes[group],
               "tolerance_formula": "3 gamma_n + 6u (n = group size)",
               "max_residual_in_eps": float(max(np.abs(v).max() for v in res.values()) / np.finfo(dtype).eps),
               "final_sq_norms": {g: float(np.ravel(tr.w_sq_next[g])[-1]) for g in tr.groups}}
    if control:
        details["breaks"] = control
    if name == "multi/gd" or (control and dtype == "float64"):
        details["curves"] = {
            f"|residual| per step ({name}, {group})": curve(None, magnitude(res[group]), "step",
                                                            "|residual| / ||w_{t+1}||^2", logy=True),
        }
    return Evidence("C4", _setting_line(name, steps, seed, dtype), abs(value), 0.0, "==", tol, dtype, bn,
                    negative_control=bool(control), details=details)


def _c4_cumulative(name, steps, seed, dtype):
    """Cumulative form: ``||w_T||^2 - ||w_0||^2 - sum_t lr_t^2 ||g_t||^2`` relative to ``||w_T||^2``."""
    tr, labels, bn, p0 = _trajectory(name, steps, seed, dtype)
    sizes = _group_sizes(p0, labels)
    worst = None
    for g in tr.groups:
        w0, wT = tr.w_sq[g][0].astype(np.float64), tr.w_sq_next[g][-1].astype(np.float64)
        lr = rate_closed_form(name, steps).reshape((-1,) + (1,) * (np.ndim(w0)))
        inc = np.sum(lr**2 * tr.grad_sq[g].astype(np.float64), axis=0)
        r = np.max(np.abs((wT - w0 - inc) / wT))
        # tolerance: the residual of step t is at most tol_step * ||w_{t+1}||^2, so the sum is at most
        # tol_step * sum_t ||w_{t+1}||^2 / ||w_T||^2 (<= T tol_step, norms being non-decreasing); the float64
        # sum of the T recorded terms adds gamma_T(float64)
        weight = np.max(np.sum(tr.w_sq_next[g].astype(np.float64), axis=0) / wT)
        tol = weight * tol_norm_identity(sizes[g], dtype) + gamma(steps, "float64")
        if worst is None or r / tol > worst[0] / worst[1]:
            worst = (r, tol, g)
    details = {"group": worst[2], "tolerance_formula": "(3 gamma_n + 6u) sum_t ||w_{t+1}||^2/||w_T||^2 + gamma_T"}
    return Evidence("C4", _setting_line(name, steps, seed, dtype) + " (cumulative over all steps)", worst[0], 0.0,
                    "==", worst[1], dtype, bn, details=details)


C4_CONTROLS = {
    "sphere/gd+weight_decay": "no weight decay (coupled L2 shrinks w by (1 - lr lambda) each step)",
    "sphere/gd+momentum": "plain (S)GD (heavy-ball momentum 0.9 adds beta * previous step, not orthogonal to w)",
    "sphere/gd+projected": "no projection (the projected baseline rescales w back to its old norm)",
    "epsilon_bn/gd": "scale invariance (standard BN sqrt(sigma^2 + 1e-5): gradient not orthogonal to w)",
}


@claim(
    "C4",
    paper_ref="Lemma 2.4 (2) [Q]",
    statement="||w_{t+1}||^2 = ||w_t||^2 + lr_{w,t}^2 ||grad_w F_{z_t}(theta_t)||^2 for every SI group and step "
              "(GD and SGD)",
    hypotheses="w scale-invariant (exact train-mode BN or a synthetic SI loss); plain two-rate (S)GD: no weight decay, "
               "no momentum, no projection; gradient and update on the same sample",
    negative_controls=tuple(C4_CONTROLS.values()),
    quick={"steps": 300, "seeds": (0,),
           "settings": ("sphere/gd", "multi/gd", "bn_logistic/sgd-const", "mlp-paper/gd", "mlp-fully_si/sgd-isqrt"),
           "float32": ("sphere/gd",)},
    full={"steps": 2000, "seeds": (0, 1, 2),
          "settings": ("sphere/gd", "multi/gd", "bn_linear/gd", "multi/sgd-const", "multi/sgd-isqrt",
                       "bn_logistic/sgd-const", "bn_logistic/sgd-isqrt", "mlp-paper/gd", "mlp-fully_si/gd",
                       "mlp-paper/sgd-isqrt", "mlp-fully_si/sgd-isqrt"),
          "float32": ("sphere/gd", "multi/gd", "multi/sgd-isqrt", "mlp-paper/gd", "mlp-paper/sgd-isqrt")},
)
def check_c4(settings: dict) -> list[Evidence]:
    """Per-step residual of Lemma 2.4 (2), relative to ``||w_{t+1}||^2``, max over steps and groups.

    Tolerance ``3 gamma_n + 6u`` per group of ``n`` scalars (:func:`tol_norm_identity`); the float32 runs use
    the float32 ``u``. The cumulative residual over ``T`` steps gets ``T`` times the per-step tolerance.
    """
    steps = settings["steps"]
    out = []
    with x64():
        for seed in settings["seeds"]:
            for name in settings["settings"]:
                out.append(_c4_record(name, steps, seed, "float64"))
        for name in settings["float32"]:
            out.append(_c4_record(name, steps, 0, "float32"))
            out.append(_c4_cumulative(name, steps, 0, "float32"))
        for name, breaks in C4_CONTROLS.items():
            out.append(_c4_record(name, steps, 0, "float64", control=breaks))
    return out


# -------------------------------------------------------------------------------------------------------
# C5: monotone norms and effective learning rate
# -------------------------------------------------------------------------------------------------------


def _c5_records(name, steps, seed, dtype, control=None):
    tr, labels, bn, p0 = _trajectory(name, steps, seed, dtype)
    sizes = _group_sizes(p0, labels)
    # relative change of ||w||^2 per step: (||w_{t+1}||^2 - ||w_t||^2) / ||w_{t+1}||^2 = rho^2 a^2/(1+rho^2 a^2) >= 0;
    # its computed value is off by at most the C4 tolerance 3 gamma_n + 6u (same three norms, same update).
    tols = {g: tol_norm_identity(sizes[g], dtype) for g in tr.groups}
    dnorm = {}
    for g in tr.groups:
        w0, w1 = tr.w_sq[g].astype(np.float64), tr.w_sq_next[g].astype(np.float64)
        dnorm[g] = (w1 - w0) / w1
    v, tol, group, step = _worst_ratio(dnorm, tols, sign=-1)
    setting = _setting_line(name, steps, seed, dtype)
    details = {"group": group, "step": step, "tolerance_formula": "3 gamma_n + 6u"}
    if control:
        details["breaks"] = control
    if not control and name in ("multi/gd", "bn_logistic/sgd-const"):
        details["curves"] = {f"||w_t||^2 ({name}, {g})": curve(None, tr.w_sq[g], "step", "||w_t||^2", logy=True)
                             for g in tr.groups}
    recs = [Evidence("C5", setting + ": min relative change of ||w||^2 per step", v, 0.0, ">=", tol, dtype, bn,
                     negative_control=bool(control), details=details)]
    if control:
        return recs
    # effective lr e_t = lr / ||w_t||^2 (constant lr): (e_{t+1} - e_t) / e_t = ||w_t||^2/||w_{t+1}||^2 - 1 <= 0;
    # the recorded e_t carry one more rounding (the division) each: tolerance 3 gamma_n + 6u + 2u.
    tols_e = {g: tol_norm_identity(sizes[g], dtype) + 2 * unit_roundoff(dtype) for g in tr.groups}
    de = {}
    for g in tr.groups:
        e = tr.eff_lr[g].astype(np.float64)
        de[g] = (e[1:] - e[:-1]) / e[:-1]
    v, tol, group, step = _worst_ratio(de, tols_e, sign=+1)
    details = {"group": group, "step": step, "tolerance_formula": "3 gamma_n + 8u"}
    if name in ("multi/gd", "bn_logistic/sgd-const"):
        details["curves"] = {f"effective lr ({name}, {g})": curve(None, tr.eff_lr[g], "step",
                                                                  "lr_w / ||w_t||^2", logy=True)
                             for g in tr.groups}
    recs.append(Evidence("C5", setting + ": max relative change of lr_w/||w||^2 per step", v, 0.0, "<=", tol, dtype,
                         bn, details=details))
    # independence: the recorded effective rate (rate_tuning.record -> metrics.effective_lr) against
    # lr_w(t) / ||w_t||^2 computed here from the raw parameters and the closed-form rate. Both are one sum of n
    # squares (gamma_n each) and one division (u each), in the run's dtype: 2 gamma_n + 2u relative.
    raw = raw_group_sq_norms(tr.snapshots, labels)
    lr_t = rate_closed_form(name, steps)
    worst, where = 0.0, None
    for g in tr.groups:
        mine = lr_t.reshape((-1,) + (1,) * (raw[g].ndim - 1)) / raw[g]
        rel = float(np.max(np.abs(tr.eff_lr[g].astype(np.float64) - mine) / mine))
        tol_g = 2 * gamma(sizes[g], dtype) + 2 * unit_roundoff(dtype)
        if where is None or rel / tol_g > worst:
            worst, where = rel / tol_g, (g, rel, tol_g)
    recs.append(Evidence("C5", setting + ": recorded effective rate vs lr_w(t)/||w_t||^2 from the raw parameters "
                                         "(worst relative difference)", where[1], 0.0, "==", where[2],
                         dtype, bn, details={"group": where[0], "tolerance_formula": "2 gamma_n + 2u (relative)"}))
    return recs


def raw_group_sq_norms(snapshots, labels) -> dict[str, np.ndarray]:
    """``||w_t^(i)||^2`` per SI group from stacked parameter snapshots (leading axis ``t``), in numpy float64,
    without the library's reductions (per-channel groups: one column per channel)."""
    out: dict[str, np.ndarray] = {}
    for _, leaf, label in G.flatten_labelled(snapshots, labels):
        if label.kind != G.SI:
            continue
        x = np.asarray(leaf, np.float64)
        axes = tuple(range(1, x.ndim - 1)) if label.per_channel else tuple(range(1, x.ndim))
        v = np.sum(x**2, axis=axes)
        out[label.group] = out.get(label.group, 0.0) + v
    return out


@claim(
    "C5",
    paper_ref="consequence of Lemma 2.4 [D]",
    statement="||w_t|| is non-decreasing and the effective lr lr_w/||w_t||^2 non-increasing (GD; SGD with constant lr)",
    hypotheses="as Lemma 2.4 (C4), with a constant lr_w",
    negative_controls=("no weight decay: coupled L2 (lambda = 0.05) makes ||w|| shrink while the gradient is small",),
    quick={"steps": 300, "seeds": (0,), "settings": ("multi/gd", "sphere/gd", "bn_logistic/sgd-const", "mlp-paper/gd"),
           "float32": ("sphere/gd",)},
    full={"steps": 2000, "seeds": (0, 1, 2), "settings": ("multi/gd", "sphere/gd", "bn_linear/gd", "multi/sgd-const",
                                                          "bn_logistic/sgd-const", "mlp-paper/gd", "mlp-fully_si/gd"),
          "float32": ("sphere/gd", "multi/gd", "mlp-paper/gd")},
)
def check_c5(settings: dict) -> list[Evidence]:
    """Most negative per-step relative change of ``||w||^2`` (bound 0, ``>=``) and most positive change of the
    effective lr (bound 0, ``<=``); float32 rounding dips are covered by the float32 tolerance."""
    steps = settings["steps"]
    out = []
    with x64():
        for seed in settings["seeds"]:
            for name in settings["settings"]:
                out += _c5_records(name, steps, seed, "float64")
        for name in settings["float32"]:
            out += _c5_records(name, steps, 0, "float32")
        out += _c5_records("sphere/gd+weight_decay", steps, 0, "float64",
                           control="no weight decay (coupled L2 0.05 shrinks ||w||)")
    return out


# -------------------------------------------------------------------------------------------------------
# C6, C7: the WNGrad recursion and the retracted sphere step, from the gradient at V_t
# -------------------------------------------------------------------------------------------------------

_SPHERE_FNS: dict = {}


def _sphere_step_fn(loss: Callable, stochastic: Callable | None, labels):
    """Jitted, vmapped over steps: ``a_i^2 = ||grad_{w_i} F(V_t; g_t)||^2`` at the normalised point and the
    distance between the actual ``w_{t+1}/||w_{t+1}||`` and the retracted step
    ``(V_t - rho grad F(V_t)) / sqrt(1 + rho^2 a^2)``, ``rho = lr_t / ||w_t||^2``, per SI group."""
    cache_key = (id(loss), id(stochastic), id(labels))
    if cache_key in _SPHERE_FNS:
        return _SPHERE_FNS[cache_key][0]

    def one(p, p_next, lr, key_data):
        V = M.normalize(p, labels)
        f = loss if stochastic is None else (lambda q: stochastic(q, jax.random.wrap_key_data(key_data)))
        gV = jax.grad(f)(V)
        a_sq = G.group_sq_norms(gV, labels)
        rho = {g: lr / v for g, v in G.group_sq_norms(p, labels).items()}
        den = {g: 1.0 / jnp.sqrt(1.0 + rho[g] ** 2 * a_sq[g]) for g in rho}
        step = G.scale_groups(gV, labels, {g: -rho[g] for g in rho})
        pred = G.scale_groups(jax.tree_util.tree_map(jnp.add, V, step), labels, den)
        diff = jax.tree_util.tree_map(jnp.subtract, pred, M.normalize(p_next, labels))
        return a_sq, {g: jnp.sqrt(v) for g, v in G.group_sq_norms(diff, labels).items()}

    fn = jax.jit(jax.vmap(one))
    _SPHERE_FNS[cache_key] = (fn, loss, stochastic, labels)  # keep the objects alive: ids stay unique
    return fn


@functools.lru_cache(maxsize=None)
def _sphere_quantities(name: str, steps: int, seed: int):
    """``(tr, labels, bn, sizes, a_sq, direction_error)`` for a float64 setting (arrays over steps)."""
    tr, labels, bn, p0 = _trajectory(name, steps, seed, "float64")
    spec = SETTINGS[name]
    src = _loss_and_params(spec, "float64", seed)
    loss, stochastic = src["loss"], src["stochastic"]
    sgd = spec["mode"] == "sgd"
    if sgd and stochastic is None:
        raise ValueError(f"{name}: C6/C7 need a stochastic_loss(params, key) for SGD settings")
    fn = _sphere_step_fn(loss, stochastic if sgd else None, labels)
    nxt = jax.tree_util.tree_map(lambda s, f: np.concatenate([s[1:], f[None]], axis=0), tr.snapshots, tr.final_params)
    keys = tr.step_keys if sgd else np.zeros((steps, 2), np.uint32)
    a_sq, err = jax.device_get(fn(tr.snapshots, nxt, rate_closed_form(name, steps), keys))
    return tr, labels, bn, _group_sizes(p0, labels), a_sq, err


def wngrad_residuals(tr: traj.Trajectory, a_sq: dict, lr_t: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``(b_{t+1} - b_t - a_t^2 / b_t) / b_{t+1}`` with ``b = ||w||^2 / lr_w`` (constant lr; ``lr_t``: the
    closed-form rates, default the recorded ones)."""
    out = {}
    for g in tr.groups:
        lr = np.asarray(tr.lr_w if lr_t is None else lr_t, np.float64)
        b0, b1 = tr.w_sq[g] / lr, tr.w_sq_next[g] / lr
        out[g] = (b1 - b0 - np.asarray(a_sq[g], np.float64) / b0) / b1
    return out


C6_CONTROLS = {
    "sphere/gd+momentum": "plain GD (heavy-ball momentum 0.9)",
    "sphere/gd+weight_decay": "no weight decay (coupled L2 0.05)",
}


@claim(
    "C6",
    paper_ref="Sec. 2 / intrinsic-problem discussion (WNGrad reformulation) [D]",
    statement="b_{t+1} = b_t + a_t^2 / b_t with b_t = ||w_t||^2 / lr_w and a_t = ||grad L(w_t / ||w_t||)||",
    hypotheses="as Lemma 2.4 (C4), constant lr_w; a_t evaluated at the normalised point "
               "(uses grad L(cw) = grad L(w)/c)",
    negative_controls=tuple(C6_CONTROLS.values()),
    quick={"steps": 300, "seeds": (0,), "settings": ("multi/gd", "sphere/gd", "bn_logistic/sgd-const")},
    full={"steps": 2000, "seeds": (0, 1, 2), "settings": ("multi/gd", "sphere/gd", "bn_linear/gd", "multi/sgd-const",
                                                          "bn_logistic/sgd-const")},
)
def check_c6(settings: dict) -> list[Evidence]:
    """Residual of the WNGrad recursion relative to ``b_{t+1}``, max over steps and groups; ``a_t`` is computed
    independently, by differentiating the loss at ``V_t`` (SGD: with the step's own sample)."""
    steps = settings["steps"]
    out = []
    with x64():
        runs = [(n, s, None) for s in settings["seeds"] for n in settings["settings"]] + \
               [(n, 0, b) for n, b in C6_CONTROLS.items()]
        for name, seed, control in runs:
            tr, labels, bn, sizes, a_sq, _ = _sphere_quantities(name, steps, seed)
            # tolerance: C4's 3 gamma_n + 6u (the norm identity, divided by lr) plus 3 gamma_n + 2u for a_t^2
            # computed at V_t instead of through ||w_t||^2 ||grad L(w_t)||^2 (tol_gradient_rescaled).
            tols = {g: tol_norm_identity(sizes[g], "float64") + tol_gradient_rescaled(sizes[g], "float64")
                    for g in tr.groups}
            res = wngrad_residuals(tr, a_sq, rate_closed_form(name, steps))
            v, tol, group, step = _worst_ratio(res, tols)
            details = {"group": group, "step": step, "tolerance_formula": "6 gamma_n + 8u"}
            if control:
                details["breaks"] = control
            if name in ("multi/gd",) or control:
                g = group
                details["curves"] = {
                    f"WNGrad b_t ({name}, {g})": curve(None, tr.w_sq[g] / tr.lr_w, "step", "b_t = ||w_t||^2 / lr_w",
                                                       logy=True),
                    f"|WNGrad residual| ({name}, {g})": curve(None, magnitude(res[g]), "step",
                                                              "|b_{t+1} - b_t - a_t^2/b_t| / b_{t+1}", logy=True),
                }
            out.append(Evidence("C6", _setting_line(name, steps, seed, "float64"), abs(v), 0.0, "==", tol, "float64",
                                bn, negative_control=bool(control), details=details))
    return out


C7_CONTROLS = {
    "sphere/gd+momentum": "plain GD (heavy-ball momentum 0.9)",
    "sphere/gd+weight_decay": "no weight decay (coupled L2 0.05)",
}


@claim(
    "C7",
    paper_ref="Sec. 2 / intrinsic-problem discussion [D]",
    statement="w_{t+1}/||w_{t+1}|| = (V_t - rho_t grad L(V_t)) / sqrt(1 + rho_t^2 a_t^2), rho_t = lr_w/||w_t||^2, "
              "a_t = ||grad L(V_t)||: a retracted gradient step on the sphere",
    hypotheses="as Lemma 2.4 (C4)",
    negative_controls=tuple(C7_CONTROLS.values()),
    quick={"steps": 300, "seeds": (0,), "settings": ("multi/gd", "sphere/gd", "bn_logistic/sgd-const")},
    full={"steps": 2000, "seeds": (0, 1, 2), "settings": ("multi/gd", "sphere/gd", "bn_linear/gd", "multi/sgd-const",
                                                          "bn_logistic/sgd-const")},
)
def check_c7(settings: dict) -> list[Evidence]:
    """``max_t || w_{t+1}/||w_{t+1}|| - retracted step ||`` per SI group (unit vectors: absolute = relative).

    Tolerance ``4 gamma_n + 8u``: two normalisations (``gamma_n + 2u`` each: a norm of ``n`` terms, a square
    root and a division), the gradient at ``V_t`` with relative error ``gamma_n`` entering through
    ``rho a / sqrt(1 + rho^2 a^2) <= 1``, the update's own rounding ``2u``, and ``gamma_n`` for the
    normaliser ``sqrt(1 + rho^2 a^2)``.
    """
    steps = settings["steps"]
    out = []
    with x64():
        runs = [(n, s, None) for s in settings["seeds"] for n in settings["settings"]] + \
               [(n, 0, b) for n, b in C7_CONTROLS.items()]
        for name, seed, control in runs:
            tr, labels, bn, sizes, _, err = _sphere_quantities(name, steps, seed)
            tols = {g: 4 * gamma(sizes[g], "float64") + 8 * unit_roundoff("float64") for g in tr.groups}
            v, tol, group, step = _worst_ratio(err, tols)
            details = {"group": group, "step": step, "tolerance_formula": "4 gamma_n + 8u"}
            if control:
                details["breaks"] = control
            if name == "multi/gd" or control:
                details["curves"] = {f"direction error ({name}, {group})":
                                     curve(None, magnitude(err[group]), "step",
                                           "||w_{t+1}/||w_{t+1}|| - retraction||", logy=True)}
            out.append(Evidence("C7", _setting_line(name, steps, seed, "float64"), v, 0.0, "==", tol, "float64", bn,
                                negative_control=bool(control), details=details))
            if not control:
                out.append(_angle_record(name, steps, seed, tr, labels, sizes, bn))
    return out


def _angle_record(name, steps, seed, tr, labels, sizes, bn) -> Evidence:
    """The recorded angular update (:func:`rate_tuning.metrics.angular_update` via the record) against the
    angle between ``w_t`` and ``w_{t+1}`` computed here from the raw parameters, ``2 atan2(||u - v||, ||u + v||)``
    for the unit vectors ``u, v`` (accurate for tiny angles).

    Tolerance (absolute, radians): each computation normalises two vectors and takes the norm of a difference
    of ``n`` terms (``gamma_n + 2u`` per unit vector, ``gamma_n`` for the norm), and the atan2 adds ``2u`` of the
    angle: ``2 (3 gamma_n + 4u)`` for the two computations plus ``4u`` times the angle.
    """
    nxt = jax.tree_util.tree_map(lambda s, f: np.concatenate([s[1:], f[None]], axis=0), tr.snapshots,
                                 tr.final_params)
    worst, where = 0.0, None
    for g in tr.groups:
        a = _raw_group_vectors(tr.snapshots, labels, g)
        b = _raw_group_vectors(nxt, labels, g)
        u = a / np.linalg.norm(a, axis=1, keepdims=True)
        v = b / np.linalg.norm(b, axis=1, keepdims=True)
        mine = 2 * np.arctan2(np.linalg.norm(u - v, axis=1), np.linalg.norm(u + v, axis=1))
        n = sizes[g]
        tol = 2 * (3 * gamma(n, "float64") + 4 * unit_roundoff("float64")) + 4 * unit_roundoff("float64") * mine
        rec = np.asarray(tr.angle[g], np.float64).reshape(len(mine), -1)[:, 0]
        r = np.abs(rec - mine) / tol
        j = int(np.argmax(r))
        if where is None or r[j] > worst:
            worst, where = float(r[j]), (g, j, float(rec[j]), float(mine[j]), float(tol[j]))
    g, j, rec, mine, tol_j = where
    return Evidence("C7", _setting_line(name, steps, seed, "float64") + ": recorded angular update vs the angle "
                                                                        "from the raw parameters (worst step)",
                    abs(rec - mine), 0.0, "==", tol_j, "float64", bn,
                    details={"group": g, "step": j, "recorded": rec, "raw": mine,
                             "tolerance_formula": "2 (3 gamma_n + 4u) + 4u angle (absolute, radians)"})


def _raw_group_vectors(snapshots, labels, group: str) -> np.ndarray:
    """The leaves of SI group ``group`` flattened and concatenated per step (leading axis ``t``), float64."""
    parts = [np.asarray(leaf, np.float64).reshape(np.shape(leaf)[0], -1)
             for _, leaf, label in G.flatten_labelled(snapshots, labels)
             if label.kind == G.SI and label.group == group]
    return np.concatenate(parts, axis=1)


# -------------------------------------------------------------------------------------------------------
# C8: scale equivalence (lr_w, w0) -> (c^2 lr_w, c w0)
# -------------------------------------------------------------------------------------------------------


def _scaled_run(name: str, steps: int, c: float, lr_power: int):
    """Setting ``name`` with every SI group of ``w0`` times ``c`` and ``lr_w`` times ``c**lr_power``."""
    spec = SETTINGS[name]
    src = _loss_and_params(spec, "float64", 0)
    p0, labels, loss = src["params"], src["labels"], src["loss"]
    groups = tuple(G.si_groups(p0, labels))
    params = G.scale_groups(p0, labels, {g: c for g in groups})
    tx, sw, sg = _tx(spec["source"], "float64", spec["lr_w"] * c**lr_power, spec["lr_g"], "constant", 0.0, None, False)
    return traj.run(loss, params, labels, tx, steps, lr_w=sw, lr_g=sg, snapshot_every=1, record="path")


def _path_distance(tr_a: traj.Trajectory, tr_b: traj.Trajectory, labels) -> dict[str, np.ndarray]:
    """Per step: max over SI groups of ``||w_a/|w_a| - w_b/|w_b|||``, ``||g_a - g_b|| / max(||g_a||, 1)`` and
    ``|L_a - L_b| / max(|L_a|, 1)`` (snapshots ``t = 0..T-1``)."""
    def normalised(tree):
        sq = {}
        label_leaves = jax.tree_util.tree_leaves(labels, is_leaf=G.is_label)
        for leaf, label in zip(jax.tree_util.tree_leaves(tree), label_leaves):
            if label.kind == G.SI:
                axes = tuple(range(1, leaf.ndim))
                sq[label.group] = sq.get(label.group, 0.0) + np.sum(leaf**2, axis=axes)
        out = []
        for leaf, label in zip(jax.tree_util.tree_leaves(tree), label_leaves):
            out.append((leaf / np.sqrt(sq[label.group]).reshape((-1,) + (1,) * (leaf.ndim - 1)), label)
                       if label.kind == G.SI else (leaf, label))
        return out

    na, nb = normalised(tr_a.snapshots), normalised(tr_b.snapshots)
    d_dir: dict[str, np.ndarray] = {}
    g_diff = np.zeros(tr_a.steps)
    g_norm = np.zeros(tr_a.steps)
    for (a, label), (b, _) in zip(na, nb):
        axes = tuple(range(1, a.ndim))
        if label.kind == G.SI:
            d_dir[label.group] = d_dir.get(label.group, 0.0) + np.sum((a - b) ** 2, axis=axes)
        elif label.kind == G.VARIANT:
            g_diff = g_diff + np.sum((a - b) ** 2, axis=axes)
            g_norm = g_norm + np.sum(a**2, axis=axes)
    direction = np.max(np.sqrt(np.stack(list(d_dir.values()))), axis=0)
    variant = np.sqrt(g_diff) / np.maximum(np.sqrt(g_norm), 1.0)
    loss = np.abs(tr_a.loss - tr_b.loss) / np.maximum(np.abs(tr_a.loss), 1.0)
    return {"direction": direction, "variant": variant, "loss": loss}


@claim(
    "C8",
    paper_ref="Sec. 2 / intrinsic-problem discussion [D] (also Li et al. 2022, Lemma 2.4 [S])",
    statement="(lr_w, w_0) -> (c^2 lr_w, c w_0) leaves every direction w_t/||w_t||, every g_t and every loss unchanged",
    hypotheses="scale-invariant SI groups, plain two-rate GD, lr_g unchanged",
    negative_controls=("the scale-equivalence power: (lr_w, w_0) -> (c lr_w, c w_0) changes the effective lr by 1/c",),
    quick={"steps": 300, "name": "multi/gd", "cs": (0.1, 4.0), "control_c": 3.0},
    full={"steps": 500, "name": "multi/gd", "cs": (0.01, 0.1, 0.5, 4.0, 3.0, 30.0, 1000.0), "control_c": 3.0},
)
def check_c8(settings: dict) -> list[Evidence]:
    """Max over the first ``T`` steps of the distance between the two runs' directions (per SI group), of
    the relative distance of their ``g``, and of their relative loss difference.

    Tolerance (docs/derivations.md, C8): the two runs start ``<= 2u`` apart in direction (``c w_0`` is
    rounded) and each step adds at most the C7 local error ``4 gamma_n + 8u`` to each run; if the
    direction map is non-expansive over these steps the gap stays below ``2u + 2 T (4 gamma_n + 8u)``. The
    loss gets the same bound times the Lipschitz constant ``max_t a_t`` plus ``2 gamma_N`` for its
    evaluation. A power of two ``c`` scales exactly in floating point: the runs are then bitwise equal.
    """
    steps, name = settings["steps"], settings["name"]
    out = []
    with x64():
        base, labels, bn, p0 = _trajectory(name, steps, 0, "float64")
        sizes = _group_sizes(p0, labels)
        n, N = max(sizes.values()), sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(p0))
        u = unit_roundoff("float64")
        tol_dir = 2 * u + 2 * steps * (4 * gamma(n, "float64") + 8 * u)
        lip = float(np.sqrt(np.max(base.grad_sq_intrinsic)))
        tol = max(tol_dir, lip * tol_dir + 2 * gamma(N, "float64"))
        runs = [(c, 2, None) for c in settings["cs"]] + \
               [(settings["control_c"], 1, "the power 2 of c in c^2 lr_w (used c lr_w)")]
        for c, power, control in runs:
            other = _scaled_run(name, steps, c, power)
            d = _path_distance(base, other, labels)
            worst = np.maximum(np.maximum(d["direction"], d["variant"]), d["loss"])
            details = {"max_direction_distance": float(d["direction"].max()),
                       "max_g_relative_distance": float(d["variant"].max()),
                       "max_loss_relative_difference": float(d["loss"].max()), "c": c,
                       "exact_in_floating_point": bool(power == 2 and np.log2(c) == round(np.log2(c))),
                       "tolerance_formula": "2u + 2T(4 gamma_n + 8u), times max(1, max_t a_t) + 2 gamma_N for the loss"}
            if control:
                details["breaks"] = control
            if c == settings["cs"][0] or control:
                details["curves"] = {f"distance of the two runs (c={c:g}, lr power {power})":
                                     curve(None, magnitude(worst), "step", "max(direction, g, loss) distance",
                                           logy=True)}
            lr_desc = f"{c:g}^{power} lr_w"
            out.append(Evidence("C8", f"{name}: {_problem(SETTINGS[name]['source']).name}, (lr_w, w0) vs "
                                      f"({lr_desc}, {c:g} w0), first {steps} steps, float64",
                                float(worst.max()), 0.0, "==", tol, "float64", bn, negative_control=bool(control),
                                details=details))
    return out


# -------------------------------------------------------------------------------------------------------
# C13: limiting effective lr below 2 / lambda_max of the Riemannian Hessian
# -------------------------------------------------------------------------------------------------------

_HESS_FNS: dict = {}


def preconditioned_riemannian_hessian(loss: Callable, labels, params, rho: dict, lr_g: float) -> np.ndarray:
    """Dense ``D^1/2 P H(V) P D^1/2`` at the normalised point ``V`` of ``params`` (flattened, ``ravel_pytree``
    order), ``D = diag(rho_i I on SI group i, lr_g I on the scale-variant leaves)``.

    Built column by column from :func:`proofs_check.curvature.projected_hvp` (vmapped over the unit
    vectors): exact for the small problems used here, where it is cheaper to compile than Lanczos.
    With ``rho = {g: 1}`` and no variant leaves it is the Riemannian Hessian ``P H(V) P`` itself.
    """
    from jax.flatten_util import ravel_pytree

    cache_key = (id(loss), id(labels))
    if cache_key not in _HESS_FNS:
        label_leaves = jax.tree_util.tree_leaves(labels, is_leaf=G.is_label)

        def dense(p, rho, lr_g):
            V = M.normalize(p, labels)
            flat, unravel = ravel_pytree(V)

            def scale(v):
                v = G.scale_groups(v, labels, {g: jnp.sqrt(r) for g, r in rho.items()})
                leaves = [x * jnp.sqrt(lr_g) if lab.kind == G.VARIANT else x
                          for x, lab in zip(jax.tree_util.tree_leaves(v), label_leaves)]
                return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(v), leaves)

            def column(e):
                return ravel_pytree(scale(curvature.projected_hvp(loss, V, labels, scale(unravel(e)))))[0]

            return jax.vmap(column)(jnp.eye(flat.shape[0], dtype=flat.dtype))

        _HESS_FNS[cache_key] = (jax.jit(dense), loss, labels)
    H = np.asarray(_HESS_FNS[cache_key][0](params, {g: jnp.asarray(r) for g, r in rho.items()}, jnp.asarray(lr_g)))
    return 0.5 * (H + H.T)


def _top_eig(loss, labels, params, rho, lr_g):
    ev = np.linalg.eigvalsh(preconditioned_riemannian_hessian(loss, labels, params, rho, lr_g))
    return float(ev[-1]), float(ev[0])


def _run_to_convergence(name: str, chunk: int, max_chunks: int, target: float):
    """Continue setting ``name`` chunk by chunk (same compiled scan) until the intrinsic gradient norm^2
    falls below ``target`` or ``max_chunks`` chunks ran; returns the last chunk and the total step count."""
    tr, labels, bn, p0 = _trajectory(name, chunk, 0, "float64")
    spec = SETTINGS[name]
    loss = _loss_and_params(spec, "float64", 0)["loss"]
    tx, sw, sg = _tx(spec["source"], "float64", spec["lr_w"], spec["lr_g"], spec.get("schedule", "constant"),
                     spec.get("weight_decay", 0.0), spec.get("momentum"), spec.get("project", False))
    steps = chunk
    while steps < chunk * max_chunks and not tr.grad_sq_intrinsic[-1] <= target:
        tr = traj.run(loss, tr.final_params, labels, tx, chunk, lr_w=sw, lr_g=sg, snapshot_every=1,
                      opt_state=tr.final_opt_state)
        steps += chunk
    return tr, steps, labels, bn, loss


@claim(
    "C13",
    paper_ref="not in the paper: consequence of the auto-tuning [D]",
    statement="limiting effective lr lr_w/||w_inf||^2 <= 2 / lambda_max(P H P) at the normalised limit point "
              "(several groups: lambda_max(D^1/2 P H P D^1/2) <= 2, D = diag(rho_i I, lr_g I))",
    hypotheses="GD with constant lr_w, lr_g < 2/L_gg, run until the norm has converged",
    negative_controls=("auto-tuning: the projected optimizer keeps the effective lr fixed at lr_w/||w_0||^2, "
                       "above 2/lambda_max",),
    quick={"chunk": 300, "max_chunks": 20, "target": 1e-16, "settings": ("sphere/gd", "multi/gd", "rayleigh/gd")},
    full={"chunk": 300, "max_chunks": 100, "target": 1e-24, "settings": ("sphere/gd", "multi/gd", "rayleigh/gd",
                                                                         "bn_linear/gd")},
)
def check_c13(settings: dict) -> list[Evidence]:
    """``rho_T = lr_w / ||w_T||^2`` against ``2 / lambda_max(P H(V_T) P)`` after the norm converged (one SI group,
    no g); ``lambda_max(D^1/2 P H P D^1/2)`` against 2 otherwise.

    Tolerance: Lanczos run to the full dimension with full reorthogonalisation returns the top eigenvalue
    to ``gamma_n ||H||``; the run stops at ``V_T``, not at the limit, and ``rho`` only decreases (so
    ``rho_T >= rho_inf``: conservative) while ``lambda_max`` still drifts by at most what it moved over the
    last chunk; the tolerance is that drift plus ``gamma_n |lambda|``, converted to the measured quantity.
    """
    out = []
    with x64():
        runs = [(n, None) for n in settings["settings"]] + \
               [("sphere/gd+projected", "auto-tuning (projected: fixed effective lr lr_w/||w_0||^2 = 11.1)")]
        for name, control in runs:
            tr, steps, labels, bn, loss = _run_to_convergence(name, settings["chunk"], settings["max_chunks"],
                                                                    settings["target"])
            spec = SETTINGS[name]
            rho = {g: float(spec["lr_w"] / tr.w_sq_next[g][-1]) for g in tr.groups}
            has_g = tr.variant_grad_sq is not None and float(np.max(tr.variant_grad_sq)) > 0 or \
                any(lab.kind == G.VARIANT for lab in jax.tree_util.tree_leaves(labels, is_leaf=G.is_label))
            n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tr.final_params))
            u_rel = gamma(n, "float64")
            mid = tr.steps // 2
            last = jax.tree_util.tree_map(lambda s: s[mid], tr.snapshots)
            if len(rho) == 1 and not has_g:
                g = next(iter(rho))
                lam, lam_lo = _top_eig(loss, labels, tr.final_params, {g: 1.0}, 1.0)
                lam_prev = _top_eig(loss, labels, last, {g: 1.0}, 1.0)[0]
                drift = abs(lam - lam_prev) + u_rel * max(abs(lam), abs(lam_lo))
                measured, bound = rho[g], (2.0 / lam if lam > 0 else np.inf)
                tol = (2.0 / lam**2) * drift if lam > 0 else 0.0
                what = "lr_w/||w_T||^2 vs 2/lambda_max(P H(V_T) P)"
                extra = {"lambda_max": lam, "lambda_min": lam_lo}
            else:
                lam, lam_lo = _top_eig(loss, labels, tr.final_params, rho, spec["lr_g"])
                rho_prev = {g: float(spec["lr_w"] / tr.w_sq[g][mid]) for g in tr.groups}
                lam_prev = _top_eig(loss, labels, last, rho_prev, spec["lr_g"])[0]
                drift = abs(lam - lam_prev) + u_rel * max(abs(lam), abs(lam_lo))
                measured, bound, tol = lam, 2.0, drift
                what = "lambda_max(D^1/2 P H(V_T) P D^1/2) vs 2"
                extra = {"effective_lrs": rho}
            details = {"steps": steps, "final_intrinsic_grad_sq": float(tr.grad_sq_intrinsic[-1]),
                       "converged": bool(tr.grad_sq_intrinsic[-1] <= settings["target"]),
                       "lambda_drift_last_half_chunk": abs(lam - lam_prev), **extra,
                       "tolerance_formula": "(|lambda_T - lambda_{T-chunk/2}| + gamma_n |lambda|), converted"}
            if control:
                details["breaks"] = control
            if name == "sphere/gd" or control:
                g = tr.groups[0]
                details["curves"] = {f"effective lr, last chunk ({name})":
                                     curve(None, tr.eff_lr[g], "step in last chunk", "lr_w/||w_t||^2", logy=True)}
            out.append(Evidence("C13", _setting_line(name, steps, 0, "float64") + f": {what}", measured, bound, "<=",
                                tol, "float64", bn, negative_control=bool(control), details=details))
            if name == "rayleigh/gd":
                out += _c13_validation(name, steps, loss, labels, tr.final_params)
    return out


def _c13_validation(name: str, steps: int, loss, labels, params) -> list[Evidence]:
    """Two checks of the measuring instruments of C13 at ``V_T`` of the Rayleigh run (``d = 8``):

    * the Riemannian Hessian built from Hessian-vector products (:func:`proofs_check.curvature.projected_hvp`)
      against the closed form ``P H P``, ``H = 2 (A - L I) - 2 (u grad^T + grad u^T)`` at the unit ``u``
      (:func:`proofs_check.problems.rayleigh_quotient`), computed here in numpy: both are sums of at most
      ``n = 4 d`` products per entry, so their difference is within ``2 gamma_n ||A||`` entrywise (measured: the
      largest entry of the difference over ``2 gamma_n max|A|``, bound 1);
    * Lanczos (:func:`proofs_check.curvature.top_eigenvalue`, ``d`` steps: the whole Krylov space) against
      ``numpy.linalg.eigvalsh`` of the same matrix: full reorthogonalisation keeps the Ritz values of a
      ``d``-step run within ``gamma_{d^2} ||H||`` of the eigenvalues (backward stability of the Krylov
      projection); measured over that bound, bound 1.
    """
    prob = _problem("rayleigh")
    A = np.asarray(prob.constants["A"], np.float64)
    d = A.shape[0]
    w = np.asarray(params["w"], np.float64)
    u = w / np.linalg.norm(w)
    L = float(u @ A @ u)
    gr = 2.0 * (A @ u - L * u)
    H = 2.0 * (A - L * np.eye(d)) - 2.0 * (np.outer(u, gr) + np.outer(gr, u))
    P = np.eye(d) - np.outer(u, u)
    closed = P @ H @ P
    built = preconditioned_riemannian_hessian(loss, labels, params, {"w": 1.0}, 1.0)
    n = 4 * d
    setting = _setting_line(name, steps, 0, "float64")
    out = [Evidence("C13", setting + ": P H(V_T) P from Hessian-vector products vs the closed form (max |entry "
                                     "difference|)", float(np.max(np.abs(built - closed))), 0.0, "==",
                    2 * gamma(n, "float64") * float(np.max(np.abs(A))), "float64", "none",
                    details={"tolerance_formula": "2 gamma_{4d} max|A| entrywise"})]
    ev = np.linalg.eigvalsh(closed)
    top = float(curvature.top_eigenvalue(lambda v: jnp.asarray(closed) @ v, d, d, jax.random.key(0)))
    bound = gamma(d * d, "float64") * float(np.max(np.abs(ev)))
    out.append(Evidence("C13", setting + f": Lanczos top eigenvalue of P H(V_T) P ({d} steps) vs eigvalsh "
                                         "(|difference|)", abs(top - float(ev[-1])), 0.0, "==", bound,
                        "float64", "none",
                        details={"lanczos": top, "eigvalsh": float(ev[-1]), "spectrum": ev.tolist()}))
    return out


# -------------------------------------------------------------------------------------------------------
# I3: one-step Taylor bound with the smoothness constants
# -------------------------------------------------------------------------------------------------------


def _segment_sampler(paths: list, labels, p_random: float = 0.5):
    """``key -> params``: a point on a segment ``theta_t -> theta_{t+1}`` of one of ``paths`` (stacked params,
    ``T+1`` points each) with probability ``1 - p_random``; otherwise random SI directions with the ``g`` of
    such a segment point. Also returns ``is_random(key)`` to split the per-point results afterwards."""
    flat = [jax.tree_util.tree_leaves(p) for p in paths]
    stacked = [np.concatenate([f[i] for f in flat], axis=0) for i in range(len(flat[0]))]
    starts = np.concatenate([np.arange(len(f[0]) - 1) + off for f, off in
                             zip(flat, np.cumsum([0] + [len(f[0]) for f in flat[:-1]]))])
    treedef = jax.tree_util.tree_structure(paths[0])
    label_leaves = jax.tree_util.tree_leaves(labels, is_leaf=G.is_label)

    def parts(key):
        k_pick, k_t, k_s, k_dir = jax.random.split(key, 4)
        return jax.random.bernoulli(k_pick, p_random), k_t, k_s, k_dir

    def sampler(key):
        is_random, k_t, k_s, k_dir = parts(key)
        t = jnp.asarray(starts)[jax.random.randint(k_t, (), 0, len(starts))]
        s = jax.random.uniform(k_s, ())
        leaves = []
        for i, (leaf, lab) in enumerate(zip(stacked, label_leaves)):
            leaf = jnp.asarray(leaf)
            x = leaf[t] + s * (leaf[t + 1] - leaf[t])
            if lab.kind == G.SI:
                x = jnp.where(is_random, jax.random.normal(jax.random.fold_in(k_dir, i), x.shape, x.dtype), x)
            leaves.append(x)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return sampler, (lambda key: parts(key)[0])


def _i3_terms(tr: traj.Trajectory, lr_g: float, C, scale_ww: float = 1.0):
    """Per step ``(LHS, RHS, scale)`` of I3 with constants ``C`` (all times ``scale_ww``)."""
    names = list(C.groups)
    # rho_i = lr_w / ||w_i||^2 from the raw parameters (lr_w = 1 in I3's runs), not the library's record
    raw = raw_group_sq_norms(tr.snapshots, _problem("multi").labels)
    rho = np.stack([SETTINGS["multi/gd"]["lr_w"] / raw[g] for g in names], axis=1)             # (T, m)
    a = np.sqrt(np.stack([tr.grad_sq_intrinsic_groups[g] for g in names], axis=1))     # (T, m)
    b = np.sqrt(tr.grad_sq_intrinsic_groups[G.VARIANT])                                 # (T,)
    Lww, Lgw, Lgg = scale_ww * np.asarray(C.L_ww), scale_ww * np.asarray(C.L_gw), scale_ww * C.L_gg
    ra = rho * a
    first = np.sum(rho * a**2, axis=1) + lr_g * b**2
    second = 0.5 * (np.einsum("ti,ij,tj->t", ra, Lww, ra) + 2 * lr_g * b * (ra @ Lgw) + Lgg * lr_g**2 * b**2)
    L0 = tr.loss.astype(np.float64)
    L1 = np.append(tr.loss[1:], tr.final_loss).astype(np.float64)
    return L1 - L0, -first + second, np.abs(L0) + np.abs(L1) + first + second


def _i3_dense_validation(prob, labels, sampler, key, C, n_steps: int, points: int = 4) -> Evidence:
    """The Lanczos block norms of :func:`proofs_check.curvature.smoothness_constants` at its first ``points``
    sampled points against dense Hessians (``jax.hessian`` of the flattened loss, not the HVPs under test):
    ``||H_aa||_2`` (largest |eigenvalue|) and ``||H_ab||_2`` (largest singular value) by numpy.

    Tolerance: with ``n_steps`` at least every block's Krylov dimension, the Ritz values are exact up to
    ``gamma_{n^2} ||H||`` (backward stability of fully reorthogonalised Lanczos), and the dense Hessian's
    entries are within ``gamma_n`` of exact: ``2 gamma_{n^2} ||H||`` per block, reported as a ratio (bound 1).
    """
    from jax.flatten_util import ravel_pytree

    names, w_masks, g_mask = curvature.si_group_masks(jax.eval_shape(sampler, key), labels)
    masks = [np.asarray(ravel_pytree(m)[0]) > 0 for m in w_masks + [g_mask]]
    worst, where = 0.0, None
    point = jax.jit(lambda k: curvature.unit_normalize(sampler(k), labels))
    unravel = ravel_pytree(point(key))[1]
    hessian = jax.jit(jax.hessian(lambda x: prob.loss(unravel(x))))   # compiled once for every point
    for p in range(points):
        H = np.asarray(hessian(ravel_pytree(point(jax.random.fold_in(key, p)))[0]), np.float64)
        n = H.shape[0]
        tol = 2 * gamma(n * n, "float64") * float(np.linalg.norm(H, 2))
        m = len(names)
        for i in range(m):
            for j in range(i, m + 1):
                blk = H[np.ix_(masks[j], masks[i])]
                dense = float(np.max(np.abs(np.linalg.eigvalsh(blk)))) if i == j else float(np.linalg.norm(blk, 2))
                lz = float(C.per_point["L_ww"][p][i, j]) if j < m else float(C.per_point["L_gw"][p][i])
                r = abs(lz - dense) / tol
                if where is None or r > worst:
                    worst, where = r, (p, names[i], names[j] if j < m else "g", lz, dense, tol)
        blk = H[np.ix_(masks[m], masks[m])]
        dense = float(np.max(np.abs(np.linalg.eigvalsh(blk))))
        r = abs(float(C.per_point["L_gg"][p]) - dense) / tol
        if r > worst:
            worst, where = r, (p, "g", "g", float(C.per_point["L_gg"][p]), dense, tol)
    p, a, b, lz, dense, tol = where
    return Evidence("I3", f"multi/gd: {prob.name}: Lanczos block norms of smoothness_constants ({n_steps} steps) vs "
                          f"dense Hessians (jax.hessian) at {points} sampled unit points (worst block, |difference|)",
                    abs(lz - dense), 0.0, "==", tol, "float64", "none",
                    details={"point": p, "block": f"{a},{b}", "lanczos": lz, "dense": dense,
                             "tolerance_formula": "2 gamma_{n^2} ||H||"})


@claim(
    "I3",
    paper_ref="proof of the GD theorem, one-step descent inequality (PAPER §4.1, I3) [D]",
    statement="L_{t+1} <= L_t - sum_i rho_i a_i^2 - lr_g b^2 + 1/2 [sum_ij L^ww_ij rho_i rho_j a_i a_j "
              "+ 2 sum_i L^gw_i rho_i lr_g a_i b + L^gg lr_g^2 b^2]",
    hypotheses="SI groups (norms only grow along the orthogonal step, I2); Hessian-block bounds L^ww, L^gw, L^gg "
               "on the unit set, estimated by Lanczos at sampled points (a lower estimate of the sup)",
    negative_controls=("the smoothness constants: 1/10 of the estimated L^ww, L^gw, L^gg",),
    quick={"steps": 300, "scales": (0.1, 0.5, 2.0), "num_points": 96},
    full={"steps": 1000, "scales": (0.03, 0.1, 0.5, 2.0, 10.0), "num_points": 512},
)
def check_i3(settings: dict) -> list[Evidence]:
    """``max_t (LHS_t - RHS_t) / scale_t <= 0`` on the multi-group problem, for several initial effective lrs.

    ``lr_w`` enters the bound only through ``rho_i = lr_w/||w_i||^2``; the runs use ``lr_w = 1`` and
    ``||w_0|| in scales`` (``rho_0 = 1/scale^2``), i.e. the same dynamics as ``lr_w = 1/scale^2`` at
    ``||w_0|| = 1`` (C8). The constants are the max of two Lanczos estimates: at unit-normalised points of
    the trajectory segments ``theta_t -> theta_{t+1}`` (where the bound is used, by I2) and at random unit
    directions with the ``g`` of those segments (A1 bounds the blocks for every ``g``; for this problem
    ``L^ww`` grows with ``|g|``, so ``g`` is sampled where the run goes).

    Tolerance: ``LHS - RHS`` adds and subtracts recorded float64 quantities, each with relative error at
    most ``gamma_N`` (``N`` parameters): ``4 gamma_N`` times ``scale_t = |L_t| + |L_{t+1}| + first + second``.
    """
    steps = settings["steps"]
    name = "multi/gd"
    out = []
    with x64():
        spec = SETTINGS[name]
        prob = _problem(spec["source"])
        labels = prob.labels
        tx, sw, sg = _tx(spec["source"], "float64", spec["lr_w"], spec["lr_g"], "constant", 0.0, None, False)
        trs = []
        for scale in settings["scales"]:
            tr = traj.run(prob.loss, numpy_init(prob, 0, scale, "float64"), labels, tx, steps, lr_w=sw, lr_g=sg,
                          snapshot_every=1)
            trs.append((scale, tr))
        paths = [jax.tree_util.tree_map(lambda s, f: np.concatenate([s, f[None]], axis=0), tr.snapshots,
                                        tr.final_params) for _, tr in trs]
        sampler, is_random = _segment_sampler(paths, labels)
        key = jax.random.key(3)
        # Lanczos steps: the largest Krylov dimension of a block (d_a + d_b of the largest pair), so that every
        # block norm is exact up to round-off (checked against dense Hessians below)
        dims = sorted(int(np.size(x)) // (steps + 1) for x in jax.tree_util.tree_leaves(paths[0]))
        n_steps = dims[-1] + dims[-2]
        C = curvature.smoothness_constants(prob.loss, sampler, labels, settings["num_points"], key,
                                           lanczos_steps=n_steps)
        pkeys = jnp.stack([jax.random.fold_in(key, p) for p in range(settings["num_points"])])
        rand = np.asarray(jax.jit(jax.vmap(is_random))(pkeys))
        per = C.per_point

        def split_max(x):
            x = np.asarray(x)
            return (x[rand].max(axis=0) if rand.any() else np.zeros(x.shape[1:])).tolist(), \
                (x[~rand].max(axis=0) if (~rand).any() else np.zeros(x.shape[1:])).tolist()

        const_details = {
            "groups": list(C.groups), "L_ww": np.asarray(C.L_ww).tolist(), "L_gw": np.asarray(C.L_gw).tolist(),
            "L_gg": C.L_gg, "L_gg_exact": prob.constants["L_gg"], "L_gw_upper_bound": prob.constants["L_gw_bound"],
            "num_points": C.num_points, "random_direction_points": int(rand.sum()),
            "L_ww_random_vs_segment": split_max(per["L_ww"]), "L_gw_random_vs_segment": split_max(per["L_gw"]),
            "sampling": "max over unit-normalised segment points and random unit directions with segment g "
                        "(a lower estimate of the sup over the unit set)"}
        N = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(paths[0])) // (steps + 1)
        out.append(_i3_dense_validation(prob, labels, sampler, key, C, n_steps))
        tol = 4 * gamma(N, "float64")
        for control, factor in ((None, 1.0), ("1/10 of the smoothness constants", 0.1)):
            for scale, tr in trs:
                lhs, rhs, sc = _i3_terms(tr, spec["lr_g"], C, factor)
                viol = (lhs - rhs) / sc
                t = int(np.argmax(viol))
                details = {"step": t, "rho_0": float(1 / scale**2), "lhs": float(lhs[t]), "rhs": float(rhs[t]),
                           "steps_violated": int(np.sum(viol > tol)), "constants": const_details,
                           "tolerance_formula": "4 gamma_N relative to |L_t| + |L_{t+1}| + first + second"}
                if control:
                    details["breaks"] = control
                if scale == settings["scales"][0]:
                    details["curves"] = {f"I3 (LHS - RHS) / scale (||w0||={scale:g}, constants x{factor:g})":
                                         curve(None, viol, "step", "(L_{t+1} - RHS_t) / scale_t  (> 0: violated)",
                                               logy=False)}
                out.append(Evidence(
                    "I3", f"{name}: {prob.name}, GD lr_w=1 lr_g={spec['lr_g']:g}, ||w0||={scale:g} "
                          f"(rho_0={1 / scale**2:g}), {steps} steps, constants x{factor:g}, float64",
                    float(viol[t]), 0.0, "<=", tol, "float64", "none", negative_control=bool(control), details=details))
    return out
