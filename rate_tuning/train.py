"""Training loops for the paper's two-rate (S)GD, with its per-step quantities measured inside the step.

The pieces, flax-examples style (each small and testable on its own):

* :class:`TrainState`: flax's ``TrainState`` plus the BatchNorm running statistics ``batch_stats``. The
  label tree is a Python object and stays *out* of the pytree: it is a closure argument of the steps.
* :func:`create_train_state`: model, params, labels (checked against the params) and the optimizer
  :func:`rate_tuning.optim.two_rate_sgd` from a :class:`~rate_tuning.configs.Config`.
* :func:`make_train_step`: a jitted ``train_step(state, x, y) -> (state, metrics)``. The metrics are
  computed inside the step from the gradient the step applies (:func:`step_metrics`).
* :func:`make_eval_step`: eval-mode (running statistics) loss and accuracy.
* :func:`train_and_evaluate`: full-batch GD when ``config.batch_size == 0``, otherwise mini-batch SGD
  where the batch of global step ``t`` is ``data.batch_at(x, y, batch_size, seed, t)`` (a pure function
  of the step, so a run can be resumed exactly). Writes ``metrics.jsonl``, ``checkpoints/`` and
  ``summary.json``; ``resume=True`` continues a killed run from its newest valid checkpoint.

Reliability (docs/reliability.md): checkpoints (:mod:`rate_tuning.checkpoint`) at step 0, every
``config.checkpoint_every`` steps and at the end; a resumed run ends with the same bits as an
uninterrupted one at a fixed thread count, and writes the same ``metrics.jsonl``; a non-finite loss,
gradient or parameter stops the run with :class:`DivergenceError` naming the step and the groups.

Step numbering: a train record with ``step = t`` describes the update ``theta_t -> theta_{t+1}`` (the
norm *before* the step, ``lr_w(t)``, the gradient at ``theta_t``); an eval record with ``step = t`` is
measured at ``theta_t``. ``t`` starts at 0; the final evaluation has ``step = config.steps``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from rate_tuning import checkpoint as ckpt
from rate_tuning import data
from rate_tuning import groups as G
from rate_tuning import layers
from rate_tuning import metrics as M
from rate_tuning import models, optim, parallel
from rate_tuning.configs import Config, ConfigError

DTYPES = {"float32": np.float32, "float64": np.float64}
"""Supported run dtypes (params and inputs)."""

EVAL_CHUNK = 1024
"""Examples per eval-mode forward pass (eval mode is per-example, so chunking does not change results)."""

IMAGE_ARCHS = ("convnet", "vgg", "resnet")
"""Architectures of :mod:`rate_tuning.models` built from convolutions: they need ``(N, H, W, C)`` inputs."""

TQDM_MIN_STEPS = 500
"""Runs at least this long get a tqdm bar when stdout is a terminal; others print plain lines."""

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"

MAX_UNCHECKED_STEPS = 100
"""The finiteness flags of the steps are fetched at every logged, evaluated or checkpointed step, and at
least every this many steps (fetching them every step would stall the device pipeline)."""

KILL_ENV = "RATE_TUNING_KILL_AT"
"""Crash-test hook: ``'<phase>:<step>'`` makes the process SIGKILL itself at that point (phases ``step``:
after the update of step ``t``; ``metrics``: half-way through writing the train record of step ``t``;
``checkpoint``: a fully written checkpoint of step ``t`` not yet renamed into place; ``prune``: after that
rename, before older checkpoints are deleted). Used by tests/test_resume.py; never set it otherwise."""


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient or parameter; the message names the step and the parameter groups.

    Attributes: ``step`` (the step whose update went bad) and ``groups`` (the names in the message).
    """

    def __init__(self, message: str, step: int, groups: list[str]):
        super().__init__(message)
        self.step = step
        self.groups = groups


class MetricsError(ValueError):
    """A ``metrics.jsonl`` that is corrupt other than by a truncated last line (one line)."""


class TrainState(train_state.TrainState):
    """flax's ``TrainState`` (step, params, tx, opt_state) plus the BatchNorm running statistics."""

    batch_stats: Any


class TrainSetup(NamedTuple):
    """What :func:`create_train_state` builds: the state, and the Python objects the steps close over."""

    state: TrainState
    model: nn.Module
    labels: Any
    lr_w: optax.Schedule
    lr_g: optax.Schedule


# ------------------------------------------------------------------------------------------------
# Validation and set-up (nothing is written to disk here).


def precision(dtype: str):
    """The context a run in ``dtype`` executes in: x64 enabled for ``'float64'`` (for this run only)."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _choice(name: str, value, known) -> None:
    if value not in known:
        raise ConfigError(f"unknown {name} {value!r}; known: {', '.join(map(str, known))}")


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate_config(config: Config) -> None:
    """Raise :class:`ConfigError` (one line) unless ``config`` names known things and has valid values.

    Checks: known dataset, arch, preset, bn variant (and that the preset has a BN to replace), grouping,
    schedule and dtype; ``lr_w``, ``lr_g`` finite and > 0 (:func:`rate_tuning.optim.check_learning_rate`);
    ``steps >= 1``, ``batch_size >= 0`` (0: full batch), ``eval_every >= 0``, ``log_every >= 1``,
    ``seed >= 0``, ``checkpoint_every >= 0``, ``keep_checkpoints >= 1``. What needs the data (batch size vs. dataset size), the model (arch_kwargs, labels) or
    the optimizer (``weight_decay >= 0``, ``momentum`` None or in ``[0, 1)``, checked by
    :func:`rate_tuning.optim.two_rate_sgd`) is checked by :func:`load_dataset` and
    :func:`create_train_state`.
    """
    if not isinstance(config, Config):
        raise ConfigError(f"expected a rate_tuning.configs.Config, got {type(config).__name__}")
    _choice("dataset", str(config.dataset).replace("-", "_").lower(), list(data.LOADERS))
    _choice("arch", config.arch, list(models.ARCHITECTURES))
    _choice("preset", config.preset, list(models.PRESETS))
    if config.bn is not None:
        _choice("bn", config.bn, list(layers.BN_VARIANTS))
        if models.PRESETS[config.preset].bn is None:
            raise ConfigError(f"preset {config.preset!r} has no BatchNorm to replace with bn={config.bn!r}")
    _choice("grouping", config.grouping, list(models.GROUPINGS))
    _choice("schedule", config.schedule, list(optim.SCHEDULES))
    _choice("dtype", config.dtype, list(DTYPES))
    for name in ("lr_w", "lr_g"):
        try:
            optim.check_learning_rate(name, getattr(config, name))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for name, minimum in (("steps", 1), ("batch_size", 0), ("eval_every", 0), ("log_every", 1), ("seed", 0),
                          ("checkpoint_every", 0), ("keep_checkpoints", 1)):
        _integer(name, getattr(config, name), minimum)
    for name in ("project", "verify_labels"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
    for name in ("arch_kwargs", "data_kwargs"):
        value = getattr(config, name)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name} must be a dict with string keys, got {value!r}")


def load_dataset(config: Config) -> data.Dataset:
    """The dataset of ``config`` with inputs cast to ``config.dtype``; checks ``batch_size`` against it.

    Raises:
      DataError: a missing or corrupt file (from :mod:`rate_tuning.data`).
      ConfigError: ``data_kwargs`` the loader does not take, or a batch larger than the training split.
    """
    try:
        ds = data.load(config.dataset, **config.data_kwargs)
    except TypeError as e:
        raise ConfigError(f"data_kwargs {config.data_kwargs!r} rejected by dataset {config.dataset!r}: {e}") from None
    if config.batch_size > len(ds.x_train):
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(ds.x_train)} training examples "
                          f"of {ds.name!r} (batch_size=0 means full-batch GD)")
    dtype = DTYPES[config.dtype]
    return dataclasses.replace(ds, x_train=ds.x_train.astype(dtype, copy=False),
                               x_test=ds.x_test.astype(dtype, copy=False))


def batch_fn(config: Config, dataset: data.Dataset) -> Callable[[int], tuple[Any, Any]]:
    """``t -> (x, y)``, the batch of global step ``t``: the whole training split when
    ``config.batch_size == 0`` (full-batch GD, put on the device once), otherwise
    ``data.batch_at(x_train, y_train, batch_size, seed, t)``."""
    if config.batch_size == 0:
        x, y = (jnp.asarray(a) for a in data.full_batch(dataset.x_train, dataset.y_train))
        return lambda t: (x, y)
    return lambda t: data.batch_at(dataset.x_train, dataset.y_train, config.batch_size, config.seed, t)


def create_train_state(config: Config, dataset: data.Dataset, key) -> TrainSetup:
    """Build the model, initialise it on the first batch, and build labels and the optimizer.

    The labels come from ``model.labels(config.grouping)`` and are checked against the params
    (:func:`rate_tuning.groups.si_groups`, which goes through ``flatten_labelled``); with
    ``config.verify_labels`` every ``'si'`` group is also checked numerically on the first batch
    (:func:`rate_tuning.groups.verify_labels`). Call it inside :func:`precision` for float64.

    Args:
      config: a validated config.
      dataset: its dataset, as returned by :func:`load_dataset`.
      key: the PRNG key of the initialisation.

    Returns:
      A :class:`TrainSetup`: the state, the model, the labels and the two learning-rate schedules.

    Raises:
      ConfigError: ``arch_kwargs`` the architecture does not take or cannot be initialised with (e.g.
        ``widths=(0,)``), vector inputs for a convolutional one, or a ``weight_decay``/``momentum`` the
        optimizer rejects.
      LabelError: labels that do not match the params, or (``verify_labels``) a group that is not
        scale-invariant; the message names the parameter.
    """
    dtype = DTYPES[config.dtype]
    if config.arch in IMAGE_ARCHS and len(dataset.input_shape) != 3:
        raise ConfigError(f"arch {config.arch!r} needs image inputs (N, H, W, C), but dataset {dataset.name!r} "
                          f"gives inputs of shape {dataset.input_shape} (check data_kwargs, e.g. flatten)")
    try:
        model = models.build(config.arch, config.preset, bn=config.bn, num_classes=dataset.num_classes,
                             param_dtype=dtype, **config.arch_kwargs)
    except TypeError as e:
        raise ConfigError(f"arch_kwargs {config.arch_kwargs!r} rejected by arch {config.arch!r}: {e}") from None
    x, y = batch_fn(config, dataset)(0)
    # jitted: one compilation instead of one per primitive in eager mode (4 s -> 1.5 s on a small MLP)
    try:
        variables = jax.jit(model.init, static_argnames="train")(key, jnp.asarray(x), train=True)
    except (TypeError, ValueError, ZeroDivisionError) as e:  # e.g. widths=('a',) or (0,): not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"arch {config.arch!r} with arch_kwargs {config.arch_kwargs!r} cannot be initialised: "
                          f"{type(e).__name__}: {first}") from None
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    labels = model.labels(config.grouping)
    G.si_groups(params, labels)  # LabelError naming the parameter if the tree does not match
    if config.verify_labels:
        G.verify_labels(lambda p: models.batch_loss(model, p, batch_stats, x, y, True)[0], params, labels)
    lr_w = optim.schedule(config.schedule, config.lr_w)
    lr_g = optim.schedule(config.schedule, config.lr_g)
    try:
        tx = optim.two_rate_sgd(labels, lr_w, lr_g, weight_decay=config.weight_decay, momentum=config.momentum,
                                project=config.project)
    except (TypeError, ValueError) as e:  # weight_decay, momentum
        raise ConfigError(str(e)) from None
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats)
    return TrainSetup(state, model, labels, lr_w, lr_g)


# ------------------------------------------------------------------------------------------------
# Steps.


def accuracy(logits, y) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def step_metrics(params, new_params, grads, labels, lr_w) -> dict[str, jax.Array]:
    """The paper's per-step quantities of the update ``params -> new_params`` made with ``grads``.

    For every scale-invariant group ``i`` (per-channel groups: the **mean over channels**):

    * ``norm/<i>``: ``||w_t||``, before the step;
    * ``eff_lr/<i>``: the effective learning rate ``lr_w(t) / ||w_t||^2``;
    * ``angle/<i>``: the angle between ``w_t`` and ``w_{t+1}`` in radians.

    And the scalars ``lr_w`` (``lr_w(t)``); ``grad_sq_intrinsic``: ``||grad L(V_t; g_t)||^2`` over all
    groups and the scale-variant block (:func:`rate_tuning.metrics.intrinsic_grad_sq_norms`);
    ``lemma24_residual``: ``max_i |(||w_{t+1}||^2 - ||w_t||^2 - lr_w(t)^2 ||grad_i||^2)|`` over groups
    (and channels), zero up to round-off for plain (S)GD (Lemma 2.4) and not with weight decay, momentum
    or projection. Pure and jit-safe.
    """
    w_sq = G.group_sq_norms(params, labels)
    new_sq = G.group_sq_norms(new_params, labels)
    g_sq = G.group_sq_norms(grads, labels)
    norms, eff = M.group_norms(params, labels), M.effective_lr(lr_w, params, labels)
    angles = M.angular_update(params, new_params, labels)
    _, intrinsic = M.intrinsic_grad_sq_norms(grads, params, labels)
    out = {"lr_w": jnp.asarray(lr_w), "grad_sq_intrinsic": intrinsic}
    residuals = []
    for k in w_sq:
        out[f"norm/{k}"] = jnp.mean(norms[k])
        out[f"eff_lr/{k}"] = jnp.mean(eff[k])
        out[f"angle/{k}"] = jnp.mean(angles[k])
        residuals.append(jnp.max(jnp.abs(new_sq[k] - w_sq[k] - lr_w ** 2 * g_sq[k])))
    out["lemma24_residual"] = jnp.max(jnp.stack(residuals)) if residuals else jnp.zeros_like(intrinsic)
    return out


def finite_groups(params, labels) -> list[tuple[str, str]]:
    """``[(name, kind), ...]``: the groups the divergence check reports, in tree order. A scale-invariant
    group is named by its group name (e.g. ``'layer0:kernel'``), every other leaf by its path (e.g.
    ``'bn_out/scale'``); ``kind`` is ``'si'``, ``'variant'`` or ``'frozen'``."""
    seen: dict[str, str] = {}
    for path, _, label in G.flatten_labelled(params, labels):
        seen.setdefault(label.group if label.kind == G.SI else path, label.kind)
    return list(seen.items())


def finite_flags(loss, grads, new_params, labels) -> jax.Array:
    """Booleans ``[loss finite, gradient of each group finite..., parameter of each group finite...]``, the
    groups in the order of :func:`finite_groups`; a few cheap reductions, pure and jit-safe."""
    def by_group(tree):
        flags: dict[str, jax.Array] = {}
        for path, leaf, label in G.flatten_labelled(tree, labels):
            name = label.group if label.kind == G.SI else path
            ok = jnp.all(jnp.isfinite(leaf))
            flags[name] = flags[name] & ok if name in flags else ok
        return list(flags.values())

    return jnp.stack([jnp.isfinite(loss), *by_group(grads), *by_group(new_params)])


def make_train_step(model: nn.Module, labels, lr_w: optax.Schedule, *, max_traces: int | None = None,
                    check_finite: bool = False):
    """A jitted ``train_step(state, x, y) -> (state, metrics)`` of the two-rate (S)GD in ``state.tx``.

    Train-mode BN (batch statistics): the loss, its gradient, the optimizer update and the new running
    statistics, plus ``loss``, ``accuracy`` and :func:`step_metrics` of the step, computed inside the
    jitted function from the gradient that is applied; with ``check_finite``, also ``metrics['finite']``
    (:func:`finite_flags`: is the loss, each group's gradient and each group's new value finite, a bool
    vector), which :func:`train_and_evaluate` turns on to stop a diverging run and does not write to the
    metrics stream.

    Args:
      model: the linen model.
      labels: its label tree (a closure constant, not traced).
      lr_w: the schedule of the scale-invariant groups (the one in ``state.tx``), evaluated at ``state.step``.
      max_traces: if set, wrap the step in ``chex.assert_max_traces(n=max_traces)`` before ``jax.jit``,
        so a retrace raises (chex counts per definition site: call ``chex.clear_trace_counter()`` first).
      check_finite: add the ``finite`` flags (off by default: the metrics stay all floats).
    """
    def train_step(state: TrainState, x, y):
        def loss_fn(params):
            return models.batch_loss(model, params, state.batch_stats, x, y, train=True)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
        out = {"loss": loss, "accuracy": accuracy(logits, y)}
        out.update(step_metrics(state.params, new_state.params, grads, labels, lr_w(state.step)))
        if check_finite:
            out["finite"] = finite_flags(loss, grads, new_state.params, labels)
        return new_state, out

    if max_traces is not None:
        train_step = chex.assert_max_traces(train_step, n=max_traces)
    return jax.jit(train_step)


def make_eval_step(model: nn.Module):
    """A jitted ``eval_step(state, x, y) -> {'loss', 'accuracy'}`` in eval mode (running BN statistics)."""
    @jax.jit
    def eval_step(state: TrainState, x, y):
        loss, (logits, _) = models.batch_loss(model, state.params, state.batch_stats, x, y, train=False)
        return {"loss": loss, "accuracy": accuracy(logits, y)}

    return eval_step


def evaluate(eval_step, state: TrainState, x, y, chunk: int = EVAL_CHUNK) -> dict[str, float]:
    """Eval-mode mean loss and accuracy over all of ``(x, y)``, in chunks of at most ``chunk`` examples."""
    totals: dict[str, float] = {}
    for i in range(0, len(x), chunk):
        out = parallel.to_host(eval_step(state, x[i:i + chunk], y[i:i + chunk]))
        n = len(x[i:i + chunk])
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
    return {k: v / len(x) for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------
# Output.


def to_json_value(v):
    """Python scalars for JSON: arrays of size 1 -> float/int, non-finite floats -> None (strict JSON)."""
    if isinstance(v, dict):
        return {k: to_json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


class MetricsWriter:
    """Writes one JSON object per line to ``path`` (a new file, or ``append=True``), flushed line by line.

    A process killed while writing can leave a truncated last line, never a damaged earlier one:
    :func:`read_metrics` skips it (and says so), and a resumed run removes it.
    """

    def __init__(self, path: str, append: bool = False):
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict, *, _kill_midway: bool = False) -> None:
        line = json.dumps(to_json_value(record)) + "\n"
        if _kill_midway:  # crash-test hook (KILL_ENV): half a line reaches the file, then SIGKILL
            self._f.write(line[:len(line) // 2])
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._f.write(line)
        self._f.flush()

    def sync(self) -> None:
        """Flush and fsync: everything written so far is on disk (called before each checkpoint)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class _NoWriter:
    """The metrics writer of processes other than 0 (they write nothing)."""

    def write(self, record: dict, *, _kill_midway: bool = False) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _warn(message: str) -> None:
    """One line on stderr, ``rate-tuning: warning: <message>`` (shown even with ``verbose=False``)."""
    print(f"rate-tuning: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _scan_metrics(path: str) -> tuple[list[tuple[bytes, dict]], str | None]:
    """``([(raw line, record), ...], problem)`` of a metrics file; ``problem`` describes a truncated last
    line that was left out (``None`` if there was none). :class:`MetricsError` for a bad earlier line."""
    with open(path, "rb") as f:
        text = f.read()
    lines = text.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out, problem = [], None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsError(f"{path}: line {i} is not a metrics record (corrupt file); it was not written "
                               f"by an interrupted run, so nothing was repaired")
        out.append((raw + b"\n", record))
    if tail.strip():
        try:
            record = json.loads(tail)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):  # complete but for the newline
            out.append((tail + b"\n", record))
        else:
            problem = (f"{path}: skipped a truncated last line ({len(tail)} bytes, line {len(lines) + 1}; "
                       f"the run was killed while writing it)")
    return out, problem


def read_metrics(path: str, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl``, in order. A truncated last line (a run killed mid-write) is
    skipped and reported through ``warn`` (default: one line on stderr); any other bad line raises
    :class:`MetricsError`."""
    records, problem = _scan_metrics(path)
    if problem:
        (warn or _warn)(problem)
    return [r for _, r in records]


def _rewind_metrics(path: str, step: int, warn: Callable[[str], None]) -> list[dict]:
    """Keep the records of ``path`` with ``step < step`` (what a run resumed at ``step`` wrote before
    it), drop the rest and a truncated last line, rewrite atomically if anything changed; the kept records.

    The resumed run writes everything from ``step`` on again (with the same numbers), so the file ends
    up identical to an uninterrupted run's: no duplicates, no gaps.
    """
    if not os.path.exists(path):
        return []
    records, problem = _scan_metrics(path)
    if problem:
        warn(problem.replace("skipped", "removed"))
    kept = [(raw, r) for raw, r in records if r["step"] < step]
    with open(path, "rb") as f:
        old = f.read()
    new = b"".join(raw for raw, _ in kept)
    if new != old:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return [r for _, r in kept]


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (never a partial file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_json_value(obj), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v, spec: str) -> str:
    """``v`` formatted with ``spec``; ``nan`` for a non-finite number (written as ``None``)."""
    return "nan" if v is None else format(v, spec)


def _mean_eff_lr(record: dict) -> str:
    vals = [v for k, v in record.items() if k.startswith("eff_lr/") and v is not None]
    return f"{np.mean(vals):.2e}" if vals else "-"


class Progress:
    """Progress on stdout: a tqdm bar on long runs when stdout is a terminal, else one plain line per
    logged step (``step 200  loss 0.123  acc 0.97  eff_lr 1.2e-03``; ``eff_lr`` is the mean over groups)."""

    def __init__(self, steps: int, enabled: bool = True, initial: int = 0):
        self.enabled = enabled
        self.bar = None
        if enabled and steps >= TQDM_MIN_STEPS and sys.stdout.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, initial=initial, unit="step", dynamic_ncols=True)

    def message(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, r: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=_fmt(r["loss"], ".4g"), acc=_fmt(r["accuracy"], ".3f"),
                                 eff_lr=_mean_eff_lr(r), refresh=False)
        else:
            self.message(f"step {r['step']}  loss {_fmt(r['loss'], '.4g')}  acc {_fmt(r['accuracy'], '.3f')}  "
                        f"eff_lr {_mean_eff_lr(r)}")

    def eval(self, r: dict) -> None:
        self.message(f"eval step {r['step']}  {r['split']}_loss {_fmt(r['loss'], '.4g')}  "
                     f"{r['split']}_acc {_fmt(r['accuracy'], '.4f')}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def environment() -> dict[str, Any]:
    """Versions, backend and device of this process, for the summary."""
    import jaxlib

    device = jax.devices()[0]
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "device": f"{device.platform}:{device.device_kind}",
            "device_count": jax.device_count()}


def summarize_groups(values: dict[str, Any]) -> dict[str, float]:
    """Per-group scalars (per-channel groups: the mean over channels)."""
    return {k: float(np.mean(np.asarray(v))) for k, v in values.items()}


# ------------------------------------------------------------------------------------------------
# The run.

_RESUMABLE_CONFIG_KEYS = ("checkpoint_every", "keep_checkpoints")
"""Config fields that do not change the results and may differ between a checkpoint and its resumption."""


def _check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir} exists and is not a directory")
    ancestor = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"workdir {workdir} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} cannot be created: no permission to write in {ancestor}")
    for name in (METRICS_FILE, SUMMARY_FILE):
        if os.path.exists(os.path.join(workdir, name)):
            raise ConfigError(f"workdir {workdir} already holds a run ({name}); choose another workdir, or "
                              f"continue it with --resume (resume=True)")
    if ckpt.list_steps(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise ConfigError(f"workdir {workdir} already holds a run ({CHECKPOINTS_DIR}/); choose another workdir, "
                          f"or continue it with --resume (resume=True)")


def _check_resumable(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise ConfigError(f"cannot resume: workdir {workdir} does not exist" if not os.path.exists(workdir)
                          else f"cannot resume: workdir {workdir} is not a directory")
    if os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
        raise ConfigError(f"cannot resume: the run in {workdir} is complete ({SUMMARY_FILE} exists); "
                          f"nothing to do")
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    if not ckpt.list_steps(directory):
        extra = ckpt.leftovers(directory)
        hint = f" (only the incomplete save {CHECKPOINTS_DIR}/{extra[0]}, ignored)" if extra else ""
        raise ConfigError(f"cannot resume: workdir {workdir} holds no checkpoint{hint}")


def config_record(config: Config) -> dict:
    """``config`` as plain JSON data (tuples become lists), as stored in checkpoints and summaries."""
    return json.loads(json.dumps(to_json_value(dataclasses.asdict(config))))


def config_differences(saved: dict, config: Config) -> list[str]:
    """``['lr_w (checkpoint 0.1, given 0.2)', ...]``: the fields where ``config`` differs from the record
    ``saved`` (:func:`config_record`), except those that may change on resume (checkpoint cadence)."""
    given = config_record(config)
    out = []
    for key in sorted(set(saved) | set(given)):
        if key in _RESUMABLE_CONFIG_KEYS or saved.get(key, "<absent>") == given.get(key, "<absent>"):
            continue
        out.append(f"{key} (checkpoint {saved.get(key, '<absent>')!r}, given {given.get(key, '<absent>')!r})")
    return out


def checkpoint_tree(state: TrainState, key) -> dict[str, Any]:
    """What a checkpoint stores as arrays: ``params``, ``batch_stats``, ``opt_state``, ``step`` (int64) and
    ``rng`` (the key data of the run's PRNG key). The data position is the step (batches are
    ``batch_at(..., step)``)."""
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "step": np.asarray(int(state.step), np.int64), "rng": np.asarray(jax.random.key_data(key))}


def _checkpoint_meta(config: Config, step: int, seed: int) -> dict[str, Any]:
    batches = ("the whole training split (full-batch GD)" if config.batch_size == 0 else
               f"data.batch_at(x_train, y_train, {config.batch_size}, {config.seed}, step)")
    return {
        "step": step,
        "config": config_record(config),
        "data_position": {"next_step": step, "batch_of_step": batches},
        "rng": {"seed": seed, "use": "parameter initialisation only (jax.random.key(seed), stored as 'rng'); "
                                     "the train step draws no random numbers"},
        "created_unix": time.time(),
        "versions": {k: environment()[k] for k in ("jax", "jaxlib", "flax", "optax")},
    }


def _kill_point(phase: str, step: int) -> bool:
    return os.environ.get(KILL_ENV) == f"{phase}:{step}"


def _maybe_kill(phase: str, step: int) -> None:
    if _kill_point(phase, step):
        os.kill(os.getpid(), signal.SIGKILL)


def _describe_group(name: str, kind: str, lr_w: float, lr_g: float) -> str:
    what = {G.SI: f"scale-invariant, lr_w={lr_w:g}", G.VARIANT: f"scale-variant, lr_g={lr_g:g}",
            G.FROZEN: "frozen"}[kind]
    return f"'{name}' ({what})"


def divergence_message(step: int, flags, groups: list[tuple[str, str]], lr_w: float, lr_g: float,
                       last_checkpoint: str | None, max_named: int = 3) -> tuple[str, list[str]]:
    """The one-line message of a step whose :func:`finite_flags` are ``flags``, and the groups it names.

    The first cause is named: the gradient's groups (with the loss, if it is non-finite too), else the
    loss, else the groups of the parameters after the update. Scale-variant groups are listed first,
    then scale-invariant, then frozen; at most ``max_named`` in the message (all in the returned list).
    Example: ``diverged at step 2: non-finite loss and gradient in 7 groups: 'bn_out/bias' (scale-variant,
    lr_g=1e+100), ... and 4 more; the last good checkpoint checkpoints/step_00000002 is kept``.
    """
    flags = np.asarray(flags, dtype=bool)
    n = len(groups)
    order = {G.VARIANT: 0, G.SI: 1, G.FROZEN: 2}

    def bad(offset):
        return sorted((i for i in range(n) if not flags[offset + i]), key=lambda i: order[groups[i][1]])

    def listing(idx):
        shown = ", ".join(_describe_group(*groups[i], lr_w, lr_g) for i in idx[:max_named])
        more = f" and {len(idx) - max_named} more" if len(idx) > max_named else ""
        return f"group {shown}" if len(idx) == 1 else f"{len(idx)} groups: {shown}{more}"

    loss_bad, grad_bad, param_bad = not flags[0], bad(1), bad(1 + n)
    if grad_bad:
        what, idx = f"non-finite {'loss and ' if loss_bad else ''}gradient in {listing(grad_bad)}", grad_bad
    elif loss_bad:
        what, idx = "non-finite loss", []
    else:
        what, idx = f"non-finite parameter after the update in {listing(param_bad)}", param_bad
    kept = (f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint
            else "no checkpoint was written")
    return f"diverged at step {step}: {what}; {kept}", [groups[i][0] for i in idx]


def train_and_evaluate(config: Config, workdir: str, *, verbose: bool = True, resume: bool = False,
                       devices: int | None = None) -> dict[str, Any]:
    """Train ``config.steps`` steps, evaluating on the test split every ``config.eval_every`` steps and
    at the end; write ``workdir/metrics.jsonl``, ``workdir/checkpoints/`` and ``workdir/summary.json``;
    return the summary.

    ``metrics.jsonl``: one JSON object per line, ``{"step", "split": "train", loss, accuracy, lr_w,
    grad_sq_intrinsic, lemma24_residual, norm/<g>, eff_lr/<g>, angle/<g>}`` every ``config.log_every``
    steps and at the last step (see :func:`step_metrics`), and ``{"step", "split": "test", loss,
    accuracy}`` at each evaluation. Non-finite numbers are written as ``null``.

    ``checkpoints/step_<8 digits>/`` (:mod:`rate_tuning.checkpoint`): params, batch_stats, opt_state,
    step, the PRNG key data and the config, at step 0, every ``config.checkpoint_every`` steps and after
    the last step; the newest ``config.keep_checkpoints`` are kept. Each is complete before it appears.

    ``summary.json``: ``final_train_loss`` (train-mode loss of the last step), ``train_eval_loss`` and
    ``train_eval_accuracy`` (eval mode, whole training split, at the end), ``test_loss``,
    ``test_accuracy``, ``effective_lr`` (``lr_w(T) / ||w_T||^2`` per group, mean over channels for
    per-channel groups) and ``effective_lr_min``/``_max``, ``norms``, ``bn`` (the BN variant used),
    ``wall_time_s``, ``train_time_s`` (the step loop, compilation included), ``resumed_from_step``,
    ``checkpoint`` (the final one), ``config`` and the environment (versions, backend, device). Written
    atomically, last: its presence means the run is complete.

    With ``resume=True`` the run in ``workdir`` continues from its newest valid checkpoint (a corrupt
    newer one is reported on stderr and skipped); the config must be the one it was started with (except
    ``checkpoint_every``/``keep_checkpoints``). The records of ``metrics.jsonl`` from the checkpoint's step
    on (and a truncated last line) are removed and written again, so the file and the final parameters are
    those of an uninterrupted run (bitwise at a fixed thread count).

    Everything that can be wrong with the inputs (the config, the dataset files, the labels, an existing
    run in ``workdir``, or for ``resume`` a missing, corrupt or mismatched checkpoint) is checked before
    anything is written, so such a failure leaves no output and changes nothing.

    With ``devices = n > 1`` the step runs data-parallel over the first ``n`` devices of this process
    (:mod:`rate_tuning.parallel`: batch sharded along ``'data'``, state replicated, BN statistics over the
    global batch): the same run to round-off, not to the bit; the batch (the training split for full-batch
    GD) must divide evenly over the devices. On CPU, ``n`` virtual devices need
    ``jax.config.update('jax_num_cpu_devices', n)`` before JAX's first computation (``rate-tuning train
    --devices n`` does it). A run may be resumed with another device count (it continues to round-off).

    Several processes (after :func:`rate_tuning.parallel.distributed_initialize` in each; ``devices`` must
    then be ``None``): the step runs data-parallel over all devices of all processes. Every process calls
    this function with the same arguments and loads the dataset; only process 0 checks, reads and writes
    ``workdir`` (for ``resume`` it reads the checkpoint and broadcasts it). The processes agree on their
    inputs before anything is written (:func:`rate_tuning.parallel.raise_if_any_failed`): if any fails,
    all raise. The summary records ``processes``; every process returns it. A process that dies later
    (e.g. process 0 on a full disk) leaves the others to JAX's distributed runtime, which aborts them when
    its heartbeat times out.

    Raises:
      ConfigError, DataError, LabelError, CheckpointError, MetricsError (all ``ValueError``): bad inputs,
        one-line messages.
      DivergenceError: a non-finite loss, gradient or parameter at some step; the metrics up to that step
        and the checkpoints before it are kept, no summary is written.
    """
    start = time.perf_counter()
    ckdir = os.path.join(workdir, CHECKPOINTS_DIR)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    lead = jax.process_index() == 0  # the process that reads and writes workdir
    processes = jax.process_count()
    notices: list[str] = []
    found = None
    with precision(config.dtype):
        try:  # ---- the inputs: every check, before anything is written (and, with several processes, agreed)
            validate_config(config)
            if lead and resume:
                _check_resumable(workdir)
                found = ckpt.latest_valid(ckdir, warn=notices.append)
                diff = config_differences(found.meta.get("config", {}), config)
                if diff:
                    raise ConfigError(f"cannot resume {workdir}: the config differs from the one in checkpoint "
                                      f"{ckpt.step_name(found.step)} in {'; '.join(diff)}")
            elif lead:
                _check_workdir(workdir)
            if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
                raise ConfigError(f"devices must be a positive integer, got {devices!r}")
            if processes > 1 and devices is not None:
                raise ConfigError(f"devices must be None with {processes} processes (the mesh spans all "
                                  f"{jax.device_count()} devices of all of them)")
            n_dev = jax.device_count() if processes > 1 else devices or 1
            mesh = parallel.data_mesh(None if processes > 1 else n_dev) if n_dev > 1 else None
            dataset = load_dataset(config)
            global_batch = config.batch_size or len(dataset.x_train)
            if global_batch % n_dev:
                raise ConfigError(f"batch of {global_batch} examples is not divisible by the {n_dev} devices "
                                  f"(batch_size={config.batch_size}; use a multiple of {n_dev})")
            key = jax.random.key(config.seed)
            state, model, labels, lr_w, lr_g = create_train_state(config, dataset, key)
            # one step type for fresh and resumed runs (a Python 0 would compile a second, weakly typed variant)
            state = state.replace(step=jnp.asarray(0, jnp.int32))
            template = checkpoint_tree(state, key)
            tree = ckpt.restore(found.path, template) if found is not None else None
            if tree is not None and not np.array_equal(np.asarray(tree["rng"]),
                                                       np.asarray(jax.random.key_data(key))):
                raise ckpt.CheckpointError(f"checkpoint {ckpt.step_name(found.step)} holds another PRNG key "
                                           f"than seed {config.seed} gives")
        except Exception as e:  # noqa: BLE001 -- told to the other processes, then raised here
            parallel.raise_if_any_failed(e)  # raises e
        parallel.raise_if_any_failed(None)
        if resume:  # process 0 read the checkpoint; every process continues from it
            tree = parallel.broadcast_from_first(tree if lead else jax.device_get(template))
            state = state.replace(step=jnp.asarray(int(tree["step"]), jnp.int32), params=tree["params"],
                                  batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
        first = int(state.step)
        batch = batch_fn(config, dataset)
        if mesh is None:
            train_step = make_train_step(model, labels, lr_w, check_finite=True)
        else:
            state = parallel.replicate(mesh, state)
            train_step = parallel.make_parallel_train_step(model, labels, lr_w, mesh, check_finite=True)
        eval_step = make_eval_step(model)
        bn = config.bn or models.PRESETS[config.preset].bn
        groups = finite_groups(state.params, labels)
        progress = Progress(config.steps, verbose and lead, initial=first)

        def save(step: int) -> str:
            """Checkpoint ``step`` (process 0 writes it); its path."""
            if not lead:
                return os.path.join(ckdir, ckpt.step_name(step))
            host = parallel.to_host(state) if processes > 1 else state
            return ckpt.save(ckdir, step, checkpoint_tree(host, key), _checkpoint_meta(config, step, config.seed),
                             keep=config.keep_checkpoints,
                             before_finalize=lambda: _maybe_kill("checkpoint", step))

        # ---- inputs are good: from here on, files are written (by process 0)
        kept: list[dict] = []
        last_checkpoint = None
        if resume:
            for notice in notices:
                _warn(notice)
            if lead:
                kept = _rewind_metrics(metrics_path, first, _warn)
            last_checkpoint = ckpt.step_name(first)
            progress.message(f"resuming {workdir} from step {first} ({CHECKPOINTS_DIR}/{last_checkpoint})")
        else:
            if lead:
                os.makedirs(workdir, exist_ok=True)
            save(0)
            last_checkpoint = ckpt.step_name(0)
        writer = MetricsWriter(metrics_path, append=resume) if lead else _NoWriter()
        mode = "full-batch GD" if config.batch_size == 0 else f"SGD, batch {config.batch_size}"
        progress.message(f"training {config.arch}/{config.preset} (bn {bn}) on {dataset.name}: "
                        f"{len(dataset.x_train)} train / {len(dataset.x_test)} test, {mode}, {config.steps} steps, "
                        f"lr_w {config.lr_w:g}, lr_g {config.lr_g:g} ({config.schedule}), {config.dtype}, "
                        f"{jax.default_backend()}")
        last: dict[str, Any] = next((r for r in reversed(kept) if r.get("split") == "train"), {})
        pending: list[tuple[int, dict]] = []

        def settle() -> None:
            """Fetch the finiteness flags of the steps not checked yet; stop at the first bad one."""
            flags = parallel.to_host([out["finite"] for _, out in pending])
            for (t, out), f in zip(pending, flags):
                if not np.all(f):
                    record = {k: v for k, v in out.items() if k != "finite"}
                    writer.write({"step": t, "split": "train", **to_json_value(parallel.to_host(record))})
                    message, named = divergence_message(t, f, groups, float(lr_w(t)), float(lr_g(t)),
                                                        last_checkpoint and f"{CHECKPOINTS_DIR}/{last_checkpoint}")
                    raise DivergenceError(message, t, named)
            pending.clear()

        def evaluate_test(step: int) -> dict:
            record = {"step": step, "split": "test", **evaluate(eval_step, state, dataset.x_test, dataset.y_test)}
            writer.write(record)
            progress.eval(record)
            return record

        loop_start = time.perf_counter()
        try:
            if 0 < first < config.steps and config.eval_every and first % config.eval_every == 0:
                evaluate_test(first)  # removed from the stream by the rewind: written again, same numbers
            for t in range(first, config.steps):
                x, y = batch(t)
                state, step_out = train_step(state, x, y)
                progress.advance()
                _maybe_kill("step", t)
                pending.append((t, step_out))
                done = t + 1
                log = t % config.log_every == 0 or t == config.steps - 1
                evaluate_now = bool(config.eval_every) and done % config.eval_every == 0 and done < config.steps
                save_now = (bool(config.checkpoint_every) and done % config.checkpoint_every == 0
                            and done < config.steps)
                if log or evaluate_now or save_now or len(pending) >= MAX_UNCHECKED_STEPS:
                    settle()
                if log:
                    public = {k: v for k, v in step_out.items() if k != "finite"}
                    last = {"step": t, "split": "train", **to_json_value(parallel.to_host(public))}
                    writer.write(last, _kill_midway=_kill_point("metrics", t))
                    progress.train(last)
                if evaluate_now:
                    evaluate_test(done)
                if save_now:
                    writer.sync()
                    save(done)
                    last_checkpoint = ckpt.step_name(done)
                    _maybe_kill("prune", done)
            test = evaluate_test(config.steps)
            writer.sync()
            train_time = time.perf_counter() - loop_start
        finally:
            writer.close()
            progress.close()
        # a run resumed from its final checkpoint (killed before summary.json) has it already
        final = (os.path.join(ckdir, ckpt.step_name(first)) if resume and first == config.steps
                 else save(config.steps))

        train_eval = evaluate(eval_step, state, dataset.x_train, dataset.y_train)
        params = parallel.to_host(state.params)
        eff = summarize_groups(M.effective_lr(lr_w(config.steps), params, labels))
        norms = summarize_groups(M.group_norms(params, labels))
        summary = to_json_value({
            "steps": config.steps,
            "final_train_loss": last.get("loss"),
            "final_train_accuracy": last.get("accuracy"),
            "train_eval_loss": train_eval["loss"],
            "train_eval_accuracy": train_eval["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "effective_lr": eff,
            "effective_lr_min": min(eff.values()) if eff else None,
            "effective_lr_max": max(eff.values()) if eff else None,
            "norms": norms,
            "bn": bn,
            "dataset": {"name": dataset.name, "n_train": len(dataset.x_train), "n_test": len(dataset.x_test)},
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - start,
            "resumed_from_step": first if resume else None,
            "checkpoint": os.path.relpath(final, workdir),
            "config": dataclasses.asdict(config),
            "data_parallel_devices": n_dev,
            "processes": processes,
            **environment(),
        })
    if lead:
        write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
    progress.message(f"done: test loss {_fmt(summary['test_loss'], '.4g')}  "
                     f"test acc {_fmt(summary['test_accuracy'], '.4f')}  "
                     f"wall {summary['wall_time_s']:.1f}s  -> {os.path.join(workdir, SUMMARY_FILE)}")
    return summary


def load_final_params(workdir: str, config: Config):
    """The params of the newest valid checkpoint of the run in ``workdir`` (after a complete run: the
    final ones), with the structure and dtype ``config`` gives; ``(step, params)``."""
    found = ckpt.latest_valid(os.path.join(workdir, CHECKPOINTS_DIR))
    with precision(config.dtype):
        dataset = load_dataset(config)
        key = jax.random.key(config.seed)
        state = create_train_state(config, dataset, key).state.replace(step=jnp.asarray(0, jnp.int32))
        tree = ckpt.restore(found.path, checkpoint_tree(state, key))
        return found.step, jax.device_get(tree["params"])


__all__ = ["ConfigError", "DivergenceError", "MetricsError", "TrainSetup", "TrainState", "accuracy", "batch_fn",
           "checkpoint_tree", "config_differences", "config_record", "create_train_state", "divergence_message",
           "evaluate", "finite_flags", "finite_groups", "load_dataset", "load_final_params", "make_eval_step",
           "make_train_step", "precision", "read_metrics", "step_metrics", "train_and_evaluate",
           "validate_config"]
