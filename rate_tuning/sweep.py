"""Many training runs in one compiled program: ``vmap`` over runs, ``lax.scan`` over steps.

A *run* is one ``(lr_w, lr_g, seed)``: params from ``init_fn(jax.random.key(seed))``, then ``steps`` steps
of the paper's two-rate (S)GD (:func:`rate_tuning.optim.two_rate_sgd`, the update of Lemma 2.4)::

    g_t       = grad F_t(theta_t)          F_t = loss_fn(., batch_fn(seed, t))  (SGD)  or  loss_fn  (GD)
    u_t, s    = tx.update(g_t, s, theta_t)
    theta_t+1 = theta_t + u_t

The learning rates are traced scalars (validated on the concrete arrays before tracing; ``optim`` lets
tracers through), so every run of a sweep shares one compiled program. Strategies:

* ``'vmap'``: ``jit(vmap(run))`` over all runs at once;
* ``'loop'``: a Python loop over runs of one ``jit(run)`` (compiled once, dispatched asynchronously);
* ``'auto'``: ``'vmap'`` on accelerators, and on CPU when one step of one run costs at most
  :data:`AUTO_VMAP_MAX_FLOPS` (XLA's estimate, :func:`step_flops`), else ``'loop'`` (measured by
  ``benchmarks/studies/sweep_vmap_vs_loop.py``; see :func:`choose_strategy`).

Recorded per run, at steps ``t = 0, k, 2k, ...`` (``k = record_every``), before the step ``t``
(so a record at ``t`` describes ``theta_t`` and the update ``theta_t -> theta_{t+1}``, as in
:mod:`rate_tuning.train`): the loss ``F_t(theta_t)``; the intrinsic gradient norm
``||grad F_t(V_t; g_t)||^2`` (:func:`rate_tuning.metrics.intrinsic_grad_sq_norms`), total and per group;
``||w_t^(i)||^2`` and the effective learning rate ``lr_w(t) / ||w_t^(i)||^2`` per scale-invariant group.
See :class:`SweepResult` for the per-channel convention. Runs that diverge (``lr_g`` above its threshold,
claim C15) are flagged in ``diverged`` and fill their own records with NaN/Inf; the other runs are
unaffected (there is no reduction across runs).

Conv models on CPU: steps run inside ``lax.scan``, where XLA's CPU backend runs convolutions on a naive
kernel (jax-ml/jax#12868; many times slower, benchmarks/README.md). :func:`bn_problem` therefore applies the model through
:func:`rate_tuning.models.for_loops` (``conv_impl='auto'`` becomes ``'im2col'`` on CPU); a hand-written
``loss_fn`` should do the same.

For BN networks, :func:`bn_problem` turns a linen model into ``loss_fn``/``init_fn`` in train mode and
:func:`minibatch_fn` gives a pure ``batch_fn`` with the training loop's mini-batch order.

Example::

    g = grid(lr_w=[0.01, 1.0, 100.0], lr_g=[0.1], seeds=[0, 1])
    res = run_sweep(loss_fn, init_fn, labels, lr_w=g.lr_w, lr_g=g.lr_g, seeds=g.seeds, steps=1000,
                    shape=g.shape)
    res.reshape(res.grad_sq_intrinsic)  # (3, 1, 2, records)

Paper: Arora, Li & Lyu, "Theoretical Analysis of Auto Rate-Tuning by Batch Normalization", ICLR 2019; the
sweeps of claims C9-C12, C14-C18, C22, C23 (GD and SGD theorems, App. D).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rate_tuning import data
from rate_tuning import groups as G
from rate_tuning import models, optim
from rate_tuning import record as R

__all__ = ["AUTO_VMAP_MAX_FLOPS", "BNProblem", "Grid", "Sweep", "SweepResult", "bn_problem", "choose_strategy",
           "grid", "make_sweep", "minibatch_fn", "run_sweep", "step_flops"]

PyTree = Any
STRATEGIES = ("vmap", "loop", "auto")

AUTO_VMAP_MAX_FLOPS = 3e6
"""``'auto'`` uses ``'vmap'`` on CPU when one step of one run costs at most this many floating-point
operations (:func:`step_flops`), ``'loop'`` above.

Chosen from the measurements of ``benchmarks/studies/sweep_vmap_vs_loop.py`` (recorded in
``benchmarks/results/sweep_vmap_vs_loop_cpu.json`` and ``benchmarks/README.md``): below it vmap won on the
project's CPU, above it a loop of one compiled run did; parameter count alone does not decide.
"""

# ------------------------------------------------------------------------------------------------
# The run grid.


class Grid(NamedTuple):
    """Flat per-run arrays of a Cartesian product (``lr_w`` outermost, ``seeds`` innermost) and its shape."""

    lr_w: np.ndarray
    lr_g: np.ndarray
    seeds: np.ndarray
    shape: tuple[int, int, int]


def grid(*, lr_w: Sequence[float], lr_g: Sequence[float], seeds: Sequence[int]) -> Grid:
    """The Cartesian product ``lr_w x lr_g x seeds`` as flat arrays, one entry per run.

    Run ``r`` has index ``np.unravel_index(r, shape)`` = ``(i_w, i_g, i_s)``; a result array ``a`` of shape
    ``(runs, ...)`` becomes ``a.reshape(shape + a.shape[1:])`` (:meth:`SweepResult.reshape`).

    Example::

        g = grid(lr_w=[0.1, 1.0], lr_g=[0.01], seeds=[0, 1, 2])
        g.shape  # (2, 1, 3); g.lr_w = [0.1, 0.1, 0.1, 1, 1, 1]
    """
    axes = [np.asarray(lr_w, np.float64).ravel(), np.asarray(lr_g, np.float64).ravel(),
            np.asarray(seeds).ravel()]
    for name, a in zip(("lr_w", "lr_g", "seeds"), axes):
        if a.size == 0:
            raise ValueError(f"grid: {name} is empty")
    w, g, s = np.meshgrid(*axes, indexing="ij")
    return Grid(w.ravel(), g.ravel(), s.ravel(), tuple(len(a) for a in axes))


# ------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Per-run, per-record numpy arrays of a sweep (leading axes ``(runs, records)``).

    Per-channel groups (``Label.per_channel``): ``w_sq`` holds the **sum** over channels, i.e. the squared
    norm of the whole leaf (it obeys Lemma 2.4 too: the sum of the per-channel identities), and ``eff_lr``
    the **mean** over channels of ``lr_w(t) / ||w_c||^2`` (the convention of
    :func:`rate_tuning.record.summarize`); with ``keep_channels=True`` both keep a trailing channel axis
    ``(runs, records, C)``. ``grad_sq_intrinsic_groups`` is always summed over channels (it adds up to ``grad_sq_intrinsic``).
    Field names are those of :mod:`rate_tuning.record`.

    Attributes:
      lr_w, lr_g, seeds: the run grid, ``(runs,)``.
      shape: the grid's shape when the runs came from :func:`grid` (``run_sweep(..., shape=)``), else None.
      steps: number of steps ``T`` of every run.
      record_steps: the steps ``t`` recorded, ``(records,)``: ``0, k, 2k, ... < T``.
      loss: ``F_t(theta_t)``, the loss differentiated at step ``t`` (a mini-batch loss for SGD).
      grad_sq_intrinsic: ``||grad F_t(V_t; g_t)||^2``, the intrinsic gradient norm squared (all groups + variant block).
      grad_sq_intrinsic_groups: its parts: per SI group, and ``'variant'`` for the scale-variant block.
      w_sq: ``||w_t^(i)||^2`` per SI group.
      eff_lr: ``lr_w(t) / ||w_t^(i)||^2`` per SI group.
      lr_w_t, lr_g_t: the learning rates of step ``t`` (the schedule at the optimizer's step count).
      full_loss, full_grad_sq: ``L(theta_t)`` and ``||grad L(V_t; g_t)||^2`` with ``full_loss_fn`` (if given).
      final_loss: ``F_T(theta_T)`` (``loss_fn(theta_T, batch_fn(seed, T))`` for SGD), ``(runs,)``.
      diverged: first step ``t in [0, T]`` at which ``theta_t`` or ``F_t(theta_t)`` is not finite, else -1.
      final_params: ``theta_T`` with a leading run axis (``return_params=True``), else None.
      strategy: ``'vmap'`` or ``'loop'``, as run.
      dtype: the params' float dtype.
    """

    lr_w: np.ndarray
    lr_g: np.ndarray
    seeds: np.ndarray
    shape: tuple[int, ...] | None
    steps: int
    record_steps: np.ndarray
    loss: np.ndarray
    grad_sq_intrinsic: np.ndarray
    grad_sq_intrinsic_groups: dict[str, np.ndarray]
    w_sq: dict[str, np.ndarray]
    eff_lr: dict[str, np.ndarray]
    lr_w_t: np.ndarray
    lr_g_t: np.ndarray
    full_loss: np.ndarray | None
    full_grad_sq: np.ndarray | None
    final_loss: np.ndarray
    diverged: np.ndarray
    final_params: PyTree | None
    strategy: str
    dtype: str

    @property
    def runs(self) -> int:
        return len(self.lr_w)

    def reshape(self, a):
        """``a`` (leading axis = runs) reshaped to ``shape + a.shape[1:]`` (the grid's axes first)."""
        if self.shape is None:
            raise ValueError("this sweep has no grid shape: pass shape=grid(...).shape to run_sweep")
        a = np.asarray(a)
        return a.reshape(tuple(self.shape) + a.shape[1:])


# ------------------------------------------------------------------------------------------------
# Strategy.


def step_flops(loss_fn: Callable, params_shapes: PyTree, batch_fn: Callable | None = None) -> float | None:
    """XLA's estimate of the floating-point operations of one step of one run: the loss and its gradient.

    From the lowered (not compiled) program, so it costs one trace: ``Lowered.cost_analysis()['flops']``.
    None where the backend gives no estimate.
    """
    vg = jax.jit(jax.value_and_grad(loss_fn))
    if batch_fn is None:
        lowered = vg.lower(params_shapes)
    else:
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        lowered = vg.lower(params_shapes, jax.eval_shape(batch_fn, scalar, scalar))
    try:
        cost = lowered.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return float(flops) if flops is not None and flops > 0 else None


def choose_strategy(flops: float | None, backend: str | None = None) -> str:
    """``'vmap'`` or ``'loop'`` for runs whose step costs ``flops`` (:func:`step_flops`) on ``backend``.

    Rule: ``'vmap'`` on accelerators (``backend != 'cpu'``; assumed, not measured here: batching runs fills
    the device); on CPU, ``'vmap'`` iff ``flops <= AUTO_VMAP_MAX_FLOPS`` (``'loop'`` when unknown). On CPU,
    vmap wins when a step is so small that XLA's per-operation overhead dominates, which it amortises
    over the runs; once a step is compute-bound it loses, because batched matrix products run slower
    than one product per run (``benchmarks/studies/sweep_vmap_vs_loop.py``).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "vmap"
    return "vmap" if flops is not None and flops <= AUTO_VMAP_MAX_FLOPS else "loop"


# ------------------------------------------------------------------------------------------------
# The sweep.


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float_dtype(tree):
    leaves = [l for l in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(l.dtype, jnp.floating)]
    if not leaves:
        raise ValueError("init_fn returned no floating-point parameters")
    return jnp.result_type(*[l.dtype for l in leaves])


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(l)) for l in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(l.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


class Sweep:
    """A compiled sweep for one problem and one setting; call it with the run grid.

    Built by :func:`make_sweep`; ``sweep(lr_w, lr_g, seeds)`` returns a :class:`SweepResult`. The compiled
    program is reused across calls with the same number of runs (``'vmap'``) or always (``'loop'``).

    Attributes:
      strategy: ``'vmap'`` or ``'loop'`` (``'auto'`` resolved).
      flops: XLA's estimate of one step of one run (:func:`step_flops`), computed for ``'auto'`` only.
      n_params: parameters per run.
      dtype: the params' float dtype.
      steps, record_every: as given.
    """

    def __init__(self, loss_fn, init_fn, labels, *, steps, schedule, weight_decay, momentum, project,
                 batch_fn, record_every, strategy, return_params, keep_channels, full_loss_fn):
        self.steps = _check_int("steps", steps, 1)
        self.record_every = _check_int("record_every", record_every, 1)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        covered = getattr(batch_fn, "steps", None)  # a minibatch_fn table ends at step `covered`
        if covered is not None and covered < self.steps:
            raise ValueError(f"batch_fn covers steps 0..{covered}, but the sweep evaluates steps 0..{self.steps}")
        # the optimizer is built inside the trace with traced rates (optim lets tracers through); build it
        # once here with concrete ones, so that a bad schedule, weight_decay or momentum fails before tracing
        optim.two_rate_sgd(labels, optim.schedule(schedule, 1.0), optim.schedule(schedule, 1.0),
                           weight_decay=weight_decay, momentum=momentum, project=project)
        self.opt_kw = dict(weight_decay=weight_decay, momentum=momentum, project=project)
        self.schedule = schedule
        shapes = jax.eval_shape(init_fn, jax.random.key(0))
        G.si_groups(shapes, labels)  # LabelError naming the parameter if labels and params do not match
        self.dtype = _float_dtype(shapes)
        self.n_params = int(sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(shapes)))
        self.flops = step_flops(loss_fn, shapes, batch_fn) if strategy == "auto" else None
        self.strategy = choose_strategy(self.flops) if strategy == "auto" else strategy
        self.labels, self.loss_fn, self.init_fn, self.batch_fn = labels, loss_fn, init_fn, batch_fn
        self.full_loss_fn, self.return_params, self.keep_channels = full_loss_fn, return_params, keep_channels
        # init apart from training: jax.jit caches by function, so a sweep with the same init_fn (another
        # setting, another number of runs) reuses its compiled init
        self._init = jax.jit(init_fn)
        single = self._single_run
        self._compiled = jax.jit(jax.vmap(single) if self.strategy == "vmap" else single)

    # -- one run ------------------------------------------------------------------------------------
    def _loss(self, params, seed, t):
        if self.batch_fn is None:
            return self.loss_fn(params)
        return self.loss_fn(params, self.batch_fn(seed, t))

    def _metrics(self, params, new_params, grads, loss, lr_w_t, lr_g_t):
        """The step's :func:`rate_tuning.record.step_record`, per-channel groups reduced (class docstring)."""
        labels = self.labels
        q = R.step_record(params, new_params, grads, labels, lr_w_t, loss=loss)
        rec = {R.LOSS: loss, R.INTRINSIC: q[R.INTRINSIC], "lr_w_t": lr_w_t, "lr_g_t": lr_g_t,
               R.INTRINSIC_GROUPS: q[R.INTRINSIC_GROUPS], R.W_SQ: {}, R.EFF_LR: {}}
        for k, v in q[R.W_SQ].items():
            eff = q[R.EFF_LR][k]
            if v.ndim and not self.keep_channels:
                v, eff = jnp.sum(v), jnp.mean(eff)
            rec[R.W_SQ][k], rec[R.EFF_LR][k] = v, eff
        if self.full_loss_fn is not None:
            full, full_grads = jax.value_and_grad(self.full_loss_fn)(params)
            rec["full_loss"] = full
            rec["full_grad_sq"] = R.intrinsic(full_grads, params, labels)[1]
        return rec

    def _single_run(self, params, lr_w, lr_g, seed):
        """One run from ``params`` with traced ``lr_w``, ``lr_g`` (scalars of the params' dtype) and ``seed``
        (int32, for ``batch_fn``)."""
        sched_w, sched_g = optim.schedule(self.schedule, lr_w), optim.schedule(self.schedule, lr_g)
        tx = optim.two_rate_sgd(self.labels, sched_w, sched_g, **self.opt_kw)
        opt_state = tx.init(params)

        def step(carry, t, record: bool):
            params, opt_state, bad = carry
            loss, grads = jax.value_and_grad(self._loss)(params, seed, t)
            updates, opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            finite = jnp.isfinite(loss) & _all_finite(params)
            bad = jnp.where((bad < 0) & ~finite, t, bad)
            rec = None
            if record:  # the rates of this step: the optimizer's step count is t
                rec = self._metrics(params, new_params, grads, loss, jnp.asarray(sched_w(t), lr_w.dtype),
                                    jnp.asarray(sched_g(t), lr_g.dtype))
            return (new_params, opt_state, bad), rec

        def block(carry, t0, size: int):
            """Steps ``t0 .. t0 + size - 1``; the first one is recorded."""
            carry, rec = step(carry, t0, record=True)
            if size > 1:
                carry, _ = jax.lax.scan(lambda c, t: step(c, t, record=False), carry,
                                        t0 + 1 + jnp.arange(size - 1, dtype=jnp.int32))
            return carry, rec

        k = self.record_every
        n_full, rem = divmod(self.steps, k)
        carry = (params, opt_state, jnp.array(-1, jnp.int32))
        recs = []
        if n_full:
            carry, r = jax.lax.scan(lambda c, t0: block(c, t0, k), carry,
                                    jnp.arange(n_full, dtype=jnp.int32) * k)
            recs.append(r)
        if rem:
            carry, r = block(carry, jnp.array(n_full * k, jnp.int32), rem)
            recs.append(jax.tree_util.tree_map(lambda a: a[None], r))
        records = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *recs) if len(recs) > 1 else recs[0]
        params, _, bad = carry
        t_end = jnp.array(self.steps, jnp.int32)
        final_loss = self._loss(params, seed, t_end)
        finite = jnp.isfinite(final_loss) & _all_finite(params)
        out = {"records": records, "final_loss": final_loss,
               "diverged": jnp.where((bad < 0) & ~finite, t_end, bad)}
        if self.return_params:
            out["final_params"] = params
        return out

    # -- the grid -----------------------------------------------------------------------------------
    def _check_grid(self, lr_w, lr_g, seeds):
        arrays = []
        for name, a in (("lr_w", lr_w), ("lr_g", lr_g), ("seeds", seeds)):
            a = np.asarray(a)
            if a.ndim != 1 or a.size == 0:
                raise ValueError(f"{name} must be a non-empty 1-D array (one entry per run), got shape {a.shape}")
            arrays.append(a)
        if len({a.size for a in arrays}) != 1:
            raise ValueError(f"lr_w, lr_g and seeds must have one entry per run, got lengths "
                             f"{', '.join(str(a.size) for a in arrays)} (use grid() for a Cartesian product)")
        lr_w, lr_g, seeds = arrays
        for name, a in (("lr_w", lr_w), ("lr_g", lr_g)):
            for v in a:  # the project's validation, on concrete numbers, before tracing
                optim.check_learning_rate(name, float(v))
        if not np.issubdtype(seeds.dtype, np.integer) and not np.all(np.mod(seeds, 1) == 0):
            raise ValueError(f"seeds must be integers, got {seeds!r}")
        if np.any(seeds < 0) or np.any(seeds >= 2 ** 31):
            raise ValueError(f"seeds must be in [0, 2**31), got {seeds!r}")
        known = getattr(self.batch_fn, "seeds", None)  # a minibatch_fn table holds these seeds' orders only
        if known is not None and not {int(v) for v in seeds} <= set(known):
            raise ValueError(f"batch_fn has no batches for seeds {sorted({int(v) for v in seeds} - set(known))}")
        return (lr_w.astype(np.float64), lr_g.astype(np.float64), seeds.astype(np.int64))

    def __call__(self, lr_w, lr_g, seeds, *, shape: tuple[int, ...] | None = None) -> SweepResult:
        lr_w, lr_g, seeds = self._check_grid(lr_w, lr_g, seeds)
        if shape is not None and math.prod(shape) != len(lr_w):
            raise ValueError(f"shape {shape} does not hold {len(lr_w)} runs")
        lw, lg = jnp.asarray(lr_w, self.dtype), jnp.asarray(lr_g, self.dtype)
        sd = jnp.asarray(seeds, jnp.int32)
        inits = [self._init(jax.random.key(int(s))) for s in seeds]
        if self.strategy == "vmap":
            params0 = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inits)
            out = jax.device_get(self._compiled(params0, lw, lg, sd))
        else:
            outs = [self._compiled(p, lw[i], lg[i], sd[i]) for i, p in enumerate(inits)]  # dispatched async
            outs = jax.device_get(outs)
            out = jax.tree_util.tree_map(lambda *a: np.stack(a), *outs)
        rec = out["records"]
        k = self.record_every
        return SweepResult(
            lr_w=lr_w, lr_g=lr_g, seeds=seeds, shape=None if shape is None else tuple(shape), steps=self.steps,
            record_steps=np.arange(0, self.steps, k), loss=rec[R.LOSS],
            grad_sq_intrinsic=rec[R.INTRINSIC], grad_sq_intrinsic_groups=dict(rec[R.INTRINSIC_GROUPS]),
            w_sq=dict(rec[R.W_SQ]), eff_lr=dict(rec[R.EFF_LR]),
            lr_w_t=rec["lr_w_t"], lr_g_t=rec["lr_g_t"], full_loss=rec.get("full_loss"),
            full_grad_sq=rec.get("full_grad_sq"), final_loss=np.asarray(out["final_loss"]),
            diverged=np.asarray(out["diverged"]), final_params=out.get("final_params"),
            strategy=self.strategy, dtype=str(np.dtype(self.dtype)))


def make_sweep(loss_fn: Callable, init_fn: Callable[[jax.Array], PyTree], labels, *, steps: int,
               schedule: str = "constant", weight_decay: float = 0.0, momentum: float | None = None,
               project: bool = False, batch_fn: Callable | None = None, record_every: int = 1,
               strategy: str = "auto", return_params: bool = False, keep_channels: bool = False,
               full_loss_fn: Callable | None = None) -> Sweep:
    """A compiled :class:`Sweep`, to call once or several times (as benchmarks do) with run grids.

    Arguments as in :func:`run_sweep`, without the grid. Build and call it under the same precision
    (``with jax.enable_x64(True):`` for float64).
    """
    return Sweep(loss_fn, init_fn, labels, steps=steps, schedule=schedule, weight_decay=weight_decay,
                 momentum=momentum, project=project, batch_fn=batch_fn, record_every=record_every,
                 strategy=strategy, return_params=return_params, keep_channels=keep_channels,
                 full_loss_fn=full_loss_fn)


def run_sweep(loss_fn: Callable, init_fn: Callable[[jax.Array], PyTree], labels, *, lr_w, lr_g, seeds,
              steps: int, schedule: str = "constant", weight_decay: float = 0.0, momentum: float | None = None,
              project: bool = False, batch_fn: Callable | None = None, record_every: int = 1,
              strategy: str = "auto", return_params: bool = False, keep_channels: bool = False,
              full_loss_fn: Callable | None = None, shape: tuple[int, ...] | None = None) -> SweepResult:
    """Train one run per ``(lr_w[r], lr_g[r], seeds[r])`` with two-rate (S)GD and record the paper's quantities.

    Run ``r`` starts from ``init_fn(jax.random.key(seeds[r]))`` and takes ``steps`` steps of
    :func:`rate_tuning.optim.two_rate_sgd` with rates ``schedule(lr_w[r])`` (``'si'`` leaves) and
    ``schedule(lr_g[r])`` (``'variant'`` leaves): ``lr(t) = lr`` (``'constant'``, GD theorem) or
    ``lr / sqrt(t + 1)`` (``'inverse_sqrt'``, SGD theorem).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` with ``batch = batch_fn(seed, t)``, or
        ``loss_fn(params)`` (full-batch GD) when ``batch_fn`` is None.
      init_fn: ``key -> params``; a constant function gives every run the same start.
      labels: the label tree of the params (:mod:`rate_tuning.groups`).
      lr_w, lr_g, seeds: 1-D arrays of equal length, one entry per run (see :func:`grid`); rates finite
        and > 0 (checked before tracing), seeds integers in ``[0, 2**31)``.
      steps: steps per run, ``T``.
      schedule: ``'constant'`` or ``'inverse_sqrt'``, applied to both rates.
      weight_decay, momentum, project: as in :func:`rate_tuning.optim.two_rate_sgd` (off in the theory).
      batch_fn: ``(seed, t) -> batch``, a pure jnp function of the traced int32 ``seed`` and step ``t``
        (e.g. :func:`minibatch_fn`); one that draws with ``jax.random`` should derive its keys with
        ``jax.random.fold_in`` so that they differ from ``init_fn``'s ``key(seed)``.
      record_every: record steps ``0, k, 2k, ... < T`` only (the metrics of other steps are not computed).
      strategy: ``'vmap'``, ``'loop'`` or ``'auto'`` (:func:`choose_strategy`); same numbers either way.
      return_params: also return ``theta_T`` of every run (stacked; may be big).
      keep_channels: keep the channel axis of per-channel groups in ``w_sq`` and ``eff_lr``.
      full_loss_fn: ``params -> scalar``, the full objective ``L``; if given, ``L(theta_t)`` and
        ``||grad L(V_t; g_t)||^2`` are also recorded (one full gradient per record; for SGD, claim C18).
      shape: the grid shape (``grid(...).shape``), kept for :meth:`SweepResult.reshape`.

    Returns:
      A :class:`SweepResult`.
    """
    sweep = make_sweep(loss_fn, init_fn, labels, steps=steps, schedule=schedule, weight_decay=weight_decay,
                       momentum=momentum, project=project, batch_fn=batch_fn, record_every=record_every,
                       strategy=strategy, return_params=return_params, keep_channels=keep_channels,
                       full_loss_fn=full_loss_fn)
    return sweep(lr_w, lr_g, seeds, shape=shape)


# ------------------------------------------------------------------------------------------------
# BN networks.


class BNProblem(NamedTuple):
    """``loss_fn(params, batch=None)`` (train-mode BN; ``None``: the whole ``(x, y)``) and ``init_fn(key)``."""

    loss_fn: Callable
    init_fn: Callable


def bn_problem(model, params_template, batch_stats, x, y, *, same_init: bool = False) -> BNProblem:
    """A linen BN model as ``loss_fn``/``init_fn`` for :func:`run_sweep`, in train mode.

    ``loss_fn(params, batch=None)`` is the mean cross-entropy :func:`rate_tuning.models.batch_loss` in
    train mode on ``batch = (x_b, y_b)``, or on all of ``(x, y)`` when ``batch`` is None (so the same
    ``loss_fn`` serves GD, with ``batch_fn=None``, and SGD). Train-mode BN normalises with the statistics
    of the batch itself, where scale invariance holds; the running statistics do not enter the loss or
    its gradient, so they are irrelevant to the training dynamics and the sweep does not carry them:
    ``batch_stats`` only supplies the collection ``model.apply`` expects. Recompute running statistics
    after the sweep if eval mode is needed.

    The model is applied as :func:`rate_tuning.models.for_loops` gives it (the sweep runs it under
    ``lax.scan``): with ``conv_impl='auto'`` on CPU, through im2col convolutions.

    ``x`` and ``y`` are closed over, so the compiled sweep holds them as constants (jax 0.10 embeds them in
    the program): fine for digits-sized data; for hundreds of MB expect longer compilations and a copy.

    ``init_fn(key)`` is ``model.init(key, x[:1])['params']`` cast to the dtypes of ``params_template``
    (params initialisers depend only on shapes, so this equals ``model.init(key, x)['params']``); with
    ``same_init=True`` it ignores the key and returns ``params_template``, so that runs differ only by
    their rates and (through ``batch_fn``) their data order.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    model = models.for_loops(model)
    template = jax.tree_util.tree_map(jnp.asarray, params_template)

    def loss_fn(params, batch=None):
        xb, yb = (x, y) if batch is None else batch
        return models.batch_loss(model, params, batch_stats, xb, yb, train=True)[0]

    def init_fn(key):
        if same_init:
            return template
        params = model.init(key, x[:1], train=True)["params"]
        return jax.tree_util.tree_map(lambda t, p: p.astype(t.dtype), template, params)

    return BNProblem(loss_fn, init_fn)


def minibatch_fn(x, y, batch_size: int, *, seeds: Sequence[int], steps: int
                 ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """A pure ``batch_fn(seed, step) -> (x_b, y_b)``: mini-batches without replacement, in the training loop's order.

    Step ``t`` is batch ``b = t % nb`` of epoch ``e = t // nb`` (``nb = len(x) // batch_size``; the last
    incomplete batch of an epoch is dropped) in the order :func:`rate_tuning.data.epoch_permutation`
    ``(len(x), seed, e)``, i.e. the batch :func:`rate_tuning.data.batch_at` gives the training loop.
    Deterministic per ``(seed, step)``, different across seeds and epochs, usable inside ``jit``/``vmap``/``scan``.

    The orders of every seed in ``seeds`` and every epoch up to step ``steps`` (inclusive: a sweep evaluates
    its final loss on batch ``steps``) are precomputed into a constant index table
    (``len(seeds) x epochs x len(x)`` int32), so a step costs one gather instead of a permutation (a sort of
    ``len(x)`` keys, several times a small model's own step). ``batch_fn.seeds`` and ``batch_fn.steps``
    record the range: :class:`Sweep` refuses seeds and step counts outside it.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    n = len(x)
    nb = data.steps_per_epoch(n, batch_size)
    seeds = tuple(int(s) for s in seeds)
    steps = _check_int("steps", steps, 0)
    if not seeds:
        raise ValueError("minibatch_fn: seeds is empty")
    epochs = steps // nb + 1
    table = np.stack([np.stack([data.epoch_permutation(n, s, e)[: nb * batch_size] for e in range(epochs)])
                      for s in seeds]).astype(np.int32).reshape(len(seeds), epochs * nb, batch_size)
    tab, seed_of_row = jnp.asarray(table), jnp.asarray(seeds, jnp.int32)

    def batch_fn(seed, step):
        idx = tab[jnp.argmax(seed_of_row == seed), step]
        return jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)

    batch_fn.seeds, batch_fn.steps = seeds, steps
    return batch_fn
