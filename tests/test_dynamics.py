"""proofs_check.checks.dynamics: every claim passes in its quick settings and every negative control is reported
violated. Each claim runs once per module (the fixture memoises the evidence)."""
import jax
import numpy as np
import pytest

from proofs_check import claims
from proofs_check.checks import dynamics as D  # noqa: F401  (registers C4-C8, C13, I3)
from proofs_check.evidence import Evidence

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


@pytest.fixture(scope="module")
def evidence():
    """``claim id -> list[Evidence]`` of the quick settings, each claim run once (via ``claims.run``)."""
    cache: dict[str, list[Evidence]] = {}
    x64_before = jax.config.jax_enable_x64

    def get(cid: str) -> list[Evidence]:
        if cid not in cache:
            cache[cid] = claims.run(claims.REGISTRY[cid], quick=True).evidence
            assert jax.config.jax_enable_x64 == x64_before, f"{cid} left jax_enable_x64 changed"
        return cache[cid]

    return get


@pytest.mark.parametrize("cid", CLAIMS)
def test_claim_holds(evidence, cid):
    records = [e for e in evidence(cid) if not e.negative_control]
    assert records, f"{cid} produced no claim record"
    for e in records:
        assert e.passed, f"{cid} failed: {e.setting}: measured {e.measured:.3e} {e.relation} {e.bound:.3e} " \
                         f"(tolerance {e.tolerance:.2e}); details {e.details.get('step')}"
        assert e.tolerance > 0 and np.isfinite(e.measured)
        assert e.dtype in ("float64", "float32")


@pytest.mark.parametrize("cid, setting", CONTROLS)
def test_negative_control_is_violated(evidence, cid, setting):
    matches = [e for e in evidence(cid) if e.negative_control and setting in e.setting]
    assert matches, f"{cid}: no negative control with setting {setting!r}"
    for e in matches:
        assert not e.passed, f"{cid} control not detected: {e.setting}: measured {e.measured:.3e}"
        assert e.ok and "breaks" in e.details
        # clearly violated, not by a hair: the margin is at least 100 tolerances (or the bound itself)
        assert -e.margin > 100 * e.tolerance or -e.margin > 0.1 * abs(e.bound)


def test_every_control_is_listed(evidence):
    """The table above covers every negative control the checks produce."""
    for cid in CLAIMS:
        for e in evidence(cid):
            if e.negative_control:
                assert any(c == cid and s in e.setting for c, s in CONTROLS), e.setting


def test_curves_follow_the_report_convention(evidence):
    """C4, C5 and C6 carry curves ``{name: {x, y, xlabel, ylabel, logy}}`` of at most ~500 points."""
    for cid in ("C4", "C5", "C6"):
        curves = [c for e in evidence(cid) for c in e.details.get("curves", {}).values()]
        assert curves, f"{cid} has no curves"
        for c in curves:
            assert set(c) == {"x", "y", "xlabel", "ylabel", "logy"}
            assert len(c["x"]) == len(c["y"]) <= 500


def test_float32_records_use_their_own_tolerance(evidence):
    f32 = [e for e in evidence("C4") if e.dtype == "float32"]
    f64 = [e for e in evidence("C4") if e.dtype == "float64" and not e.negative_control]
    assert f32 and min(e.tolerance for e in f32) > 100 * max(e.tolerance for e in f64 if e.bn == "none")


def test_tolerance_helpers():
    u = D.unit_roundoff("float64")
    assert u == 2.0**-53
    assert D.gamma(10, "float64") == pytest.approx(10 * u, rel=1e-12)
    assert D.tol_norm_identity(20, "float32") == pytest.approx(66 * 2.0**-24, rel=1e-5)
