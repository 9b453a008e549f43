"""proofs_check.checks.experiments: C22 and C23 pass in their quick settings and their negative controls are
reported violated. They use Fashion-MNIST when its files are installed and scikit-learn digits otherwise,
so they always run; each record's setting names the dataset. Each claim runs once per module (the
``evidence`` fixture of conftest.py)."""
import numpy as np
import pytest

from proofs_check import claims
from proofs_check.checks import experiments as X
from rate_tuning import data
from tests.helpers import assert_claim_holds, check_curve, curves_of

CLAIMS = ("C22", "C23")


def _fashion_available() -> bool:
    try:
        data.fashion_mnist(limit_train=1, limit_test=1)
    except data.DataError:
        return False
    return True


@pytest.mark.parametrize("cid", CLAIMS)
def test_claim_holds(evidence, cid):
    assert_claim_holds(evidence(cid), cid, dtypes=("float32", "float64"), tolerance_positive=False, finite=False)


def test_c22_trains_for_every_lr(evidence):
    per_lr = [e for e in evidence("C22") if not e.negative_control and "final/initial training loss (worst seed)"
              in e.setting]
    assert len(per_lr) == len(X.LR_GRID) and max(X.LR_GRID) / min(X.LR_GRID) >= 1e6
    assert all(e.measured <= X.FRACTION for e in per_lr)


def test_c22_control_no_bn_is_violated(evidence):
    (ctrl,) = [e for e in evidence("C22") if e.negative_control and "no_bn" in e.setting]
    assert "no_bn" in ctrl.setting and not ctrl.passed and ctrl.ok and "breaks" in ctrl.details
    assert np.isfinite(ctrl.measured) and ctrl.measured >= 1  # a count of runs that do not train
    assert ctrl.details["lr_w_not_training"], "the no_bn MLP trained at every lr_w"
    assert min(ctrl.details["lr_w_not_training"]) >= 1.0  # it fails at the large end of the grid


def test_c23_control_plain_sgd_trains_at_large_lr(evidence):
    controls = [e for e in evidence("C23") if e.negative_control]
    assert len(controls) == len(claims.REGISTRY["C23"].quick["large"])
    for e in controls:
        assert "not projected" in e.setting and not e.passed and e.ok and "breaks" in e.details


def test_c23_projected_fails_at_large_lr(evidence):
    recs = [e for e in evidence("C23") if not e.negative_control]
    assert recs and all("projected" in e.setting and e.measured >= X.FRACTION for e in recs)


@pytest.mark.parametrize("cid", CLAIMS)
def test_records_name_their_dataset(evidence, cid):
    name = "Fashion-MNIST" if _fashion_available() else "scikit-learn digits"
    for e in evidence(cid):
        assert name in e.setting, e.setting


def test_curves(evidence):
    """The report's curve convention with several series (proofs_check.report); diverged runs are NaN."""
    for cid in CLAIMS:
        curves = curves_of(evidence(cid))
        assert len(curves) == 2, cid
        for c in curves:
            check_curve(c)
            assert isinstance(c["y"], dict) and len(c["y"]) >= 2
            for y in c["y"].values():
                assert np.any(np.isfinite(y))


def test_fallback_to_digits(monkeypatch, tmp_path):
    """Without Fashion-MNIST files the experiments use scikit-learn digits and say so."""
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "missing"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "missing"))
    x, y, desc = X.load_data.__wrapped__("fashion_mnist", 2048, 2)
    assert "digits" in desc and "unavailable" in desc
    assert x.shape == (X.FALLBACK_N, 64) and x.dtype == np.float32 and y.shape == (X.FALLBACK_N,)
    assert np.allclose(x.mean(axis=0), 0, atol=1e-5)


def test_c22_sweep_reaches_the_si_params_and_labels_are_verified(evidence):
    growth = [e for e in evidence("C22") if "Lemma 2.4 summed" in e.setting]
    assert growth and all(e.passed for e in growth)
    assert any("lr_w=10000" in e.setting for e in growth)     # the largest lr_w is always recorded
    labels = [e for e in evidence("C22") if "verify_labels" in e.setting]
    assert [e.negative_control for e in labels] == [False, True] and all(e.ok for e in labels)
