"""Model FLOPs of a train step and the machine's measured matrix throughput, for utilisation figures.

``forward_flops`` counts the multiply-adds of every ``dot_general`` and ``conv_general_dilated`` in the
jaxpr of a function (into ``pjit``, ``custom_jvp``/``custom_vjp`` and ``scan`` bodies; a scan body counts
``length`` times): ``2 * prod(out) * (reduced size)``, i.e. what the layers compute, independent of the
backend and of how XLA lowers it (im2col patches count as their dot, which performs the same products).
``train_flops = 3 * forward``: the usual convention of utilisation figures (backward = twice the forward:
one product for the input gradient and one for the weight gradient per layer; the first layer's input
gradient, which is not needed, is counted too). Element-wise work (BN, activations, the update) is not
counted: the figure is the fraction of the chip's matrix throughput that the step's matrix products reach.

``matmul_runner`` is what measures that throughput: a jitted ``N x N @ N x N`` in ``dtype``, timed by the
suite (:func:`benchmarks.common.measure`: warm-up, calibration, median of repeats).
"""
from __future__ import annotations

import math
from typing import Any, Callable


def _jaxpr_flops(jaxpr) -> int:
    from jax import extend

    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
            total += 2 * math.prod(lhs) * rhs_free
        elif name == "conv_general_dilated":
            dn = eqn.params["dimension_numbers"]
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            per_output = math.prod(rhs[d] for d in dn.rhs_spec[1:])  # C_in / groups x kernel window
            total += 2 * math.prod(out) * per_output
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in extend.core.jaxprs_in_params(eqn.params):
            total += times * _jaxpr_flops(sub)
    return total


def forward_flops(fn: Callable, *args: Any) -> int:
    """Multiply-add FLOPs (2 per product) of the matrix products and convolutions of ``fn(*args)``."""
    import jax

    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def train_flops(model, variables, x) -> int:
    """``3 x`` the forward FLOPs of ``model`` in train mode on ``x`` (see the module docstring)."""
    def forward(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0]

    return 3 * forward_flops(forward, variables, x)


def matmul_runner(dtype: str = "float32", n: int | None = None) -> tuple[Callable[[int], Any], int, int]:
    """``(run(k), flops_per_call, n)``: ``run(k)`` does ``k`` jitted ``n x n`` products in ``dtype`` and blocks
    (default ``n``: 1024 on CPU, 8192 elsewhere); timed by the suite's ``measure`` like every entry."""
    import jax
    import jax.numpy as jnp

    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    jdt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jdt)
    b = jax.random.normal(jax.random.key(1), (n, n), jdt)
    mm = jax.jit(lambda a, b: a @ b)

    def run(k):
        out = None
        for _ in range(k):
            out = mm(a, b)
        jax.block_until_ready(out)

    return run, 2 * n ** 3, n
