"""proofs_check.checks.followups (C24-C27, beyond the paper): every claim passes in its quick settings, every
negative control is reported violated, and the closed forms the checks use are right. Each claim runs once
per module (the ``evidence`` fixture of conftest.py memoises it)."""
import math

import numpy as np
import pytest

from proofs_check.checks import followups as F
from tests.helpers import (CURVE_KEYS, assert_claim_holds, assert_controls_listed, assert_controls_violated,
                           check_curve, curves_of)

CLAIMS = ("C24", "C25", "C26", "C27")

# (claim, a substring of the setting of one negative control)
CONTROLS = [
    ("C24", "eta alpha^(-2t),"), ("C24", "alpha0 ="), ("C24", "sphere/gd-past-destabilisation"),
    ("C25", "noisy/sgd-no-wd"), ("C25", "noisy/sgdm"), ("C25", "mlp/sgdm"),
    ("C26", "noisy/sgd-no-wd"), ("C26", "noisy/sgdm"), ("C26", "mlp/sgdm"),
    ("C27", "no projection"),
]


@pytest.mark.parametrize("cid", CLAIMS)
def test_claim_holds(evidence, cid):
    assert_claim_holds(evidence(cid), cid)


@pytest.mark.parametrize("cid, setting", CONTROLS)
def test_negative_control_is_violated(evidence, cid, setting):
    # clearly violated: by at least 100 tolerances or a tenth of the bound
    assert_controls_violated(evidence(cid), cid, setting=setting, clear_by=100, finite=True)


def test_every_control_is_listed(evidence):
    assert_controls_listed(evidence, CONTROLS, CLAIMS)


def test_curves_follow_the_report_convention(evidence):
    for cid in CLAIMS:
        curves = curves_of(evidence(cid))
        assert curves, f"{cid} has no curves"
        for c in curves:
            assert CURVE_KEYS <= set(c)
            check_curve(c)
            if c["xlabel"] == "step":  # per-step curves span the run, not the number of series
                assert c["x"][-1] >= 999, (cid, c["ylabel"], c["x"][-1])


def test_c24_is_round_off_and_its_tolerance_is_far_below_the_controls(evidence):
    """The claim records measure round-off (below 1e-11) and the tolerance sits between them and the
    controls, which miss the exact schedule by one factor alpha."""
    records = [e for e in evidence("C24") if not e.negative_control]
    assert max(e.measured for e in records) < 1e-11
    controls = [e for e in evidence("C24") if e.negative_control]
    assert min(c.measured for c in controls) > 1e3 * max(e.tolerance for e in records if "direction" in e.setting)
    # the twin (run B with every rate changed by ~1e-15) stays at round-off before the destabilisation, and
    # separates as much as the two runs after it: the control fails through the dynamics, not the identity
    for e in evidence("C24"):
        if "direction" in e.setting and not e.negative_control:
            assert e.details["twin_max_direction_distance"] < 1e-11
    late = [e for e in controls if "past-destabilisation" in e.setting][0]
    assert late.details["twin_max_direction_distance"] > 1e-3 and late.details["first_step_twin_apart_1e-10"] > 2000


def test_c25_c26_bands_are_measured_and_stated(evidence):
    for cid, key in (("C25", "r4_sd"), ("C26", "angle_band")):
        for e in evidence(cid):
            assert "band" in e.details and e.details[key] > 0
            assert e.tolerance == pytest.approx(2 * e.details["r4_sd"] if cid == "C25" else e.details["angle_band"])


def test_c27_reports_boundaries_and_per_regime_statistics(evidence):
    main = [e for e in evidence("C27") if not e.negative_control and "regimes present" in e.setting][0]
    b = main.details["boundaries"]
    assert set(b) == {"converges -> chaotic equilibrium", "chaotic equilibrium -> does not train"}
    lo, hi = b["converges -> chaotic equilibrium"]["estimate"], b["chaotic equilibrium -> does not train"]["estimate"]
    assert lo < hi
    assert set(main.details["per_regime_ranges"]) == set(F.REGIMES)
    for s in main.details["per_rate"]:
        assert set(s) >= {"level", "loss_fluctuation", "mean_angle", "angle_spread", "regime"}


# -------------------------------------------------------------------------------------------------------
# closed forms
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta, lam, gamma", [(0.1, 1e-3, 0.0), (0.01, 1e-2, 0.9), (0.01, 5e-2, 0.9), (0.5, 1e-3, 0.5)])
def test_exp_lr_alpha_is_the_larger_root(eta, lam, gamma):
    alpha, log_alpha = F.exp_lr_alpha(eta, lam, gamma)
    assert math.log(alpha) == pytest.approx(log_alpha, rel=1e-12)
    if gamma:
        roots = np.roots([1.0, -(1 + gamma - eta * lam), gamma])
        assert alpha == pytest.approx(max(roots.real), rel=1e-12)
        assert alpha**2 - (1 + gamma - eta * lam) * alpha + gamma == pytest.approx(0.0, abs=1e-15)
    else:
        assert alpha == pytest.approx(1 - eta * lam, rel=1e-15)


def test_exp_lr_alpha_refuses_complex_roots():
    with pytest.raises(ValueError, match="no real root"):
        F.exp_lr_alpha(1.0, 0.5, 0.9)


def test_equilibrium_formulas_reduce_to_van_laarhoven_and_wan():
    eta, lam, L = 0.1, 0.02, 19.0
    assert F.equilibrium_norm4(eta, lam, L) == pytest.approx(eta * L / (lam * (2 - eta * lam)))
    assert F.equilibrium_norm4(eta, lam, L, 0.9) == pytest.approx(eta * L / (lam * 0.1 * (2 - eta * lam / 1.9)))
    assert F.equilibrium_norm4(eta, 0.0, L) == math.inf
    assert F.angular_update_limit(eta, lam) == pytest.approx(math.sqrt(2 * eta * lam))
    assert F.angular_update_limit(eta, lam, 0.9) == pytest.approx(math.sqrt(2 * eta * lam / 1.9))


def test_regime_rule():
    assert [F.classify_regime(a) for a in (0.0, 0.099, 0.1, 0.999, 1.0, math.pi / 2, math.nan)] == [0, 0, 1, 1, 2, 2, 2]


def test_c24_fails_when_the_schedule_ignores_momentum(monkeypatch):
    """A fault in the theory's input (the momentum-free root used for the momentum run) fails the claim."""
    monkeypatch.setattr(F, "exp_lr_alpha", lambda eta, lam, momentum=0.0: (1 - eta * lam, math.log1p(-eta * lam)))
    records = F.check_c24({"settings": ("sphere/momentum",)})
    assert any(not e.passed for e in records if not e.negative_control)
