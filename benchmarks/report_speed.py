"""The time of ``python -m proofs_check``: a cold run (empty compilation cache) and a warm second run, per claim.

Each run is a fresh subprocess (interpreter start-up, imports and compilation included) with its own cache
directory (``--cache-dir``, created empty for the cold run and reused by the warm one) and report directory.
The per-claim breakdown (compile against run, programs, cache hits) is read from the report's
``evidence.json`` (``timing``, written by :mod:`proofs_check.runtime`). Wall time, the children's CPU time and
the load average before and after each run are recorded: on a shared machine the CPU time is the steadier
number.

    python -m benchmarks.report_speed                 # --quick, cold then warm
    python -m benchmarks.report_speed --full          # the full report too
    python -m benchmarks.report_speed --name report_speed_cpu --out benchmarks/results

Writes ``<out>/<name>.json`` and ``.md`` and prints the Markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(mode: str, cache: Path, out: Path, claims: str | None = None) -> dict:
    """One ``python -m proofs_check`` run; its wall and CPU seconds, load average, exit status, per-claim timing."""
    cmd = [sys.executable, "-m", "proofs_check", "--cache-dir", str(cache), "--out", str(out)]
    if mode == "quick":
        cmd.insert(3, "--quick")
    if claims:
        cmd += ["--claims", claims]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load0, cpu0, t0 = os.getloadavg(), _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu, load1 = time.perf_counter() - t0, _children_cpu() - cpu0, os.getloadavg()
    res = {"command": " ".join(["python", *cmd[1:]]), "returncode": proc.returncode, "wall_s": wall, "cpu_s": cpu,
           "loadavg_start": load0, "loadavg_end": load1, "stdout_tail": proc.stdout[-3000:],
           "stderr_tail": proc.stderr[-2000:]}
    try:
        ev = json.loads((out / "evidence.json").read_text())
        res["timing"] = ev.get("timing")
        res["verdicts"] = {c["id"]: c["ok"] for c in ev["claims"]}
        res["measured"] = {c["id"]: [r.get("measured") for r in c["records"]] for c in ev["claims"]}
    except (OSError, ValueError, KeyError) as exc:
        res["error"] = f"no evidence.json: {exc}"
    return res


def _totals(run: dict) -> dict:
    claims = ((run.get("timing") or {}).get("claims")) or {}
    keys = ("wall", "compile_total", "trace", "lower", "compile", "run", "cpu", "programs", "cache_hits")
    return {k: sum(float(t.get(k) or 0) for t in claims.values()) for k in keys}


def markdown(result: dict) -> str:
    lines = [f"# proofs_check wall time, {result['date']}", "",
             f"Host: {result['host']}; Python {result['python']}, jax {result['jax']}. Each run a fresh process; "
             "cold = empty compilation cache, warm = the second run on the cache the cold one wrote.", ""]
    lines += ["| settings | run | wall s | CPU s | load avg start / end | in claims: compiling s | running s | "
              "programs | from cache | verdicts as cold | measured values as cold |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, runs in result["runs"].items():
        cold = runs.get("cold", {})
        for which, r in runs.items():
            t = _totals(r)
            same_verdict = r.get("verdicts") == cold.get("verdicts")
            same_measured = r.get("measured") == cold.get("measured")
            lines.append(f"| {mode} | {which} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                         f"{r['loadavg_start'][0]:.2f} / {r['loadavg_end'][0]:.2f} | {t['compile_total']:.1f} | "
                         f"{t['run']:.1f} | {int(t['programs'])} | {int(t['cache_hits'])} | "
                         f"{'same' if same_verdict else 'DIFFERENT'} | {'identical' if same_measured else 'differ'} |")
    for mode, runs in result["runs"].items():
        names = list(runs)
        claims = list(((runs[names[0]].get("timing") or {}).get("claims") or {}))
        lines += ["", f"## {mode}: per claim (seconds; compiling = tracing + lowering + XLA compile or cache read)",
                  "", "| claim | " + " | ".join(f"{n} wall | {n} compiling | {n} running" for n in names) + " |",
                  "|---|" + "---|---|---|" * len(names)]
        for c in claims:
            cells = []
            for n in names:
                t = ((runs[n].get("timing") or {}).get("claims") or {}).get(c, {})
                cells += [f"{t.get('wall', float('nan')):.1f}", f"{t.get('compile_total', float('nan')):.1f}",
                          f"{t.get('run', float('nan')):.1f}"]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also time the full report (cold and warm)")
    p.add_argument("--only-full", action="store_true", help="time only the full report")
    p.add_argument("--claims", help="restrict to these claims (for a quick look)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="report_speed_cpu")
    args = p.parse_args(argv)
    import jax

    from benchmarks.common import hardware

    modes = (["full"] if args.only_full else ["quick"] + (["full"] if args.full else []))
    result = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "jax": jax.__version__,
              "hardware": hardware(), "runs": {}}
    hw = result["hardware"]
    result["host"] = f"{hw.get('cpu_model')}, {hw.get('cores')} CPUs ({hw.get('affinity_cores')} usable)"
    work = Path(tempfile.mkdtemp(prefix="report_speed-"))
    try:
        for mode in modes:
            cache = work / f"cache-{mode}"
            result["runs"][mode] = {}
            for which in ("cold", "warm"):
                print(f"{mode} {which} ...", file=sys.stderr, flush=True)
                r = run_once(mode, cache, work / f"report-{mode}-{which}", args.claims)
                result["runs"][mode][which] = r
                print(f"  {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, exit {r['returncode']}, load "
                      f"{r['loadavg_start'][0]:.2f}->{r['loadavg_end'][0]:.2f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_result(args.out, args.name, result, markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
