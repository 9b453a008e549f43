"""Training from a config: set-up, the step loop with its metrics stream and checkpoints, the summary.

The pieces, flax-examples style (each small and testable on its own):

* :func:`load_dataset`, :func:`batch_fn`: the data of a config; the batch of global step ``t`` is
  ``data.batch_at(x, y, batch_size, seed, t)`` (a pure function of the step, so a run resumes exactly),
  or the whole training split for full-batch GD (``batch_size == 0``).
* :func:`create_train_state`: model, params, labels (checked against the params) and the optimizer
  :func:`rate_tuning.optim.two_rate_sgd`.
* :func:`train_and_evaluate`: the run. The steps are :mod:`rate_tuning.steps` (placed on a mesh by
  :mod:`rate_tuning.parallel` for several devices), the per-step record :mod:`rate_tuning.record`, the
  files :mod:`rate_tuning.rundir` and :mod:`rate_tuning.checkpoint`.

Reliability (README.md, "Reliability"): checkpoints at step 0, every ``config.checkpoint_every`` steps and at
the end; a resumed run ends with the same bits as an uninterrupted one at a fixed thread count, and
writes the same ``metrics.jsonl``; a non-finite loss, gradient or parameter stops the run with
:class:`rate_tuning.steps.DivergenceError` naming the step and the groups.

Step numbering: a train record with ``step = t`` describes the update ``theta_t -> theta_{t+1}`` (the
norm *before* the step, ``lr_w(t)``, the gradient at ``theta_t``); an eval record with ``step = t`` is
measured at ``theta_t``. ``t`` starts at 0; the final evaluation has ``step = config.steps``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rate_tuning import checkpoint as ckpt
from rate_tuning import configs, data, jsonio
from rate_tuning import groups as G
from rate_tuning import metrics as M
from rate_tuning import memory, models, optim, parallel, rundir, steps
from rate_tuning.configs import Config, ConfigError
from rate_tuning.progress import Progress, fmt

DTYPES = {"float32": np.float32, "float64": np.float64}
"""The numpy dtype of each of :data:`rate_tuning.configs.DTYPES`."""

EVAL_CHUNK = 1024
"""Examples per eval-mode forward pass (eval mode is per-example, so chunking does not change results)."""

IMAGE_ARCHS = ("convnet", "vgg", "resnet")
"""Architectures of :mod:`rate_tuning.models` built from convolutions: they need ``(N, H, W, C)`` inputs."""

MAX_UNCHECKED_STEPS = 100
"""The finiteness flags of the steps are fetched at every logged, evaluated or checkpointed step, and at
least every this many steps (fetching them every step would stall the device pipeline)."""


class TrainSetup(NamedTuple):
    """What :func:`create_train_state` builds: the state, and the Python objects the steps close over."""

    state: steps.TrainState
    model: nn.Module
    labels: Any
    lr_w: optax.Schedule
    lr_g: optax.Schedule


def precision(dtype: str):
    """The context a run in ``dtype`` executes in: x64 enabled for ``'float64'`` (for this run only)."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


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
    try:
        _, needed = memory.step_bytes(model, key, x)
        memory.check_fits(f"a train step of {config.arch} {config.arch_kwargs} at batch {len(x)}", needed)
        variables = jax.jit(model.init, static_argnames="train")(key, jnp.asarray(x), train=True)
    except memory.MemoryBudgetError:
        raise
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
    state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats)
    return TrainSetup(state, model, labels, lr_w, lr_g)


def evaluate(eval_step, state: steps.TrainState, x, y, chunk: int = EVAL_CHUNK) -> dict[str, float]:
    """Eval-mode mean loss and accuracy over all of ``(x, y)``, in chunks of at most ``chunk`` examples."""
    totals: dict[str, float] = {}
    for i in range(0, len(x), chunk):
        out = parallel.to_host(eval_step(state, x[i:i + chunk], y[i:i + chunk]))
        n = len(x[i:i + chunk])
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
    return {k: v / len(x) for k, v in totals.items()}


def summarize_groups(values: dict[str, Any]) -> dict[str, float]:
    """Per-group scalars (per-channel groups: the mean over channels)."""
    return {k: float(np.mean(np.asarray(v))) for k, v in values.items()}


class Prepared(NamedTuple):
    """A run whose inputs were all checked (and, with several processes, agreed) and nothing written yet."""

    setup: TrainSetup
    dataset: data.Dataset
    key: jax.Array
    mesh: Any
    devices: int
    found: ckpt.Found | None
    tree: Any
    notices: list
    lock: Any


def prepare(config: Config, workdir: str, *, resume: bool, devices: int | None) -> Prepared:
    """Every check of :func:`train_and_evaluate`'s inputs, then (process 0) the run directory locked
    (:class:`rate_tuning.rundir.RunLock`; a new run's directory created), nothing else written; with several
    processes, each raises if any failed (:func:`rate_tuning.parallel.raise_if_any_failed`). On a failure
    the lock and any directory created for it are removed again."""
    lead, processes = jax.process_index() == 0, jax.process_count()
    notices: list[str] = []
    found = tree = lock = created = None
    ckdir = os.path.join(workdir, rundir.CHECKPOINTS_DIR)
    try:
        configs.validate(config)
        if lead:
            (rundir.check_resumable if resume else rundir.check_path)(workdir)
            if os.path.isdir(workdir):  # locked before reading: no other run writes while we read
                lock = rundir.RunLock(workdir).acquire()
        if lead and resume:
            found = ckpt.latest_valid(ckdir, warn=notices.append)
            diff = rundir.config_differences(found.meta.get("config", {}), config)
            if diff:
                raise ConfigError(f"cannot resume {workdir}: the config differs from the one in checkpoint "
                                  f"{ckpt.step_name(found.step)} in {'; '.join(diff)}")
        elif lead:
            rundir.check_new_workdir(workdir)
        n_dev = parallel.check_device_count(devices)
        mesh = parallel.data_mesh(None if processes > 1 else n_dev) if n_dev > 1 else None
        dataset = load_dataset(config)
        global_batch = config.batch_size or len(dataset.x_train)
        if global_batch % n_dev:
            raise ConfigError(f"batch of {global_batch} examples is not divisible by the {n_dev} devices "
                              f"(batch_size={config.batch_size}; use a multiple of {n_dev})")
        key = jax.random.key(config.seed)
        setup = create_train_state(config, dataset, key)
        # one step type for fresh and resumed runs (a Python 0 would compile a second, weakly typed variant)
        setup = setup._replace(state=setup.state.replace(step=jnp.asarray(0, jnp.int32)))
        if found is not None:  # the newest checkpoint that verifies *and* restores into this model's state
            more: list[str] = []  # the corrupt ones latest_valid reported come again: said once
            found, tree = ckpt.restore_latest(ckdir, rundir.checkpoint_tree(setup.state, key), warn=more.append)
            notices += [n for n in more if n not in notices]
            if not np.array_equal(np.asarray(tree["rng"]), np.asarray(jax.random.key_data(key))):
                raise ckpt.CheckpointError(f"checkpoint {ckpt.step_name(found.step)} holds another PRNG key "
                                           f"than seed {config.seed} gives")
            rundir.check_metrics_match(os.path.join(workdir, rundir.METRICS_FILE), config, found.step)
        elif lead and lock is None:  # a new run in a new directory: created, locked, checked again
            created = rundir.make_workdir(workdir)
            lock = rundir.RunLock(workdir).acquire()
            rundir.check_new_workdir(workdir)
        error = None
    except Exception as e:  # noqa: BLE001 -- told to the other processes, then raised here
        error = e
    try:
        parallel.raise_if_any_failed(error)
    except BaseException:
        rundir.undo_workdir(lock, created, workdir)
        raise
    return Prepared(setup, dataset, key, mesh, n_dev, found, tree, notices, lock)


class Run:
    """One run's loop: steps, the pending finiteness flags, metrics records, evaluations and checkpoints.

    Only process 0 (``lead``) writes; the others compute the same steps.
    """

    def __init__(self, config: Config, workdir: str, prepared: Prepared, *, resume: bool, verbose: bool):
        self.config, self.workdir, self.resume = config, workdir, resume
        self.lead, self.processes = jax.process_index() == 0, jax.process_count()
        setup, self.dataset, self.key = prepared.setup, prepared.dataset, prepared.key
        self.model, self.labels, self.lr_w, self.lr_g = setup.model, setup.labels, setup.lr_w, setup.lr_g
        state = setup.state
        if resume:  # process 0 read the checkpoint; every process continues from it
            tree = parallel.broadcast_from_first(prepared.tree if self.lead
                                                 else jax.device_get(rundir.checkpoint_tree(state, self.key)))
            state = state.replace(step=jnp.asarray(int(tree["step"]), jnp.int32), params=tree["params"],
                                  batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
        self.first = int(state.step)
        if prepared.mesh is None:
            self.train_step = steps.make_train_step(self.model, self.labels, self.lr_w, check_finite=True)
        else:
            state = parallel.replicate(prepared.mesh, state)
            self.train_step = parallel.make_parallel_train_step(self.model, self.labels, self.lr_w, prepared.mesh,
                                                                check_finite=True)
        self.state = state
        self.eval_step = steps.make_eval_step(self.model)
        self.batch = batch_fn(config, self.dataset)
        self.groups = steps.finite_groups(state.params, self.labels)
        self.progress = Progress(config.steps, verbose and self.lead, initial=self.first)
        self.ckdir = os.path.join(workdir, rundir.CHECKPOINTS_DIR)
        self.metrics_path = os.path.join(workdir, rundir.METRICS_FILE)
        self.pending: list[tuple[int, dict]] = []
        self.last_train: dict[str, Any] = {}
        self.last_checkpoint: str | None = None
        self.writer: rundir.MetricsWriter | rundir.NullWriter = rundir.NullWriter()

    def save(self, step: int) -> str:
        """Checkpoint ``step`` (process 0 writes it); its path."""
        self.last_checkpoint = ckpt.step_name(step)
        if not self.lead:
            return os.path.join(self.ckdir, self.last_checkpoint)
        host = parallel.to_host(self.state) if self.processes > 1 else self.state
        return ckpt.save(self.ckdir, step, rundir.checkpoint_tree(host, self.key), rundir.checkpoint_meta(self.config, step),
                         keep=self.config.keep_checkpoints)

    def open(self, notices: list[str]) -> None:
        """Start writing: the step-0 checkpoint of a new run, or the rewound metrics of a resumed one."""
        kept: list[dict] = []
        if self.resume:
            for notice in notices:
                rundir.print_warning(notice)
            if self.lead:
                kept = rundir.rewind_metrics(self.metrics_path, self.first, rundir.print_warning)
            self.last_checkpoint = ckpt.step_name(self.first)
            self.progress.message(f"resuming {self.workdir} from step {self.first} "
                                  f"({rundir.CHECKPOINTS_DIR}/{self.last_checkpoint})")
        else:  # prepare() created and locked the directory
            self.save(0)
        if self.lead:
            self.writer = rundir.MetricsWriter(self.metrics_path, append=self.resume)
        self.last_train = next((r for r in reversed(kept) if r.get("split") == "train"), {})

    def settle(self) -> None:
        """Fetch the finiteness flags of the steps not checked yet; stop at the first bad one."""
        flags = parallel.to_host([out[steps.FINITE] for _, out in self.pending])
        for (t, out), f in zip(self.pending, flags):
            if not np.all(f):
                public = {k: v for k, v in out.items() if k != steps.FINITE}
                self.writer.write({"step": t, "split": "train", **parallel.to_host(public)})
                kept = self.last_checkpoint and f"{rundir.CHECKPOINTS_DIR}/{self.last_checkpoint}"
                message, named = steps.divergence_message(t, f, self.groups, float(self.lr_w(t)),
                                                          float(self.lr_g(t)), kept)
                raise steps.DivergenceError(message, t, named)
        self.pending.clear()

    def evaluate_test(self, step: int) -> dict:
        record = {"step": step, "split": "test",
                  **evaluate(self.eval_step, self.state, self.dataset.x_test, self.dataset.y_test)}
        self.writer.write(record)
        self.progress.eval(record)
        return record

    def loop(self) -> dict:
        """Steps ``first .. config.steps - 1`` with their records, evaluations and checkpoints; the final
        test record."""
        config = self.config
        if 0 < self.first < config.steps and config.eval_every and self.first % config.eval_every == 0:
            self.evaluate_test(self.first)  # removed from the stream by the rewind: written again, same numbers
        for t in range(self.first, config.steps):
            x, y = self.batch(t)
            self.state, out = self.train_step(self.state, x, y)
            self.progress.advance()
            self.pending.append((t, out))
            done = t + 1
            log = t % config.log_every == 0 or t == config.steps - 1
            evaluate_now = bool(config.eval_every) and done % config.eval_every == 0 and done < config.steps
            save_now = bool(config.checkpoint_every) and done % config.checkpoint_every == 0 and done < config.steps
            if log or evaluate_now or save_now or len(self.pending) >= MAX_UNCHECKED_STEPS:
                self.settle()
            if log:
                public = {k: v for k, v in out.items() if k != steps.FINITE}
                self.last_train = jsonio.to_json_value({"step": t, "split": "train", **parallel.to_host(public)})
                self.writer.write(self.last_train)
                self.progress.train(self.last_train)
            if evaluate_now:
                self.evaluate_test(done)
            if save_now:
                self.writer.sync()
                self.save(done)
        test = self.evaluate_test(config.steps)
        self.writer.sync()
        return test

    def close(self) -> None:
        self.writer.close()
        self.progress.close()


def train_and_evaluate(config: Config, workdir: str, *, verbose: bool = True, resume: bool = False,
                       devices: int | None = None) -> dict[str, Any]:
    """Train ``config.steps`` steps, evaluating on the test split every ``config.eval_every`` steps and
    at the end; write ``workdir/metrics.jsonl``, ``workdir/checkpoints/`` and ``workdir/summary.json``;
    return the summary.

    The files and their formats: :mod:`rate_tuning.rundir`. Checkpoints are written at step 0, every
    ``config.checkpoint_every`` steps and after the last step; the newest ``config.keep_checkpoints`` are kept.

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
    with precision(config.dtype):
        prepared = prepare(config, workdir, resume=resume, devices=devices)
        try:
            return _train(config, workdir, prepared, start, resume=resume, verbose=verbose)
        finally:
            if prepared.lock is not None:
                prepared.lock.release()


def _train(config: Config, workdir: str, prepared: Prepared, start: float, *, resume: bool,
           verbose: bool) -> dict[str, Any]:
    """The run of :func:`train_and_evaluate` once :func:`prepare` has checked its inputs."""
    run = Run(config, workdir, prepared, resume=resume, verbose=verbose)
    # ---- inputs are good: from here on, files are written (by process 0)
    try:
        run.open(prepared.notices)
        dataset = run.dataset
        bn = config.bn or models.PRESETS[config.preset].bn
        mode = "full-batch GD" if config.batch_size == 0 else f"SGD, batch {config.batch_size}"
        run.progress.message(f"training {config.arch}/{config.preset} (bn {bn}) on {dataset.name}: "
                             f"{len(dataset.x_train)} train / {len(dataset.x_test)} test, {mode}, "
                             f"{config.steps} steps, lr_w {config.lr_w:g}, lr_g {config.lr_g:g} "
                             f"({config.schedule}), {config.dtype}, {jax.default_backend()}")
        loop_start = time.perf_counter()
        test = run.loop()
        train_time = time.perf_counter() - loop_start
    finally:
        run.close()
    # a run resumed from its final checkpoint (killed before summary.json) has it already
    final = (os.path.join(run.ckdir, ckpt.step_name(run.first)) if resume and run.first == config.steps
             else run.save(config.steps))
    train_eval = evaluate(run.eval_step, run.state, dataset.x_train, dataset.y_train)
    params = parallel.to_host(run.state.params)
    eff = summarize_groups(M.effective_lr(run.lr_w(config.steps), params, run.labels))
    norms = summarize_groups(M.group_norms(params, run.labels))
    summary = jsonio.to_json_value({
        "steps": config.steps,
        "final_train_loss": run.last_train.get("loss"),
        "final_train_accuracy": run.last_train.get("accuracy"),
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
        "resumed_from_step": run.first if resume else None,
        "checkpoint": os.path.relpath(final, workdir),
        "config": dataclasses.asdict(config),
        "data_parallel_devices": prepared.devices,
        "processes": run.processes,
        **rundir.environment(),
    })
    if run.lead:
        jsonio.write_atomic(os.path.join(workdir, rundir.SUMMARY_FILE), summary)
    run.progress.message(f"done: test loss {fmt(summary['test_loss'], '.4g')}  "
                         f"test acc {fmt(summary['test_accuracy'], '.4f')}  "
                         f"wall {summary['wall_time_s']:.1f}s  -> {os.path.join(workdir, rundir.SUMMARY_FILE)}")
    return summary


def load_final_params(workdir: str, config: Config):
    """The params of the newest valid checkpoint of the run in ``workdir`` (after a complete run: the
    final ones), with the structure and dtype ``config`` gives; ``(step, params)``."""
    found = ckpt.latest_valid(os.path.join(workdir, rundir.CHECKPOINTS_DIR))
    with precision(config.dtype):
        dataset = load_dataset(config)
        key = jax.random.key(config.seed)
        state = create_train_state(config, dataset, key).state.replace(step=jnp.asarray(0, jnp.int32))
        tree = ckpt.restore(found.path, rundir.checkpoint_tree(state, key))
        return found.step, jax.device_get(tree["params"])


__all__ = ["DTYPES", "Prepared", "Run", "TrainSetup", "batch_fn",
           "create_train_state", "evaluate", "load_dataset", "load_final_params", "precision",
           "prepare", "summarize_groups", "train_and_evaluate"]
