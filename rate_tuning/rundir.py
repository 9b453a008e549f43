"""The run directory: its files, the metrics stream, and the checks made before anything is written.

A run directory ``WORKDIR`` holds (:func:`rate_tuning.train.train_and_evaluate` writes it)

* ``metrics.jsonl``: one strict-JSON record per line (:mod:`rate_tuning.jsonio`: non-finite numbers are
  ``null``), flushed line by line by :class:`MetricsWriter`: ``{"step", "split": "train", loss, accuracy,
  lr_w, grad_sq_intrinsic, lemma24_residual, norm/<g>, eff_lr/<g>, angle/<g>}`` every ``log_every`` steps
  and at the last step (:func:`rate_tuning.record.summarize`), ``{"step", "split": "test", loss,
  accuracy}`` at each evaluation. A process killed while writing leaves at most a truncated *last* line:
  :func:`read_metrics` skips it (and says so), :func:`rewind_metrics` removes it when a run resumes;
* ``checkpoints/step_<8 digits>/`` (:mod:`rate_tuning.checkpoint`): params, batch_stats, opt_state, step,
  the PRNG key data and the config; each is complete before it counts;
* ``summary.json``: ``final_train_loss`` (train-mode loss of the last step), ``train_eval_loss`` and
  ``train_eval_accuracy`` (eval mode, whole training split), ``test_loss``, ``test_accuracy``,
  ``effective_lr`` (``lr_w(T) / ||w_T||^2`` per group, mean over channels) and its ``_min``/``_max``,
  ``norms``, ``bn`` (the BN variant used), ``wall_time_s``, ``train_time_s`` (the step loop, compilation
  included), ``resumed_from_step``, ``checkpoint`` (the final one), ``config`` and the environment.
  Written atomically, last: its presence means the run is complete.

:func:`check_new_workdir` and :func:`check_resumable` refuse (``ConfigError``, one line) a directory that
cannot take a new run or holds nothing to resume; :func:`config_differences` names what changed between a
checkpoint's config and the one given.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import flax
import jax
import numpy as np
import optax

from rate_tuning import checkpoint as ckpt
from rate_tuning import jsonio
from rate_tuning.configs import Config, ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"

RESUMABLE_CONFIG_KEYS = ("checkpoint_every", "keep_checkpoints")
"""Config fields that do not change the results and may differ between a checkpoint and its resumption."""


class MetricsError(ValueError):
    """A ``metrics.jsonl`` that is corrupt other than by a truncated last line (one line)."""


def print_warning(message: str) -> None:
    """One line on stderr, ``rate-tuning: warning: <message>`` (shown even when a run is quiet)."""
    print(f"rate-tuning: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# The metrics stream.


class MetricsWriter:
    """Writes one JSON object per line to ``path`` (a new file, or ``append=True``), flushed line by line."""

    def __init__(self, path: str, append: bool = False):
        self.path = path
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(jsonio.dumps(record) + "\n")
        self._f.flush()

    def sync(self) -> None:
        """Flush and fsync: everything written so far is on disk (called before each checkpoint)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class NullWriter:
    """The metrics writer of processes other than 0 in a multi-process run: they write nothing."""

    def write(self, record: dict) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = jsonio.loads(raw)
    except jsonio.JSONInputError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _scan_metrics(path: str) -> tuple[list[tuple[bytes, dict]], str | None]:
    """``([(raw line, record), ...], problem)`` of a metrics file; ``problem`` describes a truncated last
    line that was left out (``None`` if there was none). :class:`MetricsError` for a bad earlier line."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except IsADirectoryError:
        raise MetricsError(f"{path} is a directory, not a metrics file") from None
    lines = text.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out, problem = [], None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record = _parse_record(raw)
        if record is None:
            raise MetricsError(f"{path}: line {i} is not a metrics record (corrupt file); it was not written "
                               f"by an interrupted run, so nothing was repaired")
        out.append((raw + b"\n", record))
    if tail.strip():
        record = _parse_record(tail)
        if record is not None:  # complete but for the newline
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
        (warn or print_warning)(problem)
    return [r for _, r in records]


def rewind_metrics(path: str, step: int, warn: Callable[[str], None]) -> list[dict]:
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


def expected_records(config: Config, upto: int) -> tuple[set[int], set[int]]:
    """``(train steps, test steps)`` whose records a run of ``config`` has written before step ``upto``."""
    train = {t for t in range(min(upto, config.steps)) if t % config.log_every == 0 or t == config.steps - 1}
    test = (set(range(config.eval_every, min(upto, config.steps), config.eval_every)) if config.eval_every
            else set())
    return train, test


def check_metrics_match(path: str, config: Config, step: int) -> None:
    """:class:`MetricsError` unless ``path`` holds every record a run of ``config`` wrote before ``step``
    (what a resumption from checkpoint ``step`` keeps): a missing or shortened stream cannot be continued
    into the stream of an uninterrupted run."""
    if step == 0:
        return
    if not os.path.exists(path):
        raise MetricsError(f"cannot resume from step {step}: {path} is missing (it held the records of steps "
                           f"0..{step - 1})")
    records, _ = _scan_metrics(path)
    seen = {(r["step"], r.get("split")) for _, r in records if r["step"] < step}
    train, test = expected_records(config, step)
    missing = sorted({t for t in train if (t, "train") not in seen} | {t for t in test if (t, "test") not in seen})
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MetricsError(f"cannot resume from step {step}: {path} lacks the records of steps {shown}")


# ------------------------------------------------------------------------------------------------
# Configs across a resumption.


def config_record(config: Config) -> dict:
    """``config`` as plain JSON data (tuples become lists), as stored in checkpoints and summaries."""
    return json.loads(jsonio.dumps(dataclasses.asdict(config)))


def config_differences(saved: dict, config: Config) -> list[str]:
    """``['lr_w (checkpoint 0.1, given 0.2)', ...]``: the fields where ``config`` differs from the record
    ``saved`` (:func:`config_record`), except those that may change on resume (checkpoint cadence)."""
    given = config_record(config)
    out = []
    for key in sorted(set(saved) | set(given)):
        if key in RESUMABLE_CONFIG_KEYS or saved.get(key, "<absent>") == given.get(key, "<absent>"):
            continue
        out.append(f"{key} (checkpoint {saved.get(key, '<absent>')!r}, given {given.get(key, '<absent>')!r})")
    return out


# ------------------------------------------------------------------------------------------------
# Checks before anything is written.


NAME_MAX = 255
"""Longest file name (bytes) of Linux file systems; ``PATH_MAX`` (4096) bounds the whole path."""
PATH_MAX = 4096


def check_path(workdir: str) -> None:
    """:class:`ConfigError` for a workdir path no run can use: empty, not UTF-8, a name longer than 255
    bytes or a path longer than 4096, a symlink that loops or dangles, or an entry of the run (``checkpoints``,
    ``metrics.jsonl``, ``summary.json``) of the wrong kind."""
    if not isinstance(workdir, str) or not workdir.strip():
        raise ConfigError("workdir must be a non-empty path")
    try:
        encoded = os.path.abspath(workdir).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"workdir {ascii(workdir)} is not valid UTF-8") from None
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise ConfigError(f"workdir {workdir[:80]}... is too long (a name over {NAME_MAX} bytes or a path over "
                          f"{PATH_MAX})")
    try:
        os.stat(workdir)
    except FileNotFoundError:
        if os.path.lexists(workdir):
            raise ConfigError(f"workdir {workdir} is a dangling symbolic link") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"workdir {workdir} is a symbolic link loop") from None
        if e.errno != errno.ENOTDIR:  # a file on the path: check_new_workdir names it
            raise ConfigError(f"workdir {workdir} cannot be used: {e.strerror}") from None
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir} exists and is not a directory")
    for name, want_dir in ((CHECKPOINTS_DIR, True), (METRICS_FILE, False), (SUMMARY_FILE, False)):
        path = os.path.join(workdir, name)
        if os.path.lexists(path) and (os.path.islink(path) or os.path.isdir(path) != want_dir):
            raise ConfigError(f"{path} is not a {'directory' if want_dir else 'regular file'}; this is not a "
                              f"run directory rate-tuning wrote")


def check_new_workdir(workdir: str) -> None:
    """:class:`ConfigError` unless a new run can be created in ``workdir`` (absent, or a directory without
    a run, under a writable ancestor)."""
    check_path(workdir)
    ancestor = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"workdir {workdir} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} cannot be created: no permission to write in {ancestor}")
    for name in (METRICS_FILE, SUMMARY_FILE):
        if os.path.lexists(os.path.join(workdir, name)):
            raise ConfigError(f"workdir {workdir} already holds a run ({name}); choose another workdir, or "
                              f"continue it with --resume (resume=True)")
    if ckpt.list_steps(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise ConfigError(f"workdir {workdir} already holds a run ({CHECKPOINTS_DIR}/); choose another workdir, "
                          f"or continue it with --resume (resume=True)")


def check_resumable(workdir: str) -> None:
    """:class:`ConfigError` unless ``workdir`` holds an incomplete run with at least one checkpoint."""
    check_path(workdir)
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


# ------------------------------------------------------------------------------------------------
# What a run records besides its metrics.


def environment() -> dict[str, Any]:
    """Versions, backend and device of this process, for the summary."""
    import jaxlib

    device = jax.devices()[0]
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "device": f"{device.platform}:{device.device_kind}",
            "device_count": jax.device_count()}


def checkpoint_tree(state, key) -> dict[str, Any]:
    """What a checkpoint stores as arrays: ``params``, ``batch_stats``, ``opt_state``, ``step`` (int64) and
    ``rng`` (the key data of the run's PRNG key). The data position is the step (batches are
    ``batch_at(..., step)``)."""
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "step": np.asarray(int(state.step), np.int64), "rng": np.asarray(jax.random.key_data(key))}


def checkpoint_meta(config: Config, step: int) -> dict[str, Any]:
    batches = ("the whole training split (full-batch GD)" if config.batch_size == 0 else
               f"data.batch_at(x_train, y_train, {config.batch_size}, {config.seed}, step)")
    return {
        "step": step,
        "config": config_record(config),
        "data_position": {"next_step": step, "batch_of_step": batches},
        "rng": {"seed": config.seed, "use": "parameter initialisation only (jax.random.key(seed), stored as 'rng'); "
                                     "the train step draws no random numbers"},
        "created_unix": time.time(),
        "versions": {k: environment()[k] for k in ("jax", "jaxlib", "flax", "optax")},
    }


# ------------------------------------------------------------------------------------------------
# One run at a time.


class RunLock:
    """An advisory lock on a run directory (``WORKDIR/.lock``, ``flock``), held for the run's life.

    A second run on the same directory is refused with one line naming the holder's PID
    (:class:`ConfigError`). The kernel drops the lock when its process dies however it dies, so a lock
    file left by a dead process is simply taken over. :meth:`release` unlinks the file (a bad input found
    after locking then leaves the directory as it was); the inode check in :meth:`acquire` makes that safe
    against a process that opened the old file just before it was unlinked.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot lock the run directory: {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    who = f" (pid {holder})" if holder else ""
                    raise ConfigError(f"{os.path.dirname(self.path)} is in use by another run{who}; wait for it "
                                      f"to end or choose another workdir") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else it was unlinked by its releasing holder after we opened it: try again
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Unlink the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def make_workdir(workdir: str) -> str | None:
    """Create ``workdir`` (and missing parents); the top-most directory created, or None if it existed."""
    top, path = None, os.path.abspath(workdir)
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    os.makedirs(workdir, exist_ok=True)
    return top


def undo_workdir(lock: "RunLock | None", created: str | None, workdir: str) -> None:
    """Release ``lock`` and remove the directories :func:`make_workdir` created for a run that did not start
    (only while they are empty): a refused run leaves the file system as it found it."""
    if lock is not None:
        lock.release()
    if created is None:
        return
    path = os.path.abspath(workdir)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == created:
            return
        path = os.path.dirname(path)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


__all__ = ["CHECKPOINTS_DIR", "LOCK_FILE", "METRICS_FILE", "MetricsError", "MetricsWriter", "NullWriter",
           "RESUMABLE_CONFIG_KEYS", "RunLock", "SUMMARY_FILE", "check_metrics_match", "check_new_workdir", "check_path",
           "check_resumable", "checkpoint_meta", "checkpoint_tree", "config_differences", "config_record",
           "environment", "expected_records", "make_workdir", "print_warning", "read_metrics", "rewind_metrics",
           "undo_workdir"]
