"""Numerics shared by the checks: the float64 context, round-off bounds and numpy-drawn initial points.

* Precision: a check enables float64 at its entry (:func:`x64`, :func:`in_x64`), never globally; float32
  records run with x64 off, as training does.
* Round-off: ``u = eps / 2`` is the unit round-off of a dtype and ``gamma_n = n u / (1 - n u)`` the
  classical bound on the relative error of a floating-point sum of ``n`` non-negative terms (Higham,
  *Accuracy and Stability of Numerical Algorithms*, §3.1). :func:`tol_norm_identity` is the per-step
  tolerance of Lemma 2.4 (2) derived from them (docs/derivations.md, C4).
* Initial points drawn with numpy (no JAX program to compile): :func:`numpy_init` for the problems of
  :mod:`proofs_check.problems`, :func:`fan_in_normal` for the kernels of :mod:`rate_tuning.models`.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rate_tuning import groups as G


def x64(enabled: bool = True):
    """Float64 on (or off) for the duration of a ``with`` block (``jax.enable_x64``), never globally."""
    return jax.enable_x64(enabled)


def in_x64(check):
    """Run ``check(settings)`` with float64 enabled (at the check's entry, never globally)."""
    @functools.wraps(check)
    def wrapped(settings: dict):
        with x64():
            return check(settings)

    return wrapped


def unit_roundoff(dtype) -> float:
    """``u = eps / 2`` of ``dtype``."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2.0


def gamma(n: int, dtype) -> float:
    """``gamma_n = n u / (1 - n u)``: relative error bound of a floating-point sum of ``n`` non-negative terms."""
    nu = n * unit_roundoff(dtype)
    return nu / (1.0 - nu)


def tol_norm_identity(n: int, dtype) -> float:
    """Per-step tolerance of ``(||w'||^2 - ||w||^2 - lr^2 ||g||^2) / ||w'||^2`` (Lemma 2.4 (2); C4, C5, C16).

    Derivation (docs/derivations.md, C4): three squared norms of ``n`` terms, each within ``gamma_n`` of
    its value, whose exact values sum to at most ``2 ||w'||^2`` -> ``2 gamma_n``; the rounding of
    ``w' = fl(w - fl(lr g))`` moves ``||w'||^2`` by at most ``4u ||w'||^2`` and ``fl(lr^2)`` adds ``2u``
    -> ``6u``; the radial component of the computed gradient contributes
    ``2 lr |<g, w>| / ||w'||^2 = 2 |cos(g, w)| x / (1 + x^2)`` with ``x = rho a``, at most ``gamma_n`` both when the
    gradient is well above round-off (its radial part is a cancelled dot product of ``n`` terms:
    ``|cos| <= gamma_n``) and when it is at round-off level (``cos`` meaningless but ``x ~ 1e-16``)
    -> ``gamma_n``. Total ``3 gamma_n + 6u``.
    """
    return 3.0 * gamma(n, dtype) + 6.0 * unit_roundoff(dtype)


def numpy_init(prob, seed: int, scale: float, dtype: str):
    """Initial params of the :class:`proofs_check.problems.Problem` ``prob`` drawn with numpy: every leaf
    standard normal (``numpy.random.default_rng(seed)``, leaves in tree order), then every SI group rescaled
    to norm ``scale``.

    The shapes come from ``jax.eval_shape(prob.init, ...)`` (tracing only). Eager ``prob.init`` would compile
    each random/normalise op separately (~0.1 s each), which dominates short checks.
    """
    shapes = jax.eval_shape(lambda k: prob.init(k, dtype=jnp.dtype(dtype)), jax.random.key(0))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    drawn = [rng.standard_normal(x.shape).astype(dtype) for x in leaves]
    params = jax.tree_util.tree_unflatten(treedef, drawn)
    sq: dict[str, float] = {}
    for _, leaf, label in G.flatten_labelled(params, prob.labels):
        if label.kind == G.SI:
            sq[label.group] = sq.get(label.group, 0.0) + float(np.sum(np.asarray(leaf, np.float64) ** 2))
    out = [np.asarray(leaf * (scale / np.sqrt(sq[label.group])), dtype) if label.kind == G.SI else leaf
           for _, leaf, label in G.flatten_labelled(params, prob.labels)]
    return jax.tree_util.tree_unflatten(treedef, out)


def fan_in_normal(rng: np.random.Generator, shape, column_norm: float | None = None) -> np.ndarray:
    """A kernel ``N(0, 1/fan_in)`` (``fan_in = prod(shape[:-1])``) drawn from ``rng``, float64; with
    ``column_norm`` every output column rescaled to that norm (the frozen classifier of the ``fully_si``
    preset, :attr:`rate_tuning.models.BNNet.classifier_norm`)."""
    w = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
    if column_norm is not None:
        w = column_norm * w / np.linalg.norm(w, axis=0, keepdims=True)
    return w
