"""Assertions shared by the tests of the claim checks (``tests/test_<family>.py``), on the evidence that the
``evidence`` fixture of ``conftest.py`` memoises: every claim record holds, every negative control is
reported violated (clearly, not by a hair), and curves follow the report's convention."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from proofs_check.evidence import Evidence

CURVE_KEYS = {"x", "y", "xlabel", "ylabel", "logy"}
"""The keys every curve has (:mod:`proofs_check.report`); ``'logx'`` is the one optional key checks set."""


def describe(records: Iterable[Evidence]) -> str:
    """One line per record: measured, relation, bound, tolerance and setting."""
    return "\n".join(f"  measured={e.measured:.4e} {e.relation} {e.bound:.4e} +- {e.tolerance:.2e}: {e.setting}"
                     for e in records)


def assert_claim_holds(evidence: Sequence[Evidence], cid: str, *, dtypes: tuple[str, ...] = ("float64",),
                       tolerance_positive: bool = True, finite: bool = True) -> list[Evidence]:
    """Claim ``cid`` has records and each passes, with a dtype in ``dtypes``, a tolerance ``> 0``
    (``>= 0`` unless ``tolerance_positive``) and, when ``finite``, a finite measurement. Returns the records."""
    records = [e for e in evidence if not e.negative_control]
    assert records, f"{cid} produced no claim record"
    failed = [e for e in records if not e.passed]
    assert not failed, f"{cid}: records that do not hold:\n{describe(failed)}"
    for e in records:
        assert e.tolerance > 0 if tolerance_positive else e.tolerance >= 0, describe([e])
        assert not finite or np.isfinite(e.measured), describe([e])
        assert e.dtype in dtypes, describe([e])
    return records


def assert_controls_violated(evidence: Sequence[Evidence], cid: str, *, setting: str | None = None,
                             breaks: str | None = None, count: int | None = None, clear_by: float | None = 100.0,
                             finite: bool = False) -> list[Evidence]:
    """The negative controls of ``cid`` whose setting contains ``setting`` (and whose ``details['breaks']`` is
    ``breaks``, if given) exist (exactly ``count`` of them, if given) and are each confirmed: the relation
    fails on a measured number and the record names the hypothesis it breaks. With ``clear_by``, each fails
    clearly: by more than ``clear_by`` tolerances or a tenth of the bound. Returns the controls."""
    matches = [e for e in evidence if e.negative_control and (setting is None or setting in e.setting)
               and (breaks is None or e.details.get("breaks") == breaks)]
    what = f"setting {setting!r}" if breaks is None else f"the declared control {breaks!r}"
    if count is None:
        assert matches, f"{cid}: no negative control with {what}"
    else:
        assert len(matches) == count, f"{cid}: expected {count} controls with {what}, got {len(matches)}"
    for e in matches:
        assert not e.passed and e.ok and "breaks" in e.details, f"{cid} control not detected:\n{describe([e])}"
        assert not finite or np.isfinite(e.measured), describe([e])
        if clear_by is not None:
            assert -e.margin > clear_by * e.tolerance or -e.margin > 0.1 * abs(e.bound), describe([e])
    return matches


def assert_controls_listed(evidence_of, controls: Iterable[tuple], claims: Iterable[str]) -> None:
    """Every negative control that the claims produce matches a ``(claim, setting substring, ...)`` entry
    of ``controls`` (the test table covers them all)."""
    controls = list(controls)
    for cid in claims:
        for e in evidence_of(cid):
            if e.negative_control:
                assert any(c[0] == cid and c[1] in e.setting for c in controls), e.setting


def curves_of(evidence: Sequence[Evidence]) -> list[dict]:
    """Every curve attached to the records."""
    return [c for e in evidence for c in e.details.get("curves", {}).values()]


def check_curve(c: dict, finite: bool = False) -> None:
    """The report's curve convention: the keys of :data:`CURVE_KEYS` (and maybe ``'logx'``), ``y`` a list or
    ``{label: list}`` of the length of ``x``, at most 500 points; with ``finite``, every value finite."""
    assert CURVE_KEYS <= set(c) <= CURVE_KEYS | {"logx"}, set(c)
    ys = c["y"] if isinstance(c["y"], dict) else {"": c["y"]}
    assert 0 < len(c["x"]) <= 500
    for y in ys.values():
        assert len(y) == len(c["x"])
        if finite:
            assert np.all(np.isfinite(y))
