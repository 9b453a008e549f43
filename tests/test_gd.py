"""proofs_check.checks.gd: the GD theorem's claims (C9-C12, C14, C15) pass in their quick settings, every
negative control is reported violated, and the explicit constants behave as derived (docs/derivations.md,
"The GD theorem with explicit constants"). Each claim runs once per module (the ``evidence`` fixture of
conftest.py memoises it; the claims share one compiled multi_group program)."""
import math

import jax
import numpy as np
import pytest

from proofs_check import problems
from proofs_check.checks import gd
from tests.helpers import (assert_claim_holds, assert_controls_listed, assert_controls_violated, check_curve,
                                 curves_of)

CLAIMS = ("C9", "C10", "C11", "C12", "C14", "C15")

# (claim, a substring of the setting of one negative control)
CONTROLS = [
    ("C9", "lr_w=1 lr_g=0.7333 (c_g=1.1)"), ("C9", "projected GD (fixed effective lr) lr_w=1e+04"),
    ("C10", "lr_w=1 lr_g=0.7333 (c_g=1.1)"), ("C10", "lr_w=1 lr_g=1 (c_g=1.5)"),
    ("C10", "projected GD (fixed effective lr) lr_w=1e+04"),
    ("C11", "projected GD"),
    ("C12", "SGD (constant lr) lr_w=1 "),
    ("C14", "(c_g=1.1)"), ("C14", "(c_g=1.5)"),
    ("C15", "(c_g=1.1)"), ("C15", "(c_g=1.5)"),
]


@pytest.mark.parametrize("cid", CLAIMS)
def test_claim_holds(evidence, cid):
    assert_claim_holds(evidence(cid), cid, tolerance_positive=False)


@pytest.mark.parametrize("cid, setting", CONTROLS)
def test_negative_control_is_violated(evidence, cid, setting):
    # clearly violated, not by a hair, and on a finite measurement
    assert_controls_violated(evidence(cid), cid, setting=setting, clear_by=100, finite=True)


def test_every_control_is_listed(evidence):
    assert_controls_listed(evidence, CONTROLS, CLAIMS)


def test_c9_spans_eight_decades_on_two_problems(evidence):
    bound_records = [e for e in evidence("C9") if not e.negative_control and e.setting.endswith("vs C/T")]
    for prefix in ("multi:", "sphere:"):
        lrs = sorted(float(e.setting.split("lr_w=")[1].split()[0].rstrip(",")) for e in bound_records
                     if e.setting.startswith(prefix))
        assert lrs[0] <= 1e-4 * (1 + 1e-9) and lrs[-1] >= 1e4 * (1 - 1e-9), (prefix, lrs)


def test_c10_tight_slope_is_minus_one_not_merely_below(evidence):
    slope = [e for e in evidence("C10") if e.setting.startswith("tight") and "slope" in e.setting]
    assert len(slope) == 1
    e = slope[0]
    lo, hi = e.details["ci95_bootstrap_over_seeds"]
    assert lo <= e.measured <= hi and hi - lo < 0.2
    assert abs(e.measured + 1) < 0.1 and e.tolerance < 0.1  # a slope of -1.5 or -0.5 would fail


def test_c11_end_slopes_have_opposite_signs(evidence):
    small, large = [e for e in evidence("C11") if not e.negative_control]
    assert small.bound == -1 and large.bound == 1
    assert small.tolerance < 0.5 and large.tolerance < 0.5


def test_curves_follow_the_report_convention(evidence):
    for cid in CLAIMS:
        curves = curves_of(evidence(cid))
        assert curves, f"{cid} has no curves"
        for c in curves:
            check_curve(c)


# -------------------------------------------------------------------------------------------------------
# the constants (no runs)
# -------------------------------------------------------------------------------------------------------


def test_constants_scale_like_the_derivation():
    """``C`` grows like ``1/lr_w`` at small ``lr_w`` (no phase 1) and faster than ``lr_w`` at large ``lr_w``."""
    prob = problems.rayleigh_quotient(dim=8, seed=0)
    bd = gd.rayleigh_bounds(prob)
    assert bd.L_ww == pytest.approx(6.0) and bd.G_w == (pytest.approx(3.0),) and bd.L_min == pytest.approx(-1.0)
    k = {lr: gd.gd_constants(bd, lr, None, [1.0], 0.5) for lr in (1e-6, 1e-5, 1e5, 1e6)}
    assert k[1e-6].N_J == 0 and k[1e-6].S_bad == 0 and k[1e-6].kappa == 0.5
    assert k[1e-6].C / k[1e-5].C == pytest.approx(10.0, rel=1e-3)
    assert k[1e6].N_J > k[1e5].N_J > 0
    assert 10.0 <= k[1e6].C / k[1e5].C <= 10.0 * (1 + 1e-9) * (k[1e6].Delta / k[1e5].Delta) ** 1.01
    assert k[1e6].rho_star == pytest.approx(1 / 6.0)


def test_constants_need_lr_g_below_threshold():
    prob = problems.multi_group()
    with pytest.raises(ValueError):
        gd.multi_group_bounds(prob, 2.0 / 3.0 * 1.01, 1.0)
    bd = gd.multi_group_bounds(prob, 1.0 / 3.0, 1.0)
    assert bd.L_gg == pytest.approx(3.0) and math.isfinite(bd.R_g)
    with pytest.raises(ValueError):
        gd.gd_constants(bd, 1.0, 0.7, [1.0, 1.0, 1.0], 0.0)  # c_g = 1.05
    k = gd.gd_constants(bd, 1.0, 1.0 / 3.0, [1.0, 1.0, 1.0], 0.0)
    assert k.c_g == pytest.approx(0.5) and k.kappa == pytest.approx(0.25)
    assert k.rho_star == pytest.approx(1.5 / (2 * k.K))


def test_sphere_bounds_dominate_sampled_values():
    """The analytic A1/A2' bounds of sphere_function exceed the gradient and Hessian norms at random unit points."""
    prob = problems.sphere_function()
    bd = gd.sphere_bounds(prob)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for _ in range(20):
            w = rng.standard_normal(20)
            w /= np.linalg.norm(w)
            p = {"w": jax.numpy.asarray(w)}
            g = np.asarray(prob.grad_closed_form(p)["w"])
            H = np.asarray(prob.hessian_closed_form(p))
            assert np.linalg.norm(g) <= bd.G_w[0] and np.linalg.norm(H, 2) <= bd.L_ww
            assert float(prob.loss(p)) >= bd.L_min


def test_statistics_helpers():
    x = np.log(np.arange(1, 11))
    s, se = gd.ols_slope(x, -x + 3)
    assert s == pytest.approx(-1.0) and se == pytest.approx(0.0, abs=1e-12)
    lo, hi = gd.bootstrap_mean_ci([1.0, 1.0, 1.0])
    assert lo == hi == 1.0
    assert gd.slope_tolerance([0.0, 1.0], 0.1) == pytest.approx(0.2)


def test_multi_group_bounds_dominate_sampled_values():
    """A1/A2' of multi_group on R = {unit w_i, ||g|| <= R_g}: block norms of the closed-form Hessian and the
    intrinsic gradient norms at random points of R stay below the analytic bounds; L >= L_min."""
    prob = problems.multi_group()
    bd = gd.multi_group_bounds(prob, 1.0 / 3.0, 2.0)
    rng = np.random.default_rng(1)
    dims = [A.shape[0] for A in prob.constants["A"]]
    keys = sorted(["g"] + list(bd.groups))  # ravel_pytree order of the closed-form Hessian
    sizes = {"g": 4} | dict(zip(bd.groups, dims))
    start = dict(zip(keys, np.cumsum([0] + [sizes[k] for k in keys])[:-1]))
    sl = lambda k: slice(start[k], start[k] + sizes[k])  # noqa: E731
    with jax.enable_x64(True):
        hess = jax.jit(prob.hessian_closed_form)
        grad = jax.jit(prob.grad_closed_form)
        loss = jax.jit(prob.loss)
        for _ in range(20):
            p = {name: rng.standard_normal(d) for name, d in zip(bd.groups, dims)}
            p = {k: v / np.linalg.norm(v) for k, v in p.items()}
            g = rng.standard_normal(4)
            p["g"] = g * bd.R_g * rng.uniform() / np.linalg.norm(g)
            pj = jax.tree_util.tree_map(jax.numpy.asarray, p)
            H, gr = np.asarray(hess(pj)), jax.device_get(grad(pj))
            assert np.linalg.norm(H[sl("g"), sl("g")], 2) <= bd.L_gg * (1 + 1e-12)
            for i, name in enumerate(bd.groups):
                assert np.linalg.norm(H[sl(name), sl(name)], 2) <= bd.L_ww
                assert np.linalg.norm(H[sl("g"), sl(name)], 2) <= bd.L_gw[i] * (1 + 1e-12)
                assert np.linalg.norm(gr[name]) <= bd.G_w[i]
            assert np.linalg.norm(gr["g"]) <= bd.G_g
            assert float(loss(pj)) >= bd.L_min
