"""Helpers shared by the test modules (no test module imports another): tiny models of every architecture
on a digits batch, and the assertions the claim tests share.

Crash injection for the resume tests lives in :mod:`tests.crash` (it is also a command).
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from proofs_check.evidence import Evidence
from rate_tuning import data, models

# Tiny versions of every architecture, on 8x8 digits images.
TINY = {"mlp": dict(widths=(8, 8)), "convnet": dict(channels=(4, 8)), "vgg": dict(config=(4, "M", 8, "M")),
        "resnet": dict(stage_channels=(4, 8))}


@functools.lru_cache(maxsize=None)
def digits_batch(n=32):
    ds = data.digits(seed=0)
    return np.asarray(ds.x_train[:n]), np.asarray(ds.y_train[:n])


def build(arch, preset, bn=None, seed=0):
    """Model, float64 params and batch stats, and the train-mode loss on a fixed digits batch."""
    x, y = digits_batch()
    x = jnp.asarray(x, jnp.float64)
    model = models.build(arch, preset, bn=bn, num_classes=10, param_dtype=jnp.float64, **TINY[arch])
    variables = model.init(jax.random.key(seed), x)
    stats = variables.get("batch_stats", {})
    loss = lambda p: models.batch_loss(model, p, stats, x, jnp.asarray(y))[0]
    return model, variables["params"], loss


# ------------------------------------------------------------------------------------------------
# Claims: Assertions shared by the tests of the claim checks (``tests/test_<family>.py``), on the evidence that the

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
