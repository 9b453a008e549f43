"""Checks of the GD theorem with the project's explicit constants (C9-C12, C14, C15) and of its proof chain.

The theorem (PAPER §4.1; the rate is the paper's [Q], the conditions [R], the constants are the project's
own, the paper's being unknown [U]): full-batch GD with **any** constant ``lr_w > 0`` on the scale-invariant
groups and ``lr_g = 2 c_g / L^gg``, ``c_g`` in ``(0, 1)``, on the rest gives

    min_{t<T} ||grad L(V_t; g_t)||^2  <=  (1/T) sum_{t<T} ||grad L(V_t; g_t)||^2  <=  C / T,
    ||w_t^(i)||^2 <= lr_w * bbar_i                       for every t (the norms plateau),

with ``C``, ``bbar_i``, the threshold ``rho*`` of the monotone phase (I4) and the phase-1 budget (I6) the
explicit formulas of :func:`gd_constants`, derived in ``docs/derivations.md`` ("The GD theorem with
explicit constants"). The constants are evaluated from rigorous analytic bounds of the smoothness and
gradient constants of each test problem (:func:`multi_group_bounds`, :func:`sphere_bounds`,
:func:`rayleigh_bounds`), never from estimates, so ``C / T`` is a true upper bound that a run must respect.

Runs (all float64, ``jax.enable_x64`` at each check's entry):

* ``multi_group`` (three SI groups, quadratic ``g``-part with ``L^gg = 3``): one compiled program
  (:func:`_reduce_runner`) that vmaps every run of C9-C12, C14, C15 and their controls over traced
  ``lr_w``, ``lr_g`` and a per-run projection flag, scans the steps, and reduces on the fly what the checks
  need over every step (running minimum, hitting times, loss increases before/after the crossing
  ``rho_i <= rho*``, the per-step inequalities I4 and (*), phase-1 budget, jump count) without storing the
  ``10^5``-step histories;
* ``sphere_function`` (the project's toy, C9's second problem), the log-spectrum Rayleigh quotient (C10's
  1/T-tight problem) and the SGD control of C12: :func:`rate_tuning.sweep.make_sweep`.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019
(GD theorem, PAPER §4.1 and the proof skeleton I1-I8; claims C9-C12, C14, C15).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from proofs_check import problems
from proofs_check import trajectories as traj
from proofs_check.claims import claim
from proofs_check.curves import curve
from proofs_check.evidence import Evidence
from proofs_check.numerics import gamma, numpy_init, unit_roundoff, x64
from rate_tuning import groups as G
from rate_tuning import metrics as M
from rate_tuning import optim
from rate_tuning import record as R
from rate_tuning import sweep as S

__all__ = ["Bounds", "GDConstants", "gd_constants", "multi_group_bounds", "sphere_bounds", "rayleigh_bounds",
           "log_spectrum_eigenvalues", "ols_slope", "bootstrap_mean_ci", "slope_tolerance"]

# -------------------------------------------------------------------------------------------------------
# A1, A2, A2': analytic bounds of the smoothness and gradient constants on a region containing the run
# -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Upper bounds of the constants of A1/A2' and a lower bound of A2 on a region ``R`` of the unit set.

    ``R`` contains every iterate and every segment ``theta_t -> theta_{t+1}`` after normalising the SI
    groups (convex in ``g``). Attributes:

      problem: the problem's name; groups: SI group names (order of the tuples).
      L_ww: ``Lambda``, the largest eigenvalue of the non-negative symmetric matrix ``(L^ww_ij)``
        (``max_i L^ww_ii`` when the ``ww`` blocks are block-diagonal).
      L_gw: ``L^gw_i`` per group (``()`` entries 0 when there is no ``g``).
      L_gg: ``L^gg`` (0 when there is no scale-variant ``g``).
      G_w: ``G_i >= ||grad_{w_i} L(V; g)||`` on ``R`` (A2').
      G_g: ``G_g >= ||grad_g L(V; g)||`` on ``R``.
      L_min: a lower bound of ``L`` (A2).
      M_abs: a bound of the sum of the absolute values of the terms of ``L`` on ``R`` (round-off scale).
      n_ops: number of floating-point terms in one evaluation of ``L`` (for ``gamma_n``).
      region: how ``R`` was bounded.
      R_g: radius of the ball of ``g`` in ``R`` (0 without ``g``).
    """

    problem: str
    groups: tuple[str, ...]
    L_ww: float
    L_gw: tuple[float, ...]
    L_gg: float
    G_w: tuple[float, ...]
    G_g: float
    L_min: float
    M_abs: float
    n_ops: int
    region: str
    R_g: float = 0.0

    @property
    def has_g(self) -> bool:
        return self.L_gg > 0

    def loss_tolerance(self) -> float:
        """``gamma_n * M_abs``: the round-off of one computed value of ``L`` on ``R`` (Higham §3.1)."""
        return gamma(self.n_ops, "float64") * self.M_abs

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _op_norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64), 2))


def _abs_sum(x) -> float:
    return float(np.sum(np.abs(np.asarray(x, np.float64))))


def sphere_part(A, b, B_norm: float, R_g: float) -> tuple[float, float]:
    """``(G, L^ww)`` of ``w -> f(w/||w||) + g^T B w/||w||``, ``f(u) = u^T A u + 0.5 sin(b^T u)``, ``||g|| <= R_g``.

    On the unit sphere the Euclidean gradient is ``P G`` with ``G = 2 A u + 0.5 cos(b.u) b + B^T g``, so
    ``a <= ||G|| <= 2 ||A|| + 0.5 ||b|| + ||B|| R_g``. The Hessian is
    ``P M P - (u.G) P - (P G) u^T - u (P G)^T`` (:func:`proofs_check.problems._composite_grad_hess`) with
    ``M = 2 A - 0.5 sin(b.u) b b^T``; on ``span(u, PG)`` the last three terms are
    ``[[0, -|PG|], [-|PG|, -u.G]]`` and ``-(u.G)`` elsewhere, of norm ``<= |u.G| + |PG| <= sqrt(2) ||G||``.
    Hence ``L^ww <= 2 ||A|| + 0.5 ||b||^2 + sqrt(2) G``.
    """
    a_norm, b_norm = _op_norm(A), float(np.linalg.norm(b))
    G_w = 2.0 * a_norm + 0.5 * b_norm + B_norm * R_g
    return G_w, 2.0 * a_norm + 0.5 * b_norm**2 + math.sqrt(2.0) * G_w


def sphere_bounds(prob: problems.Problem) -> Bounds:
    """Bounds for :func:`proofs_check.problems.sphere_function` (global: the unit set is compact, no ``g``).

    ``L_min >= lambda_min(A) - 0.5``; the loss sums ``d^2`` products ``A_jk u_j u_k`` and the sine.
    """
    A, b = prob.constants["A"], prob.constants["b"]
    d = A.shape[0]
    G_w, L_ww = sphere_part(A, b, 0.0, 0.0)
    return Bounds(prob.name, ("w",), L_ww, (0.0,), 0.0, (G_w,), 0.0, float(np.linalg.eigvalsh(A)[0]) - 0.5,
                  _abs_sum(A) + 0.5 + 0.5 * _abs_sum(b), 4 * (d * d + 2 * d), "the whole unit sphere")


def rayleigh_bounds(prob: problems.Problem) -> Bounds:
    """Exact constants of the Rayleigh quotient ``w^T A w / w^T w`` (PAPER §7 problems; global).

    ``sup ||H|| = 2 (lambda_max - lambda_min)`` on the unit sphere (``problems.rayleigh_quotient``), and
    ``||grad|| = 2 ||(A - L) u|| = 2 sqrt(Var_u(lambda))`` whose supremum is ``lambda_max - lambda_min``
    (a two-point distribution at the extreme eigenvalues); ``L_min = lambda_min``.
    """
    lam = np.asarray(prob.constants["eigenvalues"], np.float64)
    A = prob.constants["A"]
    d = A.shape[0]
    spread = float(lam.max() - lam.min())
    return Bounds(prob.name, ("w",), 2.0 * spread, (0.0,), 0.0, (spread,), 0.0, float(lam.min()),
                  _abs_sum(A), 4 * (d * d + 2 * d), "the whole unit sphere")


def g_radius(prob: problems.Problem, lr_g: float, g0_norm: float) -> float:
    """A-priori radius ``R_g`` of the ball that contains every ``g_t`` of GD on :func:`problems.multi_group`.

    ``g_{t+1} = (I - lr_g Q) g_t - lr_g sum_i B_i u_i``, so ``||g_{t+1}|| <= gam ||g_t|| + lr_g beta`` with
    ``gam = max_j |1 - lr_g q_j| < 1`` (that is ``lr_g < 2 / L^gg``) and ``beta = sum_i ||B_i||``; by induction
    ``||g_t|| <= max(||g_0||, lr_g beta / (1 - gam))``. Infinite when ``gam >= 1``.
    """
    q = np.linalg.eigvalsh(prob.constants["Q"])
    gam = float(np.max(np.abs(1.0 - lr_g * q)))
    beta = sum(_op_norm(B) for B in prob.constants["B"])
    return math.inf if gam >= 1 else max(float(g0_norm), lr_g * beta / (1.0 - gam))


def multi_group_bounds(prob: problems.Problem, lr_g: float, g0_norm: float) -> Bounds:
    """Bounds for :func:`proofs_check.problems.multi_group` on ``R = {unit SI groups, ||g|| <= R_g}``.

    ``R_g`` is :func:`g_radius` (a-priori, needs ``lr_g < 2 / L^gg``). On ``R`` (group ``i``: ``A_i``,
    ``b_i``, ``B_i``): ``G_i``, ``L^ww_ii`` from :func:`sphere_part` with the coupling ``B_i^T g``;
    ``L^ww_ij = 0`` for ``i != j``, so ``Lambda = max_i L^ww_ii``; ``L^gw_i = ||B_i||`` (``H_{g w_i} = B_i P_i``);
    ``L^gg = lambda_max(Q)``; ``G_g = lambda_max(Q) R_g + sum_i ||B_i||``;
    ``L_min >= sum_i (lambda_min(A_i) - 0.5) - (sum_i ||B_i||)^2 / (2 lambda_min(Q))`` (minimise the
    quadratic in ``g`` with ``||sum_i B_i u_i|| <= sum_i ||B_i||``).
    """
    c = prob.constants
    R_g = g_radius(prob, lr_g, g0_norm)
    if not math.isfinite(R_g):
        raise ValueError(f"lr_g = {lr_g} is not below 2 / L_gg = {2 / c['L_gg']}: no bounded region for g")
    q = np.linalg.eigvalsh(c["Q"])
    B_norms = [_op_norm(B) for B in c["B"]]
    parts = [sphere_part(A, b, Bn, R_g) for A, b, Bn in zip(c["A"], c["b"], B_norms)]
    beta = sum(B_norms)
    groups = tuple(f"w{i}" for i in range(len(c["A"])))
    L_min = sum(float(np.linalg.eigvalsh(A)[0]) - 0.5 for A in c["A"]) - beta**2 / (2.0 * float(q[0]))
    M_abs = sum(_abs_sum(A) + 0.5 + 0.5 * _abs_sum(b) + _abs_sum(B) * R_g for A, b, B in zip(c["A"], c["b"], c["B"]))
    M_abs += 0.5 * _abs_sum(c["Q"]) * R_g**2
    g_dim = c["Q"].shape[0]
    n_ops = 4 * (sum(A.shape[0] ** 2 + A.shape[0] * (g_dim + 2) for A in c["A"]) + g_dim**2)
    return Bounds(prob.name, groups, max(p[1] for p in parts), tuple(B_norms), float(q[-1]),
                  tuple(p[0] for p in parts), float(q[-1]) * R_g + beta, L_min, M_abs, n_ops,
                  f"unit SI groups and ||g|| <= R_g = {R_g:.4g} (a-priori, lr_g = {lr_g:.4g})", R_g)


# -------------------------------------------------------------------------------------------------------
# the explicit constants (docs/derivations.md, "The GD theorem with explicit constants")
# -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GDConstants:
    """The explicit constants of the GD theorem for one run (formulas in :func:`gd_constants`)."""

    lr_w: float
    lr_g: float
    c_g: float
    kappa: float
    K: float
    rho_star: float
    B_star: float
    b0: tuple[float, ...]
    n_jump: tuple[int, ...]
    N_J: int
    J1: float
    S_bad: float
    Delta: float
    b_bar: tuple[float, ...]
    G_tot_sq: float
    m_bad: int
    C: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def gd_constants(bd: Bounds, lr_w: float, lr_g: float | None, w0_sq, L0: float) -> GDConstants:
    """The project's explicit GD constants (docs/derivations.md; the paper's are unknown [U]).

    With ``Lambda = bd.L_ww``, ``ell^2 = sum_i (L^gw_i)^2``, ``c_g = lr_g L^gg / 2`` (0 without ``g``),
    ``b_{i,0} = ||w_{i,0}||^2 / lr_w``::

        kappa = (1 - c_g) / 2,     K = Lambda / 2 + lr_g ell^2 / (2 (1 - c_g)),
        rho*  = (1 + c_g) / (2 K), B* = 1 / rho*                                    (I4)
        n_i   = ceil(log2(B* / b_{i,0})) if b_{i,0} < B* else 0,   N_J = sum_i n_i  (jump steps)
        J_1   = pi sum_i G_i + lr_g pi^2 (sum_i L^gw_i)^2 / (4 (1 - c_g))          (one jump step)
        S_bad = (K / ln 2) sum_{i: b_{i,0} < B*} ln(2 B* / b_{i,0})                (I6)
        Delta = L(theta_0) - L_min + N_J J_1 + S_bad
        bbar_i = (B* + G_i^2 / b_{i,0} if b_{i,0} < B* else b_{i,0}) + N_J rho* G_i^2 + Delta / kappa   (I7)
        C     = N_J (sum_i G_i^2 + G_g^2) + 2 m_bad B*^2 + max(max_i bbar_i, 1 / lr_g) Delta / kappa  (I8)

    with ``m_bad = #{i: b_{i,0} < B*}`` (the ``1 / lr_g`` term is absent without ``g``). Then
    ``sum_{t<T} ||grad L(V_t; g_t)||^2 <= C`` for every ``T`` and ``||w_{i,t}||^2 <= lr_w bbar_i``.

    Raises ``ValueError`` unless ``c_g < 1`` (``lr_g < 2 / L^gg``: the theorem's hypothesis).
    """
    w0_sq = np.atleast_1d(np.asarray(w0_sq, np.float64))
    has_g = bd.has_g
    lr_g = float(lr_g) if has_g else 0.0
    c_g = lr_g * bd.L_gg / 2.0 if has_g else 0.0
    if not c_g < 1.0:
        raise ValueError(f"c_g = {c_g:g} >= 1: lr_g is not below 2 / L_gg")
    G_w, L_gw = np.asarray(bd.G_w), np.asarray(bd.L_gw)
    kappa = (1.0 - c_g) / 2.0
    K = bd.L_ww / 2.0 + (lr_g * float(np.sum(L_gw**2)) / (2.0 * (1.0 - c_g)) if has_g else 0.0)
    rho_star = (1.0 + c_g) / (2.0 * K)
    B_star = 1.0 / rho_star
    b0 = w0_sq / lr_w
    bad0 = b0 < B_star
    n_jump = np.where(bad0, np.ceil(np.log2(np.where(bad0, B_star / b0, 1.0))), 0).astype(int)
    N_J = int(n_jump.sum())
    J1 = math.pi * float(G_w.sum())
    if has_g:
        J1 += lr_g * math.pi**2 * float(L_gw.sum()) ** 2 / (4.0 * (1.0 - c_g))
    S_bad = K / math.log(2.0) * float(np.sum(np.where(bad0, np.log(np.where(bad0, 2.0 * B_star / b0, 1.0)), 0.0)))
    Delta = float(L0) - bd.L_min + N_J * J1 + S_bad
    b_bar = np.where(bad0, B_star + G_w**2 / b0, b0) + N_J * rho_star * G_w**2 + Delta / kappa
    G_tot_sq = float(np.sum(G_w**2)) + bd.G_g**2
    m_bad = int(bad0.sum())
    C = N_J * G_tot_sq + 2.0 * m_bad * B_star**2 + max(float(b_bar.max()), 1.0 / lr_g if has_g else 0.0) * Delta / kappa
    return GDConstants(float(lr_w), lr_g, c_g, kappa, K, rho_star, B_star, tuple(b0.tolist()), tuple(n_jump.tolist()),
                       N_J, J1, S_bad, Delta, tuple(b_bar.tolist()), G_tot_sq, m_bad, float(C))


# -------------------------------------------------------------------------------------------------------
# statistics
# -------------------------------------------------------------------------------------------------------


def ols_slope(x, y) -> tuple[float, float]:
    """OLS slope of ``y`` on ``x`` and its standard error ``sqrt(s^2 / Sxx)``, ``s^2 = RSS / (n - 2)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (y - y.mean())) / sxx
    resid = y - y.mean() - slope * xc
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / sxx) if len(x) > 2 else math.inf
    return slope, se


def slope_tolerance(x, e_max: float) -> float:
    """Worst-case change of an OLS slope when every ``y_i`` moves by at most ``e_max``:
    ``e_max sum_i |x_i - xbar| / sum_i (x_i - xbar)^2``."""
    xc = np.asarray(x, np.float64) - np.mean(x)
    return float(e_max * np.sum(np.abs(xc)) / np.sum(xc**2))


def bootstrap_mean_ci(values, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampling the values with replacement)."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# t quantiles (0.975) for the OLS confidence intervals of the controls' slopes
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 8: 2.306, 10: 2.228, 15: 2.131, 20: 2.086,
         30: 2.042}


def _t975(dof: int) -> float:
    keys = sorted(_T975)
    return _T975[max(k for k in keys if k <= dof)] if dof >= 1 else math.inf


# -------------------------------------------------------------------------------------------------------
# problems and programs
# -------------------------------------------------------------------------------------------------------


def log_spectrum_eigenvalues(num: int = 41, lo: float = 1e-5, hi: float = 1.0) -> np.ndarray:
    """``[0, lambda_1..lambda_num]`` with ``lambda_k`` log-spaced in ``[lo, hi]`` (C10's 1/T-tight problem)."""
    return np.concatenate([[0.0], np.geomspace(lo, hi, num)])


@functools.lru_cache(maxsize=None)
def _problem(name: str) -> problems.Problem:
    return {
        "multi": lambda: problems.multi_group(),
        "sphere": lambda: problems.sphere_function(dim=20, seed=0),
        "log_rayleigh": lambda: problems.rayleigh_quotient(dim=42, seed=0, eigenvalues=log_spectrum_eigenvalues()),
    }[name]()


PROGRAMS: dict[str, dict[str, Any]] = {
    # the multi_group program (one compile) serves C9-C12, C14, C15 and their controls
    "quick": dict(
        steps=100_000, every=100, r0=1.8, lr_w=tuple(10.0 ** np.arange(-4.0, 4.01, 0.5)), c_g=0.5,
        c15_lr_w=(1e-2, 1.0, 1e2), c15_c_g=(0.25, 0.9, 1.1, 1.5),
        projected_lr_w=(10**2.5, 1e3, 10**3.5, 1e4),
        eps_rel=1e-3, eps_c11_rel=2e-3, c11_points=4,
        sphere=dict(steps=100_000, every=100, r0=1.4),
        tight=dict(steps=2000, seeds=8, rho0=0.25, window=(10, 1000), num_points=21),
        sgd=dict(steps=20_000, every=100, lr_w=(1.0,)),
        slack=dict(steps=2000, r0=2.0, rho0=(0.02, 0.05)),
    ),
    "full": dict(
        steps=1_000_000, every=1000, r0=1.8, lr_w=tuple(10.0 ** np.arange(-4.0, 4.01, 0.25)), c_g=0.5,
        c15_lr_w=(1e-4, 1e-2, 1.0, 1e2, 1e4), c15_c_g=(0.1, 0.5, 0.9, 0.99, 1.01, 1.1, 1.5, 2.0),
        projected_lr_w=(10**2.5, 10**2.75, 1e3, 10**3.25, 10**3.5, 10**3.75, 1e4),
        eps_rel=1e-6, eps_c11_rel=1e-5, c11_points=5,
        sphere=dict(steps=1_000_000, every=1000, r0=1.4),
        tight=dict(steps=2000, seeds=32, rho0=0.25, window=(10, 1000), num_points=41),
        sgd=dict(steps=200_000, every=1000, lr_w=(0.1, 1.0, 10.0)),
        slack=dict(steps=4000, r0=2.0, rho0=(0.01, 0.02, 0.05)),
    ),
}


def _lr_g(c_g: float, L_gg: float) -> float:
    return 2.0 * c_g / L_gg


# ---- the reducing runner (multi_group) -----------------------------------------------------------------

_RUNNERS: dict = {}


def _reduce_runner(loss: Callable, labels, example, steps: int, every: int, n_eps: int):
    """``jit(vmap(run))``: GD with :func:`rate_tuning.optim.two_rate_sgd` (traced ``lr_w``, ``lr_g``) and,
    per run, the sphere projection of :func:`rate_tuning.optim.project_si_groups` (a traced flag), for
    ``steps`` steps, reducing the proof chain's quantities over every step.

    ``run(params, lr_w, lr_g, project, consts, eps_rel)`` with ``consts`` the per-run scalars ``rho_star``,
    ``K``, ``kappa``, ``J1`` (of :func:`gd_constants`), ``M_abs`` (round-off scale) and ``tol_inc`` (the
    round-off threshold of a loss increase), and ``eps_rel`` the levels of the hitting times relative to
    ``gn_0``. Returns ``(records, acc, final)``: ``records`` at ``t = 0, k, 2k, ...`` (``L``,
    ``gn = ||grad L(V_t;g_t)||^2``, ``a2 = a_i^2``, ``ws = ||w_i||^2``, ``g_sq = ||g||^2``, and ``m`` and ``S``, the
    running minimum and the sum of ``gn`` over ``t' < t + k``); ``acc`` the reductions over all steps (running
    min, sum, hitting steps, crossing step ``tau``, jump count, the sums of ``good_t``/``bad_t``, the maxima of the
    normalised I4 and (*) residuals, loss increases before/after the crossing, maxima of ``a_i^2``, ``b^2``,
    ``||g||^2``); ``final`` ``L`` and ``ws`` at ``theta_T``.
    Step ``t`` is judged once ``L_{t+1}`` is known (``settle``), so every step ``t < T`` is covered.
    """
    key = (id(loss), id(labels), steps, every, n_eps)
    if key in _RUNNERS:
        return _RUNNERS[key][0]
    groups = tuple(G.si_groups(example, labels))
    m = len(groups)
    if steps % every:
        raise ValueError(f"steps ({steps}) must be a multiple of every ({every})")
    n_rec = steps // every
    project = optim.project_si_groups(labels)

    def ws_of(params):
        w_sq = G.group_sq_norms(params, labels)
        return jnp.stack([w_sq[g] for g in groups])

    def one_run(params, lr_w, lr_g, proj, c, eps_rel):
        tx = optim.two_rate_sgd(labels, lr_w, lr_g)
        dt = lr_w.dtype
        ninf = jnp.asarray(-jnp.inf, dt)

        def summary(L, a2, b2, rho):
            bad = rho > c["rho_star"]
            ra2 = rho**2 * a2
            first = jnp.sum(rho * a2) + lr_g * b2
            bad_term = c["K"] * jnp.sum(jnp.where(bad, ra2, 0.0))
            return dict(L=L, first=first, good=jnp.sum(jnp.where(bad, 0.0, rho * a2)) + lr_g * b2, bad=bad_term,
                        jump=jnp.any(bad & (ra2 > 1.0)), crossed=~jnp.any(bad),
                        scale=c["M_abs"] + first + bad_term, valid=jnp.array(True))

        def settle(acc, prev, L_next):
            """Judge step ``t`` (``prev``) with ``d = L_{t+1} - L_t``."""
            d = L_next - prev["L"]
            v = prev["valid"]
            acc = dict(acc)
            star = (d + c["kappa"] * prev["good"] - prev["bad"]) / prev["scale"]          # (*) on t not in J
            acc["star_max"] = jnp.fmax(acc["star_max"], jnp.where(v & ~prev["jump"], star, ninf))
            acc["jump_max"] = jnp.fmax(acc["jump_max"], jnp.where(v & prev["jump"], d - c["J1"], ninf))
            i4 = (d + c["kappa"] * prev["first"]) / prev["scale"]                          # I4 once crossed
            acc["i4_max"] = jnp.fmax(acc["i4_max"], jnp.where(v & prev["crossed"], i4, ninf))
            inc = v & (d > c["tol_inc"])
            acc["inc_before"] += (inc & ~prev["crossed"]).astype(jnp.int32)
            acc["inc_after"] += (inc & prev["crossed"]).astype(jnp.int32)
            acc["inc_sum_before"] += jnp.where(v & ~prev["crossed"], jnp.maximum(d, 0.0), 0.0)
            acc["inc_max_after"] = jnp.fmax(acc["inc_max_after"], jnp.where(v & prev["crossed"], d, ninf))
            return acc

        def step(carry, t):
            params, st, acc, prev = carry
            L, gL = jax.value_and_grad(loss)(params)
            u, st = tx.update(gL, st, params)
            up, _ = project.update(u, optim.ProjectState(), params)
            u = jax.tree_util.tree_map(lambda a, b: jnp.where(proj, b, a), u, up)
            new_params = optax.apply_updates(params, u)
            q = R.step_record(params, new_params, gL, labels, lr_w, loss=L)  # the library's per-step record
            per, gn = q[R.INTRINSIC_GROUPS], q[R.INTRINSIC]
            a2, b2 = jnp.stack([per[g] for g in groups]), per[G.VARIANT]
            ws, rho = (jnp.stack([q[key][g] for g in groups]) for key in (R.W_SQ, R.EFF_LR))
            acc = settle(acc, prev, L)
            cur = summary(L, a2, b2, rho)
            acc["gn0"] = jnp.where(t == 0, gn, acc["gn0"])
            acc["m"] = jnp.fmin(acc["m"], gn)
            acc["S_grad"] += gn
            acc["hit"] = jnp.where((acc["hit"] < 0) & (gn <= eps_rel * acc["gn0"]), t, acc["hit"])
            acc["N_J"] += cur["jump"].astype(jnp.int32)
            acc["S_good"] += jnp.where(cur["jump"], 0.0, cur["good"])
            acc["S_bad"] += jnp.where(cur["jump"], 0.0, cur["bad"])
            acc["tau"] = jnp.where((acc["tau"] < 0) & cur["crossed"], t, acc["tau"])
            acc["max_a2"] = jnp.fmax(acc["max_a2"], a2)
            acc["max_b2"] = jnp.fmax(acc["max_b2"], b2)
            acc["max_g_sq"] = jnp.fmax(acc["max_g_sq"], M.variant_sq_norm(params, labels))
            rec = dict(L=L, gn=gn, ws=ws, a2=a2, g_sq=M.variant_sq_norm(params, labels))
            return (new_params, st, acc, cur), rec

        def chunk(carry, t0):
            carry, rec = jax.lax.scan(step, carry, t0 + jnp.arange(every, dtype=jnp.int32))
            return carry, dict(jax.tree_util.tree_map(lambda x: x[0], rec), m=carry[2]["m"], S=carry[2]["S_grad"])

        z = jnp.zeros((), dt)
        i0 = jnp.int32(0)
        acc = dict(m=jnp.asarray(jnp.inf, dt), gn0=z, S_grad=z, hit=-jnp.ones(eps_rel.shape, jnp.int32), N_J=i0,
                   S_good=z, S_bad=z, tau=jnp.int32(-1), max_a2=jnp.zeros((m,), dt), max_b2=z, max_g_sq=z,
                   star_max=ninf, jump_max=ninf, i4_max=ninf, inc_before=i0, inc_after=i0, inc_sum_before=z,
                   inc_max_after=ninf)
        prev = dict(L=z, first=z, good=z, bad=z, jump=jnp.array(False), crossed=jnp.array(False),
                    scale=jnp.ones((), dt), valid=jnp.array(False))
        carry = (params, tx.init(params), acc, prev)
        carry, recs = jax.lax.scan(chunk, carry, jnp.arange(n_rec, dtype=jnp.int32) * every)
        params, _, acc, prev = carry
        L = loss(params)
        acc = settle(acc, prev, L)
        return recs, acc, dict(L=L, ws=ws_of(params))

    fn = jax.jit(jax.vmap(one_run))
    _RUNNERS[key] = (fn, loss, labels)  # keep the objects alive: ids stay unique
    return fn


@dataclasses.dataclass
class _Run:
    """One run of the multi_group program: its setting, constants and what the runner measured."""

    kind: str             # 'main', 'c15', 'projected'
    lr_w: float
    c_g: float
    lr_g: float
    project: bool
    consts: GDConstants | None      # the theorem's constants (None when c_g >= 1 or projected)
    crossing: GDConstants          # constants that define rho* for the counts (c_g = 0.5 region for controls)
    bounds: Bounds
    recs: dict
    acc: dict
    final: dict

    @property
    def setting(self) -> str:
        opt = "projected GD (fixed effective lr)" if self.project else "GD"
        return f"{opt} lr_w={self.lr_w:.3g} lr_g={self.lr_g:.4g} (c_g={self.c_g:g})"


@dataclasses.dataclass
class _Program:
    name: str
    prob: problems.Problem
    steps: int
    every: int
    r0: float
    gn0: float
    L0: float
    eps: float
    eps_c11: float
    runs: list
    rec_T: np.ndarray           # T of recs['m'][c]: (c + 1) * every
    rec_t: np.ndarray           # t of the other records: c * every

    def select(self, kind: str, **match) -> list:
        return [r for r in self.runs if r.kind == kind and all(
            (abs(getattr(r, k) - v) <= 1e-12 * max(1.0, abs(v)) if isinstance(v, float) else getattr(r, k) == v)
            for k, v in match.items())]

    def describe(self) -> str:
        return (f"{self.prob.name}, ||w_i0||={self.r0:g} (every SI group), g0 ~ N(0, I) (seed 0), {self.steps} steps, "
                f"float64")


@functools.lru_cache(maxsize=None)
def _multi_program(name: str) -> _Program:
    """Run every multi_group run of program ``name`` in one compiled call (cached: shared by the claims)."""
    cfg = PROGRAMS[name]
    prob = _problem("multi")
    L_gg = prob.constants["L_gg"]
    with x64():
        p0 = numpy_init(prob, 0, cfg["r0"], "float64")
        labels = prob.labels
        groups = tuple(G.si_groups(p0, labels))
        w0_sq = np.array([float(np.sum(np.asarray(p0[g]) ** 2)) for g in groups])
        g0_norm = float(np.linalg.norm(p0["g"]))
        ref_bounds = multi_group_bounds(prob, _lr_g(cfg["c_g"], L_gg), g0_norm)
        specs = [("main", lw, cfg["c_g"], False) for lw in cfg["lr_w"]]
        specs += [("c15", lw, cg, False) for lw in cfg["c15_lr_w"] for cg in cfg["c15_c_g"] if cg != cfg["c_g"]]
        specs += [("projected", lw, cfg["c_g"], True) for lw in cfg["projected_lr_w"]]
        # the counts need rho*, K, kappa, J_1 only (not L_0); controls with c_g >= 1 use the c_g = 0.5 region
        bounds = [multi_group_bounds(prob, _lr_g(cg, L_gg), g0_norm) if cg < 1 else ref_bounds
                  for _, _, cg, _ in specs]
        crossing = [gd_constants(bd, lw, _lr_g(cg if cg < 1 else cfg["c_g"], L_gg), w0_sq, 0.0)
                    for bd, (_, lw, cg, _) in zip(bounds, specs)]
        R = len(specs)
        fn = _reduce_runner(prob.loss, labels, p0, cfg["steps"], cfg["every"], 2)
        # round-off of a loss difference: two evaluations, each within gamma_n M_abs (Bounds.loss_tolerance)
        cvec = {"rho_star": [k.rho_star for k in crossing], "K": [k.K for k in crossing],
                "kappa": [k.kappa for k in crossing], "J1": [k.J1 for k in crossing],
                "M_abs": [b.M_abs for b in bounds], "tol_inc": [2.0 * b.loss_tolerance() for b in bounds]}
        args = (jax.tree_util.tree_map(lambda x: jnp.asarray(np.stack([x] * R)), p0),
                jnp.asarray([s[1] for s in specs]), jnp.asarray([_lr_g(s[2], L_gg) for s in specs]),
                jnp.asarray([s[3] for s in specs]), {k: jnp.asarray(v) for k, v in cvec.items()},
                jnp.asarray(np.tile([cfg["eps_rel"], cfg["eps_c11_rel"]], (R, 1))))
        recs, acc, final = jax.device_get(fn(*args))
    L0, gn0 = float(recs["L"][0, 0]), float(recs["gn"][0, 0])  # every run starts at p0
    eps, eps_c11 = cfg["eps_rel"] * gn0, cfg["eps_c11_rel"] * gn0
    runs = []
    for r, (kind, lw, cg, proj) in enumerate(specs):
        take = lambda tree: {k: np.asarray(v[r]) for k, v in tree.items()}  # noqa: E731
        k = gd_constants(bounds[r], lw, _lr_g(cg, L_gg), w0_sq, L0) if cg < 1 and not proj else None
        runs.append(_Run(kind, float(lw), float(cg), _lr_g(cg, L_gg), proj, k, crossing[r], bounds[r],
                         take(recs), take(acc), take(final)))
    n_rec = cfg["steps"] // cfg["every"]
    return _Program(name, prob, cfg["steps"], cfg["every"], cfg["r0"], gn0, L0, eps, eps_c11, runs,
                    (np.arange(n_rec) + 1) * cfg["every"], np.arange(n_rec) * cfg["every"])


# ---- sweep-based programs ------------------------------------------------------------------------------

_SWEEPS: dict = {}


def _sweep(key, build: Callable):
    """A :class:`rate_tuning.sweep.Sweep` built once per key (its compiled program is reused)."""
    if key not in _SWEEPS:
        _SWEEPS[key] = build()
    return _SWEEPS[key]


@functools.lru_cache(maxsize=None)
def _sphere_program(name: str) -> dict:
    """C9's second problem: :func:`problems.sphere_function` over the ``lr_w`` grid (``run_sweep``)."""
    cfg = PROGRAMS[name]
    sc = cfg["sphere"]
    prob = _problem("sphere")
    with x64():
        p0 = numpy_init(prob, 0, sc["r0"], "float64")
        p0j = jax.tree_util.tree_map(jnp.asarray, p0)
        sw = _sweep(("sphere", name), lambda: S.make_sweep(prob.loss, lambda key: p0j, prob.labels, steps=sc["steps"],
                                                          record_every=sc["every"], strategy="vmap"))
        lr_w = np.asarray(cfg["lr_w"])
        res = sw(lr_w, np.ones_like(lr_w), np.zeros(len(lr_w), int))
    bd = sphere_bounds(prob)
    L0, gn0 = float(res.loss[0, 0]), float(res.grad_sq_intrinsic[0, 0])
    w0_sq = float(np.sum(np.asarray(p0["w"]) ** 2))
    consts = [gd_constants(bd, lw, None, [w0_sq], L0) for lw in lr_w]
    m = np.minimum.accumulate(res.grad_sq_intrinsic, axis=1)
    return dict(prob=prob, res=res, bounds=bd, consts=consts, L0=L0, gn0=gn0, eps=cfg["eps_rel"] * gn0,
                m=m, lr_w=lr_w, steps=sc["steps"], every=sc["every"], r0=sc["r0"])


def _tight_init(prob: problems.Problem):
    """``key -> params`` of C10's problem: ``w_0 = r_0 U x`` in the eigenbasis, ``x_k^2 = c chi_k / lambda_k``
    (``chi_k ~ U(0.5, 1.5)``, random signs) for ``k >= 1``, ``c = lambda_min / (100 K)``, and ``x_0`` the rest of
    the unit norm; ``r_0 = 1`` (the rate enters through ``lr_w = rho0 r_0^2``)."""
    lam = np.asarray(prob.constants["eigenvalues"])
    U = np.asarray(prob.constants["eigenvectors"])
    K = len(lam) - 1
    c = lam[1] / (100.0 * K)

    def init(key):
        k1, k2 = jax.random.split(key)
        chi = jax.random.uniform(k1, (K,), minval=0.5, maxval=1.5, dtype=jnp.float64)
        sign = jnp.where(jax.random.bernoulli(k2, 0.5, (K,)), 1.0, -1.0)
        xk = sign * jnp.sqrt(c * chi / jnp.asarray(lam[1:]))
        x = jnp.concatenate([jnp.sqrt(1.0 - jnp.sum(xk**2))[None], xk])
        return {"w": jnp.asarray(U) @ x}

    return init, c


@functools.lru_cache(maxsize=None)
def _tight_program(name: str) -> dict:
    """C10's 1/T-tight problem: the Rayleigh quotient with a log-spaced spectrum, ``seeds`` random inits."""
    cfg = PROGRAMS[name]["tight"]
    prob = _problem("log_rayleigh")
    init, c = _tight_init(prob)
    lr_w = cfg["rho0"]  # r_0 = 1
    with x64():
        sw = _sweep(("tight", name), lambda: S.make_sweep(prob.loss, init, prob.labels, steps=cfg["steps"],
                                                         record_every=1, strategy="vmap", return_params=False))
        seeds = np.arange(cfg["seeds"])
        res = sw(np.full(len(seeds), lr_w), np.ones(len(seeds)), seeds)
        inits = [jax.device_get(jax.jit(init)(jax.random.key(int(s)))) for s in seeds]
    bd = rayleigh_bounds(prob)
    consts = [gd_constants(bd, lr_w, None, [1.0], float(res.loss[i, 0])) for i in range(len(seeds))]
    m = np.minimum.accumulate(res.grad_sq_intrinsic, axis=1)
    # the linear model (docs): gn(t) = 4 sum_k lambda_k^2 x_k^2 (1 - 2 rho lambda_k)^(2t), rho = lr_w / ||w_0||^2
    lam = np.asarray(prob.constants["eigenvalues"])
    U = np.asarray(prob.constants["eigenvectors"])
    t = np.arange(cfg["steps"])
    model = []
    for p in inits:
        x = U.T @ np.asarray(p["w"])
        amp = 4.0 * lam[1:] ** 2 * x[1:] ** 2
        model.append(np.exp(np.log(amp)[None, :] + 2.0 * t[:, None] * np.log1p(-2.0 * lr_w * lam[1:])[None, :]).sum(1))
    return dict(prob=prob, res=res, bounds=bd, consts=consts, m=m, model=np.asarray(model), lr_w=lr_w, c=c, cfg=cfg)


@functools.lru_cache(maxsize=None)
def _sgd_program(name: str) -> dict:
    """C12's control: SGD with a constant ``lr_w`` on the noisy ``multi_group`` (the problem's own
    ``stochastic_loss``), through :func:`proofs_check.trajectories.run` (params kept every ``every`` steps)."""
    cfg = PROGRAMS[name]
    sc = cfg["sgd"]
    prob = _problem("multi")
    lr_g = _lr_g(cfg["c_g"], prob.constants["L_gg"])
    runs = []
    with x64():
        p0 = jax.tree_util.tree_map(jnp.asarray, numpy_init(prob, 0, cfg["r0"], "float64"))
        full_loss = jax.jit(prob.loss)
        for lw in sc["lr_w"]:
            tx = optim.two_rate_sgd(prob.labels, lw, lr_g)
            tr = traj.run(prob, p0, None, tx, sc["steps"], stochastic=True, key=jax.random.key(1), lr_w=lw, lr_g=lr_g,
                          snapshot_every=sc["every"], record="path")
            half = jax.tree_util.tree_map(lambda x: x[len(tr.snapshot_steps) // 2], tr.snapshots)
            runs.append((float(lw), tr, float(full_loss(half)), float(full_loss(tr.final_params))))
    return dict(prob=prob, runs=runs, steps=sc["steps"], lr_g=lr_g, groups=tuple(G.si_groups(p0, prob.labels)))


@functools.lru_cache(maxsize=None)
def _slack_program(name: str) -> dict:
    """The tight-constants problem (docs/derivations.md, "Where the GD constants are tight"): GD on the Rayleigh
    quotient ``d = 8`` (spectrum ``linspace(-1, 2, 8)``: exact ``Lambda = 6``, ``G = 3``, ``L_min = -1``) with
    ``b_0 = ||w_0||^2 / lr_w >= B* = Lambda`` (no phase 1) and a small effective rate, run to the minimum.

    There ``C = (b_0 + 2 Delta) 2 Delta`` and ``sum_t a_t^2 ~ b_0 (L_0 - L_min)``: the bound is within a factor
    ``2 (1 + 2 Delta / b_0)`` of the measured sum (the 2 is ``1 / kappa``), so a constant 10x too small fails.
    ``||w_0|| = 2`` (not 1), so that a gradient norm taken at ``theta`` instead of ``V`` differs by 4.
    Everything the claims test is computed here in closed form from the raw parameters (``a_t^2 =
    4 ||(A - L(u_t)) u_t||^2``, ``u_t = w_t / ||w_t||``); the library's recorded measure is kept to be compared.
    """
    cfg = PROGRAMS[name]["slack"]
    prob = problems.rayleigh_quotient(dim=8, seed=0)
    A = np.asarray(prob.constants["A"], np.float64)
    r0 = cfg["r0"]
    runs = []
    with x64():
        p0 = jax.tree_util.tree_map(jnp.asarray, numpy_init(prob, 3, r0, "float64"))
        for rho in cfg["rho0"]:
            lw = rho * r0**2
            tx = optim.two_rate_sgd(prob.labels, lw, 1.0)
            tr = traj.run(prob, p0, None, tx, cfg["steps"], lr_w=lw, lr_g=1.0, snapshot_every=1)
            W = np.concatenate([np.asarray(tr.snapshots["w"], np.float64),
                                np.asarray(tr.final_params["w"], np.float64)[None]])   # w_0 .. w_T
            ws = np.sum(W**2, axis=1)
            U = W / np.sqrt(ws)[:, None]
            L = np.einsum("ti,ij,tj->t", U, A, U)
            a2 = 4.0 * np.sum((U @ A - L[:, None] * U) ** 2, axis=1)
            runs.append(dict(lr_w=lw, rho0=rho, ws=ws, L=L, a2=a2, lib_gn=np.asarray(tr.grad_sq_intrinsic, np.float64)))
    bd = rayleigh_bounds(prob)
    for r in runs:
        r["consts"] = gd_constants(bd, r["lr_w"], None, [r0**2], float(r["L"][0]))
    return dict(prob=prob, runs=runs, bounds=bd, steps=cfg["steps"], r0=r0, A_norm=float(np.abs(
        np.asarray(prob.constants["eigenvalues"])).max()))


def _slack_setting(S: dict, r: dict) -> str:
    return (f"slack: {S['prob'].name} (spectrum -1..2), ||w0||={S['r0']:g}, GD lr_w={r['lr_w']:.3g} "
            f"(effective rate {r['rho0']:g}, b_0 = {1 / r['rho0']:g} >= B* = {S['bounds'].L_ww:g}), {S['steps']} steps")


def slack_records(claim_id: str, S: dict, what: str) -> list[Evidence]:
    """The tight records of the constant ``what`` (``'C'``, ``'sum'``, ``'b_bar'``, ``'Delta'``) on the slack
    problem, and per run the slack (bound / measured), which must be at most :data:`MAX_SLACK`."""
    out = []
    bd = S["bounds"]
    tol_rel = _gn_roundoff(bd) + gamma(S["steps"], "float64")
    for r in S["runs"]:
        k, a2, T = r["consts"], r["a2"][:-1], S["steps"]
        if what == "C":   # C9: (1/T) sum_t a_t^2 <= C / T (the average, which bounds the min)
            measured, bound, rel = float(a2.sum()) / T, k.C / T, "(1/T) sum_t<T ||grad L(V_t)||^2 vs C/T"
        elif what == "sum":   # C10 / I8: max over T of sum_{t<T} a_t^2 <= C
            measured, bound, rel = float(np.cumsum(a2).max()), k.C, "max_T sum_t<T ||grad L(V_t)||^2 vs C (I8)"
        elif what == "b_bar":   # C12 / I7: ||w_T||^2 <= lr_w bbar
            measured, bound, rel = float(r["ws"].max()), r["lr_w"] * k.b_bar[0], "max_t ||w_t||^2 vs lr_w bbar (I7)"
        else:   # C14 / I7 telescoping: kappa sum_t rho_t a_t^2 <= Delta
            measured = k.kappa * float(np.sum(r["lr_w"] / r["ws"][:-1] * a2))
            bound, rel = k.Delta, "kappa sum_t rho_t a_t^2 vs Delta (I7 telescoping)"
        slack = bound / measured if measured > 0 else math.inf
        setting = _slack_setting(S, r)
        out.append(Evidence(claim_id, f"{setting}: {rel}", measured, bound, "<=", tol_rel * max(measured, bound),
                            "float64", "none", details={"slack_bound_over_measured": slack, "constants": k.as_dict(),
                                                        "tolerance_formula": "(3 gamma_n + gamma_T) max(measured, bound)"}))
        out.append(Evidence(claim_id, f"{setting}: slack of that bound (bound / measured) <= {MAX_SLACK:g}, so that "
                                      f"a constant 10x too small fails", slack, MAX_SLACK, "<=", 0.0, "float64", "none",
                            details={"measured": measured, "bound": bound}))
    return out


def measure_record(claim_id: str, S: dict) -> Evidence:
    """The library's recorded ``||grad L(V_t; g_t)||^2`` (:func:`rate_tuning.record.step_record`) against the
    closed form ``4 ||(A - L(u)) u||^2`` computed here from the raw parameters, over every step.

    Tolerance per step: each is a computed norm of a gradient whose entries carry an absolute error at most
    ``e = 4 gamma_d (||A|| + |L|) <= 8 gamma_d ||A||`` (a dot product of ``d`` terms, the factor 2 and the
    subtraction) plus the relative ``3 gamma_n`` of the squared norm: ``|x - y| <= 2 a e + e^2 + 3 gamma_n a^2``.
    Measured: the worst ratio of the difference to that bound (<= 1).
    """
    worst, where = 0.0, None
    d = 8
    e = 8.0 * gamma(4 * d, "float64") * S["A_norm"] * 4.0
    g_n = gamma(S["bounds"].n_ops, "float64")
    for r in S["runs"]:
        a2, lib = r["a2"][:-1], r["lib_gn"]
        bound = 2.0 * np.sqrt(a2) * e + e**2 + 3.0 * g_n * a2
        ratio = np.abs(lib - a2) / bound
        j = int(np.argmax(ratio))
        if ratio[j] > worst or where is None:
            worst, where = float(ratio[j]), (r, j)
    r, j = where
    return Evidence(claim_id, f"{_slack_setting(S, r)}: the library's recorded ||grad L(V_t;g_t)||^2 "
                              f"(rate_tuning.record) vs the closed form 4||(A - L(u_t)) u_t||^2 from the raw "
                              f"parameters, worst |difference| / round-off bound over every step", worst, 1.0, "<=",
                    0.0, "float64", "none",
                    details={"step": j, "library": float(r["lib_gn"][j]), "closed_form": float(r["a2"][j]),
                             "tolerance_formula": "|x - y| <= 2 a e + e^2 + 3 gamma_n a^2, e = 32 gamma_4d ||A||"})


def curvature_record(claim_id: str, S: dict) -> Evidence:
    """The one-step inequality behind I4 with the analytic constant of the slack problem (no ``g``):
    ``L_{t+1} - L_t + rho_t a_t^2 <= (Lambda / 2) rho_t^2 a_t^2`` (Taylor on the unit sphere, I2/I3), as the
    worst ratio of the left side to the right over the steps where the right side exceeds ``1e3`` times the
    round-off of a loss difference (``2 gamma_n M_abs``). The Rayleigh quotient's curvature along the step
    reaches a fair part of ``Lambda = 2 (lambda_max - lambda_min)``, so a ``Lambda`` 10x too small fails.
    Tolerance: that round-off over the right side (<= 1e-3)."""
    bd = S["bounds"]
    tol_L = 2 * bd.loss_tolerance()
    worst, where = -math.inf, None
    for r in S["runs"]:
        a2, L, rho = r["a2"][:-1], r["L"], r["lr_w"] / r["ws"][:-1]
        rhs = 0.5 * bd.L_ww * rho**2 * a2
        ok = rhs > 1e3 * tol_L
        ratio = np.where(ok, (L[1:] - L[:-1] + rho * a2) / np.where(ok, rhs, 1.0), -np.inf)
        j = int(np.argmax(ratio))
        if ratio[j] > worst:
            worst, where = float(ratio[j]), (r, j)
    r, j = where
    return Evidence(claim_id, f"{_slack_setting(S, r)}: max_t (L_t+1 - L_t + rho_t a_t^2) / (Lambda/2 rho_t^2 a_t^2) "
                              f"with the analytic Lambda = {bd.L_ww:g} (the curvature term of I3/I4)", worst, 1.0, "<=",
                    1e-3, "float64", "none", details={"step": j, "Lambda": bd.L_ww,
                                                      "tolerance_formula": "2 gamma_n M_abs / rhs <= 1e-3"})


MAX_SLACK = 3.0
"""Largest slack (bound / measured) allowed on the tight problem: below 10, so a constant 10x too small fails."""


def _gn_roundoff(bd: Bounds) -> float:
    """Relative round-off of a computed ``||grad L(V;g)||^2``: each gradient entry within ``gamma_n`` and the
    squared norm another ``gamma_n`` (``n = n_ops``): ``3 gamma_n``."""
    return 3.0 * gamma(bd.n_ops, "float64")


# -------------------------------------------------------------------------------------------------------
# C9: convergence for every lr_w
# -------------------------------------------------------------------------------------------------------


def _log_grid(T: np.ndarray, per_decade: int = 8) -> np.ndarray:
    """Indices into the increasing ``T`` closest to a log grid with ``per_decade`` points per decade."""
    targets = np.geomspace(T[0], T[-1], max(2, int(per_decade * np.log10(T[-1] / T[0])) + 1))
    return np.unique(np.searchsorted(T, targets).clip(0, len(T) - 1))


@claim(
    "C9",
    paper_ref="GD theorem (PAPER §4.1): convergence for any constant lr_w [Q/S]; constants: the project's (docs)",
    statement="GD with any constant lr_w > 0 and lr_g = 2 c_g / L^gg, c_g in (0,1): "
              "min_{t<T} ||grad L(V_t; g_t)||^2 <= C / T -> 0 for every lr_w (here 1e-4 ... 1e4)",
    hypotheses="scale-invariant groups, plain full-batch GD, lr_g < 2 / L^gg, A1-A2 with the analytic bounds of the "
               "problem on a region containing the run",
    negative_controls=("lr_g above 2 / L^gg (c_g = 1.1): g diverges, no convergence",
                       "auto-tuning: the projected optimizer keeps the effective lr at lr_w / ||w_0||^2 (1e4 / 3.24)"),
    quick={"program": "quick"},
    full={"program": "full"},
)
def check_c9(settings: dict) -> list[Evidence]:
    """For every ``lr_w`` of the grid (8 decades): ``m_T = min_{t<T} ||grad L(V_t; g_t)||^2`` against the
    theorem's ``C / T`` (:func:`gd_constants`) and against a plain target ``eps = eps_rel ||grad L(V_0; g_0)||^2``,
    on ``multi_group`` and on ``sphere_function``.

    Tolerance of ``m_T <= C / T``: ``m_T`` is computed to ``3 gamma_n`` relative and ``C`` from float64 formulas
    (``gamma_n`` relative): ``(3 gamma_n m_T + gamma_n C / T)``. The plain target is a chosen number: tolerance 0.
    """
    out = []
    with x64():
        P = _multi_program(settings["program"])
        sph = _sphere_program(settings["program"])
    curves_multi = {}
    for run in P.select("main"):
        k, m_T = run.consts, float(run.acc["m"])
        bound = k.C / P.steps
        tol = _gn_roundoff(run.bounds) * m_T + gamma(run.bounds.n_ops, "float64") * bound
        details = {"constants": k.as_dict(), "T": P.steps, "C_over_T": bound, "eps": P.eps,
                   "gn0": P.gn0, "last_recorded_gn": float(run.recs["gn"][-1]), "bounds": run.bounds.as_dict(),
                   "tolerance_formula": "3 gamma_n m_T + gamma_n C/T"}
        if abs(np.log10(run.lr_w) % 2) < 1e-9:
            curves_multi[f"lr_w={run.lr_w:g}"] = run.recs["m"]
            curves_multi[f"C/T lr_w={run.lr_w:g}"] = k.C / P.rec_T
        setting = f"multi: {P.describe()}, {run.setting}"
        out.append(Evidence("C9", setting + ": min_t ||grad L(V_t;g_t)||^2 vs C/T", m_T, bound, "<=", tol, "float64",
                            "none", details=details))
        out.append(Evidence("C9", setting + f": min_t ||grad L(V_t;g_t)||^2 vs eps = {settings_eps(P)}", m_T, P.eps,
                            "<=", 0.0, "float64", "none", details={"eps_rel": PROGRAMS[P.name]["eps_rel"]}))
    out[0].details["curves"] = {"running min of ||grad L(V_t;g_t)||^2, multi_group (with C/T)":
                                curve(P.rec_T, curves_multi, "T", "min_{t<T} ||grad L(V_t; g_t)||^2", logy=True,
                                      logx=True)}
    curves_sph = {}
    for i, lw in enumerate(sph["lr_w"]):
        k, m_T = sph["consts"][i], float(sph["m"][i, -1])
        T = sph["steps"]
        bound = k.C / T
        tol = _gn_roundoff(sph["bounds"]) * m_T + gamma(sph["bounds"].n_ops, "float64") * bound
        setting = (f"sphere: {sph['prob'].name}, ||w0||={sph['r0']:g}, GD lr_w={lw:.3g}, {T} steps (min over every "
                   f"{sph['every']}th step: an upper bound of the true min), float64")
        if abs(np.log10(lw) % 2) < 1e-9:
            rec_T = np.arange(1, sph["m"].shape[1] + 1) * sph["every"]
            curves_sph[f"lr_w={lw:g}"] = sph["m"][i]
        out.append(Evidence("C9", setting + ": min_t ||grad L(V_t)||^2 vs C/T", m_T, bound, "<=", tol, "float64",
                            "none", details={"constants": k.as_dict(), "bounds": sph["bounds"].as_dict(),
                                             "C_over_T": bound}))
        out.append(Evidence("C9", setting + f": min_t ||grad L(V_t)||^2 vs eps = {sph['eps']:.3g}", m_T, sph["eps"],
                            "<=", 0.0, "float64", "none", details={"gn0": sph["gn0"]}))
    rec_T = np.arange(1, sph["m"].shape[1] + 1) * sph["every"]
    out[-1].details["curves"] = {"running min, sphere_function": curve(
        rec_T, curves_sph, "T", "min_{t<T} ||grad L(V_t)||^2", logy=True, logx=True)}
    # the tight problem: C/T within a factor MAX_SLACK of the measured average; the measure in closed form
    S = _slack_program(settings["program"])
    out += slack_records("C9", S, "C") + [measure_record("C9", S)]
    # negative controls
    for run, breaks in ((P.select("c15", lr_w=1.0, c_g=1.1), "lr_g < 2/L_gg (c_g = 1.1: the g-part diverges)"),
                        (P.select("projected", lr_w=1e4), "auto-tuning (projected optimizer: effective lr fixed at "
                                                          "lr_w/||w0||^2)")):
        run = run[0]
        m_T = float(run.acc["m"])
        out.append(Evidence("C9", f"multi: {P.describe()}, {run.setting}: min_t ||grad L(V_t;g_t)||^2 vs eps = "
                                  f"{settings_eps(P)}", m_T, P.eps, "<=", 0.0, "float64", "none", negative_control=True,
                            details={"breaks": breaks, "last_recorded_gn": float(run.recs["gn"][-1]),
                                     "curves": {f"running min ({run.setting})": curve(
                                         P.rec_T, run.recs["m"], "T", "min_{t<T} ||grad L||^2", logy=True,
                                         logx=True)}}))
    return out


def settings_eps(P: _Program) -> str:
    return f"{PROGRAMS[P.name]['eps_rel']:g} ||grad L(V_0;g_0)||^2 = {P.eps:.3g}"


# -------------------------------------------------------------------------------------------------------
# C10: the rate
# -------------------------------------------------------------------------------------------------------


def _control_slope(T: np.ndarray, m: np.ndarray, window) -> tuple[float, float, int]:
    sel = (T >= window[0]) & (T <= window[1])
    x, y = np.log(T[sel]), np.log(m[sel])
    slope, se = ols_slope(x, y)
    return slope, se, int(sel.sum())


@claim(
    "C10",
    paper_ref="GD theorem (PAPER §4.1): the rate O(1/T) of min_t ||grad||^2 [Q/S]; constants: the project's (docs)",
    statement="T min_{t<T} ||grad L(V_t; g_t)||^2 <= sum_{t<T} ||grad L(V_t; g_t)||^2 <= C for every T; on a problem "
              "where the rate is tight (log-spaced curvatures) the log-log slope of the running min is -1",
    hypotheses="as C9; the tight problem: Rayleigh quotient with 41 eigenvalues log-spaced in [1e-5, 1] above the "
               "minimum 0, equal loss per mode at the start, effective lr 0.25",
    negative_controls=("lr_g < 2/L_gg (c_g = 1.1 and 1.5: the running min stalls, slope 0)",
                       "auto-tuning (projected optimizer at lr_w = 1e4: fixed effective lr, no convergence)"),
    quick={"program": "quick"},
    full={"program": "full"},
)
def check_c10(settings: dict) -> list[Evidence]:
    """``max_T T m_T`` over a log grid of ``T`` against ``C`` per ``lr_w`` (multi_group); the I8 sum
    ``sum_{t<T} gn_t <= C``; on the tight problem ``T m_T <= C`` and the slope of ``log m_T`` on ``log T`` over
    the window (2 decades), its 95% CI by a percentile bootstrap over seeds, against -1.

    Tolerance of the slope: the CI half-width plus ``|s_model + 1|``, where ``s_model`` is the mean slope of
    the closed-form linear model ``4 sum_k lambda_k^2 x_k^2 (1 - 2 rho lambda_k)^{2t}`` over the same window
    (docs: the model's deviation from -1 comes from the finite range of curvatures, derived not fitted).
    The controls' slopes get their OLS 95% CI (t quantile, one run each).
    """
    out = []
    with x64():
        P = _multi_program(settings["program"])
        tight = _tight_program(settings["program"])
    grid = _log_grid(P.rec_T)
    curves = {}
    ratios = []
    for run in P.select("main"):
        k = run.consts
        Tm = P.rec_T[grid] * run.recs["m"][grid]
        j = int(np.argmax(Tm))
        ratios.append(float(run.acc["S_grad"]) / k.C)
        tol = _gn_roundoff(run.bounds) * float(Tm[j]) + gamma(run.bounds.n_ops, "float64") * k.C
        if abs(np.log10(run.lr_w) % 2) < 1e-9:
            curves[f"T m_T, lr_w={run.lr_w:g}"] = P.rec_T * run.recs["m"]
        out.append(Evidence("C10", f"multi: {P.describe()}, {run.setting}: max over a log grid of T of "
                                   f"T min_t<T ||grad L(V_t;g_t)||^2 vs C", float(Tm[j]), k.C, "<=", tol, "float64",
                            "none", details={"argmax_T": int(P.rec_T[grid][j]), "C": k.C,
                                             "sum_gn": float(run.acc["S_grad"]), "grid_points": len(grid)}))
    worst = int(np.argmax(ratios))
    runs_main = P.select("main")
    out.append(Evidence("C10", f"multi: {P.describe()}, every lr_w of the grid: I8 sum_t<T ||grad L(V_t;g_t)||^2 / C "
                               f"(worst lr_w = {runs_main[worst].lr_w:.3g})", max(ratios), 1.0, "<=",
                        _gn_roundoff(runs_main[worst].bounds), "float64", "none",
                        details={"ratios": dict(zip([f"{r.lr_w:.3g}" for r in runs_main], ratios)),
                                 "curves": {"T min_t<T ||grad||^2, multi_group": curve(
                                     P.rec_T, curves, "T", "T m_T", logy=True, logx=True)}}))
    S = _slack_program(settings["program"])
    out += slack_records("C10", S, "sum") + [measure_record("C10", S)]
    # the tight problem
    cfg = tight["cfg"]
    T = np.arange(1, cfg["steps"] + 1)
    m, model = tight["m"], np.minimum.accumulate(tight["model"], axis=1)
    Tm_ratio = [float(np.max(T * m[i]) / tight["consts"][i].C) for i in range(len(m))]
    bd = tight["bounds"]
    out.append(Evidence("C10", f"tight: {tight['prob'].name} (41 log-spaced curvatures in [1e-5, 1]), "
                               f"GD lr_w={tight['lr_w']:g}, ||w0||=1, {cfg['steps']} steps, {len(m)} seeds: "
                               f"max_T T m_T / C (worst seed)",
                        max(Tm_ratio), 1.0, "<=", _gn_roundoff(bd), "float64", "none",
                        details={"ratios": Tm_ratio, "C": [k.C for k in tight["consts"]]}))
    lo_w, hi_w = cfg["window"]
    pts = np.unique(np.round(np.geomspace(lo_w, hi_w, cfg["num_points"])).astype(int))
    x = np.log(pts)
    slopes = np.array([ols_slope(x, np.log(m[i, pts - 1]))[0] for i in range(len(m))])
    model_slopes = np.array([ols_slope(x, np.log(model[i, pts - 1]))[0] for i in range(len(m))])
    ci = bootstrap_mean_ci(slopes)
    mean = float(slopes.mean())
    half = max(ci[1] - mean, mean - ci[0])
    bias = abs(float(model_slopes.mean()) + 1.0)
    C_mean = float(np.mean([k.C for k in tight["consts"]]))
    out.append(Evidence(
        "C10", f"tight: {tight['prob'].name}, GD lr_w={tight['lr_w']:g}, {len(m)} seeds: slope of log min_t<T "
               f"||grad||^2 on log T over T in [{lo_w}, {hi_w}] (2 decades)", mean, -1.0, "==", half + bias, "float64",
        "none", details={"ci95_bootstrap_over_seeds": ci, "slopes": slopes.tolist(),
                         "model_slope_mean": float(model_slopes.mean()), "model_bias": bias,
                         "tolerance_formula": "bootstrap 95% CI half-width + |model slope + 1|",
                         "curves": {"running min vs T, tight problem (mean over seeds)": curve(
                             T, {"measured": m.mean(0), "linear model": model.mean(0), "C/T (mean C)": C_mean / T},
                             "T", "min_{t<T} ||grad L(V_t)||^2", logy=True, logx=True)}}))
    # controls: slope ~ 0
    window = (P.every, 100 * P.every)
    for run, breaks in ((P.select("c15", lr_w=1.0, c_g=1.1)[0], "lr_g < 2/L_gg (c_g = 1.1)"),
                        (P.select("c15", lr_w=1.0, c_g=1.5)[0], "lr_g < 2/L_gg (c_g = 1.5)"),
                        (P.select("projected", lr_w=1e4)[0], "auto-tuning (projected optimizer, fixed effective lr)")):
        # the claim's relation: T m_T bounded, i.e. its log-log slope over two decades is <= 0 (a stalled run
        # has slope +1; plain GD at the same lr_w has a negative one, so a projection that does nothing fails)
        slope, se, n = _control_slope(P.rec_T, P.rec_T * run.recs["m"], window)
        half = _t975(n - 2) * se
        out.append(Evidence("C10", f"multi: {P.describe()}, {run.setting}: slope of log (T min_t<T ||grad||^2) on "
                                   f"log T over T in [{window[0]}, {window[1]}] (bounded: <= 0)", slope, 0.0, "<=",
                            half, "float64", "none", negative_control=True,
                            details={"breaks": breaks, "ols_se": se, "points": n,
                                     "tolerance_formula": "OLS 95% CI half-width (t quantile)",
                                     "curves": {f"running min ({run.setting})": curve(
                                         P.rec_T, run.recs["m"], "T", "min_{t<T} ||grad L||^2", logy=True,
                                         logx=True)}}))
    return out


# -------------------------------------------------------------------------------------------------------
# C11: U-shape in lr_w
# -------------------------------------------------------------------------------------------------------


def _hits(runs, index: int, steps: int) -> np.ndarray:
    """Steps to reach the level ``index``; runs that never do are censored at ``steps`` (a lower bound)."""
    h = np.array([int(r.acc["hit"][index]) for r in runs], np.float64)
    return np.where(h < 0, float(steps), h)


@claim(
    "C11",
    paper_ref="discussion of the GD constants (PAPER §4.1 'where the lr_w dependence comes from') [S]/[D]",
    statement="steps to reach ||grad L(V_t; g_t)||^2 <= eps grow like 1/lr_w for small lr_w and like lr_w for large "
              "lr_w (a U shape in log-log with end slopes -1 and +1)",
    hypotheses="as C9 (auto-tuned effective lr: rho = lr_w/||w_0||^2 at small lr_w, about ||w_0||^2/(lr_w a_0^2) after "
               "the first step at large lr_w)",
    negative_controls=("auto-tuning (projected optimizer: no right arm, large lr_w never reaches eps)",),
    quick={"program": "quick"},
    full={"program": "full"},
)
def check_c11(settings: dict) -> list[Evidence]:
    """OLS slopes of ``log N_eps`` on ``log lr_w`` over the ``c11_points`` smallest and largest ``lr_w``.

    Tolerance (docs): ``slope_tolerance(x, e_max)`` with ``e_max`` the largest deviation of ``log N`` from the
    asymptotic law at a fit point, the sum of

    * ``ln max_i(b_{i,T} / b_{i,ref})``: by I5 ``b`` only grows, so until ``N`` every effective lr lies within
      this factor of its reference ``1/b_{i,ref}``, ``b_ref = b_0 = ||w_0||^2/lr_w`` (small end: ``propto 1/lr_w``)
      or ``b_1 = b_0 + a_0^2/b_0`` (large end, after the one jump step: ``propto lr_w`` up to the factor
      ``1 + b_0^2/a_0^2``, also added);
    * ``ln(1 + 1/N)``: integer steps, and the jump step itself;
    * ``rho Lambda / 2``: the first-order Euler error of a sphere step of size ``rho`` against the gradient
      flow, and at the large end the angle ``b_0/a_0`` between ``V_1`` and its ``lr_w -> inf`` limit, both with
      unit sensitivity of the hitting time (an assumption, as in C8: first-order errors are not amplified).
    """
    out = []
    with x64():
        P = _multi_program(settings["program"])
    a0_sq = np.asarray(P.runs[0].recs["a2"][0], np.float64)  # a_{i,0}^2 (every run starts at p0)
    main = P.select("main")
    n_pts = PROGRAMS[P.name]["c11_points"]
    lr = np.array([r.lr_w for r in main])
    N = _hits(main, 1, P.steps)
    best = int(np.argmin(N))
    recs = []
    for end, sl, target in (("small", slice(0, n_pts), -1.0), ("large", slice(len(main) - n_pts, len(main)), 1.0)):
        runs = main[sl]
        x, y = np.log(lr[sl]), np.log(N[sl])
        slope, se = ols_slope(x, y)
        e = []
        for r, n in zip(runs, N[sl]):
            k = r.consts
            b0 = np.asarray(k.b0)
            b_T = np.asarray(r.final["ws"]) / r.lr_w
            if end == "small":
                drift, rho, angle = float(np.log(np.max(b_T / b0))), 1.0 / b0.min(), 0.0
            else:
                b1 = b0 + a0_sq / b0
                drift = float(np.log(np.max(b_T / b1)) + np.log1p(np.max(b0**2 / a0_sq)))
                rho, angle = 1.0 / b1.min(), float(np.max(b0 / np.sqrt(a0_sq)))
            e.append(drift + float(np.log1p(1.0 / n)) + rho * r.bounds.L_ww / 2.0 + angle)
        tol = slope_tolerance(x, max(e))
        recs.append(Evidence("C11", f"multi: {P.describe()}, GD lr_g={main[0].lr_g:.4g}: slope of log(steps to "
                                    f"||grad||^2 <= {P.eps_c11:.3g}) on log lr_w, {end} end, lr_w in "
                                    f"[{lr[sl][0]:.3g}, {lr[sl][-1]:.3g}]", slope, target, "==", tol, "float64", "none",
                             details={"steps": N[sl].tolist(), "lr_w": lr[sl].tolist(), "ols_se": se,
                                      "per_point_deviation_bound": e, "best_lr_w": float(lr[best]),
                                      "best_steps": float(N[best]), "all_steps": N.tolist(),
                                      "tolerance_formula": "e_max sum|x - xbar| / sum (x - xbar)^2, "
                                                           "e = ln max b_T/b_ref + ln(1+1/N) + rho Lambda/2 "
                                                           "(+ b_0/a_0 at the large end)"}))
    proj = P.select("projected")
    Np = _hits(proj, 1, P.steps)
    lp = np.array([r.lr_w for r in proj])
    x = np.log(lp[-n_pts:])
    slope, se = ols_slope(x, np.log(Np[-n_pts:]))
    e = float(np.max(np.log1p(1.0 / Np[-n_pts:])))  # the norm is fixed: no drift term
    recs.append(Evidence("C11", f"multi: {P.describe()}, projected GD lr_g={proj[0].lr_g:.4g}: slope of log(steps to "
                                f"||grad||^2 <= {P.eps_c11:.3g}) on log lr_w, large end (censored at T = {P.steps})",
                         slope, 1.0, "==", slope_tolerance(x, e), "float64", "none", negative_control=True,
                         details={"breaks": "auto-tuning (projection keeps lr_w/||w||^2 = lr_w/||w_0||^2 fixed)",
                                  "steps": Np.tolist(), "lr_w": lp.tolist(), "censored": (Np >= P.steps).tolist()}))
    recs[0].details["curves"] = {"steps to eps vs lr_w (U shape)": curve(
        lr, {"GD (auto-tuned)": N, "projected (censored at T)": np.interp(np.log(lr), np.log(lp), Np, left=np.nan,
                                                                         right=np.nan)},
        "lr_w", f"steps to ||grad L(V_t;g_t)||^2 <= {P.eps_c11:.3g}", logy=True, logx=True)}
    out += recs
    return out


# -------------------------------------------------------------------------------------------------------
# C12: the norms plateau
# -------------------------------------------------------------------------------------------------------


@claim(
    "C12",
    paper_ref="GD analysis (PAPER §4.1, I7): ||w_t|| non-decreasing and bounded, hence convergent [D]",
    statement="(||w_T||^2 - ||w_{T/2}||^2)/||w_T||^2 <= min(sum_{T/2<=t<T} ||grad L(V_t;g_t)||^2/(b_{T/2} b_T), "
              "(L_{T/2} - L_T)/(kappa b_T)) -> 0, and ||w_{i,T}||^2 <= lr_w bbar_i, for every lr_w",
    hypotheses="as C9; the second form of the first bound needs the monotone phase (rho_i <= rho*) from T/2 on",
    negative_controls=("GD (no gradient noise): SGD with a constant lr_w keeps ||w||^2 growing like sqrt(T)",),
    quick={"program": "quick"},
    full={"program": "full"},
)
def check_c12(settings: dict) -> list[Evidence]:
    """Per ``lr_w``: the relative growth of ``||w_i||^2`` over the second half (max over groups) against the
    smaller of two derived bounds: I5 + I8, ``b_{i,T} - b_{i,T/2} = sum_t a_{i,t}^2 / b_{i,t} <= (S_T - S_{T/2}) /
    b_{i,T/2}`` with ``S_T = sum_{t<T} ||grad L(V_t;g_t)||^2`` (a tail of a sum bounded by ``C``, hence -> 0),
    and, when the run crossed ``rho_i <= rho*`` before ``T/2``, I7's ``(L_{T/2} - L_T)/(kappa min_i b_{i,T})``
    (telescoping I4 over ``[T/2, T)``); and ``max_i ||w_{i,T}||^2 / (lr_w bbar_i) <= 1``.

    Tolerance of the first: the squared norms within ``gamma_d`` each (``d`` the largest group): ``2 gamma_d``;
    the rounding of each update moves ``||w_{t+1}||^2`` by at most ``4u ||w_{t+1}||^2`` (C4's derivation), so the
    computed growth over ``T/2`` steps may exceed the exact one by ``2 u T``; the loss difference is within
    ``2 gamma_n M_abs``, divided by ``kappa b_T``. Of the second: ``gamma_d + 4 u T``.
    """
    out = []
    with x64():
        P = _multi_program(settings["program"])
        sgd = _sgd_program(settings["program"])
    half = P.steps // (2 * P.every)
    d_max = max(A.shape[0] for A in P.prob.constants["A"])
    g_d, u = gamma(d_max, "float64"), unit_roundoff("float64")
    curves = {}
    for run in P.select("main"):
        k = run.consts
        ws_T, ws_h = np.asarray(run.final["ws"]), np.asarray(run.recs["ws"][half])
        rel = float(np.max((ws_T - ws_h) / ws_T))
        b_T = ws_T / run.lr_w
        dL = float(run.recs["L"][half] - run.final["L"])
        crossed = 0 <= int(run.acc["tau"]) <= half * P.every
        tail = float(run.acc["S_grad"] - run.recs["S"][half - 1])
        b_h = ws_h / run.lr_w
        tail_bound = tail / (b_h.min() * b_T.min())
        mono_bound = dL / (k.kappa * b_T.min()) if crossed else math.inf
        bound = min(tail_bound, mono_bound)
        # the tail is a difference of two float64 running sums of T non-negative terms: each within gamma_T S_T
        tail_tol = (_gn_roundoff(run.bounds) * tail + 2 * gamma(P.steps, "float64") * float(run.acc["S_grad"])) / (
            b_h.min() * b_T.min())
        tol = 2 * g_d + 2 * u * P.steps + (tail_tol if bound == tail_bound else
                                           2 * run.bounds.loss_tolerance() / (k.kappa * b_T.min()))
        out.append(Evidence("C12", f"multi: {P.describe()}, {run.setting}: max_i (||w_i,T||^2 - ||w_i,T/2||^2)/"
                                   f"||w_i,T||^2 vs min(tail of sum ||grad||^2/(b_T/2 b_T), (L_T/2 - L_T)/(kappa b_T))",
                            rel, bound, "<=", tol, "float64", "none",
                            details={"crossed_before_T/2": crossed, "tau": int(run.acc["tau"]), "ws_T": ws_T.tolist(),
                                     "ws_T/2": ws_h.tolist(), "L_T/2 - L_T": dL, "tail_bound": tail_bound,
                                     "monotone_bound": mono_bound,
                                     "tolerance_formula": "2 gamma_d + 2uT + ((3 gamma_n tail + 2 gamma_T S_T)/"
                                                          "(b_T/2 b_T) | 2 gamma_n M_abs/(kappa b_T))"}))
        ratio = float(np.max(ws_T / (run.lr_w * np.asarray(k.b_bar))))
        out.append(Evidence("C12", f"multi: {P.describe()}, {run.setting}: max_i ||w_i,T||^2 / (lr_w bbar_i)", ratio,
                            1.0, "<=", g_d + 4 * u * P.steps, "float64", "none",
                            details={"b_bar": list(k.b_bar), "ws_T": ws_T.tolist(),
                                     "b_T_measured": (ws_T / run.lr_w).tolist()}))
        if abs(np.log10(run.lr_w) % 2) < 1e-9:
            tot = run.recs["ws"].sum(axis=1)
            curves[f"GD lr_w={run.lr_w:g}"] = tot / tot[0]
    out += slack_records("C12", _slack_program(settings["program"]), "b_bar")
    kappa = (1.0 - sgd["lr_g"] * P.prob.constants["L_gg"] / 2.0) / 2.0
    for lw, tr, L_half, L_T in sgd["runs"]:
        ws = np.stack([np.sum(np.asarray(tr.snapshots[g]) ** 2, axis=1) for g in sgd["groups"]], axis=1)
        ws_T = np.array([float(np.sum(np.asarray(tr.final_params[g]) ** 2)) for g in sgd["groups"]])
        h = len(ws) // 2
        ws_h = ws[h]
        rel = float(np.max((ws_T - ws_h) / ws_T))
        b_T = ws_T / lw
        bound = max(L_half - L_T, 0.0) / (kappa * b_T.min())
        tol = 2 * g_d + 2 * u * sgd["steps"] + 2 * P.runs[0].bounds.loss_tolerance() / (kappa * b_T.min())
        tot = ws.sum(axis=1)
        curves[f"SGD lr_w={lw:g} (control)"] = np.interp(P.rec_t, tr.snapshot_steps, tot / tot[0], right=np.nan)
        out.append(Evidence("C12", f"sgd: {P.prob.name} with noise_std={P.prob.constants['noise_std']}, SGD "
                                   f"(constant lr) lr_w={lw:g} lr_g={sgd['lr_g']:.4g}, ||w_i0||={P.r0:g}, "
                                   f"{sgd['steps']} steps: max_i (||w_i,T||^2 - ||w_i,T/2||^2)/||w_i,T||^2 vs "
                                   f"(L_T/2 - L_T)_+/(kappa min_i b_i,T)",
                            rel, bound, "<=", tol, "float64", "none", negative_control=True,
                            details={"breaks": "no gradient noise (SGD, constant lr_w: ||w||^4 grows like T, C17)",
                                     "ws_T": ws_T.tolist(), "ws_T/2": ws_h.tolist(),
                                     "sqrt(T) prediction of the relative growth": 1 - 1 / math.sqrt(2)}))
    out[0].details["curves"] = {"sum_i ||w_i,t||^2 / sum_i ||w_i,0||^2 (plateau)": curve(
        np.maximum(P.rec_t, 1), curves, "t", "||W_t||^2 / ||W_0||^2", logy=True, logx=True)}
    return out


# -------------------------------------------------------------------------------------------------------
# C14: monotone loss after the crossing (I4), with the phase-1 chain (I6, (*), jumps)
# -------------------------------------------------------------------------------------------------------


@claim(
    "C14",
    paper_ref="GD proof, I4 and I6 (PAPER §4.1 skeleton) [D]; constants: the project's (docs)",
    statement="once every ||w_i||^2 >= lr_w / rho* (B* = 1/rho*), "
              "L_{t+1} <= L_t - kappa (sum_i rho_i a_i^2 + lr_g b^2): the loss decreases monotonically; before it "
              "the total rise is <= N_J J_1 + S_bad (I6)",
    hypotheses="as C9 (lr_g = 2 c_g / L^gg, c_g < 1; rho*, kappa from the analytic smoothness bounds)",
    negative_controls=("lr_g < 2/L_gg (c_g = 1.1 and 1.5: increases persist after the crossing)",),
    quick={"program": "quick"},
    full={"program": "full"},
)
def check_c14(settings: dict) -> list[Evidence]:
    """Per ``lr_w``: the number of steps after the crossing with ``L_{t+1} > L_t + tol`` (bound 0); over the grid
    (worst run): I4's inequality, the phase-1 inequality (*) on non-jump steps, the jump-step bound ``J_1``,
    the jump count ``N_J`` and the phase-1 rise (I6).

    ``tol = 2 gamma_n M_abs`` (two evaluations of ``L``, each within ``gamma_n M_abs``). The normalised
    inequalities divide by ``s_t = M_abs + first_t + bad_t`` and get ``3 gamma_n`` (two losses and the
    computed right-hand side).
    """
    out = []
    with x64():
        P = _multi_program(settings["program"])
    main = P.select("main")
    for run in main:
        details = {"crossing_step": int(run.acc["tau"]), "B_star": run.consts.B_star,
                   "increases_before_crossing": int(run.acc["inc_before"]),
                   "max_increment_after_crossing": float(run.acc["inc_max_after"]),
                   "tol_increase": 2 * run.bounds.loss_tolerance()}
        out.append(Evidence("C14", f"multi: {P.describe()}, {run.setting}: steps after ||w_i||^2 >= lr_w B* with "
                                   f"L_t+1 > L_t + tol", float(run.acc["inc_after"]), 0.0, "<=", 0.0, "float64", "none",
                            details=details))
    tol3 = max(3 * gamma(r.bounds.n_ops, "float64") for r in main)

    def worst(values):
        i = int(np.argmax(values))
        return float(values[i]), main[i], {f"{r.lr_w:.3g}": float(v) for r, v in zip(main, values)}

    def ratio(measured: float, bound: float) -> float:
        # a zero bound means the quantity is exactly 0 (no phase 1: b_i0 >= B* and b only grows)
        return measured / bound if bound > 0 else (0.0 if measured == 0 else math.inf)

    chain = [
        ("I4 after the crossing: max_t (L_t+1 - L_t + kappa first_t)/s_t", [r.acc["i4_max"] for r in main], 0.0, tol3),
        ("(*) on non-jump steps: max_t (L_t+1 - L_t + kappa good_t - K sum_bad rho^2 a^2)/s_t",
         [r.acc["star_max"] for r in main], 0.0, tol3),
        ("jump steps: max_t (L_t+1 - L_t - J_1)", [r.acc["jump_max"] for r in main], 0.0,
         2 * max(r.bounds.loss_tolerance() for r in main)),
        ("jump steps: count minus its bound N_J", [float(r.acc["N_J"]) - r.consts.N_J for r in main], 0.0, 0.0),
        ("I6: total rise before the crossing / (N_J J_1 + S_bad)",
         [ratio(float(r.acc["inc_sum_before"]), r.consts.N_J * r.consts.J1 + r.consts.S_bad) for r in main], 1.0, tol3),
        ("(*) phase-1 sum: K sum rho^2 a^2 over bad non-jump steps / S_bad",
         [ratio(float(r.acc["S_bad"]), r.consts.S_bad) for r in main], 1.0, tol3),
        ("I7 telescoping: kappa sum_{t not in J} good_t / Delta",
         [r.consts.kappa * float(r.acc["S_good"]) / r.consts.Delta for r in main], 1.0, tol3),
        ("A2' and the region R: max_t max(a_i^2/G_i^2, b^2/G_g^2, ||g||^2/R_g^2)",
         [max(float(np.max(r.acc["max_a2"] / np.asarray(r.bounds.G_w) ** 2)), float(r.acc["max_b2"]) / r.bounds.G_g**2,
              float(r.acc["max_g_sq"]) / r.bounds.R_g**2) for r in main], 1.0, tol3),
    ]
    for what, values, bound, tol in chain:
        vals = np.array([v if not np.isnan(v) else -np.inf for v in np.asarray(values, np.float64)])
        v, run, per = worst(vals)
        out.append(Evidence("C14", f"multi: {P.describe()}, every lr_w of the grid: {what} "
                                   f"(worst lr_w = {run.lr_w:.3g})", v, bound, "<=", tol, "float64", "none",
                            details={"per_lr_w": per}))
    with x64():
        out += slack_records("C14", _slack_program(settings["program"]), "Delta")
        out.append(curvature_record("C14", _slack_program(settings["program"])))
    curves = {}
    for run in main:
        if abs(np.log10(run.lr_w) % 2) < 1e-9:
            curves[f"lr_w={run.lr_w:g}"] = run.recs["L"] - P.runs[0].bounds.L_min
    out[0].details["curves"] = {"L_t - L_min bound (multi_group)": curve(np.maximum(P.rec_t, 1), curves, "t",
                                                                          "L_t - L_min", logy=True, logx=True)}
    for cg in (1.1, 1.5):
        for run in P.select("c15", c_g=cg):
            out.append(Evidence("C14", f"multi: {P.describe()}, {run.setting}: steps after ||w_i||^2 >= lr_w B* (B* of "
                                       f"the c_g = 0.5 region) with L_t+1 > L_t + tol", float(run.acc["inc_after"]),
                                0.0, "<=", 0.0, "float64", "none", negative_control=True,
                                details={"breaks": f"lr_g < 2/L_gg (c_g = {cg})",
                                         "crossing_step": int(run.acc["tau"])}))
    return out


# -------------------------------------------------------------------------------------------------------
# C15: lr_g above 2 / L_gg breaks convergence for every lr_w
# -------------------------------------------------------------------------------------------------------


@claim(
    "C15",
    paper_ref="GD theorem conditions / contributions (PAPER §4.1) [R]",
    statement="lr_g < 2/L^gg: min_t ||grad L(V_t; g_t)||^2 <= eps for every lr_w; lr_g > 2/L^gg: it fails for "
              "every lr_w",
    hypotheses="multi_group: g-part 0.5 g^T Q g + coupling, L^gg = lambda_max(Q) = 3 exactly",
    negative_controls=("lr_g < 2/L_gg: c_g = lr_g L_gg/2 > 1 (quick: 1.1, 1.5; full: 1.01, 1.1, 1.5, 2)",),
    quick={"program": "quick"},
    full={"program": "full"},
)
def check_c15(settings: dict) -> list[Evidence]:
    """``m_T`` against ``eps`` for every ``(lr_w, c_g)``: ``c_g < 1`` are claim records, ``c_g > 1`` negative
    controls (the theorem's own). The ``c_g = 0.5`` runs are those of C9. Tolerance 0 (a chosen target).

    First, for every ``c_g`` of the program, a record that the rate the runs use is the one the claim labels:
    ``lr_g * lambda_max(Q) / 2 == c_g``, with ``lambda_max(Q)`` from numpy on the problem's ``Q`` (not from the
    rate's formula); tolerance ``4u`` relative (one product, one division, one eigenvalue of a 2x2.. matrix
    within ``gamma_n`` of exact, n <= 4). If the runs cannot be made (the program refuses a rate whose ``g``
    region is unbounded), that is recorded as a failed record too, not raised.
    """
    out = []
    cfg = PROGRAMS[settings["program"]]
    c_gs = sorted(set(cfg["c15_c_g"]) | {cfg["c_g"]})
    prob = _problem("multi")
    lam = float(np.linalg.eigvalsh(np.asarray(prob.constants["Q"], np.float64))[-1])
    n_q = int(np.shape(prob.constants["Q"])[0])
    for cg in c_gs:
        used = _lr_g(cg, prob.constants["L_gg"]) * lam / 2.0
        out.append(Evidence("C15", f"multi: the rate of the c_g = {cg:g} runs: lr_g lambda_max(Q) / 2 (lambda_max by "
                                   f"numpy) against the labelled c_g", used, cg, "==",
                            (4 * unit_roundoff("float64") + gamma(n_q, "float64")) * cg, "float64", "none",
                            details={"lr_g": _lr_g(cg, prob.constants["L_gg"]), "lambda_max_Q": lam}))
    try:
        with x64():
            P = _multi_program(settings["program"])
    except ValueError as exc:   # a rate the GD runner refuses: record the failure, do not raise
        out.append(Evidence("C15", f"multi: the GD program ({settings['program']}) refused its rates: {exc}",
                            math.inf, 0.0, "<=", 0.0, "float64", "none", details={"error": str(exc)}))
        out.append(Evidence("C15", "control: lr_g above 2/L_gg (not run: the program refused its rates)",
                            math.nan, 0.0, "<=", 0.0, "float64", "none", negative_control=True,
                            details={"breaks": "lr_g < 2/L_gg", "error": str(exc)}))
        return out
    table = {}
    for lw in cfg["c15_lr_w"]:
        for cg in c_gs:
            run = (P.select("main", lr_w=float(lw)) if cg == cfg["c_g"] else P.select("c15", lr_w=float(lw), c_g=cg))[0]
            m_T = float(run.acc["m"])
            table.setdefault(f"lr_w={lw:g}", {})[cg] = m_T
            details = {"last_recorded_gn": float(run.recs["gn"][-1]), "threshold_lr_g": 2.0 / P.prob.constants["L_gg"]}
            if cg > 1:
                details["breaks"] = f"lr_g < 2/L_gg (c_g = {cg:g})"
            else:
                details["C_over_T"] = run.consts.C / P.steps
            out.append(Evidence("C15", f"multi: {P.describe()}, {run.setting}: min_t ||grad L(V_t;g_t)||^2 vs eps = "
                                       f"{settings_eps(P)}", m_T, P.eps, "<=", 0.0, "float64", "none",
                                negative_control=cg > 1, details=details))
    out[len(c_gs)].details["curves"] = {"min_t ||grad||^2 vs c_g = lr_g L_gg / 2": curve(
        np.array(c_gs), {k: [v[c] for c in c_gs] for k, v in table.items()}, "c_g", "min_t<T ||grad L(V_t;g_t)||^2",
        logy=True)}
    return out
