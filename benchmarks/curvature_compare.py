"""Curvature at scale: ``proofs_check.curvature`` against PyHessian and hessian-eigenthings, and Lanczos per step.

Two sections:

* ``lanczos``: per model (mlp, convnet, vgg, resnet; batch 128, float32) the time of a gradient, of one
  Hessian-vector product (``curvature.hvp``, jitted alone) and of ``curvature.lanczos`` with ``k`` steps
  (jitted whole, full re-orthogonalisation), medians of wall and process-CPU time; the figure of merit is a
  Lanczos step against one HVP.
* ``compare``: on the same weights and the same batch (the PyTorch network built from the linen model by
  ``benchmarks.torch_reference``, the flax parameters copied in), in eval mode (running statistics: what
  PyHessian uses; it calls ``model.eval()``) and in train mode (batch statistics: what the paper needs;
  PyHessian is made to keep train mode by a no-op ``eval``): the top-k eigenvalues, the Hutchinson trace and
  the stochastic Lanczos quadrature (first moment and largest node) from each tool, with the time of each;
  JAX's first call (compilation included) and second call are both recorded.

    python -m benchmarks.curvature_compare --sections lanczos --models mlp,convnet,vgg,resnet
    python -m benchmarks.curvature_compare --sections compare --models vgg,resnet

Needs ``torch`` (``bench`` extra) and, for ``compare``, ``pyhessian`` and ``hessian-eigenthings``
(``pip install --no-deps pyhessian hessian-eigenthings``: their own requirements would pull another torch).
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import hardware, jax_setup, write_result

ROOT = Path(__file__).resolve().parents[1]


def _clocked(fn, reps: int = 1):
    """``(result, wall median, CPU median)`` of ``reps`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, float(np.median(walls)), float(np.median(cpus))


# ---------------------------------------------------------------------------------------------------------
# Lanczos per step against one HVP
# ---------------------------------------------------------------------------------------------------------


def lanczos_section(models_: list[str], batch: int, k: int, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from proofs_check import curvature
    from rate_tuning import models

    rows = []
    for arch in models_:
        model, _, _, state, x, y, _ = jax_setup(arch, batch)
        xs, ys, stats = jnp.asarray(x), jnp.asarray(y), state.batch_stats
        loss = lambda p: models.batch_loss(model, p, stats, xs, ys, True)[0]  # noqa: E731
        p = state.params
        v = jax.tree_util.tree_map(jnp.ones_like, p)
        key = jax.random.key(0)
        grad = jax.jit(jax.grad(loss))
        hvp = jax.jit(lambda p, v: curvature.hvp(loss, p, v))
        lz = jax.jit(lambda p, key: curvature.lanczos(lambda u: curvature.hvp(loss, p, u), p, k, key))
        res = {"model": arch, "batch": batch, "k": k, "load_start": os.getloadavg()[0]}
        for name, f in (("grad", lambda: grad(p)), ("hvp", lambda: hvp(p, v)), ("lanczos", lambda: lz(p, key))):
            _, first, _ = _clocked(lambda: jax.block_until_ready(f()))
            jax.block_until_ready(f())
            _, wall, cpu = _clocked(lambda: jax.block_until_ready(f()), reps)
            res[name] = {"first_call_s": first, "wall_s": wall, "cpu_s": cpu}
        res["step_over_hvp_wall"] = res["lanczos"]["wall_s"] / k / res["hvp"]["wall_s"]
        res["step_over_hvp_cpu"] = res["lanczos"]["cpu_s"] / k / res["hvp"]["cpu_s"]
        res["hvp_over_grad_wall"] = res["hvp"]["wall_s"] / res["grad"]["wall_s"]
        res["load_end"] = os.getloadavg()[0]
        print(f"  {arch}: grad {res['grad']['wall_s'] * 1e3:.1f} ms, hvp {res['hvp']['wall_s'] * 1e3:.1f} ms, "
              f"lanczos {k} steps {res['lanczos']['wall_s'] * 1e3:.1f} ms: a step is "
              f"{res['step_over_hvp_wall']:.2f} HVP (CPU {res['step_over_hvp_cpu']:.2f}); load "
              f"{res['load_start']:.2f}->{res['load_end']:.2f}", file=sys.stderr, flush=True)
        rows.append(res)
    return rows


# ---------------------------------------------------------------------------------------------------------
# against the PyTorch tools
# ---------------------------------------------------------------------------------------------------------


def _with_torch_eig(fn):
    """Run ``fn`` with ``torch.eig`` (removed in torch 1.9, still called by PyHessian 0.1's ``density``) given
    back for its one use, a symmetric tridiagonal ``T``: ``torch.linalg.eigh``, imaginary parts zero."""
    import torch

    def eig(T, eigenvectors=False):
        evals, evecs = torch.linalg.eigh(T)
        return torch.stack([evals, torch.zeros_like(evals)], dim=1), evecs

    old = torch.eig
    torch.eig = eig
    try:
        return fn()
    finally:
        torch.eig = old


def _torch_model(model, params, x, y, mode: str):
    """The PyTorch peer with the flax params, its BN running statistics after one train-mode forward on the
    batch (as the JAX side), in ``mode``; BN uses the running statistics in eval mode."""
    import torch

    from benchmarks import torch_reference as T

    class EvalExactBatchNorm(T.ExactBatchNorm):
        def forward(self, x):
            if self.training:
                return super().forward(x)
            shape = [1, -1] + [1] * (x.ndim - 2)
            y = (x - self.running_mean.reshape(shape)) * torch.rsqrt(self.running_var.reshape(shape))
            if self.weight is not None:
                y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
            return y

    net = T.from_jax_model(model, x.shape[1:], exact_padding=True)
    T.load_jax_params(net, params)
    for m in net.modules():
        if isinstance(m, T.ExactBatchNorm):
            m.__class__ = EvalExactBatchNorm
    xt, yt = T.to_torch_batch(x, y)
    net.train()
    with torch.no_grad():
        net(xt)  # running statistics: one update from the initial (0, 1), like the JAX side
    net.train(mode == "train")
    if mode == "train":  # PyHessian calls model.eval(); keep train mode for the paper's Hessian
        net.eval = lambda: net
    return net, xt, yt


def compare_section(models_: list[str], batch: int, modes: list[str], topk: int, lanczos_steps: int,
                    trace_samples: int, slq_steps: int, power_iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import hessian_eigenthings as HE
    from pyhessian import hessian as PyHessian
    from proofs_check import curvature
    from rate_tuning import models

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    for arch in models_:
        model, _, _, state, x, y, _ = jax_setup(arch, batch)
        xs, ys, stats0 = jnp.asarray(x), jnp.asarray(y), state.batch_stats
        stats = jax.jit(lambda p: models.batch_loss(model, p, stats0, xs, ys, True)[1][1])(state.params)
        p = state.params
        n = int(sum(a.size for a in jax.tree_util.tree_leaves(p)))
        for mode in modes:
            train = mode == "train"
            loss = lambda q: models.batch_loss(model, q, stats, xs, ys, train)[0]  # noqa: E731
            row = {"model": arch, "batch": batch, "mode": mode, "params": n, "load_start": os.getloadavg()[0]}
            key = jax.random.key(0)

            def hv(u, q=p):
                return curvature.hvp(loss, q, u)

            jobs = {
                "topk": jax.jit(lambda q: curvature.lanczos(lambda u: curvature.hvp(loss, q, u), q, lanczos_steps,
                                                            key)[-topk:][::-1]),
                "trace": jax.jit(lambda q: curvature.hutchinson_trace(lambda u: curvature.hvp(loss, q, u), q,
                                                                      trace_samples, key)[:2]),
                "slq": jax.jit(lambda q: curvature.slq_nodes_weights(lambda u: curvature.hvp(loss, q, u), q,
                                                                     slq_steps, 1, key)),
            }
            jax_res = {}
            for name, f in jobs.items():
                out, first, first_cpu = _clocked(lambda: jax.device_get(f(p)))
                out, wall, cpu = _clocked(lambda: jax.device_get(f(p)))
                jax_res[name] = {"first_call_s": first, "first_call_cpu_s": first_cpu, "wall_s": wall, "cpu_s": cpu,
                                 "value": out}
            nodes, weights = jax_res["slq"]["value"]
            jax_res["slq"]["value"] = {"moment1": float(np.sum(nodes * weights)), "max_node": float(np.max(nodes))}
            est, err = jax_res["trace"]["value"]
            jax_res["trace"]["value"] = {"estimate": float(est), "stderr": float(err)}
            jax_res["topk"]["value"] = [float(a) for a in jax_res["topk"]["value"]]
            row["jax"] = jax_res
            # the loss value in both frameworks (the same function of the same weights)
            jloss = float(jax.jit(loss)(p))

            net, xt, yt = _torch_model(model, p, x, y, mode)
            with torch.no_grad():
                tloss = float(F.cross_entropy(net(xt), yt))
            row["loss"] = {"jax": jloss, "torch": tloss}
            torch.manual_seed(0)
            ph = PyHessian(net, F.cross_entropy, data=(xt, yt), cuda=False)
            assert net.training == train
            ph_res = {}
            (vals, _), w, c = _clocked(lambda: ph.eigenvalues(maxIter=power_iters, tol=1e-3, top_n=topk))
            ph_res["topk"] = {"wall_s": w, "cpu_s": c, "value": [float(a) for a in vals]}
            # tol=-inf: all the probes (PyHessian's relative test divides by the running mean, so a negative
            # trace, as in train mode, stopped it after two probes)
            samples, w, c = _clocked(lambda: ph.trace(maxIter=trace_samples, tol=float("-inf")))
            ph_res["trace"] = {"wall_s": w, "cpu_s": c, "value": {
                "estimate": float(np.mean(samples)),
                "stderr": float(np.std(samples, ddof=1) / np.sqrt(len(samples))), "samples": len(samples)}}
            (eigs, wts), w, c = _clocked(lambda: _with_torch_eig(lambda: ph.density(iter=slq_steps, n_v=1)))
            ph_res["slq"] = {"wall_s": w, "cpu_s": c, "value": {
                "moment1": float(np.sum(np.asarray(eigs[0]) * np.asarray(wts[0]))), "max_node": float(np.max(eigs[0]))}}
            row["pyhessian"] = ph_res

            net.train(train)
            op = HE.HessianOperator(net, [(xt, yt)], HE.supervised_loss(F.cross_entropy))
            he_res = {}
            r, w, c = _clocked(lambda: HE.lanczos(op, k=topk, max_iter=lanczos_steps, which="LA", seed=0,
                                                  reorthogonalize=True))
            he_res["topk"] = {"wall_s": w, "cpu_s": c, "value": [float(a) for a in r.eigenvalues]}
            r, w, c = _clocked(lambda: HE.hutchinson(op, num_samples=trace_samples, seed=0))
            he_res["trace"] = {"wall_s": w, "cpu_s": c, "value": {"estimate": float(r.estimate),
                                                                  "stderr": float(r.stderr)}}
            r, w, c = _clocked(lambda: HE.spectral_density(op, num_runs=1, lanczos_steps=slq_steps, seed=0,
                                                            num_grid_points=100))
            nodes_he = np.asarray(r.raw_eigenvalues, np.float64)
            wts_he = np.asarray(r.raw_weights, np.float64)
            he_res["slq"] = {"wall_s": w, "cpu_s": c, "value": {"moment1": float(np.sum(nodes_he * wts_he)),
                                                                "max_node": float(np.max(nodes_he))}}
            row["hessian_eigenthings"] = he_res
            row["load_end"] = os.getloadavg()[0]
            print(f"  {arch} {mode}: " + json.dumps({t: {q: row[t][q]["wall_s"] for q in ("topk", "trace", "slq")}
                                                     for t in ("jax", "pyhessian", "hessian_eigenthings")}),
                  file=sys.stderr, flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------


def _fmt_vals(v) -> str:
    if isinstance(v, list):
        return ", ".join(f"{a:.4g}" for a in v)
    if isinstance(v, dict):
        if "estimate" in v:
            return f"{v['estimate']:.4g} +- {v['stderr']:.2g}"
        return f"m1 {v['moment1']:.4g}, max {v['max_node']:.4g}"
    return str(v)


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [f"# Curvature at scale, {result['date']}", "",
             f"- Host: {hw.get('cpu_model')}, {hw.get('cores')} CPUs; jax {result['versions'].get('jax')}, "
             f"torch {result['versions'].get('torch')}", f"- Command: `{result['command']}`", ""]
    if result.get("lanczos"):
        lines += ["## Lanczos step against one HVP (batch 128, float32)", "",
                  "| model | grad ms | HVP ms | Lanczos k steps ms | step / HVP (wall) | step / HVP (CPU) | load |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["lanczos"]:
            lines.append(f"| {r['model']} | {r['grad']['wall_s'] * 1e3:.1f} | {r['hvp']['wall_s'] * 1e3:.1f} | "
                         f"{r['lanczos']['wall_s'] * 1e3:.1f} (k={r['k']}) | {r['step_over_hvp_wall']:.2f} | "
                         f"{r['step_over_hvp_cpu']:.2f} | {r['load_start']:.2f}->{r['load_end']:.2f} |")
        lines.append("")
    if result.get("compare"):
        a = result["args"]
        lines += ["## Against PyHessian and hessian-eigenthings (same weights, same batch)", "",
                  f"top-{a['topk']}: ours Lanczos {a['lanczos_steps']} steps, hessian-eigenthings Lanczos "
                  f"{a['lanczos_steps']} steps, PyHessian power iteration (<= {a['power_iters']} per eigenvalue, "
                  f"tol 1e-3, deflation); trace: Hutchinson, {a['trace_samples']} Rademacher probes each; SLQ: one "
                  f"run of {a['slq_steps']} steps each (m1 = first moment of the quadrature = tr(H)/n estimate, max = "
                  "largest node). Seconds are wall time of the call; ours as second call (first call, compilation "
                  "included, in brackets). Ratio = fastest PyTorch tool / ours (second call; first call in brackets).",
                  "", "| model | mode | loss jax / torch | quantity | ours | PyHessian | hessian-eigenthings | "
                  "ours s | PyHessian s | h-e s | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["compare"]:
            for q in ("topk", "trace", "slq"):
                j, ph, he = r["jax"][q], r["pyhessian"][q], r["hessian_eigenthings"][q]
                best = min(ph["wall_s"], he["wall_s"])
                lines.append(
                    f"| {r['model']} | {r['mode']} | {r['loss']['jax']:.6g} / {r['loss']['torch']:.6g} | {q} | "
                    f"{_fmt_vals(j['value'])} | {_fmt_vals(ph['value'])} | {_fmt_vals(he['value'])} | "
                    f"{j['wall_s']:.2f} ({j['first_call_s']:.2f}) | {ph['wall_s']:.2f} | {he['wall_s']:.2f} | "
                    f"{best / j['wall_s']:.1f}x ({best / j['first_call_s']:.1f}x) |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="lanczos,compare")
    p.add_argument("--models", default=None, help="default: mlp,convnet,vgg,resnet (lanczos); vgg,resnet (compare)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--k", type=int, default=10, help="Lanczos steps timed in the lanczos section")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--lanczos-steps", type=int, default=20)
    p.add_argument("--trace-samples", type=int, default=20)
    p.add_argument("--slq-steps", type=int, default=20)
    p.add_argument("--power-iters", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="curvature_compare_cpu")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    import jax

    versions = {"jax": jax.__version__}
    try:
        import torch
        versions["torch"] = torch.__version__
    except ImportError:
        pass
    result = {"date": datetime.date.today().isoformat(), "hardware": hardware(), "versions": versions,
              "command": "python -m benchmarks.curvature_compare " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args)}
    if "lanczos" in sections:
        result["lanczos"] = lanczos_section((args.models or "mlp,convnet,vgg,resnet").split(","), args.batch, args.k,
                                            args.reps)
    if "compare" in sections:
        result["compare"] = compare_section((args.models or "vgg,resnet").split(","), args.batch,
                                            args.modes.split(","), args.topk, args.lanczos_steps, args.trace_samples,
                                            args.slq_steps, args.power_iters)
    print(write_result(args.out, args.name, result, markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
