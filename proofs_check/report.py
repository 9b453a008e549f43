"""The report of a run: ``report.md``, ``evidence.json``, ``curves.json`` and plots, written atomically.

From a list of :class:`proofs_check.claims.ClaimResult`:

* ``report.md``: a header (date, JAX version and backend, precision note, the overall verdict), an
  overview table, one section per claim with its records (setting, measured, relation, bound, tolerance,
  margin, verdict) and its negative controls in their own table (``violated as required`` /
  ``NOT violated (broken check)``), links to the plots, and a summary (claims passed / failed, controls
  confirmed / broken, wall time per claim);
* ``evidence.json``: every record (:meth:`proofs_check.evidence.Evidence.to_dict`, curves removed) with the
  claim's metadata; read it back with :func:`load_evidence`;
* ``curves.json`` and ``plots/<claim>_<name>.png``: the curves that checks attach to a record.

**Curve convention.** A check may put curves in a record's details::

    details["curves"] = {name: {"x": [...], "y": [...], "xlabel": "step", "ylabel": "||w_t||^2",
                                "logy": True}}

Optional keys: ``"logx"`` (bool), ``"title"`` (str); ``"y"`` may also be a dict ``{label: [...]}`` of series
that share ``x`` (:func:`proofs_check.curves.curve` builds them). Each curve is drawn into
``plots/<claim>_<name>.png`` (the name reduced to ``[A-Za-z0-9._-]``; a numeric suffix keeps names unique)
and linked from ``report.md``. On a log axis, non-positive and non-finite points are left out. A curve that
cannot be drawn is reported, not fatal.

**Verdicts.** A claim record is ``ok`` when its relation holds; a negative control when it does not, and
its measured value is a finite number (a NaN is never a confirmed violation). A claim passes when it has
records and all are ``ok``; the run passes when every claim does (:func:`exit_status`).

**Atomicity.** Everything is written into a fresh temporary directory beside ``out_dir`` and then moved
into place: a rename when ``out_dir`` does not exist yet, else one ``os.replace`` per file (``report.md``
last, so it never links a file that is not there yet). If anything fails, the temporary directory is
removed and ``out_dir`` is left as it was (or absent).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from proofs_check.claims import ClaimResult
from proofs_check.evidence import Evidence
from rate_tuning import jsonio

SCHEMA_VERSION = 1
REPORT = "report.md"
EVIDENCE = "evidence.json"
CURVES = "curves.json"
PLOTS = "plots"

FAULTS_JSON = "faults.json"
FAULTS_MD = "faults.md"

CONTROL_CONFIRMED = "violated as required"
CONTROL_BROKEN = "NOT violated (broken check)"


# ---------------------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------------------


def record_ok(e: Evidence) -> bool:
    """A claim record holds; a negative control is violated (:attr:`Evidence.ok`)."""
    return bool(e.ok)


def claim_ok(result: ClaimResult, error: str | None = None) -> bool:
    """The claim ran, produced records, and every record is :func:`record_ok`."""
    return error is None and bool(result.evidence) and all(record_ok(e) for e in result.evidence)


def exit_status(results: Sequence[ClaimResult], errors: Mapping[str, str] | None = None) -> int:
    """0 if every claim passes (records hold, every negative control violated), else 1."""
    errors = errors or {}
    ok = bool(results) and all(claim_ok(r, errors.get(r.claim.id)) for r in results)
    return 0 if ok else 1


def summary(results: Sequence[ClaimResult], errors: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Counts: claims passed / failed, records, controls confirmed / broken, and total seconds."""
    errors = errors or {}
    passed = [r.claim.id for r in results if claim_ok(r, errors.get(r.claim.id))]
    failed = [r.claim.id for r in results if r.claim.id not in passed]
    controls = [(r.claim.id, e) for r in results for e in r.evidence if e.negative_control]
    checks = [(r.claim.id, e) for r in results for e in r.evidence if not e.negative_control]
    return {
        "claims": len(results),
        "claims_passed": passed,
        "claims_failed": failed,
        "records": len(checks),
        "records_failed": sum(not record_ok(e) for _, e in checks),
        "controls": len(controls),
        "controls_confirmed": sum(record_ok(e) for _, e in controls),
        "controls_broken": [f"{cid}: {e.setting}" for cid, e in controls if not record_ok(e)],
        "seconds": float(sum(r.seconds for r in results)),
        "verdict": "PASS" if exit_status(results, errors) == 0 else "FAIL",
    }


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------

NUMERIC_FIELDS = ("measured", "bound", "tolerance", "margin")
"""Numbers of a record that may be non-finite: written as ``null``, their value named in ``nonfinite``."""


def _record_json(d: Mapping[str, Any]) -> dict[str, Any]:
    """A record as strict JSON data (:mod:`rate_tuning.jsonio`: non-finite numbers are ``null``), with
    ``nonfinite`` naming each numeric field that was NaN or +-inf (e.g. ``{"measured": "inf"}``: diverged)."""
    flags = {}
    for k in NUMERIC_FIELDS:
        v = d.get(k)
        if isinstance(v, (float, np.floating)) and not math.isfinite(v):
            flags[k] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return {**jsonio.to_json_value(dict(d)), "nonfinite": flags}


def _float(v, flag: str | None = None) -> float:
    """A number of the JSON files: ``None`` reads as the value its ``nonfinite`` flag names, else NaN."""
    if v is None:
        return float(flag) if flag else math.nan
    return float(v)


def evidence_from_dict(d: Mapping[str, Any]) -> Evidence:
    """The :class:`Evidence` of a record of ``evidence.json`` (its curves are in ``curves.json``)."""
    details = dict(d.get("details", {}))
    flags = d.get("nonfinite") or {}
    return Evidence(claim=d["claim"], setting=d["setting"], measured=_float(d["measured"], flags.get("measured")),
                    bound=_float(d["bound"], flags.get("bound")), relation=d["relation"],
                    tolerance=_float(d["tolerance"], flags.get("tolerance")),
                    dtype=d["dtype"], bn=d["bn"], negative_control=bool(d["negative_control"]), details=details)


def load_evidence(path: str | os.PathLike) -> dict[str, Any]:
    """``evidence.json`` (a file, or the report directory), with every record also as an :class:`Evidence`
    under ``claims[i]['evidence']``."""
    path = Path(path)
    if path.is_dir():
        path = path / EVIDENCE
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for c in data["claims"]:
        c["evidence"] = [evidence_from_dict(r) for r in c["records"]]
    return data


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "numpy": np.__version__, "cpu_count": os.cpu_count()}
    try:
        import jax
        env["jax"] = jax.__version__
        try:
            import jaxlib
            env["jaxlib"] = getattr(jaxlib, "__version__", "?")
        except ImportError:  # pragma: no cover
            env["jaxlib"] = "?"
        env["backend"] = jax.default_backend()
        env["devices"] = [str(d) for d in jax.devices()]
        env["x64_default"] = bool(jax.config.read("jax_enable_x64"))
    except Exception as exc:  # pragma: no cover - the report must not fail on an odd environment
        env["jax"] = f"unavailable ({type(exc).__name__})"
    return env


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")
    return (s or "curve")[:80]


def _series(curve: Mapping) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``x`` and the named ``y`` series of a curve; ``ValueError`` if malformed."""
    if "x" not in curve or "y" not in curve:
        raise ValueError("a curve needs 'x' and 'y'")
    x = np.asarray([_float(v) for v in curve["x"]], np.float64)
    ys = curve["y"] if isinstance(curve["y"], Mapping) else {"": curve["y"]}
    out = {}
    for label, y in ys.items():
        y = np.asarray([_float(v) for v in y], np.float64)
        if y.shape != x.shape or x.ndim != 1:
            raise ValueError(f"x has {x.size} points but y{f' {label!r}' if label else ''} has {y.size}")
        out[str(label)] = y
    return x, out


def _plot(curve: Mapping, path: Path, title: str) -> None:
    """Draw one curve into ``path`` (PNG) with matplotlib's Agg canvas (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, ys = _series(curve)
    logx, logy = bool(curve.get("logx", False)), bool(curve.get("logy", False))
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for label, y in ys.items():
        keep = np.isfinite(x) & np.isfinite(y)
        if logx:
            keep &= x > 0
        if logy:
            keep &= y > 0
        if keep.any():
            ax.plot(x[keep], y[keep], marker="." if keep.sum() <= 50 else None, label=label or None)
            drawn += 1
    if not drawn:
        raise ValueError("no finite point to draw" + (" on a log axis" if logx or logy else ""))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(str(curve.get("xlabel", "")))
    ax.set_ylabel(str(curve.get("ylabel", "")))
    ax.set_title(str(curve.get("title", title)), fontsize=9)
    if any(ys) and len(ys) > 1:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.3e}"


def _cell(s) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _markdown(results, errors, plots, plot_errors, env, meta) -> str:
    s = summary(results, errors)
    n_claims = len(results)
    lines = [
        "# proofs_check report",
        "",
        "Numerical checks of the claims of Arora, Li & Lyu, \"Theoretical Analysis of Auto Rate-Tuning by Batch "
        "Normalization\" (ICLR 2019).",
        "",
        f"- Generated: {meta['generated_utc']}",
        f"- Settings: {meta['mode']}" + (f"; command: `{meta['command']}`" if meta.get("command") else ""),
        f"- JAX {env.get('jax', '?')} (jaxlib {env.get('jaxlib', '?')}), backend {env.get('backend', '?')} "
        f"({', '.join(env.get('devices', [])) or '?'}); Python {env['python']}, numpy {env['numpy']}, "
        f"{env['platform']}, {env['cpu_count']} CPUs",
        "- Precision: checks run in float64, with x64 enabled at each check's entry (not globally); the "
        "dtype column says what each record used. Tolerances are derived (see `docs/derivations.md`).",
        f"- Wall time: {_fmt(s['seconds'])} s in the checks"
        + (f", {_fmt(meta['wall_seconds'])} s in all" if meta.get("wall_seconds") is not None else ""),
        "",
        f"**Verdict: {s['verdict']}** — {len(s['claims_passed'])}/{n_claims} claims passed; "
        f"{s['controls_confirmed']}/{s['controls']} negative controls violated as required.",
        "",
        "A record's *margin* is the signed slack of its relation (positive when the relation holds). A negative "
        "control breaks one hypothesis on purpose: it is confirmed when the claim's relation fails for it (its "
        "margin is then negative); a control that holds means the check could not have failed.",
        "",
        "## Overview",
        "",
    ]
    rows = []
    for r in results:
        c, err = r.claim, errors.get(r.claim.id)
        ctrl = [e for e in r.evidence if e.negative_control]
        rows.append([f"[{c.id}](#{c.id.lower()})", c.paper_ref, c.statement,
                     sum(not e.negative_control for e in r.evidence),
                     f"{sum(record_ok(e) for e in ctrl)}/{len(ctrl)}", _fmt(r.seconds),
                     "PASS" if claim_ok(r, err) else ("ERROR" if err else "FAIL")])
    lines += _table(["id", "paper location", "statement", "records", "controls confirmed", "seconds", "verdict"],
                    rows)
    lines += ["", "## Coverage", "", "The paper's lemmas, theorems and proof steps against the claims that check "
              "them (from the registry, `proofs_check.claims.COVERAGE`):", "", *coverage_lines(results)]
    lines += ["", "## Faults", "", "Each claim names faults (deliberate errors in the code under test or in the "
              "theory's inputs, `proofs_check.faults`) under which it must fail; `python -m proofs_check --faults` "
              "runs them.", ""]
    from proofs_check import faults as F
    lines += _table(["claim", "faults it must catch"],
                    [[r.claim.id, ", ".join(f.name for f in F.faults_of(r.claim.id)) or "**none**"] for r in results])
    if meta.get("faults"):
        lines += ["", "### Kill matrix (latest `--faults` run in this directory)", "",
                  *fault_matrix_lines(meta["faults"])]
    else:
        lines += ["", "No kill matrix in this directory yet (run `python -m proofs_check --faults`)."]
    for r in results:
        c, err = r.claim, errors.get(r.claim.id)
        verdict = "PASS" if claim_ok(r, err) else ("ERROR" if err else "FAIL")
        lines += ["", f"## {c.id}", "",
                  f"**{c.id}** ({c.paper_ref}): {_cell(c.statement)}", "",
                  f"- Hypotheses: {_cell(c.hypotheses)}",
                  f"- Verdict: **{verdict}** ({_fmt(r.seconds)} s)"]
        if c.negative_controls:
            lines.append("- Negative controls (each breaks one hypothesis): "
                         + "; ".join(_cell(n) for n in c.negative_controls))
        if err:
            lines += ["", f"**ERROR**: `{_cell(err.strip().splitlines()[-1] if err.strip() else err)}`"]
            lines += ["", "<details><summary>traceback</summary>", "", "```", err.rstrip(), "```", "", "</details>"]
        checks = [e for e in r.evidence if not e.negative_control]
        controls = [e for e in r.evidence if e.negative_control]
        if checks:
            lines += ["", "### Records", ""]
            lines += _table(
                ["id", "setting", "measured", "relation", "bound", "tolerance", "margin", "BN", "dtype", "verdict"],
                [[c.id, e.setting, _fmt(e.measured), e.relation, _fmt(e.bound), _fmt(e.tolerance), _fmt(e.margin),
                  e.bn, e.dtype, "pass" if record_ok(e) else "FAIL"] for e in checks])
        if controls:
            lines += ["", "### Negative controls", ""]
            lines += _table(
                ["id", "setting", "measured", "claim's relation", "bound", "tolerance", "margin", "BN", "dtype",
                 "verdict"],
                [[c.id, e.setting, _fmt(e.measured), e.relation, _fmt(e.bound), _fmt(e.tolerance), _fmt(e.margin),
                  e.bn, e.dtype, CONTROL_CONFIRMED if record_ok(e) else CONTROL_BROKEN] for e in controls])
        if not r.evidence and not err:
            lines += ["", "No records: the claim cannot pass."]
        mine = [p for p in plots if p["claim"] == c.id]
        bad = [p for p in plot_errors if p["claim"] == c.id]
        if mine or bad:
            lines += ["", "### Plots", ""]
            for p in mine:
                lines += [f"![{_cell(p['name'])}]({p['file']})", "",
                          f"*{_cell(p['name'])}* — {_cell(p['setting'])}", ""]
            for p in bad:
                lines.append(f"- curve *{_cell(p['name'])}* could not be drawn: {_cell(p['error'])}")
    lines += ["", "## Summary", "",
              f"- Claims: {len(s['claims_passed'])} passed, {len(s['claims_failed'])} failed"
              + (f" ({', '.join(s['claims_failed'])})" if s["claims_failed"] else ""),
              f"- Records: {s['records'] - s['records_failed']}/{s['records']} hold",
              f"- Negative controls: {s['controls_confirmed']} confirmed, {len(s['controls_broken'])} broken"]
    lines += [f"  - broken: {_cell(b)}" for b in s["controls_broken"]]
    lines += ["", *_table(["claim", "verdict", "seconds"],
                          [[r.claim.id, "PASS" if claim_ok(r, errors.get(r.claim.id)) else "FAIL", _fmt(r.seconds)]
                           for r in results] + [["total", s["verdict"], _fmt(s["seconds"])]]), ""]
    lines += timing_lines(meta.get("timing"))
    return "\n".join(lines)


def timing_lines(timing: Mapping[str, Any] | None) -> list[str]:
    """The footer's "Time" section: per claim, wall seconds split into compiling (tracing, lowering, XLA
    compilation or the persistent-cache read, from ``jax.monitoring``) and running, with the programs
    compiled and how many came from the cache (``timing`` as ``python -m proofs_check`` passes it)."""
    claims = (timing or {}).get("claims") or {}
    if not claims:
        return []
    keys = ("wall", "trace", "lower", "compile", "compile_total", "run", "cpu", "programs", "cache_hits")
    total = {k: sum(float(t.get(k) or 0) for t in claims.values()) for k in keys}
    cache = timing.get("cache")
    rows = [[cid, _fmt(t.get("wall")), _fmt(t.get("compile_total")), _fmt(t.get("trace")), _fmt(t.get("lower")),
             _fmt(t.get("compile")), _fmt(t.get("run")), _fmt(t.get("cpu")), int(t.get("programs") or 0),
             int(t.get("cache_hits") or 0)] for cid, t in claims.items()]
    rows.append(["total", *(_fmt(total[k]) for k in ("wall", "compile_total", "trace", "lower", "compile", "run",
                                                         "cpu")), int(total["programs"]), int(total["cache_hits"])])
    return ["## Time", "",
            "Where each claim's wall time went: *compiling* is tracing to jaxprs + lowering + XLA compilation (or "
            "reading the program back from the persistent compilation cache), *running* the rest. "
            + (f"Compilation cache: `{cache}`." if cache else "Compilation cache: off."), "",
            *_table(["claim", "wall s", "compiling s", "tracing", "lowering", "XLA compile / cache read",
                     "running s", "CPU s", "programs", "from cache"], rows), ""]


# ---------------------------------------------------------------------------------------------------------
# faults (the kill matrix) and coverage
# ---------------------------------------------------------------------------------------------------------


def fault_matrix_lines(result: Mapping[str, Any]) -> list[str]:
    """Markdown of a kill matrix (:func:`proofs_check.faults.run_matrix`): one row per fault with the claims
    that must catch it and what each did, then the claim x fault grid."""
    faults = result.get("faults", {})
    n_cells = sum(len(f["claims"]) for f in faults.values())
    missed = [(c, n) for n, f in faults.items() for c, cell in f["claims"].items() if cell["verdict"] == "MISSED"]
    lines = [f"{len(faults)} faults, {n_cells} (claim, fault) cells, {len(missed)} missed"
             + (f": {', '.join(f'{c} x {n}' for c, n in missed)}" if missed else "")
             + f"; {'quick' if result.get('quick') else 'full'} settings, {_fmt(result.get('seconds'))} s.", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`; generated {result.get('generated_utc', '?')}.", ""]
    if result.get("unnamed"):
        lines += [f"Claims naming no fault: {', '.join(result['unnamed'])}.", ""]
    rows = []
    for k, (name, f) in enumerate(faults.items(), 1):
        cells = "; ".join(f"{c}: {cell['verdict']}" + (f" ({_cell(cell['failing'][0])[:160]})"
                                                      if cell.get("failing") else "")
                          for c, cell in f["claims"].items())
        rows.append([f"F{k}", name, f["kind"], f["target"], f["description"], cells])
    lines += _table(["#", "fault", "kind", "patched", "what is wrong", "claims: verdict (first failing record)"],
                    rows)
    claims = sorted({c for f in faults.values() for c in f["claims"]},
                    key=lambda c: (c[0] != "C", c[0], int(re.sub(r"\D", "", c) or 0)))
    if claims:
        mark = {"caught": "x", "caught (error)": "E", "MISSED": "**MISSED**"}
        grid = [[c] + [mark.get(f["claims"][c]["verdict"], "?") if c in f["claims"] else ""
                       for f in faults.values()] for c in claims]
        lines += ["", "Grid (x: the claim fails under the fault, as it must; E: its check raised; blank: the claim "
                      "does not name the fault):", ""]
        lines += _table(["claim"] + [f"F{k}" for k in range(1, len(faults) + 1)], grid)
    return lines


def write_fault_report(result: Mapping[str, Any], out_dir: str | os.PathLike, *,
                       command: str | None = None) -> Path:
    """Write ``faults.json`` and ``faults.md`` (the kill matrix) into ``out_dir``; returns the ``.md`` path."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = dict(result, command=command, schema=SCHEMA_VERSION,
                generated_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    for name, text in ((FAULTS_JSON, jsonio.dumps(data, indent=1) + "\n"),
                       (FAULTS_MD, "\n".join(["# proofs_check kill matrix", "",
                                               "Each claim is run under every fault it names (a deliberate error "
                                               "in the code under test or in the theory's inputs, patched at run "
                                               "time in a fresh process); it must fail.", "",
                                               *fault_matrix_lines(data), ""]))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out / name)
    return out / FAULTS_MD


def _load_faults(out: Path) -> dict | None:
    try:
        return jsonio.loads((out / FAULTS_JSON).read_text()) if (out / FAULTS_JSON).exists() else None
    except (OSError, ValueError):
        return None


def coverage_lines(results: Sequence[ClaimResult]) -> list[str]:
    """The coverage table (:data:`proofs_check.claims.COVERAGE`): each lemma/theorem of the paper against the
    claim ids that check it, and the items not checked with the reason; ids not run here are marked."""
    from proofs_check.claims import COVERAGE, REGISTRY
    ran = {r.claim.id for r in results}
    rows = []
    for item, ids, note in COVERAGE:
        shown = [i if i in ran else (f"{i} (not run)" if i in REGISTRY else f"{i} (not registered)") for i in ids]
        rows.append([item, ", ".join(shown) if ids else "**not checked**", note])
    return _table(["paper item", "claims", "how / why not"], rows)


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(path: Path, data) -> None:
    _write_text(path, jsonio.dumps(data, indent=1) + "\n")


def _render(results, errors, tmp: Path, meta: dict) -> list[str]:
    """Write every file into ``tmp``; returns the relative paths written, ``report.md`` last."""
    env = _environment()
    (tmp / PLOTS).mkdir()
    plots, plot_errors, curves_out, used = [], [], [], set()
    claims_json = []
    for r in results:
        records = []
        for i, e in enumerate(r.evidence):
            d = e.to_dict()
            details = dict(d.get("details") or {})
            curves = details.pop("curves", None) or {}
            entry = {}
            if curves:
                if not isinstance(curves, Mapping):
                    curves = {"curve": curves}
                for name, curve in curves.items():
                    stem = _safe_name(f"{r.claim.id}_{name}")
                    k, base = 2, stem
                    while stem in used:
                        stem, k = f"{base}_{k}", k + 1
                    used.add(stem)
                    rel = f"{PLOTS}/{stem}.png"
                    try:
                        if not isinstance(curve, Mapping):
                            raise ValueError("a curve must be a dict with 'x' and 'y'")
                        _plot(curve, tmp / rel, f"{r.claim.id}: {name}")
                        plots.append({"claim": r.claim.id, "name": str(name), "file": rel, "setting": e.setting})
                        entry[str(name)] = rel
                    except Exception as exc:  # a bad curve must not lose the report
                        plot_errors.append({"claim": r.claim.id, "name": str(name),
                                            "error": f"{type(exc).__name__}: {exc}"})
                        entry[str(name)] = None
                curves_out.append({"claim": r.claim.id, "record": i, "setting": e.setting,
                                   "curves": {str(n): dict(c, plot=entry.get(str(n))) if isinstance(c, Mapping) else c
                                              for n, c in curves.items()}})
                details["curves"] = entry  # name -> plot file (data in curves.json)
            d["details"] = details
            d["ok"] = record_ok(e)
            records.append(_record_json(d))
        claims_json.append({
            "id": r.claim.id, "paper_ref": r.claim.paper_ref, "statement": r.claim.statement,
            "hypotheses": r.claim.hypotheses, "negative_controls": list(r.claim.negative_controls),
            "settings": r.claim.quick if meta["mode"] == "quick" else r.claim.full,
            "seconds": r.seconds, "ok": claim_ok(r, errors.get(r.claim.id)), "error": errors.get(r.claim.id),
            "records": records,
        })
    head = {"schema": SCHEMA_VERSION, "generated_utc": meta["generated_utc"], "mode": meta["mode"],
            "command": meta.get("command"), "environment": env}
    _write_json(tmp / EVIDENCE, {**head, "summary": summary(results, errors), "claims": claims_json,
                                 **({"timing": meta["timing"]} if meta.get("timing") else {})})
    _write_json(tmp / CURVES, {**head, "curves": curves_out})
    _write_text(tmp / REPORT, _markdown(results, errors, plots, plot_errors, env, meta))
    return [EVIDENCE, CURVES] + [p["file"] for p in plots] + [REPORT]


def write_report(results: Sequence[ClaimResult], out_dir: str | os.PathLike, *, quick: bool = True,
                 errors: Mapping[str, str] | None = None, command: str | None = None,
                 wall_seconds: float | None = None, timing: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``evidence.json``, ``curves.json`` and ``plots/`` into ``out_dir``, atomically.

    Args:
      results: the claims' results, in report order.
      out_dir: the report directory (created; files of an earlier report are replaced, stale plots removed).
      quick: whether the quick settings were used (recorded with each claim's settings).
      errors: ``{claim id: traceback}`` for claims whose check raised.
      command: the command line, for the header.
      wall_seconds: total wall time of the run, for the header.
      timing: ``{'claims': {id: ClaimTime.to_dict()}, 'cache': dir or None}`` (:mod:`proofs_check.runtime`),
        for the footer's "Time" section and ``evidence.json``'s ``timing``.

    Returns:
      ``{'report': ..., 'evidence': ..., 'curves': ..., 'plots': ...}`` paths.

    Example::

        results = [claims.run(c) for c in claims.load_all().values()]
        write_report(results, "report")
    """
    errors = dict(errors or {})
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"generated_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "mode": "quick" if quick else "full", "command": command, "wall_seconds": wall_seconds,
            "faults": _load_faults(out), "timing": dict(timing) if timing else None}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the report directory's mode
        files = _render(results, errors, tmp, meta)
        if not out.exists():
            os.rename(tmp, out)
        else:
            (out / PLOTS).mkdir(exist_ok=True)
            for rel in files:
                os.replace(tmp / rel, out / rel)
            keep = {Path(rel).name for rel in files if rel.startswith(PLOTS + "/")}
            for stale in (out / PLOTS).glob("*.png"):
                if stale.name not in keep:
                    stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"report": out / REPORT, "evidence": out / EVIDENCE, "curves": out / CURVES, "plots": out / PLOTS}
