"""The smoothness assumption A1 on the smoothed network, and proof step I2 (the norm along a step's segment).

* **A1**: on ``{||w_k|| = 1}`` the Hessian blocks of the smoothed network are bounded. Checked on the
  network of :mod:`proofs_check.smoothness` (one hidden smooth-BN layer, softplus, linear head,
  cross-entropy; per-channel scale-invariant kernels) against the bound derived in ``docs/derivations.md``
  ("A1") from ``eps``, softplus' curvature and the data's norms, measured at sampled points, along a GD
  trajectory, by projected ascent on the block norm, and along a path into the null space of the
  rank-deficient batch covariance. The negative control is the paper's exact-BN ReLU network, whose block
  norm grows like ``1 / sigma^2`` on the same path.
* **I2**: along the segment ``theta_t -> theta_{t+1}`` of a step every ``||w^(i)||`` is smallest at the
  start (the step is orthogonal to ``w``, Lemma 2.4 (1)). Measured on the stored parameters of runs of the
  library's optimizer; weight decay (and momentum) break it.

Checks run in float64 (:func:`proofs_check.numerics.x64`).

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019
(A1 [R], the smoothed network of §5 [R], proof skeleton of the GD theorem, PAPER §4.1, I2 [D]).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from proofs_check import problems
from proofs_check import smoothness as S
from proofs_check import trajectories as traj
from proofs_check.claims import claim
from proofs_check.curves import curve
from proofs_check.evidence import Evidence
from proofs_check.numerics import gamma, numpy_init, unit_roundoff, x64
from rate_tuning import groups as G
from rate_tuning import optim

GROWTH_THRESHOLD = -0.5
"""A1's boundedness record: the exponent ``p`` of ``||H_ww|| ~ sigma^(2p)`` as the batch variance of a channel
goes to 0 must be ``>= -1/2``: half-way between a bounded block (``p = 0``) and the exact-BN blow-up
(``p = -1``, the derivation's ``Jbar^2 ~ 1 / sigma^2``). Over the probed range ``sigma^2 <= eps / 100`` the
smooth network's block differs from its ``sigma = 0`` value by a relative ``O(sigma / sqrt(eps)) <= 0.1``, so
its fitted exponent is within ``0.1 / ln(10^4) ~ 0.01`` of 0: the threshold is far from both."""


def _ols_slope(x, y) -> float:
    x, y = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    return float(np.polyfit(x, y, 1)[0])


# -------------------------------------------------------------------------------------------------------
# A1
# -------------------------------------------------------------------------------------------------------


def _in_region(net: S.SmallNet, p) -> bool:
    R = net.region
    return bool(np.all(np.abs(np.asarray(p["gamma"])) <= R.gamma) and np.all(np.abs(np.asarray(p["beta"])) <= R.beta)
                and np.all(np.linalg.norm(np.asarray(p["V"]), axis=1) <= R.nu))


def _ratio(blocks: dict, bound: dict) -> tuple[float, str, dict]:
    """The worst measured / bound over the block kinds, its kind, and every measured value."""
    vals = {"L_ww": max(blocks["L_ww_diag"][0], blocks["L_ww_off"][0]), "L_gw": blocks["L_gw"][0],
            "L_gg": blocks["L_gg"][0]}
    ratios = {k: vals[k] / bound[k] for k in vals}
    worst = max(ratios, key=ratios.get)
    return ratios[worst], worst, vals


def _merge(acc: dict | None, blocks: dict) -> dict:
    if acc is None:
        return dict(blocks)
    return {k: max(acc[k], blocks[k], key=lambda v: v[0]) for k in acc}


def _gd_path(net: S.SmallNet, steps: int, lr_w: float, lr_g: float, seed: int, snapshot_every: int = 1):
    """A GD run of the library's optimizer on the small network from a point inside the region."""
    p0 = S.project(net, S.region_sampler(net)(jax.random.key(seed)))
    p0 = dict(p0, gamma=0.5 * p0["gamma"], beta=0.5 * p0["beta"], V=0.5 * p0["V"])   # well inside R
    tx = optim.two_rate_sgd(net.labels, lr_w, lr_g)
    return traj.run(net.loss, p0, net.labels, tx, steps, lr_w=lr_w, lr_g=lr_g, snapshot_every=snapshot_every), p0


@claim(
    "A1",
    paper_ref="assumption A1, smoothness on the unit set, for the smoothed network of §5 [R]",
    statement="on {||w_k|| = 1} x R: ||H_{w_k w_j}|| <= L^ww, ||H_{g w_k}|| <= L^gw, ||H_gg|| <= L^gg with the "
              "bound of docs/derivations.md (eps, softplus'' <= 1/4, the data's norms); bounded as sigma^2 -> 0",
    hypotheses="one hidden smooth-BN layer sqrt(sigma^2 + eps ||w||^2), eps > 0, softplus, linear head, "
               "cross-entropy; per-channel SI kernels; g in the region R (|gamma| <= 2, |beta| <= 1, ||V_k|| <= 1)",
    negative_controls=("exact BN (eps = 0) with ReLU on the same rank-deficient batch: ||H_ww|| ~ 1/sigma^2 as "
                       "the channel approaches the covariance's null space",),
    quick={"points": 6, "traj_steps": 0, "traj_points": 0, "ascent_iters": 0, "probe": 5},
    full={"points": 64, "traj_steps": 400, "traj_points": 16, "ascent_iters": 25, "probe": 9},
)
def check_a1(settings: dict) -> list[Evidence]:
    """Measured block norms / bound ``<= 1`` four ways; the growth exponent on the null-space path ``>= -1/2``.

    Tolerance of the ratio records: the dense Hessian's entries are within ``gamma_N`` of exact (``N``
    parameters) and numpy's eigen/singular values within ``gamma_{N^2}`` of the computed matrix's:
    ``2 gamma_{N^2}`` relative to the measured norm (bound 1 on the ratio; ~1e-11, nothing next to the slack).
    """
    out = []
    with x64():
        net = S.small_net()
        bound = S.a1_bound(net)
        key = jax.random.key(0)
        sampler = S.region_sampler(net)
        N = sum(int(np.size(v)) for v in jax.tree.leaves(sampler(key)))
        tol = 2 * gamma(N * N, "float64")
        common = {"bound": {k: bound[k] for k in ("L_ww", "L_ww_diag", "L_ww_off", "L_gw", "L_gg")},
                  "bound_inputs": bound["inputs"],
                  "covers": "one hidden smooth-BN layer (16 digits images, 64 -> 4 channels), softplus, linear "
                            "head with bias, cross-entropy; g in the region R"}

        def record(name, blocks, extra=None, ctl=None):
            r, worst, vals = _ratio(blocks, bound)
            details = dict(common, measured=vals, slack={k: bound[k] / v for k, v in vals.items() if v > 0},
                           worst_block=worst, **(extra or {}))
            out.append(Evidence("A1", f"smoothed 1-layer net, eps={net.eps:g}: {name}, max block norm / bound "
                                      f"(worst: {worst})", r, 1.0, "<=", tol, "float64", "smooth",
                                details=details))

        # 1. sampled points of {||w_k|| = 1} x R
        acc = None
        starts = []
        for i in range(settings["points"]):
            p = S.project(net, sampler(jax.random.fold_in(key, i)))
            blocks = S.dense_blocks(net, p)
            acc = _merge(acc, blocks)
            starts.append((blocks["L_ww_diag"][0], p))
        record(f"{settings['points']} sampled points", acc, {"method": "dense Hessian blocks (numpy eigvalsh / norm 2)"})

        # the null-space edge: w_0 in the batch covariance's null space, gamma and the rows of V at R's edge
        x = np.asarray(net.x)
        xc = x - x.mean(axis=0)
        null = np.linalg.eigh(xc.T @ xc)[1][:, 0]
        p_best = max(starts, key=lambda s: s[0])[1]
        R = net.region
        edge = dict(p_best, w=jnp.asarray(p_best["w"]).at[:, 0].set(null),
                    gamma=jnp.full_like(p_best["gamma"], R.gamma),
                    V=p_best["V"] / jnp.linalg.norm(p_best["V"], axis=1, keepdims=True) * R.nu)

        if settings["traj_steps"]:   # full settings only (compiling the run costs seconds)
            # 2. along a GD trajectory (library optimizer, lr_w = 10, lr_g = 0.1), unit-normalised snapshots in R
            tr, _ = _gd_path(net, settings["traj_steps"], 10.0, 0.1, seed=1)
            idx = np.unique(np.linspace(0, settings["traj_steps"] - 1, settings["traj_points"]).astype(int))
            acc, used = None, 0
            for t in idx:
                snap = jax.tree.map(lambda v: v[t], tr.snapshots)
                if not _in_region(net, snap):
                    continue
                acc, used = _merge(acc, S.dense_blocks(net, S.project(net, snap))), used + 1
            if acc is None:
                raise RuntimeError("the GD trajectory left the region R at every sampled step")
            record(f"GD trajectory ({settings['traj_steps']} steps, lr_w=10, lr_g=0.1, {used} snapshots in R)", acc)

        if settings["ascent_iters"]:   # full settings only (compiling the third derivative costs seconds)
            # 3. adversarial: projected ascent on each block norm, from the null-space point (w_0 in the
            # covariance's null space, gamma, V at the region's edge) and from the best sampled point
            found, hist = {}, {}
            for kind in ("L_ww", "L_gw", "L_gg"):
                best = 0.0
                for label, start in (("null-space edge", edge), ("best sampled", p_best)):
                    v, h = S.adversarial_search(net, start, kind, settings["ascent_iters"])
                    hist[f"{kind} from {label}"] = h
                    best = max(best, v)
                found[kind] = best
            blocks = {"L_ww_diag": (found["L_ww"], None), "L_ww_off": (0.0, None), "L_gw": (found["L_gw"], None),
                      "L_gg": (found["L_gg"], None)}
            record(f"projected ascent on each block norm ({settings['ascent_iters']} steps from 2 starts)", blocks,
                   {"curves": {"A1 adversarial ascent (block norm per accepted/refused step)":
                               curve(None, {k: np.pad(v, (0, settings["ascent_iters"] + 1 - len(v)), mode="edge")
                                             for k, v in hist.items()},
                                     "ascent step", "block norm", logy=True)}})

        # 4. the null-space path: the smooth net stays bounded, the exact-BN ReLU net blows up like 1/sigma^2
        s2 = net.eps * np.geomspace(1e-2, 1e-6, settings["probe"])
        smooth_norms, smooth_s2 = S.null_space_probe(net, edge, s2, channel=1)
        exact = S.small_net(eps=0.0, activation="relu")
        exact_norms, exact_s2 = S.null_space_probe(exact, edge, s2, channel=1)
        record("null-space path (channel 1 approaching the covariance's null space)",
               {"L_ww_diag": (float(smooth_norms.max()), None), "L_ww_off": (0.0, None), "L_gw": (0.0, None),
                "L_gg": (0.0, None)})
        p_s, p_e = _ols_slope(smooth_s2, smooth_norms), _ols_slope(exact_s2, exact_norms)
        curves = {"A1 ||H_ww|| on the path into the null space of the batch covariance":
                  curve(smooth_s2, {"smooth BN + softplus (bounded)": smooth_norms,
                                    "exact BN + ReLU (control, ~1/sigma^2)": exact_norms,
                                    "A1 bound L^ww (smoothed)": np.full(len(s2), bound["L_ww"])},
                        "batch variance sigma^2 = w^T Sigma w of the channel", "||H_{w_k w_k}||", logy=True, logx=True)}
        growth = {"sigma_sq": smooth_s2.tolist(), "smooth": smooth_norms.tolist(), "exact": exact_norms.tolist(),
                  "exponent_smooth": p_s, "exponent_exact": p_e,
                  "threshold": "-1/2: half-way between bounded (0) and the exact-BN blow-up (-1); see GROWTH_THRESHOLD"}
        out.append(Evidence("A1", f"smoothed 1-layer net, eps={net.eps:g}: exponent p of ||H_ww|| ~ sigma^(2p) as "
                                  f"sigma^2 -> 0 (sigma^2 in [{s2[-1]:.1e}, {s2[0]:.1e}])", p_s, GROWTH_THRESHOLD,
                            ">=", 0.0, "float64", "smooth", details=dict(growth, curves=curves)))
        out.append(Evidence("A1", "control: exact BN (eps = 0) + ReLU, same batch and path: exponent p of "
                                  "||H_ww|| ~ sigma^(2p) as sigma^2 -> 0", p_e, GROWTH_THRESHOLD, ">=", 0.0,
                            "float64", "exact", negative_control=True,
                            details=dict(growth, breaks="eps > 0 and softplus (exact BN, ReLU)",
                                         expected_exponent=-1.0)))
    return out


# -------------------------------------------------------------------------------------------------------
# I2
# -------------------------------------------------------------------------------------------------------


def _group_vectors(path, labels) -> dict[str, np.ndarray]:
    """``{group: (T+1, n) array}`` of every SI group's parameters along ``path`` (per-channel groups split)."""
    out: dict[str, list] = {}
    for _, leaf, lab in G.flatten_labelled(path, labels):
        if lab.kind != G.SI:
            continue
        leaf = np.asarray(leaf, np.float64)
        if lab.per_channel:
            for c in range(leaf.shape[-1]):
                out.setdefault(f"{lab.group}[{c}]", []).append(leaf[..., c].reshape(len(leaf), -1))
        else:
            out.setdefault(lab.group, []).append(leaf.reshape(len(leaf), -1))
    return {k: np.concatenate(v, axis=1) for k, v in out.items()}


S_GRID = np.unique(np.concatenate([[0.0], np.geomspace(1e-8, 1.0, 33), np.linspace(0.0, 1.0, 33)]))


def segment_dip(path, labels) -> dict:
    """``min over s in [0, 1]`` of ``||w_t + s (w_{t+1} - w_t)||^2 / ||w_t||^2 - 1`` per step and group.

    Evaluated on the grid :data:`S_GRID` plus the minimiser ``s* = -<w_t, D>/||D||^2`` of the quadratic
    (clipped to ``[0, 1]``), from the stored parameters only. Returns ``{'dip': (T, m), 'rel_step':
    ||D|| / ||w_t|| (T, m), 'growth': ||w_{t+1}||^2 / ||w_t||^2 - 1 (T, m), 'groups', 'n': largest group size}``.
    """
    vecs = _group_vectors(path, labels)
    dips, rel, growth = [], [], []
    for g, v in vecs.items():
        w0, w1 = v[:-1], v[1:]
        D = w1 - w0
        n0 = np.sum(w0 * w0, axis=1)
        dd = np.sum(D * D, axis=1)
        s_star = np.clip(-np.sum(w0 * D, axis=1) / np.where(dd > 0, dd, 1.0), 0.0, 1.0)
        s = np.concatenate([np.broadcast_to(S_GRID, (len(w0), len(S_GRID))), s_star[:, None]], axis=1)
        pts = w0[:, None, :] + s[:, :, None] * D[:, None, :]
        dips.append(np.min(np.sum(pts * pts, axis=2), axis=1) / n0 - 1.0)
        rel.append(np.sqrt(dd / n0))
        growth.append(np.sum(w1 * w1, axis=1) / n0 - 1.0)
    return {"dip": np.stack(dips, 1), "rel_step": np.stack(rel, 1), "growth": np.stack(growth, 1),
            "groups": list(vecs), "n": max(v.shape[1] for v in vecs.values())}


def tol_segment(n: int, rel_step: float) -> float:
    """Tolerance of the segment dip (I2), float64.

    Derivation: ``D = fl(w_{t+1} - w_t)`` and ``w(s) = fl(w_t + fl(s D))`` carry per entry an error at most
    ``3u |D_e| + u |w(s)_e|``, i.e. a vector error ``<= 3u ||D|| + u ||w(s)||``, which moves ``||w(s)||^2`` by a
    relative ``2 (3u ||D|| + u ||w(s)||) / ||w(s)||`` (``||w(s)|| >= ||w_t||`` in exact arithmetic); each
    squared norm of ``n`` terms adds ``gamma_n``: ``2 gamma_n + 2u + 6u ||D|| / ||w_t||``.
    """
    u = unit_roundoff("float64")
    return 2 * gamma(n, "float64") + 2 * u + 6 * u * rel_step


@functools.lru_cache(maxsize=None)
def _i2_runs(steps: int, bn_control: bool):
    """``{name: (trajectory, labels, bn, control)}``: toy and BN-net runs of the library's optimizer (the plain
    toy run and the BN net's weight-decay control only with ``bn_control``, the full settings: each run
    compiles its own scan)."""
    runs = {}
    multi = problems.multi_group()
    toy = (("multi_group GD lr_w=1 lr_g=0.1", {}, None),
           ("multi_group GD + weight decay 1e-2", {"weight_decay": 1e-2}, "weight decay 1e-2"))
    for name, kw, ctl in toy[0 if bn_control else 1:]:
        p0 = numpy_init(multi, 0, 0.5, "float64")
        tx = optim.two_rate_sgd(multi.labels, 1.0, 0.1, **kw)
        tr = traj.run(multi.loss, p0, multi.labels, tx, steps, lr_w=1.0, lr_g=0.1, snapshot_every=1)
        runs[name] = (tr, multi.labels, "none", ctl)
    net = S.small_net()
    for name, kw, ctl in (("smoothed 1-layer BN net GD lr_w=10 lr_g=0.1", {}, None),
                          ("smoothed 1-layer BN net GD + weight decay 1e-2", {"weight_decay": 1e-2},
                           "weight decay 1e-2"))[:2 if bn_control else 1]:
        p0 = S.project(net, S.region_sampler(net)(jax.random.key(1)))
        tx = optim.two_rate_sgd(net.labels, 10.0, 0.1, **kw)
        tr = traj.run(net.loss, p0, net.labels, tx, steps, lr_w=10.0, lr_g=0.1, snapshot_every=1)
        runs[name] = (tr, net.labels, "smooth", ctl)
    return runs


@claim(
    "I2",
    paper_ref="proof of the GD theorem, step I2: the norm is smallest at the start of a step's segment (PAPER §4.1) [D]",
    statement="for every step t, group i and s in [0, 1]: ||w_t^(i) + s (w_{t+1}^(i) - w_t^(i))|| >= ||w_t^(i)||",
    hypotheses="SI groups updated by plain GD/SGD (the step is orthogonal to w_t: Lemma 2.4 (1)); no weight decay",
    negative_controls=("coupled weight decay 1e-2 (the step has a component -lr lambda w_t along w_t)",),
    quick={"steps": 50, "bn_control": False},
    full={"steps": 1000, "bn_control": True},
)
def check_i2(settings: dict) -> list[Evidence]:
    """``min_t min_i min_s (||w(s)||^2 / ||w_t||^2 - 1) >= -tol`` (:func:`tol_segment`) on each run.

    Momentum is no control here: with heavy ball the step is ``-lr (g_t + m buffer)`` and
    ``<w_t, buffer> = <w_{t-1} + D_{t-1}, buffer>``, which the previous (outward-growing) steps make
    positive, so the segment still starts at its smallest norm in practice (measured: multi_group, 100
    steps, momentum 0.9, no step violates I2); I2 needs orthogonality only, which weight decay breaks.
    """
    out = []
    with x64():
        for name, (tr, labels, bn, ctl) in _i2_runs(settings["steps"], settings["bn_control"]).items():
            path = jax.tree.map(lambda s, f: np.concatenate([np.asarray(s), np.asarray(f)[None]], axis=0),
                                tr.snapshots, tr.final_params)
            res = segment_dip(path, labels)
            dip = res["dip"]
            t, gi = np.unravel_index(int(np.argmin(dip)), dip.shape)
            tol = tol_segment(res["n"], float(np.max(res["rel_step"])))
            details = {"step": int(t), "group": res["groups"][gi], "steps_violated": int(np.sum(dip.min(1) < -tol)),
                       "min_growth_at_s1": float(res["growth"].min()), "margin_over_tolerance": float(dip.min() / tol),
                       "tolerance_formula": "2 gamma_n + 2u + 6u max ||D|| / ||w_t||",
                       "curves": {f"I2 min_s ||w(s)||^2/||w_t||^2 - 1 ({name})":
                                  curve(None, dip.min(axis=1), "step", "segment dip (< 0: I2 violated)", logy=False)}}
            if ctl:
                details["breaks"] = ctl
            out.append(Evidence("I2", f"{name}, {settings['steps']} steps, float64: min over steps, groups and "
                                      f"s in [0,1] of ||w(s)||^2/||w_t||^2 - 1", float(dip.min()), 0.0, ">=", tol,
                                "float64", bn, negative_control=bool(ctl), details=details))
    return out
