"""Why the convnet trains slower in JAX than in PyTorch on this CPU, measured piece by piece.

Research, not used by the library (its conclusions are in benchmarks/README.md). Run on its own::

    python -m benchmarks.studies.convnet_study --quick --studies convs_percore   # one part of it
    python -m benchmarks.studies.convnet_study                                   # all of STUDIES

(writes ``benchmarks/results/convnet_study_cpu.{json,md}``; ``--out``, ``--name``), or as the suite's
``convnet`` section (``python -m benchmarks.run --sections convnet --convnet-studies ...``). Either way each
measurement is a subprocess of this module (``--worker convnet --study NAME``). It imports
:mod:`benchmarks.common` only, never :mod:`benchmarks.run`. The model is ``models.convnet()`` (3x3
stride-2 convolutions 16-32-64, exact BN, global average pool) on 32x32x3 inputs, float32, batch 128.

Studies:

* ``convs``: each distinct convolution of the convnet, the vgg and the resnet alone, jitted: forward,
  gradient w.r.t. the input (``dx``) and w.r.t. the kernel (``dk``), for formulations of the same
  convolution: ``nhwc`` (flax's layout, ``lax.conv_general_dilated`` NHWC/HWIO), ``nchw`` (NCHW/OIHW
  dimension numbers), ``im2col`` (9 strided slices concatenated, then one matmul: every pass is a dot),
  ``s2d`` (strided layers: space-to-depth, a stride-1 2x2 convolution on 4x the channels, kernel
  zero-padded to 4x4), and for stride-1 3x3 layers ``shift`` (one matmul per kernel tap on a shifted slice)
  and ``winograd`` (F(2x2, 3x3): 16 matmuls per 2x2 output tile instead of 36); the PyTorch (oneDNN) peer.
  The compiled HLO of each pass is inspected: which convolutions XLA hands to YNNPACK (``__ynn_fusion``)
  and which stay XLA ``convolution`` ops (Eigen), with their ``lhs_dilate`` / ``rhs_dilate``.
* ``steps``: the whole train step (:func:`rate_tuning.steps.make_train_step`) for variants of the model:
  ``native``; ``im2col`` (the same parameters and labels, each convolution computed as im2col + matmul);
  ``maxpool`` (stride-1 convolutions + 2x2 max-pool instead of strides: 4x the convolution FLOPs);
  ``bfloat16`` (params and inputs; BN statistics stay float32); and the PyTorch peer of each (NCHW
  and channels_last).
* the same ``steps`` under XLA CPU flags (one subprocess per flag set), pinned to one core (CPU time)
  and on all cores (wall clock).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Any

from benchmarks.common import (ALLOCATORS, allocator_env, hardware, hardware_line, have_torch, measure, pin_to_core,
                               set_torch_threads, spawn_worker, summarize, versions, write_worker_result)

MODULE = "benchmarks.studies.convnet_study"

LAYER_SETS = {  # (input size, in channels, out channels, kernel, stride) of each distinct convolution
    "convnet": ((32, 3, 16, 3, 2), (16, 16, 32, 3, 2), (8, 32, 64, 3, 2)),
    "vgg": ((32, 3, 32, 3, 1), (16, 32, 64, 3, 1), (8, 64, 128, 3, 1), (8, 128, 128, 3, 1)),
    "resnet": ((32, 3, 16, 3, 1), (32, 16, 16, 3, 1), (32, 16, 32, 3, 2), (16, 32, 32, 3, 1), (32, 16, 32, 1, 2)),
}
BATCH = 128
FLAG_SETS = {
    "default": "",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_graph_fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_ynnpack": "--xla_cpu_experimental_ynn_fusion_type=",
}


# ------------------------------------------------------------------------------------------------
# Four formulations of a 'SAME' k x k stride-s convolution (NHWC input, HWIO kernel).


def conv_native(x, k, s):
    import jax

    return jax.lax.conv_general_dilated(x, k, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_nchw(x, k, s):
    """NCHW input / OIHW kernel (the caller passes them in that layout)."""
    import jax

    return jax.lax.conv_general_dilated(x, k, (s, s), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _same_pads(n, k, s):
    o = math.ceil(n / s)
    total = max((o - 1) * s + k - n, 0)
    return o, total // 2, total - total // 2


def conv_im2col(x, k, s):
    """``patches @ K`` (:func:`rate_tuning.layers.im2col_conv`, the library's ``conv_impl='im2col'``)."""
    from rate_tuning import layers

    return layers.im2col_conv(x, k, (s, s), "SAME")


def conv_s2d(x, k, s):
    """Space-to-depth: pad, fold each s x s block into channels, and convolve with stride 1 with the
    kernel zero-padded to a multiple of s and folded the same way."""
    import jax
    import jax.numpy as jnp

    n, h, w, c = x.shape
    kh, kw, _, f = k.shape

    def pads(n_, k_):
        o, lo, _ = _same_pads(n_, k_, s)
        kk = math.ceil(k_ / s) * s
        need = math.ceil(((o - 1) * s + kk) / s) * s
        return o, lo, need - n_ - lo, kk

    oh, lh, hh, kkh = pads(h, kh)
    ow, lw, hw, kkw = pads(w, kw)
    xp = jnp.pad(x, ((0, 0), (lh, hh), (lw, hw), (0, 0)))
    H, W = xp.shape[1] // s, xp.shape[2] // s
    xs = xp.reshape(n, H, s, W, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, H, W, s * s * c)
    kp = jnp.pad(k, ((0, kkh - kh), (0, kkw - kw), (0, 0), (0, 0)))
    ks = kp.reshape(kkh // s, s, kkw // s, s, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(kkh // s, kkw // s, s * s * c, f)
    y = jax.lax.conv_general_dilated(xs, ks, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[:, :oh, :ow]


def conv_shift(x, k, s):
    """Stride 1: ``y = sum_ij shift_ij(x) @ K_ij``, one matmul per kernel tap on a shifted slice of the padded
    input; its kernel gradient is then 9 matmuls ``shift_ij(x)^T dy`` (no convolution op in any pass)."""
    import jax.numpy as jnp

    n, h, w, c = x.shape
    kh, kw, _, f = k.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    return sum(jnp.dot(xp[:, i:i + h, j:j + w].reshape(-1, c), k[i, j]) for i in range(kh) for j in range(kw)
               ).reshape(n, h, w, f)


_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))


def conv_winograd(x, k, s):
    """Stride 1, 3x3: Winograd's F(2x2, 3x3) (Lavin & Gray 2016), ``Y = A^T [(G K G^T) . (B^T D B)] A`` on
    4x4 input tiles at stride 2: 16 matmuls ``(N tiles, C) x (C, F)`` instead of 36 per 2x2 outputs (2.25x
    fewer multiplications); the transforms are slices, adds and subtractions, and autodiff gives both
    gradients as the transposed transforms around 16 matmuls."""
    import jax
    import jax.numpy as jnp

    n, h, w, c = x.shape
    f = k.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2

    def bt(v, axis, tiles):  # B^T (rows 1 0 -1 0 / 0 1 1 0 / 0 -1 1 0 / 0 1 0 -1) on the four stride-2 slices
        d = [jax.lax.slice_in_dim(v, i, i + 2 * (tiles - 1) + 1, stride=2, axis=axis) for i in range(4)]
        return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]

    def at(m):  # A^T along a list of 4
        return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]

    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    tiles = [b.reshape(-1, c) for a in bt(xp, 1, th) for b in bt(a, 2, tw)]  # 16 x (n th tw, c)
    g = jnp.asarray(_WINOGRAD_G, k.dtype)
    u = jnp.einsum("ik,klcf,jl->ijcf", g, k, g).reshape(16, c, f)
    m = [jnp.dot(tiles[t], u[t]).reshape(n, th, tw, f) for t in range(16)]
    rows = [at(m[j::4]) for j in range(4)]  # A^T over the tile's row index, for each column index j
    y = [at([rows[j][p] for j in range(4)]) for p in range(2)]  # y[p][q]: output (2 t + p, 2 u + q)
    out = jnp.stack([jnp.stack(y[0], 3), jnp.stack(y[1], 3)], 2)  # n, th, 2, tw, 2, f
    return out.reshape(n, 2 * th, 2 * tw, f)[:, :h, :w]


STEP_VARIANTS = ("native,native+im2col,native+s2d,native+cbn,native+vbn,native+im2col+vbn,bfloat16,maxpool,"
                 "maxpool+rpool,vgg,vgg+rpool,vgg+cbn,vgg+vbn,vgg+rpool+vbn,resnet,resnet+cbn,resnet+vbn")

IMPLS = {"nhwc": conv_native, "nchw": conv_nchw, "im2col": conv_im2col, "s2d": conv_s2d, "shift": conv_shift,
         "winograd": conv_winograd}
STRIDE1_3X3_ONLY = ("shift", "winograd")


def _hlo_summary(compiled_text: str) -> dict[str, Any]:
    lines = compiled_text.splitlines()
    convs = [l for l in lines if " convolution(" in l]
    return {"ynn_fusions": sum("__ynn_fusion" in l and "fusion(" in l for l in lines),
            "xla_convolutions": len(convs),
            "lhs_dilated": sum("lhs_dilate" in l for l in convs),
            "rhs_dilated": sum("rhs_dilate" in l for l in convs),
            "dots": sum(" dot(" in l for l in lines)}


def study_convs(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    out = {"entries": [], "clock": args.clock}
    sets = [v for v in args.variants.split(",") if v in LAYER_SETS] or ["convnet"]
    impls = [v for v in args.variants.split(",") if v in IMPLS] or list(IMPLS)
    layers = [(name, *l) for name in sets for l in LAYER_SETS[name]]
    torch_layouts = [v for v in args.variants.split(",") if v in ("torch_nchw", "torch_cl")]
    if torch_layouts:
        if not have_torch():
            torch_layouts = []
        else:
            out["torch_threads"] = set_torch_threads(args.torch_threads)
    for model_name, h, c, f, ksz, stride in layers:
        x = rng.normal(size=(BATCH, h, h, c)).astype(np.float32)
        k = rng.normal(size=(ksz, ksz, c, f)).astype(np.float32)
        ref = np.asarray(conv_native(jnp.asarray(x), jnp.asarray(k), stride))
        flops = 2 * ref.size * ksz * ksz * c
        for impl in impls:
            conv = IMPLS[impl]
            if (impl == "s2d" and stride == 1) or (impl in STRIDE1_3X3_ONLY and (stride, ksz) != (1, 3)):
                continue
            xi, ki = (x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1)) if impl == "nchw" else (x, k)
            xi, ki = jnp.asarray(xi), jnp.asarray(ki)
            g = functools.partial(conv, s=stride)
            y = g(xi, ki)
            ct = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
            yy = np.asarray(y).transpose(0, 2, 3, 1) if impl == "nchw" else np.asarray(y)
            err = float(np.max(np.abs(yy - ref)) / np.max(np.abs(ref)))
            passes = {
                "fwd": jax.jit(g),
                "dx": jax.jit(lambda x, k, g=g, ct=ct: jax.vjp(lambda x: g(x, k), x)[1](ct)[0]),
                "dk": jax.jit(lambda x, k, g=g, ct=ct: jax.vjp(lambda k: g(x, k), k)[1](ct)[0]),
            }
            runners = {p: (lambda fn: lambda n: jax.block_until_ready([fn(xi, ki) for _ in range(n)]))(fn)
                       for p, fn in passes.items()}
            timed = measure(runners, repeats=args.repeats, min_time=args.min_time, clock=args.clock)
            for p, t in timed.items():
                s = summarize(t["samples"], t["n"])
                out["entries"].append({"model": model_name, "layer": f"{h}x{h}x{c}->{f} k{ksz} s{stride}",
                                       "impl": impl, "pass": p,
                                       "median_ms": s["median_s"] * 1e3, "min_ms": s["min_s"] * 1e3,
                                       "q1_ms": s["q1_s"] * 1e3, "q3_ms": s["q3_s"] * 1e3,
                                       "gflops": flops / s["median_s"] / 1e9, "rel_err_vs_nhwc": err,
                                       "hlo": _hlo_summary(passes[p].lower(xi, ki).compile().as_text())})
            print(f"  {model_name} {h}x{h}x{c}->{f} k{ksz} s{stride} {impl:6s} " + "  ".join(
                f"{e['pass']} {e['median_ms']:.2f} ms" for e in out["entries"][-3:]), file=sys.stderr, flush=True)
        for layout in torch_layouts:
            out["entries"] += _torch_conv_entries(x, k, stride, layout, model_name, h, c, f, ksz, flops, args)
    return out



def _torch_conv_entries(x, k, stride, layout, model_name, h, c, f, ksz, flops, args) -> list[dict]:
    """The same convolution in PyTorch (``F.conv2d``, padding ``k // 2``: same cost as XLA's 'SAME'):
    forward, and the input / kernel gradients each timed as (forward + that gradient) - forward."""
    import torch
    import torch.nn.functional as F

    cl = layout == "torch_cl"
    fmt = torch.channels_last if cl else torch.contiguous_format
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    kt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt)
    xg, kg = xt.clone().requires_grad_(True), kt.clone().requires_grad_(True)
    ct = torch.ones_like(F.conv2d(xt, kt, stride=stride, padding=ksz // 2))

    def fwd(n):
        with torch.no_grad():
            for _ in range(n):
                F.conv2d(xt, kt, stride=stride, padding=ksz // 2)

    def dx(n):
        for _ in range(n):
            torch.autograd.grad(F.conv2d(xg, kt, stride=stride, padding=ksz // 2), xg, ct)

    def dk(n):
        for _ in range(n):
            torch.autograd.grad(F.conv2d(xt, kg, stride=stride, padding=ksz // 2), kg, ct)

    timed = measure({"fwd": fwd, "dx": dx, "dk": dk}, repeats=args.repeats, min_time=args.min_time, clock=args.clock)
    t_f = summarize(timed["fwd"]["samples"], timed["fwd"]["n"])["median_s"]
    out = []
    for p, t in timed.items():
        s = summarize(t["samples"], t["n"])
        med = s["median_s"] - (t_f if p != "fwd" else 0.0)
        out.append({"model": model_name, "layer": f"{h}x{h}x{c}->{f} k{ksz} s{stride}", "impl": layout, "pass": p,
                    "median_ms": med * 1e3, "min_ms": s["min_s"] * 1e3, "q1_ms": s["q1_s"] * 1e3,
                    "q3_ms": s["q3_s"] * 1e3, "gflops": flops / max(med, 1e-9) / 1e9, "rel_err_vs_nhwc": None,
                    "hlo": None})
    print(f"  {model_name} {h}x{h}x{c}->{f} k{ksz} s{stride} {layout} " + "  ".join(
        f"{e['pass']} {e['median_ms']:.2f} ms" for e in out), file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# Model variants.


def _conv_module():
    import flax.linen as nn
    import jax.numpy as jnp

    class Conv(nn.Module):
        """``nn.Conv(features, (k, k), strides, 'SAME', use_bias=False)`` with a chosen formulation; the
        same parameter (``kernel``, HWIO, lecun-normal init) as flax's, so labels and params match."""

        features: int
        kernel_size: int = 3
        strides: int = 1
        impl: str = "im2col"
        param_dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x):
            k = self.param("kernel", nn.initializers.lecun_normal(),
                           (self.kernel_size, self.kernel_size, x.shape[-1], self.features), self.param_dtype)
            return IMPLS[self.impl](x, k.astype(x.dtype), self.strides)

    return Conv


def _bn_stats(x):
    import jax.numpy as jnp

    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    xc = x - mean
    return axes, mean, xc, jnp.mean(jnp.square(xc), axis=axes)


def _make_bn_functions():
    """Exact train-mode BN ``y = (x - mu) / sigma * gamma + beta`` (two-pass variance, eps = 0), by how
    its derivative is obtained: ``autodiff`` (JAX differentiates the two-pass variance: the library before
    :func:`rate_tuning.layers.normalize` had a hand-written JVP; the study's baseline), ``jvp`` (the
    library's ``normalize``: forward mode works, so HVPs do; JAX transposes the JVP for the gradient) and
    ``vjp`` (``custom_vjp``, the textbook backward ``dx = gamma/sigma (dy - mean(dy) - xhat mean(dy xhat))``:
    no forward mode, so no jvp-over-grad HVP)."""
    import jax
    import jax.numpy as jnp

    from rate_tuning import layers

    def bn_autodiff(x, gamma, beta):
        _, _, xc, var = _bn_stats(x)
        return xc * (jax.lax.rsqrt(var) * gamma) + beta

    def bn_jvp(x, gamma, beta):
        return layers.normalize(x, jnp.zeros((), x.dtype))[0] * gamma + beta

    @jax.custom_vjp
    def bn_vjp(x, gamma, beta):
        return bn_autodiff(x, gamma, beta)

    def fwd(x, gamma, beta):
        _, _, xc, var = _bn_stats(x)
        rstd = jax.lax.rsqrt(var)
        return xc * (rstd * gamma) + beta, (xc, rstd, gamma)

    def bwd(res, dy):
        xc, rstd, gamma = res
        axes = tuple(range(dy.ndim - 1))
        n = math.prod(dy.shape[a] for a in axes)
        dbeta = jnp.sum(dy, axis=axes)
        dxc = jnp.sum(dy * xc, axis=axes)
        dx = (gamma * rstd) * (dy - dbeta / n - xc * (dxc * rstd * rstd / n))
        return dx, dxc * rstd, dbeta

    bn_vjp.defvjp(fwd, bwd)
    return {"autodiff": bn_autodiff, "jvp": bn_jvp, "vjp": bn_vjp}


def _fast_bn_module(mode: str):
    """:class:`rate_tuning.layers.BatchNorm` (exact variant: same params, statistics and running
    averages) with the normalisation's derivative obtained as ``mode`` says (:func:`_make_bn_functions`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    fn = _make_bn_functions()[mode]

    class FastBatchNorm(nn.Module):
        use_running_average: bool | None = None
        momentum: float = 0.9
        use_scale: bool = True
        use_bias: bool = True
        param_dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x, use_running_average=None, *, weight_sq_norm=None):
            use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
            f = x.shape[-1]
            ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((f,), self.param_dtype))
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((f,), self.param_dtype))
            scale = self.param("scale", nn.initializers.ones, (f,), self.param_dtype) if self.use_scale else None
            bias = self.param("bias", nn.initializers.zeros, (f,), self.param_dtype) if self.use_bias else None
            xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            g = jnp.ones((f,), xs.dtype) if scale is None else scale.astype(xs.dtype)
            b = jnp.zeros((f,), xs.dtype) if bias is None else bias.astype(xs.dtype)
            if use_ra:
                y = (xs - ra_mean.value) * jax.lax.rsqrt(ra_var.value) * g + b
            else:
                _, mean, _, var = _bn_stats(jax.lax.stop_gradient(xs))
                if not self.is_initializing():
                    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
                y = fn(xs, g, b)
            return y.astype(x.dtype)

    return FastBatchNorm


def variant_model(name: str, dtype="float32"):
    """``(model, input_shape)`` of a variant ``BASE[+im2col|+s2d][+rpool][+cbn|+vbn]``.

    ``BASE``: ``native`` (= ``convnet``, the default convnet), ``maxpool`` (its channels with stride-1
    convolutions and 2x2 max-pool), ``vgg``, ``resnet`` (their defaults), or ``bfloat16`` (the convnet in
    bfloat16), all as the library computed them when this study was made, its baseline: XLA convolutions
    (``conv_impl='xla'``), ``nn.max_pool`` and BN differentiated by autodiff. ``+im2col`` / ``+s2d``: every
    convolution in that formulation (same params and labels); ``+rpool``: max-pool as reshape + max
    (:func:`rate_tuning.layers.max_pool_2x2`); ``+cbn`` / ``+vbn``: BN with a hand-written ``custom_jvp``
    (the library's :func:`rate_tuning.layers.normalize`) / ``custom_vjp`` derivative (same params and
    running statistics). The library's defaults on CPU today are ``native+im2col+rpool+cbn`` for strided
    convolutions (``conv_impl='auto'``), stride-1 ones staying XLA's.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from rate_tuning import layers, models

    base, *mods = name.split("+")
    if dtype == "float32" and base == "bfloat16":
        dtype = "bfloat16"
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    conv_impl = "im2col" if "im2col" in mods else "s2d" if "s2d" in mods else "xla"
    rpool = "rpool" in mods
    fast_bn = _fast_bn_module("jvp" if "cbn" in mods else "vjp" if "vbn" in mods else "autodiff")
    common = dict(preset=models.PRESETS["paper"], param_dtype=jdt,
                  conv_impl="im2col" if conv_impl == "im2col" else "xla")
    if base in ("native", "convnet", "bfloat16"):
        units = models.convnet().units
    elif base == "maxpool":
        units = (models.Unit("conv", 16, pool="max"), models.Unit("conv", 32, pool="max"),
                 models.Unit("conv", 64, pool="global"))
    elif base == "vgg":
        units = models.vgg().units
    elif base != "resnet":
        raise ValueError(f"unknown variant {name!r}")
    Conv = _conv_module()
    base_cls = models.ResNet if base == "resnet" else models.BNNet

    def make_bn(self, name, train, affine):
        return fast_bn(use_running_average=not train, use_scale=affine, use_bias=affine,
                       param_dtype=self.param_dtype, name=name)

    def layer_bn(self, x, kind, features, name, bn_name, train, affine, kernel_size=3, stride=1):
        if kind == "dense" or conv_impl != "s2d":
            return base_cls._layer_bn(self, x, kind, features, name, bn_name, train, affine, kernel_size, stride)
        layer = Conv(features, kernel_size, stride, conv_impl, self.param_dtype, name=name)
        x = layer(x)
        kernel = layer.variables["params"]["kernel"]
        w_sq = jnp.sum(jnp.square(kernel), axis=(0, 1, 2))
        return self._bn(bn_name, train, affine)(x, weight_sq_norm=w_sq)

    if base == "resnet":
        cls = type("ResNetVariant", (models.ResNet,), {"_layer_bn": layer_bn, "_bn": make_bn})
        return cls(**common), (32, 32, 3)

    class BNNetVariant(models.BNNet):
        _layer_bn = layer_bn
        _bn = make_bn

        @nn.compact
        def __call__(self, x, train: bool = True):  # BNNet.__call__ with the pool swapped
            act = models.ACTIVATIONS[self.preset.activation]
            affine = self.preset.inner_affine is not None
            for i, u in enumerate(self.units):
                x = act(self._layer_bn(x, u.kind, u.features, f"layer{i}", f"bn{i}", train, affine,
                                       u.kernel_size, u.stride))
                if u.pool == "max":
                    x = layers.max_pool_2x2(x) if rpool else nn.max_pool(x, (2, 2), strides=(2, 2))
                elif u.pool == "global":
                    x = jnp.mean(x, axis=(1, 2))
            return self._head(x, train)

    return BNNetVariant(units=units, **common), (32, 32, 3)


def study_steps(args) -> dict:
    import chex
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rate_tuning import optim, steps

    variants = args.variants.split(",")
    batch = int(args.batches.split(",")[0])
    out = {"entries": [], "clock": args.clock, "batch": batch, "xla_flags": __import__("os").environ.get("XLA_FLAGS", "")}
    with_torch = have_torch() and not args.no_torch
    if with_torch:
        out["torch_threads"] = set_torch_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    runners, meta, checks = {}, {}, {}
    for v in variants:
        dtype = "bfloat16" if v.startswith("bfloat16") else "float32"
        model, shape = variant_model(v, dtype)
        labels = model.labels("layer")
        x = rng.normal(size=(batch,) + shape).astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x, jdt))
        base = v.split("+")[0]
        if "+" in v and dtype == "float32":  # same params as the base model: the logits must agree
            ref_model = variant_model(base)[0]
            ref = ref_model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])[0]
            got = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])[0]
            out.setdefault("max_logit_diff_vs_base", {})[v] = float(jnp.max(jnp.abs(ref - got)))
            from rate_tuning import models as M

            def grads(m):
                return jax.jit(jax.grad(lambda p: M.batch_loss(m, p, variables["batch_stats"], jnp.asarray(x),
                                                                jnp.asarray(y), True)[0]))(variables["params"])

            ga, gb = grads(ref_model), grads(model)
            out.setdefault("max_rel_grad_diff_vs_base", {})[v] = max(
                float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in
                zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)))
        lr_w = optim.constant(0.1)
        state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                        tx=optim.two_rate_sgd(labels, lr_w, lr_w), batch_stats=variables["batch_stats"])
        chex.clear_trace_counter()
        step = steps.make_train_step(model, labels, lr_w)
        xs, ys = jnp.asarray(x, jdt), jnp.asarray(y)
        box = [state]

        def run(n, step=step, box=box, xs=xs, ys=ys):
            s = box[0]
            for _ in range(n):
                s, _ = step(s, xs, ys)
            jax.block_until_ready(s.params)
            box[0] = s

        runners[f"jax/{v}"] = run
        checks[f"jax/{v}"] = step
        meta[f"jax/{v}"] = {"framework": "jax", "variant": v}
        if with_torch and "+" not in v and base != "bfloat16":
            from benchmarks import torch_reference as tr
            for cl in (False, True):
                tstep, _, _ = tr.make_step(model, labels, shape, channels_last=cl)
                xt, yt = tr.to_torch_batch(x, y, channels_last=cl)

                def trun(n, tstep=tstep, xt=xt, yt=yt):
                    for _ in range(n):
                        loss = tstep(xt, yt)
                    float(loss.detach())

                name = f"torch/{v}/{'channels_last' if cl else 'nchw'}"
                runners[name] = trun
                meta[name] = {"framework": "torch", "variant": f"{v} {'channels_last' if cl else 'NCHW'}"}
    timed = measure(runners, repeats=args.repeats, min_time=args.min_time, clock=args.clock)
    for name, t in timed.items():
        e = {**meta[name], **summarize(t["samples"], t["n"], batch), "first_call_s": t["first_call_s"]}
        if name in checks:
            e["jit_cache_entries"] = checks[name]._cache_size()
        out["entries"].append(e)
    print("  " + "  ".join(f"{e['framework']}/{e['variant']} {e['examples_per_s']:.0f}" for e in out["entries"]),
          file=sys.stderr, flush=True)
    return out


def study_bnpool(args) -> dict:
    """BN (+ReLU) forward+backward and 2x2 max-pool forward+backward on the activations of the VGG's
    layers: JAX (:class:`rate_tuning.layers.BatchNorm` exact; ``nn.max_pool`` i.e. ``reduce_window``
    whose gradient is ``select-and-scatter``; reshape + max) vs PyTorch (the reference's exact BN written
    out; ``F.batch_norm`` with eps=1e-5, which refuses eps=0 in training; ``F.max_pool2d``)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rate_tuning import layers

    out = {"entries": [], "clock": args.clock}
    with_torch = have_torch() and not args.no_torch
    if with_torch:
        import torch
        import torch.nn.functional as F

        from benchmarks.torch_reference import ExactBatchNorm
        out["torch_threads"] = set_torch_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    for shape in ((BATCH, 32, 32, 32), (BATCH, 16, 16, 64), (BATCH, 8, 8, 128)):
        x = rng.normal(size=shape).astype(np.float32)
        xj = jnp.asarray(x)
        bn = layers.BatchNorm(use_running_average=False)
        v = bn.init(jax.random.key(0), xj)

        def bn_loss(p, x, v=v, bn=bn):
            y, _ = bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
            return jnp.sum(jax.nn.relu(y))

        bn_grad = jax.jit(jax.grad(bn_loss, argnums=(0, 1)))
        fns = _make_bn_functions()
        custom = {m: jax.jit(jax.grad(lambda p, x, f=fns[m]: jnp.sum(jax.nn.relu(f(x, p["scale"], p["bias"]))),
                                      argnums=(0, 1))) for m in ("autodiff", "jvp", "vjp")}
        pool_rw = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)))))
        pool_rs = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x))))
        runners = {
            "jax bn+relu fwd+bwd, layers.BatchNorm": lambda n: jax.block_until_ready(
                [bn_grad(v["params"], xj) for _ in range(n)]),
            "jax bn+relu fwd+bwd, autodiff BN": lambda n: jax.block_until_ready(
                [custom["autodiff"](v["params"], xj) for _ in range(n)]),
            "jax bn+relu fwd+bwd, custom_jvp BN": lambda n: jax.block_until_ready(
                [custom["jvp"](v["params"], xj) for _ in range(n)]),
            "jax bn+relu fwd+bwd, custom_vjp BN": lambda n: jax.block_until_ready(
                [custom["vjp"](v["params"], xj) for _ in range(n)]),
            "jax max_pool (reduce_window) fwd+bwd": lambda n: jax.block_until_ready([pool_rw(xj) for _ in range(n)]),
            "jax max_pool (reshape+max) fwd+bwd": lambda n: jax.block_until_ready([pool_rs(xj) for _ in range(n)]),
        }
        if with_torch:
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
            tb = ExactBatchNorm(shape[-1])
            nb = torch.nn.BatchNorm2d(shape[-1])

            def t_bn(n, mod):
                for _ in range(n):
                    torch.relu(mod(xt)).sum().backward()

            def t_pool(n):
                for _ in range(n):
                    F.max_pool2d(xt, 2, 2).sum().backward()

            runners["torch exact bn+relu fwd+bwd"] = lambda n: t_bn(n, tb)
            runners["torch F.batch_norm(eps=1e-5)+relu fwd+bwd"] = lambda n: t_bn(n, nb)
            runners["torch max_pool2d fwd+bwd"] = t_pool
        timed = measure(runners, repeats=args.repeats, min_time=args.min_time, clock=args.clock)
        for name, t in timed.items():
            s = summarize(t["samples"], t["n"])
            out["entries"].append({"shape": "x".join(map(str, shape)), "op": name, "median_ms": s["median_s"] * 1e3,
                                   "q1_ms": s["q1_s"] * 1e3, "q3_ms": s["q3_s"] * 1e3})
        print(f"  {shape}: " + "  ".join(f"{e['op']} {e['median_ms']:.1f}" for e in out["entries"][-len(timed):]),
              file=sys.stderr, flush=True)
    return out


WORKERS = {"convs": study_convs, "steps": study_steps, "bnpool": study_bnpool}
"""The measurements a worker process makes (``--worker convnet --study NAME``)."""


def run_worker(args) -> None:
    """A worker: pin to ``--pin-core`` (before JAX or PyTorch start), run ``--study``, write ``--json``."""
    if args.pin_core is not None:
        pin_to_core(args.pin_core)
    write_worker_result(WORKERS[args.study](args), args.json)


# ------------------------------------------------------------------------------------------------
# Orchestration and report.


STUDIES = ("convs_percore", "convs_wall", "bnpool_percore", "steps_percore", "steps_wall", "flags")
"""The parts of the investigation, in the order they run (``--studies``, or ``--convnet-studies`` of the
suite, picks some; default all)."""


def spawner(base_env: dict[str, str] | None = None):
    """``spawn(worker, extra, env=None)`` for :func:`orchestrate`: a worker of this module in a fresh process
    (:func:`benchmarks.common.spawn_worker`) with ``base_env`` (the allocator's) and the call's ``env``."""
    def spawn(worker: str, extra: list[str], env: dict | None = None) -> dict:
        return spawn_worker(MODULE, worker, extra, env={**(base_env or {}), **(env or {})})

    return spawn


def orchestrate(args, spawn) -> dict:
    """Run the chosen :data:`STUDIES` (``args.convnet_studies``, comma-separated; None: all) with
    ``args.repeats`` and ``args.min_time``, each through ``spawn(worker, extra, env=None)`` (:func:`spawner`);
    returns ``{study: its workers' results}``."""
    chosen = (args.convnet_studies or ",".join(STUDIES)).split(",")
    unknown = sorted(set(chosen) - set(STUDIES))
    if unknown:
        raise SystemExit(f"unknown convnet studies {unknown}; known: {', '.join(STUDIES)}")
    core = max(os.sched_getaffinity(0))
    pin = ["--clock", "cpu", "--pin-core", str(core), "--torch-threads", "1"]
    common = ["--repeats", str(args.repeats), "--min-time", str(args.min_time)]
    convs = ["--study", "convs", "--variants", "convnet,vgg,resnet,nhwc,nchw,im2col,s2d,shift,winograd"]
    steps = ["--study", "steps", "--batches", "128", "--variants", STEP_VARIANTS]
    runs = {
        "convs_percore": lambda: spawn("convnet", [*convs[:-1], convs[-1] + ",torch_nchw,torch_cl", *pin, *common]),
        "convs_wall": lambda: spawn("convnet", [*convs, "--clock", "wall", *common]),
        "bnpool_percore": lambda: spawn("convnet", ["--study", "bnpool", *pin, *common]),
        "steps_percore": lambda: spawn("convnet", [*steps, *pin, *common]),
        "steps_wall": lambda: spawn("convnet", [*steps, "--clock", "wall", *common]),
        "flags": lambda: _flag_runs(spawn, steps, core, common),
    }
    return {name: runs[name]() for name in STUDIES if name in chosen}


def _flag_runs(spawn, steps, core, common) -> dict:
    """The native convnet step under each of :data:`FLAG_SETS`, one core (CPU time) and all cores."""
    res = {}
    for name, flag in FLAG_SETS.items():
        if name == "default":
            continue
        for clock, pin in (("cpu", ["--pin-core", str(core)]), ("wall", [])):
            r = spawn("convnet", [*steps, "--variants", "native", "--no-torch", "--clock", clock, *pin, *common],
                      env={"XLA_FLAGS": flag})
            res[f"{name}/{clock}"] = {"flag": flag, **r}
    return res


def _step_rate(r: dict, variant: str, framework: str = "jax") -> float | None:
    """Examples/s of ``variant`` (JAX: exact variant name; PyTorch: best layout of the base model)."""
    best = None
    for e in r.get("entries", []):
        name = e["variant"] if framework == "jax" else e["variant"].split(" ")[0]
        if e["framework"] == framework and name == variant:
            best = e["examples_per_s"] if best is None else max(best, e["examples_per_s"])
    return best


def _f(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def markdown(res: dict) -> list[str]:
    lines = ["## Convnet investigation (batch 128, float32)", ""]
    pc, wl = res.get("steps_percore", {}), res.get("steps_wall", {})
    variants = [e["variant"] for e in pc.get("entries", []) if e["framework"] == "jax"] or \
        [e["variant"] for e in wl.get("entries", []) if e["framework"] == "jax"]
    if variants:
        lines += ["### Whole train step, examples/s; PyTorch: the base model's peer, best of NCHW and channels_last",
                  "", "| variant | JAX one core (per CPU-s) | PyTorch one core | JAX / PyTorch | JAX all cores (wall) | "
                  "PyTorch all cores | JAX / PyTorch |", "|---|---|---|---|---|---|---|"]
    for v in variants:
        base = v.split("+")[0]
        base = "native" if base == "bfloat16" else base
        a, b = _step_rate(pc, v), _step_rate(pc, base, "torch")
        c, d = _step_rate(wl, v), _step_rate(wl, base, "torch")
        lines.append(f"| {v} | {_f(a)} | {_f(b)} | {_ratio(a, b)} | {_f(c)} | {_f(d)} | {_ratio(c, d)} |")
    diffs = pc.get("max_logit_diff_vs_base") or wl.get("max_logit_diff_vs_base")
    gdiffs = pc.get("max_rel_grad_diff_vs_base") or wl.get("max_rel_grad_diff_vs_base") or {}
    if diffs:
        lines += ["", "Each reformulated variant vs its base model, same params, float32: max |logit difference| "
                  "/ max relative gradient difference: " +
                  ", ".join(f"{k} {v:.1e} / {gdiffs.get(k, float('nan')):.1e}" for k, v in diffs.items()) + "."]
    lines.append("")
    for key, title in (("convs_percore", "one core, CPU time"), ("convs_wall", "all cores, wall clock")):
        r = res.get(key, {})
        if "entries" not in r:
            lines += [f"Convolutions alone, {title}: {r.get('error', 'not run')}", ""]
            continue
        lines += [f"### Each convolution alone, {title}: ms (GFLOP/s); where XLA runs it", "",
                  "HLO column: `ynn` = inside a YNNPACK fusion, `eigen` = an XLA convolution op (Eigen), "
                  "`lhs-dil` / `rhs-dil` = input / window dilation (the stride of the forward pass), `ynn dot` = no "
                  "convolution left, a YNNPACK matmul (im2col).", "",
                  "| model | layer | impl | forward | d input | d kernel | HLO fwd / dx / dk |", "|---|---|---|---|---|---|---|"]
        if r.get("note"):
            lines[-3:-3] = [r["note"] + ".", ""]
        rows = {}
        for e in r["entries"]:
            rows.setdefault((e.get("model", ""), e["layer"], e["impl"]), {})[e["pass"]] = e

        def cell(e):
            return f"{e['median_ms']:.2f} ({e['gflops']:.0f})" if e else "-"

        def hlo(e):
            if not e or not e.get("hlo"):
                return "oneDNN" if e else "-"
            h = e["hlo"]
            if not h["xla_convolutions"]:
                kind = "ynn dot" if h["ynn_fusions"] else "dot"
            else:
                kind = "ynn" if h["ynn_fusions"] else "eigen"
            extra = (" lhs-dil" if h["lhs_dilated"] else "") + (" rhs-dil" if h["rhs_dilated"] else "")
            return kind + extra

        for (model, layer, impl), p in rows.items():
            lines.append(f"| {model} | {layer} | {impl} | {cell(p.get('fwd'))} | {cell(p.get('dx'))} | "
                         f"{cell(p.get('dk'))} | {hlo(p.get('fwd'))} / {hlo(p.get('dx'))} / {hlo(p.get('dk'))} |")
        lines.append("")
    bp = res.get("bnpool_percore", {})
    if "entries" in bp:
        lines += ["### BN + ReLU and 2x2 max-pool, forward + backward, one core, CPU ms", "",
                  "| activation (NHWC) | op | median ms |", "|---|---|---|"]
        for e in bp["entries"]:
            lines.append(f"| {e['shape']} | {e['op']} | {e['median_ms']:.2f} |")
        lines.append("")
    if res.get("flags"):
        base_c, base_w = _step_rate(pc, "native"), _step_rate(wl, "native")
        lines += ["### XLA CPU flags (JAX convnet step, examples/s; x = relative to no flags, same table's run)", "",
                  "| flag | one core | x | all cores | x |", "|---|---|---|---|---|"]
        for n in sorted({k.split("/")[0] for k in res["flags"]}):
            c, w = res["flags"].get(f"{n}/cpu", {}), res["flags"].get(f"{n}/wall", {})
            rc, rw = _step_rate(c, "native"), _step_rate(w, "native")
            flag = c.get("flag") or w.get("flag", "")
            lines.append(f"| `{flag}` | {_f(rc) if rc else 'error'} | {_ratio(rc, base_c)} | "
                         f"{_f(rw) if rw else 'error'} | {_ratio(rw, base_w)} |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------
# On its own: python -m benchmarks.studies.convnet_study


def report(result: dict) -> str:
    """The Markdown of a :func:`main` result: the hardware, allocator and settings, then :func:`markdown`."""
    hw, s = result["hardware"], result["settings"]
    a = result["allocator"]
    lines = [f"# Convnet study ({result['mode']}), {hw['date']}", "", hardware_line(hw),
             f"- Host allocator: {a['name']}" + (f" ({', '.join(f'{k}={v}' for k, v in a['env'].items())})"
                                                 if a["env"] else ""),
             f"- Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in hw['loadavg'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in hw.get('loadavg_end', []))}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             f"- Settings: {s['repeats']} repeats of >= {s['min_time_s']} s after 2 warm-up steps; median and IQR; "
             f"studies: {', '.join(s['studies'])}", ""]
    lines += markdown(result["sections"]["convnet"])
    lines.append(f"Total wall time: {result.get('total_wall_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", dest="convnet_studies", default=None,
                   help=f"comma-separated, of {', '.join(STUDIES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="5 repeats of >= 0.2 s (default: 9 of >= 1 s)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (>= 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per repeat")
    p.add_argument("--allocator", default="system", choices=ALLOCATORS,
                   help="host allocator of every worker (benchmarks.common.allocator_env)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "results"), help="directory of the JSON and Markdown results")
    p.add_argument("--name", default="convnet_study_cpu", help="result file stem")
    # worker-only
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--study", default=None, choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--variants", default="native,im2col,s2d,maxpool,bfloat16", help=argparse.SUPPRESS)
    p.add_argument("--batches", default="128", help=argparse.SUPPRESS)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help=argparse.SUPPRESS)
    p.add_argument("--pin-core", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--torch-threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-torch", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 9
    if args.repeats < 5 and args.worker is None:
        p.error("--repeats must be >= 5")
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 1.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    env = allocator_env(args.allocator)
    t0 = time.perf_counter()
    result = {"study": "convnet", "mode": "quick" if args.quick else "full", "hardware": hardware(),
              "versions": versions(), "allocator": {"name": args.allocator, "env": env},
              "settings": {"repeats": args.repeats, "min_time_s": args.min_time,
                           "studies": (args.convnet_studies or ",".join(STUDIES)).split(",")}}
    result["sections"] = {"convnet": orchestrate(args, spawner(env))}
    result["hardware"]["loadavg_end"] = list(os.getloadavg())
    result["total_wall_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    md = report(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
