"""Tests of proofs_check.problems: closed forms, scale invariance (and its failure in the controls),
unbiased stochastic losses, known curvature constants. float64 throughout, fixed seeds.

Tolerances (u = 1.1e-16, float64 unit round-off):
* scale invariance, |L(c w) - L(w)| / max(|L(w)|, 1) <= 1e-12: every loss here is a composition of at most
  ~10 reductions of length n <= 64 over O(1) terms, so each evaluation carries an error <= ~10 * n * u
  ~ 7e-14 on the O(1) loss scale; multiplying w by c = 10^k rounds every entry (relative u), which moves the
  direction by ~u and the loss by ~||grad on the sphere|| * u ~ 1e-15. 1e-12 leaves a margin of >10, and a
  genuine violation is >= 1e-6 (the controls give 0.1 to 1e5).
* closed-form vs autodiff gradients, ||g_cf - g_ad|| / ||g_ad|| <= 1e-12: both are O(n) flops per entry of
  O(1)-conditioned quantities (the points are away from stationary points), error ~ n * u ~ 1e-14.
* closed-form vs dense Hessians: 1e-10 relative (as in test_curvature: second derivatives, n <= 20).
* Monte-Carlo means: |mean - expectation| <= 5 standard errors with K = 4096 fixed-seed samples (a false
  alarm has probability ~6e-7 for a Gaussian mean; the seed makes the test deterministic).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from proofs_check import curvature as C
from proofs_check import problems as P
from proofs_check.numerics import numpy_init
from rate_tuning.groups import Label

SCALES = 10.0 ** np.arange(-3, 4)  # c in {1e-3, ..., 1e3}
K = 4096


# every test runs (and creates its arrays) in float64; the global setting is restored afterwards
pytestmark = pytest.mark.usefixtures("x64")


SI_PROBLEMS = {
    "rayleigh": lambda: P.rayleigh_quotient(dim=8, seed=0),
    "sphere": lambda: P.sphere_function(dim=20, seed=0),
    "noisy_sphere": lambda: P.noisy_sphere_function(dim=20, seed=0, noise_std=np.linspace(0.5, 1.5, 20)),
    "bn_linear": lambda: P.bn_linear_regression(n=64, d=5, seed=0, num_batches=4),
    "bn_logistic": lambda: P.bn_logistic_regression(n=64, d=5, seed=1, num_batches=4),
    "multi_group": lambda: P.multi_group(group_dims=(3, 4, 5), g_dim=4, seed=0, noise_std=0.3),
}
CONTROLS = {
    "epsilon_bn": lambda: P.epsilon_bn(n=64, d=5, seed=0, epsilon=1e-5),
    "no_normalisation": lambda: P.no_normalisation(n=64, d=5, seed=0),
    "weight_decay": lambda: P.weight_decay(P.sphere_function(dim=20, seed=0), weight_decay=1e-2),
}
ALL = {**SI_PROBLEMS, **CONTROLS}
WITH_DENSE_HESSIAN = {"rayleigh", "sphere", "bn_linear", "bn_logistic", "multi_group", "weight_decay"}


def _np_flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _random_point(prob, seed, scale=1.0):
    """N(0, 1) entries drawn with numpy (no JAX RNG to compile), every SI group rescaled to norm ``scale``."""
    return jax.tree.map(jnp.asarray, numpy_init(prob, seed, scale, "float64"))


@functools.lru_cache(maxsize=None)
def _evaluate(name):
    """One compiled pass per problem, shared by the tests below (all at a fixed random point)."""
    prob = ALL[name]()
    params = _random_point(prob, seed=3)
    _, w_masks, _ = C.si_group_masks(params, prob.labels)
    si_mask = jax.tree.map(lambda *ms: np.clip(sum(ms), 0, 1), *w_masks)
    grad_scales = np.array([0.1, 1.0, 10.0])

    def scaled(c):  # c * w on every 'si' leaf, g unchanged
        return jax.tree.map(lambda x, m: x * (1 - m) + c * x * m, params, si_mask)

    @jax.jit
    def run(keys):
        out = {"L": jax.vmap(lambda c: prob.loss(scaled(c)))(jnp.asarray(SCALES))}
        pts = jax.vmap(scaled)(jnp.asarray(grad_scales))
        out["grad"] = jax.vmap(lambda p: ravel_pytree(jax.grad(prob.loss)(p))[0])(pts)
        out["w_dirs"] = jax.vmap(lambda p: ravel_pytree(p)[0])(pts)
        if prob.grad_closed_form is not None:
            out["grad_cf"] = jax.vmap(lambda p: ravel_pytree(prob.grad_closed_form(p))[0])(pts)
        if prob.stochastic_loss is not None:
            # lax.map, not vmap: batched threefry compiles ~3x slower and the samples are cheap
            out["F"] = jax.lax.map(lambda k: prob.stochastic_loss(params, k), keys)
            if "grad_noise_variance" in prob.constants or prob.constants.get("noise_std"):
                g_full = ravel_pytree(jax.grad(prob.loss)(params))[0]
                gz = jax.lax.map(lambda k: ravel_pytree(jax.grad(prob.stochastic_loss)(params, k))[0], keys)
                out["noise_sq"] = (gz - g_full) ** 2  # (K, n), summed per group by the tests
        if name in WITH_DENSE_HESSIAN or prob.hessian_closed_form is not None:
            out["H"] = C.dense_hessian(prob.loss, params)
            if prob.hessian_closed_form is not None:
                out["H_cf"] = prob.hessian_closed_form(params)
        return out

    keys = jax.random.split(jax.random.PRNGKey(7), K)
    out = {k: np.asarray(v) for k, v in run(keys).items()}
    return prob, params, w_masks, out


# ------------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", sorted(ALL))
def test_problem_contract(name):
    """Frozen dataclass; labels match the params' structure; SI flag and control descriptions."""
    prob = ALL[name]()
    assert isinstance(prob, P.Problem)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prob.name = "x"  # type: ignore[misc]
    shapes = jax.eval_shape(prob.init, jax.random.PRNGKey(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(prob.labels, is_leaf=lambda x: isinstance(x, Label))
    assert all(isinstance(lab, Label) for lab in jax.tree.leaves(prob.labels))
    assert any(lab.kind == "si" for lab in jax.tree.leaves(prob.labels))
    assert prob.scale_invariant == (name in SI_PROBLEMS)
    assert prob.description
    if name in CONTROLS:
        assert "breaks" in prob.description


@pytest.mark.parametrize("name", ["bn_linear", "multi_group"])
def test_init_scale_and_dtype_generic(name):
    """init(key, scale, dtype): every SI group has norm `scale`; float32 params give a float32 loss and
    gradient (the fixed data is cast to the caller's dtype), float64 params a float64 one."""
    prob = ALL[name]()
    _, w_masks, _ = C.si_group_masks(jax.eval_shape(prob.init, jax.random.PRNGKey(0)), prob.labels)

    @functools.partial(jax.jit, static_argnums=1)
    def run(key, dtype):
        p = prob.init(key, scale=3.0, dtype=dtype)
        return p, prob.loss(p), jax.grad(prob.loss)(p)

    for dtype in (jnp.float32, jnp.float64):
        p, L, g = run(jax.random.PRNGKey(1), dtype)
        assert L.dtype == dtype and all(x.dtype == dtype for x in jax.tree.leaves((p, g)))
        for m in w_masks:
            norm = np.linalg.norm(_np_flat(p) * _np_flat(m))
            assert abs(norm - 3.0) <= 3.0 * (10 * np.finfo(dtype).eps)


# ------------------------------------------------------------------------------------------ invariance


def _scale_change(name) -> float:
    """``max_c |L(c w) - L(w)| / max(|L(w)|, 1)`` over ``c`` in :data:`SCALES`, every 'si' group scaled."""
    L = _evaluate(name)[3]["L"]
    L1 = L[list(SCALES).index(1.0)]
    return np.max(np.abs(L - L1)) / max(abs(L1), 1.0)


@pytest.mark.parametrize("name", sorted(SI_PROBLEMS))
def test_scale_invariance_holds(name):
    """Definition 2.1: L(c w) = L(w) for c in {1e-3..1e3} on every 'si' group, to round-off."""
    err = _scale_change(name)
    assert err <= 1e-12, err


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_scale_invariance_fails_for_controls(name):
    """Each control breaks Definition 2.1 clearly (> 1e-6) somewhere in c in {1e-3..1e3}."""
    err = _scale_change(name)
    assert err > 1e-6, err


@pytest.mark.parametrize("name", sorted(ALL))
def test_gradient_orthogonal_to_si_groups(name):
    """<grad_{w_i} L, w_i> = 0 per SI group (Sec. 2 lemma, Lemma 2.4(1)), and grad(c w) = grad(w)/c
    (claim C2), for the SI problems; the cosine is clearly non-zero for every control."""
    prob, _, w_masks, out = _evaluate(name)
    grads, pts = out["grad"], out["w_dirs"]  # rows: scales 0.1, 1, 10
    cosines = []
    for m in w_masks:
        mf = _np_flat(m).astype(bool)
        for g, w in zip(grads, pts):
            cosines.append(abs(g[mf] @ w[mf]) / (np.linalg.norm(g[mf]) * np.linalg.norm(w[mf])))
    if prob.scale_invariant:
        assert max(cosines) <= 1e-12
        si = np.clip(sum(_np_flat(m) for m in w_masks), 0, 1).astype(bool)
        # grad_w at c w is grad_w at w divided by c; grad_g unchanged
        for c, g in zip((0.1, 10.0), (grads[0], grads[2])):
            assert np.linalg.norm(c * g[si] - grads[1][si]) <= 1e-12 * np.linalg.norm(grads[1][si])
            assert np.linalg.norm(g[~si] - grads[1][~si]) <= 1e-12 * max(np.linalg.norm(grads[1][~si]), 1e-300)
    else:
        assert max(cosines) > 1e-6


@pytest.mark.parametrize("name", sorted(n for n in ALL if ALL[n]().grad_closed_form is not None))
def test_closed_form_gradient_matches_autodiff(name):
    """The independently derived gradient formulas agree with jax.grad at three scales."""
    _, _, _, out = _evaluate(name)
    for g_ad, g_cf in zip(out["grad"], out["grad_cf"]):
        assert np.linalg.norm(g_cf - g_ad) <= 1e-12 * np.linalg.norm(g_ad)


@pytest.mark.parametrize("name", sorted(n for n in ALL if ALL[n]().hessian_closed_form is not None))
def test_closed_form_hessian_matches_dense(name):
    """Closed-form Hessians (Rayleigh quotient; composite f(w/||w||); with weight decay) vs jax.hessian."""
    _, _, _, out = _evaluate(name)
    H, Hc = out["H"], out["H_cf"]
    assert np.linalg.norm(Hc - H) <= 1e-10 * np.linalg.norm(H)


# ------------------------------------------------------------------------------------------ stochastic


@pytest.mark.parametrize("name", sorted(n for n in ALL if ALL[n]().stochastic_loss is not None))
def test_stochastic_loss_is_unbiased(name):
    """E_z F_z = L: the mean of K fixed-seed samples is within 5 standard errors of the full loss."""
    prob, _, _, out = _evaluate(name)
    F = out["F"]
    L1 = out["L"][list(SCALES).index(1.0)]
    se = F.std(ddof=1) / np.sqrt(F.size)
    assert se > 0
    assert abs(F.mean() - L1) <= 5 * se, (F.mean(), L1, se)
    if "num_batches" in prob.constants:  # one value per fixed mini-batch, each drawn
        assert np.unique(np.round(F, 12)).size == prob.constants["num_batches"]


def test_noisy_sphere_gradient_noise_variance():
    """E||grad F_z - grad L||^2 = (tr Sigma - u^T Sigma u) / r^2 (A3 constant for C17/C18), Monte Carlo."""
    prob, params, _, out = _evaluate("noisy_sphere")
    D = out["noise_sq"].sum(axis=1)
    expected = float(prob.constants["grad_noise_variance"](params))
    r2 = float(np.sum(_np_flat(params) ** 2))
    cov = np.diag(prob.constants["noise_cov"])
    u = _np_flat(params) / np.sqrt(r2)
    assert abs(expected - (cov.sum() - u @ (cov * u)) / r2) <= 1e-12 * expected
    assert abs(D.mean() - expected) <= 5 * D.std(ddof=1) / np.sqrt(D.size)


def test_multi_group_gradient_noise_variance():
    """multi_group noise: E||grad_{w_i} F - grad_{w_i} L||^2 = s^2 (d_i - 1) / r_i^2 and
    E||grad_g F - grad_g L||^2 = s^2 d_g (Monte Carlo, 5 standard errors)."""
    prob, params, w_masks, out = _evaluate("multi_group")
    s2 = prob.constants["noise_std"] ** 2
    x = _np_flat(params)
    for m in w_masks:
        mf = _np_flat(m).astype(bool)
        D = out["noise_sq"][:, mf].sum(axis=1)
        expected = s2 * (mf.sum() - 1) / np.sum(x[mf] ** 2)
        assert abs(D.mean() - expected) <= 5 * D.std(ddof=1) / np.sqrt(D.size)
    g = ~np.clip(sum(_np_flat(m) for m in w_masks), 0, 1).astype(bool)
    D = out["noise_sq"][:, g].sum(axis=1)
    assert abs(D.mean() - s2 * g.sum()) <= 5 * D.std(ddof=1) / np.sqrt(D.size)


# ------------------------------------------------------------------------------------------ known curvature


def test_multi_group_hessian_structure():
    """H_gg = Q (so L_gg = lambda_max(Q) = constants['L_gg'] exactly), H_{w_i w_j} = 0 for i != j,
    ||H_{g w_i}|| <= ||B_i|| (at unit norm)."""
    prob, params, w_masks, out = _evaluate("multi_group")
    H = out["H"]
    idx = [np.flatnonzero(_np_flat(m)) for m in w_masks]
    gi = np.setdiff1d(np.arange(H.shape[0]), np.concatenate(idx))
    Q = prob.constants["Q"]
    assert np.max(np.abs(H[np.ix_(gi, gi)] - Q)) <= 1e-12 * np.abs(Q).max()
    assert abs(np.linalg.eigvalsh(Q).max() - prob.constants["L_gg"]) <= 1e-12 * prob.constants["L_gg"]
    for a in range(len(idx)):
        for b in range(len(idx)):
            if a != b:
                assert np.max(np.abs(H[np.ix_(idx[a], idx[b])])) <= 1e-14 * np.abs(H).max()
    for a in idx:  # the point has unit-norm groups (_random_point with scale 1)
        assert abs(np.linalg.norm(_np_flat(params)[a]) - 1.0) <= 1e-14
    for a, bound in zip(idx, prob.constants["L_gw_bound"]):
        assert np.linalg.norm(H[np.ix_(gi, a)], 2) <= bound * (1 + 1e-12)


@pytest.mark.parametrize("name,expected", [("bn_linear", "identity"), ("bn_logistic", "bound")])
def test_bn_gg_block(name, expected):
    """BN regression, (gamma, beta) block: = I for squared loss (x_hat has mean 0, mean square 1 in every
    batch: L_gg = 1), eigenvalues in [0, 1/4] for logistic loss (sigma' <= 1/4)."""
    prob, params, w_masks, out = _evaluate(name)
    H = out["H"]
    gi = np.flatnonzero(1 - np.clip(sum(_np_flat(m) for m in w_masks), 0, 1))
    Hgg = H[np.ix_(gi, gi)]
    assert gi.size == 2
    if expected == "identity":
        assert np.max(np.abs(Hgg - np.eye(2))) <= 1e-12 and prob.constants["L_gg"] == 1.0
    else:
        ev = np.linalg.eigvalsh(Hgg)
        assert ev.min() >= -1e-14 and ev.max() <= prob.constants["L_gg_bound"]


def test_rayleigh_hessian_spectrum_on_unit_sphere():
    """At a unit w (the random point), the dense Hessian's spectrum is {2 (lambda_j - L(w))} (reflection
    identity H = 2 D (A - L I) D), so its norm is at most constants['L_ww'] = 2 (lambda_max - lambda_min)."""
    prob, params, _, out = _evaluate("rayleigh")
    ev = np.linalg.eigvalsh(out["H"])
    expected = np.sort(np.asarray(prob.constants["hessian_eigenvalues_on_sphere"](params)))
    assert np.max(np.abs(ev - expected)) <= 1e-12 * np.abs(expected).max()
    assert np.abs(ev).max() <= prob.constants["L_ww"]


def test_rayleigh_stationary_points_and_spectrum():
    """Eigenvectors are stationary (grad = 0) and the closed-form Hessian there, projected on the tangent
    space, has the spectrum exposed by spectrum_on_sphere: {2 (lambda_j - lambda_k)}_{j != k} and 0."""
    prob = ALL["rayleigh"]()
    lam = prob.constants["eigenvalues"]

    @jax.jit
    def at(p):
        return prob.grad_closed_form(p)["w"], jax.grad(prob.loss)(p)["w"], prob.hessian_closed_form(p)

    for k in range(lam.size):
        p = prob.constants["stationary_point"](k, scale=2.0)
        g_cf, g_ad, Hc = (np.asarray(x) for x in at(p))
        assert np.linalg.norm(g_cf) <= 1e-14 and np.linalg.norm(g_ad) <= 1e-14
        u = np.asarray(p["w"]) / 2.0
        Pm = np.eye(lam.size) - np.outer(u, u)
        ev = np.linalg.eigvalsh(4.0 * Pm @ Hc @ Pm)  # 4 = r^2: the unit-sphere Hessian
        assert np.max(np.abs(ev - prob.spectrum_on_sphere(k))) <= 1e-12 * np.abs(lam).max()


def test_default_problems_and_batch_norm_exact():
    """default_problems lists every constructor once; batch_norm_exact standardises and is invariant."""
    names = [p.name for p in P.default_problems()]
    assert len(names) == len(set(names)) == 9
    x = np.random.default_rng(0).standard_normal((3, 16))
    y = np.asarray(P.batch_norm_exact(jnp.asarray(x)))
    assert np.max(np.abs(y.mean(axis=-1))) <= 1e-15 and np.max(np.abs((y**2).mean(axis=-1) - 1)) <= 1e-14
    assert np.max(np.abs(np.asarray(P.batch_norm_exact(jnp.asarray(1e-3 * x))) - y)) <= 1e-13
