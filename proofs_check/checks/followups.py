"""Checks of results beyond the paper, from the line of work that followed it (C24-C27).

* C24, exponential learning rate (Li & Arora, "An Exponential Learning Rate Schedule for Deep Learning",
  ICLR 2020, Thms 1.1-1.2): on a scale-invariant loss, GD with rate ``eta`` and coupled weight decay
  ``lambda`` gives the same directions and losses as weight-decay-free GD with ``eta_t = eta alpha^(-2t-1)``,
  ``alpha = 1 - eta lambda`` (with heavy-ball momentum ``gamma``: ``alpha`` the larger root of
  ``x^2 - (1 + gamma - eta lambda) x + gamma = 0``, and a radial initial velocity; theorem numbering [R]).
* C25, norm equilibrium (van Laarhoven, "L2 Regularization versus Batch and Weight Normalization", 2017;
  Wan, Zhu, Zhang, Sun, "Spherical Motion Dynamics", NeurIPS 2021): SGD with weight
  decay on scale-invariant weights settles at ``||w||^4 = eta L / (lambda (1 - alpha) (2 - eta lambda /
  (1 + alpha)))``, ``L = E||grad F_z(w / ||w||)||^2`` (the SGDM form as PAPER.md §9 quotes it).
* C26, angular update (Wan et al. 2021): at that equilibrium the angle between ``w_t`` and ``w_{t+1}``
  tends to ``sqrt(2 lambda eta / (1 + alpha))``.
* C27, three regimes (Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on
  the Sphere Can Happen in Three Regimes", NeurIPS 2022): at a fixed effective learning rate on the sphere,
  training converges, reaches a chaotic equilibrium, or does not train, in that order as the rate grows.

Every run uses the optimizer users train with (:func:`rate_tuning.optim.two_rate_sgd`, with its
``weight_decay``, ``momentum`` and ``project`` options) inside a ``lax.scan`` of this module (several runs
per compiled program); the checks measure norms, directions and angles from the raw parameters. Float64
(x64 at each check's entry). Tolerances and bands are derived next to each check and in
``docs/derivations.md`` ("Beyond the paper: C24-C27").
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from proofs_check import problems
from proofs_check.checks.identities import op_count
from proofs_check.claims import claim
from proofs_check.curves import curve, magnitude
from proofs_check.evidence import Evidence
from proofs_check.numerics import fan_in_normal, gamma, numpy_init, unit_roundoff, x64
from rate_tuning import data, models, optim
from rate_tuning import groups as G

U64 = unit_roundoff("float64")

# -------------------------------------------------------------------------------------------------------
# sources: the toys of proofs_check.problems and a BN MLP on digits
# -------------------------------------------------------------------------------------------------------


class Source(NamedTuple):
    """A problem for these checks.

    ``loss(params)``: the full (GD) loss; ``sample_loss(params, t, key)``: the loss of step ``t``'s sample
    (SGD); ``params``: float64 initial params (every SI group at the norm asked for); ``labels``; ``bn``: the
    BatchNorm variant; ``name``: one line; ``noise(params)``: for the toy, ``E_z||grad F_z(V)||^2`` at the
    normalised point in closed form, else None.
    """

    name: str
    loss: Callable
    sample_loss: Callable
    params: Any
    labels: Any
    bn: str
    noise: Callable | None = None


@functools.lru_cache(maxsize=None)
def _digits_mlp(preset: str, n: int, width: int, grouping: str, batch: int = 32) -> Source:
    """The BN MLP 64 -> ``width`` -> 10 (App. D head) on the first ``n`` digits images, exact train-mode BN.

    ``loss``: mean cross-entropy on all ``n`` images (GD); ``sample_loss(p, t, key)``: on ``batch`` images drawn
    without replacement with ``key`` (independent mini-batches: the i.i.d. sampling of the SGD analyses).
    Kernels ``N(0, 1/fan_in)`` drawn with numpy (seed 0); the ``fully_si`` classifier frozen at norm
    ``classifier_norm`` per column; SI groups keep their drawn norms.
    """
    ds = data.digits(seed=0, flatten=True)
    x, y = np.asarray(ds.x_train[:n], np.float64), np.asarray(ds.y_train[:n], np.int32)
    n = len(x)
    model = models.build("mlp", preset, widths=(width,), num_classes=10, param_dtype=jnp.float64)
    shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), jnp.asarray(x[:batch]))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = G.path_str(path)
        if name.endswith("kernel"):
            frozen = preset == "fully_si" and name.startswith("params/classifier")
            return fan_in_normal(rng, leaf.shape, model.classifier_norm if frozen else None)
        return (np.ones if name.endswith(("scale", "var")) else np.zeros)(leaf.shape)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    stats = variables["batch_stats"]
    labels = model.labels(grouping)

    def loss(p):
        return models.batch_loss(model, p, stats, jnp.asarray(x), jnp.asarray(y))[0]

    def sample_loss(p, t, key):
        del t
        idx = jax.random.choice(key, n, (batch,), replace=False)
        return models.batch_loss(model, p, stats, jnp.asarray(x)[idx], jnp.asarray(y)[idx])[0]

    name = (f"BN MLP 64-{width}-10 ({preset} preset, exact BN, train mode, {grouping} groups) on {n} digits"
            + (f", SGD on i.i.d. mini-batches of {batch}" if batch < n else ""))
    return Source(name, loss, sample_loss, variables["params"], labels, models.PRESETS[preset].bn)


@functools.lru_cache(maxsize=None)
def _toy(name: str, scale: float = 1.0) -> Source:
    """``sphere``: :func:`problems.sphere_function` (d=20); ``rayleigh``: :func:`problems.rayleigh_quotient`
    (d=8); ``noisy``: :func:`problems.noisy_sphere_function` (d=20, sigma=1), SGD with a fresh ``z`` per step."""
    prob = {"sphere": lambda: problems.sphere_function(dim=20, seed=0),
            "rayleigh": lambda: problems.rayleigh_quotient(dim=8, seed=0),
            "noisy": lambda: problems.noisy_sphere_function(dim=20, seed=0, noise_std=1.0)}[name]()
    params = numpy_init(prob, 0, scale, "float64")
    noise = None
    if name == "noisy":
        def noise(p):
            V = {"w": p["w"] / jnp.linalg.norm(p["w"])}
            g = prob.grad_closed_form(V)["w"]
            return g @ g + prob.constants["grad_noise_variance"](V)

    sample = (lambda p, t, key: prob.stochastic_loss(p, key)) if prob.stochastic_loss else \
        (lambda p, t, key: prob.loss(p))
    return Source(prob.name, prob.loss, sample, params, prob.labels, "none", noise)


def _sizes(params, labels) -> dict[str, int]:
    """Scalars per SI group (per channel for per-channel groups)."""
    out: dict[str, int] = {}
    for _, leaf, label in G.flatten_labelled(params, labels):
        if label.kind == G.SI:
            n = int(np.prod(np.shape(leaf)[:-1])) if label.per_channel else int(np.size(leaf))
            out[label.group] = out.get(label.group, 0) + n
    return out


def _directions(p, labels):
    """Each SI group divided by its norm (own reduction; per channel for per-channel groups)."""
    sq = G.group_sq_norms(p, labels)
    return G.scale_groups(p, labels, {k: 1.0 / jnp.sqrt(v) for k, v in sq.items()})


def _angles(p, p_next, labels) -> dict[str, jax.Array]:
    """Angle between ``w_t`` and ``w_{t+1}`` per SI group: ``2 atan2(||u - v||, ||u + v||)`` of the unit
    vectors (accurate for small angles; per-channel groups give one angle per channel)."""
    u, v = _directions(p, labels), _directions(p_next, labels)
    d = G.group_sq_norms(jax.tree_util.tree_map(jnp.subtract, u, v), labels)
    s = G.group_sq_norms(jax.tree_util.tree_map(jnp.add, u, v), labels)
    return {k: 2.0 * jnp.arctan2(jnp.sqrt(d[k]), jnp.sqrt(s[k])) for k in d}


def _set_trace(state, tree):
    """``state`` with every ``optax.TraceState.trace`` (the heavy-ball buffer) replaced by ``tree`` (the
    partitioned optimizer's masked leaves are kept)."""
    masked = lambda t: isinstance(t, optax.MaskedNode)  # noqa: E731

    def fix(x):
        if isinstance(x, optax.TraceState):
            return x._replace(trace=jax.tree_util.tree_map(lambda t, b: t if masked(t) else b.astype(t.dtype),
                                                           x.trace, tree, is_leaf=masked))
        return x

    return jax.tree_util.tree_map(fix, state, is_leaf=lambda x: isinstance(x, optax.TraceState))


# -------------------------------------------------------------------------------------------------------
# C24: exponential learning rate
# -------------------------------------------------------------------------------------------------------


def exp_lr_alpha(eta: float, lam: float, momentum: float = 0.0) -> tuple[float, float]:
    """``(alpha, ln alpha)`` of the exponential schedule ``eta_t = eta alpha^(-2t-1)`` (C24).

    Without momentum ``alpha = 1 - eta lambda`` (``ln alpha = log1p(-eta lambda)``). With heavy-ball
    momentum ``gamma``, ``alpha`` is the larger root of ``x^2 - (1 + gamma - eta lambda) x + gamma = 0``
    (Li & Arora 2020, Thm 1.2). ``alpha - 1`` is computed without cancellation: the roots satisfy
    ``(a1 - 1)(a2 - 1) = eta lambda`` and ``a2 - 1 = (gamma - 1 - eta lambda - sqrt(D)) / 2`` (a sum of
    negative terms), with ``D = (1 - gamma)^2 - 2 eta lambda (1 + gamma) + (eta lambda)^2``.
    """
    el = eta * lam
    if not momentum:
        return 1.0 - el, math.log1p(-el)
    disc = (1.0 - momentum) ** 2 - 2.0 * el * (1.0 + momentum) + el * el
    if disc < 0:
        raise ValueError(f"no real root: need eta lambda < (1 - sqrt(gamma))^2, got {el}")
    a1m1 = el / ((momentum - 1.0 - el - math.sqrt(disc)) / 2.0)
    return 1.0 + a1m1, math.log1p(a1m1)


@functools.lru_cache(maxsize=None)
def _c24_program(source_name: str, steps: int, eta: float, lam: float, momentum: float | None):
    """One compiled scan: run A (GD with ``weight_decay=lam``) and, vmapped, runs B_k (weight-decay-free GD
    with ``eta_t = eta exp(-(2t + 1 + shift_k) log_alpha_k)`` and initial heavy-ball buffer ``coef_k w_0``),
    all with :func:`rate_tuning.optim.two_rate_sgd`. Records per step: the losses, the largest direction
    distance between A and each B_k over the SI groups, and A's ``||w||^2`` and ``||grad||^2`` per group."""
    source = _c24_source(source_name)
    loss, labels = source.loss, source.labels
    tx_a = optim.two_rate_sgd(labels, eta, eta, weight_decay=lam, momentum=momentum)

    def tx_b(log_alpha, shift):
        def sched(count):
            c = jnp.asarray(count, jnp.float64)
            return eta * jnp.exp(-(2.0 * c + 1.0 + shift) * log_alpha)

        return optim.two_rate_sgd(labels, sched, sched, momentum=momentum)

    def program(p0, log_alphas, shifts, coefs):
        def init_b(log_alpha, shift, coef):
            state = tx_b(log_alpha, shift).init(p0)
            return _set_trace(state, jax.tree_util.tree_map(lambda w: coef * w, p0)) if momentum else state

        s_b = jax.vmap(init_b)(log_alphas, shifts, coefs)
        p_b = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (len(shifts),) + x.shape), p0)

        def step_b(p, s, log_alpha, shift):
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx_b(log_alpha, shift).update(g, s, p)
            return optax.apply_updates(p, u), s, value

        def body(carry, _):
            p_a, s_a, p_b, s_b = carry
            value, g = jax.value_and_grad(loss)(p_a)
            d_a = _directions(p_a, labels)

            def dist(p):
                diff = jax.tree_util.tree_map(jnp.subtract, d_a, _directions(p, labels))
                return jnp.max(jnp.stack([jnp.max(jnp.sqrt(v)) for v in G.group_sq_norms(diff, labels).values()]))

            rec = dict(loss_a=value, dist=jax.vmap(dist)(p_b), w_sq=G.group_sq_norms(p_a, labels),
                       g_sq=G.group_sq_norms(g, labels))
            u, s_a = tx_a.update(g, s_a, p_a)
            p_b, s_b, rec["loss_b"] = jax.vmap(step_b)(p_b, s_b, log_alphas, shifts)
            return (optax.apply_updates(p_a, u), s_a, p_b, s_b), rec

        _, rec = jax.lax.scan(body, (p0, tx_a.init(p0), p_b, s_b), None, length=steps)
        return rec

    return jax.jit(program)


def c24_tolerance(rec: dict, *, eta: float, lam: float, momentum: float | None, log_alpha: float, n: int,
                  n_grad: int, n_loss: int) -> tuple[float, float, dict]:
    """``(direction tolerance, loss tolerance, parts)`` of C24 (docs/derivations.md, C24).

    Per step and group, from run A's record: ``rho_t = eta / ((1 - eta lambda) r_t^2)`` and
    ``a_t = r_t ||g_t||``; ``s_t = rho a / (1 + rho^2 a^2)`` is how much a relative error of the effective
    rate moves the next direction. With ``u`` the unit round-off, ``eps_g = 2u N_grad`` the relative error of
    a computed gradient (round-off budget of its jaxpr), the per-run local direction error of a step
    ``l_t = 6u + eps_g min(1, rho a)``, the per-run relative error added to ``||w||^2`` per step
    ``nu = 2 gamma_n + 8u + 2 eps_g`` (it persists: the norm recursion does not expand relative errors)
    and the schedule's error ``delta_t = (3 |x_t| + 3) u``, ``x_t = (2t + 1) |ln alpha|``:

        e_T <= 2u + kappa sum_t [2 l_t + s_t (delta_t + 2 t nu)] + 2 (gamma_n + 2u),   kappa = 1 / (1 - gamma)

    assuming the direction map does not expand errors on balance over the run (with momentum, a step's error
    stays in the velocity for ``1 / (1 - gamma)`` steps: ``kappa``). Loss: ``max_t a_t e_T + 2 eps_L`` relative
    to ``max(|L|, 1)`` (``eps_L = 2u N_loss``).
    """
    kappa = 1.0 / (1.0 - momentum) if momentum else 1.0
    eps_g, eps_l = 2 * U64 * n_grad, 2 * U64 * n_loss
    nu = 2 * gamma(n, "float64") + 8 * U64 + 2 * eps_g
    steps = len(rec["loss_a"])
    t = np.arange(steps, dtype=np.float64)
    delta = (3.0 * (2 * t + 1) * abs(log_alpha) + 3.0) * U64
    s_max, m_max, a_max = np.zeros(steps), np.zeros(steps), 0.0
    for g in rec["w_sq"]:
        r2 = np.asarray(rec["w_sq"][g], np.float64).reshape(steps, -1)
        a = np.sqrt(r2 * np.asarray(rec["g_sq"][g], np.float64).reshape(steps, -1))
        ra = eta / ((1.0 - eta * lam) * r2) * a
        s_max = np.maximum(s_max, np.max(ra / (1 + ra**2), axis=1))
        m_max = np.maximum(m_max, np.max(np.minimum(1.0, ra), axis=1))
        a_max = max(a_max, float(np.max(a)))
    local = 6 * U64 + eps_g * m_max
    e_t = 2 * U64 + kappa * np.cumsum(2 * local + s_max * (delta + 2 * t * nu)) + 2 * (gamma(n, "float64") + 2 * U64)
    tol_dir = float(e_t[-1])
    tol_loss = a_max * tol_dir + 2 * eps_l
    parts = {"rounding_of_steps": float(kappa * np.sum(2 * local)),
             "schedule_error": float(kappa * np.sum(s_max * delta)),
             "norm_drift": float(kappa * np.sum(s_max * 2 * t * nu)), "N_grad": n_grad, "N_loss": n_loss,
             "max_intrinsic_grad": a_max, "kappa": kappa}
    return tol_dir, tol_loss, parts


C24_SETTINGS = {
    # name: (source, eta, lambda, momentum, steps). Every claim run has (steps) x (rate of shrinkage per step
    # eta lambda / (1 - gamma)) = 2: the rate of run B grows by e^4 over the run, and the effective rate stays
    # below the first destabilisation of GD + weight decay (see the control below).
    "sphere/gd": ("sphere", 0.1, 1e-3, None, 2000),
    "rayleigh/gd": ("rayleigh", 0.1, 1e-3, None, 2000),
    "mlp/gd": ("mlp", 0.1, 5e-3, None, 2000),
    "sphere/momentum": ("sphere", 0.01, 1e-2, 0.9, 2000),
    "rayleigh/momentum": ("rayleigh", 0.01, 1e-2, 0.9, 2000),
    "mlp/momentum": ("mlp", 0.01, 1e-2, 0.9, 2000),
    "sphere/gd-5k": ("sphere", 0.1, 4e-4, None, 5000),
    "rayleigh/gd-5k": ("rayleigh", 0.1, 4e-4, None, 5000),
    "mlp/gd-5k": ("mlp", 0.1, 2e-3, None, 5000),
    "sphere/momentum-5k": ("sphere", 0.01, 4e-3, 0.9, 5000),
    "rayleigh/momentum-5k": ("rayleigh", 0.01, 4e-3, 0.9, 5000),
    "mlp/momentum-5k": ("mlp", 0.01, 4e-3, 0.9, 5000),
    # control: sphere/gd run on to 5000 steps, past the first destabilisation (about step 3300)
    "sphere/gd-past-destabilisation": ("sphere", 0.1, 1e-3, None, 5000),
}
TWIN_SHIFT = 1e-12
"""A twin of run B with the schedule's exponent shifted by this much (every rate changed by a relative
``1e-12 |ln alpha|``, about 1e-15): how much the dynamics itself amplifies a round-off-sized perturbation."""


def _c24_source(name: str) -> Source:
    return _digits_mlp("fully_si", 256, 16, "layer", batch=256) if name == "mlp" else _toy(name)


def _c24_records(setting: str, control: str | None = None) -> list[Evidence]:
    src_name, eta, lam, momentum, steps = C24_SETTINGS[setting]
    src = _c24_source(src_name)
    alpha, log_alpha = exp_lr_alpha(eta, lam, momentum or 0.0)
    plain_alpha, plain_log = exp_lr_alpha(eta, lam)
    coef = lambda a: (a - 1.0) / (a * eta)  # noqa: E731  (initial buffer of run B, times w_0)
    runs = [("claim", log_alpha, 0.0, coef(alpha), control), ("twin", log_alpha, TWIN_SHIFT, coef(alpha), None)]
    if not control:
        runs.append(("off-by-one", log_alpha, -1.0, coef(alpha),
                     "the exponent -2t-1 of the schedule (used -2t: every rate off by the factor alpha)"))
        if momentum:
            runs.append(("momentum-free alpha", plain_log, 0.0, coef(plain_alpha),
                         "momentum's root: alpha = 1 - eta lambda (the momentum-free schedule) used with momentum "
                         f"{momentum}"))
    fn = _c24_program(src_name, steps, eta, lam, momentum)
    rec = jax.device_get(fn(src.params, jnp.asarray([r[1] for r in runs]), jnp.asarray([r[2] for r in runs]),
                            jnp.asarray([r[3] for r in runs])))
    sizes = _sizes(src.params, src.labels)
    n_grad = op_count(jax.grad(src.loss), src.params)
    n_loss = op_count(src.loss, src.params)
    tol_dir, tol_loss, parts = c24_tolerance(rec, eta=eta, lam=lam, momentum=momentum, log_alpha=log_alpha,
                                             n=max(sizes.values()), n_grad=n_grad, n_loss=n_loss)
    loss_a = np.asarray(rec["loss_a"], np.float64)
    scale = np.maximum(np.abs(loss_a), 1.0)
    twin = np.asarray(rec["dist"][:, 1], np.float64)
    mom = f", heavy-ball momentum {momentum}" if momentum else ""
    base = (f"{setting}: {src.name}, GD eta={eta:g} with weight decay {lam:g}{mom} vs weight-decay-free GD with "
            f"eta_t = eta alpha^(-2t-1), alpha = {alpha:.12g}" + (" (buffer (alpha-1)/(alpha eta) w_0)" if momentum
                                                                  else "") + f", {steps} steps, float64")
    out = []
    for k, (what, _, shift, _, breaks) in enumerate(runs):
        if what == "twin":
            continue
        dist = np.asarray(rec["dist"][:, k], np.float64)
        dloss = np.abs(np.asarray(rec["loss_b"][:, k], np.float64) - loss_a) / scale
        details = {"alpha": alpha, "ln_alpha": log_alpha, "lr_growth_over_run": math.exp(-2 * steps * log_alpha),
                   "max_direction_distance": float(dist.max()), "final_direction_distance": float(dist[-1]),
                   "max_loss_relative_difference": float(dloss.max()), "final_loss": float(loss_a[-1]),
                   "twin_max_direction_distance": float(twin.max()),
                   "first_step_twin_apart_1e-10": int(np.argmax(twin > 1e-10)) if twin.max() > 1e-10 else None,
                   "tolerance_parts": parts,
                   "tolerance_formula": "2u + kappa sum_t [2 l_t + s_t (delta_t + 2 t nu)] + 2(gamma_n + 2u); "
                                        "loss: max_t a_t e_T + 2 eps_L"}
        if breaks:
            details["breaks"] = breaks
        if what in ("claim", "off-by-one"):
            details["curves"] = {f"{setting}: distance of the directions ({what})": curve(
                np.arange(steps), {"direction": magnitude(dist), "loss": magnitude(dloss),
                       "twin (dynamics alone)": magnitude(twin)},
                "step", "|w_t/||w_t|| - w~_t/||w~_t|||, |L - L~| / max(|L|, 1)", logy=True)}
        label = base
        if what == "off-by-one":
            label = base.replace("eta alpha^(-2t-1)", "eta alpha^(-2t)")
        elif what == "momentum-free alpha":
            label = base.replace("eta alpha^(-2t-1)", f"eta alpha0^(-2t-1), alpha0 = {plain_alpha:.12g}")
        out.append(Evidence("C24", label + ": max direction distance", float(dist.max()), 0.0, "==", tol_dir,
                            "float64", src.bn, negative_control=bool(breaks), details=details))
        if what == "claim" and not control:
            out.append(Evidence("C24", label + ": max relative loss difference", float(dloss.max()), 0.0, "==",
                                tol_loss, "float64", src.bn, details={k2: details[k2] for k2 in
                                                                     ("alpha", "max_loss_relative_difference",
                                                                      "twin_max_direction_distance",
                                                                      "tolerance_parts")}))
    return out


C24_CONTROL = ("the horizon: run on past the first destabilisation of GD + weight decay (the effective rate "
               "reaches its stability threshold near step 3300), where the dynamics amplifies round-off (the twin "
               "run separates as much)")


@claim(
    "C24",
    paper_ref="Li & Arora, ICLR 2020 (arXiv 1910.07454), GD and momentum equivalences (their Thms 1.1, 1.2; "
              "numbering [R]) [S; D verified]",
    statement="GD with lr eta and coupled weight decay lambda on a scale-invariant loss = weight-decay-free GD with "
              "eta_t = eta alpha^(-2t-1): same directions w_t/||w_t|| and losses at every step (alpha = 1 - eta "
              "lambda; with momentum gamma, the larger root of x^2 - (1 + gamma - eta lambda) x + gamma)",
    hypotheses="every trained group scale-invariant (synthetic SI losses; BN MLP with the fully_si preset, exact "
               "train-mode BN, frozen classifier); full-batch GD; with momentum, run B starts with the radial "
               "velocity (alpha - 1)/(alpha eta) w_0; round-off is compared over a horizon before the first "
               "destabilisation of GD + weight decay (the dynamics does not amplify errors there)",
    negative_controls=("the schedule's exponent: eta alpha^(-2t) instead of eta alpha^(-2t-1)",
                       "momentum's root: the momentum-free alpha = 1 - eta lambda used with momentum 0.9",
                       C24_CONTROL),
    quick={"settings": ("sphere/gd", "mlp/gd", "sphere/momentum"),
           "controls": ("sphere/gd-past-destabilisation",)},
    full={"settings": ("sphere/gd", "rayleigh/gd", "mlp/gd", "sphere/momentum", "rayleigh/momentum", "mlp/momentum",
                       "sphere/gd-5k", "rayleigh/gd-5k", "mlp/gd-5k", "sphere/momentum-5k", "rayleigh/momentum-5k",
                       "mlp/momentum-5k"),
          "controls": ("sphere/gd-past-destabilisation",)},
)
def check_c24(settings: dict) -> list[Evidence]:
    """Largest distance between the two runs' directions (max over SI groups and steps) and largest relative
    loss difference, against the round-off tolerance of :func:`c24_tolerance`; the controls break the
    schedule (exponent off by one; with momentum, the momentum-free ``alpha``) or the horizon (past the first
    destabilisation). Every record carries the twin distance: the same run B with every rate changed by about
    1e-15, which measures the dynamics' own amplification of round-off."""
    out = []
    with x64():
        for setting in settings["settings"]:
            out += _c24_records(setting)
        for setting in settings.get("controls", ()):
            out += _c24_records(setting, control=C24_CONTROL)
    return out


# -------------------------------------------------------------------------------------------------------
# C25, C26: the equilibrium of SGD with weight decay
# -------------------------------------------------------------------------------------------------------

EQ_SETTINGS = {
    # name: (source, eta, lambda, momentum)
    "noisy/sgd": ("noisy", 0.1, 0.02, None),
    "noisy/sgdm": ("noisy", 0.1, 0.02, 0.9),
    "noisy/sgd-no-wd": ("noisy", 0.1, 0.0, None),
    "mlp/sgd": ("mlp", 0.1, 0.02, None),
    "mlp/sgdm": ("mlp", 0.1, 0.02, 0.9),
    "mlp/sgd-no-wd": ("mlp", 0.1, 0.0, None),
    "mlp-paper/sgd": ("mlp-paper", 0.1, 0.02, None),
    "mlp-paper/sgdm": ("mlp-paper", 0.1, 0.02, 0.9),
}
EQ_CLAIM_LAMBDA = 0.02
"""The weight decay of the claim runs: the no-weight-decay controls are compared with its predictions."""

BLOCKS = 8
"""C26's band: the angle's root mean square over each of ``BLOCKS`` consecutive blocks of the window."""


def _eq_source(name: str) -> Source:
    if name == "noisy":
        return _toy("noisy")
    return _digits_mlp("paper" if name == "mlp-paper" else "fully_si", 2000, 16, "layer", batch=32)


@functools.lru_cache(maxsize=None)
def _eq_program(source_name: str, steps: int, eta: float, lam: float, momentum: float | None):
    src = _eq_source(source_name)
    labels = src.labels
    tx = optim.two_rate_sgd(labels, eta, eta, weight_decay=lam, momentum=momentum)

    def program(p0, key):
        def body(carry, t):
            p, s = carry
            g = jax.grad(src.sample_loss)(p, t, jax.random.fold_in(key, t))
            u, s = tx.update(g, s, p)
            p1 = optax.apply_updates(p, u)
            w_sq, g_sq = G.group_sq_norms(p, labels), G.group_sq_norms(g, labels)
            rec = dict(w_sq=w_sq, a_sq={k: w_sq[k] * g_sq[k] for k in w_sq}, angle=_angles(p, p1, labels))
            if src.noise is not None:
                rec["noise"] = src.noise(p)
            return (p1, s), rec

        _, rec = jax.lax.scan(body, (p0, tx.init(p0)), jnp.arange(steps))
        return rec

    return jax.jit(program)


@functools.lru_cache(maxsize=None)
def _eq_run(setting: str, steps: int, seed: int) -> dict:
    """Setting ``setting`` of :data:`EQ_SETTINGS` for ``steps`` steps (sample keys from ``seed``)."""
    source_name, eta, lam, momentum = EQ_SETTINGS[setting]
    src = _eq_source(source_name)
    with x64():
        rec = jax.device_get(_eq_program(source_name, steps, eta, lam, momentum)(
            src.params, jax.random.fold_in(jax.random.key(seed), 0x5EED)))
    return {"rec": rec, "src": src, "eta": eta, "lam": lam, "momentum": momentum}


def equilibrium_norm4(eta: float, lam: float, L: float, momentum: float | None = None) -> float:
    """``||w||^4 = eta L / (lambda (1 - alpha) (2 - eta lambda / (1 + alpha)))`` (Wan et al. 2021; ``alpha = 0``:
    van Laarhoven's ``eta L / (lambda (2 - eta lambda))``)."""
    a = momentum or 0.0
    return eta * L / (lam * (1.0 - a) * (2.0 - eta * lam / (1.0 + a))) if lam > 0 else math.inf


def angular_update_limit(eta: float, lam: float, momentum: float | None = None) -> float:
    """``sqrt(2 lambda eta / (1 + alpha))`` (Wan et al. 2021)."""
    return math.sqrt(2.0 * lam * eta / (1.0 + (momentum or 0.0)))


def _window(x, steps):
    return np.asarray(x, np.float64)[steps // 2:]


def _eq_stats(run: dict, group: str) -> dict:
    rec = run["rec"]
    steps = len(rec["w_sq"][group])
    r4 = _window(rec["w_sq"][group], steps) ** 2
    L = _window(rec["noise"] if "noise" in rec else rec["a_sq"][group], steps)
    ang = _window(rec["angle"][group], steps)
    blocks = np.sqrt(np.mean(ang[: len(ang) // BLOCKS * BLOCKS].reshape(BLOCKS, -1) ** 2, axis=1))
    return {"r4_mean": float(r4.mean()), "r4_sd": float(r4.std()), "L": float(L.mean()),
            "L_source": ("closed form E||grad F_z(V)||^2" if "noise" in rec
                         else "measured r^2 ||g||^2 of the applied gradient"),
            "r4_halves": [float(r4[: len(r4) // 2].mean()), float(r4[len(r4) // 2:].mean())],
            "angle_rms": float(np.sqrt(np.mean(ang**2))), "angle_mean": float(ang.mean()), "angle_sd": float(ang.std()),
            "angle_block_rms": blocks.tolist(), "angle_band": float(2 * blocks.std(ddof=1)), "window": len(r4)}


def _eq_setting_line(setting: str, run: dict, steps: int, seed: int, group: str) -> str:
    mom = f", heavy-ball momentum {run['momentum']}" if run["momentum"] else ""
    return (f"{setting}: {run['src'].name}, SGD eta={run['eta']:g} weight decay {run['lam']:g}{mom}, {steps} steps "
            f"(window: the last {steps // 2}), seed {seed}, group {group}, float64")


def _eq_curve(setting: str, run: dict, group: str, what: str, prediction: float) -> dict:
    """``||w_t||^4`` (``what='norm'``) or the angular update (``'angle'``) per step, with the formula's value."""
    rec = run["rec"]
    if what == "norm":
        y, label, name = np.asarray(rec["w_sq"][group], np.float64) ** 2, "||w_t||^4", "||w||^4"
    else:
        y, label, name = np.asarray(rec["angle"][group], np.float64), "angle", "angle(w_t, w_t+1) (rad)"
    series = {label: y, "formula": np.full_like(y, prediction)}
    return {f"{setting}: {label} ({group})": curve(np.arange(len(y)), series, "step", name, logy=True)}


def _c25_records(setting: str, steps: int, seed: int, control: str | None = None) -> list[Evidence]:
    run = _eq_run(setting, steps, seed)
    out = []
    for group in G.si_groups(run["src"].params, run["src"].labels):
        st = _eq_stats(run, group)
        lam = run["lam"] or EQ_CLAIM_LAMBDA
        momentum = None if control == "momentum" else run["momentum"]
        pred = equilibrium_norm4(run["eta"], lam, st["L"], momentum)
        details = {**st, "formula": "eta L / (lambda (1 - alpha)(2 - eta lambda/(1 + alpha)))", "prediction": pred,
                   "relaxation_steps": (1 - (run["momentum"] or 0)) / (4 * run["eta"] * lam),
                   "band": "2 sd of ||w_t||^4 over the window (its equilibrium fluctuation)"}
        if control == "momentum":
            details["breaks"] = (f"momentum's factor: the alpha = 0 formula eta L/(lambda (2 - eta lambda)) at "
                                 f"alpha = {run['momentum']}")
        elif control:
            details["breaks"] = control
        if seed == 0:
            details["curves"] = _eq_curve(setting, run, group, "norm", pred)
        line = _eq_setting_line(setting, run, steps, seed, group) + \
            (": time-averaged ||w||^4 vs the formula" + (" without momentum's factor" if control == "momentum" else "")
             + (f" at lambda = {lam:g}" if not run["lam"] else ""))
        out.append(Evidence("C25", line, st["r4_mean"], pred, "==", 2 * st["r4_sd"], "float64", run["src"].bn,
                            negative_control=bool(control), details=details))
    return out


def _c26_records(setting: str, steps: int, seed: int, control: str | None = None) -> list[Evidence]:
    run = _eq_run(setting, steps, seed)
    out = []
    for group in G.si_groups(run["src"].params, run["src"].labels):
        st = _eq_stats(run, group)
        lam = run["lam"] or EQ_CLAIM_LAMBDA
        momentum = None if control == "momentum" else run["momentum"]
        pred = angular_update_limit(run["eta"], lam, momentum)
        details = {**st, "formula": "sqrt(2 lambda eta / (1 + alpha))", "prediction": pred,
                   "band": f"2 sd of the root-mean-square angle over {BLOCKS} consecutive blocks of the window"}
        if control == "momentum":
            details["breaks"] = f"momentum's factor: sqrt(2 lambda eta) at alpha = {run['momentum']}"
        elif control:
            details["breaks"] = control
        if seed == 0:
            details["curves"] = _eq_curve(setting, run, group, "angle", pred)
        line = _eq_setting_line(setting, run, steps, seed, group) + \
            (": RMS angular update vs the formula" + (" without momentum's factor" if control == "momentum" else "")
             + (f" at lambda = {lam:g}" if not run["lam"] else ""))
        out.append(Evidence("C26", line, st["angle_rms"], pred, "==", st["angle_band"], "float64", run["src"].bn,
                            negative_control=bool(control), details=details))
    return out


EQ_CONTROLS = (
    ("noisy/sgd-no-wd", "weight decay (lambda = 0: no equilibrium, ||w||^4 grows like 2 eta^2 L t)"),
    ("noisy/sgdm", "momentum"),
)
EQ_QUICK = {"steps": {"noisy": 4000, "mlp": 2000}, "seeds": (0,),
            "settings": ("noisy/sgd", "noisy/sgdm", "mlp/sgd", "mlp/sgdm"),
            "controls": EQ_CONTROLS + (("mlp/sgdm", "momentum"),)}
EQ_FULL = {"steps": {"noisy": 16000, "mlp": 8000, "mlp-paper": 8000}, "seeds": (0, 1),
           "settings": ("noisy/sgd", "noisy/sgdm", "mlp/sgd", "mlp/sgdm", "mlp-paper/sgd", "mlp-paper/sgdm"),
           "controls": EQ_CONTROLS + (("mlp/sgdm", "momentum"),
                                      ("mlp/sgd-no-wd", "weight decay (lambda = 0: no equilibrium)"))}


def _eq_check(records: Callable, settings: dict) -> list[Evidence]:
    out = []
    steps_of = lambda s: settings["steps"][EQ_SETTINGS[s][0]]  # noqa: E731
    for seed in settings["seeds"]:
        for s in settings["settings"]:
            out += records(s, steps_of(s), seed)
    for s, what in settings["controls"]:
        out += records(s, steps_of(s), 0, control=what)
    return out


@claim(
    "C25",
    paper_ref="van Laarhoven 2017 (arXiv 1706.05350); Wan, Zhu, Zhang, Sun, NeurIPS 2021 (arXiv 2006.08419), the "
              "SGD and SGDM equilibria [S/Q; D for alpha = 0]",
    statement="SGD with weight decay lambda (momentum alpha) on scale-invariant weights settles at ||w||^4 = "
              "eta L / (lambda (1 - alpha)(2 - eta lambda/(1 + alpha))), L = E||grad F_z(w/||w||)||^2",
    hypotheses="scale-invariant groups, coupled weight decay, constant eta, a gradient-noise floor L > 0 that changes "
               "slowly over the relaxation time (1 - alpha)/(4 eta lambda); agreement within 2 sd of ||w_t||^4 over "
               "the second half of the run",
    negative_controls=("weight decay: lambda = 0 (no equilibrium), compared with the prediction at lambda = 0.02",
                       "momentum's factor: the alpha = 0 formula at alpha = 0.9"),
    quick=EQ_QUICK, full=EQ_FULL,
)
def check_c25(settings: dict) -> list[Evidence]:
    """Time-averaged ``||w||^4`` over the window against the formula with ``L`` averaged over the same window
    (toy: closed form; BN MLP: measured from the applied gradients), per SI group; band ``2 sd(||w_t||^4)``."""
    with x64():
        return _eq_check(_c25_records, settings)


@claim(
    "C26",
    paper_ref="Wan, Zhu, Zhang, Sun, NeurIPS 2021 (arXiv 2006.08419), the angular update at equilibrium [Q]",
    statement="at the equilibrium of SGD with weight decay the angle between w_t and w_{t+1} tends to "
              "sqrt(2 lambda eta / (1 + alpha)) (alpha: heavy-ball momentum)",
    hypotheses="as C25; the root-mean-square angle over the second half of the run, band 2 sd of its value over "
               f"{BLOCKS} blocks",
    negative_controls=("weight decay: lambda = 0 (no equilibrium), compared with the prediction at lambda = 0.02",
                       "momentum's factor: sqrt(2 lambda eta) at alpha = 0.9"),
    quick=EQ_QUICK, full=EQ_FULL,
)
def check_c26(settings: dict) -> list[Evidence]:
    """Root-mean-square angular update over the window against ``sqrt(2 lambda eta / (1 + alpha))``, per SI
    group; band: twice the standard deviation of the RMS angle over :data:`BLOCKS` blocks of the window."""
    with x64():
        return _eq_check(_c26_records, settings)


# -------------------------------------------------------------------------------------------------------
# C27: three regimes at a fixed effective learning rate on the sphere
# -------------------------------------------------------------------------------------------------------

REGIMES = ("converges", "chaotic equilibrium", "does not train")
ANGLE_CONVERGED = 0.1
"""Regime 1 below this mean angular update (rad) over the last quarter of the run: the weights settle."""
ANGLE_NO_TRAINING = 1.0
"""Regime 3 from this mean angular update (rad) on: consecutive directions nearly orthogonal (two independent
random directions in high dimension make pi/2), the step no longer follows the loss."""


def classify_regime(mean_angle: float) -> int:
    """0 (converges), 1 (chaotic equilibrium) or 2 (does not train) from the mean angular update of the last
    quarter of a run (:data:`ANGLE_CONVERGED`, :data:`ANGLE_NO_TRAINING`); NaN is regime 2 (no training)."""
    if not mean_angle < ANGLE_NO_TRAINING:
        return 2
    return 0 if mean_angle < ANGLE_CONVERGED else 1


@functools.lru_cache(maxsize=None)
def _sphere_source(n: int, width: int) -> Source:
    """The fully_si BN MLP on ``n`` digits (full batch), one group per output channel, every channel at norm 1."""
    src = _digits_mlp("fully_si", n, width, "channel", batch=n)
    return src._replace(params=_unit(src.params, src.labels))


def _unit(params, labels, scale=1.0):
    sq = G.group_sq_norms(params, labels)
    return jax.tree_util.tree_map(np.asarray, G.scale_groups(params, labels,
                                                             {k: scale / np.sqrt(v) for k, v in sq.items()}))


@functools.lru_cache(maxsize=None)
def _regime_sweep(n: int, width: int, steps: int, rates: tuple[float, ...], project: bool) -> dict:
    """Full-batch GD from the same unit-norm weights for every rate (vmapped, one program), with
    ``two_rate_sgd(labels, rate, rate, project=project)``: per step the loss and the mean over channels of
    the angle between consecutive weights."""
    src = _sphere_source(n, width)
    labels = src.labels

    def one(rate):
        tx = optim.two_rate_sgd(labels, rate, rate, project=project)

        def body(carry, _):
            p, s = carry
            value, g = jax.value_and_grad(src.loss)(p)
            u, s = tx.update(g, s, p)
            p1 = optax.apply_updates(p, u)
            ang = jnp.mean(jnp.concatenate([jnp.ravel(a) for a in _angles(p, p1, labels).values()]))
            return (p1, s), (value, ang)

        _, (loss, angle) = jax.lax.scan(body, (src.params, tx.init(src.params)), None, length=steps)
        return loss, angle

    with x64():
        loss, angle = jax.device_get(jax.jit(jax.vmap(one))(jnp.asarray(rates, jnp.float64)))
        rng = np.random.default_rng(1)
        draws = [_unit(jax.tree_util.tree_map(lambda x: rng.standard_normal(np.shape(x)), src.params), labels)
                 for _ in range(64)]
        frozen = {k: v for k, v in src.params.items() if k == "classifier"}
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[{**d, **frozen} for d in draws])
        rand = np.asarray(jax.jit(jax.vmap(src.loss))(stacked))
    return {"loss": np.asarray(loss, np.float64), "angle": np.asarray(angle, np.float64),
            "random_loss": float(rand.mean()),
            "random_loss_sd": float(rand.std()), "src": src}


def regime_statistics(sweep: dict, rates) -> list[dict]:
    """Per rate, over the last quarter of the run: ``level`` (mean loss / mean loss at 64 random directions),
    ``loss_fluctuation`` (sd / mean of the loss), ``mean_angle`` and ``angle_spread`` (sd / mean of the
    angular update), and the regime (:func:`classify_regime`)."""
    steps = sweep["loss"].shape[1]
    w = slice(steps - steps // 4, steps)
    out = []
    for k, rate in enumerate(rates):
        loss, ang = sweep["loss"][k, w], sweep["angle"][k, w]
        m = float(np.mean(ang))
        out.append({"rate": float(rate), "level": float(np.mean(loss) / sweep["random_loss"]),
                    "loss_fluctuation": float(np.std(loss) / np.mean(loss)), "mean_angle": m,
                    "angle_spread": float(np.std(ang) / m) if m > 0 else math.nan, "regime": classify_regime(m)})
    return out


def _boundaries(stats: list[dict]) -> dict:
    """Geometric midpoints between the last rate of a regime and the first rate of the next one."""
    out = {}
    for a, b in ((0, 1), (1, 2)):
        lo = [s["rate"] for s in stats if s["regime"] == a]
        hi = [s["rate"] for s in stats if s["regime"] == b]
        if lo and hi:
            out[f"{REGIMES[a]} -> {REGIMES[b]}"] = {"between": [max(lo), min(hi)],
                                                    "estimate": math.sqrt(max(lo) * min(hi))}
    return out


def _c27_records(n: int, width: int, steps: int, rates: tuple[float, ...], project: bool) -> list[Evidence]:
    sweep = _regime_sweep(n, width, steps, rates, project)
    stats = regime_statistics(sweep, rates)
    regimes = [s["regime"] for s in stats]
    out_of_order = sum(1 for a, b in zip(regimes, regimes[1:]) if b < a)
    present = len(set(regimes))
    level_overlaps = sum(1 for i in stats for j in stats if i["regime"] < j["regime"] and i["level"] >= j["level"])
    per_regime = {REGIMES[r]: {key: [float(min(v)), float(max(v))] for key, v in
                               {k: [s[k] for s in stats if s["regime"] == r]
                                for k in ("rate", "level", "loss_fluctuation", "mean_angle", "angle_spread")}.items()}
                  for r in sorted(set(regimes))}
    details = {"per_rate": stats, "per_regime_ranges": per_regime, "boundaries": _boundaries(stats),
               "random_direction_loss": sweep["random_loss"], "random_direction_loss_sd": sweep["random_loss_sd"],
               "rule": f"over the last quarter of the run: mean angular update < {ANGLE_CONVERGED} rad: converges; "
                       f"< {ANGLE_NO_TRAINING} rad: chaotic equilibrium; otherwise: does not train",
               "sequence": "".join(str(r + 1) for r in regimes)}
    rate_axis = np.asarray(rates)
    details["curves"] = {f"regimes ({'projected' if project else 'not projected'}): level and angle vs rate": curve(
        rate_axis, {"loss level (mean / random)": [s["level"] for s in stats],
                    "mean angular update (rad)": [s["mean_angle"] for s in stats],
                    "regime (1, 2, 3)": [s["regime"] + 1 for s in stats]},
        "effective learning rate", "last quarter of the run", logy=True, logx=True)}
    if project:
        picks = sorted({regimes.index(r) for r in set(regimes)})
        details["curves"]["loss per step, first rate of each regime"] = curve(
            np.arange(steps), {f"rate {rates[i]:.3g} ({REGIMES[regimes[i]]})": sweep["loss"][i] for i in picks},
            "step",
            "training loss", logy=True)
    what = ("projected GD (every output channel renormalised to norm 1 after each step: the effective rate is the "
            "rate)" if project else "plain GD from the same unit-norm weights (no projection: the effective rate "
                                    "decays by itself)")
    line = (f"{sweep['src'].name}: {what}, {len(rates)} rates {rates[0]:.3g}..{rates[-1]:.3g}, {steps} steps, "
            f"regimes by rate: {details['sequence']}")
    control = None if project else ("the fixed effective rate on the sphere: without projection the auto rate-tuning "
                                    "of the paper makes every rate train")
    if control:
        details["breaks"] = control
        return [Evidence("C27", line + ": number of regimes present", present, 3, ">=", 0.5, "float64", "exact",
                         negative_control=True, details=details)]
    return [Evidence("C27", line + ": number of regimes present", present, 3, ">=", 0.5, "float64", "exact",
                     details=details),
            Evidence("C27", line + ": regime decreasing from one rate to the next (count)", out_of_order, 0, "<=", 0.5,
                     "float64", "exact", details={"sequence": details["sequence"]}),
            Evidence("C27", line + ": loss level of a lower regime >= that of a higher regime (pairs)", level_overlaps,
                     0, "<=", 0.5, "float64", "exact", details={"per_regime_ranges": per_regime})]


def _rates(spec) -> tuple[float, ...]:
    lo, hi, per_decade = spec
    return tuple(float(10.0 ** e) for e in np.round(np.arange(lo, hi + 1e-9, 1.0 / per_decade), 6))


@claim(
    "C27",
    paper_ref="Kodryan, Lobacheva, Nakhodnov, Vetrov, NeurIPS 2022 (arXiv 2209.03695), the three regimes [S]",
    statement="training of a scale-invariant network on the sphere at a fixed effective learning rate converges, "
              "reaches a chaotic equilibrium, or does not train, in that order as the rate grows",
    hypotheses="every trained group on its sphere with a fixed effective rate (fully_si BN MLP, one group per output "
               "channel, projected after each step); full-batch GD (the chaos is the dynamics', not sampling noise); "
               f"regimes from the mean angular update over the last quarter (< {ANGLE_CONVERGED} rad: converges; "
               f"< {ANGLE_NO_TRAINING} rad: chaotic equilibrium; else does not train), stated before the runs",
    negative_controls=("the fixed effective rate on the sphere: plain GD (no projection) from the same weights",),
    quick={"sources": ((256, 16),), "steps": 1000, "grid": (-2, 3, 4)},
    full={"sources": ((256, 16), (512, 32)), "steps": 3000, "grid": (-2, 3, 8)},
)
def check_c27(settings: dict) -> list[Evidence]:
    """Regimes of every rate of a log grid, classified by the angular update: all three present, never a lower
    regime after a higher one, and loss levels ordered between regimes; the per-regime statistics (level,
    loss fluctuation, angle and its spread) and the boundaries are in the details. Control: no projection."""
    rates = _rates(settings["grid"])
    out = []
    with x64():
        for n, width in settings["sources"]:
            out += _c27_records(n, width, settings["steps"], rates, True)
        n, width = settings["sources"][0]
        out += _c27_records(n, width, settings["steps"], rates, False)
    return out
