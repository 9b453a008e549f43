"""Curvature tools: Hessian-vector products, Lanczos, the sphere-projected Hessian, smoothness constants.

Everything here is a pure function of pytrees (params in, numbers out) and composes with ``jit``, ``vmap``
and ``grad``; :func:`smoothness_constants` is the one exception (a measurement routine that returns a
host-side record). The checks call these in float64 (``with jax.enable_x64(True): ...``); nothing here
changes the global precision.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019.
The tangent-projected Hessian serves claim C13; the smoothness constants are the ``L^{ww}``, ``L^{gw}``,
``L^{gg}`` of the smoothness assumption on the unit set (A1, used by the proof chain I2-I4, claims C14, C15).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rate_tuning.groups import Label

__all__ = [
    "hvp",
    "dense_hessian",
    "lanczos",
    "top_eigenvalue",
    "extreme_eigenvalues",
    "hessian_extreme_eigenvalues",
    "hutchinson_trace",
    "rademacher",
    "slq_nodes_weights",
    "spectral_density",
    "tangent_projector",
    "projected_hvp",
    "unit_normalize",
    "si_group_masks",
    "SmoothnessConstants",
    "smoothness_constants",
]

PyTree = Any

# ---------------------------------------------------------------------------------------------------------
# Hessians
# ---------------------------------------------------------------------------------------------------------


def hvp(loss: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H(params) v``, forward-over-reverse.

    Math: ``H v = d/ds grad L(params + s v) |_{s=0}``, computed as ``jvp(grad(L), (params,), (v,))``; one
    HVP costs a small multiple of a gradient and never forms ``H``.

    Args:
      loss: scalar function of the params pytree.
      params: the point.
      v: a pytree with the structure and dtypes of ``params``.

    Returns:
      ``H v`` as a pytree like ``params``.

    Paper: used for the Hessian identities of Sec. 2 (claim C3: ``H(cw) = c^-2 H(w)``, ``H(w) w = -grad``).
    """
    return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def dense_hessian(loss: Callable[[PyTree], jax.Array], params: PyTree) -> jax.Array:
    """Dense Hessian of ``loss`` at ``params`` on the flattened parameter vector (for validation).

    Math: ``H_ij = d^2 L / d theta_i d theta_j`` with ``theta = ravel_pytree(params)[0]`` (the same
    flattening order as :func:`lanczos` on a pytree example).

    Args:
      loss: scalar function of the params pytree.
      params: the point; keep it small (``n x n`` memory).

    Returns:
      An ``(n, n)`` array.
    """
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: loss(unravel(x)))(flat)


# ---------------------------------------------------------------------------------------------------------
# Lanczos
# ---------------------------------------------------------------------------------------------------------


def _reorthogonalize(Q: jax.Array, w: jax.Array) -> jax.Array:
    """Classical Gram-Schmidt against the rows of ``Q``, applied twice ("twice is enough").

    Written ``(Q w) Q``, not ``Q^T (Q w)``: XLA:CPU then makes no transposed copy of ``Q`` (it did at every
    unrolled step of :func:`lanczos`).
    """
    w = w - (Q @ w) @ Q
    return w - (Q @ w) @ Q


DGKS_ETA = 0.5 ** 0.5
"""Second Gram-Schmidt pass when a pass leaves less than this fraction of the norm (Daniel, Gragg, Kaufman &
Stewart 1976): only then can the first pass have left components in ``span(Q)`` above round-off."""


def _reorthogonalize_dgks(Q: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One classical Gram-Schmidt pass against the rows of ``Q`` (two passes over ``Q``: ``Q w`` and
    ``(Q w) Q``), a second one under ``lax.cond`` when the first cancelled more than ``1 - DGKS_ETA`` of
    ``||w||``; returns ``(w, ||w||)``. (A ``lax.switch`` over prefixes of ``Q`` covering only the rows
    filled so far was slower on the CPU: 5.8 against 4.7 ms per step at n = 670740, k = 10.)"""
    before = jnp.linalg.norm(w)
    w = w - (Q @ w) @ Q
    after = jnp.linalg.norm(w)

    def again(w):
        w = w - (Q @ w) @ Q
        return w, jnp.linalg.norm(w)

    return jax.lax.cond(after < DGKS_ETA * before, again, lambda w: (w, after), w)


def _contains_convolution(fn: Callable, n: int, dt) -> bool:
    """Whether the jaxpr of ``fn`` on an ``(n,)`` vector of ``dt`` (sub-jaxprs included) has a convolution."""
    todo = [jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((n,), dt)).jaxpr]
    while todo:
        jaxpr = todo.pop()
        if any(eqn.primitive.name == "conv_general_dilated" for eqn in jaxpr.eqns):
            return True
        todo.extend(jax.extend.core.subjaxprs(jaxpr))
    return False


def lanczos(
    matvec: Callable,
    dim_or_example: int | PyTree,
    num_steps: int,
    key: jax.Array,
    *,
    v0: PyTree | jax.Array | None = None,
    return_vectors: bool = False,
    dtype: Any = None,
    breakdown_tol: float | None = None,
    unroll: bool | None = None,
    linearize: bool = True,
    return_tridiagonal: bool = False,
):
    """Lanczos with full reorthogonalisation for a real symmetric linear operator; returns Ritz values.

    Math: builds an orthonormal basis ``Q = [q_0..q_{k-1}]`` of the Krylov space of ``v0`` and the
    tridiagonal ``T = Q^T A Q`` (``alpha_j = <q_j, A q_j>``, ``beta_j = ||A q_j - alpha_j q_j -
    beta_{j-1} q_{j-1}||`` after re-orthogonalising against all of ``Q`` twice). The Ritz values are the
    eigenvalues of ``T``; its extreme ones converge first to the extreme (algebraic) eigenvalues of ``A``,
    unlike power iteration, which returns the eigenvalue of largest magnitude. Breakdown
    (``beta_j <= breakdown_tol * ||A||_est``: the Krylov space is invariant) is handled by restarting from a
    fresh vector orthogonal to ``Q`` (the coordinate vector least represented in ``span(Q)``,
    re-orthogonalised) with ``beta_j = 0``; ``T`` is then block diagonal and still equals ``Q^T A Q`` (to the
    breakdown tolerance), so its eigenvalues are Ritz values of ``A`` on ``span(Q)``; with
    ``num_steps >= dim`` they are the whole spectrum, multiplicities included. ``num_steps`` is clipped to
    the dimension. Cost: one ``matvec`` and ``O(k n)`` flops per step, ``(k + 1) n`` memory. Each step
    runs the three-term recurrence, then one classical Gram-Schmidt pass against all of ``Q`` (two reads of
    ``Q``) and a second only when the first cancelled more than ``1 - 1/sqrt(2)`` of the norm (DGKS; rare
    after the recurrence has removed the large components). ``Q`` is a preallocated ``(k + 1, n)`` array
    written in place (``dynamic_update_index_in_dim``). With ``linearize`` the operator's work that does not
    depend on the vector (for an HVP, the forward pass and the gradient) is done once, before the steps.
    Measured (batch 128, float32, 2 shared cores; ``benchmarks/curvature_compare.py``): per step about one
    HVP (``benchmarks/README.md``, "Curvature at scale").

    Iteration: a ``lax.fori_loop``, or the ``k`` steps unrolled when ``matvec`` contains a convolution on
    the CPU backend. XLA:CPU canonicalises convolution layouts only in the entry computation
    (``ConvCanonicalization``; jax-ml/jax#12868), so the backward convolutions of an HVP in a loop body run
    on a naive kernel: 10 steps on the HVP of the BN convnet with XLA convolutions (batch 128, float32, 2 cores) took
    8.5 s (384 gradients) in the loop, 0.36 s (17 gradients, the 10 HVPs) unrolled. Unrolling costs
    compilation, about 1.3 s per step there (13 s for 10 steps against 4.6 s), whence the loop for other
    operators. In both, the breakdown restart vector is built only under ``lax.cond(broke, ...)`` (both
    branches run under ``vmap``); built at every step it was most of the cost on a 670k-parameter MLP
    (10 steps: 0.84 s -> 0.18 s, 111 -> 24 gradients).

    Args:
      matvec: ``v -> A v``, on flat vectors if ``dim_or_example`` is an int, else on pytrees shaped like it.
      dim_or_example: the dimension ``n`` (flat vectors) or an example pytree (its values are ignored).
      num_steps: number of Lanczos steps ``k`` (static).
      key: PRNG key for the random start vector (unused when ``v0`` is given).
      v0: optional start vector (flat or pytree, like the operator's input); must be non-zero.
      return_vectors: also return the Ritz vectors.
      dtype: dtype of flat vectors when ``dim_or_example`` is an int (default: JAX's default float).
      breakdown_tol: relative breakdown threshold (default ``100 * eps`` of the dtype).
      unroll: unroll the steps (``True``) or loop (``False``); default: unroll iff the backend is CPU and
        the jaxpr of ``matvec`` has a convolution (one extra trace of ``matvec``). Same values to round-off.
      linearize: apply ``matvec`` through its linearisation at 0 (``jax.linearize``; ``matvec`` must be linear
        and differentiable, as every Hessian-vector product is): the work that does not depend on the vector
        is done once, before the iteration. ``False`` calls ``matvec`` as given at every step.
      return_tridiagonal: return ``(alphas, betas)`` of ``T`` instead (diagonal ``(k,)``, off-diagonal
        ``(k - 1,)``), for quadrature (:func:`slq_nodes_weights`).

    Returns:
      ``ritz_values`` of shape ``(k,)`` in ascending order; with ``return_vectors`` a tuple
      ``(ritz_values, ritz_vectors)`` where ``ritz_vectors`` has a leading axis of size ``k`` (rows of a
      ``(k, n)`` array, or a pytree whose leaves are stacked along a new axis 0), unit norm, in the order of
      ``ritz_values``.

    Paper: used for ``lambda_max`` of the Riemannian Hessian (claim C13) and the smoothness constants of
    the unit-set assumption (A1). JAX-NOTES: power iteration gives the wrong end at initialisation.
    """
    if isinstance(dim_or_example, (int, np.integer)):
        n = int(dim_or_example)
        dt = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
        unravel = None
        mv = matvec
    else:
        flat_example, unravel = ravel_pytree(dim_or_example)
        n = flat_example.shape[0]
        dt = flat_example.dtype

        def mv(x):
            return ravel_pytree(matvec(unravel(x)))[0]

    if n < 1:
        raise ValueError("lanczos needs a non-empty operator")
    k = max(1, min(int(num_steps), n))
    eps = jnp.finfo(dt).eps
    tol = 100.0 * eps if breakdown_tol is None else breakdown_tol

    if v0 is None:
        q0 = jax.random.normal(key, (n,), dt)
    elif unravel is None:
        q0 = jnp.asarray(v0, dt).reshape(n)
    else:
        q0 = ravel_pytree(v0)[0].astype(dt)
    q0 = q0 / jnp.linalg.norm(q0)

    def restart(Q):
        # The coordinate vector e_i least represented in span(Q). Its component outside span(Q) has squared
        # norm 1 - sum_r Q[r, i]^2 >= 1 - (j + 1) / n > 0 (the column sums of Q*Q add up to j + 1), so it
        # never degenerates, and no random numbers are drawn inside the iteration.
        r = jax.nn.one_hot(jnp.argmin(jnp.sum(Q * Q, axis=0)), n, dtype=dt)
        r = _reorthogonalize(Q, r)
        return r / jnp.linalg.norm(r)

    def step(j, state, alpha_only=False):
        # Step j (a static or a traced index); alpha_only: stop after alpha_j.
        Q, alphas, betas, anorm = state
        row = lambda i: jax.lax.dynamic_index_in_dim(Q, i, keepdims=False)  # noqa: E731
        q = row(j)
        w = mv(q).astype(dt)
        alpha = jnp.vdot(q, w)
        alphas = alphas.at[j].set(alpha)
        if alpha_only:
            return Q, alphas, betas, anorm
        beta_prev = jnp.where(j > 0, betas[j - 1], 0.0).astype(dt)
        q_prev = jnp.where(j > 0, row(jnp.maximum(j - 1, 0)), jnp.zeros_like(q))
        w = w - alpha * q - beta_prev * q_prev
        w, beta = _reorthogonalize_dgks(Q, w)  # rows j+1.. of Q are still zero
        anorm = jnp.maximum(anorm, jnp.abs(alpha) + beta + beta_prev)
        broke = beta <= tol * anorm
        safe = jnp.where(broke, jnp.ones_like(beta), beta)
        q_next = jax.lax.cond(broke, restart, lambda _: w / safe, Q)  # restart built only on breakdown
        beta = jnp.where(broke, jnp.zeros_like(beta), beta)
        # dynamic_update_index_in_dim, not Q.at[j + 1].set: the scatter's out-of-bounds semantics became a
        # select over the whole of Q, one more pass over (k + 1) n numbers per step (most of the iteration's
        # own cost on the mlp).
        Q = jax.lax.dynamic_update_index_in_dim(Q, q_next, j + 1, 0)
        return Q, alphas, betas.at[j].set(beta), anorm

    if linearize:
        # The operator is linear in v: its linearisation at 0 *is* the operator, and partial evaluation moves
        # everything that does not depend on v (for an HVP: the forward pass and the gradient at the point)
        # out of the iteration, so each step pays for the tangent computation only.
        mv = jax.linearize(mv, jnp.zeros((n,), dt))[1]
    # Q has a spare zero row k so the write of q_{j+1} at the last step of the loop stays in bounds.
    Q = jnp.zeros((k + 1, n), dt).at[0].set(q0)
    state = (Q, jnp.zeros((k,), dt), jnp.zeros((k,), dt), jnp.zeros((), dt))
    if unroll is None:
        unroll = jax.default_backend() == "cpu" and _contains_convolution(mv, n, dt)
    if unroll:
        for j in range(k):  # beta_{k-1} and q_k enter neither T nor the Ritz vectors: not computed
            state = step(j, state, alpha_only=j == k - 1)
    else:
        state = jax.lax.fori_loop(0, k, step, state)
    Q, alphas, betas, _ = state
    off = betas[: k - 1]
    if return_tridiagonal:
        return alphas, off
    T = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    if not return_vectors:
        return jnp.linalg.eigvalsh(T)
    evals, S = jnp.linalg.eigh(T)
    Y = S.T @ Q[:k]  # (k, n): row i is the Ritz vector of evals[i]
    Y = Y / jnp.linalg.norm(Y, axis=1, keepdims=True)
    if unravel is not None:
        Y = jax.vmap(unravel)(Y)
    return evals, Y


def _flat_operator(matvec: Callable, dim_or_example, dtype=None):
    """``(n, dtype, flat matvec)`` of an operator on flat vectors or on pytrees like ``dim_or_example``."""
    if isinstance(dim_or_example, (int, np.integer)):
        dt = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
        return int(dim_or_example), dt, matvec
    flat, unravel = ravel_pytree(dim_or_example)
    return flat.shape[0], flat.dtype, lambda x: ravel_pytree(matvec(unravel(x)))[0]


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Independent +-1 entries, 32 per random 32-bit word (``jax.random.rademacher`` draws one word per
    entry; on the CPU that was most of a Hutchinson estimate's time: 20 probes of 670k entries, 0.2 s)."""
    size = int(np.prod(shape))
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(-1)[:size].astype(dtype) - 1).reshape(shape)


def hutchinson_trace(matvec: Callable, dim_or_example, num_samples: int, key: jax.Array, *, dtype: Any = None,
                     chunk: int | None = None):
    """Hutchinson's estimate of ``tr(A)``: the mean of ``z^T A z`` over Rademacher vectors ``z``.

    Math: ``E[z^T A z] = tr(A)`` for ``z`` with independent +-1 entries; the standard error of the mean of
    ``m`` samples is ``std(z^T A z) / sqrt(m)`` (``Var = 2 (||A||_F^2 - sum_i A_ii^2)``).

    The operator is linearised once (as in :func:`lanczos`) and applied to ``chunk`` probes at a time by
    ``vmap`` (default: all of them), so the vector-independent work (an HVP's forward pass and gradient) is
    done once and the probes share every batched product.

    Args:
      matvec, dim_or_example, dtype: as :func:`lanczos` (a linear, differentiable operator).
      num_samples: number of probes ``m``.
      key: PRNG key of the probes.
      chunk: probes per batched application; default 5 (fastest of 1, 5, 20 on the mlp at batch 128), 1 on
        the CPU backend when the operator has a convolution (one probe after the other, unrolled, as
        :func:`lanczos` does: batched convolutions of the tangents were slower than one HVP per probe).

    Returns:
      ``(estimate, stderr, samples)``: the mean, its standard error, and the ``(m,)`` values ``z^T A z``.
    """
    n, dt, mv = _flat_operator(matvec, dim_or_example, dtype)
    lin = jax.linearize(mv, jnp.zeros((n,), dt))[1]
    z = rademacher(key, (num_samples, n), dt)
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" and _contains_convolution(mv, n, dt) else 5
    chunk = max(1, min(int(chunk), num_samples))
    parts = [jnp.sum(zc * jax.vmap(lin)(zc), axis=1) for zc in jnp.split(z, list(range(chunk, num_samples, chunk)))]
    samples = jnp.concatenate(parts)
    stderr = jnp.std(samples, ddof=1) / jnp.sqrt(num_samples) if num_samples > 1 else jnp.asarray(jnp.nan, dt)
    return jnp.mean(samples), stderr, samples


def slq_nodes_weights(matvec: Callable, dim_or_example, num_steps: int, num_runs: int, key: jax.Array, *,
                      dtype: Any = None, unroll: bool | None = None):
    """Stochastic Lanczos quadrature of the spectral density of ``A`` (Ubaru, Chen & Saad 2017; PyHessian's
    ``density``): nodes and weights of ``num_runs`` Gauss quadratures.

    Math: for a Rademacher start ``v`` (normalised), ``k`` Lanczos steps give ``T = S diag(theta) S^T``; the
    spectral measure ``v^T delta(A - t) v`` is approximated by ``sum_i S_0i^2 delta(theta_i - t)``, and the
    density by the mean over runs. :func:`spectral_density` smooths it on a grid.

    Args:
      matvec, dim_or_example, dtype, unroll: as :func:`lanczos`.
      num_steps: Lanczos steps per run ``k``; num_runs: independent start vectors (run one after the other).
      key: PRNG key of the start vectors.

    Returns:
      ``(nodes, weights)``, each ``(num_runs, k)``; every row of ``weights`` sums to 1.
    """
    n, dt, mv = _flat_operator(matvec, dim_or_example, dtype)
    v0 = rademacher(key, (num_runs, n), dt)

    def one(v):
        alphas, off = lanczos(mv, n, num_steps, key, v0=v, dtype=dt, unroll=unroll, return_tridiagonal=True)
        T = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
        theta, S = jnp.linalg.eigh(T)
        return theta, S[0] ** 2

    # One run after the other, not vmap: under vmap the breakdown and DGKS branches of lanczos (lax.cond on a
    # batched predicate) would both run at every step.
    runs = [one(v0[r]) for r in range(num_runs)]
    return jnp.stack([a for a, _ in runs]), jnp.stack([b for _, b in runs])


def spectral_density(nodes, weights, grid, sigma: float):
    """The SLQ density on ``grid``: ``mean_runs sum_i w_i N(t; theta_i, sigma^2)`` (numpy arrays in and out)."""
    nodes, weights, grid = (np.asarray(a, np.float64) for a in (nodes, weights, grid))
    g = np.exp(-0.5 * ((grid[None, None, :] - nodes[..., None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    return np.mean(np.sum(weights[..., None] * g, axis=1), axis=0)


def top_eigenvalue(matvec: Callable, dim_or_example, num_steps: int, key: jax.Array, **kwargs) -> jax.Array:
    """Largest algebraic eigenvalue of a symmetric operator by :func:`lanczos` (largest Ritz value).

    Args/Returns: as :func:`lanczos`; returns a scalar. Paper: ``lambda_max`` of claim C13.
    """
    return lanczos(matvec, dim_or_example, num_steps, key, **kwargs)[-1]


def extreme_eigenvalues(matvec: Callable, dim_or_example, num_steps: int, key: jax.Array, **kwargs):
    """Smallest and largest algebraic eigenvalues of a symmetric operator by one :func:`lanczos` run.

    Args/Returns: as :func:`lanczos`; returns ``(lambda_min, lambda_max)``; the spectral norm is
    ``max(|lambda_min|, |lambda_max|)``.
    """
    ritz = lanczos(matvec, dim_or_example, num_steps, key, **kwargs)
    return ritz[0], ritz[-1]


def hessian_extreme_eigenvalues(loss, params, num_steps: int, key: jax.Array, labels=None):
    """``(lambda_min, lambda_max)`` of the Hessian at ``params``, or of ``P H P`` when ``labels`` is given.

    Math: Lanczos on ``v -> H v`` (or ``v -> P H P v``, see :func:`projected_hvp`).

    Args:
      loss, params: as :func:`hvp`.
      num_steps, key: as :func:`lanczos`.
      labels: optional label tree; if given the tangent-projected Hessian is used.

    Returns:
      ``(lambda_min, lambda_max)``. Paper: claim C13 (``2 / lambda_max`` of the Riemannian Hessian).
    """
    if labels is None:
        mv = lambda v: hvp(loss, params, v)  # noqa: E731
    else:
        mv = lambda v: projected_hvp(loss, params, labels, v)  # noqa: E731
    return extreme_eigenvalues(mv, params, num_steps, key)


# ---------------------------------------------------------------------------------------------------------
# Groups, projector on the tangent space of the product of spheres
# ---------------------------------------------------------------------------------------------------------


def _flat_with_labels(params, labels):
    leaves, treedef = jax.tree.flatten(params)
    labs = treedef.flatten_up_to(labels)
    for lab in labs:
        if not isinstance(lab, Label):
            raise TypeError(f"label tree leaves must be rate_tuning.groups.Label, got {lab!r}")
    per_channel = {}
    for leaf, lab in zip(leaves, labs):
        if lab.kind != "si":
            continue
        if lab.per_channel and len(leaf.shape) < 1:
            raise ValueError(f"per-channel group {lab.group!r} needs leaves with a channel axis")
        if per_channel.setdefault(lab.group, lab.per_channel) != lab.per_channel:
            raise ValueError(f"group {lab.group!r} mixes per_channel=True and per_channel=False leaves")
    return leaves, labs, treedef


def _group_reduce(a_leaves, b_leaves, labs):
    """Per SI group ``<a_i, b_i>``: a scalar per group, or a ``(C,)`` vector for a per-channel group."""
    out: dict[str, jax.Array] = {}
    for a, b, lab in zip(a_leaves, b_leaves, labs):
        if lab.kind != "si":
            continue
        prod = a * b
        s = jnp.sum(prod, axis=tuple(range(prod.ndim - 1))) if lab.per_channel else jnp.sum(prod)
        out[lab.group] = s if lab.group not in out else out[lab.group] + s
    return out


def tangent_projector(params: PyTree, labels: PyTree) -> Callable[[PyTree], PyTree]:
    """Orthogonal projector on the tangent space of the product of spheres through ``params``.

    Math: block diagonal ``P = diag(P_1, .., P_m, I_g, 0_frozen)`` with ``P_i = I - w_i w_i^T / ||w_i||^2``
    for each SI group ``w_i`` (the leaves that share ``Label.group``, concatenated; with
    ``per_channel=True`` every index along the last axis is its own group), the identity on ``'variant'``
    leaves and zero on ``'frozen'`` leaves. Every SI group must be non-zero.

    Args:
      params: the point (defines the ``w_i``).
      labels: label tree with the structure of ``params`` (leaves :class:`rate_tuning.groups.Label`).

    Returns:
      ``v -> P v`` on pytrees shaped like ``params``.

    Paper: the intrinsic domain ``{||w_i|| = 1}`` of Sec. 2.4 (claim C13).
    """
    w_leaves, labs, treedef = _flat_with_labels(params, labels)
    sq = _group_reduce(w_leaves, w_leaves, labs)

    def project(v):
        v_leaves = treedef.flatten_up_to(v)
        dots = _group_reduce(w_leaves, v_leaves, labs)
        out = []
        for w, x, lab in zip(w_leaves, v_leaves, labs):
            if lab.kind == "frozen":
                out.append(jnp.zeros_like(x))
            elif lab.kind == "variant":
                out.append(x)
            else:
                coef = dots[lab.group] / sq[lab.group]  # scalar, or (C,) broadcast on the last axis
                out.append(x - w * coef.astype(w.dtype))
        return jax.tree.unflatten(treedef, out)

    return project


def projected_hvp(loss: Callable, params: PyTree, labels: PyTree, v: PyTree) -> PyTree:
    """Tangent-projected Hessian-vector product ``P H P v`` (Riemannian Hessian on the product of spheres).

    Math: ``P`` from :func:`tangent_projector`. For a loss whose SI groups are scale-invariant,
    ``<grad_{w_i} L, w_i> = 0`` everywhere, so the Weingarten term ``-(<grad, w_i>/||w_i||^2) P_i`` of the
    Riemannian Hessian vanishes and ``P H P`` *is* the Riemannian Hessian of the restriction to the
    spheres through ``params`` (at any point, a fortiori at a critical point). The radial directions
    ``w_i`` are in its kernel (eigenvalue 0), as are frozen leaves.

    Args:
      loss: scalar function of the params pytree.
      params: the point.
      labels: label tree of ``params``.
      v: tangent or ambient direction, a pytree like ``params``.

    Returns:
      ``P H P v`` as a pytree like ``params``.

    Paper: claim C13 (limiting effective LR ``<= 2 / lambda_max`` of the Riemannian Hessian).
    """
    P = tangent_projector(params, labels)
    return P(hvp(loss, params, P(v)))


def unit_normalize(params: PyTree, labels: PyTree) -> PyTree:
    """Rescale every SI group to unit norm (per channel where labelled); other leaves unchanged.

    Math: ``w_i -> w_i / ||w_i||``, i.e. the normalised point ``(V; g)`` of Sec. 2.4.

    Args:
      params: a point with non-zero SI groups.
      labels: its label tree.

    Returns:
      The normalised params.
    """
    leaves, labs, treedef = _flat_with_labels(params, labels)
    sq = _group_reduce(leaves, leaves, labs)
    out = [
        leaf / jnp.sqrt(sq[lab.group]).astype(leaf.dtype) if lab.kind == "si" else leaf
        for leaf, lab in zip(leaves, labs)
    ]
    return jax.tree.unflatten(treedef, out)


def si_group_masks(params: PyTree, labels: PyTree):
    """Indicator pytrees of the individual SI groups and of the scale-variant part.

    Args:
      params: a point, or a pytree of ``jax.ShapeDtypeStruct`` (only shapes and dtypes are used).
      labels: its label tree.

    Returns:
      ``(names, w_masks, g_mask)``: ``names[i]`` is the group name (``'name[c]'`` for channel ``c`` of a
      per-channel group), in the order of first appearance among the flattened leaves; ``w_masks[i]`` a
      0/1 pytree of numpy arrays selecting group ``i``; ``g_mask`` selects every ``'variant'`` leaf.
      Frozen leaves are in no mask.
    """
    leaves, labs, treedef = _flat_with_labels(params, labels)
    shapes = [(tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves]
    groups: dict[str, tuple[bool, int]] = {}
    for (shape, _), lab in zip(shapes, labs):
        if lab.kind == "si":
            ch = shape[-1] if lab.per_channel else 1
            if lab.group in groups and groups[lab.group][1] != ch:
                raise ValueError(f"per-channel group {lab.group!r} has leaves with different channel counts")
            groups[lab.group] = (lab.per_channel, ch)
    names, masks = [], []
    for name, (pc, ch) in groups.items():
        for c in range(ch):
            m = []
            for (shape, dt), lab in zip(shapes, labs):
                x = np.zeros(shape, dt)
                if lab.kind == "si" and lab.group == name:
                    if pc:
                        x[..., c] = 1
                    else:
                        x[...] = 1
                m.append(x)
            names.append(f"{name}[{c}]" if pc else name)
            masks.append(jax.tree.unflatten(treedef, m))
    g_mask = jax.tree.unflatten(
        treedef, [np.full(shape, lab.kind == "variant", dt) for (shape, dt), lab in zip(shapes, labs)]
    )
    return names, masks, g_mask


# ---------------------------------------------------------------------------------------------------------
# Smoothness constants on the unit set (A1)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothnessConstants:
    """Estimated Hessian-block bounds of the smoothness assumption on the unit set (A1).

    Attributes:
      L_ww: ``(m, m)`` array, ``max over points of ||H_{w_i w_j}||_2`` (symmetric).
      L_gw: ``(m,)`` array, ``max over points of ||H_{g w_i}||_2``.
      L_gg: ``max over points of ||H_{gg}||_2``.
      L_ww_max: ``max_{ij} L_ww[i, j]``.
      groups: the SI group names, in the order of the rows of ``L_ww``.
      num_points: number of sampled points.
      sampling: how the points were drawn.
      dtype: dtype of the computation.
      lanczos_steps: Lanczos steps per block.
      per_point: the same blocks at every point (``'L_ww'`` ``(P, m, m)``, ``'L_gw'`` ``(P, m)``,
        ``'L_gg'`` ``(P,)``).
    """

    L_ww: np.ndarray
    L_gw: np.ndarray
    L_gg: float
    L_ww_max: float
    groups: tuple[str, ...]
    num_points: int
    sampling: str
    dtype: str
    lanczos_steps: int
    per_point: dict


def smoothness_constants(
    loss: Callable[[PyTree], jax.Array],
    params_sampler: Callable[[jax.Array], PyTree],
    labels: PyTree,
    num_points: int,
    key: jax.Array,
    lanczos_steps: int = 30,
) -> SmoothnessConstants:
    """Estimate ``L^{ww}_{ij}``, ``L^{gw}_i``, ``L^{gg}`` by maximising Hessian-block norms over the unit set.

    Math: at each point ``theta_p = unit_normalize(params_sampler(fold_in(key, p)), labels)`` (every SI
    group rescaled to unit norm, ``g`` as drawn) and with ``M_i``, ``M_g`` the 0/1 masks of group ``i`` and
    of the scale-variant part (:func:`si_group_masks`):

    * diagonal blocks ``||H_{w_i w_i}||`` and ``||H_gg||``: ``max(|lambda_min|, |lambda_max|)`` of
      ``v -> M H M v`` (Lanczos, both ends);
    * off-diagonal blocks ``||H_{w_i w_j}||`` (and ``||H_{g w_i}||`` with ``M_g``): ``lambda_max`` of the
      Jordan-Wielandt operator ``v -> M_i H M_j v + M_j H M_i v`` (Lanczos, both ends). On
      ``span(i) + span(j)`` it is ``[[0, H_ij], [H_ji, 0]]``, whose eigenvalues are ``+-sigma_k(H_ij)``, so
      its top eigenvalue is ``||H_ij||_2 = sqrt(lambda_max(H_ji H_ij))`` without squaring the condition
      number; one batched pair of masked HVPs per step, and one vmapped Lanczos serves every block.

    The result is a max over sampled points, hence a lower estimate of the supremum in A1 (exact when the
    block norm does not depend on the point, e.g. a quadratic ``g``-part).

    Args:
      loss: scalar function of the params pytree (the full objective).
      params_sampler: ``key -> params`` (e.g. ``Problem.init``); SI groups must be non-zero.
      labels: label tree of the params.
      num_points: number of sampled points ``P``.
      key: PRNG key; point ``p`` uses ``fold_in(key, p)``, Lanczos uses ``fold_in(key, P + p)``.
      lanczos_steps: Lanczos steps per block (clipped to the dimension).

    Returns:
      A :class:`SmoothnessConstants` record (values, number of points, sampling, dtype).

    Paper: smoothness assumption on the unit set (A1; constants named ``L^{gg}``, ``L^{gw}_i``,
    ``L^{ww}_{ij}`` from recollection), used by the proof chain I2-I4 and claims C14, C15.
    """
    if num_points < 1:
        raise ValueError("smoothness_constants needs num_points >= 1")
    example = jax.eval_shape(params_sampler, key)
    names, w_masks, g_mask = si_group_masks(example, labels)
    m = len(names)
    has_g = any(bool(np.any(leaf > 0)) for leaf in jax.tree.leaves(g_mask))
    dtype = jnp.result_type(*[leaf.dtype for leaf in jax.tree.leaves(example)])
    # Blocks as data, so one vmapped Lanczos serves all of them (one compilation whatever m is).
    # Order: diagonal blocks w_0..w_{m-1}, g; then pairs (w_i, w_j), i < j; then (g, w_i).
    blocks = [(a, a) for a in range(m)] + ([(m, m)] if has_g else [])
    blocks += [(i, j) for i in range(m) for j in range(i + 1, m)]
    blocks += [(m, i) for i in range(m)] if has_g else []
    if not blocks:
        raise ValueError("the label tree has neither 'si' nor 'variant' leaves")
    all_masks = w_masks + [g_mask]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    np_stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)  # noqa: E731
    left = np_stack([all_masks[a] for a, _ in blocks])
    right = np_stack([all_masks[b] for _, b in blocks])
    is_diag = jnp.asarray([a == b for a, b in blocks])
    mul = lambda a, b: jax.tree.map(jnp.multiply, a, b)  # noqa: E731

    def at_point(pkey, lkey):
        params = unit_normalize(params_sampler(pkey), labels)
        flat, unravel = ravel_pytree(params)
        H2 = jax.vmap(lambda v: hvp(loss, params, v))  # two HVPs in one batched call

        def block_norm(ma, mb, diag, k):
            # S v = M_a H M_b v + M_b H M_a v: 2 M_a H M_a on a diagonal block; for disjoint a, b the
            # Jordan-Wielandt matrix [[0, H_ab], [H_ba, 0]] whose eigenvalues are +-singular values of H_ab.
            def op(v):
                hv = H2(stack([mul(mb, v), mul(ma, v)]))
                return jax.tree.map(lambda x, y, h: x * h[0] + y * h[1], ma, mb, hv)

            v0 = mul(jax.tree.map(jnp.add, ma, mb), unravel(jax.random.normal(k, flat.shape, flat.dtype)))
            ritz = lanczos(op, params, lanczos_steps, k, v0=v0)
            top = jnp.maximum(jnp.abs(ritz[0]), jnp.abs(ritz[-1]))
            return jnp.where(diag, 0.5 * top, top)

        vals = jax.vmap(block_norm)(left, right, is_diag, jax.random.split(lkey, len(blocks)))
        Lww = jnp.zeros((m, m), dtype)
        for c, (a, b) in enumerate(blocks):
            if a < m and b < m:
                Lww = Lww.at[a, b].set(vals[c]).at[b, a].set(vals[c])
        Lgw = jnp.stack([vals[blocks.index((m, i))] for i in range(m)]) if has_g and m else jnp.zeros((m,), dtype)
        Lgg = vals[blocks.index((m, m))] if has_g else jnp.zeros((), dtype)
        return Lww, Lgw, Lgg

    pkeys = jnp.stack([jax.random.fold_in(key, p) for p in range(num_points)])
    lkeys = jnp.stack([jax.random.fold_in(key, num_points + p) for p in range(num_points)])
    at_point = jax.jit(at_point)  # compiled once, run at every point
    outs = [jax.device_get(at_point(pkeys[p], lkeys[p])) for p in range(num_points)]
    Lww, Lgw, Lgg = (np.stack(x) for x in zip(*outs))
    L_ww = Lww.max(axis=0)
    return SmoothnessConstants(
        L_ww=L_ww,
        L_gw=Lgw.max(axis=0),
        L_gg=float(Lgg.max()),
        L_ww_max=float(L_ww.max()) if m else 0.0,
        groups=tuple(names),
        num_points=int(num_points),
        sampling=(
            f"{num_points} points theta_p = unit_normalize(params_sampler(fold_in(key, p))), p < {num_points}: "
            "every SI group rescaled to unit norm (per channel where labelled), scale-variant g as drawn by "
            "the sampler; max over points of Lanczos block norms (a lower estimate of the sup over the unit set)"
        ),
        dtype=str(jnp.dtype(dtype)),
        lanczos_steps=int(lanczos_steps),
        per_point={"L_ww": Lww, "L_gw": Lgw, "L_gg": Lgg},
    )
