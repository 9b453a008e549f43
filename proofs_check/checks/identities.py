"""Checks of the exact identities of scale invariance: claims C1, C2, C3, C19, C20, C21.

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019:
Definition 2.1 (scale invariance), the gradient facts of Sec. 2 and Lemma 2.4 (1), the smoothed network
of the appendix, and the App. D parameter grouping. For a scale-invariant (SI) group ``w``:

* C1  ``<grad_w L, w> = 0`` (per group; per output channel for per-channel groups);
* C2  ``grad L(c w) = grad L(w) / c``;
* C3  ``H(c w) = H(w) / c^2`` on the ww block (``D H(D theta) D = H(theta)`` for all blocks, ``D = c`` on
  the SI groups and 1 elsewhere) and Euler's ``H(w) w = -grad_w L(w)``;
* C19 BN with the smooth denominator ``sqrt(sigma^2 + eps ||w||^2)`` is exactly scale-invariant, the
  standard ``sqrt(sigma^2 + eps)`` is not;
* C20 the ``(gamma, beta)`` of an inner BN followed by ReLU -> linear/conv -> BN are jointly SI; the last
  BN's are not, nor the inner ones once softplus replaces ReLU;
* C21 each output channel of a kernel feeding BN is its own SI group.

Every check enables float64 at its entry (:func:`proofs_check.numerics.x64`) and measures on the synthetic problems
of :mod:`proofs_check.problems` and on real BN networks from :mod:`rate_tuning.models` evaluated on a
fixed batch of scikit-learn digits images (train-mode BN, batch statistics), at a generic point: kernels
``N(0, 1/fan_in)``, BN ``gamma = 1 + 0.2 N(0, 1)``, ``beta = 0.2 N(0, 1)``.

Tolerances (``docs/derivations.md``, "Identities"). Every computed quantity is a chain of floating-point
operations; a sum or inner product of length ``n`` carries a relative error of at most
``gamma_n = n u / (1 - n u)`` of the magnitudes it sums (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1; ``u = eps / 2``), an elementwise operation at most ``u``. To first order the errors
along a dependency path add up, so the relative error of any output is at most ``u * N_path``;
:func:`op_count` bounds ``N_path`` by ``N``, the total over *every* equation of the jaxpr of the function
that computes it (each path is a subset of the equations), counting a reduction as its length and every
other equation as 1. A check that compares ``k`` computed quantities (or a quantity that must vanish,
normalised by the norms it is made of) uses ``tol = k * eps * N`` (``eps = 2 u``: the factor 2 covers the
final normalisation). No further condition factor: every quantity is normalised by norms of the objects it
is made of (``||g|| ||w||``, ``||H v||``, ``max(|L|, 1)``), and the worst-case linear ``gamma_n`` exceeds
the typical ``sqrt(n) u`` growth by ``sqrt(n)``. The exception is Euler's identity, a cancellation
compared with a possibly small gradient: its tolerance carries the measured condition factor
``kappa = ||H P_W|| ||W|| / ||grad_W L||`` (:func:`_c3_measure`). The tolerances come out between 1e-14
(synthetic problems) and 5e-11; the violations of the negative controls are 1e-5 to O(1).
"""
from __future__ import annotations

import functools
import math
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from proofs_check import curvature
from proofs_check import problems as P
from proofs_check.claims import claim
from proofs_check.curves import curve
from proofs_check.evidence import Evidence
from proofs_check.numerics import fan_in_normal, gamma, numpy_init, unit_roundoff, x64
from rate_tuning import data as D
from rate_tuning import groups as G
from rate_tuning import layers as BN
from rate_tuning import models as M
from rate_tuning import optim

DTYPE = "float64"
EPS = 2.0 * unit_roundoff(DTYPE)

# Small graphs, a few calls each: XLA's optimising backend costs far more compile time (1-4 s per function
# on 2 CPU cores) than it saves at run time here. Numerics stay IEEE float64.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# A gradient below this multiple of eps * max(|L|, 1) (times ||w||) is at round-off level: its cosine with
# w is meaningless and the group is skipped (PAPER.md, C1 notes); the number skipped is recorded.
_TINY = 1e3


# ---------------------------------------------------------------------------------------------------------
# compilation and round-off budget
# ---------------------------------------------------------------------------------------------------------

_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}


def _shape(var) -> tuple[int, ...]:
    return tuple(getattr(getattr(var, "aval", None), "shape", ()))


def _reduction_length(eqn) -> int:
    """Length of the sum an equation computes per output element (1 for elementwise operations)."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        shape = _shape(eqn.invars[0])
        return max(1, math.prod(shape[d] for d in lhs_contract))
    if name == "conv_general_dilated":
        rhs = _shape(eqn.invars[1])
        out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return max(1, math.prod(rhs) // max(1, rhs[out_dim]))
    if name in _REDUCTIONS:
        shape = _shape(eqn.invars[0])
        return max(1, math.prod(shape[a] for a in eqn.params["axes"]))
    if name.startswith("cum"):
        return max(1, _shape(eqn.invars[0])[eqn.params["axis"]])
    return 1


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        subs = list(_sub_jaxprs(eqn.params))
        if subs:
            repeat = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
            total += repeat * sum(_count(s) for s in subs)
        else:
            total += _reduction_length(eqn)
    return total


def op_count(fn: Callable, *args) -> int:
    """``N``: the round-off budget of ``fn(*args)``, an upper bound on the longest dependency path.

    Math: the sum over every equation of ``fn``'s jaxpr (sub-jaxprs included, ``scan`` bodies times their
    length) of its reduction length (contraction length of ``dot_general`` and convolutions, reduced size
    of ``reduce_*``), or 1 for an elementwise equation. The first-order round-off of any output of ``fn``
    is at most ``u N`` relative to the magnitudes it is made of (Higham's ``gamma_n`` per sum).

    Args:
      fn: the function, traced with ``jax.make_jaxpr`` on ``args``.

    Returns:
      ``N >= 1``.

    Example::

        op_count(lambda w: w @ w, jnp.ones(8))   # 8
    """
    return max(1, _count(jax.make_jaxpr(fn)(*args).jaxpr))


def _compile(fn: Callable, *args, optimize: bool = False) -> tuple[Callable, int]:
    """``fn`` traced once on ``args``, compiled, and its round-off budget :func:`op_count` from the same
    trace. The executable takes arguments of exactly those shapes and dtypes (never recompiles).
    ``optimize=False`` compiles fast (few calls); ``True`` uses XLA's optimising backend (many calls on
    bigger nets, the full settings)."""
    traced = jax.jit(fn).trace(*args)
    exe = traced.lower().compile(compiler_options=None if optimize else _FAST_COMPILE)
    return exe, max(1, _count(traced.jaxpr.jaxpr))


def _require_x64():
    if jnp.zeros(()).dtype != jnp.float64:
        raise RuntimeError("the identity checks must run under jax.enable_x64(True)")


# ---------------------------------------------------------------------------------------------------------
# numpy pytree helpers (measurements are done on the host, in float64)
# ---------------------------------------------------------------------------------------------------------


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _group_dot(a, b, labels) -> dict[str, np.ndarray]:
    """``<a^(i), b^(i)>`` per SI group (a vector over channels for per-channel groups); the semantics of
    :func:`rate_tuning.groups.group_inner`, in numpy."""
    out: dict[str, np.ndarray] = {}
    for (_, la, lab), lb in zip(G.flatten_labelled(a, labels), _leaves(b)):
        if lab.kind != G.SI:
            continue
        la = np.asarray(la, np.float64)
        axes = tuple(range(la.ndim - 1)) if lab.per_channel else tuple(range(la.ndim))
        v = np.sum(la * lb, axis=axes)
        out[lab.group] = out[lab.group] + v if lab.group in out else v
    return out


def _scale(tree, labels, factors: dict):
    """Every SI leaf times its group's factor (a vector broadcasts along the last axis); as
    :func:`rate_tuning.groups.scale_groups`, in numpy."""
    flat = G.flatten_labelled(tree, labels)
    new = [np.asarray(leaf, np.float64) * np.asarray(factors[lab.group], np.float64)
           if lab.kind == G.SI and lab.group in factors else np.asarray(leaf, np.float64) for _, leaf, lab in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), new)


def _mask(tree, labels, kind=G.SI):
    """``tree`` with every leaf whose label is not ``kind`` set to zero."""
    flat = G.flatten_labelled(tree, labels)
    new = [np.asarray(leaf, np.float64) if lab.kind == kind else np.zeros(np.shape(leaf)) for _, leaf, lab in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), new)


def _variant_sq(tree, labels) -> float:
    return sum(float(np.sum(np.square(np.asarray(leaf, np.float64))))
               for _, leaf, lab in G.flatten_labelled(tree, labels) if lab.kind == G.VARIANT)


def _rel(a, b) -> float:
    """``||a - b|| / ||b||`` over whole pytrees (``||a - b||`` if ``b = 0``)."""
    la, lb = _leaves(a), _leaves(b)
    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb)))
    den = math.sqrt(sum(float(np.sum(y * y)) for y in lb))
    return num / den if den > 0 else num


def _worst(values) -> float:
    """Max over arrays/numbers; NaN if any entry is NaN (a NaN must fail a claim, never pass it)."""
    arrays = [np.atleast_1d(np.asarray(v, np.float64)).ravel() for v in values]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return 0.0
    flat = np.concatenate(arrays)
    return float("nan") if np.isnan(flat).any() else float(flat.max())


def _group_rel(a, b, labels) -> dict[str, float]:
    """Per block ``||a_i - b_i|| / ||b_i||``: every SI group (per channel: the worst channel) and the
    scale-variant block (key ``'variant'``)."""
    diff = jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)
    num, den = _group_dot(diff, diff, labels), _group_dot(b, b, labels)
    out = {k: _worst([np.sqrt(num[k]) / np.where(den[k] > 0, np.sqrt(den[k]), 1.0)]) for k in num}
    vn, vd = _variant_sq(diff, labels), _variant_sq(b, labels)
    if vd > 0 or vn > 0:
        out[G.VARIANT] = math.sqrt(vn) / math.sqrt(vd) if vd > 0 else math.sqrt(vn)
    return out


def _cosines(grads, params, labels, loss) -> tuple[float, dict[str, float], int, int]:
    """Worst ``|cos(grad_i, w_i)|`` over the SI groups of ``labels`` (per channel for per-channel groups).

    Returns ``(worst, worst per group, groups measured, groups skipped at round-off level)``.
    """
    inner, g_sq, w_sq = _group_dot(grads, params, labels), _group_dot(grads, grads, labels), \
        _group_dot(params, params, labels)
    loss = float(loss)
    base = max(abs(loss), 1.0) if math.isfinite(loss) else 1.0
    per_group, measured, skipped = {}, 0, 0
    for name in inner:
        ip = np.atleast_1d(inner[name])
        scale = np.sqrt(np.atleast_1d(g_sq[name]) * np.atleast_1d(w_sq[name]))
        tiny = scale <= _TINY * EPS * base
        skipped += int(tiny.sum())
        measured += int((~tiny).sum())
        if (~tiny).any():
            per_group[name] = _worst([np.abs(ip[~tiny]) / scale[~tiny]])
    return _worst(per_group.values()), per_group, measured, skipped


def _relabel(labels, params, changes: dict[str, G.Label]):
    """A copy of ``labels`` with the leaves at the given paths (``'bn0/scale'``) replaced."""
    flat = G.flatten_labelled(params, labels)
    unknown = set(changes) - {p for p, _, _ in flat}
    if unknown:
        raise KeyError(f"no parameter at {sorted(unknown)}")
    new = [changes.get(path, lab) for path, _, lab in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)


def _si_names(params, labels, *, kernels: bool | None = None) -> list[str]:
    """SI group names in tree order; ``kernels=True``: only groups of kernels (ndim >= 2); ``False``: only
    the others (BN ``(gamma, beta)``)."""
    names = []
    for _, leaf, lab in G.flatten_labelled(params, labels):
        if lab.kind == G.SI and lab.group not in names and (kernels is None or (np.ndim(leaf) >= 2) == kernels):
            names.append(lab.group)
    return names


def _random_like(tree, seed: int):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(treedef, [rng.standard_normal(np.shape(x)) for x in leaves])


def _ev(claim_id: str, setting: str, measured, tol: float, *, bn: str, control: str | None = None,
        relation: str = "<=", bound: float = 0.0, **details) -> Evidence:
    """An evidence record. ``control``: for a negative control, the declared control (an entry of the
    claim's ``negative_controls``) it exercises, kept as ``details['breaks']``. A control carries the
    claim's own relation: it is *confirmed* (``ok``) when the relation fails, i.e. when the violation
    exceeds the tolerance."""
    if control is not None:
        details = {"breaks": control, **details}
    return Evidence(claim=claim_id, setting=setting, measured=float(measured), bound=float(bound),
                    relation=relation, tolerance=float(tol), dtype=DTYPE, bn=bn,
                    negative_control=control is not None, details=details)


# ---------------------------------------------------------------------------------------------------------
# networks on a fixed batch of digits
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _digits_batch(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed batch of ``batch`` scikit-learn digits images ``(B, 8, 8, 1)`` (float64) and labels."""
    data = D.digits(seed=0)
    idx = np.random.default_rng(seed).choice(len(data.x_train), size=batch, replace=False)
    return data.x_train[idx].astype(np.float64), data.y_train[idx]


def _arch_name(arch: str, kwargs: tuple) -> str:
    return f"{arch}({', '.join(f'{k}={v}' for k, v in kwargs)})"


def _freeze(kw: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))


def _init_variables(model, x, labels, seed: int, eval_stats: bool):
    """Params at a generic point, drawn in numpy on the shapes of ``model.init`` (no compilation):
    kernels ``N(0, 1/fan_in)`` (a frozen fixed-norm classifier: columns of norm ``classifier_norm``), BN
    ``gamma = 1 + 0.2 N(0,1)``, ``beta`` and biases ``0.2 N(0,1)``. Running statistics: the ``(0, 1)`` init,
    or with ``eval_stats`` explicit ones that are not the batch's (mean ``0.1 N``, var ``exp(0.2 N)``)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(10_000 + seed)
    kinds = {path: lab for path, _, lab in G.flatten_labelled(shapes["params"], labels)}

    def draw(path, leaf):
        name, shape = G.path_str(path), tuple(leaf.shape)
        last = name.rsplit("/", 1)[-1]
        if last == "kernel":
            return fan_in_normal(rng, shape, model.classifier_norm if kinds[name].kind == G.FROZEN else None)
        if last == "scale":
            return 1.0 + 0.2 * rng.standard_normal(shape)
        return 0.2 * rng.standard_normal(shape)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])

    def stat(path, leaf):
        shape = tuple(leaf.shape)
        if G.path_str(path).endswith("mean"):
            return 0.1 * rng.standard_normal(shape) if eval_stats else np.zeros(shape)
        return np.exp(0.2 * rng.standard_normal(shape)) if eval_stats else np.ones(shape)

    stats = jax.tree_util.tree_map_with_path(stat, shapes.get("batch_stats", {}))
    return params, stats


@functools.lru_cache(maxsize=None)
def _net_fns(arch: str, preset: str, bn: str | None, arch_kwargs: tuple, batch: int, train: bool,
             optimize: bool):
    """The model and its compiled functions, shared by every seed (the batch is an argument):
    ``vg(params, lam, stats, x, y) -> ((loss + lam/2 sum_SI ||w||^2, logits), grads)`` (``lam > 0``: the
    weight-decay control, same compilation), and lazily ``hvp(params, v, stats, x, y)`` (forward-over-reverse,
    :func:`proofs_check.curvature.hvp`) and ``rr(params, v, stats, x, y)`` (reverse-over-reverse)."""
    _require_x64()
    model = M.build(arch, preset, bn=bn, num_classes=10, param_dtype=jnp.float64, **dict(arch_kwargs))
    layer_labels = model.labels("layer")

    def loss(p, stats, x, y):
        return M.batch_loss(model, p, stats, x, y, train=train)

    def loss_logits(p, lam, stats, x, y):
        value, (logits, _) = loss(p, stats, x, y)
        pen = sum(jnp.sum(jnp.square(leaf)) for _, leaf, lab in G.flatten_labelled(p, layer_labels)
                  if lab.kind == G.SI)
        return value + 0.5 * lam * pen, logits

    def hvp(p, v, stats, x, y):
        return curvature.hvp(lambda q: loss(q, stats, x, y)[0], p, v)

    def rr(p, v, stats, x, y):
        return jax.grad(lambda q: _tree_dot(jax.grad(lambda r: loss(r, stats, x, y)[0])(q), v))(p)

    return types.SimpleNamespace(model=model, layer_labels=layer_labels, compiled={},
                                 fns={"vg": jax.value_and_grad(loss_logits, has_aux=True), "hvp": hvp, "rr": rr})


@functools.lru_cache(maxsize=None)
def _net(arch: str, preset: str, bn: str | None, arch_kwargs: tuple, batch: int, seed: int,
         train: bool = True, optimize: bool = False):
    """A BN network in float64 on a fixed digits batch (``seed``: which batch and which point).

    ``vg(params, lam)`` returns ``((loss + lam/2 sum_SI ||w||^2, logits), grads)``: ``lam = 0`` is the plain
    loss, ``lam > 0`` the weight-decay control. ``train=False`` is eval-mode BN with explicit running
    statistics that are not the batch's.
    """
    fns = _net_fns(arch, preset, bn, arch_kwargs, batch, train, optimize)
    model = fns.model
    x_np, y_np = _digits_batch(batch, seed)
    x = x_np.reshape(len(x_np), -1) if arch == "mlp" else x_np
    params, stats = _init_variables(model, x, fns.layer_labels, seed, eval_stats=not train)
    data = (stats, x, y_np)

    def compiled(kind, *args):
        if kind not in fns.compiled:
            fns.compiled[kind] = _compile(fns.fns[kind], *args, *data, optimize=optimize)
        exe, n = fns.compiled[kind]
        return (lambda *a: exe(*a, *data)), n

    vg, n_vg = compiled("vg", params, 0.0)
    name = f"{_arch_name(arch, arch_kwargs)}, {preset} preset" + (f", bn={bn}" if bn else "")
    bn_kind = "none" if M.PRESETS[preset].bn is None else (bn or M.PRESETS[preset].bn)
    if not train:
        name += ", eval-mode BN"
        bn_kind = "eval-mode"
    return types.SimpleNamespace(model=model, params=params, name=name, bn=bn_kind, batch=batch, vg=vg,
                                 n_vg=n_vg, compiled=compiled, cache={},
                                 loss=lambda p: fns.fns["vg"](p, 0.0, *data)[0][0])


def _evaluate(net, params=None, lam: float = 0.0):
    """``(loss, logits, grads)`` as numpy; the value at the net's own params is cached."""
    key = ("eval", lam)
    if params is None and key in net.cache:
        return net.cache[key]
    (loss, logits), grads = net.vg(net.params if params is None else params, lam)
    out = float(loss), np.asarray(logits, np.float64), _np(grads)
    if params is None:
        net.cache[key] = out
    return out


def _net_grad_fn(net, lam: float = 0.0):
    """``params -> (loss, grads)`` for :func:`_scaled_grad_error`."""
    return lambda p: _evaluate(net, None if p is net.params else p, lam)[::2]  # the base point is cached


def _net_hvp(net):
    """Forward-over-reverse HVP ``(params, v) -> H v`` of the net's loss and its round-off budget."""
    return net.compiled("hvp", net.params, net.params)


def _net_from(settings: dict, arch: str, kwargs: dict, preset: str, bn: str | None = None, seed: int = 0,
              train: bool = True):
    return _net(arch, preset, bn, _freeze(kwargs), int(settings["batch"]), int(seed), train,
                bool(settings.get("optimize", False)))


def _nets(settings):
    """``(arch, kwargs)`` pairs of the settings."""
    return [(a, dict(kw)) for a, kw in settings["nets"]]


# ---------------------------------------------------------------------------------------------------------
# synthetic problems
# ---------------------------------------------------------------------------------------------------------

_SYNTHETIC = {
    "rayleigh_quotient": (P.rayleigh_quotient, "none"),
    "sphere_function": (P.sphere_function, "none"),
    "noisy_sphere_function": (P.noisy_sphere_function, "none"),
    "bn_linear_regression": (P.bn_linear_regression, "exact"),
    "bn_logistic_regression": (P.bn_logistic_regression, "exact"),
    "multi_group": (P.multi_group, "none"),
}
_CONTROLS = {
    "epsilon_bn": (P.epsilon_bn, "standard"),
    "no_normalisation": (P.no_normalisation, "none"),
    "weight_decay": (lambda: P.weight_decay(P.sphere_function(), 1e-2), "none"),
}


def _breaks(controls: tuple[str, ...], which: dict[str, int], name: str) -> str | None:
    """The declared control that problem or case ``name`` exercises (None: not a control)."""
    return controls[which[name]] if name in which else None


@functools.lru_cache(maxsize=None)
def _problem(name: str):
    ctor, bn = {**_SYNTHETIC, **_CONTROLS}[name]
    prob = ctor()
    template = jax.eval_shape(lambda k: prob.init(k, dtype=jnp.float64), jax.random.key(0))
    return types.SimpleNamespace(prob=prob, bn=bn, template=template, control=name in _CONTROLS, cache={})


def _problem_fn(name: str, kind: str):
    """Compiled ``'vg'`` (value and grad of the loss), ``'svg'`` (of ``F_z(params, key)``) or ``'hvp'``,
    and its round-off budget."""
    pb = _problem(name)
    if kind not in pb.cache:
        example = jax.tree_util.tree_map(lambda s: np.zeros(s.shape), pb.template)
        if kind == "vg":
            pb.cache[kind] = _compile(jax.value_and_grad(pb.prob.loss), example)
        elif kind == "svg":
            pb.cache[kind] = _compile(jax.value_and_grad(pb.prob.stochastic_loss), example, jax.random.key(0))
        else:
            pb.cache[kind] = _compile(lambda p, v: curvature.hvp(pb.prob.loss, p, v), example, example)
    return pb.cache[kind]


def _points(name: str, settings):
    """Generic points of a problem: ``synthetic_points`` random directions for each SI-group norm in
    ``synthetic_scales``; scale-variant leaves ``N(0, 1)`` (:func:`proofs_check.numerics.numpy_init`)."""
    prob = _problem(name).prob
    return [numpy_init(prob, 100 + s, scale, DTYPE) for s in range(int(settings["synthetic_points"]))
            for scale in settings["synthetic_scales"]]


def _problem_grad_fn(name: str):
    vg, _ = _problem_fn(name, "vg")
    return lambda p: tuple(_np(vg(p)))


# =========================================================================================================
# shared settings
# =========================================================================================================

_QUICK = {
    "batch": 32,
    "seeds": (0,),
    "nets": (("mlp", {"widths": (16, 16)}),),
    "presets": ("paper", "fully_si", "smoothed"),
    "synthetic_points": 2,
    "synthetic_scales": (1e-2, 1.0, 1e2),
}
_FULL = {
    "optimize": True,
    "batch": 64,
    "seeds": (0, 1, 2),
    "nets": (("mlp", {"widths": (32, 32, 32)}), ("convnet", {"channels": (8, 16, 32)}),
             ("vgg", {"config": (8, "M", 16, "M", 32)}), ("resnet", {"stage_channels": (8, 16)})),
    "presets": ("paper", "fully_si", "smoothed"),
    "synthetic_points": 5,
    "synthetic_scales": (1e-3, 1e-1, 1.0, 10.0, 1e3),
}
_C_SWEEP_FULL = tuple(float(c) for c in np.logspace(-2, 2, 9) if not np.isclose(c, 1.0))


# =========================================================================================================
# C1: <grad_w L, w> = 0
# =========================================================================================================


def _c1_net_record(net, labels, grouping, *, lam=0.0, control=None, why=""):
    loss, _, grads = _evaluate(net, lam=lam)
    worst, per_group, n, skipped = _cosines(grads, net.params, labels, loss)
    tol = EPS * net.n_vg  # one gradient; the cosine is normalised by ||g|| ||w|| (module docstring)
    setting = f"{net.name}, {grouping} grouping, digits batch {net.batch}" + (f"; {why}" if why else "")
    return _ev("C1", setting, worst, tol, bn=net.bn, control=control, groups=n, skipped=skipped,
               op_count=net.n_vg, worst_per_group=per_group)


_C1_CONTROLS = (
    "standard epsilon-BN (sqrt(sigma^2 + 1e-5)) in the net, and the epsilon-BN synthetic regression",
    "eval-mode BN (running statistics that are not the batch's)",
    "weight decay added to the loss: 5e-4 (net), 1e-2 (sphere function)",
    "the no_bn net with its kernels wrongly labelled 'si'; linear regression without BN labelled 'si'",
)
_C1_PROBLEM_CONTROLS = {"epsilon_bn": 0, "weight_decay": 2, "no_normalisation": 3}


@claim(
    "C1",
    paper_ref="Sec. 2 gradient lemma [R]; Lemma 2.4 (1) [Q]",
    statement="<grad_{w^(i)} L(theta), w^(i)> = 0 for every scale-invariant group w^(i) (measured: worst |cos|)",
    hypotheses="w^(i) scale-invariant: train-mode BN with batch statistics and epsilon = 0 or the smooth "
               "eps*||w||^2 form; no weight decay; w^(i) feeds a normalisation layer",
    negative_controls=_C1_CONTROLS,
    quick=dict(_QUICK, groupings=("layer", "channel"), weight_decay=5e-4, stochastic=("noisy_sphere_function",)),
    full=dict(_FULL, groupings=("layer", "channel"), weight_decay=5e-4,
              stochastic=("noisy_sphere_function", "bn_linear_regression", "bn_logistic_regression",
                          "multi_group")),
)
def check_c1(settings: dict) -> list[Evidence]:
    """Worst ``|cos|`` between each SI group and its gradient (Sec. 2 lemma, Lemma 2.4 (1)).

    Synthetic problems: at ``synthetic_points`` random directions times each norm in ``synthetic_scales``,
    for the loss and, for the problems in ``stochastic``, the stochastic loss ``F_z`` (Lemma 2.4 is stated
    for the stochastic gradient). Nets: every preset and grouping of the settings, on a fixed digits batch.
    Tolerance ``eps N``, ``N`` the round-off budget of the gradient (:func:`op_count`).
    """
    with x64():
        ev: list[Evidence] = []
        for name in list(_SYNTHETIC) + list(_CONTROLS):
            pb = _problem(name)
            kinds = (["vg"] if name != "noisy_sphere_function" else []) + \
                (["svg"] if name in settings["stochastic"] else [])
            for kind in kinds:
                fn, n_ops = _problem_fn(name, kind)
                worst, measured, skipped = [], 0, 0
                for i, p in enumerate(_points(name, settings)):
                    loss, g = fn(p, jax.random.key(200 + i)) if kind == "svg" else fn(p)
                    w, _, m, k = _cosines(_np(g), p, pb.prob.labels, loss)
                    worst.append(w)
                    measured, skipped = measured + m, skipped + k
                what = "stochastic loss F_z" if kind == "svg" else "loss"
                setting = (f"{pb.prob.name}, {what}, {settings['synthetic_points']} directions x norms "
                           f"{tuple(settings['synthetic_scales'])}")
                if pb.control:
                    setting += f"; control: {pb.prob.description}"
                ev.append(_ev("C1", setting, _worst(worst), EPS * n_ops, bn=pb.bn,
                              control=_breaks(_C1_CONTROLS, _C1_PROBLEM_CONTROLS, name),
                              groups=measured, skipped=skipped, op_count=n_ops))
        for arch, kw in _nets(settings):
            for seed in settings["seeds"]:
                for preset in settings["presets"]:
                    net = _net_from(settings, arch, kw, preset, seed=seed)
                    for grouping in settings["groupings"]:
                        ev.append(_c1_net_record(net, net.model.labels(grouping), grouping))
                # controls, on the paper preset
                std = _net_from(settings, arch, kw, "paper", bn="standard", seed=seed)
                ev.append(_c1_net_record(std, std.model.labels("layer"), "layer", control=_C1_CONTROLS[0],
                                         why="control: standard epsilon-BN, epsilon = 1e-5"))
                paper = _net_from(settings, arch, kw, "paper", seed=seed)
                ev.append(_c1_net_record(paper, paper.model.labels("layer"), "layer", control=_C1_CONTROLS[2],
                                         lam=float(settings["weight_decay"]),
                                         why=f"control: weight decay {settings['weight_decay']:g} in the loss"))
                evm = _net_from(settings, arch, kw, "paper", seed=seed, train=False)
                ev.append(_c1_net_record(evm, evm.model.labels("layer"), "layer", control=_C1_CONTROLS[1],
                                         why="control: eval-mode BN, running statistics not the batch's"))
                nobn = _net_from(settings, arch, kw, "no_bn", seed=seed)
                nl = nobn.model.labels("layer")
                wrong = _relabel(nl, nobn.params, {p: G.si(p) for p, _, _ in G.flatten_labelled(nobn.params, nl)
                                                   if p.endswith("kernel")})
                ev.append(_c1_net_record(nobn, wrong, "layer", control=_C1_CONTROLS[3],
                                         why="control: no BN, kernels wrongly labelled 'si'"))
        return ev


# =========================================================================================================
# C2: grad L(c w) = grad L(w) / c
# =========================================================================================================


def _scaled_grad_error(grad_fn, params, labels, factors: dict) -> dict[str, float]:
    """Per block ``||D grad L(D theta) - grad L(theta)|| / ||grad L(theta)||`` (``D``: the factors on the
    SI groups, 1 elsewhere): ``c grad_{w_i} L(c w) = grad_{w_i} L(w)`` and every other block unchanged."""
    _, g0 = grad_fn(params)
    _, g1 = grad_fn(_scale(params, labels, factors))
    return _group_rel(_scale(g1, labels, factors), g0, labels)


_C2_CONTROLS = (
    "standard epsilon-BN in the net; the epsilon-BN synthetic regression",
    "eval-mode BN (running statistics that are not the batch's)",
    "weight decay added to the loss: 5e-4 (net), 1e-2 (sphere function)",
    "linear regression without BN, w labelled 'si'",
)
_C2_PROBLEM_CONTROLS = {"epsilon_bn": 0, "weight_decay": 2, "no_normalisation": 3}


@claim(
    "C2",
    paper_ref="Sec. 2 gradient lemma [R/D]",
    statement="grad_{w^(i)} L(c w) = grad_{w^(i)} L(w) / c for c > 0, other blocks unchanged "
              "(measured: worst relative error per block)",
    hypotheses="every w^(i) scale-invariant (train-mode BN, batch statistics, epsilon = 0 or smooth)",
    negative_controls=_C2_CONTROLS,
    quick=dict(_QUICK, c_values=(1e-2, 1e-1, 10.0, 1e2), weight_decay=5e-4),
    full=dict(_FULL, c_values=_C_SWEEP_FULL, weight_decay=5e-4),
)
def check_c2(settings: dict) -> list[Evidence]:
    """Relative error of ``c grad_{w^(i)} L(c w)`` against ``grad_{w^(i)} L(w)`` per block, every SI group
    scaled by the same ``c`` (the loss is then unchanged, so the other blocks' gradients must be unchanged
    too), worst over ``c_values``, blocks and points. Tolerance ``2 eps N`` (two gradients)."""
    with x64():
        ev: list[Evidence] = []
        cs = tuple(float(c) for c in settings["c_values"])
        for name in ["rayleigh_quotient", "sphere_function", "bn_linear_regression", "bn_logistic_regression",
                     "multi_group", "epsilon_bn", "no_normalisation", "weight_decay"]:
            pb = _problem(name)
            _, n_ops = _problem_fn(name, "vg")
            grad_fn = _problem_grad_fn(name)
            groups = _si_names(pb.template, pb.prob.labels)
            errs = [_worst(_scaled_grad_error(grad_fn, p, pb.prob.labels, {g: c for g in groups}).values())
                    for p in _points(name, settings) for c in cs]
            setting = f"{pb.prob.name}, c in {cs}, every SI group scaled"
            if pb.control:
                setting += f"; control: {pb.prob.description}"
            ev.append(_ev("C2", setting, _worst(errs), 2 * EPS * n_ops, bn=pb.bn,
                          control=_breaks(_C2_CONTROLS, _C2_PROBLEM_CONTROLS, name),
                          op_count=n_ops))
        for arch, kw in _nets(settings):
            for seed in settings["seeds"]:
                cases = [(_net_from(settings, arch, kw, pr, seed=seed), 0.0, "", None) for pr in settings["presets"]]
                cases += [
                    (_net_from(settings, arch, kw, "paper", bn="standard", seed=seed), 0.0,
                     "control: standard epsilon-BN, epsilon = 1e-5", _C2_CONTROLS[0]),
                    (_net_from(settings, arch, kw, "paper", seed=seed, train=False), 0.0,
                     "control: eval-mode BN, running statistics not the batch's", _C2_CONTROLS[1]),
                    (_net_from(settings, arch, kw, "paper", seed=seed), float(settings["weight_decay"]),
                     f"control: weight decay {settings['weight_decay']:g} in the loss", _C2_CONTROLS[2]),
                ]
                for net, lam, why, control in cases:
                    labels = net.model.labels("layer")
                    groups = _si_names(net.params, labels)
                    per_c = {f"{c:g}": _worst(_scaled_grad_error(_net_grad_fn(net, lam), net.params, labels,
                                                                 {g: c for g in groups}).values()) for c in cs}
                    setting = f"{net.name}, c in {cs}, every SI group scaled, digits batch {net.batch}"
                    setting += f"; {why}" if why else ""
                    ev.append(_ev("C2", setting, _worst(per_c.values()), 2 * EPS * net.n_vg, bn=net.bn,
                                  control=control, op_count=net.n_vg, error_per_c=per_c))
        return ev


# =========================================================================================================
# C3: H(c w) = H(w) / c^2, H(w) w = -grad L(w)
# =========================================================================================================


_POWER_STEPS = 8


def _c3_measure(hvp, grad_fn, params, labels, cs, seed) -> tuple[float, float, float, float]:
    """Worst relative errors of: the ww block, ``c^2 [H(cw) v_W]_W`` vs ``[H(w) v_W]_W``; every block,
    ``D H(D theta) D v`` vs ``H(theta) v``; Euler, ``H(theta) (W, 0)`` vs ``(-grad_W L, 0)``; and Euler's
    condition factor ``kappa = max(1, ||H P_W|| ||W|| / ||grad_W L||)``.

    Euler computes ``H (W, 0)``, whose terms have magnitude ``~ ||H P_W|| ||W||``, and compares it with
    ``grad_W L``, which is smaller near a stationary direction: the round-off relative to ``||grad_W L||``
    is amplified by ``kappa``. ``||H P_W||`` is estimated by ``_POWER_STEPS`` power iterations
    ``v <- P_W H v`` (the largest ``||H v|| / ||v||`` seen)."""
    groups = _si_names(params, labels)
    v = _random_like(params, seed)
    v_w = _mask(v, labels)
    ref_w = _mask(_np(hvp(params, v_w)), labels)
    ref = _np(hvp(params, v))
    ww, full = [], []
    for c in cs:
        f = {g: c for g in groups}
        scaled = _scale(params, labels, f)
        hw = _mask(_np(hvp(scaled, v_w)), labels)
        ww.append(_rel(jax.tree_util.tree_map(lambda a: c * c * a, hw), ref_w))
        full.append(_rel(_scale(_np(hvp(scaled, _scale(v, labels, f))), labels, f), ref))
    w_only = _mask(params, labels)
    hw = _np(hvp(params, w_only))
    _, grad = grad_fn(params)
    neg_grad_w = jax.tree_util.tree_map(lambda a: -a, _mask(grad, labels))
    euler = _rel(hw, neg_grad_w)
    h_norm, u = 0.0, v_w
    for _ in range(_POWER_STEPS):
        hu = _np(hvp(params, u))
        norm_u, norm_hu = math.sqrt(_sq(u)), math.sqrt(_sq(hu))
        h_norm = max(h_norm, norm_hu / norm_u)
        u = jax.tree_util.tree_map(lambda a: a / max(norm_hu, 1e-300), _mask(hu, labels))
    kappa = max(1.0, h_norm * math.sqrt(_sq(w_only)) / max(math.sqrt(_sq(neg_grad_w)), 1e-300))
    return _worst(ww), _worst(full), euler, kappa


def _sq(tree) -> float:
    return sum(float(np.sum(x * x)) for x in _leaves(tree))


def _ravel(tree) -> np.ndarray:
    return np.concatenate([x.ravel() for x in _leaves(tree)])


def _unravel(vec, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, i = [], 0
    for x in leaves:
        n = int(np.size(x))
        out.append(np.asarray(vec[i:i + n]).reshape(np.shape(x)))
        i += n
    return jax.tree_util.tree_unflatten(treedef, out)


_C3_CONTROLS = (
    "linear regression without BN (w labelled 'si'): H(cw) = H(w)",
    "sphere function plus weight decay 1e-2",
    "standard epsilon-BN in the net",
)
_C3_PROBLEM_CONTROLS = {"no_normalisation": 0, "weight_decay": 1}


@claim(
    "C3",
    paper_ref="used in the proofs (Hessian scaling on the unit set) [D]",
    statement="H_ww(c w) = H_ww(w) / c^2 (H_wg: 1/c, H_gg: 1) and Euler H(w) w = -grad_w L(w) "
              "(measured: relative errors of Hessian-vector products)",
    hypotheses="every w^(i) scale-invariant (train-mode BN, batch statistics, epsilon = 0 or smooth)",
    negative_controls=_C3_CONTROLS,
    quick=dict(_QUICK, presets=("paper",), c_values=(1e-2, 1e-1, 10.0, 1e2)),
    full=dict(_FULL, c_values=(1e-2, 1e-1, 10.0, 1e2)),
)
def check_c3(settings: dict) -> list[Evidence]:
    """Hessian identities by HVPs (:func:`proofs_check.curvature.hvp`, forward-over-reverse) at ``D theta``
    and ``theta`` for random directions ``v``; the HVP checked against an independent computation: the
    closed-form Hessians of the Rayleigh quotient and the sphere function, reverse-over-reverse
    differentiation for the nets. Tolerances: ``2 eps N_hvp`` for the scalings (two HVPs),
    ``eps (N_hvp + N_grad) kappa`` for Euler (``kappa``: its condition factor, see :func:`_c3_measure`),
    ``eps (N_hvp + N_other)`` for the independent comparison."""
    with x64():
        ev: list[Evidence] = []
        cs = tuple(float(c) for c in settings["c_values"])
        for name in ["rayleigh_quotient", "sphere_function", "bn_logistic_regression", "multi_group",
                     "no_normalisation", "weight_decay"]:
            pb = _problem(name)
            labels = pb.prob.labels
            hvp, n_hvp = _problem_fn(name, "hvp")
            _, n_vg = _problem_fn(name, "vg")
            has_g = any(lab.kind == G.VARIANT for _, _, lab in G.flatten_labelled(pb.template, labels))
            ww, full, euler, kappas, indep = [], [], [], [], []
            closed = None
            for i, p in enumerate(_points(name, settings)):
                a, b, e, k = _c3_measure(hvp, _problem_grad_fn(name), p, labels, cs, 300 + i)
                ww.append(a)
                full.append(b)
                euler.append(e)
                kappas.append(k)
                if pb.prob.hessian_closed_form is not None and not pb.control:
                    v = _ravel(_random_like(p, 400 + i))
                    if closed is None:
                        closed = _compile(lambda q, u: pb.prob.hessian_closed_form(q) @ u, p, v)
                    indep.append(_rel(_ravel(_np(hvp(p, _unravel(v, p)))), np.asarray(closed[0](p, v))))
            suffix = f"; control: {pb.prob.description}" if pb.control else ""
            base = f"{pb.prob.name}, {len(ww)} points"
            common = dict(bn=pb.bn, control=_breaks(_C3_CONTROLS, _C3_PROBLEM_CONTROLS, name))
            ev.append(_ev("C3", f"{base}, ww block c^2 H(cw) v = H(w) v, c in {cs}{suffix}", _worst(ww),
                          2 * EPS * n_hvp, op_count=n_hvp, **common))
            if has_g:
                ev.append(_ev("C3", f"{base}, all blocks D H(D theta) D v = H(theta) v, c in {cs}{suffix}",
                              _worst(full), 2 * EPS * n_hvp, op_count=n_hvp, **common))
            kappa = _worst(kappas)  # err_p <= eps N kappa_p <= eps N max_p kappa_p at every point
            ev.append(_ev("C3", f"{base}, Euler H(w) w = -grad_w L{suffix}", _worst(euler),
                          EPS * (n_hvp + n_vg) * kappa, op_count=n_hvp + n_vg, kappa=kappa, **common))
            if indep:
                n = n_hvp + closed[1]
                ev.append(_ev("C3", f"{base}, HVP (forward-over-reverse) vs closed-form Hessian", _worst(indep),
                              EPS * n, op_count=n, bn=pb.bn))
        for arch, kw in _nets(settings):
            for seed in settings["seeds"]:
                cases = [(_net_from(settings, arch, kw, pr, seed=seed), "") for pr in settings["presets"]]
                cases.append((_net_from(settings, arch, kw, "paper", bn="standard", seed=seed),
                              "control: standard epsilon-BN, epsilon = 1e-5"))
                for net, why in cases:
                    labels = net.model.labels("layer")
                    hvp, n_hvp = _net_hvp(net)
                    a, b, e, kappa = _c3_measure(hvp, _net_grad_fn(net), net.params, labels, cs, 500 + seed)
                    suffix = f"; {why}" if why else ""
                    base = f"{net.name}, digits batch {net.batch}"
                    common = dict(bn=net.bn, control=_C3_CONTROLS[2] if why else None)
                    ev.append(_ev("C3", f"{base}, ww block c^2 H(cw) v = H(w) v, c in {cs}{suffix}", a,
                                  2 * EPS * n_hvp, op_count=n_hvp, **common))
                    ev.append(_ev("C3", f"{base}, all blocks D H(D theta) D v = H(theta) v, c in {cs}{suffix}", b,
                                  2 * EPS * n_hvp, op_count=n_hvp, **common))
                    ev.append(_ev("C3", f"{base}, Euler H(w) w = -grad_w L{suffix}", e,
                                  EPS * (n_hvp + net.n_vg) * kappa, op_count=n_hvp + net.n_vg, kappa=kappa,
                                  **common))
                    if not why:
                        v = _random_like(net.params, 600 + seed)
                        rr, n_rr = net.compiled("rr", net.params, v)
                        err = _rel(_np(hvp(net.params, v)), _np(rr(net.params, v)))
                        ev.append(_ev("C3", f"{base}, HVP forward-over-reverse vs reverse-over-reverse", err,
                                      EPS * (n_hvp + n_rr), bn=net.bn, op_count=n_hvp + n_rr))
        return ev


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# =========================================================================================================
# C19: smooth BN exactly scale-invariant, standard epsilon-BN not
# =========================================================================================================

_C19_VARIANTS = {
    "smooth": "smooth BN sqrt(sigma^2 + 1e-5 ||w||^2)",
    "exact": "exact BN (epsilon = 0)",
    "standard": "control: standard BN sqrt(sigma^2 + 1e-5)",
    "eval-mode": "control: eval-mode BN, running statistics of another batch",
}


def _bn_layer_change(variant: str, x, w, cs, other_x, seed: int):
    """One BN layer ``BN(x w)``: ``max |BN(x (c w)) - BN(x w)|`` per ``c``, the round-off budget and
    ``max |BN(x w)|``. ``gamma = 1 + 0.2 N``, ``beta = 0.2 N``; eval mode uses as running statistics the
    batch statistics of ``other_x w``."""
    if variant == "smooth":
        layer = BN.BatchNorm(smooth_epsilon=BN.STANDARD_EPSILON, param_dtype=jnp.float64)
    elif variant == "standard":
        layer = BN.StandardBatchNorm(param_dtype=jnp.float64)
    else:
        layer = BN.BatchNorm(param_dtype=jnp.float64)
    eval_mode = variant == "eval-mode"
    rng = np.random.default_rng(20_000 + seed)
    feats = w.shape[1]
    other = other_x @ w
    variables = {"params": {"scale": 1.0 + 0.2 * rng.standard_normal(feats), "bias": 0.2 * rng.standard_normal(feats)},
                 "batch_stats": {"mean": other.mean(0), "var": other.var(0)}}

    def out(w_):
        return layer.apply(variables, x @ w_, use_running_average=eval_mode,
                           weight_sq_norm=jnp.sum(w_ * w_, axis=0), mutable=["batch_stats"])[0]

    f, n_ops = _compile(out, w)
    ref = np.asarray(f(w))
    per_c = {f"{c:g}": float(np.max(np.abs(np.asarray(f(c * w)) - ref))) for c in cs}
    return per_c, n_ops, float(np.max(np.abs(ref)))


_C19_CONTROLS = (
    "standard epsilon-BN (epsilon = 1e-5): one layer, and the smoothed net with standard BN",
    "eval-mode BN (running statistics of another batch)",
)


def _bn_closed_form_records(x, w, seed: int) -> list[Evidence]:
    """The library's train-mode BN layer (:class:`rate_tuning.layers.BatchNorm`, exact and smooth) against
    the formula of the paper written here in numpy: ``(z - mean(z)) / sqrt(var(z) + eps ||w_k||^2)`` per
    channel ``k`` for ``z = x w`` (``eps = 0`` for exact BN, the smoothed network's ``eps`` otherwise).

    Tolerance: each side is a two-pass mean and variance of ``B`` terms and a product of ``d`` terms:
    ``gamma_{B + d}`` relative per output, outputs of size up to ``sqrt(B - 1)``: ``2 gamma_{B+d} sqrt(B)``
    absolute (float64).
    """
    from rate_tuning import layers
    out = []
    z = x @ w
    B, d = x.shape
    wsq = np.sum(w**2, axis=0)
    for variant, eps in (("exact", 0.0), ("smooth", layers.STANDARD_EPSILON)):
        mine = (z - z.mean(0)) / np.sqrt(z.var(0) + eps * wsq)
        mod = layers.batch_norm(variant, use_scale=False, use_bias=False, param_dtype=jnp.float64)()
        variables = mod.init(jax.random.key(0), jnp.asarray(z), use_running_average=False,
                             weight_sq_norm=jnp.asarray(wsq))
        y, _ = mod.apply(variables, jnp.asarray(z), use_running_average=False, weight_sq_norm=jnp.asarray(wsq),
                         mutable=["batch_stats"])
        diff = float(np.max(np.abs(np.asarray(y, np.float64) - mine)))
        out.append(_ev("C19", f"one BN layer ({variant}, eps={eps:g}) on digits x (B={B}, {d} -> {w.shape[1]}), seed "
                              f"{seed}: rate_tuning.layers.BatchNorm vs (z - mean z)/sqrt(var z + eps ||w||^2) in numpy "
                              "(max |difference|)", diff, 2 * gamma(B + d, DTYPE) * math.sqrt(B), bn=variant,
                       op_count=B + d))
    return out


@claim(
    "C19",
    paper_ref="smoothed-network appendix [D]; PAPER §5",
    statement="BN with sqrt(sigma^2 + eps ||w||^2) is exactly scale-invariant in w; standard sqrt(sigma^2 + eps) "
              "BN is not (measured: max |output(c w) - output(w)| over c)",
    hypotheses="train-mode BN with batch statistics; eps ||w||^2 uses the channel's own kernel",
    negative_controls=_C19_CONTROLS,
    quick=dict(batch=32, seeds=(0,), width=16, c_values=(1e-3, 1e-2, 1e-1, 10.0, 1e2, 1e3),
               nets=(("mlp", {"widths": (16, 16)}),)),
    full=dict(batch=64, seeds=(0, 1, 2), width=32, optimize=True,
              c_values=tuple(float(c) for c in np.logspace(-3, 3, 13) if not np.isclose(c, 1.0)),
              nets=(("mlp", {"widths": (32, 32, 32)}), ("convnet", {"channels": (8, 16, 32)}))),
)
def check_c19(settings: dict) -> list[Evidence]:
    """One BN layer ``BN(x w)`` on flattened digits ``x`` (``B x 64``) with a random ``w`` (``64 x width``,
    ``N(0, 1/64)``), and whole networks (logits, every kernel scaled by ``c``): max absolute output change
    over ``c``. Tolerance ``2 eps N max(1, max|output|)`` (two forward passes; absolute errors of outputs of
    size up to ``max|output|``)."""
    with x64():
        ev: list[Evidence] = []
        cs = tuple(float(c) for c in settings["c_values"])
        for seed in settings["seeds"]:
            x_np, _ = _digits_batch(int(settings["batch"]), int(seed))
            x = x_np.reshape(len(x_np), -1)
            xo, _ = _digits_batch(int(settings["batch"]), 1000 + int(seed))
            w = np.random.default_rng(30_000 + seed).standard_normal((x.shape[1], int(settings["width"])))
            w /= math.sqrt(x.shape[1])
            layer = {v: _bn_layer_change(v, x, w, cs, xo.reshape(len(xo), -1), seed) for v in _C19_VARIANTS}
            for variant, what in _C19_VARIANTS.items():
                per_c, n_ops, size = layer[variant]
                extra = {}
                if variant == "smooth" and seed == settings["seeds"][0]:  # one plot, every variant (0 at 1e-18)
                    extra["curves"] = {"layer_output_change": dict(curve(
                        cs, {v: [max(layer[v][0][f"{c:g}"], 1e-18) for c in cs] for v in layer}, "c",
                        "max |BN(x cw) - BN(x w)|", logy=True, logx=True),
                        title="C19: one BN layer, output change under w -> c w")}
                setting = f"one BN layer on digits x (B={x.shape[0]}, 64 -> {w.shape[1]}), c in {cs}, {what}"
                ev.append(_ev("C19", setting, _worst(per_c.values()), 2 * EPS * n_ops * max(1.0, size),
                              bn=variant,
                              control={"standard": _C19_CONTROLS[0], "eval-mode": _C19_CONTROLS[1]}.get(variant),
                              op_count=n_ops,
                              change_per_c=per_c, max_abs_output=size, **extra))
            ev += _bn_closed_form_records(x, w, seed)
            for arch, kw in _nets(settings):
                for preset, bn in (("smoothed", None), ("paper", None), ("smoothed", "standard")):
                    net = _net_from(settings, arch, kw, preset, bn=bn, seed=seed)
                    labels = net.model.labels("layer")
                    kernels = _si_names(net.params, labels, kernels=True)
                    _, ref, _ = _evaluate(net)
                    per_c = {f"{c:g}": float(np.max(np.abs(
                        _evaluate(net, _scale(net.params, labels, {g: c for g in kernels}))[1] - ref))) for c in cs}
                    size = float(np.max(np.abs(ref)))
                    setting = (f"{net.name}: logits, every kernel scaled by c in {cs}, digits batch {net.batch}"
                               + ("; control: standard BN" if bn else ""))
                    ev.append(_ev("C19", setting, _worst(per_c.values()), 2 * EPS * net.n_vg * max(1.0, size),
                                  bn=net.bn, control=_C19_CONTROLS[0] if bn else None, op_count=net.n_vg,
                                  change_per_c=per_c,
                                  max_abs_output=size))
        return ev


# =========================================================================================================
# C20: (gamma, beta) of inner BNs jointly scale-invariant
# =========================================================================================================


def _loss_change(net, labels, groups, cs) -> tuple[float, dict[str, float]]:
    """Max over ``c`` of ``|L(c w_G) - L| / max(|L|, 1)``, the given groups scaled together."""
    loss0 = _evaluate(net)[0]
    per_c = {f"{c:g}": abs(_evaluate(net, _scale(net.params, labels, {g: c for g in groups}))[0] - loss0)
             / max(abs(loss0), 1.0) for c in cs}
    return _worst(per_c.values()), per_c


def _affine_as_group(labels, params, layer: str):
    return _relabel(labels, params, {f"{layer}/scale": G.si(layer), f"{layer}/bias": G.si(layer)})


_C20_CONTROLS = (
    "the last BN's (gamma, beta) (bn_out)",
    "inner (gamma, beta) with softplus (smoothed preset)",
    "ResNet: one block's bn2 alone, without the rest of its residual_stream group",
    "rate_tuning.groups.verify_labels on a label tree with the last BN's (gamma, beta) labelled 'si'",
)


def label_errors(net, labels) -> tuple[int, str]:
    """``(1, message)`` when :func:`rate_tuning.groups.verify_labels` rejects ``labels`` on the net's batch,
    ``(0, '')`` when it accepts them."""
    try:
        G.verify_labels(net.loss, net.params, labels)
    except G.LabelError as exc:
        return 1, str(exc)[:300]
    return 0, ""


def verify_label_records(claim_id: str, net, labels, base: str, control: str, grouping: str = "layer") -> list:
    """The preset's labels pass :func:`rate_tuning.groups.verify_labels` (label errors <= 0), and a tree with
    the last BN's ``(gamma, beta)`` labelled ``'si'`` is rejected (the control: errors > 0). Exact counts:
    tolerance 1/2 (a count of whole errors; verify_labels' own tolerance is sqrt(eps), far below a
    non-invariant group's 1e-4..1)."""
    n, msg = label_errors(net, labels)
    out = [_ev(claim_id, f"{base}: rate_tuning.groups.verify_labels on the preset's {grouping} labels (label errors)",
               n, 0.5, bn=net.bn, message=msg, op_count=net.n_vg)]
    wrong = _relabel(labels, net.params, {p: G.si("bn_out:affine") for p, _, _ in
                                          G.flatten_labelled(net.params, labels) if p.startswith("bn_out/")})
    n, msg = label_errors(net, wrong)
    out.append(_ev(claim_id, f"{base}: verify_labels with bn_out's (gamma, beta) labelled 'si' (label errors)", n, 0.5,
                   bn=net.bn, control=control, message=msg, op_count=net.n_vg))
    return out


@claim(
    "C20",
    paper_ref="App. D architecture [S]/[D]; PAPER §1",
    statement="the (gamma, beta) of an inner BN followed by a positively homogeneous map (ReLU, pooling, "
              "bias-free linear/conv) into another BN are jointly scale-invariant; the last BN's are not "
              "(measured: |L(c (gamma, beta)) - L| / max(|L|, 1) over c, and |cos|)",
    hypotheses="ReLU activations, bias-free linear/conv layers into a BN; in a ResNet the BNs feeding one "
               "residual stream form one joint group",
    negative_controls=_C20_CONTROLS,
    quick=dict(batch=32, seeds=(0,), c_values=(1e-3, 1e-1, 10.0, 1e3), softplus_nets=("mlp",),
               nets=(("mlp", {"widths": (16, 16)}), ("resnet", {"stage_channels": (8,)}))),
    full=dict(batch=64, seeds=(0, 1, 2), optimize=True,
              c_values=tuple(float(c) for c in np.logspace(-3, 3, 7) if not np.isclose(c, 1.0)),
              softplus_nets=("mlp", "convnet", "vgg", "resnet"),
              nets=(("mlp", {"widths": (32, 32, 32)}), ("convnet", {"channels": (8, 16, 32)}),
                    ("vgg", {"config": (8, "M", 16, "M", 32)}), ("resnet", {"stage_channels": (8, 16)}))),
)
def check_c20(settings: dict) -> list[Evidence]:
    """Loss change under ``(gamma, beta) -> c (gamma, beta)`` for each inner-BN group of the ``paper``
    preset (its SI groups of non-kernel leaves), and each group's cosine with its gradient. Tolerances:
    ``2 eps N`` for the relative loss change (two forward passes), ``eps N`` for the cosine."""
    with x64():
        ev: list[Evidence] = []
        cs = tuple(float(c) for c in settings["c_values"])
        for arch, kw in _nets(settings):
            for seed in settings["seeds"]:
                net = _net_from(settings, arch, kw, "paper", seed=seed)
                labels = net.model.labels("layer")
                tol_l, tol_c = 2 * EPS * net.n_vg, EPS * net.n_vg
                base = f"{net.name}, digits batch {net.batch}"
                affine = _si_names(net.params, labels, kernels=False)
                changes = {g: _loss_change(net, labels, [g], cs)[0] for g in affine}
                ev.append(_ev("C20", f"{base}: inner BN (gamma, beta) groups {affine}, loss change, c in {cs}",
                              _worst(changes.values()), tol_l, bn=net.bn, op_count=net.n_vg, per_group=changes))
                loss, _, grads = _evaluate(net)
                _, cos, _, _ = _cosines(grads, net.params, labels, loss)
                ev.append(_ev("C20", f"{base}: inner BN (gamma, beta) groups, |cos(grad, (gamma, beta))|",
                              _worst(cos[g] for g in affine if g in cos), tol_c, bn=net.bn, op_count=net.n_vg,
                              per_group={g: cos.get(g) for g in affine}))
                change, per_c = _loss_change(net, _affine_as_group(labels, net.params, "bn_out"), ["bn_out"], cs)
                if arch == "mlp":
                    ev += verify_label_records("C20", net, labels, base, _C20_CONTROLS[3])
                ev.append(_ev("C20", f"{base}: last BN (bn_out) (gamma, beta), loss change, c in {cs}; control: "
                              "no BN after it", change, tol_l, bn=net.bn, control=_C20_CONTROLS[0], op_count=net.n_vg,
                              change_per_c=per_c))
                if arch == "resnet":
                    bn2 = sorted({p.split("/")[0] for p, _, lab in G.flatten_labelled(net.params, labels)
                                  if lab.kind == G.SI and p.split("/")[0].endswith("_bn2")})[0]
                    change, per_c = _loss_change(net, _affine_as_group(labels, net.params, bn2), [bn2], cs)
                    ev.append(_ev("C20", f"{base}: {bn2} (gamma, beta) alone, without the rest of its "
                                  f"residual_stream group, loss change, c in {cs}; control: the shortcut adds an "
                                  "unscaled stream", change, tol_l, bn=net.bn, control=_C20_CONTROLS[2],
                                  op_count=net.n_vg,
                                  change_per_c=per_c))
                if arch in settings["softplus_nets"]:
                    sm = _net_from(settings, arch, kw, "smoothed", seed=seed)
                    sl = sm.model.labels("layer")
                    first = sorted({p.split("/")[0] for p, _, lab in G.flatten_labelled(sm.params, sl)
                                    if lab.kind == G.VARIANT and not p.startswith("bn_out/")})[0]
                    change, per_c = _loss_change(sm, _affine_as_group(sl, sm.params, first), [first], cs)
                    ev.append(_ev("C20", f"{sm.name}, digits batch {sm.batch}: inner BN {first} (gamma, beta) with "
                                  f"softplus, loss change, c in {cs}; control: softplus is not homogeneous", change,
                                  2 * EPS * sm.n_vg, bn=sm.bn, control=_C20_CONTROLS[1], op_count=sm.n_vg,
                                  change_per_c=per_c))
        return ev


# =========================================================================================================
# C21: per-channel scale invariance
# =========================================================================================================


def _channel_factors(params, labels, seed: int, span: float) -> dict[str, np.ndarray]:
    """A distinct factor per channel, log-uniform in ``[1/span, span]``, for every per-channel group."""
    rng = np.random.default_rng(seed)
    return {k: np.exp(rng.uniform(-math.log(span), math.log(span), size=np.shape(v)))
            for k, v in _group_dot(params, params, labels).items() if np.ndim(v) == 1}


def _per_channel_norm_record(net, labels, base: str) -> Evidence:
    """The library's per-channel reductions (:func:`rate_tuning.groups.group_sq_norms`, used by the optimizer's
    projection, the record and the metrics) against the per-channel squared norms computed here in numpy
    (:func:`_group_dot`): worst relative difference; a group reduced to another shape counts as inf.
    Tolerance ``2 gamma_n`` (two sums of ``n`` squares, ``n`` the largest channel)."""
    lib = {k: np.asarray(v, np.float64) for k, v in G.group_sq_norms(net.params, labels).items()}
    mine = _group_dot(net.params, net.params, labels)
    worst = 0.0
    for k, v in mine.items():
        if k not in lib or lib[k].shape != np.shape(v):
            worst = math.inf
            break
        worst = max(worst, float(np.max(np.abs(lib[k] - v) / v)))
    n_max = max(math.prod(np.shape(leaf)[:-1]) for _, leaf, lab in G.flatten_labelled(net.params, labels)
                if lab.per_channel)
    return _ev("C21", f"{base}: rate_tuning.groups.group_sq_norms per channel vs numpy (worst relative difference)",
               worst, 2 * n_max * EPS, bn=net.bn, channels={k: int(np.size(v)) for k, v in mine.items()},
               op_count=n_max)


def _per_channel_growth(net, labels, lam: float = 0.0) -> tuple[float, float]:
    """One :func:`rate_tuning.optim.two_rate_sgd` step from the net's params: the worst per-channel residual
    of Lemma 2.4 (2), ``|  ||w'||^2 - ||w||^2 - lr^2 ||g||^2 |`` over ``||w'||^2 + ||w||^2 + lr^2 ||g||^2``,
    and the rate ``lr`` (the median of ``||w_k|| / ||g_k||``, so the growth term is not negligible)."""
    _, _, grads = _evaluate(net)
    w_sq, g_sq = _group_dot(net.params, net.params, labels), _group_dot(grads, grads, labels)
    lr = float(np.median(np.concatenate([np.sqrt(np.atleast_1d(w_sq[k] / g_sq[k])) for k in w_sq])))
    tx = optim.two_rate_sgd(labels, lr_w=lr, lr_g=0.1, weight_decay=lam)
    step, _ = _compile(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]), net.params, grads)
    new = _np(step(net.params, grads))
    n_sq = _group_dot(new, new, labels)
    res = [np.abs(n_sq[k] - w_sq[k] - lr * lr * g_sq[k]) / (n_sq[k] + w_sq[k] + lr * lr * g_sq[k]) for k in w_sq]
    return _worst(res), lr


def _c21_cos(net, labels, base, control=None):
    loss, _, grads = _evaluate(net)
    worst, per_group, n, skipped = _cosines(grads, net.params, labels, loss)
    return _ev("C21", f"{base}: per-channel |cos(grad_k, w_k)|", worst, EPS * net.n_vg, bn=net.bn,
               control=control, channels=n, skipped=skipped, op_count=net.n_vg, worst_per_group=per_group)


def _c21_rescale(net, labels, base, span, seed, *, loss_only, control=None):
    factors = _channel_factors(net.params, labels, 800 + seed, span)
    if loss_only:
        loss0 = _evaluate(net)[0]
        value = abs(_evaluate(net, _scale(net.params, labels, factors))[0] - loss0) / max(abs(loss0), 1.0)
        what = "|L(D w) - L(w)| / max(|L|, 1)"
    else:
        value = _worst(_scaled_grad_error(_net_grad_fn(net), net.params, labels, factors).values())
        what = "per channel ||c_k grad_k L(D w) - grad_k L(w)|| / ||grad_k L(w)||"
    return _ev("C21", f"{base}: a distinct factor per channel in [1/{span:g}, {span:g}], {what}", value,
               2 * EPS * net.n_vg, bn=net.bn, control=control, op_count=net.n_vg,
               channels_scaled=int(sum(np.size(f) for f in factors.values())))


_C21_CONTROLS = (
    "no_bn net with its kernel columns labelled as per-channel 'si' groups",
    "the fully_si head's frozen classifier (no BN after it) grouped per channel",
    "distinct factors along the input axis of a kernel (mixes what each BN channel sees)",
    "one SGD step with weight decay 1e-2 (Lemma 2.4 (2) per channel)",
)


@claim(
    "C21",
    paper_ref="Lemma 2.4 per output channel [D]; Sec. 2",
    statement="each output channel of a kernel feeding its own BN channel is a scale-invariant group: "
              "per-channel <grad_k, w_k> = 0, L and c_k grad_k invariant under distinct factors c_k, and "
              "||w_k'||^2 = ||w_k||^2 + lr^2 ||g_k||^2 after one SGD step",
    hypotheses="train-mode BN, batch statistics, epsilon = 0 (or smooth); channel k of the kernel feeds BN "
               "channel k only",
    negative_controls=_C21_CONTROLS,
    quick=dict(batch=32, seeds=(0,), span=100.0, control_nets=("mlp",),
               nets=(("mlp", {"widths": (16, 16)}), ("convnet", {"channels": (8, 16)}))),
    full=dict(batch=64, seeds=(0, 1, 2), span=1000.0, optimize=True,
              control_nets=("mlp", "convnet", "vgg", "resnet"),
              nets=(("mlp", {"widths": (32, 32, 32)}), ("convnet", {"channels": (8, 16, 32)}),
                    ("vgg", {"config": (8, "M", 16, "M", 32)}), ("resnet", {"stage_channels": (8, 16)}))),
)
def check_c21(settings: dict) -> list[Evidence]:
    """Per-channel grouping (``model.labels('channel')``) of the ``paper`` preset: worst per-channel cosine;
    loss and gradients under a distinct factor per channel (log-uniform in ``[1/span, span]``) on every
    kernel at once; the per-channel norm identity after one :func:`rate_tuning.optim.two_rate_sgd` step.
    Tolerances: ``eps N`` (cosine), ``2 eps N`` (loss change, gradient relation); norm identity
    ``eps (n + 2) + eps N``, ``n`` the largest channel size: three squared norms of length ``<= n`` each
    within ``gamma_n`` of their sum, plus the true term ``2 lr <w, g> <= tol_cos (||w||^2 + lr^2 ||g||^2)``.
    """
    with x64():
        ev: list[Evidence] = []
        span = float(settings["span"])
        for arch, kw in _nets(settings):
            for seed in settings["seeds"]:
                net = _net_from(settings, arch, kw, "paper", seed=seed)
                labels = net.model.labels("channel")
                base = f"{net.name}, per-channel grouping, digits batch {net.batch}"
                ev.append(_c21_cos(net, labels, base))
                ev.append(_c21_rescale(net, labels, base, span, seed, loss_only=True))
                ev.append(_c21_rescale(net, labels, base, span, seed, loss_only=False))
                n_max = max(math.prod(np.shape(leaf)[:-1]) for _, leaf, lab in
                            G.flatten_labelled(net.params, labels) if lab.per_channel)
                tol = EPS * (n_max + 2) + EPS * net.n_vg
                ev.append(_per_channel_norm_record(net, labels, base))
                res, lr = _per_channel_growth(net, labels)
                ev.append(_ev("C21", f"{base}: one two-rate SGD step (lr_w = {lr:.3g}), per channel "
                              "| ||w'||^2 - ||w||^2 - lr^2 ||g||^2 | / (||w'||^2 + ||w||^2 + lr^2 ||g||^2)", res, tol,
                              bn=net.bn, op_count=net.n_vg, lr_w=lr, largest_channel=n_max))
                res, lr = _per_channel_growth(net, labels, lam=1e-2)
                ev.append(_ev("C21", f"{base}: one two-rate SGD step with weight decay 1e-2 (lr_w = {lr:.3g}), "
                              "per-channel norm identity; control: weight decay", res, tol, bn=net.bn,
                              control=_C21_CONTROLS[3], op_count=net.n_vg, lr_w=lr))
                rows = [p for p, x, lab in G.flatten_labelled(net.params, labels)  # >= 2 inputs to mix
                        if lab.per_channel and p != "classifier/kernel" and np.shape(x)[-2] >= 2][-1]
                leaf = [x for p, x, _ in G.flatten_labelled(net.params, labels) if p == rows][0]
                shape = [1] * np.ndim(leaf)
                shape[-2] = np.shape(leaf)[-2]
                fac = np.exp(np.random.default_rng(700 + seed).uniform(-math.log(span), math.log(span), shape))
                mix = _relabel(labels, net.params, {rows: G.si("input_axis")})
                loss0 = _evaluate(net)[0]
                loss1 = _evaluate(net, _scale(net.params, mix, {"input_axis": fac}))[0]
                change = abs(loss1 - loss0) / max(abs(loss0), 1.0)
                ev.append(_ev("C21", f"{base}: {rows} scaled along its input axis by distinct factors in "
                              f"[1/{span:g}, {span:g}], loss change; control: mixes the inputs of each BN channel",
                              change, 2 * EPS * net.n_vg, bn=net.bn, control=_C21_CONTROLS[2], op_count=net.n_vg))
                if arch not in settings["control_nets"]:
                    continue
                nobn = _net_from(settings, arch, kw, "no_bn", seed=seed)
                nl = nobn.model.labels("layer")
                wrong = _relabel(nl, nobn.params, {p: G.si(p, per_channel=True) for p, _, _ in
                                                    G.flatten_labelled(nobn.params, nl) if p.endswith("kernel")})
                nb = f"{nobn.name}, kernels grouped per channel, digits batch {nobn.batch}; control: no BN"
                ev.append(_c21_cos(nobn, wrong, nb, control=_C21_CONTROLS[0]))
                ev.append(_c21_rescale(nobn, wrong, nb, span, seed, loss_only=True, control=_C21_CONTROLS[0]))
                fsi = _net_from(settings, arch, kw, "fully_si", seed=seed)
                fl = fsi.model.labels("channel")
                only_head = _relabel(fl, fsi.params, {
                    p: (G.si("classifier", per_channel=True) if p == "classifier/kernel" else G.FROZEN_LABEL)
                    for p, _, _ in G.flatten_labelled(fsi.params, fl)})
                ev.append(_c21_rescale(fsi, only_head, f"{fsi.name}, frozen classifier grouped per channel, "
                                       f"digits batch {fsi.batch}; control: no BN after the classifier", span, seed,
                                       loss_only=True, control=_C21_CONTROLS[1]))
        return ev
