"""The smoothness assumption A1 on a network small enough for a rigorous bound, and the tools to measure it.

The network (``docs/derivations.md``, "A1: a bound for one smoothed-BN layer"): inputs ``X`` (``B x d``,
one full batch), one hidden layer of ``h`` channels with the smooth BN of the paper's smoothed network
(PAPER §5), ``u_k = (X - mean) w_k / sqrt(w_k^T (Sigma + eps I) w_k)`` (computed by
:func:`rate_tuning.layers.normalize`, the library's BN), an affine ``gamma_k u_k + beta_k``, softplus, a
linear head ``a V + c`` and the mean cross-entropy. Each column ``w_k`` of the kernel is its own
scale-invariant group (per-channel label); ``g = (gamma, beta, V, c)`` is scale-variant.

A1 bounds the Hessian blocks on the set ``{||w_k|| = 1}`` "for every g"; for this network the ``g``-part
of the Hessian grows with ``|gamma|``, ``|beta|`` and ``||V||`` (softplus is unbounded), so the bound
(:func:`a1_bound`) holds on the region ``R = {|gamma_k| <= Gamma, |beta_k| <= beta_max,
||V_k,:|| <= nu}`` (``c`` free), which is what the checks sample, follow and search.

Measurements: dense Hessian blocks (:func:`block_norms`, numpy on :func:`proofs_check.curvature.dense_hessian`)
and Lanczos block norms (:func:`proofs_check.curvature.smoothness_constants`), at sampled points
(:func:`region_sampler`), along a GD trajectory, by projected ascent on a block norm
(:func:`adversarial_search`) and along a path into the null space of a rank-deficient batch covariance
(:func:`null_space_probe`).

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019
(assumption A1 on the unit set, the smoothed network of §5 [R]).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from proofs_check import curvature
from rate_tuning import groups as G
from rate_tuning import layers

__all__ = ["SmallNet", "Region", "small_net", "a1_bound", "block_norms", "region_sampler", "project",
           "adversarial_search", "null_space_probe", "C3"]

C3 = 2.0 / (3.0 * math.sqrt(3.0))
"""``max_{sigma >= 0} sigma eps / (sigma^2 + eps)^{3/2}`` (attained at ``sigma^2 = eps / 2``)."""


@dataclasses.dataclass(frozen=True)
class Region:
    """The region of ``g`` on which the bound holds: ``|gamma_k| <= gamma``, ``|beta_k| <= beta``,
    ``||V_k,:|| <= nu`` (row norms of the head), ``c`` free."""

    gamma: float = 2.0
    beta: float = 1.0
    nu: float = 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class SmallNet:
    """One hidden BN layer + activation + linear head + cross-entropy on one fixed batch.

    Attributes:
      x, y: the batch (``B x d`` float64, ``B`` int labels).
      width, classes: ``h`` and ``C``.
      eps: the smooth BN's ``eps`` (0: exact BN, eq. (1)).
      activation: ``'softplus'`` (the smoothed network) or ``'relu'`` (the paper's network, the control).
      region: :class:`Region`.
      loss: ``params -> mean cross-entropy`` (train-mode BN on the batch).
      labels: per-channel SI label on ``w``, ``g`` scale-variant.
    """

    x: np.ndarray
    y: np.ndarray
    width: int
    classes: int
    eps: float
    activation: str
    region: Region
    loss: Callable
    labels: dict


def small_net(n: int = 16, width: int = 4, eps: float = layers.STANDARD_EPSILON, activation: str = "softplus",
              region: Region = Region(), seed: int = 0) -> SmallNet:
    """The network of the bound on the first ``n`` digits images (``n < 64``: a rank-deficient batch
    covariance, whose null space is where the curvature of BN concentrates)."""
    from rate_tuning import data

    ds = data.digits(seed=seed, flatten=True)
    x = np.asarray(ds.x_train[:n], np.float64)
    y = np.asarray(ds.y_train[:n], np.int32)
    act = {"softplus": jax.nn.softplus, "relu": jax.nn.relu}[activation]
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss(p):
        z = xj.astype(p["w"].dtype) @ p["w"]
        offset = eps * jnp.sum(p["w"] ** 2, axis=0)
        u = layers.normalize(z, offset)[0]
        a = act(p["gamma"] * u + p["beta"])
        logits = a @ p["V"] + p["c"]
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(logits, yj[:, None], axis=-1)[:, 0])

    labels = {"w": G.si("w", per_channel=True), "gamma": G.VARIANT_LABEL, "beta": G.VARIANT_LABEL,
              "V": G.VARIANT_LABEL, "c": G.VARIANT_LABEL}
    return SmallNet(x, y, width, 10, float(eps), activation, region, loss, labels)


# -------------------------------------------------------------------------------------------------------
# the bound
# -------------------------------------------------------------------------------------------------------


def a1_bound(net: SmallNet) -> dict:
    """Upper bounds of ``||H_{w_k w_k}||``, ``||H_{w_k w_j}||`` (``k != j``), ``||H_{g w_k}||``, ``||H_gg||``
    over ``{||w_k|| = 1 for all k} x R`` (derivation: ``docs/derivations.md``, "A1").

    Everything is computed from the data (``X``, ``eps``) and the region, never from the network's code:
    ``Sigma`` the biased batch covariance, ``lambda = ||Sigma||``, ``lambda_A = lambda + eps``,
    ``e = eps + lambda_min(Sigma)``, ``l_i = sqrt(x_i^T Sigma^+ x_i)`` and ``U_i = ||(Sigma + eps I)^{-1/2} x_i||``
    (``x_i`` centred), then

    * ``Jbar = 2 sqrt(B lambda / e) + sqrt(B) C3`` bounds the Jacobian ``||d u_k / d w_k||`` (``B x d``);
    * ``K_i = 2 ||x_i|| (C3 sqrt(lambda) / eps + 1 / sqrt(e)) + 4 lambda_A min(l_i C3 / eps, U_i / e)``
      bounds ``||Hess_w u_ik||``;
    * ``L_ww_diag = (nu^2/2 + sqrt(2) nu / 4) Gamma^2 Jbar^2 / B + sqrt(2) nu Gamma mean_i K_i``,
      ``L_ww_off = nu^2 Gamma^2 Jbar^2 / (2 B)``;
    * ``D_i^2 = h nu^2 (1 + U_i^2) + h softplus(Gamma U_i + beta_max)^2 + 1``,
      ``L_gg = mean_i [D_i^2 / 2 + sqrt(2 (1 + U_i^2)) + sqrt(2) nu (1 + U_i^2) / 4]``;
    * ``E_i^2 = 2 (Gamma^2 + nu^2 ((Gamma U_i / 4 + 1)^2 + Gamma^2 / 16))``,
      ``L_gw = Jbar / B (nu Gamma sqrt(sum D_i^2) / 2 + sqrt(sum E_i^2))``.

    Valid for ``eps > 0`` and softplus (``sigma' <= 1``, ``softplus'' <= 1/4``).
    """
    if not net.eps > 0 or net.activation != "softplus":
        raise ValueError("the A1 bound covers the smoothed network (eps > 0, softplus) only")
    x = np.asarray(net.x, np.float64)
    B, d = x.shape
    xc = x - x.mean(axis=0)
    sigma = xc.T @ xc / B
    evals, evecs = np.linalg.eigh(sigma)
    lam = float(evals[-1])
    # a lower bound of lambda_min(Sigma) (the computed one is within d u ||Sigma|| of it)
    lam_min = max(0.0, float(evals[0]) - d * np.finfo(np.float64).eps * lam)
    eps = net.eps
    lam_A, e = lam + eps, eps + lam_min
    proj = xc @ evecs                                        # coordinates in the eigenbasis
    U = np.sqrt(np.sum(proj**2 / (evals + eps), axis=1))
    rank = evals > d * np.finfo(np.float64).eps * lam
    lev = np.sqrt(np.sum(proj[:, rank] ** 2 / evals[rank], axis=1))
    xn = np.linalg.norm(xc, axis=1)
    R = net.region
    Gam, bmax, nu, h = R.gamma, R.beta, R.nu, net.width
    J = 2 * math.sqrt(B * lam / e) + math.sqrt(B) * C3
    K = 2 * xn * (C3 * math.sqrt(lam) / eps + 1 / math.sqrt(e)) + 4 * lam_A * np.minimum(lev * C3 / eps, U / e)
    L_ww_diag = (nu**2 / 2 + math.sqrt(2) * nu / 4) * Gam**2 * J**2 / B + math.sqrt(2) * nu * Gam * float(K.mean())
    L_ww_off = nu**2 * Gam**2 * J**2 / (2 * B)
    sp = np.logaddexp(0.0, Gam * U + bmax)
    D2 = h * nu**2 * (1 + U**2) + h * sp**2 + 1
    L_gg = float(np.mean(D2 / 2 + np.sqrt(2 * (1 + U**2)) + math.sqrt(2) * nu * (1 + U**2) / 4))
    E2 = 2 * (Gam**2 + nu**2 * ((Gam * U / 4 + 1) ** 2 + Gam**2 / 16))
    L_gw = J / B * (nu * Gam * math.sqrt(float(D2.sum())) / 2 + math.sqrt(float(E2.sum())))
    return {"L_ww": max(L_ww_diag, L_ww_off), "L_ww_diag": L_ww_diag, "L_ww_off": L_ww_off, "L_gw": L_gw,
            "L_gg": L_gg, "inputs": {"B": B, "d": d, "h": h, "eps": eps, "lambda": lam, "lambda_min": lam_min,
                                     "rank": int(rank.sum()), "Jbar": J, "mean_K": float(K.mean()),
                                     "max_U": float(U.max()), "region": dataclasses.asdict(R)}}


# -------------------------------------------------------------------------------------------------------
# measurements
# -------------------------------------------------------------------------------------------------------


def _masks(net: SmallNet, params):
    names, w_masks, g_mask = curvature.si_group_masks(params, net.labels)
    flat = [np.asarray(ravel_pytree(m)[0]) > 0 for m in w_masks + [g_mask]]
    return names, flat


def block_norms(H: np.ndarray, masks: list[np.ndarray]) -> dict:
    """``{'L_ww_diag', 'L_ww_off', 'L_gw', 'L_gg'}``: the largest spectral norm of each kind of block of the
    dense Hessian ``H`` (masks: the SI groups, then ``g``), plus the argmax block of each kind."""
    H = np.asarray(H, np.float64)
    m = len(masks) - 1
    out = {"L_ww_diag": (0.0, None), "L_ww_off": (0.0, None), "L_gw": (0.0, None), "L_gg": (0.0, None)}
    for i in range(m + 1):
        for j in range(i, m + 1):
            blk = H[np.ix_(masks[i], masks[j])]
            val = float(np.max(np.abs(np.linalg.eigvalsh(blk)))) if i == j else float(np.linalg.norm(blk, 2))
            kind = ("L_gg" if i == m else "L_ww_diag") if i == j else ("L_gw" if j == m else "L_ww_off")
            if val > out[kind][0]:
                out[kind] = (val, (i, j))
    return out


def project(net: SmallNet, p: dict) -> dict:
    """Onto ``{||w_k|| = 1} x R``: each kernel column normalised, ``gamma``, ``beta`` clipped, every row of
    ``V`` longer than ``nu`` shortened to ``nu``."""
    R = net.region
    rows = jnp.linalg.norm(p["V"], axis=1, keepdims=True)
    return {"w": p["w"] / jnp.linalg.norm(p["w"], axis=0), "gamma": jnp.clip(p["gamma"], -R.gamma, R.gamma),
            "beta": jnp.clip(p["beta"], -R.beta, R.beta), "V": p["V"] * jnp.minimum(1.0, R.nu / rows), "c": p["c"]}


def region_sampler(net: SmallNet) -> Callable:
    """``key -> params``: ``w`` uniform on the product of spheres, ``gamma``, ``beta`` uniform in their
    intervals, rows of ``V`` uniform in direction with norm ``nu * U^(1/2)``, ``c ~ N(0, 1)``."""
    d, h, C, R = net.x.shape[1], net.width, net.classes, net.region

    def sample(key):
        k = jax.random.split(key, 6)
        w = jax.random.normal(k[0], (d, h))
        V = jax.random.normal(k[1], (h, C))
        V = V / jnp.linalg.norm(V, axis=1, keepdims=True) * R.nu * jnp.sqrt(jax.random.uniform(k[2], (h, 1)))
        return {"w": w / jnp.linalg.norm(w, axis=0), "gamma": jax.random.uniform(k[3], (h,), minval=-R.gamma,
                                                                                maxval=R.gamma),
                "beta": jax.random.uniform(k[4], (h,), minval=-R.beta, maxval=R.beta), "V": V,
                "c": jax.random.normal(k[5], (C,))}

    return sample


@functools.lru_cache(maxsize=None)
def _dense(net: SmallNet):
    return jax.jit(lambda p: curvature.dense_hessian(net.loss, p))


def dense_blocks(net: SmallNet, params) -> dict:
    """:func:`block_norms` of the dense Hessian at ``params``."""
    names, masks = _masks(net, params)
    return block_norms(np.asarray(_dense(net)(params)), masks)


def adversarial_search(net: SmallNet, start: dict, kind: str, iters: int, step: float = 0.3) -> tuple[float, list]:
    """Projected ascent of the block norm of kind ``kind`` (``'L_ww'``, ``'L_gw'``, ``'L_gg'``) from ``start``.

    At each iterate the top singular pair ``(x, y)`` of the largest block of that kind is fixed, and the
    step follows the gradient of ``theta -> x^T H(theta) y`` (Danskin: the gradient of the block norm where
    its top singular value is simple), normalised to length ``step``, then :func:`project`; a step that
    does not increase the norm is refused and ``step`` halved. Returns the best norm and its history.
    """
    _, unravel = ravel_pytree(start)
    names, masks = _masks(net, start)

    @jax.jit
    def ascent_grad(p, xv, yv):
        return jax.grad(lambda q: jnp.vdot(xv, ravel_pytree(curvature.hvp(net.loss, q, unravel(yv)))[0]))(p)

    def evaluate(p):
        H = np.asarray(_dense(net)(p), np.float64)
        bn = block_norms(H, masks)
        keys = ("L_ww_diag", "L_ww_off") if kind == "L_ww" else (kind,)
        best = max(keys, key=lambda k: bn[k][0])
        val, (i, j) = bn[best]
        blk = H[np.ix_(masks[i], masks[j])]
        U_, S_, Vt = np.linalg.svd(blk)
        xv, yv = np.zeros(H.shape[0]), np.zeros(H.shape[0])
        xv[masks[i]], yv[masks[j]] = U_[:, 0], Vt[0]
        return val, xv, yv

    p = start
    val, xv, yv = evaluate(p)
    history = [val]
    for _ in range(iters):
        gr = ascent_grad(p, jnp.asarray(xv), jnp.asarray(yv))
        norm = float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(gr))))
        if not norm > 0:
            break
        q = project(net, jax.tree.map(lambda a, b: a + step / norm * b, p, gr))
        v2, x2, y2 = evaluate(q)
        if v2 > val:
            p, val, xv, yv = q, v2, x2, y2
        else:
            step /= 2
        history.append(val)
    return val, history


def null_space_probe(net: SmallNet, params: dict, sigma_sq: np.ndarray, channel: int = 0):
    """``||H_{w_k w_k}||`` (dense) at points whose channel ``k`` has batch variance ``w_k^T Sigma w_k =
    sigma_sq[j]``: ``w_k = cos(t) n + sin(t) r`` with ``n`` a unit vector of the null space of the batch
    covariance ``Sigma`` and ``r`` a unit vector of its range (the other parameters as given).

    Returns ``(norms, sigma_sq_measured)``; ``sigma_sq`` must be below ``r^T Sigma r``.
    """
    x = np.asarray(net.x, np.float64)
    xc = x - x.mean(axis=0)
    sig = xc.T @ xc / x.shape[0]
    evals, evecs = np.linalg.eigh(sig)
    n = evecs[:, 0]
    if evals[0] > 1e-12 * evals[-1]:
        raise ValueError("the batch covariance has full rank: no null space to approach")
    r = evecs[:, -1]
    names, masks = _masks(net, params)
    i = channel
    norms, measured = [], []
    for s2 in np.asarray(sigma_sq, np.float64):
        t = math.asin(math.sqrt(s2 / evals[-1]))
        wk = math.cos(t) * n + math.sin(t) * r
        p = dict(params, w=jnp.asarray(params["w"]).at[:, i].set(wk))
        H = np.asarray(_dense(net)(p), np.float64)
        blk = H[np.ix_(masks[i], masks[i])]
        norms.append(float(np.max(np.abs(np.linalg.eigvalsh(blk)))))
        measured.append(float(wk @ sig @ wk))
    return np.asarray(norms), np.asarray(measured)
