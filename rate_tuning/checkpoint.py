"""Checkpoints of a training run: save atomically, keep the last N, verify, restore past corrupt ones.

One checkpoint is one directory ``<directory>/step_<8 digits>/`` holding

* ``state/``: the arrays, written by orbax-checkpoint (:class:`orbax.checkpoint.StandardCheckpointHandler`,
  synchronous ``Checkpointer``: the save has finished when :func:`save` returns);
* ``meta.json``: a JSON record (the step, the config, the data position, the RNG, versions), chosen by
  the caller; it must hold ``"step"``;
* ``MANIFEST.json``: the size and SHA-256 of every other file, and the format version.

**Atomic.** Everything is written into a staging directory ``.tmp-step_<8 digits>-<pid>`` next to the
checkpoints, the files are fsync'ed, and only then is the staging directory renamed to ``step_<8
digits>`` (one ``rename``, atomic on POSIX file systems) and the parent fsync'ed. A process killed at any
point leaves either a complete, verifiable checkpoint or a staging directory that is never read (and is
removed by the next :func:`save`). Old checkpoints beyond ``keep`` are first renamed to ``.del-...`` and
then deleted, so a kill during the deletion never leaves a half-deleted ``step_*`` directory either.

**Verified.** orbax checks the integrity of its array data (OCDBT) but not of its JSON metadata, and a
failed orbax restore prints asyncio tracebacks to stderr. So :func:`verify` checks the manifest first
(every listed file present, with the listed size and SHA-256) and orbax only ever reads a checkpoint that
passed; a truncated, modified or missing file is reported by name. :func:`latest_valid` walks from the
newest checkpoint to the oldest, reports each corrupt one through ``warn`` (one line: its name and the
reason) and returns the newest valid one.

Example::

    path = checkpoint.save("runs/a/checkpoints", 100, {"params": params, "step": np.asarray(100)},
                           {"step": 100}, keep=3)
    found = checkpoint.latest_valid("runs/a/checkpoints")      # CheckpointError if none is valid
    tree = checkpoint.restore(found.path, target)              # target: a tree of the same structure
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Callable

FORMAT_VERSION = 1
"""Version of the checkpoint layout; a checkpoint with another version is refused."""

MANIFEST_FILE = "MANIFEST.json"
META_FILE = "meta.json"
ARRAYS_DIR = "state"
STEP_PREFIX = "step_"
STAGING_PREFIX = ".tmp-"
DELETING_PREFIX = ".del-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_CHUNK = 1 << 20


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, permissions...); the staging directory was removed and the
    earlier checkpoints are untouched."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, modified, of another run); one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class Found:
    """A verified checkpoint: its step, its directory and its ``meta.json`` record."""

    step: int
    path: str
    meta: dict


def step_name(step: int) -> str:
    """``'step_00000123'``: the directory name of the checkpoint of ``step``."""
    return f"{STEP_PREFIX}{int(step):08d}"


def list_steps(directory: str) -> list[int]:
    """The steps of the finalised checkpoint directories in ``directory``, ascending (not verified)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_RE.match, names)
                  if m and os.path.isdir(os.path.join(directory, m.group(0))))


def leftovers(directory: str) -> list[str]:
    """Names of staging (``.tmp-*``) and half-deleted (``.del-*``) directories: traces of a killed process."""
    try:
        return sorted(n for n in os.listdir(directory) if n.startswith((STAGING_PREFIX, DELETING_PREFIX)))
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------------------------
# Saving.


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    """Relative paths of the regular files under ``root``, sorted, without the manifest."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST_FILE:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _remove(directory: str, name: str) -> None:
    """Delete ``directory/name``: renamed to ``.del-<name>`` first, so a kill never leaves half of it."""
    src = os.path.join(directory, name)
    dst = os.path.join(directory, f"{DELETING_PREFIX}{name}-{os.getpid()}")
    os.rename(src, dst)
    shutil.rmtree(dst, ignore_errors=True)


def _orbax_checkpointer():
    """orbax's checkpointer for this process alone: with several JAX processes (multi-host runs write from
    process 0 only, numpy trees) orbax is told that no other process takes part, so it waits at no
    cross-process barrier."""
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler())
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                 barrier_sync_key_prefix=f"rate_tuning_{me}")
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=options)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs the tracebacks of failures in its worker threads on the ``absl`` logger; we report the
    failure ourselves, in one line, so those logs are silenced while orbax runs."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def save(directory: str, step: int, tree, meta: dict, *, keep: int,
         before_finalize: Callable[[], None] | None = None) -> str:
    """Write the checkpoint of ``step`` atomically and delete all but the newest ``keep``; its path.

    Args:
      directory: where the checkpoints live (created if missing).
      step: the step number (the directory name; also ``meta['step']``).
      tree: a pytree of arrays (jax or numpy, no Python scalars), saved by orbax.
      meta: a JSON-serialisable dict (strict JSON: no NaN); ``step`` is added.
      keep: how many checkpoints to keep (>= 1); older ones are deleted after this one is complete.
      before_finalize: called after everything is written and fsync'ed, just before the rename (a hook
        for the crash tests).

    An existing ``step_<step>`` (a corrupt checkpoint that was skipped on resume) is renamed to
    ``step_<step>.corrupt-<pid>``, never deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    directory = os.path.abspath(directory)  # orbax takes absolute paths only
    os.makedirs(directory, exist_ok=True)
    for name in leftovers(directory):  # staging dirs of killed processes: never valid, never read
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    name = step_name(step)
    staging = os.path.join(directory, f"{STAGING_PREFIX}{name}-{os.getpid()}")
    os.makedirs(staging)
    import orbax.checkpoint as ocp

    try:
        with _quiet_orbax():
            _orbax_checkpointer().save(os.path.join(staging, ARRAYS_DIR), args=ocp.args.StandardSave(tree))
        _write_json(os.path.join(staging, META_FILE), {**meta, "step": int(step)})
        files = {}
        for rel in _files(staging):
            path = os.path.join(staging, rel)
            _fsync_file(path)
            files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        _write_json(os.path.join(staging, MANIFEST_FILE),
                    {"format": FORMAT_VERSION, "step": int(step), "files": files})
        for dirpath, _, _ in os.walk(staging):
            _fsync_dir(dirpath)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {name} in {directory}: {_one_line(e)}") from e
    if before_finalize is not None:
        before_finalize()
    final = os.path.join(directory, name)
    if os.path.exists(final):
        os.rename(final, f"{final}.corrupt-{os.getpid()}")
    os.rename(staging, final)
    _fsync_dir(directory)
    for old in list_steps(directory)[:-keep]:
        _remove(directory, step_name(old))
    return final


# ------------------------------------------------------------------------------------------------
# Verifying and restoring.


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    return obj


def verify(path: str) -> dict:
    """Check the checkpoint directory ``path`` against its manifest; its ``meta.json`` record.

    Raises:
      CheckpointError: a missing or unreadable manifest, another format version, a listed file that is
        missing, of another size (truncated) or of another SHA-256 (modified), or a ``meta.json`` whose
        step is not the directory's. The message is the reason, without the path.
    """
    if not os.path.isdir(path):
        raise CheckpointError("not a directory")
    manifest = _read_json(os.path.join(path, MANIFEST_FILE), MANIFEST_FILE)
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{MANIFEST_FILE} has format {manifest.get('format')!r}; this version of "
                              f"rate_tuning reads format {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or META_FILE not in files:
        raise CheckpointError(f"{MANIFEST_FILE} lists no files")
    for rel, entry in sorted(files.items()):
        full = os.path.join(path, *rel.split("/"))
        try:
            size = os.path.getsize(full)
        except OSError:
            raise CheckpointError(f"file {rel} is missing") from None
        if not isinstance(entry, dict) or size != entry.get("size"):
            raise CheckpointError(f"file {rel} is truncated or resized ({size} bytes, the manifest says "
                                  f"{entry.get('size') if isinstance(entry, dict) else '?'})")
        if _sha256(full) != entry.get("sha256"):
            raise CheckpointError(f"file {rel} is corrupt (its SHA-256 differs from the manifest's)")
    meta = _read_json(os.path.join(path, META_FILE), META_FILE)
    m = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    if m and meta.get("step") != int(m.group(1)):
        raise CheckpointError(f"{META_FILE} says step {meta.get('step')!r}, the directory step {int(m.group(1))}")
    return meta


def latest_valid(directory: str, warn: Callable[[str], None] | None = None) -> Found:
    """The newest checkpoint in ``directory`` that passes :func:`verify`.

    Each newer checkpoint that fails is reported through ``warn`` (default: one line on stderr) with its
    name and the reason, e.g. ``checkpoint step_00000040 is corrupt (file state/d/8a1f... is truncated or
    resized (100 bytes, the manifest says 428)); falling back to step_00000030``.

    Raises:
      CheckpointError: no checkpoint at all, or none valid (the message names each and its reason).
    """
    warn = warn or _stderr_warning
    steps = list_steps(directory)
    if not steps:
        extra = leftovers(directory)
        hint = f" (only the incomplete save {extra[0]}, ignored)" if extra else ""
        raise CheckpointError(f"no checkpoint in {directory}{hint}")
    failures = []
    for step in reversed(steps):
        path = os.path.join(directory, step_name(step))
        try:
            meta = verify(path)
        except CheckpointError as e:
            failures.append(f"{step_name(step)}: {e}")
            continue
        for failure in failures:
            name, reason = failure.split(": ", 1)
            warn(f"checkpoint {name} is corrupt ({reason}); falling back to {step_name(step)}")
        return Found(step, path, meta)
    raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(failures))


def restore(path: str, target=None):
    """The arrays of the checkpoint ``path`` (verified first), with the structure and dtypes of ``target``.

    Without ``target``: the saved structure as nested dicts and lists (named tuples become dicts), the
    saved dtypes (enable x64 to get float64 arrays back as float64).

    Raises:
      CheckpointError: the checkpoint fails :func:`verify`, or its arrays do not fit ``target`` (another
        model), naming the checkpoint.
    """
    path = os.path.abspath(path)  # orbax takes absolute paths only
    name = os.path.basename(path)
    try:
        verify(path)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {name} is corrupt ({e})") from None
    import orbax.checkpoint as ocp

    try:
        with _quiet_orbax():
            return _orbax_checkpointer().restore(os.path.join(path, ARRAYS_DIR),
                                                 args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax/tensorstore raise ValueError, KeyError, TypeError...: say which, no traceback
        raise CheckpointError(f"checkpoint {name} cannot be restored into this model's state: {_one_line(e)}") from None


def _stderr_warning(message: str) -> None:
    print(f"rate-tuning: warning: {message}", file=sys.stderr, flush=True)


__all__ = ["CheckpointError", "CheckpointWriteError", "FORMAT_VERSION", "Found", "latest_valid", "leftovers", "list_steps", "restore",
           "save", "step_name", "verify"]
