"""What the benchmark suite, the profiler and the studies share: timing, the process set-up, the hardware record.

* Timing: :func:`measure` (warm-up, calibration, interleaved repeats) and :func:`summarize` (median, IQR,
  minimum, examples/s).
* The process: :func:`pin_to_core` (CPU affinity, before JAX or PyTorch start), :func:`have_torch`,
  :func:`set_torch_threads`, :func:`torch_device` and :func:`torch_precision_settings` (the PyTorch peer's
  device and precision), the host allocator (:func:`allocator_env`, :func:`loaded_allocator`), and the
  worker subprocesses (:func:`worker_environ`, :func:`spawn_worker`, :func:`write_worker_result`).
* The record: :func:`hardware` (``/proc/cpuinfo`` identity and vector extensions, cores, memory, load),
  :func:`hardware_line` (its Markdown line), :func:`versions`.
* The suite's models and their JAX set-up: :data:`MODELS`, :data:`LR`, :func:`jax_setup` (model, labels,
  learning rate, train state and one batch).

Dependency direction: ``common`` imports nothing from ``benchmarks``; ``run``, ``profile_step`` and the
``studies`` import it, and nothing imports ``run`` (its workers are reached as subprocesses).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "mlp": ({"widths": (512, 512)}, (28, 28, 1)),
    "convnet": ({}, (32, 32, 3)),
    "vgg": ({}, (32, 32, 3)),
    "resnet": ({}, (32, 32, 3)),
}
"""The suite's models: ``name -> (models.build keyword arguments, input shape of one example)``."""
LR = 0.1


# ------------------------------------------------------------------------------------------------
# Timing.


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
""":func:`measure`'s clocks: ``'wall'``, and ``'cpu'``, this process's CPU time (load-robust on a shared machine)."""


def summarize(samples: list[float], n_steps: int, batch: int | None = None) -> dict[str, Any]:
    """Per-step times (s) -> median, IQR, min; and examples/s, steps/s of the median."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0], s[0], s[0]]
    out = {"median_s": q[1], "q1_s": q[0], "q3_s": q[2], "min_s": s[0], "repeats": len(s), "steps_per_repeat": n_steps,
           "steps_per_s": 1.0 / q[1]}
    if batch:
        out["examples_per_s"] = batch / q[1]
        out["examples_per_s_iqr"] = [batch / q[2], batch / q[0]]
    return out


def measure(runners: dict[str, Callable[[int], Any]], *, repeats: int, min_time: float, clock: str = "wall",
            warmup: int = 2) -> dict[str, dict]:
    """Time several ``run(n)`` (n steps, blocking at the end), interleaved repeat by repeat.

    Each runner is warmed up (``warmup`` calls of one step: compilation, allocation), calibrated to
    ``n`` steps lasting at least ``min_time``, then timed ``repeats`` times. Returns per runner the list
    of per-step times and ``n``, plus the warm-up time of the first call (compilation included).
    """
    tick = CLOCKS[clock]
    n, first, samples = {}, {}, {k: [] for k in runners}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(1)
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            run(1)
        t0 = tick()
        run(1)
        dt = max(tick() - t0, 1e-6)
        n[name] = max(1, math.ceil(min_time / dt))
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = tick()
            run(n[name])
            samples[name].append((tick() - t0) / n[name])
    return {k: {"samples": samples[k], "n": n[k], "first_call_s": first[k]} for k in runners}


# ------------------------------------------------------------------------------------------------
# The hardware record.


CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "asimd", "sve")
"""The ``/proc/cpuinfo`` flags recorded with every result: the vector and matrix extensions that decide
which kernels XLA, YNNPACK and oneDNN run (two hosts that both call themselves "AMD EPYC" can differ 2.7x
in matmul throughput per core: benchmarks/README.md)."""


def cpu_info(text: str) -> dict[str, Any]:
    """The first processor's identity in a ``/proc/cpuinfo`` text: model name, vendor, family / model /
    stepping, cache size, and which of :data:`CPU_FEATURES` it has (x86 ``flags`` or Arm ``Features``)."""
    first = text.split("\n\n", 1)[0]
    fields = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    have = set((fields.get("flags") or fields.get("Features") or "").split())
    keys = {"model name": "cpu_model", "vendor_id": "vendor", "cpu family": "family", "model": "model",
            "stepping": "stepping", "cache size": "cache"}
    out = {name: fields[k] for k, name in keys.items() if k in fields}
    out["cpu_features"] = [f for f in CPU_FEATURES if f in have]
    return out


def hardware() -> dict[str, Any]:
    """CPU identity (:func:`cpu_info`), cores, memory, load, platform, Python."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = cpu_info(f.read())
    except OSError:
        cpu = {}
    info = {"cpu_model": cpu.pop("cpu_model", None), **cpu,
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": list(os.getloadavg()), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def hardware_line(hw: dict[str, Any], train: dict | None = None) -> str:
    """The Markdown header's hardware line: CPU identity and features, and the accelerator the train step
    ran on (from the train section's ``backend`` / ``device`` / ``device_count``) when it is not the CPU."""
    ident = ", ".join(f"{k} {hw[k]}" for k in ("family", "model", "stepping") if k in hw)
    feats = " ".join(hw.get("cpu_features") or [])
    line = (f"- Hardware: {hw['cpu_model']} ({hw['processor']}{'; ' + ident if ident else ''}), "
            f"{hw['cores']} cores, {hw.get('mem_gib', '?')} GiB; {hw['platform']}"
            + (f"; CPU features: {feats}" if feats else ""))
    if train and train.get("backend") not in (None, "cpu"):
        line += f"\n- Accelerator: {train.get('device_count', 1)} x {train.get('device')} ({train['backend']})"
    return line


def versions() -> dict[str, Any]:
    """The versions of jax, jaxlib, flax, optax, numpy and torch (None where not installed)."""
    out = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            out[mod] = None
    return out


# ------------------------------------------------------------------------------------------------
# The process: affinity, host allocator, PyTorch threads and device.


def pin_to_core(core: int) -> None:
    """Run this process on ``core`` alone; call it before JAX or PyTorch start (both size their thread pools
    from the affinity mask)."""
    os.sched_setaffinity(0, {core})


ALLOCATORS = ("system", "tcmalloc")
TCMALLOC_CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def allocator_env(name: str) -> dict[str, str]:
    """Environment of the worker processes for host allocator ``name`` (one of :data:`ALLOCATORS`).

    ``'system'``: glibc's malloc as it comes. ``'tcmalloc'``: gperftools' tcmalloc preloaded
    (``LD_PRELOAD``, Debian package ``libtcmalloc-minimal4``) with ``TCMALLOC_RELEASE_RATE=0``, so freed
    pages are kept for the next step. Why it matters: XLA and PyTorch allocate each step's buffers anew,
    glibc serves the large ones with fresh ``mmap`` pages and returns them at ``free``, and every page is
    then faulted in again on the next step (resnet at batch 128, one core: 33,000 minor faults, 136 MB,
    73 ms of system time per step; with tcmalloc: none; benchmarks/README.md, host allocator). JAX and
    PyTorch run in the same worker process, so both always get the same allocator.
    """
    if name == "system":
        return {}
    if name != "tcmalloc":
        raise SystemExit(f"unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}")
    for lib_dir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        for lib in TCMALLOC_CANDIDATES:
            path = os.path.join(lib_dir, lib)
            if os.path.exists(path):
                return {"LD_PRELOAD": path, "TCMALLOC_RELEASE_RATE": "0"}
    raise SystemExit("--allocator tcmalloc: no libtcmalloc_minimal.so.4 found; install the Debian package "
                     "libtcmalloc-minimal4")


def loaded_allocator() -> str:
    """``'tcmalloc'`` if this process has tcmalloc mapped (the preload took effect), else ``'system'``."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "system"
    except OSError:
        return "unknown"


def have_torch() -> bool:
    """Whether PyTorch (the optional peer, the ``bench`` extra) is importable."""
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def set_torch_threads(threads: int | None) -> int:
    """PyTorch's intra-op threads: ``threads``, or the cores this process may use; one interop thread.
    Returns the number set."""
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return n


def torch_device(backend: str) -> str | None:
    """The PyTorch device matching JAX's backend: ``'cpu'`` on ``cpu``, ``'cuda'`` on ``gpu`` when this torch
    build sees a CUDA device; None where PyTorch has no peer of the device (TPU, or a CPU-only torch on a
    GPU host)."""
    import torch

    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return None


def torch_precision_settings(device: str) -> dict:
    """Put PyTorch on the precision JAX uses by default on ``device`` and return what was set.

    JAX computes float32 matrix products and convolutions on NVIDIA GPUs in TensorFloat-32 by default
    (https://docs.jax.dev/en/latest/201/precision.html); PyTorch does so for convolutions but not for matrix
    products. Both frameworks are put on TF32 so that the float32 columns compare the same arithmetic, and
    cuDNN may pick its fastest algorithm (``cudnn.benchmark``), as XLA autotunes. Nothing changes on CPU."""
    import torch

    if device != "cuda":
        return {"device": device}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return {"device": device, "cuda_device": torch.cuda.get_device_name(0), "matmul_allow_tf32": True,
            "cudnn_allow_tf32": True, "cudnn_benchmark": True, "torch_cuda": torch.version.cuda}


# ------------------------------------------------------------------------------------------------
# Worker subprocesses: every measurement runs in a fresh process.


GPU_MEMORY_FRACTION = "0.5"
"""``XLA_PYTHON_CLIENT_MEM_FRACTION`` of every worker (unless set): on a GPU, JAX preallocates this share of
the device's memory and leaves the rest to the PyTorch peer in the same process (JAX's default, 0.75,
would leave it a quarter). No effect on CPU."""


def worker_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: this process's, without ``XLA_FLAGS``, with :data:`GPU_MEMORY_FRACTION`
    unless set, and ``extra`` (the allocator's, a flag set) on top."""
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    e.update(extra or {})
    return e


def spawn_worker(module: str, worker: str, extra: list[str], *, env: dict[str, str] | None = None,
                 timeout: float = 1800) -> dict:
    """Run ``python -m MODULE --worker WORKER --json PATH EXTRA...`` in the repository root with
    :func:`worker_environ` ``(env)`` and return the JSON it wrote (plus ``worker_wall_s``), or
    ``{'error': ...}`` if it failed or if ``env`` preloads an allocator that the worker does not have mapped."""
    env = env or {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        cmd = [sys.executable, "-m", module, "--worker", worker, "--json", path, *extra]
        e = worker_environ(env)
        e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=e, timeout=timeout, stdout=subprocess.PIPE, stderr=None, text=True)
        if p.returncode != 0:
            return {"error": f"worker {worker} {' '.join(extra)} exited with {p.returncode}",
                    "stdout": p.stdout[-2000:]}
        with open(path) as f:
            out = json.load(f)
        out["worker_wall_s"] = time.perf_counter() - t0
        if "LD_PRELOAD" in env and out.get("allocator") != "tcmalloc":
            return {"error": f"worker {worker}: {env['LD_PRELOAD']} was preloaded but is not mapped"}
        return out


def write_worker_result(out: dict, path: str) -> None:
    """A worker's last act: record the cores it ran on and the allocator it had, and write ``out`` to ``path``."""
    out["affinity"] = sorted(os.sched_getaffinity(0))
    out["allocator"] = loaded_allocator()
    with open(path, "w") as f:
        json.dump(out, f)


# ------------------------------------------------------------------------------------------------
# The suite's models in JAX.


def jax_setup(arch: str, batch: int, dtype: str = "float32", seed: int = 0, conv_impl: str = "auto"):
    """``(model, labels, lr_w, state, x, y, jdt)`` of :data:`MODELS` ``[arch]``: the model (preset ``'paper'``,
    parameters in ``dtype``), its ``'layer'`` labels, the constant learning rate :data:`LR`, a
    :class:`rate_tuning.steps.TrainState` with two-rate SGD, a batch of N(0, 1) inputs ``x`` (float32 numpy)
    and uniform labels ``y`` of 10 classes, and the JAX dtype."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rate_tuning import models, optim, steps

    kw, shape = MODELS[arch]
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    model = models.build(arch, "paper", param_dtype=jdt, conv_impl=conv_impl, **kw)
    labels = model.labels("layer")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(x, jdt))
    lr_w = optim.constant(LR)
    tx = optim.two_rate_sgd(labels, lr_w, optim.constant(LR))
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"])
    return model, labels, lr_w, state, x, y, jdt


def write_result(out_dir, name: str, result: dict, markdown_text: str) -> str:
    """Write ``out_dir/name.json`` (the record) and ``out_dir/name.md`` (its table); the Markdown."""
    import pathlib

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown_text)
    return markdown_text
