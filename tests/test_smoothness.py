"""proofs_check.checks.assumptions (A1, I2) and proofs_check.smoothness: the claims pass in their quick settings,
their controls are violated, and the instruments agree with closed forms."""
import math

import numpy as np
import pytest

from proofs_check import smoothness as S
from proofs_check.checks import assumptions as A
from tests.helpers import assert_claim_holds, assert_controls_violated, check_curve, curves_of


@pytest.mark.parametrize("cid", ("A1", "I2"))
def test_claim_holds(evidence, cid):
    assert_claim_holds(evidence(cid), cid, tolerance_positive=False)


@pytest.mark.parametrize("cid, setting", [("A1", "exact BN (eps = 0) + ReLU"), ("I2", "weight decay 1e-2")])
def test_negative_control_is_violated(evidence, cid, setting):
    assert_controls_violated(evidence(cid), cid, setting=setting, clear_by=100)


def test_a1_growth_exponents(evidence):
    """Exact BN: ||H_ww|| ~ 1/sigma^2 (exponent -1 to 1e-3); smooth BN: flat (|p| < 0.05)."""
    rec = [e for e in evidence("A1") if "exponent" in e.setting]
    exact = next(e for e in rec if e.negative_control)
    smooth = next(e for e in rec if not e.negative_control)
    assert abs(exact.measured + 1.0) < 1e-3, exact
    assert abs(smooth.measured) < 0.05, smooth
    for c in curves_of(rec):
        check_curve(c, finite=True)


def test_a1_bound_refuses_the_exact_network():
    with pytest.raises(ValueError, match="smoothed network"):
        S.a1_bound(S.small_net(eps=0.0, activation="relu"))


def test_block_norms_on_a_known_matrix():
    """Diagonal blocks: largest |eigenvalue|; off-diagonal: largest singular value."""
    H = np.zeros((4, 4))
    H[:2, :2] = [[-3.0, 0.0], [0.0, 1.0]]
    H[2:, 2:] = [[2.0, 0.0], [0.0, 0.5]]
    H[0, 2] = H[2, 0] = 5.0
    masks = [np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)]   # one SI group, then g
    bn = S.block_norms(H, masks)
    assert bn["L_ww_diag"][0] == 3.0 and bn["L_gg"][0] == 2.0 and bn["L_gw"][0] == 5.0


def test_segment_dip_closed_form():
    """An orthogonal step never dips; a step with an inward part dips by -cos^2 (the quadratic's minimum)."""
    labels = {"w": A.G.si("w")}
    w0 = np.array([1.0, 0.0, 0.0])
    ortho = {"w": np.stack([w0, w0 + np.array([0.0, 0.3, 0.0])])}
    assert A.segment_dip(ortho, labels)["dip"].min() == 0.0
    D = np.array([-0.01, 0.2, 0.0])   # s* = 0.01 / 0.0401 inside [0, 1]
    inward = {"w": np.stack([w0, w0 + D])}
    cos2 = (w0 @ D) ** 2 / (D @ D)
    assert math.isclose(A.segment_dip(inward, labels)["dip"].min(), -cos2, rel_tol=1e-12)


def test_segment_tolerance_is_a_few_ulps():
    assert 0 < A.tol_segment(100, 1.0) < 1e-13


def test_c15_records_a_refused_rate_instead_of_raising():
    """Under the fault lr-g-threshold-x2 the GD program refuses its rates; C15 records failures, no exception."""
    from proofs_check import claims as C
    from proofs_check import faults as F
    registry = C.load_all()
    with F.applied(F.FAULTS["lr-g-threshold-x2"]):
        res = C.run(registry["C15"], quick=True)
    assert not res.ok
    assert any("refused" in e.setting or "labelled c_g" in e.setting for e in res.evidence if not e.ok)
