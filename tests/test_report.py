"""Tests of proofs_check.report and of the command line ``python -m proofs_check``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proofs_check import __main__ as cli
from proofs_check import report as R
from proofs_check.claims import Claim, ClaimResult
from proofs_check.evidence import Evidence

ROOT = Path(__file__).resolve().parents[1]


def _claim(cid: str, records=(), error: Exception | None = None) -> Claim:
    def check(settings):
        if error is not None:
            raise error
        return list(records)

    return Claim(cid, f"Lemma {cid[1:]}", f"statement of {cid} | with a pipe", "hypotheses", ("breaks one thing",),
                 check, {"n": 1}, {"n": 10})


def _ev(cid, setting, measured, *, control=False, tol=1e-12, **details):
    return Evidence(cid, setting, measured, 0.0, "<=", tol, "float64", "exact", control, details)


CURVE = {"x": [1, 2, 3, 4], "y": [1.0, 0.5, 0.25, 0.0], "xlabel": "step", "ylabel": "residual", "logy": True}
MULTI = {"x": [1e-3, 1.0, 1e3], "y": {"a": [1.0, 2.0, 3.0], "b": [3.0, float("nan"), 1.0]}, "xlabel": "c",
         "ylabel": "change", "logy": False, "logx": True}


@pytest.fixture
def results():
    good = [_ev("C901", "holds", 1e-16, curves={"norm growth (a, b)": CURVE, "multi": MULTI}),
            _ev("C901", "control violated", 0.5, control=True, breaks="breaks one thing")]
    failing = [_ev("C902", "fails", 1e-3), _ev("C902", "control violated", 1.0, control=True)]
    broken = [_ev("C903", "holds", 0.0), _ev("C903", "control NOT violated", 1e-20, control=True),
              _ev("C903", "nan control", float("nan"), control=True, curves={"bad": {"x": [1, 2], "y": [1]}})]
    return [ClaimResult(_claim("C901", good), good, 1.5), ClaimResult(_claim("C902", failing), failing, 0.25),
            ClaimResult(_claim("C903", broken), broken, 0.125)]


def test_verdicts_and_exit_status(results):
    good, failing, broken = results
    assert [R.record_ok(e) for e in good.evidence] == [True, True]
    assert [R.record_ok(e) for e in failing.evidence] == [False, True]
    assert [R.record_ok(e) for e in broken.evidence] == [True, False, False]  # NaN control: broken
    assert not broken.evidence[2].ok  # a NaN measurement never confirms a control
    assert [R.claim_ok(r) for r in results] == [True, False, False]
    assert not R.claim_ok(good, error="Traceback ...")
    assert not R.claim_ok(ClaimResult(_claim("C904"), [], 0.0))
    assert R.exit_status([good]) == 0
    assert R.exit_status(results) == 1
    assert R.exit_status([good], {"C901": "boom"}) == 1
    assert R.exit_status([]) == 1
    s = R.summary(results)
    assert s["claims_passed"] == ["C901"] and s["claims_failed"] == ["C902", "C903"]
    assert (s["controls"], s["controls_confirmed"], len(s["controls_broken"])) == (4, 2, 2)
    assert (s["records"], s["records_failed"]) == (3, 1)
    assert s["verdict"] == "FAIL" and s["seconds"] == pytest.approx(1.875)


def test_report_files_and_contents(results, tmp_path):
    out = tmp_path / "rep"
    paths = R.write_report(results, out, quick=True, command="python -m proofs_check --quick")
    assert paths["report"] == out.absolute() / "report.md"
    assert sorted(p.name for p in out.iterdir()) == ["curves.json", "evidence.json", "plots", "report.md"]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["C901_multi.png", "C901_norm_growth_a_b.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    md = (out / "report.md").read_text()
    assert "**Verdict: FAIL**" in md and "1/3 claims passed" in md and "2/4 negative controls" in md
    assert md.count(f"| {R.CONTROL_CONFIRMED} |") == 2 and md.count(f"| {R.CONTROL_BROKEN} |") == 2
    assert "](plots/C901_norm_growth_a_b.png)" in md and "](plots/C901_multi.png)" in md
    assert "curve *bad* could not be drawn" in md
    assert "statement of C901 \\| with a pipe" in md  # pipes escaped in tables
    assert "JAX " in md and "backend" in md and "float64" in md and "Generated:" in md
    for cid in ("C901", "C902", "C903"):
        assert f"## {cid}" in md
    summary = md[md.index("## Summary"):]
    assert "1 passed, 2 failed (C902, C903)" in summary and "2 confirmed, 2 broken" in summary
    assert "| C901 | PASS | 1.5 |" in summary and "| total | FAIL | 1.875 |" in summary
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_evidence_json_round_trip(results, tmp_path):
    R.write_report(results, tmp_path / "rep", quick=False)
    raw = (tmp_path / "rep" / "evidence.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    data = R.load_evidence(tmp_path / "rep")
    assert data["schema"] == R.SCHEMA_VERSION and data["mode"] == "full"
    assert data["summary"]["verdict"] == "FAIL" and "jax" in data["environment"]
    by_id = {c["id"]: c for c in data["claims"]}
    assert list(by_id) == ["C901", "C902", "C903"]
    assert by_id["C901"]["settings"] == {"n": 10} and by_id["C901"]["ok"] is True
    assert by_id["C903"]["ok"] is False and by_id["C901"]["negative_controls"] == ["breaks one thing"]
    for r in results:
        loaded = by_id[r.claim.id]["evidence"]
        assert len(loaded) == len(r.evidence)
        for a, b in zip(r.evidence, loaded):
            for field in ("claim", "setting", "relation", "dtype", "bn", "negative_control"):
                assert getattr(a, field) == getattr(b, field)
            for field in ("measured", "bound", "tolerance"):
                x, y = getattr(a, field), getattr(b, field)
                assert (math.isnan(x) and math.isnan(y)) or x == y
            assert a.passed == b.passed and a.ok == b.ok
            expect = {k: v for k, v in a.details.items() if k != "curves"}
            assert {k: v for k, v in b.details.items() if k != "curves"} == expect
    # curves live in curves.json; evidence.json only names the plot files
    first = by_id["C901"]["records"][0]
    assert first["details"]["curves"] == {"norm growth (a, b)": "plots/C901_norm_growth_a_b.png",
                                          "multi": "plots/C901_multi.png"}
    assert "residual" not in raw
    curves = json.loads((tmp_path / "rep" / "curves.json").read_text())["curves"]
    assert [(c["claim"], c["record"]) for c in curves] == [("C901", 0), ("C903", 2)]
    assert curves[0]["curves"]["norm growth (a, b)"]["y"] == [1.0, 0.5, 0.25, 0.0]
    assert curves[0]["curves"]["multi"]["y"]["b"][1] is None  # strict JSON: a missing point is null
    assert curves[1]["curves"]["bad"]["plot"] is None


def test_numeric_fields_are_numbers_or_null_and_nonfinite_values_are_flagged(tmp_path):
    """evidence.json holds no string for a number: +-inf and NaN are ``null`` with a ``nonfinite`` flag that
    names them, and loading gives the exact values back (a diverged run measures inf)."""
    records = [_ev("C905", "diverged", float("inf")), _ev("C905", "below", float("-inf"), tol=float("inf")),
               _ev("C905", "nan", float("nan"), control=True), _ev("C905", "finite", 0.5)]
    R.write_report([ClaimResult(_claim("C905", records), records, 0.1)], tmp_path / "rep")
    raw = json.loads((tmp_path / "rep" / "evidence.json").read_text())["claims"][0]["records"]
    for rec in raw:
        for field in R.NUMERIC_FIELDS:
            assert rec[field] is None or isinstance(rec[field], (int, float)), (field, rec[field])
    assert [r["nonfinite"] for r in raw] == [{"measured": "inf", "margin": "-inf"},
                                            {"measured": "-inf", "tolerance": "inf", "margin": "inf"},
                                            {"measured": "nan", "margin": "nan"}, {}]
    loaded = R.load_evidence(tmp_path / "rep")["claims"][0]["evidence"]
    assert [e.measured for e in loaded][:2] == [float("inf"), float("-inf")] and math.isnan(loaded[2].measured)
    assert loaded[1].tolerance == float("inf") and loaded[3].measured == 0.5


def test_rewrite_replaces_files_keeps_foreign_ones_and_drops_stale_plots(results, tmp_path):
    out = tmp_path / "rep"
    R.write_report(results, out)
    (out / "notes.txt").write_text("mine")
    (out / "plots" / "C999_old.png").write_bytes(b"old")
    R.write_report(results[1:], out)
    assert (out / "notes.txt").read_text() == "mine"
    assert list((out / "plots").iterdir()) == []
    assert "C901" not in (out / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary directory left


def test_failed_write_leaves_nothing(results, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "_markdown", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        R.write_report(results, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    R.write_report(results, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()}
    monkeypatch.setattr(R, "_markdown", boom)
    with pytest.raises(RuntimeError):
        R.write_report(results[1:], tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_out_dir_that_is_a_file_is_refused(results, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        R.write_report(results, tmp_path / "f")


# -------------------------------------------------------------------------------------------------------
# command line


def _run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "proofs_check", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_unknown_claim_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _run_cli("--quick", "--claims", "C1,C99", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proofs_check: error: unknown claim C99; known: C1, C2,")
    assert proc.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_list(tmp_path):
    proc = _run_cli("--list", cwd=tmp_path)
    assert proc.returncode == 0
    ids = [line.split()[0] for line in proc.stdout.splitlines()]
    assert {"C1", "C2", "C3", "C19", "C20", "C21"} <= set(ids)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the compilation cache, not in the home
    ok = [_ev("C901", "holds", 0.0), _ev("C901", "ctrl", 1.0, control=True)]
    bad_ctrl = [_ev("C902", "holds", 0.0), _ev("C902", "ctrl", 0.0, control=True)]
    reg = {"C901": _claim("C901", ok), "C902": _claim("C902", bad_ctrl),
           "C903": _claim("C903", error=ValueError("check crashed"))}
    monkeypatch.setattr(cli.C, "load_all", lambda: reg)
    return reg


def test_cli_exit_status(fake_registry, tmp_path, capsys):
    assert cli.main(["--claims", "c901", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["C901", "PASS"] and "1/1 controls confirmed" in out[0]
    assert out[-1] == f"PASS: report written to {tmp_path / 'a' / 'report.md'}"
    assert cli.main(["--claims", "C901,C902", "--out", str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["C902", "FAIL"] and "0/1 controls confirmed" in out[1]
    assert cli.main(["--out", str(tmp_path / "c")]) == 1  # all claims, one of which raises
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[:2] == ["C903", "ERROR"]
    md = (tmp_path / "c" / "report.md").read_text()
    assert "ValueError: check crashed" in md and "| C903 | FAIL |" in md
    assert R.load_evidence(tmp_path / "c")["claims"][2]["error"].strip().endswith("ValueError: check crashed")


def test_cli_usage_errors(fake_registry, tmp_path, capsys):
    assert cli.main(["--claims", " , ", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "proofs_check: error: no claim given to --claims"
    assert cli.main(["--claims", "C901,C7", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "proofs_check: error: unknown claim C7; known: C901, C902, C903"
    assert not (tmp_path / "x").exists()
