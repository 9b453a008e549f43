"""Tests of proofs_check.curvature: HVP, Lanczos, tangent projector, smoothness constants (float64).

Every reference is independent of the code under test: dense ``jax.hessian`` + ``numpy.linalg.eigh``,
closed-form Hessians and spectra of proofs_check.problems, explicit numpy projectors.

Tolerances. In float64 (unit round-off u = 1.1e-16) a Hessian entry of these small problems is computed
with an error of a few n*u*||H|| (n <= 20); an HVP or a converged Ritz value has an error of about
n*u*||H|| as well, i.e. ~1e-14 relative. The 1e-10 relative bound used below leaves four orders of
magnitude for the accumulation over Lanczos steps and is still far below any algorithmic error
(a wrong sign, a missing term or an unconverged eigenvalue gives >= 1e-3).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from proofs_check import curvature as C
from proofs_check import problems as P
from proofs_check.numerics import numpy_init
from rate_tuning.groups import FROZEN_LABEL, VARIANT_LABEL, si

REL = 1e-10


# every test runs (and creates its arrays) in float64; the global setting is restored afterwards
pytestmark = pytest.mark.usefixtures("x64")


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _dense_operator(fn, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.vmap(lambda e: ravel_pytree(fn(unravel(e)))[0]))(jnp.eye(flat.size))).T


def _np_flat(tree):
    """numpy twin of ravel_pytree (same leaf order, C order)."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _random_point(prob, seed, scale=1.0):
    """N(0, 1) entries drawn with numpy (no JAX RNG to compile), every SI group rescaled to norm ``scale``."""
    return jax.tree.map(jnp.asarray, numpy_init(prob, seed, scale, "float64"))


def _np_projector(params, labels):
    """The block projector I - sum_i u_i u_i^T (u_i: unit SI group i), zero on frozen leaves, in numpy."""
    x = _np_flat(params)
    Pm = np.eye(x.size)
    _, w_masks, _ = C.si_group_masks(params, labels)
    for m in w_masks:
        g = np.flatnonzero(_np_flat(m))
        u = x[g] / np.linalg.norm(x[g])
        Pm[np.ix_(g, g)] -= np.outer(u, u)
    frozen = _np_flat(jax.tree.map(lambda v, lab: np.full(np.shape(v), lab.kind == "frozen"), params, labels))
    Pm[frozen, :] = 0.0
    Pm[:, frozen] = 0.0
    return Pm


# Small problems (every one has n <= 20, so Lanczos with num_steps = n returns the whole spectrum).
PROBLEMS = {
    "rayleigh": lambda: P.rayleigh_quotient(dim=6, seed=1),
    "sphere": lambda: P.sphere_function(dim=10, seed=2),
    "bn_logistic": lambda: P.bn_logistic_regression(n=32, d=4, seed=3),
    "multi_group": lambda: P.multi_group(group_dims=(2, 3), g_dim=3, seed=4),
}
# Dense-Hessian comparisons (one compiled pass each): one single-sphere toy, BN with (gamma, beta), and
# several SI groups with g; the sphere function is covered against its closed-form Hessian below.
DENSE = ["rayleigh", "bn_logistic", "multi_group"]


@functools.lru_cache(maxsize=None)
def _curvature_at_random_point(name):
    """One compiled pass per problem (shared by several tests): dense Hessian, HVPs, full Lanczos, the
    dense projected Hessian and the projected HVP of every radial direction, all at one random point."""
    prob = PROBLEMS[name]()
    params = _random_point(prob, seed=10, scale=1.7)  # off the unit sphere on purpose
    n = _np_flat(params).size
    V = np.random.default_rng(11).standard_normal((3, n))
    _, w_masks, _ = C.si_group_masks(params, prob.labels)
    radial_dirs = np.stack([_np_flat(jax.tree.map(np.multiply, m, params)) for m in w_masks])

    @jax.jit
    def compute(params, V, key):
        _, unravel = ravel_pytree(params)
        H = C.dense_hessian(prob.loss, params)
        HV = jax.vmap(lambda v: ravel_pytree(C.hvp(prob.loss, params, unravel(v)))[0])(V)
        ritz = C.lanczos(lambda v: C.hvp(prob.loss, params, v), params, n, key)
        php = lambda t: ravel_pytree(C.projected_hvp(prob.loss, params, prob.labels, unravel(t)))[0]  # noqa: E731
        out = jax.vmap(php)(jnp.concatenate([jnp.eye(n), radial_dirs]))  # basis vectors, then radial w_i
        return H, HV, ritz, out[:n].T, out[n:]

    out = [np.asarray(x) for x in compute(params, V, jax.random.PRNGKey(12))]
    return dict(zip(["H", "HV", "ritz", "PHP", "radial"], out), V=V, P=_np_projector(params, prob.labels),
                radial_dirs=radial_dirs)


@pytest.mark.parametrize("name", DENSE)
def test_hvp_matches_dense_hessian(name):
    """HVP == dense Hessian (jax.hessian on the flat vector) times v, on random v."""
    r = _curvature_at_random_point(name)
    assert _rel(r["H"], r["H"].T) <= REL
    assert _rel(r["HV"], r["V"] @ r["H"].T) <= REL


@pytest.mark.parametrize("name", DENSE)
def test_lanczos_matches_eigh(name):
    """Lanczos on HVPs with num_steps = n: Ritz values (ascending) == numpy.linalg.eigh of the dense Hessian."""
    r = _curvature_at_random_point(name)
    assert np.all(np.diff(r["ritz"]) >= 0), "Ritz values must be ascending"
    assert _rel(r["ritz"], np.linalg.eigh(r["H"])[0]) <= REL


@pytest.mark.parametrize("name", DENSE)
def test_projected_hvp_radial_kernel_and_symmetry(name):
    """P H P v: equals P_dense H_dense P_dense (independent construction), is symmetric, and the radial
    direction of every SI group is in its kernel."""
    r = _curvature_at_random_point(name)
    Pm, H, PHP = r["P"], r["H"], r["PHP"]
    assert _rel(PHP, Pm @ H @ Pm) <= REL
    assert _rel(PHP, PHP.T) <= REL
    scale = np.linalg.norm(H, 2)
    for w_i, out in zip(r["radial_dirs"], r["radial"]):
        assert np.linalg.norm(out) <= 1e-12 * scale * np.linalg.norm(w_i)


@pytest.mark.parametrize("name", ["rayleigh", "sphere", "multi_group"])
def test_hvp_matches_closed_form_hessian(name):
    """HVP against the independently derived closed-form Hessian at w and at 7 w (SI leaves scaled, g not),
    and the Hessian scaling of Sec. 2 (claim C3): H_ww(cw) = H_ww(w)/c^2, H_wg(cw) = H_wg(w)/c,
    H_gg(cw) = H_gg(w), i.e. D H(cw) D = H(w) with D = diag(c on SI entries, 1 on g)."""
    prob = PROBLEMS[name]()
    params = _random_point(prob, seed=20)
    n = _np_flat(params).size
    _, w_masks, _ = C.si_group_masks(params, prob.labels)
    si_mask = jax.tree.map(lambda *ms: np.clip(sum(ms), 0, 1), *w_masks)

    @jax.jit
    def both(params, c):
        params = jax.tree.map(lambda x, m: x * (1 - m) + c * x * m, params, si_mask)
        _, unravel = ravel_pytree(params)
        Hh = jax.vmap(lambda e: ravel_pytree(C.hvp(prob.loss, params, unravel(e)))[0])(jnp.eye(n))
        return Hh, prob.hessian_closed_form(params)

    (H1h, H1c), (H7h, H7c) = ([np.asarray(x) for x in both(params, c)] for c in (1.0, 7.0))
    assert _rel(H1h, H1c) <= REL and _rel(H7h, H7c) <= REL
    D = np.diag(np.where(_np_flat(si_mask) > 0, 7.0, 1.0))
    assert _rel(D @ H7h @ D, H1h) <= REL


@functools.lru_cache(maxsize=None)
def _rayleigh_spectra():
    prob = PROBLEMS["rayleigh"]()
    n = prob.constants["eigenvalues"].size

    @jax.jit
    def spectra(params, key):
        full = C.lanczos(lambda v: C.hvp(prob.loss, params, v), params, n, key)
        proj = C.lanczos(lambda v: C.projected_hvp(prob.loss, params, prob.labels, v), params, n, key)
        ends = C.hessian_extreme_eigenvalues(prob.loss, params, n, key, labels=prob.labels)
        return full, proj, ends

    return prob, spectra


@pytest.mark.parametrize("k", [0, 2, 5])
def test_rayleigh_hessian_spectrum_at_eigenvector(k):
    """At the unit eigenvector v_k, H = 2(A - lambda_k I): Lanczos on HVPs gives {2(lambda_j - lambda_k)}_j;
    the projected HVP gives the Riemannian spectrum {2(lambda_j - lambda_k)}_{j != k} plus the radial 0
    (claim C13's lambda_max)."""
    prob, spectra = _rayleigh_spectra()
    lam = prob.constants["eigenvalues"]
    full, proj, (lo, hi) = spectra(prob.constants["stationary_point"](k), jax.random.PRNGKey(30 + k))
    assert _rel(full, np.sort(2.0 * (lam - lam[k]))) <= REL
    expected = prob.spectrum_on_sphere(k)
    assert _rel(proj, expected) <= REL
    assert _rel([lo, hi], [expected[0], expected[-1]]) <= REL


def test_lanczos_extremes_large_operator_fewer_steps():
    """n = 400, 30 steps: the extreme eigenvalues (separated from the bulk) converge to round-off at both
    ends, under jit and vmap over keys; top_eigenvalue / extreme_eigenvalues agree; Ritz vectors satisfy
    A y = theta y for the extreme pairs.

    Convergence: the outliers 3 and -2.5 (then 2, -1.8) sit at a relative gap >= 0.4 from the rest of a
    spectrum of width 5.5; the Kaniel-Paige bound gives an error ~ T_29(1 + 2*0.4/..)^-2 < 1e-20.
    """
    rng = np.random.default_rng(0)
    d = np.concatenate([np.linspace(-1.0, 1.0, 396), [2.0, 3.0, -1.8, -2.5]])
    d = d[rng.permutation(d.size)]  # a diagonal operator: Lanczos is basis-independent up to the start vector
    dj = jnp.asarray(d)
    mv = lambda v: dj * v  # noqa: E731

    @jax.jit
    def run(keys):
        theta, Y = jax.vmap(lambda k: C.lanczos(mv, 400, 30, k, return_vectors=True))(keys)
        lo, hi = C.extreme_eigenvalues(mv, 400, 30, keys[0])
        top = C.top_eigenvalue(mv, 400, 30, keys[1])
        return theta, Y, lo, hi, top

    theta, Y, lo, hi, top = (np.asarray(x) for x in run(jax.random.split(jax.random.PRNGKey(1), 2)))
    for ritz, vecs in zip(theta, Y):
        assert abs(ritz[-1] - 3.0) <= REL * 3.0 and abs(ritz[0] + 2.5) <= REL * 3.0
        assert abs(ritz[-2] - 2.0) <= REL * 3.0 and abs(ritz[1] + 1.8) <= REL * 3.0
        for i in (0, -1):
            assert abs(np.linalg.norm(vecs[i]) - 1.0) <= 1e-12
            assert np.linalg.norm(d * vecs[i] - ritz[i] * vecs[i]) <= 1e-8 * 3.0
    assert abs(lo + 2.5) <= REL * 3.0 and abs(hi - 3.0) <= REL * 3.0 and abs(top - 3.0) <= REL * 3.0


def test_lanczos_breakdown_few_distinct_eigenvalues():
    """A has 3 distinct eigenvalues, so the Krylov space is invariant after 3 steps (beta ~ 0). With the
    restart: 12 steps give the whole spectrum with multiplicities; 5 steps give finite Ritz values inside
    [lambda_min, lambda_max] that contain the 3 exact eigenvalues (the first, invariant block); the zero
    operator gives zeros. Also on a pytree operator (Ritz vectors come back as stacked pytrees)."""
    rng = np.random.default_rng(1)
    lam = np.array([1.0] * 5 + [-2.0] * 3 + [4.0] * 4)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    A = jnp.asarray((q * lam) @ q.T)
    ex = {"a": jnp.zeros(7), "b": jnp.zeros((5,))}
    _, unravel = ravel_pytree(ex)
    mv = lambda t: unravel(A @ ravel_pytree(t)[0])  # noqa: E731

    @jax.jit
    def run(key):
        return (C.lanczos(mv, ex, 12, key), C.lanczos(mv, ex, 5, key, return_vectors=True),
                C.lanczos(lambda v: 0.0 * v, 6, 4, key))

    full, (short, vecs), zero = run(jax.random.PRNGKey(0))
    full, short, zero = np.asarray(full), np.asarray(short), np.asarray(zero)
    assert np.all(np.isfinite(full)) and np.all(np.isfinite(short)) and np.all(np.isfinite(zero))
    assert _rel(full, np.sort(lam)) <= REL
    assert short.min() >= -2.0 - REL * 4 and short.max() <= 4.0 + REL * 4
    for e in (-2.0, 1.0, 4.0):
        assert np.min(np.abs(short - e)) <= REL * 4
    assert jax.tree.structure(vecs) == jax.tree.structure(ex) and vecs["a"].shape == (5, 7)
    assert np.all(zero == 0.0)


def test_lanczos_unrolled():
    """The unrolled iteration (chosen automatically when the operator contains a convolution; the loop
    is checked above) gives the same Ritz values: on the HVP of a tiny conv loss against numpy.linalg.eigh
    of its dense Hessian, and on the breakdown operator above (restarts taken)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 5, 1)))

    def loss(p):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, p["k"], (2, 2), "VALID", dimension_numbers=dn)
        return jnp.sum(jnp.tanh(y) ** 2)

    params = {"k": jnp.asarray(rng.standard_normal((2, 2, 1, 1)))}  # n = 4
    mv = lambda v: C.hvp(loss, params, v)  # noqa: E731
    flat, unravel = ravel_pytree(params)
    assert C._contains_convolution(lambda t: ravel_pytree(mv(unravel(t)))[0], 4, flat.dtype)
    assert not C._contains_convolution(lambda t: 2.0 * t, 4, flat.dtype)

    lam = np.array([1.0] * 5 + [-2.0] * 3 + [4.0] * 4)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    A = jnp.asarray((q * lam) @ q.T)

    @jax.jit
    def run(key):
        return (C.lanczos(mv, params, 4, key), C.dense_hessian(loss, params),
                C.lanczos(lambda v: A @ v, 12, 12, key, unroll=True))

    ritz, H, theta = (np.asarray(r) for r in run(jax.random.PRNGKey(3)))
    assert _rel(ritz, np.linalg.eigh(H)[0]) <= REL
    assert _rel(theta, np.sort(lam)) <= REL


def test_tangent_projector_mixed_tree():
    """P on a tree with a per-channel kernel, a group shared by two leaves, a variant and a frozen leaf:
    equals the explicit block projector (numpy), is symmetric and idempotent, and kills every w_i."""
    rng = np.random.default_rng(40)
    params = {
        "kernel": jnp.asarray(rng.standard_normal((2, 3, 4))),  # 4 channel groups of 6 entries
        "bn": {"gamma": jnp.asarray(rng.standard_normal(3)), "beta": jnp.asarray(rng.standard_normal(3))},
        "head": jnp.asarray(rng.standard_normal(2)),
        "fixed": jnp.asarray(rng.standard_normal(2)),
    }
    labels = {
        "kernel": si("kernel", per_channel=True),
        "bn": {"gamma": si("bn"), "beta": si("bn")},  # one group spread over two leaves
        "head": VARIANT_LABEL,
        "fixed": FROZEN_LABEL,
    }
    Pm = _dense_operator(C.tangent_projector(params, labels), params)

    flat, unravel = ravel_pytree(params)
    n = flat.size
    expected = np.eye(n)
    index = unravel(jnp.arange(n, dtype=jnp.float64))
    groups = [np.asarray(index["kernel"][..., c]).ravel().astype(int) for c in range(4)]
    groups.append(np.concatenate([np.asarray(index["bn"]["beta"]), np.asarray(index["bn"]["gamma"])]).astype(int))
    x = np.asarray(flat)
    for g in groups:
        u = x[g] / np.linalg.norm(x[g])
        expected[np.ix_(g, g)] -= np.outer(u, u)
    for i in np.asarray(index["fixed"]).astype(int):
        expected[i, i] = 0.0
    assert _rel(Pm, expected) <= 1e-12
    assert _rel(Pm, Pm.T) <= 1e-12 and _rel(Pm @ Pm, Pm) <= 1e-12
    assert np.linalg.matrix_rank(Pm) == n - len(groups) - 2
    for g in groups:
        e = np.zeros(n)
        e[g] = x[g]
        assert np.linalg.norm(Pm @ e) <= 1e-12 * np.linalg.norm(e)

    names, w_masks, g_mask = C.si_group_masks(params, labels)
    assert names == ["bn", "kernel[0]", "kernel[1]", "kernel[2]", "kernel[3]"]  # order of the leaves
    assert sorted(np.flatnonzero(_np_flat(m)).tolist() for m in w_masks) == sorted(sorted(g.tolist()) for g in groups)
    assert np.flatnonzero(_np_flat(g_mask)).tolist() == sorted(np.asarray(index["head"]).astype(int).tolist())
    unit = _np_flat(C.unit_normalize(params, labels))
    for g in groups:
        assert abs(np.linalg.norm(unit[g]) - 1.0) <= 1e-15 * 4
    others = np.setdiff1d(np.arange(n), np.concatenate(groups))
    assert np.array_equal(unit[others], x[others])


def _dense_block_norms(prob, key, num_points):
    """Reference block norms: the same points as smoothness_constants, the closed-form Hessian (itself
    checked against jax.hessian in test_problems), numpy norms. Returns (L_ww (P, m, m), L_gw (P, m), L_gg (P,))."""
    keys = jnp.stack([jax.random.fold_in(key, p) for p in range(num_points)])
    hess = jax.jit(jax.vmap(lambda k: prob.hessian_closed_form(C.unit_normalize(prob.init(k), prob.labels))))
    shapes = jax.eval_shape(prob.init, key)
    _, w_masks, g_mask = C.si_group_masks(shapes, prob.labels)
    idx = [np.flatnonzero(_np_flat(m)) for m in w_masks]
    gi = np.flatnonzero(_np_flat(g_mask))
    Lww, Lgw, Lgg = [], [], []
    for H in np.asarray(hess(keys)):
        Lww.append([[np.linalg.norm(H[np.ix_(a, b)], 2) for b in idx] for a in idx])
        Lgw.append([np.linalg.norm(H[np.ix_(gi, a)], 2) if gi.size else 0.0 for a in idx])
        Lgg.append(np.linalg.norm(H[np.ix_(gi, gi)], 2) if gi.size else 0.0)
    return np.array(Lww), np.array(Lgw), np.array(Lgg)


def test_smoothness_constants_rayleigh_exact():
    """Rayleigh quotient: at a unit w the Hessian is 2 D (A - L I) D (D = I - 2 w w^T a reflection), so
    ||H(w)|| = 2 max(lambda_max - L(w), L(w) - lambda_min) exactly. The Lanczos block norm equals it at
    every sampled point, and L_ww <= sup = 2 (lambda_max - lambda_min). The record states points,
    sampling and dtype."""
    prob = P.rayleigh_quotient(dim=6, seed=1)
    key = jax.random.PRNGKey(60)
    res = C.smoothness_constants(prob.loss, prob.init, prob.labels, 6, key, lanczos_steps=30)
    assert res.num_points == 6 and res.dtype == "float64" and res.groups == ("w",)
    assert "unit norm" in res.sampling and res.per_point["L_ww"].shape == (6, 1, 1)
    keys = jnp.stack([jax.random.fold_in(key, p) for p in range(6)])
    L = np.asarray(jax.jit(jax.vmap(lambda k: prob.loss(C.unit_normalize(prob.init(k), prob.labels))))(keys))
    lam = prob.constants["eigenvalues"]
    exact = 2.0 * np.maximum(lam.max() - L, L - lam.min())
    assert _rel(res.per_point["L_ww"][:, 0, 0], exact) <= REL
    assert res.L_ww_max <= prob.constants["L_ww"] * (1 + REL)
    assert res.L_gg == 0.0 and np.all(res.L_gw == 0.0)


def test_smoothness_constants_multi_group():
    """multi_group: L_gg == lambda_max(Q) exactly (H_gg = Q everywhere); off-diagonal w-blocks are 0;
    every block norm equals numpy's norm of the closed-form Hessian block at the sampled points;
    L_gw <= ||B_i||."""
    prob = PROBLEMS["multi_group"]()  # two SI groups and g: every kind of block
    key = jax.random.PRNGKey(61)
    res = C.smoothness_constants(prob.loss, prob.init, prob.labels, 4, key, lanczos_steps=30)
    lmax_Q = np.linalg.eigvalsh(prob.constants["Q"]).max()
    assert abs(res.L_gg - lmax_Q) <= REL * lmax_Q
    assert abs(res.L_gg - prob.constants["L_gg"]) <= REL * lmax_Q
    assert res.groups == ("w0", "w1")
    off = res.L_ww[~np.eye(2, dtype=bool)]
    assert np.all(off <= 1e-12 * res.L_ww_max)
    assert np.all(res.L_gw <= np.asarray(prob.constants["L_gw_bound"]) * (1 + REL))
    Lww, Lgw, Lgg = _dense_block_norms(prob, key, 4)
    scale = res.L_ww_max
    assert np.max(np.abs(res.per_point["L_ww"] - Lww)) <= REL * scale
    assert _rel(res.per_point["L_gw"], Lgw) <= REL
    assert _rel(res.per_point["L_gg"], Lgg) <= REL


# -------------------------------------------------------------------------------------------------------
# stochastic estimators (issue 19): Hutchinson's trace and stochastic Lanczos quadrature


def _sym(n, seed=0):
    a = np.random.default_rng(seed).normal(size=(n, n))
    return (a + a.T) / 2


def test_hutchinson_trace_within_its_error(x64):
    A = jnp.asarray(_sym(40))
    est, err, samples = C.hutchinson_trace(lambda v: A @ v, 40, 400, jax.random.key(1), chunk=150)
    assert samples.shape == (400,) and float(err) > 0
    assert abs(float(est) - float(jnp.trace(A))) <= 4 * float(err)


def test_slq_weights_and_moments(x64):
    A = jnp.asarray(_sym(30, 2))
    nodes, weights = C.slq_nodes_weights(lambda v: A @ v, 30, 30, 3, jax.random.key(0))
    assert nodes.shape == (3, 30) and weights.shape == (3, 30)
    assert jnp.allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    # with k = n the quadrature is exact for v^T A v / ||v||^2 = tr(A) / n in expectation; per run exact for v
    ev = jnp.linalg.eigvalsh(A)
    assert jnp.allclose(jnp.sort(nodes[0]), ev, atol=1e-8)
    grid = jnp.linspace(-10, 10, 2001)
    dens = C.spectral_density(nodes, weights, grid, 0.2)
    assert abs(float(jnp.sum(dens) * (grid[1] - grid[0])) - 1.0) < 1e-3


def test_lanczos_linearize_same_values(x64):
    A = jnp.asarray(_sym(25, 3))
    key = jax.random.key(4)
    a = C.lanczos(lambda v: A @ v, 25, 12, key)
    b = C.lanczos(lambda v: A @ v, 25, 12, key, linearize=False)
    assert jnp.allclose(a, b, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(a))))
