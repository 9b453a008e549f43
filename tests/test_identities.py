"""Tests of proofs_check.checks.identities: claims C1, C2, C3, C19, C20, C21 at their quick settings.

Each claim runs once per module (the ``evidence`` fixture of conftest.py); one test per claim asserts that
every non-control record holds, one test per declared negative control asserts that its records exist and
are reported violated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proofs_check import claims
from proofs_check import report
from proofs_check.checks import identities as I
from rate_tuning import groups as G
from rate_tuning import models as M
from tests.helpers import assert_claim_holds, assert_controls_violated, describe

IDS = ("C1", "C2", "C3", "C19", "C20", "C21")
REGISTRY = claims.load_all()


def test_identity_claims_are_registered():
    for cid in IDS:
        c = REGISTRY[cid]
        assert c.check.__module__ == I.__name__
        assert c.negative_controls and c.statement and c.paper_ref and c.hypotheses
        assert c.quick and c.full


@pytest.mark.parametrize("cid", IDS)
def test_claim_records_hold(evidence, cid):
    assert_claim_holds(evidence(cid), cid)
    for e in evidence(cid):
        assert e.claim == cid and e.dtype == "float64" and e.tolerance > 0
        assert e.bn in ("exact", "smooth", "standard", "eval-mode", "none")
        assert "op_count" in e.details


@pytest.mark.parametrize("cid,control", [(c, n) for c in IDS for n in REGISTRY[c].negative_controls],
                         ids=[f"{c}-control{i}" for c in IDS for i in range(len(REGISTRY[c].negative_controls))])
def test_negative_control_is_violated(evidence, cid, control):
    records = assert_controls_violated(evidence(cid), cid, breaks=control, clear_by=None)
    for e in records:  # clearly above round-off: at least 1e3 times the tolerance (counts: a whole error)
        if "(label errors)" in e.setting:
            assert e.measured >= 1, describe([e])
            continue
        assert e.measured > 1e3 * (e.bound + e.tolerance), describe([e])


@pytest.mark.parametrize("cid", IDS)
def test_every_control_record_names_a_declared_control(evidence, cid):
    declared = set(REGISTRY[cid].negative_controls)
    for e in evidence(cid):
        if e.negative_control:
            assert e.details.get("breaks") in declared, e.setting
        else:
            assert "breaks" not in e.details


def test_x64_is_enabled_per_check_and_restored():
    before = jax.config.read("jax_enable_x64")
    with jax.enable_x64(False):
        result = claims.run(REGISTRY["C2"], quick=True)  # float64 inside although off outside
        assert not jax.config.read("jax_enable_x64")
        assert jnp.zeros(()).dtype == jnp.float32
    assert jax.config.read("jax_enable_x64") == before
    worst = max(e.measured for e in result.evidence if not e.negative_control)
    assert worst < 1e-13  # float32 round-off would be ~1e-7


def test_op_count_counts_reduction_lengths():
    with jax.enable_x64(True):
        assert I.op_count(lambda w: w @ w, jnp.ones(8)) == 8
        assert I.op_count(lambda x: jnp.sum(x, axis=0), jnp.ones((5, 3))) == 5
        assert I.op_count(lambda x: jnp.sin(x) * 2.0, jnp.ones(4)) == 2
        conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert I.op_count(conv, jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))) == 27


def test_numpy_group_helpers_match_rate_tuning_groups():
    with jax.enable_x64(True):
        model = M.build("convnet", "paper", num_classes=10, param_dtype=jnp.float64, channels=(4, 8))
        x = np.random.default_rng(0).standard_normal((6, 8, 8, 1))
        labels = model.labels("channel")
        params, _ = I._init_variables(model, x, model.labels("layer"), 0, eval_stats=False)
        other = I._random_like(params, 1)
        ours, theirs = I._group_dot(params, other, labels), G.group_inner(params, other, labels)
        assert set(ours) == set(theirs)
        for k in ours:
            np.testing.assert_allclose(ours[k], np.asarray(theirs[k]), rtol=1e-13, atol=0)
        factors = I._channel_factors(params, labels, 3, 10.0)
        scaled, ref = I._scale(params, labels, factors), G.scale_groups(params, labels, factors)
        for a, b in zip(jax.tree_util.tree_leaves(scaled), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_nan_measurement_fails_a_claim_record():
    assert np.isnan(I._worst([np.array([1e-16, np.nan])]))
    e = I._ev("C1", "nan", float("nan"), 1e-13, bn="exact")
    assert not report.record_ok(e)
    c = I._ev("C1", "nan control", float("nan"), 1e-13, bn="exact", control="x")
    assert not report.record_ok(c)  # a NaN is never a confirmed violation
