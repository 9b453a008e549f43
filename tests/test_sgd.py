"""proofs_check.checks.sgd: C16-C18 pass in their quick settings and every negative control is reported violated
(each claim runs once per module: the ``evidence`` fixture of conftest.py); the helpers against closed forms."""
import math

import numpy as np
import pytest

from proofs_check import claims
from proofs_check.checks import sgd as S
from tests.helpers import assert_claim_holds, assert_controls_violated, check_curve, curves_of

CLAIMS = ("C16", "C17", "C18")

# (claim, a substring of the setting of a negative control, expected number of such records)
CONTROLS = [("C16", "constant", 3), ("C17", "no noise", 3), ("C18", "projected SGD", 1)]


@pytest.mark.parametrize("cid", CLAIMS)
def test_claim_holds(evidence, cid):
    assert_claim_holds(evidence(cid), cid)


@pytest.mark.parametrize("cid, setting, count", CONTROLS)
def test_negative_control_is_violated(evidence, cid, setting, count):
    # clearly violated, not by a hair: by at least 10 tolerances or a tenth of the bound
    assert_controls_violated(evidence(cid), cid, setting=setting, count=count, clear_by=10)


def test_c16_records_per_lr(evidence):
    recs = [e for e in evidence("C16") if not e.negative_control]
    lrs = claims.REGISTRY["C16"].quick["lr_w"]
    # per lr_w: the (1 + ln T), increment and quartic bounds, and the a-priori bound in expectation (upper) with
    # its Theta(log T) lower side
    assert len(recs) == 5 * len(lrs)
    upper = [e for e in recs if "a-priori bound in expectation" in e.setting]
    assert len(upper) == len(lrs) and min(e.details["slack_bound_over_measured"] for e in upper) <= 10
    # the constant-lr increments exceed the inverse-sqrt bound by orders of magnitude (~ (T'-T)/ln(T'/T))
    assert min(e.measured for e in evidence("C16") if e.negative_control) > 100


def test_c17_matches_the_papers_toy_numbers(evidence):
    """PAPER §7 C17: 0.382, 38.1, 3816 for lr_w = 0.1, 1, 10 (prediction 2 lr^2 19); our late-window rate."""
    window = {e.details["lr"]: e for e in evidence("C17") if not e.negative_control and e.details["window"][0] > 0}
    for lr, toy in ((0.1, 0.382), (1.0, 38.1), (10.0, 3816.0)):
        assert abs(window[lr].measured / toy - 1) < 0.01
        assert window[lr].details["noise_floor_prediction"] == pytest.approx(2 * lr**2 * 19)
        # the closed-form standard error agrees with the seed-to-seed one within a factor 2
        assert 0.5 < window[lr].details["empirical_se"] / window[lr].details["se"] < 2


def test_c18_slopes_have_intervals(evidence):
    for e in evidence("C18"):
        lo, hi = e.details["ci95"]
        assert lo <= e.details["slope"] <= hi
        assert e.measured == (lo if e.negative_control else hi)
        assert e.tolerance == pytest.approx(S.polylog_allowance(np.asarray(e.details["T_grid"])))


def test_curves_follow_the_report_convention(evidence):
    for cid in CLAIMS:
        curves = curves_of(evidence(cid))
        assert curves, f"{cid} has no curves"
        for c in curves:
            check_curve(c, finite=True)


# ----------------------------------------------------------------------------------------------- helpers


def test_harmonic_and_log_grid():
    assert S.harmonic(np.array([1, 2, 4])) == pytest.approx([1.0, 1.5, 1 + 1 / 2 + 1 / 3 + 1 / 4])
    T = np.array([10, 1000, 100000])
    assert np.all(S.harmonic(T) <= 1 + np.log(T))
    g = S.log_grid(10, 10000, 4)
    assert g[0] == 10 and g[-1] == 10000 and len(g) == 13 and np.all(np.diff(g) > 0)


def test_loglog_slopes_of_power_laws():
    Ts = S.log_grid(100, 10000, 8)
    y = np.stack([3.0 * Ts**-0.5, 0.1 * Ts**-1.0, np.ones(len(Ts))])
    assert S.loglog_slopes(Ts, y) == pytest.approx([-0.5, -1.0, 0.0], abs=1e-12)


def test_polylog_allowance_bounds_the_derived_bound():
    """The slope of any (A + B ln T)(C + D ln T)/sqrt(T), A..D >= 0, is at most -1/2 + allowance <= 2/ln T1."""
    Ts = S.log_grid(100, 10000, 8)
    allowance = S.polylog_allowance(Ts)
    assert 0 < allowance < 2 / math.log(100)
    rng = np.random.default_rng(0)
    for A, B, C, D in rng.uniform(0, 5, size=(200, 4)):
        f = (A + B * np.log(Ts)) * (C + D * np.log(Ts)) / np.sqrt(Ts)
        assert S.loglog_slopes(Ts, f[None])[0] <= -0.5 + allowance + 1e-12


def test_rate_slope_estimator_and_bootstrap():
    """Block means of the seed average, min over blocks ending by T: unbiased slope for a noisy T^-1/2 and ~0
    for a stationary sequence (a step-wise running min of the noisy mean would fall with T in both)."""
    rng = np.random.default_rng(1)
    steps = np.arange(0, 10000, 10)
    noise = rng.exponential(1.0, size=(32, len(steps)))
    truth = (steps + 1.0) ** -0.5
    slope, (lo, hi), Ts, M, boot = S.rate_slope(truth[None] * noise, steps, 100, 10000)
    assert len(boot) == S.BOOTSTRAP and lo <= slope <= hi and Ts[0] >= 100 and Ts[-1] == 10000
    assert np.all(np.diff(M) <= 0)
    assert lo < -0.5 < hi
    flat = S.rate_slope(noise, steps, 100, 10000)
    assert abs(flat[0]) < 0.02 and flat[1][0] > -0.05
    stepwise = np.minimum.accumulate(noise.mean(axis=0))[np.searchsorted(steps, Ts) - 1]
    assert S.loglog_slopes(Ts, stepwise[None])[0] < flat[0] - 0.02   # the bias the block means avoid


def test_block_means():
    values = np.arange(12.0)[None] * np.ones((2, 1))
    means, ends = S.block_means(values, np.arange(12), np.array([0, 1, 4, 12]))
    assert means[0].tolist() == [0.0, 2.0, 7.5] and ends.tolist() == [1, 4, 12]


def test_quartic_identity_on_a_hand_run():
    """r_T^4 = r_0^4 + 2 lr^2 sum a^2 + lr^4 sum a^4 / r^4 for the norm recursion of Lemma 2.4 (C17's transient)."""
    rng = np.random.default_rng(2)
    lr, r2 = 3.0, [1.0]
    a2 = rng.chisquare(19, size=500)
    for a in a2:
        r2.append(r2[-1] + lr**2 * a / r2[-1])
    r2 = np.asarray(r2)
    rhs = 1.0 + 2 * lr**2 * a2.sum() + lr**4 * np.sum(a2**2 / r2[:-1] ** 2)
    assert r2[-1] ** 2 == pytest.approx(rhs, rel=1e-12)


def test_noise_floor_of_the_problem():
    sigma2, floor = S.noise_floor(S._problem("noisy_sphere"))
    assert sigma2 == 1.0 and floor == 19.0
