"""Find the scale-invariant groups of any flax model numerically: the audit.

Given a model (flax linen or NNX), its variables and a batch, :func:`audit` probes the train-mode loss
``L(theta)`` on that batch and returns which parameters are scale-invariant (Definition 2.1 of Arora, Li &
Lyu, ICLR 2019: ``L(c w) = L(w)`` for every ``c > 0``), as a label tree that :func:`rate_tuning.optim.two_rate_sgd`
and :func:`rate_tuning.groups.verify_labels` take, and a table of what was measured.

The model comes as a :class:`rate_tuning.targets.Target` (the factory contract is in :mod:`rate_tuning.targets`);
from the command line: ``rate-tuning audit MODULE:FACTORY [--frozen PATHS] [--json FILE]``.

The search (docs/derivations.md, "Auditing a model"), all in float64 inside ``jax.enable_x64``:

1. *Euler rows.* At generic points (the given parameters with every leaf perturbed by 20 % of its rms)
   and on sub-batches of the batch (a BatchNorm is scale-invariant on each batch it normalises), one
   gradient gives ``e_l = <grad_l L, theta_l>`` for every leaf ``l`` and per output channel. A group ``S``
   is scale-invariant only if ``sum_{l in S} e_l = 0`` on every row (differentiate ``L(c theta_S)`` at ``c = 1``).
2. *Single leaves and channels*: leaves with ``|cos(grad_l, theta_l)| <= tol`` on every row, and among
   them kernels (``ndim >= 2``) whose every output channel (last axis) has ``|cos| <= tol``.
3. *Joint groups* among the other leaves (``m`` of them, ``K >= m + 4`` rows): the null space ``V`` of the
   row-normalised ``K x m`` matrix of ``e`` (SVD), then for each leaf ``i`` in its support one linear
   program ``min 1'z  s.t.  z in V, 0 <= z <= 1, z_i = 1``: its solution is the indicator of the smallest
   group containing ``i`` when one exists (fractional or infeasible otherwise: rescaling symmetries such as
   ``(W_q, W_k) -> (c W_q, W_k / c)`` are not scale invariance). Cost: ``O(K m^2)`` for the SVD, ``m`` linear
   programs of ``m`` constraints, ``ceil(K / sub-batches)`` gradients: polynomial in the number of leaves.
4. *Finite probes* (Definition 2.1) of every candidate: ``|L(c w_S) - L(w)| / max(|L|, 1)`` for ``c`` in
   ``scales`` (times a random factor in ``[1/e, e]`` per group or per channel), group by group on a
   sub-batch, and all groups at once on the whole batch; failures are found by bisection.

Tolerances come from the dtype and the operation count (:func:`roundoff_budget`): ``rho = sum_e u_e n_e``
over the equations of the traced program (``u_e`` the unit round-off of the equation's dtype, ``n_e`` its
reduction length), ``tol = 4 rho`` for a loss difference, ``2 rho`` for a cosine. A leaf or group whose
cosine exceeds the tolerance but stays below ``almost`` (default 1e-3), and whose loss changes by at most
``almost`` at ``c`` in {0.5, 3}, is *almost invariant* (standard BatchNorm's epsilon): named with its
measured violation, labelled ``'variant'`` unless asked otherwise.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rate_tuning import groups as G
from rate_tuning.targets import (AuditError, Target, from_linen, from_nnx, load_factory, nnx_labels,  # noqa: F401
                                 roundoff_budget, target)

SCALES = (1e-2, 0.5, 3.0, 1e2)
"""The factors ``c`` of the finite probes."""
NEAR_SCALES = (0.5, 3.0)
"""The factors at which an almost-invariant group must change the loss by at most ``almost``."""
ALMOST = 1e-3
TINY = 1e3
"""A gradient below ``TINY * eps * max(|L|, 1)`` (times ``||w||``) is round-off: its cosine is not measured."""

# ---------------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One group found: its leaves, whether per output channel, ``'si'`` or ``'almost'``, the measured
    invariance (worst ``|L(c w) - L(w)| / max(|L|, 1)`` over the scales) and orthogonality (worst
    ``|cos(grad, w)|``) with the round-off tolerance each was judged against (an almost-invariant group
    exceeds them; ``near_invariance``, its change at ``c`` in {0.5, 3}, is within the ``almost`` threshold)."""

    name: str
    paths: tuple[str, ...]
    per_channel: bool
    status: str
    invariance: float = float("nan")
    orthogonality: float = float("nan")
    tol_invariance: float = 0.0
    tol_orthogonality: float = 0.0
    near_invariance: float = float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AuditResult:
    """The groups found, the leaves left scale-variant or frozen, and how they were measured."""

    name: str
    params: Any
    groups: list[Group]
    almost: list[Group]
    variant: list[str]
    frozen: list[str]
    info: dict

    def labels(self, grouping: str = "layer", *, include_almost: bool = False):
        """The label tree of the params: ``'si'`` groups (``grouping='channel'``: per output channel where
        the audit found each channel invariant), ``'frozen'`` leaves, the rest ``'variant'`` (almost-invariant
        groups too, unless ``include_almost``)."""
        if grouping not in ("layer", "channel"):
            raise ValueError(f"unknown grouping {grouping!r}; known: layer, channel")
        by_path = {p: G.FROZEN_LABEL for p in self.frozen}
        for g in self.groups + (self.almost if include_almost else []):
            for p in g.paths:
                by_path[p] = G.si(g.name, per_channel=g.per_channel and grouping == "channel")
        flat = jax.tree_util.tree_flatten_with_path(self.params)
        return jax.tree_util.tree_unflatten(flat[1], [by_path.get(G.path_str(p), G.VARIANT_LABEL)
                                                      for p, _ in flat[0]])

    def table(self) -> str:
        """The groups, almost-invariant groups, variant and frozen leaves, one line each."""
        width = min(max([len(g.name) for g in self.groups + self.almost] + [5]), 60)
        head = f"{'group':{width}s} {'kind':11s} {'invariance':>10s} {'tol':>8s} {'|cos|':>10s} {'tol':>8s}  leaves"
        lines = [f"audit of {self.name}: {len(self.groups)} scale-invariant group(s), {len(self.almost)} almost "
                 f"invariant (|cos| and the loss change at c = 0.5, 3 below {self.info.get('almost', ALMOST):g}), "
                 f"{len(self.variant)} scale-variant leaf(s), {len(self.frozen)} frozen "
                 f"({self.info.get('seconds', float('nan')):.1f} s, float64)", head]
        for g in self.groups + self.almost:
            kind = g.status + ("/channel" if g.per_channel else "")
            lines.append(f"{g.name[:width]:{width}s} {kind:11s} {g.invariance:10.2e} {g.tol_invariance:8.1e} "
                         f"{g.orthogonality:10.2e} {g.tol_orthogonality:8.1e}  {', '.join(g.paths)}")
        if self.variant:
            lines.append("scale-variant: " + ", ".join(self.variant))
        if self.frozen:
            lines.append("frozen: " + ", ".join(self.frozen))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "groups": [g.to_dict() for g in self.groups],
                "almost": [g.to_dict() for g in self.almost], "variant": list(self.variant),
                "frozen": list(self.frozen), "info": dict(self.info)}


def group_membership(params, labels) -> dict:
    """``{frozenset(paths): per_channel}`` of the ``'si'`` groups plus the sets of ``'variant'`` and
    ``'frozen'`` paths: a comparison of label trees that ignores group names."""
    flat = G.flatten_labelled(params, labels)
    groups = G.si_groups(params, labels)
    per_ch = {lab.group: lab.per_channel for _, _, lab in flat if lab.kind == G.SI}
    return {"si": {frozenset(p): per_ch[n] for n, p in groups.items()},
            "variant": {p for p, _, lab in flat if lab.kind == G.VARIANT},
            "frozen": {p for p, _, lab in flat if lab.kind == G.FROZEN}}


def compare_labels(params, found, expected) -> list[str]:
    """The differences between two label trees of ``params``, group names ignored (empty: the same groups,
    the same per-channel flags, the same variant and frozen leaves)."""
    a, b = group_membership(params, found), group_membership(params, expected)
    out = []
    for s in sorted(set(a["si"]) | set(b["si"]), key=lambda s: sorted(s)):
        if s not in b["si"]:
            out.append(f"found group {{{', '.join(sorted(s))}}} is not expected")
        elif s not in a["si"]:
            out.append(f"expected group {{{', '.join(sorted(s))}}} was not found")
        elif a["si"][s] != b["si"][s]:
            out.append(f"group {{{', '.join(sorted(s))}}}: per_channel {a['si'][s]} != expected {b['si'][s]}")
    for kind in ("variant", "frozen"):
        for p in sorted(a[kind] ^ b[kind]):
            out.append(f"{p}: {kind} in {'found' if p in a[kind] else 'expected'} only")
    return out


# ---------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).strip().splitlines()[:1]) if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:400]


def _group_name(paths: Sequence[str], taken: set) -> str:
    """``'layer0:kernel'`` (one leaf), ``'bn0:affine'`` (a module's scale and bias), ``'a+b:affine'``
    (several modules); unique among ``taken``."""
    split = [p.rpartition("/") for p in paths]
    modules = list(dict.fromkeys(m for m, _, _ in split))
    by_module = {m: {leaf for mm, _, leaf in split if mm == m} for m in modules}
    if all(v == {"scale", "bias"} for v in by_module.values()):
        suffix = "affine"
    else:
        suffix = "+".join(dict.fromkeys(leaf for _, _, leaf in split))
    prefix = "+".join(m or "." for m in modules)
    if len(prefix) > 48:
        prefix = f"{modules[0] or '.'}+{len(modules) - 1}more"
    name, k = f"{prefix}:{suffix}" if modules != [""] else suffix, 2
    base = name
    while name in taken:
        name, k = f"{base}#{k}", k + 1
    taken.add(name)
    return name


class _Probe:
    """The loss of one target in float64 over its trainable leaves, its Euler rows and finite probes."""

    def __init__(self, t: Target, seed: int, sub_batch: int | None):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(t.params)
        self.paths = [G.path_str(p) for p, _ in flat]
        unknown = sorted(set(t.frozen) - set(self.paths))
        if unknown:
            raise AuditError(f"frozen path {unknown[0]} is not a parameter; parameters: {', '.join(self.paths[:8])}"
                             + (" ..." if len(self.paths) > 8 else ""))
        leaves = [jnp.asarray(x) for _, x in flat]
        self.integer = [p for p, x in zip(self.paths, leaves) if not jnp.issubdtype(x.dtype, jnp.inexact)]
        self.frozen = [p for p in self.paths if p in set(t.frozen) or p in set(self.integer)]
        self.train = [i for i, p in enumerate(self.paths) if p not in set(self.frozen)]
        if not self.train:
            raise AuditError("the model has no trainable floating-point parameters")
        self.leaves = [x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.inexact) else x for x in leaves]
        self.ndim = [x.ndim for x in self.leaves]
        self.rng = np.random.default_rng(seed)
        self.batch = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
            else jnp.asarray(a), t.batch)
        sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in jax.tree_util.tree_leaves(self.batch)}
        n = sizes.pop() if len(sizes) == 1 else -1
        b = sub_batch or (8 if n >= 16 else n)
        self.S = n // b if n > 0 and 0 < b <= n and n // b >= 2 else 1
        self.b = b if self.S > 1 else n
        take = lambda a: a[:self.S * self.b].reshape((self.S, self.b) + a.shape[1:])  # noqa: E731
        self.stacked = jax.tree_util.tree_map(take, self.batch) if self.S > 1 else \
            jax.tree_util.tree_map(lambda a: a[None], self.batch)
        self.sub0 = jax.tree_util.tree_map(lambda a: a[0], self.stacked)
        user_loss = t.loss

        def loss(train_leaves, batch):
            full = list(self.leaves)
            for i, x in zip(self.train, train_leaves):
                full[i] = x
            return user_loss(jax.tree_util.tree_unflatten(self.treedef, full), batch)

        def scaled(train_leaves, factors, batch):
            return loss([x * f for x, f in zip(train_leaves, factors)], batch)

        def row(train_leaves, b):
            value, g = jax.value_and_grad(loss)(train_leaves, b)
            e = [jnp.sum(gi * x) for gi, x in zip(g, train_leaves)]
            gn = [jnp.sum(gi * gi) for gi in g]
            ec = [jnp.sum(gi * x, axis=tuple(range(x.ndim - 1))) if x.ndim >= 2 else jnp.zeros(0)
                  for gi, x in zip(g, train_leaves)]
            gc = [jnp.sum(gi * gi, axis=tuple(range(x.ndim - 1))) if x.ndim >= 2 else jnp.zeros(0)
                  for gi, x in zip(g, train_leaves)]
            return value, jnp.stack(e), jnp.stack(gn), ec, gc

        self.loss, self._scaled, self._row = loss, jax.jit(scaled), jax.jit(row)
        x0 = [self.leaves[i] for i in self.train]
        ones = self.ones()
        try:
            self.loss0 = float(self._scaled(x0, ones, self.batch))
        except AuditError:
            raise
        except Exception as e:
            raise AuditError(f"the model fails on the batch: {_one_line(e)}") from None
        if not math.isfinite(self.loss0):
            raise AuditError(f"the loss on the batch is {self.loss0}: the audit needs a finite train-mode loss")
        u = float(np.finfo(np.float64).eps) / 2
        self.tol_cos = 2 * roundoff_budget(jax.value_and_grad(loss), x0, self.sub0)
        self.tol_sub = 4 * (roundoff_budget(scaled, x0, ones, self.sub0) + u)
        self.tol_full = 4 * (roundoff_budget(scaled, x0, ones, self.batch) + u)
        rms = [float(np.sqrt(np.mean(np.square(self.leaves[i])))) if self.leaves[i].size else 0.0 for i in self.train]
        self.sigma = [r if r > 0 else float(np.median([v for v in rms if v > 0] or [1.0])) for r in rms]
        self.points: list = []
        self.base: dict = {}

    def ones(self):
        return [jnp.ones(self.leaves[i].shape[-1:] if self.ndim[i] else (), jnp.float64) for i in self.train]

    def point(self, j: int):
        """Generic point ``j`` (0, 1, ...): every trainable leaf plus 20 % of its rms times N(0, 1)."""
        while len(self.points) <= j:
            self.points.append([self.leaves[i] + 0.2 * s * self.rng.standard_normal(self.leaves[i].shape)
                                for i, s in zip(self.train, self.sigma)])
        return self.points[j]

    def rows(self, j: int, count: int) -> dict:
        """Euler rows at point ``j`` on sub-batches ``0..count-1``: ``L``, ``e_l``, ``||g_l||^2``, ``||w_l||^2``
        and the same per output channel (one jitted gradient per sub-batch: on XLA's CPU backend a Python
        loop beat ``vmap`` over sub-batches by 2x on the resnet preset)."""
        x = self.point(j)
        out = []
        for i in range(count):
            b = jax.tree_util.tree_map(lambda a: a[i], self.stacked)
            try:
                out.append(jax.device_get(self._row(x, b)))
            except Exception as err:
                raise AuditError(f"the model fails on a sub-batch of {self.b} examples: {_one_line(err)} "
                                 "(pass sub_batch= the batch size to probe whole batches only)") from None
        value, e, gn = (np.stack([o[k] for o in out]) for k in range(3))
        ec, gc = ([np.stack([o[k][l] for o in out]) for l in range(len(x))] for k in (3, 4))
        wn = np.array([float(np.sum(np.square(xi))) for xi in x])
        wc = [np.sum(np.square(xi), axis=tuple(range(xi.ndim - 1))) if xi.ndim >= 2 else np.zeros(0) for xi in x]
        return {"loss": value, "e": e, "gn": gn, "wn": wn, "ec": ec, "gc": gc, "wc": wc}

    def change(self, factors, j: int = 0, full: bool = False) -> float:
        """``|L(D theta) - L(theta)| / max(|L|, 1)`` at point ``j`` on sub-batch 0 (or the whole batch)."""
        x, batch = self.point(j), (self.batch if full else self.sub0)
        if (j, full) not in self.base:
            self.base[(j, full)] = float(self._scaled(x, self.ones(), batch))
        base = self.base[(j, full)]
        new = float(self._scaled(x, factors, batch))
        value = abs(new - base) / max(abs(base), 1.0)
        return value if math.isfinite(value) else float("inf")


MAX_POINTS = 64
"""At most this many generic points (each gives one Euler row per sub-batch)."""


def _group_cos(rows: list, group: Sequence[int], per_channel: bool) -> float:
    """Worst ``|cos(grad_S, w_S)|`` over every row (per channel: over channels too); NaN if no row measured
    it (a gradient at round-off level on every row)."""
    eps = float(np.finfo(np.float64).eps)
    worst = float("nan")
    for r in rows:
        floor = TINY * eps * np.maximum(np.abs(np.asarray(r["loss"])), 1.0)
        if per_channel:
            (l,) = group
            num, den = np.abs(r["ec"][l]), np.sqrt(r["gc"][l] * r["wc"][l][None, :])
            floor = floor[:, None]
        else:
            num = np.abs(np.sum(r["e"][:, group], axis=1))
            den = np.sqrt(np.sum(r["gn"][:, group], axis=1) * np.sum(r["wn"][list(group)]))
        ok = den > floor
        if ok.any():
            value = float(np.max(num[ok] / den[ok]))
            worst = value if not worst >= value else worst
    return worst


def _joint_groups(rows: list, R: Sequence[int], tol: float, indicator_tol: float):
    """Minimal groups of >= 2 leaves of ``R`` whose indicator is in the null space of the Euler rows.

    ``E`` is the ``K x m`` matrix of ``e_kl`` (rows ``k``, leaves ``l`` of ``R``); column ``l`` is divided by
    ``d_l``, the rms over rows of ``||g_kl|| ||w_l||``, so every column is a sequence of cosines and no leaf
    is lost in another's scale. A scale-invariant group ``S`` gives ``u = 1_S d`` with
    ``||E D^-1 u|| <= sqrt(K m) tol ||u||`` (``tol`` bounds every group cosine); singular values below that
    span the numerical null space, ``V`` its image in leaf coordinates. For each leaf ``i`` in its support,
    the linear program ``min 1'z, z in V, 0 <= z <= 1, z_i = 1`` gives the indicator of the smallest group
    containing ``i``, when there is one. Returns ``(groups, leaves in other symmetries)``.
    """
    from scipy.optimize import linprog

    if len(R) < 2:
        return [], []
    E = np.concatenate([r["e"][:, R] for r in rows])
    mag = np.sqrt(np.concatenate([r["gn"][:, R] * r["wn"][R][None, :] for r in rows]))
    d = np.sqrt(np.mean(np.square(mag), axis=0))
    live = np.flatnonzero(d > 0)
    if len(live) < 2:
        return [], []
    E, d, R = E[:, live] / d[live], d[live], [R[i] for i in live]
    K, m = E.shape
    _, sv, vt = np.linalg.svd(E, full_matrices=True)
    rank = int(np.sum(sv > np.sqrt(K * m) * tol))
    Bs = vt[rank:].T
    if Bs.shape[1] == 0:
        return [], []
    B = Bs / d[:, None]
    B = B / np.max(np.abs(B), axis=0, keepdims=True)
    groups, unresolved, taken = [], [], set()
    for i in range(m):
        if i in taken or np.linalg.norm(Bs[i]) < 1e-6:
            continue
        slack = indicator_tol / 10  # V is only numerically null: let z leave [0, 1] by that much
        res = linprog(B.sum(axis=0), A_ub=np.vstack([B, -B]), b_ub=np.concatenate([np.full(m, 1 + slack),
                                                                                    np.full(m, slack)]),
                      A_eq=B[i:i + 1], b_eq=[1.0], bounds=[(None, None)] * B.shape[1], method="highs")
        if not res.success:
            unresolved.append(R[i])
            continue
        z = B @ res.x
        T = [j for j in range(m) if z[j] > 0.5]
        ind = np.zeros(m)
        ind[T] = 1.0
        if len(T) < 2 or np.max(np.abs(z - ind)) > indicator_tol or taken & set(T):
            unresolved.append(R[i])
            continue
        groups.append([R[j] for j in T])
        taken |= set(T)
    return groups, unresolved


def audit_target(t: Target, *, scales: Sequence[float] = SCALES, almost: float = ALMOST, seed: int = 0,
                 sub_batch: int | None = None) -> AuditResult:
    """Audit a :class:`rate_tuning.targets.Target` (see :func:`audit`)."""
    start = time.perf_counter()
    with jax.enable_x64(True), warnings.catch_warnings():
        # nnx.BatchNorm writes float64 batch statistics into its float32 running averages: harmless here
        warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
        pr = _Probe(t, seed, sub_batch)
        n = len(pr.train)
        rows = [pr.rows(0, pr.S)]
        while True:  # enough rows for the null space of the leaves that are not invariant alone
            cos = [_group_cos(rows, [l], False) for l in range(n)]
            singles = [l for l in range(n) if cos[l] <= pr.tol_cos]
            rest = [l for l in range(n) if not cos[l] <= pr.tol_cos and not math.isnan(cos[l])]
            K = sum(r["e"].shape[0] for r in rows)
            if K >= len(rest) + 4 or len(rows) >= MAX_POINTS:
                break
            rows.append(pr.rows(len(rows), min(pr.S, len(rest) + 4 - K)))
        channel = {l: pr.ndim[pr.train[l]] >= 2 and pr.leaves[pr.train[l]].shape[-1] > 1
                   and not _group_cos(rows, [l], True) > pr.tol_cos for l in singles}
        joint, unresolved = _joint_groups(rows, rest, pr.tol_cos, 1e-6)
        in_joint = {l for T in joint for l in T}
        loose, _ = _joint_groups(rows, [l for l in rest if l not in in_joint], almost, 0.01)
        rng = np.random.default_rng(seed + 1)

        def factors(groups_: Sequence[tuple[Sequence[int], bool]], c: float):
            f = pr.ones()
            for group, per_ch in groups_:
                if per_ch:
                    (l,) = group
                    f[l] = jnp.asarray(c * np.exp(rng.uniform(-1, 1, f[l].shape)))
                else:
                    j = c * math.exp(rng.uniform(-1, 1))
                    for l in group:
                        f[l] = jnp.full(f[l].shape, j)
            return f

        def probe(group, per_ch, cs):
            return max(pr.change(factors([(group, per_ch)], c)) for c in cs)

        exact, near = [], []  # (leaves, per_channel, invariance)
        cands = [([l], channel[l]) for l in singles] + [(T, False) for T in joint]
        maybe = [([l], False) for l in rest if cos[l] <= almost and l not in in_joint]
        maybe += [(T, False) for T in loose if _group_cos(rows, T, False) <= almost]
        for group, per_ch in cands:
            inv = probe(group, per_ch, scales)
            if not inv <= pr.tol_sub and per_ch:
                per_ch, inv = False, probe(group, False, scales)
            if inv <= pr.tol_sub:
                exact.append((group, per_ch, inv))
            elif _group_cos(rows, group, False) <= almost:
                maybe.append((group, False))
        for group, per_ch in maybe:
            near_inv = probe(group, per_ch, NEAR_SCALES)
            if near_inv <= almost:
                near.append((group, per_ch, probe(group, per_ch, scales), near_inv))

        def joint_ok(items) -> bool:
            return all(pr.change(factors([(g, pc) for g, pc, _ in items], c), full=True) <= pr.tol_full
                       for c in scales)

        def failing(items):
            if not items or joint_ok(items):
                return []
            if len(items) == 1:
                return list(items)
            half = len(items) // 2
            return failing(items[:half]) + failing(items[half:])

        bad = failing(exact)
        exact = [x for x in exact if x not in bad]
        joint_change = max((pr.change(factors([(g, pc) for g, pc, _ in exact], c), full=True) for c in scales),
                           default=0.0)
    taken: set = set()
    name = lambda g: _group_name([pr.paths[pr.train[l]] for l in g], taken)  # noqa: E731
    paths = lambda g: tuple(pr.paths[pr.train[l]] for l in g)  # noqa: E731
    found = [Group(name(g), paths(g), pc, "si", inv, _group_cos(rows, g, pc), pr.tol_sub, pr.tol_cos)
             for g, pc, inv in sorted(exact, key=lambda x: min(x[0]))]
    almost_groups = [Group(name(g), paths(g), pc, "almost", inv, _group_cos(rows, g, pc), pr.tol_sub, pr.tol_cos,
                           near_inv) for g, pc, inv, near_inv in sorted(near, key=lambda x: min(x[0]))]
    used = {p for g in found + almost_groups for p in g.paths}
    variant = [pr.paths[i] for i in pr.train if pr.paths[i] not in used]
    info = {"seconds": time.perf_counter() - start, "points": len(rows), "sub_batches": pr.S,
            "sub_batch_size": pr.b, "euler_rows": sum(r["e"].shape[0] for r in rows), "loss": pr.loss0,
            "scales": list(scales), "almost": almost, "tol_orthogonality": pr.tol_cos,
            "tol_invariance_sub_batch": pr.tol_sub, "tol_invariance_batch": pr.tol_full,
            "joint_invariance_batch": joint_change, "failed_joint_probe": [list(paths(g)) for g, _, _ in bad],
            "rescaling_symmetries": [pr.paths[pr.train[l]] for l in unresolved],
            "no_gradient": [pr.paths[pr.train[l]] for l in range(n) if math.isnan(cos[l])],
            "integer_parameters": pr.integer}
    return AuditResult(t.name, t.params, found, almost_groups, variant, pr.frozen, info)


def audit(model, variables=None, batch=None, *, loss: Callable | None = None, call_kwargs: dict | None = None,
          frozen: Sequence[str] = (), scales: Sequence[float] = SCALES, almost: float = ALMOST, seed: int = 0,
          sub_batch: int | None = None) -> AuditResult:
    """The scale-invariant groups of a flax linen or NNX model, found by numerical probes of its train-mode
    loss on ``batch`` (module docstring: the search, the tolerances).

    Args:
      model: a ``flax.linen.Module`` (with ``variables``) or an ``nnx.Module`` (``variables=None``).
      variables: ``model.init(...)`` for linen.
      batch: ``(inputs, targets)`` or ``inputs``.
      loss: ``loss(outputs, batch) -> scalar``; default: cross-entropy / squared error (module docstring).
      call_kwargs: keyword arguments of the linen call in train mode (default: from its signature).
      frozen: paths of parameters that are not trained (labelled ``'frozen'``).
      scales: the factors ``c`` of the finite probes.
      almost: the threshold of almost invariance (cosine and loss change at ``c`` in {0.5, 3}).
      seed: seed of the generic points and of the random factors.
      sub_batch: examples per sub-batch of the Euler rows (default 8 when the batch has at least 16).

    Returns:
      An :class:`AuditResult`: ``result.labels('layer' | 'channel')`` for ``two_rate_sgd``, ``result.table()``.

    Raises:
      AuditError: one line (a model without parameters, a batch the model rejects, a non-finite loss).

    Example::

        model = rate_tuning.build("mlp", "paper", widths=(32,))
        variables = model.init(jax.random.key(0), x)
        result = audit(model, variables, (x, y))
        tx = two_rate_sgd(result.labels("channel"), lr_w=1.0, lr_g=0.1)
    """
    import flax.nnx as nnx

    if isinstance(model, nnx.Module):
        if batch is None and variables is not None:
            batch, variables = variables, None
        t = from_nnx(model, batch, loss=loss, frozen=frozen)
    else:
        t = from_linen(model, variables, batch, loss=loss, call_kwargs=call_kwargs, frozen=frozen)
    return audit_target(t, scales=scales, almost=almost, seed=seed, sub_batch=sub_batch)


def audit_factory(spec: str, **kwargs) -> AuditResult:
    """:func:`load_factory` then :func:`audit_target`."""
    return audit_target(load_factory(spec), **kwargs)


def label_strings(labels) -> dict[str, str]:
    """``{path: 'si:GROUP' | 'si:GROUP:channel' | 'variant' | 'frozen'}`` of a label tree (for JSON)."""
    flat = jax.tree_util.tree_flatten_with_path(labels, is_leaf=G.is_label)[0]
    return {G.path_str(p): (f"si:{lab.group}" + (":channel" if lab.per_channel else "")) if lab.kind == G.SI
            else lab.kind for p, lab in flat}


def command(spec: str, *, frozen: str = "", json_path: str | None = None, seed: int = 0,
            sub_batch: int | None = None, almost: float = ALMOST) -> int:
    """``rate-tuning audit MODULE:FACTORY``: print the table (and write ``json_path``); returns 0.

    Raises:
      AuditError: bad input, one line; OSError: ``json_path`` cannot be written.
    """
    if seed < 0:
        raise AuditError(f"--seed must be >= 0, got {seed}")
    if sub_batch is not None and sub_batch < 1:
        raise AuditError(f"--sub-batch must be a positive integer, got {sub_batch}")
    if not 0 < almost < 1:
        raise AuditError(f"--almost must be in (0, 1), got {almost:g}")
    t = load_factory(spec)
    t.frozen = tuple(dict.fromkeys([*t.frozen, *(p.strip() for p in frozen.split(",") if p.strip())]))
    result = audit_target(t, almost=almost, seed=seed, sub_batch=sub_batch)
    print(result.table())
    if json_path:
        from rate_tuning import jsonio

        jsonio.write_atomic(json_path, {**result.to_dict(), "labels": {g: label_strings(result.labels(g))
                                                                      for g in ("layer", "channel")}})
    return 0
