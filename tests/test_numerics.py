"""proofs_check.numerics and proofs_check.curves: the round-off helpers against closed forms, the numpy init,
and the curve convention of the report."""
import jax
import numpy as np
import pytest

from proofs_check import curves, numerics, problems


def test_tolerance_helpers():
    u = numerics.unit_roundoff("float64")
    assert u == 2.0**-53
    assert numerics.gamma(10, "float64") == pytest.approx(10 * u, rel=1e-12)
    assert numerics.tol_norm_identity(20, "float32") == pytest.approx(66 * 2.0**-24, rel=1e-5)


def test_x64_is_scoped():
    before = jax.config.jax_enable_x64
    with numerics.x64():
        assert jax.numpy.zeros(()).dtype == np.float64
    assert numerics.in_x64(lambda s: jax.numpy.zeros(()).dtype)({}) == np.float64
    assert jax.config.jax_enable_x64 == before


def test_numpy_init_scales_every_si_group(x64):
    prob = problems.multi_group()
    p = numerics.numpy_init(prob, 0, 0.3, "float64")
    for name in ("w0", "w1", "w2"):
        assert np.linalg.norm(p[name]) == pytest.approx(0.3, rel=1e-15)
    again = numerics.numpy_init(prob, 0, 0.3, "float64")
    assert all(np.array_equal(p[k], again[k]) for k in p) and p["g"].dtype == np.float64


def test_curve_subsamples_and_keeps_series_aligned():
    x = np.arange(1, 10_001)
    c = curves.curve(x, {"a": x**-0.5, "b": np.ones(len(x))}, "t", "y", logy=True, logx=True)
    assert set(c) == {"x", "y", "xlabel", "ylabel", "logy", "logx"}
    assert len(c["x"]) <= curves.MAX_POINTS and c["x"][0] == 1 and c["x"][-1] == 10_000
    assert all(len(v) == len(c["x"]) for v in c["y"].values())
    short = curves.curve(None, [3.0, 0.0, -1e-20], "step", "|r|", logy=False)
    assert short["x"] == [0.0, 1.0, 2.0] and "logx" not in short
    assert curves.magnitude([3.0, 0.0, -1e-20]).tolist() == [3.0, 1e-20, 1e-20]
