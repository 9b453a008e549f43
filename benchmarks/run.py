"""The benchmark suite: one entry point that warms up, repeats, takes medians and writes JSON + Markdown.

Usage::

    python -m benchmarks.run --quick                 # batch 128 only; ~6 min on 2 shared CPU cores
    python -m benchmarks.run                         # the full suite (more repeats, torch.compile, proofs full)
    python -m benchmarks.run --sections train,percore --out benchmarks/results

Writes ``OUT/<backend>_<quick|full>.json`` and ``.md`` (default ``OUT = benchmarks/results``) and prints
the Markdown. Every measurement is a fresh subprocess (``python -m benchmarks.run --worker ...``) so that
XLA flags, device counts, CPU affinity and thread counts never leak between measurements.

This module orchestrates: the sections, their workers, the JSON and the Markdown. Timing, the process set-up
(affinity, allocator, PyTorch threads and device), the hardware record and the models' JAX set-up are in
:mod:`benchmarks.common`; the convnet section runs :mod:`benchmarks.studies.convnet_study` (whose workers are
its own subprocesses). Nothing imports this module.

Sections (``--sections``, comma-separated; default: all):

* ``train``: examples/s of one jitted train step (:func:`rate_tuning.steps.make_train_step`: loss, gradient,
  two-rate SGD update, BN running statistics and the step's metrics) for ``mlp``, ``convnet``, ``vgg``,
  ``resnet`` at batch 128 and 1024 (``--quick``: 128 unless ``--batches`` says otherwise), float32 and, on
  accelerators or with ``--bf16``, bfloat16, one device. Next to it, in the same process, the same dtype and
  interleaved repeat by repeat, the PyTorch peer (``benchmarks/torch_reference.py``: the same network, exact
  BN, SGD with two parameter groups) eager, on the device JAX runs on
  (:func:`benchmarks.common.torch_device`: the CPU with ``torch.set_num_threads`` = the cores JAX uses, or
  CUDA with TF32 like JAX's default: :func:`benchmarks.common.torch_precision_settings`); the ratio is
  JAX/PyTorch examples/s per model, batch and dtype. Wall clock.
* ``parallel``: the same step data-parallel (:mod:`rate_tuning.parallel`) over every device, in the same
  dtypes (on a CPU host: ``--xla_force_host_platform_device_count`` = number of cores, each "device" then
  shares the same cores), blocking every step.
* ``percore``: one core, one thread each (the process pinned to one core with ``sched_setaffinity``,
  which XLA and PyTorch both read), **CPU time** per step (``time.process_time``). On a machine shared
  with other jobs this is the load-robust comparison: time slices lost to other processes do not count.
  CPU backend only (on an accelerator the section records that it was skipped).
* ``curvature``: Hessian-vector product (:func:`proofs_check.curvature.hvp`) and Lanczos
  (:func:`proofs_check.curvature.lanczos`, 10 steps quick, 30 full, jitted as a whole) cost relative to one
  gradient, same loss and params (the mlp and the convnet at batch 128).
* ``sweep``: runs/s of :func:`rate_tuning.sweep.make_sweep` (16 learning rates, 100 full-batch GD steps, BN MLP
  64-64-64-10 on 256 scikit-learn digits), ``vmap`` and ``loop`` strategies.
* ``proofs``: wall time of ``python -m proofs_check --quick`` (and without ``--quick`` unless ``--quick``
  is given to the benchmark), including interpreter start-up and compilation.
* ``convnet``: the convnet investigation (:mod:`benchmarks.studies.convnet_study`, also run on its own):
  convolution forward / backward-input / backward-weight per layer, layouts, alternative formulations, XLA
  flags, bfloat16. Not in ``--quick``'s default sections.

Method: compile and run 2 warm-up steps, calibrate ``n`` steps so that one repeat lasts at least
``--min-time`` seconds, then ``--repeats`` repeats (>= 5) of ``n`` steps, blocking on the result at the
end of each repeat (every step when data-parallel, see JAX-NOTES.md); report the median time per step,
the inter-quartile range and the minimum; JAX and PyTorch alternate within each repeat so that both see
the same background load. Retracing is checked: the step is wrapped in ``chex.assert_max_traces(n=1)``
(a retrace raises AssertionError and fails the measurement); the jit dispatch-cache size is recorded too
(2: the first call's Python-int ``step`` and the array ``step`` afterwards, one trace and one compilation). The load average before and
after, the hardware (:func:`benchmarks.common.hardware`: the ``/proc/cpuinfo`` model name, family / model /
stepping and vector extensions, ``platform.processor()``, cores, memory; the accelerator from the train section) and the
versions are recorded in the JSON.

Models (preset ``'paper'``: exact BN, epsilon = 0, two-pass variance; ``lr_w = lr_g = 0.1`` constant):

* ``mlp``: 784-512-512-10 on 28x28x1 inputs (the JAX-NOTES size; ``models.mlp(widths=(512, 512))``);
* ``convnet``: ``models.convnet()`` default, 3x3 stride-2 convolutions 16-32-64, global average pool, on
  32x32x3 (CIFAR-shaped);
* ``vgg``: ``models.vgg()`` default, 32-M-64-M-128-128-M (3x3 stride 1, 2x2 max-pool), on 32x32x3;
* ``resnet``: ``models.resnet()`` default, stages 16-32, one basic block each, on 32x32x3.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (ALLOCATORS, LR, MODELS, ROOT, allocator_env, hardware, hardware_line, have_torch,
                               jax_setup, measure, pin_to_core, set_torch_threads, spawn_worker, summarize,
                               torch_device, torch_precision_settings, versions, worker_environ, write_worker_result)

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")
SECTIONS = ("train", "parallel", "percore", "curvature", "sweep", "proofs", "convnet")
MODEL_NOTES = {
    "mlp": "784-512-512-10, 28x28x1",
    "convnet": "3x3 s2 conv 16-32-64, GAP, 32x32x3",
    "vgg": "32-M-64-M-128-128-M, 32x32x3",
    "resnet": "stem 16, blocks 16/32 (s2), 32x32x3",
}
BATCHES = (128, 1024)


# ------------------------------------------------------------------------------------------------
# Workers (run in subprocesses).


def _jax_runner(arch, batch, *, dtype="float32", mesh=None):
    """``(run(n), check(), step_flops())``: ``n`` train steps of the jitted step, blocking at the end (every
    step on a mesh); ``check()`` returns the number of compiled entries (must be 1); ``step_flops()`` the
    model FLOPs of one step (:func:`benchmarks.flops.train_flops`)."""
    import chex
    import jax
    import jax.numpy as jnp

    from rate_tuning import parallel, steps

    from benchmarks import flops

    model, labels, lr_w, state, x, y, jdt = jax_setup(arch, batch, dtype)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    chex.clear_trace_counter()
    if mesh is None:
        step = steps.make_train_step(model, labels, lr_w, max_traces=1)
        xs, ys = jnp.asarray(x, jdt), jnp.asarray(y)
        jitted = step
    else:
        step = parallel.make_parallel_train_step(model, labels, lr_w, mesh, max_traces=1)
        state = parallel.replicate(mesh, state)
        xs, ys = parallel.shard_batch(mesh, jnp.asarray(x, jdt), y)
        jitted = step.jitted
    box = [state]

    def run(n):
        s = box[0]
        for _ in range(n):
            s, m = step(s, xs, ys)
            if mesh is not None:
                jax.block_until_ready(m)
        jax.block_until_ready(s.params)
        box[0] = s

    return run, (lambda: jitted._cache_size()), (lambda: flops.train_flops(model, variables, jnp.asarray(x, jdt)))


def _torch_runner(arch, batch, *, dtype="float32", device="cpu", channels_last=False, compile=False):
    """``run(n)``: ``n`` steps of the PyTorch peer (``benchmarks/torch_reference.py``) in ``dtype`` on
    ``device``, synchronised at the end like the JAX runner."""
    import numpy as np
    import torch

    from benchmarks import torch_reference as tr

    from rate_tuning import models

    kw, shape = MODELS[arch]
    model = models.build(arch, "paper", **kw)
    labels = model.labels("layer")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    step, _, _ = tr.make_step(model, labels, shape, lr_w=LR, lr_g=LR, dtype=tdt, device=device,
                              channels_last=channels_last, compile=compile)
    xt, yt = tr.to_torch_batch(x, y, tdt, channels_last=channels_last, device=device)

    def run(n):
        for _ in range(n):
            loss = step(xt, yt)
        float(loss.detach())  # waits for the device (on CPU every op has already run)

    return run


def worker_train(args) -> dict:
    """Every (arch, batch, dtype) group: the JAX step on one device and, timed alternately with it, the PyTorch
    peer in the same dtype on the matching device (eager, and its variants); bfloat16 on accelerators."""
    import jax

    res = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
           "device_count": jax.device_count(), "clock": args.clock, "entries": []}
    if args.clock == "cpu" and jax.default_backend() != "cpu":
        res["errors"] = [f"the CPU-time clock times the CPU backend, not {jax.default_backend()!r}: skipped"]
        return res
    want_torch = have_torch() and not args.no_torch
    device = torch_device(jax.default_backend()) if want_torch else None
    if want_torch and device is None:
        res["torch_skipped"] = f"this torch build has no device for JAX's backend {jax.default_backend()!r}"
    if device is not None:
        res["torch_threads"] = set_torch_threads(args.torch_threads)
        import torch

        res["torch_config"] = {"mkldnn": torch.backends.mkldnn.is_available(),
                               "num_threads": torch.get_num_threads(), **torch_precision_settings(device)}
    dtypes = _dtypes(args)
    res["matmul"] = {dt: _matmul_throughput(dt, args) for dt in dtypes}
    groups = [(a, b, d) for a in args.models.split(",") for b in map(int, args.batches.split(",")) for d in dtypes]
    for arch, batch, dt in groups:  # one group per dtype: chex counts the traces of every step of one source
        name = f"jax/{dt}"
        jax_run, jax_cache_size, jax_flops = _jax_runner(arch, batch, dtype=dt)
        runners, meta = {name: jax_run}, {name: {"framework": "jax", "dtype": dt, "variant": "jit"}}
        if device is not None:
            layouts = [False, True] if args.torch_layouts == "both" else [args.torch_layouts == "channels_last"]
            for cl in [False] if arch == "mlp" else layouts:
                name = f"torch/{dt}/" + ("channels_last" if cl else "nchw")
                runners[name] = _torch_runner(arch, batch, dtype=dt, device=device, channels_last=cl)
                meta[name] = {"framework": "torch", "dtype": dt,
                              "variant": "eager " + ("channels_last" if cl else "NCHW")}
            if args.torch_compile:
                name = f"torch/{dt}/compile"
                try:
                    runners[name] = _torch_runner(arch, batch, dtype=dt, device=device, compile=True)
                    t0 = time.perf_counter()
                    runners[name](1)  # compiles here, so that a failure is caught and recorded
                    meta[name] = {"framework": "torch", "dtype": dt, "variant": "torch.compile NCHW",
                                  "compile_s": time.perf_counter() - t0}
                except Exception as e:  # noqa: BLE001 - recorded
                    runners.pop(name, None)
                    res.setdefault("errors", []).append(f"{arch}/{batch}/{dt} torch.compile: {type(e).__name__}: {e}")
        timed = measure(runners, repeats=args.repeats, min_time=args.min_time, clock=args.clock)
        for name, t in timed.items():
            entry = {"model": arch, "batch": batch, **meta[name],
                     **summarize(t["samples"], t["n"], batch), "first_call_s": t["first_call_s"]}
            if name.startswith("jax/"):  # dispatch-cache signatures: 2 = the first call's Python int step + arrays
                entry["jit_cache_entries"] = jax_cache_size()
                entry["traces_checked"] = "chex.assert_max_traces(n=1)"
                entry.update(_utilisation(jax_flops(), entry, res["matmul"][dt]))
            res["entries"].append(entry)
        print(f"  {arch:8s} batch {batch:5d} {dt}: " + "  ".join(
            f"{n} {res['entries'][-len(timed) + i]['examples_per_s']:.0f} ex/s"
            for i, n in enumerate(timed)), file=sys.stderr, flush=True)
    return res


def _matmul_throughput(dtype: str, args) -> dict:
    """FLOP/s of a jitted N x N product (:func:`benchmarks.flops.matmul_runner`), timed like every entry."""
    from benchmarks import flops

    run, per_call, n = flops.matmul_runner(dtype)
    t = measure({"matmul": run}, repeats=args.repeats, min_time=args.min_time, clock=args.clock)["matmul"]
    median = summarize(t["samples"], t["n"])["median_s"]
    return {"n": n, "dtype": dtype, "median_s": median, "flops_per_s": per_call / median}


def _utilisation(per_step: int, entry: dict, matmul: dict) -> dict:
    """Model FLOPs of the step, the FLOP/s they run at, and that as a fraction of the measured ``N x N``
    matmul throughput of the same dtype."""
    rate = per_step * entry["steps_per_s"]
    return {"model_flops_per_step": per_step, "model_flops_per_s": rate, "matmul_n": matmul["n"],
            "matmul_flops_per_s": matmul["flops_per_s"], "fraction_of_matmul": rate / matmul["flops_per_s"]}


def _dtypes(args) -> list[str]:
    """float32, and bfloat16 on accelerators or with ``--bf16``."""
    import jax

    return ["float32"] + (["bfloat16"] if jax.default_backend() != "cpu" or args.bf16 else [])


def worker_parallel(args) -> dict:
    import jax

    from rate_tuning import parallel

    mesh = parallel.data_mesh()
    res = {"backend": jax.default_backend(), "device_count": jax.device_count(), "clock": args.clock,
           "entries": []}
    for arch in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for dtype in _dtypes(args):
                run, check, _ = _jax_runner(arch, batch, dtype=dtype, mesh=mesh)
                t = measure({"p": run}, repeats=args.repeats, min_time=args.min_time, clock=args.clock)["p"]
                entry = {"model": arch, "batch": batch, "framework": "jax", "dtype": dtype,
                         "variant": f"data-parallel x{jax.device_count()}", "devices": jax.device_count(),
                         **summarize(t["samples"], t["n"], batch), "first_call_s": t["first_call_s"],
                         "jit_cache_entries": check()}
                res["entries"].append(entry)
                print(f"  {arch:8s} batch {batch:5d} {dtype}: data-parallel x{jax.device_count()} "
                      f"{entry['examples_per_s']:.0f} ex/s", file=sys.stderr, flush=True)
    return res


def worker_curvature(args) -> dict:
    import jax
    import jax.numpy as jnp

    from proofs_check import curvature
    from rate_tuning import models

    res = {"entries": []}
    for arch, batch in (("mlp", 128), ("convnet", 128)):
        model, _, _, state, x, y, _ = jax_setup(arch, batch)
        xs, ys, stats = jnp.asarray(x), jnp.asarray(y), state.batch_stats

        def loss(p):
            return models.batch_loss(model, p, stats, xs, ys, True)[0]

        p = state.params
        v = jax.tree_util.tree_map(jnp.ones_like, p)
        k = args.lanczos_steps
        grad = jax.jit(jax.grad(loss))
        hvp = jax.jit(lambda p, v: curvature.hvp(loss, p, v))
        lanczos = jax.jit(lambda p, key: curvature.lanczos(lambda u: curvature.hvp(loss, p, u), p, k, key))
        key = jax.random.key(0)
        loops = 5  # the same 5 HVPs inside one lax.fori_loop, and dispatched from Python

        def fori_body(i, u):
            w = curvature.hvp(loss, p, u)
            n = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(w)))
            return jax.tree_util.tree_map(lambda a: a / n, w)

        fori = jax.jit(lambda u: jax.lax.fori_loop(0, loops, fori_body, u))
        step = jax.jit(lambda u: fori_body(0, u))

        def python_loop(n):
            for _ in range(n):
                u = v
                for _ in range(loops):
                    u = step(u)
            jax.block_until_ready(u)

        runners = {
            f"{loops} hvp in lax.fori_loop": lambda n: jax.block_until_ready([fori(v) for _ in range(n)]),
            f"{loops} hvp from Python": python_loop,
            "grad": lambda n: jax.block_until_ready([grad(p) for _ in range(n)]),
            "hvp": lambda n: jax.block_until_ready([hvp(p, v) for _ in range(n)]),
            f"lanczos{k}": lambda n: jax.block_until_ready([lanczos(p, key) for _ in range(n)]),
        }
        timed = measure(runners, repeats=args.repeats, min_time=args.min_time, clock=args.clock, warmup=1)
        g = summarize(timed["grad"]["samples"], timed["grad"]["n"])["median_s"]
        for name, t in timed.items():
            s = summarize(t["samples"], t["n"])
            entry = {"model": arch, "batch": batch, "op": name, "median_s": s["median_s"],
                     "q1_s": s["q1_s"], "q3_s": s["q3_s"], "relative_to_grad": s["median_s"] / g}
            if name.startswith("lanczos"):
                entry["per_step_relative_to_grad"] = s["median_s"] / g / k
            elif name.startswith(f"{loops} hvp"):
                entry["per_step_relative_to_grad"] = s["median_s"] / g / loops
            res["entries"].append(entry)
        print(f"  {arch}: " + "  ".join(f"{e['op']} {e['relative_to_grad']:.2f}x" for e in res["entries"][-5:]),
              file=sys.stderr, flush=True)
    return res


def worker_sweep(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rate_tuning import data, models, sweep

    ds = data.digits(seed=0, flatten=True)
    x, y = ds.x_train[:256].astype(np.float32), ds.y_train[:256]
    model = models.build("mlp", "paper", widths=(64, 64), num_classes=10)
    labels = model.labels("layer")
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    prob = sweep.bn_problem(model, variables["params"], variables["batch_stats"], x, y)
    runs, steps = 16, 100
    lr_w = np.logspace(-2, 2, runs)
    lr_g, seeds = np.full(runs, 0.1), np.zeros(runs, int)
    res = {"workload": f"{runs} runs x {steps} full-batch GD steps, BN MLP 64-64-64-10 on 256 digits, float32, "
                       "every step recorded", "entries": []}
    runners = {}
    for strategy in ("vmap", "loop"):
        sw = sweep.make_sweep(prob.loss_fn, prob.init_fn, labels, steps=steps, strategy=strategy)
        runners[strategy] = (lambda sw: lambda n: [sw(lr_w, lr_g, seeds) for _ in range(n)])(sw)
    timed = measure(runners, repeats=args.repeats, min_time=args.min_time, clock=args.clock, warmup=1)
    for name, t in timed.items():
        s = summarize(t["samples"], t["n"])
        res["entries"].append({"strategy": name, "sweep_s": s["median_s"], "q1_s": s["q1_s"], "q3_s": s["q3_s"],
                               "runs_per_s": runs / s["median_s"], "first_call_s": t["first_call_s"]})
    print("  sweep: " + "  ".join(f"{e['strategy']} {e['runs_per_s']:.1f} runs/s" for e in res["entries"]),
          file=sys.stderr, flush=True)
    return res


def worker_parity(args) -> dict:
    """One float64 two-rate SGD step from the same params in JAX and in the PyTorch peer, per model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import torch_reference as tr
    from rate_tuning import models

    out = {"entries": []}
    for arch, (kw, shape) in MODELS.items():
        model = models.build(arch, "paper", **kw)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(16,) + shape)
        y = rng.integers(0, 10, 16)
        params = model.init(jax.random.key(1), jnp.asarray(x, jnp.float32))["params"]
        dloss, dparams = tr.check_parity(model, params, model.labels("layer"), x, y, lr_w=0.5, lr_g=0.1)
        out["entries"].append({"model": arch, "batch": 16, "dtype": "float64", "loss_abs_diff": dloss,
                               "params_max_rel_diff": dparams})
    return out


def run_worker(args) -> None:
    if args.pin_core is not None:  # before jax/torch read the affinity
        pin_to_core(args.pin_core)
    fn = {"train": worker_train, "parallel": worker_parallel, "curvature": worker_curvature,
          "sweep": worker_sweep, "parity": worker_parity}
    write_worker_result(fn[args.worker](args), args.json)


# ------------------------------------------------------------------------------------------------
# Orchestration.


_WORKER_ENV: dict[str, str] = {}  # the allocator's environment, set by orchestrate for every subprocess


def _spawn(worker: str, extra: list[str], *, env: dict | None = None, timeout: float = 1800) -> dict:
    """One of this module's workers in a fresh process (:func:`benchmarks.common.spawn_worker`), with the
    allocator's environment and ``env``."""
    return spawn_worker("benchmarks.run", worker, extra, env={**_WORKER_ENV, **(env or {})}, timeout=timeout)


def _proofs(quick: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "proofs_check", "--out"]
    with tempfile.TemporaryDirectory() as d:
        cmd += [d] + (["--quick"] if quick else [])
        e = worker_environ(_WORKER_ENV)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=e, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"mode": "quick" if quick else "full", "error": f"timed out after {timeout} s"}
        wall = time.perf_counter() - t0
    lines = [l for l in p.stdout.splitlines() if l[:1] in ("C", "I") and " s" in l]
    return {"mode": "quick" if quick else "full", "wall_s": wall, "exit_status": p.returncode,
            "claims": len(lines), "tail": p.stdout.splitlines()[-3:] + p.stderr.splitlines()[-3:]}


def worker_options(args) -> list[str]:
    """The options every timing worker takes from the command line."""
    return ["--repeats", str(args.repeats), "--min-time", str(args.min_time)] + \
        (["--bf16"] if args.bf16 else []) + (["--no-torch"] if args.no_torch else [])


def orchestrate(args) -> dict:
    default = [x for x in SECTIONS if x != "convnet"] if args.quick else list(SECTIONS)
    sections = args.sections.split(",") if args.sections else default
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    cores = len(os.sched_getaffinity(0))
    models = args.models
    batches = args.batches
    _WORKER_ENV.clear()
    _WORKER_ENV.update(allocator_env(args.allocator))
    result = {"suite": "rate_tuning benchmarks", "mode": "quick" if args.quick else "full",
              "hardware": hardware(), "versions": versions(),
              "allocator": {"name": args.allocator, "env": dict(_WORKER_ENV)},
              "settings": {"repeats": args.repeats, "min_time_s": args.min_time, "models": MODEL_NOTES,
                           "batches": batches, "torch_threads": args.torch_threads or cores,
                           "preset": "paper (exact BN, eps=0, two-pass variance)", "lr_w": LR, "lr_g": LR,
                           "torch_layouts": args.torch_layouts, "torch_compile": args.torch_compile,
                           "torch_omp_wait_policy": args.omp_wait_policy or "default",
                           "xla_python_client_mem_fraction":
                               worker_environ(_WORKER_ENV)["XLA_PYTHON_CLIENT_MEM_FRACTION"]},
              "sections": {}}
    t_start = time.perf_counter()
    torch_flags = (["--torch-threads", str(args.torch_threads)] if args.torch_threads else []) + \
        ["--torch-layouts", args.torch_layouts] + (["--torch-compile"] if args.torch_compile else [])

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if "train" in sections:
        log("train step, one device, JAX vs PyTorch (wall clock)")
        entries, runs = [], []
        omp = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
        for arch in models.split(","):  # one process per model: compile caches and memory stay small
            r = _spawn("train", ["--models", arch, "--batches", batches, "--clock", "wall", *torch_flags,
                                 *worker_options(args)], env=omp)
            runs.append(r)
            entries += r.get("entries", [])
        result["sections"]["train"] = {"clock": "wall", "entries": entries,
                                       "errors": [r["error"] for r in runs if "error" in r] +
                                       [e for r in runs for e in r.get("errors", [])],
                                       **{k: next((r[k] for r in runs if k in r), None)
                                          for k in ("backend", "device", "device_count", "torch_threads",
                                                    "torch_config", "torch_skipped")}}
    if "train" in sections and have_torch() and not args.no_torch:
        log("parity: one float64 step, JAX vs the PyTorch peer")
        result["sections"]["parity"] = _spawn("parity", [])
    if "parallel" in sections:
        n = args.devices or cores
        log(f"train step, data-parallel over {n} devices")
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        r = _spawn("parallel", ["--models", models, "--batches", batches, "--clock", "wall", *worker_options(args)],
                   env=env)
        result["sections"]["parallel"] = r
    if "percore" in sections:
        core = max(os.sched_getaffinity(0))
        log(f"train step pinned to core {core}, one thread each, CPU time")
        entries, errors = [], []
        for arch in models.split(","):
            r = _spawn("train", ["--models", arch, "--batches", "128", "--clock", "cpu", "--pin-core", str(core),
                                 "--torch-threads", "1", "--torch-layouts", args.torch_layouts, *worker_options(args)])
            entries += r.get("entries", [])
            errors += ([r["error"]] if "error" in r else []) + r.get("errors", [])
        result["sections"]["percore"] = {"clock": "cpu", "core": core, "entries": entries,
                                         "errors": list(dict.fromkeys(errors))}
    if "curvature" in sections:
        log("HVP and Lanczos vs gradient")
        result["sections"]["curvature"] = _spawn("curvature", ["--clock", "wall", "--lanczos-steps",
                                                               str(args.lanczos_steps), *worker_options(args)])
    if "sweep" in sections:
        log("sweep runs/s")
        result["sections"]["sweep"] = _spawn("sweep", ["--clock", "wall", "--repeats", str(args.repeats),
                                                       "--min-time", "0"])
    if "proofs" in sections:
        log("proofs_check --quick")
        pr = [_proofs(True, args.proofs_timeout)]
        if not args.quick:
            log("proofs_check (full)")
            pr.append(_proofs(False, args.proofs_timeout * 10))
        result["sections"]["proofs"] = {"entries": pr}
    if "convnet" in sections:
        log("convnet investigation")
        from benchmarks.studies import convnet_study
        result["sections"]["convnet"] = convnet_study.orchestrate(args, convnet_study.spawner(_WORKER_ENV))
    result["hardware"]["loadavg_end"] = list(os.getloadavg())
    result["total_wall_s"] = time.perf_counter() - t_start
    return result


# ------------------------------------------------------------------------------------------------
# Report.


def _fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def _train_table(entries: list[dict], parallel: list[dict], clock: str) -> list[str]:
    rows = {}
    for e in entries + parallel:
        key = (e["model"], e["batch"], e["dtype"])
        rows.setdefault(key, {})
        if e["framework"] == "jax" and e["variant"] == "jit":
            rows[key]["jax"] = e
        elif e["framework"] == "jax":
            rows[key]["par"] = e
        else:
            best = rows[key].get("torch")
            if best is None or e["examples_per_s"] > best["examples_per_s"]:
                rows[key]["torch"] = e
            rows[key].setdefault("torch_all", []).append(e)
    unit = "examples/s (median, IQR)" if clock == "wall" else "examples per CPU-second (median, IQR)"
    out = [f"| model | batch | dtype | JAX {unit} | JAX data-parallel | PyTorch best | PyTorch variants | "
           f"JAX / PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for (model, batch, dtype), r in rows.items():
        j, t, p = r.get("jax"), r.get("torch"), r.get("par")

        def cell(e):
            if e is None:
                return "-"
            lo, hi = e["examples_per_s_iqr"]
            return f"{e['examples_per_s']:.0f} ({lo:.0f}-{hi:.0f})"

        variants = ", ".join(f"{e['variant']}: {e['examples_per_s']:.0f}" for e in r.get("torch_all", []))
        ratio = f"**{j['examples_per_s'] / t['examples_per_s']:.2f}**" if j and t else "-"
        par = f"{cell(p)} (x{p['devices']})" if p else "-"
        out.append(f"| {model} | {batch} | {dtype} | {cell(j)} | {par} | {cell(t)} | {variants or '-'} | {ratio} |")
    return out


def _utilisation_table(entries: list[dict], title: str) -> list[str]:
    rows = [e for e in entries if e.get("framework") == "jax" and "fraction_of_matmul" in e]
    if not rows:
        return []
    out = [f"### {title}: model FLOPs against the measured matmul throughput", "",
           "Model FLOPs: 3 x the forward pass's matrix products and convolutions (`benchmarks/flops.py`); matmul: "
           "a jitted N x N product of the same dtype, same clock.", "",
           "| model | batch | dtype | GFLOP per step | achieved GFLOP/s | matmul GFLOP/s (N) | fraction |",
           "|---|---|---|---|---|---|---|"]
    for e in rows:
        out.append(f"| {e['model']} | {e['batch']} | {e['dtype']} | {e['model_flops_per_step'] / 1e9:.2f} | "
                   f"{e['model_flops_per_s'] / 1e9:.1f} | {e['matmul_flops_per_s'] / 1e9:.1f} ({e['matmul_n']}) | "
                   f"**{e['fraction_of_matmul']:.2f}** |")
    return out + [""]


def _allocator_note(result: dict) -> str:
    a = result.get("allocator") or {"name": "system"}
    if a["name"] == "system":
        return "glibc malloc (system default)"
    return f"tcmalloc ({', '.join(f'{k}={v}' for k, v in a['env'].items())})"


def markdown(result: dict) -> str:
    hw, v = result["hardware"], result["versions"]
    s = result["sections"]
    lines = [f"# Benchmarks ({result['mode']}), {hw['date']}", "",
             hardware_line(hw, s.get("train")),
             f"- Host allocator (JAX and PyTorch alike): {_allocator_note(result)}",
             f"- Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in hw['loadavg'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in hw.get('loadavg_end', []))} (the machine is shared; see the "
             "per-core table for load-robust numbers)",
             f"- Versions: python {hw['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- Settings: {result['settings']['repeats']} repeats of >= {result['settings']['min_time_s']} s "
             f"after 2 warm-up steps; median and IQR; PyTorch threads "
             f"{result['settings']['torch_threads']}; models: " +
             "; ".join(f"{k}: {val}" for k, val in result["settings"]["models"].items()), ""]
    if "train" in s:
        par = s.get("parallel", {}).get("entries", []) if isinstance(s.get("parallel"), dict) else []
        lines += ["## Train step, wall clock, all cores", "",
                  f"backend {s['train'].get('backend')}; JAX uses every core (XLA's thread pool), PyTorch "
                  f"`torch.set_num_threads({s['train'].get('torch_threads')})`, interop threads 1, "
                  f"`OMP_WAIT_POLICY={result['settings'].get('torch_omp_wait_policy')}`. Wall clock on a shared "
                  "machine: compare with the load average above; the per-core table is the robust comparison.", ""]
        tc = s["train"].get("torch_config") or {}
        if tc.get("device") == "cuda":
            lines += [f"PyTorch on {tc.get('cuda_device')} (CUDA {tc.get('torch_cuda')}), float32 products and "
                      "convolutions in TF32 as JAX's default, `cudnn.benchmark` on "
                      "(`benchmarks.common.torch_precision_settings`).", ""]
        if s["train"].get("torch_skipped"):
            lines += [f"No PyTorch peer: {s['train']['torch_skipped']}.", ""]
        lines += _train_table(s["train"]["entries"], par, "wall")
        if s["train"].get("errors"):
            lines += ["", "Errors: " + "; ".join(s["train"]["errors"])]
        lines.append("")
        lines += _utilisation_table(s["train"]["entries"], "All cores, wall clock")
    if "parity" in s and "entries" in s["parity"]:
        lines += ["Parity (the PyTorch peer computes the same step): one two-rate SGD step in float64 from the same "
                  "params, batch 16: " + "; ".join(
                      f"{e['model']} |loss diff| {e['loss_abs_diff']:.1e}, params max rel diff "
                      f"{e['params_max_rel_diff']:.1e}" for e in s["parity"]["entries"]) + ".", ""]
    if "percore" in s:
        lines += ["## Train step, one core, one thread each, CPU time (load-robust)", ""]
        lines += _train_table(s["percore"]["entries"], [], "cpu")
        if s["percore"].get("errors"):
            lines += ["", "Errors: " + "; ".join(s["percore"]["errors"])]
        lines.append("")
        lines += _utilisation_table(s["percore"]["entries"], "One core, CPU time")
    if "curvature" in s and "entries" in s["curvature"]:
        lines += ["## Curvature cost relative to one gradient (batch 128, float32)", ""]
        if s["curvature"].get("note"):
            lines += [s["curvature"]["note"] + ".", ""]
        lines += ["| model | op | median ms | x gradient | per Lanczos step / per HVP, x gradient |",
                  "|---|---|---|---|---|"]
        for e in s["curvature"]["entries"]:
            lines.append(f"| {e['model']} | {e['op']} | {e['median_s'] * 1e3:.2f} | {e['relative_to_grad']:.2f} | "
                         f"{_fmt(e.get('per_step_relative_to_grad'), '.2f')} |")
        lines.append("")
    if "sweep" in s and "entries" in s["sweep"]:
        lines += ["## Sweep", "", s["sweep"]["workload"], "", "| strategy | sweep s | runs/s | first call s |",
                  "|---|---|---|---|"]
        for e in s["sweep"]["entries"]:
            lines.append(f"| {e['strategy']} | {e['sweep_s']:.2f} | {e['runs_per_s']:.1f} | {e['first_call_s']:.1f} |")
        lines.append("")
    if "proofs" in s:
        lines += ["## proofs_check wall time (subprocess, start-up and compilation included)", "",
                  "| mode | wall s | claims | exit status |", "|---|---|---|---|"]
        for e in s["proofs"]["entries"]:
            lines.append(f"| {e['mode']} | {_fmt(e.get('wall_s'), '.1f')} | {e.get('claims', '-')} | "
                         f"{e.get('exit_status', e.get('error'))} |")
        lines.append("")
    if "convnet" in s:
        from benchmarks.studies import convnet_study
        lines += convnet_study.markdown(s["convnet"])
    lines.append(f"Total wall time of the suite: {result.get('total_wall_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter repeats; proofs_check quick only")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory of the JSON and Markdown results")
    p.add_argument("--sections", default=None, help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--convnet-studies", default=None,
                   help="with the convnet section: comma-separated parts of it (default: all; "
                        "benchmarks.studies.convnet_study.STUDIES)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default=None, help="comma-separated (default: 128 quick, 128,1024 full)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (>= 5; default 5 quick, 9 full)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per repeat (default 0.2 quick, 1.0 full)")
    p.add_argument("--torch-threads", type=int, default=None, help="default: the cores this process may use")
    p.add_argument("--torch-layouts", default=None, choices=["nchw", "channels_last", "both"],
                   help="PyTorch memory layouts to time (default: nchw quick, both full); the table keeps the best")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (default: full mode)")
    p.add_argument("--bf16", action="store_true", help="also time bfloat16 on CPU (always on accelerators)")
    p.add_argument("--devices", type=int, default=None, help="data-parallel devices on a CPU host (default: cores)")
    p.add_argument("--proofs-timeout", type=float, default=900)
    p.add_argument("--lanczos-steps", type=int, default=None, help="Lanczos steps timed (default 10 quick, 30 full)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the wall-clock PyTorch workers (default PASSIVE: on a shared machine "
                        "OpenMP's spinning threads collapse PyTorch's 2-thread throughput up to 60x; '' keeps "
                        "the library default, ACTIVE)")
    p.add_argument("--allocator", default="system", choices=ALLOCATORS,
                   help="host allocator of every worker (JAX and PyTorch alike): glibc's as it comes, or "
                        "tcmalloc preloaded (libtcmalloc-minimal4), which keeps freed pages for the next step")
    p.add_argument("--name", default=None, help="result file stem (default: <backend>_<quick|full>)")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the Markdown of a results JSON")
    # worker-only
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help=argparse.SUPPRESS)
    p.add_argument("--pin-core", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 9
    if args.repeats < 5 and args.worker is None:
        p.error("--repeats must be >= 5")
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 1.0
    if args.batches is None:
        args.batches = "128" if args.quick else ",".join(map(str, BATCHES))
    if args.lanczos_steps is None:
        args.lanczos_steps = 10 if args.quick else 30
    if args.torch_layouts is None:
        args.torch_layouts = "nchw" if args.quick else "both"
    if not args.quick and args.worker is None:
        args.torch_compile = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(markdown(result))
        return 0
    result = orchestrate(args)
    backend = (result["sections"].get("train") or {}).get("backend") or "cpu"
    name = args.name or f"{backend}_{result['mode']}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    md = markdown(result)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {os.path.join(args.out, name)}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
