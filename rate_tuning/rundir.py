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
import json
import os
import sys
from typing import Callable

from rate_tuning import checkpoint as ckpt
from rate_tuning import jsonio
from rate_tuning.configs import Config, ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"

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


def check_new_workdir(workdir: str) -> None:
    """:class:`ConfigError` unless a new run can be created in ``workdir`` (absent, or a directory without
    a run, under a writable ancestor)."""
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
        if os.path.lexists(os.path.join(workdir, name)):
            raise ConfigError(f"workdir {workdir} already holds a run ({name}); choose another workdir, or "
                              f"continue it with --resume (resume=True)")
    if ckpt.list_steps(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise ConfigError(f"workdir {workdir} already holds a run ({CHECKPOINTS_DIR}/); choose another workdir, "
                          f"or continue it with --resume (resume=True)")


def check_resumable(workdir: str) -> None:
    """:class:`ConfigError` unless ``workdir`` holds an incomplete run with at least one checkpoint."""
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


__all__ = ["CHECKPOINTS_DIR", "METRICS_FILE", "MetricsError", "MetricsWriter", "NullWriter", "RESUMABLE_CONFIG_KEYS",
           "SUMMARY_FILE", "check_new_workdir", "check_resumable", "config_differences", "config_record",
           "read_metrics", "print_warning", "rewind_metrics"]
