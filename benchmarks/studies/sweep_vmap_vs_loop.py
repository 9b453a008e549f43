"""Throughput of a learning-rate sweep: ``vmap`` over runs vs a Python loop over runs of one jitted scan.

Workload: 16 runs (``lr_w`` log-spaced over 1e-2..1e2, ``lr_g = 0.1``, one seed) of full-batch GD on a BN
MLP ``64 - w - w - 10`` (preset ``'paper'``, exact BN) on ``b`` standardised digits images (scikit-learn's,
in the wheel), 100 steps, float32, with every step recorded (loss, intrinsic gradient norm, group norms,
effective learning rates), for every width ``w`` in ``--widths`` and batch ``b`` in ``--batches`` (the
brief's cases are ``w`` = 64 and 512 at ``b`` = 256; the others locate the crossover).

Protocol: the init is compiled first (both strategies share it); each strategy is then compiled and run
once (``first_call_s``: compilation of the training program plus the first run); then both are timed
``--repeats`` times, alternating within each repeat so that both see the same background load; cheap
configurations are repeated until ``--min-time`` seconds were timed (at most ``--max-repeats``), to beat
the noise of a shared machine. Reported per configuration: the median wall-clock time of a whole sweep
call, the median CPU time of this process during it (less sensitive to other processes), the fastest
call, runs/s, the vmap/loop speed-up by each of the three, XLA's FLOP estimate of one step of one run
(:func:`rate_tuning.sweep.step_flops`), the number of compilations (1: no call after the warm-up
retraced) and the largest loss difference between the strategies.

The result sets ``rate_tuning.sweep.AUTO_VMAP_MAX_FLOPS`` (the ``'auto'`` strategy on CPU): the geometric
mean of the largest per-step FLOPs where vmap still won and the smallest where it lost, by wall-clock
(printed as ``suggested_auto_max_flops``).

A study, run on demand (not a section of ``benchmarks.run``, whose ``sweep`` section times one such
configuration)::

    python -m benchmarks.studies.sweep_vmap_vs_loop                # widths 16..512 x batches 32, 256
    python -m benchmarks.studies.sweep_vmap_vs_loop --widths 64 512 --batches 256 --repeats 5

Writes ``benchmarks/results/sweep_vmap_vs_loop_<backend>.json`` (``--out`` to change) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from rate_tuning import data, models, sweep

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def environment() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__},
    }


def load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def problem(width: int, batch: int, seed: int = 0):
    """The BN MLP 64-w-w-10 on ``batch`` digits images: the problem, labels, parameter count, FLOPs/step."""
    ds = data.digits(seed=seed, flatten=True)
    x, y = jnp.asarray(ds.x_train[:batch]), jnp.asarray(ds.y_train[:batch])
    model = models.build("mlp", "paper", num_classes=10, widths=(width, width), param_dtype=jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(seed), x)
    prob = sweep.bn_problem(model, variables["params"], variables["batch_stats"], x, y)
    n_params = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(variables["params"]))
    flops = sweep.step_flops(prob.loss_fn, variables["params"])
    return prob, model.labels("layer"), n_params, flops


def cache_size(sw: sweep.Sweep) -> int | None:
    size = getattr(sw._compiled, "_cache_size", None)
    return size() if callable(size) else None


def bench(width: int, batch: int, *, runs: int, steps: int, repeats: int, min_time: float,
          max_repeats: int) -> dict:
    prob, labels, n_params, flops = problem(width, batch)
    lr_w = np.logspace(-2, 2, runs)
    lr_g = np.full(runs, 0.1)
    seeds = np.zeros(runs, np.int64)
    sweeps, first_call, wall, cpu, losses = {}, {}, {}, {}, {}
    jax.block_until_ready(jax.jit(prob.init_fn)(jax.random.key(0)))  # init compiled apart (shared by both)
    for strategy in ("vmap", "loop"):
        sw = sweep.make_sweep(prob.loss_fn, prob.init_fn, labels, steps=steps, strategy=strategy)
        t0 = time.perf_counter()
        res = sw(lr_w, lr_g, seeds)  # compile + run (SweepResult holds numpy arrays: synchronised)
        first_call[strategy] = time.perf_counter() - t0
        sweeps[strategy], wall[strategy], cpu[strategy], losses[strategy] = sw, [], [], res.loss
    r, spent = 0, 0.0
    while r < repeats or (spent < min_time and r < max_repeats):  # cheap configs: more repeats, less noise
        for strategy in (("vmap", "loop") if r % 2 == 0 else ("loop", "vmap")):
            c0, t0 = time.process_time(), time.perf_counter()
            sweeps[strategy](lr_w, lr_g, seeds)
            wall[strategy].append(time.perf_counter() - t0)
            cpu[strategy].append(time.process_time() - c0)
            spent += wall[strategy][-1]
        r += 1
    out = {"width": width, "batch": batch, "n_params": n_params, "flops_per_step": flops, "strategies": {}}
    for strategy in ("vmap", "loop"):
        med = statistics.median(wall[strategy])
        out["strategies"][strategy] = {
            "first_call_s": first_call[strategy], "wall_s": wall[strategy], "cpu_s": cpu[strategy],
            "median_wall_s": med, "min_wall_s": min(wall[strategy]), "median_cpu_s": statistics.median(cpu[strategy]),
            "runs_per_s": runs / med, "steps_per_s": runs * steps / med,
            "compilations": cache_size(sweeps[strategy])}
    v, l = out["strategies"]["vmap"], out["strategies"]["loop"]
    out["speedup_vmap_over_loop"] = l["median_wall_s"] / v["median_wall_s"]
    out["speedup_vmap_over_loop_cpu_time"] = l["median_cpu_s"] / v["median_cpu_s"]
    out["speedup_vmap_over_loop_min_wall"] = l["min_wall_s"] / v["min_wall_s"]
    out["repeats"] = r
    # the two strategies compute the same numbers (float32 round-off, amplified by the large-lr_w runs)
    both = np.isfinite(losses["vmap"]) & np.isfinite(losses["loop"])
    out["max_abs_loss_diff_vmap_vs_loop"] = float(np.max(np.abs(losses["vmap"] - losses["loop"])[both]))
    return out


def suggest_threshold(results: list[dict]) -> float | None:
    """Geometric mean of the largest FLOPs/step where vmap won (below every loss) and the smallest where it
    lost, by wall-clock."""
    lost = [r["flops_per_step"] for r in results if r["speedup_vmap_over_loop"] <= 1]
    if not lost:
        return None
    won = [r["flops_per_step"] for r in results if r["speedup_vmap_over_loop"] > 1 and r["flops_per_step"] < min(lost)]
    if not won:
        return None
    return float(f"{math.sqrt(max(won) * min(lost)):.2g}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=4.0,
                    help="keep repeating (up to --max-repeats) until this many seconds were timed")
    ap.add_argument("--max-repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (the median of at least three timings)")
    env = environment()
    report = {"benchmark": "sweep_vmap_vs_loop", "environment": env,
              "config": {"model": "mlp 64-w-w-10, preset 'paper' (exact BN), labels 'layer'",
                         "data": "the first `batch` standardised scikit-learn digits images, full batch (GD)",
                         "dtype": "float32", "runs": args.runs, "lr_w": "logspace(-2, 2, runs)", "lr_g": 0.1,
                         "seeds": 0, "steps": args.steps, "record_every": 1, "min_repeats": args.repeats,
                         "min_time_s": args.min_time, "max_repeats": args.max_repeats,
                         "timing": "whole sweep call (init dispatch, run, device_get); medians over repeats of "
                                   "wall-clock and of process CPU time; strategies alternate within a repeat"},
              "load_average_start": load(), "results": []}
    print(f"{env['processor']}, {env['cpu_count']} CPUs, jax {jax.__version__} on {env['jax_backend']}; "
          f"load {report['load_average_start']}", flush=True)
    for b in args.batches:
        for w in args.widths:
            r = bench(w, b, runs=args.runs, steps=args.steps, repeats=args.repeats, min_time=args.min_time,
                      max_repeats=args.max_repeats)
            report["results"].append(r)
            print(f"  width {w} batch {b}: vmap {r['strategies']['vmap']['median_wall_s']:.3f} s, "
                  f"loop {r['strategies']['loop']['median_wall_s']:.3f} s (load {load()})", flush=True)
    report["load_average_end"] = load()
    report["suggested_auto_max_flops"] = suggest_threshold(report["results"])
    report["auto_max_flops_in_use"] = sweep.AUTO_VMAP_MAX_FLOPS

    print(f"{'width':>5} {'batch':>5} {'params':>7} {'MFLOP/step':>10} {'vmap runs/s':>11} {'loop runs/s':>11} "
          f"{'vmap/loop wall':>14} {'(cpu)':>6} {'(min)':>6} {'n':>3} {'1st call vmap/loop s':>21}")
    for r in report["results"]:
        v, l = r["strategies"]["vmap"], r["strategies"]["loop"]
        print(f"{r['width']:>5} {r['batch']:>5} {r['n_params']:>7} {r['flops_per_step'] / 1e6:>10.2f} "
              f"{v['runs_per_s']:>11.2f} {l['runs_per_s']:>11.2f} {r['speedup_vmap_over_loop']:>13.2f}x "
              f"{r['speedup_vmap_over_loop_cpu_time']:>5.2f}x {r['speedup_vmap_over_loop_min_wall']:>5.2f}x "
              f"{r['repeats']:>3} {v['first_call_s']:>10.1f} / {l['first_call_s']:<8.1f}")
    print(f"suggested AUTO_VMAP_MAX_FLOPS: {report['suggested_auto_max_flops']} "
          f"(in use: {report['auto_max_flops_in_use']:g})")
    out = args.out or os.path.join(RESULTS, f"sweep_vmap_vs_loop_{env['jax_backend']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
