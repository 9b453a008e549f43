"""Tests of proofs_check.faults (the fault registry, its patches and the kill matrix) and of its report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from proofs_check import claims as C
from proofs_check import faults as F
from proofs_check import report as R
from proofs_check.claims import ClaimResult
from proofs_check.evidence import Evidence

ROOT = Path(__file__).resolve().parents[1]

NAMED = ("gd-constants/10", "schedule-1/t", "swap-rates", "projection-off", "eff-lr-1/norm", "lanczos-half",
         "verify-labels-off", "bn-epsilon-1e-5", "bn-jvp-no-ymean", "hvp-x1.01")


def test_registry_covers_every_claim_with_at_least_twenty_faults():
    registry = C.load_all()
    assert len(F.FAULTS) >= 20
    assert set(NAMED) <= set(F.FAULTS)
    for f in F.FAULTS.values():
        assert f.claims and set(f.claims) <= set(registry), f.name
        assert f.kind in ("code", "theory") and f.description and f.target
    unnamed = [c for c in registry if not F.faults_of(c) and c not in ("C24", "C25", "C26", "C27")]
    assert not unnamed, f"claims naming no fault: {unnamed}"


def test_applied_patches_and_restores():
    from rate_tuning import layers, optim
    before = (optim.inverse_sqrt, optim.SCHEDULES["inverse_sqrt"], layers.normalize)
    with F.applied(F.FAULTS["schedule-1/t"]):
        assert float(optim.schedule("inverse_sqrt", 1.0)(3)) == 0.25     # lr / (t + 1), not lr / sqrt(t + 1)
    with F.applied(F.FAULTS["bn-epsilon-1e-5"]):
        assert layers.normalize is not before[2]
    assert (optim.inverse_sqrt, optim.SCHEDULES["inverse_sqrt"], layers.normalize) == before
    assert float(optim.schedule("inverse_sqrt", 1.0)(3)) == 0.5


def test_a_fault_is_caught_in_a_fresh_process(tmp_path):
    out = tmp_path / "cells.json"
    subprocess.run([sys.executable, "-m", "proofs_check.faults", "--child", "angle-x2", "--claims", "C7", "--quick",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    cell = json.loads(out.read_text())["C7"]
    assert cell["verdict"] == F.CAUGHT and any("angular update" in s for s in cell["failing"])


def test_kill_matrix_and_coverage_in_the_report(tmp_path):
    result = {"quick": True, "seconds": 1.0, "unnamed": [], "faults": {
        "swap-rates": {"description": "d", "target": "t", "kind": "code", "seconds": 1.0,
                       "claims": {"C901": {"verdict": F.CAUGHT, "failing": ["a record"], "seconds": 0.1}}},
        "other": {"description": "d2", "target": "t2", "kind": "theory", "seconds": 1.0,
                  "claims": {"C901": {"verdict": F.MISSED, "failing": [], "seconds": 0.1}}}}}
    assert not F.matrix_ok(result)
    md = R.write_fault_report(result, tmp_path / "rep", command="python -m proofs_check --faults")
    text = md.read_text()
    assert "1 missed: C901 x other" in text and "| F1 | swap-rates |" in text and "**MISSED**" in text
    assert json.loads((tmp_path / "rep" / R.FAULTS_JSON).read_text())["faults"]["other"]["kind"] == "theory"
    claim = C.Claim("C901", "ref", "st", "hyp", ("c",), lambda s: [], {}, {})
    ev = [Evidence("C901", "s", 0.0, 0.0, "<=", 0.0, "float64", "none")]
    R.write_report([ClaimResult(claim, ev, 0.1)], tmp_path / "rep")
    report = (tmp_path / "rep" / R.REPORT).read_text()
    assert "## Coverage" in report and "Lemma 2.4 (1) and (2)" in report and "**not checked**" in report
    assert "### Kill matrix" in report and "swap-rates" in report
