"""``python -m proofs_check``: run the paper's claims and write the report.

Usage::

    python -m proofs_check [--quick] [--claims C1,C4] [--out DIR] [--list] [--faults] [--no-cache]

Runs the claims (all of them by default) with their full settings, or their quick ones with ``--quick``;
prints a line to stderr as each claim starts (position, elapsed time, an estimate of what is left: from the
report already in ``DIR`` when it has the same settings, else from the mean so far), a bar of the records
made inside a claim when stderr is a terminal, and one line per claim as it finishes (id, verdict, records,
negative controls confirmed, seconds, of them compiling); writes ``report.md`` (with the time of each claim,
compile against run, in its footer), ``evidence.json``, ``curves.json`` and ``plots/`` into ``DIR`` (default
``report/``) and prints where.

Compiled programs are kept in JAX's persistent compilation cache, ``$XDG_CACHE_HOME/rate_tuning/jax`` (else
``~/.cache/rate_tuning/jax``; ``--cache-dir`` to choose, ``--no-cache`` to leave it off): a second run reads
them back instead of compiling (the same executables, so the same numbers). Exit status: 0 if every claim passes and every negative control is violated, 1
otherwise, 2 on a usage error (e.g. an unknown claim id: nothing is run or written).

``--faults`` runs each selected claim under every fault it names (:mod:`proofs_check.faults`, one
subprocess per fault) instead, prints one line per fault and writes the kill matrix (``faults.md``,
``faults.json``) into ``DIR``; the next report there includes it. Exit status 0 when every claim fails under
each of its faults and every claim names one.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback

from proofs_check import claims as C
from proofs_check import report as R
from proofs_check import runtime as RT

PROG = "proofs_check"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Check the claims of Arora, Li & Lyu (ICLR 2019) "
                                "numerically and write a report.")
    p.add_argument("--quick", action="store_true", help="the quick settings (small models, few points)")
    p.add_argument("--claims", metavar="IDS", help="comma-separated claim ids, e.g. C1,C4 (default: all)")
    p.add_argument("--out", metavar="DIR", default="report", help="report directory (default: report/)")
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="check the claims that hold for any network (C1, C2, C4, C5, C21, I3) on this model, with the "
                        "groups its audit finds; FACTORY() returns (model, variables, batch) for flax linen or "
                        "(model, batch) for NNX (rate_tuning.targets)")
    p.add_argument("--faults", action="store_true",
                   help="run each claim under the faults it names (proofs_check.faults) and write the kill matrix")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use the persistent compilation cache (compile every program afresh)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help=f"the persistent compilation cache (default: {RT.default_cache_dir()})")
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _select(spec: str | None, registry: dict) -> list[str] | str:
    """The claim ids asked for, in the order given (duplicates dropped), or an error message."""
    if spec is None:
        return list(registry)
    ids = []
    for part in spec.split(","):
        cid = part.strip().upper()
        if cid and cid not in ids:
            ids.append(cid)
    if not ids:
        return "no claim given to --claims"
    unknown = [c for c in ids if c not in registry]
    if unknown:
        return f"unknown claim {', '.join(unknown)}; known: {', '.join(registry)}"
    return ids


def _line(result, error, timing=None) -> str:
    controls = [e for e in result.evidence if e.negative_control]
    confirmed = sum(R.record_ok(e) for e in controls)
    verdict = "PASS" if R.claim_ok(result, error) else ("ERROR" if error else "FAIL")
    line = (f"{result.claim.id:<5} {verdict:<5} {len(result.evidence) - len(controls):>3} records  "
            f"{confirmed}/{len(controls)} controls confirmed  {result.seconds:7.1f} s")
    if timing is not None:
        line += f" ({timing.compile_total:.1f} compiling, {timing.programs} programs, {timing.cache_hits} cached)"
    return line


def _previous(out: str, quick: bool) -> dict:
    """``{claim id: (seconds, records)}`` of the report already in ``out`` if it has the same settings."""
    try:
        old = R.load_evidence(out)
    except Exception:  # no report there, or not one of ours: no estimate from it
        return {}
    if old.get("mode") != ("quick" if quick else "full"):
        return {}
    return {c["id"]: (float(c.get("seconds") or 0.0), len(c.get("records") or [])) for c in old.get("claims", [])}


def _run_faults(ids: list[str], args, argv) -> int:
    """``--faults``: the kill matrix of the selected claims (one subprocess per fault), written to DIR."""
    from proofs_check import faults as F
    command = " ".join(["python -m proofs_check", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    result = F.run_matrix(ids, quick=args.quick, progress=lambda line: print(line, flush=True))
    try:
        path = R.write_fault_report(result, args.out, command=command)
    except OSError as exc:
        return _error(f"could not write the kill matrix to {args.out}: {exc}")
    ok = F.matrix_ok(result)
    missed = [f"{c} x {name}" for name, f in result["faults"].items() for c, cell in f["claims"].items()
              if cell["verdict"] == F.MISSED]
    for c in result["unnamed"]:
        print(f"{c:<5} names no fault: its check cannot be shown to catch an error in the code", flush=True)
    print(f"{'PASS' if ok else 'FAIL'}: {len(result['faults'])} faults, "
          f"{sum(len(f['claims']) for f in result['faults'].values())} cells, {len(missed)} missed"
          + (f" ({', '.join(missed)})" if missed else "") + f"; {result['seconds']:.0f} s; kill matrix in {path}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.model is not None:  # a user's model: its own claims and report (proofs_check.model_claims)
        from proofs_check import model_claims

        command = " ".join(["python -m proofs_check", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
        return model_claims.main(args.model, claims=args.claims, out=args.out, quick=args.quick, command=command)
    registry = C.load_all()
    if args.list:
        for c in registry.values():
            print(f"{c.id:<5} {c.paper_ref}: {c.statement}")
        return 0
    ids = _select(args.claims, registry)
    if isinstance(ids, str):
        return _error(ids)
    if args.faults:
        return _run_faults(ids, args, argv)
    start = time.perf_counter()
    results, errors, timings = [], {}, {}
    progress = RT.Progress(ids, _previous(args.out, args.quick))
    cache = None if args.no_cache else (args.cache_dir or RT.default_cache_dir())
    with RT.compilation_cache(cache):
        for cid in ids:
            claim = registry[cid]
            t0 = time.perf_counter()
            with progress.claim(cid), RT.CompileClock() as timing:
                try:
                    result = C.run(claim, quick=args.quick)
                except Exception:  # a broken check fails its claim; the others still run and are reported
                    result = C.ClaimResult(claim, [], time.perf_counter() - t0)
                    errors[cid] = traceback.format_exc()
            timings[cid] = timing
            print(_line(result, errors.get(cid), timing), flush=True)
            results.append(result)
    command = " ".join(["python -m proofs_check", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    try:
        paths = R.write_report(results, args.out, quick=args.quick, errors=errors, command=command,
                               wall_seconds=time.perf_counter() - start,
                               timing={"claims": {c: t.to_dict() for c, t in timings.items()},
                                       "cache": None if cache is None else str(cache)})
    except OSError as exc:
        return _error(f"could not write the report to {args.out}: {exc}")
    status = R.exit_status(results, errors)
    print(f"{'PASS' if status == 0 else 'FAIL'}: report written to {paths['report']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
