"""Synthetic problems with known structure: scale-invariant losses and non-invariant controls.

Each constructor returns a frozen :class:`Problem`. Fixed data (matrices, design matrices, targets) is
drawn once with ``numpy.random.default_rng(seed)`` in float64 and cast, inside the loss, to the dtype of
the params it is called with: the same problem runs in float32 (training) and float64 (checks), and
building a problem creates no JAX array. ``init(key, scale=1.0, dtype=None)`` draws params whose SI
groups have norm ``scale`` (uniform direction); ``dtype=None`` is JAX's default float (float64 inside
``jax.enable_x64(True)``).

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019.
Definition 2.1 (scale invariance) is what ``Problem.scale_invariant`` asserts; the controls break one
hypothesis each (epsilon-BN, no normalisation, weight decay) and serve as negative controls of the claims
(C1-C8, C19).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rate_tuning.groups import VARIANT_LABEL, si

__all__ = [
    "Problem",
    "rayleigh_quotient",
    "sphere_function",
    "noisy_sphere_function",
    "bn_linear_regression",
    "bn_logistic_regression",
    "multi_group",
    "epsilon_bn",
    "no_normalisation",
    "weight_decay",
    "batch_norm_exact",
    "default_problems",
]

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A synthetic objective with labelled parameters and, where known, closed forms.

    Attributes:
      name: short identifier.
      loss: ``params -> scalar``, the full objective ``L = E_z F_z``.
      init: ``(key, scale=1.0, dtype=None) -> params``; every SI group has norm ``scale``.
      labels: label tree (leaves :class:`rate_tuning.groups.Label`) with the structure of the params.
      scale_invariant: whether every ``'si'`` label is truly scale-invariant (Definition 2.1); ``False``
        for the controls.
      description: one line; for a control, the hypothesis it breaks.
      stochastic_loss: optional ``(params, key) -> scalar`` ``F_z`` with ``E_key F_z = loss`` exactly.
      grad_closed_form: optional ``params -> grad pytree`` (an independent derivation, not autodiff).
      hessian_closed_form: optional ``params -> (n, n)`` Hessian on ``ravel_pytree(params)`` order.
      spectrum_on_sphere: optional ``k -> ascending array``: spectrum of the Riemannian Hessian
        ``P H P`` at the ``k``-th stationary point on the unit sphere, radial 0 included.
      constants: read-only mapping of problem data and known constants (documented per constructor).

    Equality and hashing are by identity, so a problem can be a static argument of ``jax.jit``.
    """

    name: str
    loss: Callable[[PyTree], jax.Array]
    init: Callable[..., PyTree]
    labels: PyTree
    scale_invariant: bool
    description: str
    stochastic_loss: Callable[[PyTree, jax.Array], jax.Array] | None = None
    grad_closed_form: Callable[[PyTree], PyTree] | None = None
    hessian_closed_form: Callable[[PyTree], jax.Array] | None = None
    spectrum_on_sphere: Callable[[int], np.ndarray] | None = None
    constants: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype


def _as(x: np.ndarray, like: jax.Array) -> jax.Array:
    """Cast fixed float64 problem data to the dtype of ``like``."""
    return jnp.asarray(x, dtype=like.dtype)


def _direction(key, shape, dtype, scale) -> jax.Array:
    x = jax.random.normal(key, shape, dtype)
    return jnp.asarray(scale, dtype) * x / jnp.linalg.norm(x)


def _one_group_init(dim: int):
    """``init(key, scale=1.0, dtype=None) -> {'w': (dim,)}``: a uniform direction of norm ``scale``."""
    def init(key, scale=1.0, dtype=None):
        return {"w": _direction(key, (dim,), _dtype(dtype), scale)}

    return init


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _symmetric_with_spectrum(rng, eigenvalues) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(eigenvalues, np.float64)
    U = _random_orthogonal(rng, lam.shape[0])
    A = (U * lam) @ U.T
    return 0.5 * (A + A.T), U


def _frozen(d: Mapping) -> Mapping:
    return types.MappingProxyType(dict(d))


def batch_norm_exact(x: jax.Array, epsilon: float = 0.0) -> jax.Array:
    """Train-mode batch normalisation over the last axis, two-pass biased variance, no affine part.

    Math: ``(x - mu) / sqrt(sigma^2 + epsilon)`` with ``mu = mean(x)``, ``sigma^2 = mean((x - mu)^2)``.
    With ``epsilon = 0`` it is exactly invariant under ``x -> c x``, ``c > 0`` (paper eq. (1)).

    Args:
      x: pre-activations, batch along the last axis.
      epsilon: variance offset (0: exact BN; > 0: the standard epsilon-BN, not scale-invariant).

    Returns:
      The normalised array, same shape.
    """
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc / jnp.sqrt(var + epsilon) if epsilon else xc / jnp.sqrt(var)


def _sphere_f_parts(A, b, u):
    """``f(u) = u^T A u + 0.5 sin(b^T u)``: value, gradient ``G`` and Hessian ``M`` at ``u``."""
    s = b @ u
    val = u @ (A @ u) + 0.5 * jnp.sin(s)
    G = 2.0 * (A @ u) + 0.5 * jnp.cos(s) * b
    M = 2.0 * A - 0.5 * jnp.sin(s) * jnp.outer(b, b)
    return val, G, M


def _composite_grad_hess(G, M, w):
    """Gradient and Hessian of ``w -> f(w / ||w||)`` from ``G = grad f(u)``, ``M = hess f(u)``.

    Math (``r = ||w||``, ``u = w / r``, ``P = I - u u^T``):
    ``grad = P G / r``;  ``H = (P M P - (u.G) P - (P G) u^T - u (P G)^T) / r^2``.
    """
    r = jnp.linalg.norm(w)
    u = w / r
    P = jnp.eye(w.shape[0], dtype=w.dtype) - jnp.outer(u, u)
    PG = P @ G
    H = (P @ M @ P - (u @ G) * P - jnp.outer(PG, u) - jnp.outer(u, PG)) / r**2
    return PG / r, H


# ---------------------------------------------------------------------------------------------------------
# scale-invariant problems
# ---------------------------------------------------------------------------------------------------------


def rayleigh_quotient(dim: int = 8, seed: int = 0, eigenvalues: Sequence[float] | None = None) -> Problem:
    """Rayleigh quotient ``L(w) = w^T A w / w^T w`` with a fixed symmetric ``A`` of known spectrum.

    Math: ``A = U diag(lambda) U^T`` (``U`` Haar-orthogonal from ``seed``; default ``lambda`` evenly spaced
    in ``[-1, 2]``, well separated). Closed forms with ``n = w^T w``:
    ``grad = 2 (A w - L w) / n``;  ``H = (2/n) (A - L I) - (2/n) (w grad^T + grad w^T)``.
    At any unit ``w``, ``H = 2 D (A - L I) D`` with the reflection ``D = I - 2 w w^T`` (expand, using
    ``w^T (A - L I) w = 0`` and ``(A - L I) w = grad / 2``), so the spectrum of ``H`` is
    ``{2 (lambda_j - L(w))}`` and ``sup_{||w|| = 1} ||H|| = 2 (lambda_max - lambda_min)`` (attained at the
    extreme eigenvectors): the exact ``L_ww`` of the unit-set smoothness assumption.
    Stationary points are the eigenvectors ``v_k``; there ``H = 2 (A - lambda_k I)`` on the unit sphere and
    the Riemannian Hessian ``P H P`` has spectrum ``{2 (lambda_j - lambda_k)}_{j != k}`` plus the radial 0.

    Args:
      dim: dimension ``d``.
      seed: seed of ``U``.
      eigenvalues: optional spectrum of ``A`` (length ``dim``, sorted ascending by this function).

    Returns:
      A :class:`Problem` with params ``{'w': (d,)}``. ``constants``: ``A``, ``eigenvalues`` (ascending),
      ``eigenvectors`` (columns), ``stationary_point(k, scale=1.0, dtype=None)``,
      ``hessian_eigenvalues_on_sphere(params)`` (``2 (lambda - L(w))``, the Hessian spectrum at
      ``w / ||w||``), ``L_ww`` (``2 (lambda_max - lambda_min)``).

    Paper: Definition 2.1; Riemannian Hessian at a limit point (claim C13).
    """
    rng = np.random.default_rng(seed)
    lam = np.sort(np.linspace(-1.0, 2.0, dim) if eigenvalues is None else np.asarray(eigenvalues, np.float64))
    if lam.shape != (dim,):
        raise ValueError(f"need {dim} eigenvalues, got shape {lam.shape}")
    A, U = _symmetric_with_spectrum(rng, lam)

    def loss(p):
        w = p["w"]
        return w @ (_as(A, w) @ w) / (w @ w)

    def grad(p):
        w = p["w"]
        Aw = _as(A, w) @ w
        n = w @ w
        return {"w": 2.0 * (Aw - (w @ Aw / n) * w) / n}

    def hessian(p):
        w = p["w"]
        A_ = _as(A, w)
        n = w @ w
        L = w @ (A_ @ w) / n
        g = grad(p)["w"]
        return (2.0 / n) * (A_ - L * jnp.eye(dim, dtype=w.dtype)) - (2.0 / n) * (jnp.outer(w, g) + jnp.outer(g, w))

    def spectrum(k: int) -> np.ndarray:
        others = 2.0 * (np.delete(lam, k) - lam[k])
        return np.sort(np.concatenate([others, [0.0]]))

    def stationary_point(k: int, scale: float = 1.0, dtype=None):
        return {"w": jnp.asarray(scale * U[:, k], _dtype(dtype))}

    def hessian_eigenvalues_on_sphere(p):
        return 2.0 * (_as(lam, p["w"]) - loss(p))

    return Problem(
        name=f"rayleigh_quotient(d={dim})",
        loss=loss,
        init=_one_group_init(dim),
        labels={"w": si("w")},
        scale_invariant=True,
        description="Rayleigh quotient w^T A w / w^T w: scale-invariant, stationary points are eigenvectors of A",
        grad_closed_form=grad,
        hessian_closed_form=hessian,
        spectrum_on_sphere=spectrum,
        constants=_frozen(
            {
                "A": A,
                "eigenvalues": lam,
                "eigenvectors": U,
                "stationary_point": stationary_point,
                "hessian_eigenvalues_on_sphere": hessian_eigenvalues_on_sphere,
                "L_ww": float(2.0 * (lam.max() - lam.min())),
            }
        ),
    )


def _sphere_data(dim, seed):
    rng = np.random.default_rng(seed)
    A, _ = _symmetric_with_spectrum(rng, np.linspace(-1.0, 1.0, dim))
    b = rng.standard_normal(dim)
    return A, b


def _sphere_grad_hess(A, b):
    def grad(p):
        w = p["w"]
        _, G, M = _sphere_f_parts(_as(A, w), _as(b, w), w / jnp.linalg.norm(w))
        return {"w": _composite_grad_hess(G, M, w)[0]}

    def hessian(p):
        w = p["w"]
        _, G, M = _sphere_f_parts(_as(A, w), _as(b, w), w / jnp.linalg.norm(w))
        return _composite_grad_hess(G, M, w)[1]

    return grad, hessian


def sphere_function(dim: int = 20, seed: int = 0) -> Problem:
    """Non-convex function of the direction: ``L(w) = f(w / ||w||)``, ``f(u) = u^T A u + 0.5 sin(b^T u)``.

    Math: ``A`` symmetric with spectrum evenly spaced in ``[-1, 1]``, ``b ~ N(0, I)`` (from ``seed``).
    With ``u = w/r``, ``G = 2 A u + 0.5 cos(b.u) b``, ``M = 2 A - 0.5 sin(b.u) b b^T``, ``P = I - u u^T``:
    ``grad = P G / r``;  ``H = (P M P - (u.G) P - (P G) u^T - u (P G)^T) / r^2``.

    Args:
      dim: dimension ``d`` (the project's toy uses 20).
      seed: seed of ``A`` and ``b``.

    Returns:
      A :class:`Problem` with params ``{'w': (d,)}``; ``constants``: ``A``, ``b``.

    Paper: the toy loss of the project's claim table (PAPER.md 7.0); Definition 2.1.
    """
    A, b = _sphere_data(dim, seed)
    grad, hessian = _sphere_grad_hess(A, b)

    def loss(p):
        w = p["w"]
        u = w / jnp.linalg.norm(w)
        return u @ (_as(A, w) @ u) + 0.5 * jnp.sin(_as(b, w) @ u)

    return Problem(
        name=f"sphere_function(d={dim})",
        loss=loss,
        init=_one_group_init(dim),
        labels={"w": si("w")},
        scale_invariant=True,
        description="f(w/||w||), f(u) = u^T A u + 0.5 sin(b^T u): non-convex, scale-invariant",
        grad_closed_form=grad,
        hessian_closed_form=hessian,
        constants=_frozen({"A": A, "b": b}),
    )


def noisy_sphere_function(dim: int = 20, seed: int = 0, noise_std: float | Sequence[float] = 1.0) -> Problem:
    """Sphere function with additive linear noise of known covariance, for SGD.

    Math: ``F_z(w) = f(w/||w||) + z^T (w/||w||)`` with ``z ~ N(0, Sigma)``, ``Sigma = diag(noise_std^2)``,
    so ``E_z F_z = L`` (the :func:`sphere_function` with the same ``dim, seed``) and
    ``grad F_z - grad L = P z / r``, hence
    ``E || grad F_z - grad L ||^2 = (tr Sigma - u^T Sigma u) / r^2`` (``= sigma^2 (d - 1)`` at unit norm
    for isotropic noise).

    Args:
      dim: dimension ``d``.
      seed: seed of ``A`` and ``b`` (same as :func:`sphere_function`).
      noise_std: scalar or per-coordinate standard deviation of ``z``.

    Returns:
      A :class:`Problem` with ``stochastic_loss``; ``constants``: ``A``, ``b``, ``noise_cov`` (``(d, d)``),
      ``grad_noise_variance`` (``params -> E||grad F_z - grad L||^2``).

    Paper: SGD noise assumption (A3); claims C16-C18.
    """
    base = sphere_function(dim, seed)
    A, b = base.constants["A"], base.constants["b"]
    std = np.broadcast_to(np.asarray(noise_std, np.float64), (dim,)).copy()
    cov = np.diag(std**2)

    def stochastic_loss(p, key):
        w = p["w"]
        u = w / jnp.linalg.norm(w)
        z = _as(std, w) * jax.random.normal(key, (dim,), w.dtype)
        return base.loss(p) + z @ u

    def grad_noise_variance(p):
        w = p["w"]
        r2 = w @ w
        u = w / jnp.sqrt(r2)
        var = _as(std**2, w)
        return (jnp.sum(var) - u @ (var * u)) / r2

    return dataclasses.replace(
        base,
        name=f"noisy_sphere_function(d={dim})",
        description=(
            "f(w/||w||) + z^T w/||w||, z ~ N(0, diag(noise_std^2)): scale-invariant SGD noise of known covariance"
        ),
        stochastic_loss=stochastic_loss,
        constants=_frozen({"A": A, "b": b, "noise_cov": cov, "grad_noise_variance": grad_noise_variance}),
    )


def _regression_data(kind, n, d, seed, num_batches):
    """``(X, y, Xb, yb)``: a Gaussian design ``X`` ``(n, d)`` and targets from ``seed`` (``'linear'``:
    ``X w* + 0.5 + 0.5 noise``; ``'logistic'``: labels ``+-1`` of a noisy linear rule, not separable), and
    both split, in order, into ``num_batches`` fixed mini-batches ``(num_batches, n / num_batches, ...)``."""
    if kind not in ("linear", "logistic"):
        raise ValueError(f"kind must be 'linear' or 'logistic', got {kind!r}")
    if n % num_batches:
        raise ValueError(f"n={n} is not a multiple of num_batches={num_batches}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w_true = rng.standard_normal(d)
    if kind == "linear":
        y = X @ w_true + 0.5 + 0.5 * rng.standard_normal(n)
    else:
        y = np.where(X @ w_true + rng.standard_normal(n) >= 0.0, 1.0, -1.0)
    B = n // num_batches
    return X, y, X.reshape(num_batches, B, d), y.reshape(num_batches, B)


def _bn_problem(kind, n, d, seed, num_batches, epsilon, *, name: str, description: str,
                scale_invariant: bool) -> Problem:
    """The BN regression ``z = gamma BN_epsilon(X w) + beta`` with the squared (``'linear'``) or logistic loss
    (:func:`bn_linear_regression`, :func:`bn_logistic_regression`, :func:`epsilon_bn`)."""
    X, y, Xb, yb = _regression_data(kind, n, d, seed, num_batches)
    B = n // num_batches

    def batch_loss(p, X_, y_):
        w = p["w"]
        z = p["gamma"] * batch_norm_exact(X_ @ w, epsilon) + p["beta"]
        per = 0.5 * (z - y_) ** 2 if kind == "linear" else jax.nn.softplus(-y_ * z)
        return jnp.mean(per, axis=-1)

    def loss(p):
        w = p["w"]
        return jnp.mean(batch_loss(p, _as(Xb, w), _as(yb, w)))

    def stochastic_loss(p, key):
        w = p["w"]
        i = jax.random.randint(key, (), 0, num_batches)
        return batch_loss(p, _as(Xb, w)[i], _as(yb, w)[i])

    def init(key, scale=1.0, dtype=None):
        dt = _dtype(dtype)
        z = jax.random.normal(key, (d + 2,), dt)  # one draw: cheaper to compile
        w = z[:d]
        return {"w": jnp.asarray(scale, dt) * w / jnp.linalg.norm(w), "gamma": 1.0 + 0.5 * z[d], "beta": 0.5 * z[d + 1]}

    consts = {"X": X, "y": y, "batch_size": B, "num_batches": num_batches, "epsilon": epsilon}
    if kind == "linear" and epsilon == 0.0:
        consts["L_gg"] = 1.0
    if kind == "logistic" and epsilon == 0.0:
        consts["L_gg_bound"] = 0.25
    return Problem(
        name=name,
        loss=loss,
        init=init,
        labels={"w": si("w"), "gamma": VARIANT_LABEL, "beta": VARIANT_LABEL},
        scale_invariant=scale_invariant,
        description=description,
        stochastic_loss=stochastic_loss,
        constants=_frozen(consts),
    )


def bn_linear_regression(n: int = 64, d: int = 5, seed: int = 0, num_batches: int = 4) -> Problem:
    """One neuron through exact train-mode BN, squared loss: ``z = gamma BN(X w) + beta``.

    Math: ``BN`` is :func:`batch_norm_exact` (``epsilon = 0``, biased two-pass variance);
    ``F_b = mean_{i in b} 0.5 (z_i - y_i)^2`` with ``y = X w* + 0.5 + 0.5 noise``. ``w`` is scale-invariant,
    ``(gamma, beta)`` scale-variant. Since the normalised ``x_hat`` of every batch has mean 0 and mean
    square 1, ``H_gg = [[mean x_hat^2, mean x_hat], [mean x_hat, 1]] = I``: ``L_gg = 1`` exactly.
    The rows are split, in order, into ``num_batches`` fixed mini-batches of ``n / num_batches`` rows,
    each normalised with its own statistics; ``loss`` is the mean of the batch losses (the paper's
    ``L = E_z F_z`` with ``z`` a batch) and ``stochastic_loss`` is the loss of one uniformly drawn batch,
    so its expectation is ``loss`` exactly. ``num_batches=1`` is plain full-batch BN.

    Args:
      n, d: rows and features of the fixed Gaussian design ``X`` (from ``seed``).
      seed: data seed.
      num_batches: number of fixed mini-batches.

    Returns:
      A :class:`Problem` with params ``{'w': (d,), 'gamma': (), 'beta': ()}``; ``constants``: ``X``, ``y``,
      ``batch_size``, ``num_batches``, ``epsilon`` (0), ``L_gg`` (1).

    Paper: eq. (1) BN; scale invariance of weights feeding BN (Sec. 1-2, Definition 2.1).
    """
    return _bn_problem(
        "linear", n, d, seed, num_batches, 0.0, name=f"bn_linear_regression(n={n},d={d})", scale_invariant=True,
        description="squared loss of gamma*BN(Xw)+beta, exact train-mode BN (epsilon=0): w scale-invariant")


def bn_logistic_regression(n: int = 64, d: int = 5, seed: int = 0, num_batches: int = 4) -> Problem:
    """One neuron through exact train-mode BN, logistic loss on labels ``y in {-1, +1}``.

    Math: ``F_b = mean_{i in b} log(1 + exp(-y_i z_i))``, ``z = gamma BN(X w) + beta`` (``epsilon = 0``);
    labels from a noisy linear rule (not separable). ``H_gg = mean sigma'(y z) [[x_hat^2, x_hat],
    [x_hat, 1]]`` with ``sigma' <= 1/4``, so ``L_gg <= 1/4``.
    The rows are split, in order, into ``num_batches`` fixed mini-batches of ``n / num_batches`` rows,
    each normalised with its own statistics; ``loss`` is the mean of the batch losses (the paper's
    ``L = E_z F_z`` with ``z`` a batch) and ``stochastic_loss`` is the loss of one uniformly drawn batch,
    so its expectation is ``loss`` exactly. ``num_batches=1`` is plain full-batch BN.

    Args:
      n, d: rows and features of the fixed Gaussian design ``X``.
      seed: data seed.
      num_batches: number of fixed mini-batches.

    Returns:
      A :class:`Problem` like :func:`bn_linear_regression`; ``constants`` has ``L_gg_bound`` (1/4).

    Paper: eq. (1) BN; Definition 2.1.
    """
    return _bn_problem(
        "logistic", n, d, seed, num_batches, 0.0, name=f"bn_logistic_regression(n={n},d={d})", scale_invariant=True,
        description="logistic loss of gamma*BN(Xw)+beta, exact train-mode BN (epsilon=0): w scale-invariant")


def multi_group(
    group_dims: Sequence[int] = (3, 4, 5),
    g_dim: int = 4,
    seed: int = 0,
    coupling: float = 0.5,
    noise_std: float = 0.1,
) -> Problem:
    """Several SI groups and a quadratic scale-variant part with exactly known ``L_gg``.

    Math: with ``u_i = w_i / ||w_i||``,
    ``L(W; g) = sum_i f_i(u_i) + 0.5 g^T Q g + sum_i g^T B_i u_i``, ``f_i(u) = u^T A_i u + 0.5 sin(b_i^T u)``.
    ``Q = V diag(q) V^T`` with ``q`` evenly spaced in ``[0.5, 3]`` (positive definite, so ``L`` is bounded
    below); ``H_gg = Q`` everywhere, hence ``L_gg = lambda_max(Q) = 3`` and GD on ``g`` is stable iff
    ``lr_g < 2 / L_gg``. ``H_{g w_i} = B_i P_i / r_i``, so ``L_gw_i <= ||B_i||_2`` on the unit set;
    ``H_{w_i w_j} = 0`` for ``i != j``. Closed-form gradient:
    ``grad_{w_i} = P_i (grad f_i(u_i) + B_i^T g) / r_i``, ``grad_g = Q g + sum_i B_i u_i``.
    Closed-form Hessian: ``H_gg = Q``, ``H_{g w_i} = B_i P_i / r_i``, ``H_{w_i w_j} = 0`` (``i != j``) and
    ``H_{w_i w_i}`` the composite Hessian of :func:`sphere_function` with ``G = grad f_i(u_i) + B_i^T g``,
    ``M = hess f_i(u_i)`` (the coupling is linear in ``u_i``).
    Stochastic version (``noise_std > 0``): ``F_z = L + sum_i z_i^T u_i + zeta^T g`` with ``z_i, zeta`` iid
    ``N(0, noise_std^2 I)``, so ``E||grad_{w_i} F_z - grad_{w_i} L||^2 = noise_std^2 (d_i - 1) / r_i^2`` and
    ``E||grad_g F_z - grad_g L||^2 = noise_std^2 g_dim``.

    Args:
      group_dims: dimensions of the SI groups ``w0, w1, ...``.
      g_dim: dimension of ``g``.
      seed: data seed.
      coupling: scale of ``B_i`` (entries ``N(0, coupling^2 / d_i)``).
      noise_std: standard deviation of the SGD noise (0: no ``stochastic_loss``).

    Returns:
      A :class:`Problem` with params ``{'w0': .., 'w1': .., ..., 'g': (g_dim,)}``; ``constants``: ``A``,
      ``b``, ``B`` (lists per group), ``Q``, ``L_gg``, ``L_gw_bound`` (``||B_i||_2`` per group),
      ``noise_std``.

    Paper: parameter split ``theta = (W; g)`` and the condition ``lr_g < 2 / L^{gg}`` of the GD theorem
    (claims C9, C14, C15); SGD noise (A3, C18).
    """
    rng = np.random.default_rng(seed)
    names = [f"w{i}" for i in range(len(group_dims))]
    offsets = [int(o) for o in np.cumsum([0, *group_dims])]  # slices of the SI groups in one noise draw
    As, bs, Bs = [], [], []
    for di in group_dims:
        A, _ = _symmetric_with_spectrum(rng, np.linspace(-1.0, 1.0, di))
        As.append(A)
        bs.append(rng.standard_normal(di))
        Bs.append(coupling * rng.standard_normal((g_dim, di)) / np.sqrt(di))
    q = np.linspace(0.5, 3.0, g_dim)
    Q, _ = _symmetric_with_spectrum(rng, q)

    def loss(p):
        g = p["g"]
        total = 0.5 * g @ (_as(Q, g) @ g)
        for name, A, b, B in zip(names, As, bs, Bs):
            w = p[name]
            u = w / jnp.linalg.norm(w)
            total = total + u @ (_as(A, w) @ u) + 0.5 * jnp.sin(_as(b, w) @ u) + g @ (_as(B, w) @ u)
        return total

    def grad(p):
        g = p["g"]
        out = {"g": _as(Q, g) @ g}
        for name, A, b, B in zip(names, As, bs, Bs):
            w = p[name]
            r = jnp.linalg.norm(w)
            u = w / r
            _, G, _ = _sphere_f_parts(_as(A, w), _as(b, w), u)
            G = G + _as(B, w).T @ g
            out[name] = (G - (u @ G) * u) / r
            out["g"] = out["g"] + _as(B, w) @ u
        return out

    def hessian(p):
        g = p["g"]
        keys = sorted(p)  # ravel_pytree order of a dict
        sizes = {name: d for name, d in zip(names, group_dims)} | {"g": g_dim}
        start = dict(zip(keys, np.cumsum([0] + [sizes[k] for k in keys])[:-1].tolist()))
        H = jnp.zeros((sum(sizes.values()),) * 2, g.dtype)
        sl = lambda k: slice(start[k], start[k] + sizes[k])  # noqa: E731
        H = H.at[sl("g"), sl("g")].set(_as(Q, g))
        for name, A, b, B in zip(names, As, bs, Bs):
            w = p[name]
            r = jnp.linalg.norm(w)
            u = w / r
            _, G, M = _sphere_f_parts(_as(A, w), _as(b, w), u)
            B_ = _as(B, w)
            H = H.at[sl(name), sl(name)].set(_composite_grad_hess(G + B_.T @ g, M, w)[1])
            cross = (B_ - jnp.outer(B_ @ u, u)) / r  # d(B u)/dw = B P / r
            H = H.at[sl("g"), sl(name)].set(cross).at[sl(name), sl("g")].set(cross.T)
        return H

    def stochastic_loss(p, key):
        g = p["g"]
        z = noise_std * jax.random.normal(key, (int(offsets[-1]) + g_dim,), g.dtype)  # one draw
        total = loss(p) + z[offsets[-1]:] @ g
        for name, lo, hi in zip(names, offsets[:-1], offsets[1:]):
            w = p[name]
            total = total + z[lo:hi].astype(w.dtype) @ (w / jnp.linalg.norm(w))
        return total

    def init(key, scale=1.0, dtype=None):
        dt = _dtype(dtype)
        z = jax.random.normal(key, (int(offsets[-1]) + g_dim,), dt)  # one draw: cheaper to compile
        p = {}
        for name, lo, hi in zip(names, offsets[:-1], offsets[1:]):
            w = z[lo:hi]
            p[name] = jnp.asarray(scale, dt) * w / jnp.linalg.norm(w)
        p["g"] = z[offsets[-1]:]
        return p

    labels = {name: si(name) for name in names}
    labels["g"] = VARIANT_LABEL
    return Problem(
        name=f"multi_group(dims={tuple(group_dims)},g={g_dim})",
        loss=loss,
        init=init,
        labels=labels,
        scale_invariant=True,
        description=(
            "sum_i f_i(w_i/||w_i||) + 0.5 g^T Q g + g^T B u: several SI groups, quadratic g-part, "
            "L_gg = lambda_max(Q)"
        ),
        stochastic_loss=stochastic_loss if noise_std > 0 else None,
        grad_closed_form=grad,
        hessian_closed_form=hessian,
        constants=_frozen(
            {
                "A": As,
                "b": bs,
                "B": Bs,
                "Q": Q,
                "L_gg": float(q.max()),
                "L_gw_bound": [float(np.linalg.norm(B, 2)) for B in Bs],
                "noise_std": noise_std,
            }
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# negative controls (not scale-invariant)
# ---------------------------------------------------------------------------------------------------------


def epsilon_bn(
    n: int = 64, d: int = 5, seed: int = 0, epsilon: float = 1e-5, kind: str = "linear", num_batches: int = 4
) -> Problem:
    """Control: the BN regression with the standard ``sigma -> sqrt(sigma^2 + epsilon)``.

    Math: as :func:`bn_linear_regression` / :func:`bn_logistic_regression` with
    ``BN(x) = (x - mu) / sqrt(sigma^2 + epsilon)``; ``BN(c x) != BN(x)``: the change is ``O(epsilon /
    (c^2 sigma^2))`` for large ``c`` and ``O(1)`` once ``c^2 sigma^2 <~ epsilon``. ``w`` keeps its
    ``'si'`` label, which is wrong.

    Args:
      n, d, seed, num_batches: as the BN regressions.
      epsilon: variance offset (Flax's default 1e-5).
      kind: ``'linear'`` or ``'logistic'``.

    Returns:
      A :class:`Problem` with ``scale_invariant=False``.

    Paper: smoothed-network appendix (standard epsilon-BN breaks scale invariance; claims C1, C19).
    """
    return _bn_problem(
        kind, n, d, seed, num_batches, float(epsilon), name=f"epsilon_bn({kind},eps={epsilon:g})",
        scale_invariant=False,
        description=f"breaks scale invariance (Definition 2.1) of w: BN with sqrt(sigma^2 + {epsilon:g})")


def no_normalisation(n: int = 64, d: int = 5, seed: int = 0, num_batches: int = 4) -> Problem:
    """Control: plain linear regression ``L(w) = mean 0.5 (x_i^T w - y_i)^2`` with ``w`` wrongly labelled ``'si'``.

    Math: no normalisation layer, so ``L(c w) != L(w)``; closed-form gradient ``X^T (X w - y) / n``.
    Same data and batches as :func:`bn_linear_regression`.

    Args:
      n, d, seed, num_batches: as the BN regressions.

    Returns:
      A :class:`Problem` with ``scale_invariant=False``.

    Paper: the hypothesis that ``w`` feeds a normalisation layer (Sec. 1, Definition 2.1).
    """
    X, y, Xb, yb = _regression_data("linear", n, d, seed, num_batches)

    def loss(p):
        w = p["w"]
        return 0.5 * jnp.mean((_as(X, w) @ w - _as(y, w)) ** 2)

    def grad(p):
        w = p["w"]
        X_ = _as(X, w)
        return {"w": X_.T @ (X_ @ w - _as(y, w)) / n}

    def stochastic_loss(p, key):
        w = p["w"]
        i = jax.random.randint(key, (), 0, num_batches)
        return 0.5 * jnp.mean((_as(Xb, w)[i] @ w - _as(yb, w)[i]) ** 2)

    return Problem(
        name=f"no_normalisation(n={n},d={d})",
        loss=loss,
        init=_one_group_init(d),
        labels={"w": si("w")},
        scale_invariant=False,
        description="breaks the normalisation hypothesis: linear regression without BN, w mislabelled 'si'",
        stochastic_loss=stochastic_loss,
        grad_closed_form=grad,
        constants=_frozen({"X": X, "y": y, "batch_size": n // num_batches, "num_batches": num_batches}),
    )


def weight_decay(base: Problem | None = None, weight_decay: float = 1e-2) -> Problem:
    """Control: a scale-invariant problem plus coupled L2, ``L(w) + (lambda / 2) sum_i ||w_i||^2``.

    Math: the penalty is on every ``'si'`` leaf; the gradient gains ``lambda w_i`` and the Hessian
    ``lambda I`` on those leaves, so ``<grad, w_i> = lambda ||w_i||^2 != 0`` and ``L(c w) != L(w)``.

    Args:
      base: the scale-invariant problem (default :func:`sphere_function`).
      weight_decay: ``lambda``.

    Returns:
      A :class:`Problem` with ``scale_invariant=False`` (closed-form gradient/Hessian when ``base`` has them).

    Paper: the theory has no weight decay (Sec. 2 update rule; Lemma 2.4 fails with it, claim C4).
    """
    base = sphere_function() if base is None else base
    lam = float(weight_decay)

    def penalty(p):
        leaves, treedef = jax.tree.flatten(p)
        labs = treedef.flatten_up_to(base.labels)
        return sum(0.5 * lam * jnp.sum(x * x) for x, lab in zip(leaves, labs) if lab.kind == "si")

    def add_wd(g, p):
        return jax.tree.map(lambda gi, x, lab: gi + lam * x if lab.kind == "si" else gi, g, p, base.labels)

    grad = None if base.grad_closed_form is None else (lambda p: add_wd(base.grad_closed_form(p), p))
    hessian = None
    if base.hessian_closed_form is not None:

        def hessian(p):
            mask = ravel_pytree(
                jax.tree.map(lambda x, lab: jnp.full_like(x, lam if lab.kind == "si" else 0.0), p, base.labels)
            )[0]
            return base.hessian_closed_form(p) + jnp.diag(mask)

    sloss = None if base.stochastic_loss is None else (lambda p, key: base.stochastic_loss(p, key) + penalty(p))
    return Problem(
        name=f"{base.name}+weight_decay({lam:g})",
        loss=lambda p: base.loss(p) + penalty(p),
        init=base.init,
        labels=base.labels,
        scale_invariant=False,
        description=f"breaks 'no weight decay' (Lemma 2.4) and scale invariance: {base.name} + ({lam:g}/2)||w||^2",
        stochastic_loss=sloss,
        grad_closed_form=grad,
        hessian_closed_form=hessian,
        constants=_frozen(dict(base.constants, weight_decay=lam)),
    )


def default_problems() -> list[Problem]:
    """Every problem of this module with its default arguments, scale-invariant ones first, then controls."""
    return [
        rayleigh_quotient(),
        sphere_function(),
        noisy_sphere_function(),
        bn_linear_regression(),
        bn_logistic_regression(),
        multi_group(),
        epsilon_bn(),
        no_normalisation(),
        weight_decay(),
    ]
