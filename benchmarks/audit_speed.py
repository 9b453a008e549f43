"""How long :func:`rate_tuning.audit.audit` takes on a preset at a given batch: each repeat in a fresh process
(compilation included, as a user's first audit), the median and the worst, against a budget.

    python -m benchmarks.audit_speed                          # resnet preset, batch 128, 32x32x3, 3 repeats
    python -m benchmarks.audit_speed --arch vgg --batch 64 --repeats 5 --name audit_speed_vgg

Writes ``benchmarks/results/<name>.json`` and ``.md`` (default name ``audit_speed_<backend>``). Measured: the
wall time of the audit call (float64 probes, everything it compiles), and separately the model's own ``init``
(the user's factory, not the audit). The machine's load average is recorded with each repeat: on shared
cores it is the first thing to read next to a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"mlp": (28, 28, 1), "convnet": (32, 32, 3), "vgg": (32, 32, 3), "resnet": (32, 32, 3)}


def worker(arch: str, batch: int, seed: int) -> dict:
    import jax
    import numpy as np

    from rate_tuning import audit, models

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *SHAPES[arch])).astype(np.float32)
    y = rng.integers(0, 10, batch)
    model = models.build(arch, "paper", num_classes=10)
    t0 = time.perf_counter()
    variables = jax.jit(model.init)(jax.random.key(seed), x)
    jax.block_until_ready(variables)
    init_s = time.perf_counter() - t0
    load = list(os.getloadavg())
    t0 = time.perf_counter()
    result = audit.audit(model, variables, (x, y), seed=seed)
    seconds = time.perf_counter() - t0
    diff = audit.compare_labels(variables["params"], result.labels("channel"), model.labels("channel"))
    return {"audit_s": seconds, "init_s": init_s, "loadavg_before": load, "loadavg_after": list(os.getloadavg()),
            "groups": len(result.groups), "almost": len(result.almost), "differences_from_hand_labels": diff,
            "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float, str))},
            "backend": jax.default_backend(), "threads": os.cpu_count()}


def markdown(record: dict) -> str:
    r = record
    lines = [f"# Audit speed: {r['arch']} preset 'paper', batch {r['batch']}, input {r['input_shape']}", "",
             f"- Date: {r['hardware']['date']}; backend {r['backend']}; JAX {r['versions']['jax']}, "
             f"flax {r['versions']['flax']}",
             common.hardware_line(r["hardware"]),
             f"- Budget: {r['budget_s']:g} s; median {r['median_s']:.1f} s, worst {r['max_s']:.1f} s over "
             f"{len(r['repeats'])} fresh processes: **{'within' if r['max_s'] <= r['budget_s'] else 'OVER'} budget**",
             "", "| repeat | audit (s) | model init (s) | load average before (1/5/15 min) | groups | euler rows |",
             "|---|---|---|---|---|---|"]
    for i, x in enumerate(r["repeats"]):
        lines.append(f"| {i} | {x['audit_s']:.2f} | {x['init_s']:.2f} | "
                     f"{' / '.join(f'{v:.1f}' for v in x['loadavg_before'])} | {x['groups']} | "
                     f"{x['info'].get('euler_rows')} |")
    d = r["repeats"][0]["differences_from_hand_labels"]
    lines += ["", "Groups found against `model.labels('channel')` (names ignored): "
              + ("identical." if not d else "; ".join(d)), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit_speed", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=30.0, help="seconds the audit may take (default 30)")
    p.add_argument("--name", default=None, help="results file name (default audit_speed_<backend>)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.write_worker_result(worker(args.arch, args.batch, args.seed), args.json)
        return 0
    repeats = []
    for i in range(args.repeats):
        out = common.spawn_worker("benchmarks.audit_speed", "audit",
                                  ["--arch", args.arch, "--batch", str(args.batch), "--seed", str(args.seed)])
        if "error" in out:
            print(f"repeat {i}: {out['error']}", file=sys.stderr)
            return 1
        print(f"repeat {i}: audit {out['audit_s']:.1f} s (load {out['loadavg_before'][0]:.1f})", flush=True)
        repeats.append(out)
    times = [x["audit_s"] for x in repeats]
    record = {"arch": args.arch, "batch": args.batch, "input_shape": list(SHAPES[args.arch]),
              "budget_s": args.budget, "median_s": statistics.median(times), "max_s": max(times),
              "repeats": repeats, "backend": repeats[0]["backend"], "hardware": common.hardware(),
              "versions": common.versions()}
    name = args.name or f"audit_speed_{record['backend']}"
    base = os.path.join(ROOT, "benchmarks", "results", name)
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=2)
    text = markdown(record)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
