"""proofs_check.checks.dynamics: every claim passes in its quick settings and every negative control is reported
violated. Each claim runs once per module (the ``evidence`` fixture of conftest.py memoises it)."""
import pytest

from tests.helpers import (CURVE_KEYS, assert_claim_holds, assert_controls_listed, assert_controls_violated,
                                 check_curve, curves_of)

CLAIMS = ("C4", "C5", "C6", "C7", "C8", "C13", "I3")

# (claim, a substring of the setting of one negative control)
CONTROLS = [
    ("C4", "sphere/gd+weight_decay"), ("C4", "sphere/gd+momentum"), ("C4", "sphere/gd+projected"),
    ("C4", "epsilon_bn/gd"),
    ("C5", "sphere/gd+weight_decay"),
    ("C6", "sphere/gd+momentum"), ("C6", "sphere/gd+weight_decay"),
    ("C7", "sphere/gd+momentum"), ("C7", "sphere/gd+weight_decay"),
    ("C8", "(3^1 lr_w, 3 w0)"),
    ("C13", "sphere/gd+projected"),
    ("I3", "constants x0.1"),
]


@pytest.mark.parametrize("cid", CLAIMS)
def test_claim_holds(evidence, cid):
    assert_claim_holds(evidence(cid), cid, dtypes=("float64", "float32"))


@pytest.mark.parametrize("cid, setting", CONTROLS)
def test_negative_control_is_violated(evidence, cid, setting):
    # clearly violated, not by a hair: the margin is at least 100 tolerances (or a tenth of the bound)
    assert_controls_violated(evidence(cid), cid, setting=setting, clear_by=100)


def test_every_control_is_listed(evidence):
    """The table above covers every negative control the checks produce."""
    assert_controls_listed(evidence, CONTROLS, CLAIMS)


def test_curves_follow_the_report_convention(evidence):
    """C4, C5 and C6 carry curves ``{name: {x, y, xlabel, ylabel, logy}}`` of at most ~500 points."""
    for cid in ("C4", "C5", "C6"):
        curves = curves_of(evidence(cid))
        assert curves, f"{cid} has no curves"
        for c in curves:
            assert set(c) == CURVE_KEYS
            check_curve(c)


def test_float32_records_use_their_own_tolerance(evidence):
    f32 = [e for e in evidence("C4") if e.dtype == "float32"]
    f64 = [e for e in evidence("C4") if e.dtype == "float64" and not e.negative_control]
    assert f32 and min(e.tolerance for e in f32) > 100 * max(e.tolerance for e in f64 if e.bn == "none")
