"""Checkpoints of a training run on orbax's ``CheckpointManager``: atomic saves, a SHA-256 manifest, safe
pruning, and restore past corrupt or unusable checkpoints.

One checkpoint is one directory ``<directory>/step_<8 digits>/`` holding

* ``state/``: the arrays (orbax ``StandardSave``);
* ``meta.json``: a JSON record chosen by the caller (config, data position, versions...) with its
  ``"step"``;
* ``_CHECKPOINT_METADATA``, ``commit_success.txt``: orbax's own records of the save;
* ``MANIFEST.json``: the format version, the step, and the size and SHA-256 of every other file, except
  orbax's ``_CHECKPOINT_METADATA`` and ``commit_success.txt`` (orbax writes them as it commits).

Guarantees:

* **Atomic.** orbax (synchronous ``CheckpointManager``) writes into the staging directory
  ``step_<8 digits>.orbax-checkpoint-tmp-<host>-<pid>``; ``meta.json`` is added, every file fsync'ed,
  :func:`seal` writes the manifest, and orbax renames the staging directory to ``step_<8 digits>``
  (atomic on POSIX). A process killed before the rename leaves only its staging directory, never read.
* **Staging belongs to its owner.** A save removes its own staging and deletion directories, and those of
  processes of this host that no longer exist (:func:`leftovers`); never those of a live process.
* **Safe pruning.** :func:`prune` counts only the checkpoints that pass :func:`verify`, up to the new step;
  it keeps the newest ``keep`` (orbax's ``LatestN`` policy) and deletes older ones (renamed ``.del-...``
  first, so a kill never leaves half a ``step_*``). A ``step_*`` that fails :func:`verify` is renamed
  ``step_<8 digits>.corrupt-<pid>`` (set aside, never deleted) and counts for nothing.
* **Verified.** Nothing is handed to orbax before the manifest checks out: every listed file present, of
  the listed size and SHA-256; JSON is read within limits of size and depth (:mod:`rate_tuning.jsonio`).
  :func:`latest_valid` and :func:`restore_latest` walk from the newest checkpoint down and report each
  one skipped through ``warn``, in one line.
* **One-line errors.** :class:`CheckpointError` (unusable checkpoint) and :class:`CheckpointWriteError`
  (save failed; its staging removed, earlier checkpoints untouched); orbax's logs are silenced while it
  runs. With several JAX processes, process 0 alone saves, and orbax waits for no other process.

Crash-test seams: :func:`save` calls :func:`seal` (all written and fsync'ed, before the rename) and
:func:`prune` (after it) through this module's namespace: a test wraps either to crash the save there.

Example::

    path = checkpoint.save("runs/a/checkpoints", 100, {"params": params, "step": np.asarray(100)},
                           {"step": 100}, keep=3)
    found = checkpoint.latest_valid("runs/a/checkpoints")      # CheckpointError if none is valid
    tree = checkpoint.restore(found.path, target)              # target: a tree of the same structure
    found, tree = checkpoint.restore_latest("runs/a/checkpoints", target)  # skips those that do not fit
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import datetime
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable
from typing import Any

from rate_tuning import jsonio

FORMAT_VERSION = 1
"""Version of the checkpoint layout; a checkpoint with another version is refused."""

MANIFEST_FILE = "MANIFEST.json"
ARRAYS_DIR = "state"
META_FILE = "meta.json"
STEP_PREFIX = "step_"

ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax.checkpoint.path.atomicity.TMP_DIR_SUFFIX
DELETING_PREFIX = ".del-"
LEGACY_STAGING_PREFIX = ".tmp-"  # staging directories of the earlier, hand-written save
_ORBAX_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")  # rewritten/written by orbax at commit
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_OWNED_RE = re.compile(r"^(?:step_\d{8,}" + re.escape(ORBAX_TMP) + r"|\.del-step_\d{8,})-(?P<host>.+)-(?P<pid>\d+)$")
_LEGACY_RE = re.compile(r"^\.(?:tmp|del)-step_\d{8,}-(?P<pid>\d+)$")  # the earlier save's: this host's
_CHUNK = 1 << 20


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, permissions...); its staging directory was removed and the
    earlier checkpoints are untouched."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, modified, of another model); one line."""

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
    """The steps of the checkpoint directories in ``directory`` (renamed into place by orbax: not staging,
    not verified), ascending."""
    return sorted(m.step for m in _name_format().find_all(os.path.abspath(directory)))


def leftovers(directory: str) -> list[str]:
    """Names of staging (``step_*.orbax-checkpoint-tmp-*``, and the earlier ``.tmp-*``) and half-deleted
    (``.del-*``) directories: saves or deletions in progress, or traces of a killed process."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if ORBAX_TMP in n or n.startswith((LEGACY_STAGING_PREFIX, DELETING_PREFIX)))


# ------------------------------------------------------------------------------------------------
# Files, owners, orbax.


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    """Relative paths of the regular files under ``root`` that the manifest lists, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != MANIFEST_FILE and rel not in _ORBAX_COMMIT_FILES:
                out.append(rel)
    return sorted(out)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse to fsync a directory
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def _host() -> str:  # as it appears in staging names
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"


def _owner_tag() -> str:
    """``<host>-<pid>``: who owns a staging or deletion directory."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _stale(name: str) -> bool:
    """Whether the leftover ``name`` is this process's or was left by a process of this host that is gone.
    Directories of unknown owners (orbax's own staging names) or of other hosts are never stale."""
    m = _OWNED_RE.match(name)
    if m and m.group("host") != _host():
        return False
    m = m or _LEGACY_RE.match(name)
    if not m:
        return False
    pid = int(m.group("pid"))
    return pid == os.getpid() or (pid > 0 and not _alive(pid))


def _remove(directory: str, name: str) -> None:
    """Delete ``directory/name``: renamed to ``.del-<name>-<host>-<pid>`` first, so a kill never leaves half
    of a checkpoint under its name."""
    dst = os.path.join(directory, f"{DELETING_PREFIX}{name}-{_owner_tag()}")
    shutil.rmtree(dst, ignore_errors=True)  # ours, from an earlier failed deletion
    os.rename(os.path.join(directory, name), dst)
    shutil.rmtree(dst, ignore_errors=True)


def _set_aside(directory: str, name: str, kind: str = "corrupt") -> str | None:
    """Rename ``directory/name`` to ``<name>.<kind>-<pid>[.n]`` (kept, never deleted); the new path, or None
    if it vanished meanwhile."""
    base = os.path.join(directory, f"{name}.{kind}-{os.getpid()}")
    dst, n = base, 0
    while os.path.lexists(dst):
        n += 1
        dst = f"{base}.{n}"
    try:
        os.rename(os.path.join(directory, name), dst)
    except FileNotFoundError:
        return None
    return dst


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs the tracebacks of failures in its worker threads on the ``absl`` logger, and on a full
    disk tensorstore's callbacks into a closed asyncio loop print tracebacks straight to file descriptor 2;
    we report the failure ourselves, in one line, so both are silenced while orbax runs (the loggers, and
    descriptor 2 pointed at /dev/null)."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _one_line(e: BaseException) -> str:
    text = str(e)
    if "No space left on device" in text or getattr(e, "errno", None) == errno.ENOSPC:  # tensorstore's too
        return "No space left on device"
    first = (text.strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _multiprocessing_options():
    """orbax's options for this process alone: with several JAX processes (multi-host runs save from
    process 0 only), orbax is told that no other process takes part, so it waits at no cross-process
    barrier."""
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                              barrier_sync_key_prefix=f"rate_tuning_{me}")


@functools.cache
def _staging_class():
    """orbax's atomic-rename staging path with two changes for a step directory (items inside it are
    unchanged): the staging name carries its owner, ``<host>-<pid>`` (orbax's own name is the same in every
    process, and orbax deletes an existing one before a save); and just before orbax renames it into place,
    ``meta.json`` is added, every file fsync'ed and the directory sealed (:func:`seal`)."""
    from orbax.checkpoint.path import atomicity

    assert atomicity.TMP_DIR_SUFFIX == ORBAX_TMP, atomicity.TMP_DIR_SUFFIX

    class OwnedStaging(atomicity.AtomicRenameTemporaryPath):
        @classmethod
        def from_final(cls, final_path, **kwargs):
            if not _STEP_RE.match(final_path.name):
                return super().from_final(final_path, **kwargs)
            return cls(final_path.parent / f"{final_path.name}{ORBAX_TMP}-{_owner_tag()}", final_path, **kwargs)

        async def finalize(self):
            pending = _pending.get(os.fspath(self.get_final())) if _STEP_RE.match(self.get_final().name) else None
            if pending is not None:
                staging = os.fspath(self.get())
                jsonio.write_atomic(os.path.join(staging, META_FILE), pending, indent=1)
                _fsync_tree(staging)
                seal(staging, pending["step"])  # through the module namespace: a crash-test seam
            await super().finalize()

    return OwnedStaging


def _name_format():
    import orbax.checkpoint as ocp

    return ocp.path.step.standard_name_format(step_prefix=STEP_PREFIX.rstrip("_"), step_format_fixed_length=8,
                                              temporary_path_cls=_staging_class())


def _manager(directory: str):
    """orbax's ``CheckpointManager`` for ``directory``: synchronous, ``step_<8 digits>`` names, keeps every
    checkpoint (:func:`prune` deletes), creates no directory (:func:`save` does; orbax refuses to with
    ``active_processes``), removes no staging directory (:func:`save` removes stale ones), writes no root
    metadata or metrics."""
    import orbax.checkpoint as ocp

    mp = _multiprocessing_options()
    arrays = ocp.handlers.StandardCheckpointHandler(multiprocessing_options=mp)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(ARRAYS_DIR, ocp.args.StandardSave, arrays)
    registry.add(ARRAYS_DIR, ocp.args.StandardRestore, arrays)
    options = ocp.CheckpointManagerOptions(
        step_name_format=_name_format(), create=False, enable_async_checkpointing=False,
        cleanup_tmp_directories=False, save_root_metadata=False, prevent_write_metrics=True,
        lightweight_initialize=True, multiprocessing_options=mp, temporary_path_class=_staging_class())
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


# ------------------------------------------------------------------------------------------------
# Saving.

_pending: dict[str, dict] = {}  # final path -> the meta.json record its staging directory gets


def save(directory: str, step: int, tree, meta: dict, *, keep: int) -> str:
    """Write the checkpoint of ``step`` atomically, then :func:`prune` to the newest ``keep``; its path.

    Args:
      directory: where the checkpoints live (created if missing).
      step: the step number (the directory name; also ``meta['step']``).
      tree: a pytree of arrays (jax or numpy, no Python scalars), saved by orbax.
      meta: a JSON-serialisable dict (non-finite numbers become null, :mod:`rate_tuning.jsonio`); ``step``
        is added.
      keep: how many verified checkpoints to keep (>= 1), this one included.

    With several JAX processes, call it in process 0 alone (the others raise ``ValueError``): orbax writes
    numpy arrays from process 0 only, and is told that no other process takes part.

    Stale staging directories (this process's, or of processes of this host that are gone) are removed
    first. An existing ``step_<step>`` (a corrupt checkpoint skipped on resume) is renamed
    ``step_<step>.corrupt-<pid>`` (``.replaced-<pid>`` if it verifies), never deleted.

    Raises:
      CheckpointWriteError: the checkpoint could not be written (one line); its staging directory is
        removed and the earlier checkpoints are untouched.
    """
    import jax
    import orbax.checkpoint as ocp

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    if jax.process_index() != 0:
        raise ValueError(f"checkpoints are saved by JAX process 0 only (orbax writes numpy arrays from process "
                         f"0 alone); this is process {jax.process_index()} of {jax.process_count()}")
    directory = os.path.abspath(directory)  # orbax takes absolute paths only
    name = step_name(step)
    final = os.path.join(directory, name)
    staging = os.path.join(directory, f"{name}{ORBAX_TMP}-{_owner_tag()}")
    try:
        record = jsonio.to_json_value({**meta, "step": int(step)})
        os.makedirs(directory, exist_ok=True)
        for stale in filter(_stale, leftovers(directory)):
            shutil.rmtree(os.path.join(directory, stale), ignore_errors=True)
        if os.path.lexists(final):
            try:
                verify(final)
                _set_aside(directory, name, "replaced")
            except CheckpointError:
                _set_aside(directory, name)
        _pending[final] = record
        with _quiet_orbax(), _manager(directory) as manager:
            manager.save(int(step), force=True, args=ocp.args.Composite(**{ARRAYS_DIR: ocp.args.StandardSave(tree)}))
        if not os.path.isdir(final):
            raise OSError(f"orbax did not create {name}")
        _fsync(directory)
    except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise ValueError, OSError...: one line, no traceback
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {name} in {directory}: {_one_line(e)}") from None
    finally:
        _pending.pop(final, None)
    try:
        prune(directory, keep, newest=int(step))  # through the module namespace: a crash-test seam
    except OSError as e:
        raise CheckpointWriteError(f"checkpoint {name} is written, but pruning {directory} failed: "
                                   f"{_one_line(e)}") from None
    return final


def seal(staging: str, step: int) -> None:
    """Crash-test seam: write the manifest (fsync'ed) of the complete, fsync'ed staging directory of
    ``step``. Called by :func:`save` just before orbax renames ``staging`` to ``step_<8 digits>``: the
    checkpoint counts from that rename on, so a process killed before or during ``seal`` leaves only a
    staging directory."""
    files = {}
    for rel in _files(staging):
        path = os.path.join(staging, *rel.split("/"))
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    jsonio.write_atomic(os.path.join(staging, MANIFEST_FILE), {"format": FORMAT_VERSION, "step": int(step),
                                                               "files": files}, indent=1)
    _fsync(staging)


def prune(directory: str, keep: int, *, newest: int) -> list[int]:
    """Crash-test seam: delete the checkpoints beyond the newest ``keep`` verified ones; the steps deleted.

    Called by :func:`save` once the checkpoint of step ``newest`` is in place. Only checkpoints that pass
    :func:`verify` with a step up to ``newest`` count; orbax's ``LatestN(keep)`` preservation policy picks
    the ones to keep, and the newest valid one is always kept. A ``step_*`` directory that fails
    :func:`verify` (not a checkpoint, corrupt) is renamed ``step_<8 digits>.corrupt-<pid>`` and kept; a
    valid one of a later step (another history) is left alone.
    """
    from orbax.checkpoint import checkpoint_managers
    from orbax.checkpoint.checkpoint_manager import CheckpointInfo

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    valid = []
    for step in list_steps(directory):
        name = step_name(step)
        try:
            verify(os.path.join(directory, name))
        except CheckpointError:
            _set_aside(directory, name)
            continue
        if step <= newest:
            valid.append(step)
    if not valid:
        return []
    infos = [CheckpointInfo(step=step, time=datetime.datetime.min, metrics=None) for step in valid]
    preserve = checkpoint_managers.LatestN(n=keep).should_preserve(
        infos, context=checkpoint_managers.PreservationContext())
    doomed = [info.step for info, kept in zip(infos, preserve) if not kept and info.step != valid[-1]]
    for step in doomed:
        _remove(directory, step_name(step))
    return doomed


# ------------------------------------------------------------------------------------------------
# Verifying and restoring.


def _read_json(path: str, what: str) -> dict:
    """The JSON object in ``path`` (read by :func:`rate_tuning.jsonio.load`: at most 16 MiB and 64 levels
    deep); :class:`CheckpointError` naming ``what`` if it is missing, unreadable or not an object."""
    try:
        obj = jsonio.load(path, what="it")
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{what} is unreadable ({_one_line(e)})") from None
    except jsonio.JSONInputError as e:
        raise CheckpointError(f"{what} is unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    return obj


def verify(path: str) -> dict:
    """Check the checkpoint directory ``path`` against its manifest; its ``meta.json`` record.

    Raises:
      CheckpointError: a missing or unreadable manifest, another format version, a listed file that is
        missing, of another size (truncated) or of another SHA-256 (modified), or a manifest or
        ``meta.json`` whose step is not the directory's. The message is the reason, without the path.
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
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(f"{MANIFEST_FILE} lists a path outside the checkpoint ({rel[:100]!r})")
        full = os.path.join(path, *parts)
        try:
            size = os.path.getsize(full)
        except OSError:
            raise CheckpointError(f"file {rel} is missing") from None
        if not isinstance(entry, dict) or size != entry.get("size"):
            raise CheckpointError(f"file {rel} is truncated or resized ({size} bytes, the manifest says "
                                  f"{entry.get('size') if isinstance(entry, dict) else '?'})")
        if _sha256(full) != entry.get("sha256"):
            raise CheckpointError(f"file {rel} is corrupt (its SHA-256 differs from the manifest's)")
    meta = _read_json(os.path.join(path, *META_FILE.split("/")), META_FILE)
    m = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    if m:
        step = int(m.group(1))
        for what, said in ((MANIFEST_FILE, manifest.get("step")), (META_FILE, meta.get("step"))):
            if said != step:
                raise CheckpointError(f"{what} says step {said!r}, the directory step {step}")
    return meta


def _restore_arrays(path: str, target):
    """The arrays of the (verified) checkpoint ``path``; :class:`CheckpointError` with orbax's reason."""
    import orbax.checkpoint as ocp

    try:
        with _quiet_orbax():
            checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(),
                                            multiprocessing_options=_multiprocessing_options())
            return checkpointer.restore(os.path.join(os.path.abspath(path), ARRAYS_DIR),
                                        args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise ValueError, KeyError...: one line
        raise CheckpointError(_one_line(e)) from None


def _walk(directory: str, warn: Callable[[str], None] | None, load) -> tuple[Found, Any]:
    """The newest checkpoint that verifies and that ``load(path)`` accepts, and what it returned."""
    warn = warn or _stderr_warning
    steps = list_steps(directory)
    if not steps:
        extra = leftovers(directory)
        hint = f" (only the incomplete save {extra[0]}, ignored)" if extra else ""
        raise CheckpointError(f"no checkpoint in {directory}{hint}")
    failures: list[tuple[str, str, str]] = []  # name, what for the warning, reason
    for step in reversed(steps):
        name = step_name(step)
        path = os.path.join(directory, name)
        try:
            meta = verify(path)
        except CheckpointError as e:
            failures.append((name, f"is corrupt ({e})", str(e)))
            continue
        try:
            loaded = load(path)
        except CheckpointError as e:
            reason = f"cannot be restored into this model's state ({e})"
            failures.append((name, reason, reason))
            continue
        for failed, what, _ in failures:
            warn(f"checkpoint {failed} {what}; falling back to {name}")
        return Found(step, path, meta), loaded
    raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(f"{n}: {r}" for n, _, r in failures))


def latest_valid(directory: str, warn: Callable[[str], None] | None = None) -> Found:
    """The newest checkpoint in ``directory`` that passes :func:`verify`.

    Each newer checkpoint that fails is reported through ``warn`` (default: one line on stderr) with its
    name and the reason, e.g. ``checkpoint step_00000040 is corrupt (file state/d/8a1f... is truncated or
    resized (100 bytes, the manifest says 428)); falling back to step_00000030``.

    Raises:
      CheckpointError: no checkpoint at all, or none valid (the message names each and its reason).
    """
    return _walk(directory, warn, lambda path: None)[0]


def restore_latest(directory: str, target, warn: Callable[[str], None] | None = None) -> tuple[Found, Any]:
    """The newest checkpoint in ``directory`` that passes :func:`verify` and that orbax restores into the
    structure of ``target``, and its arrays.

    Each newer checkpoint skipped is reported through ``warn`` (one line), e.g. ``checkpoint step_00000040
    cannot be restored into this model's state (ValueError: ...); falling back to step_00000030``.

    Raises:
      CheckpointError: no checkpoint, or none that verifies and restores (naming each and its reason).
    """
    return _walk(directory, warn, lambda path: _restore_arrays(path, target))


def restore(path: str, target=None):
    """The arrays of the checkpoint ``path`` (verified first), with the structure and dtypes of ``target``.

    Without ``target``: the saved structure as nested dicts and lists (named tuples become dicts), the
    saved dtypes (enable x64 to get float64 arrays back as float64).

    Raises:
      CheckpointError: the checkpoint fails :func:`verify`, or its arrays do not fit ``target`` (another
        model), naming the checkpoint.
    """
    name = os.path.basename(os.path.normpath(path))
    try:
        verify(path)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {name} is corrupt ({e})") from None
    try:
        return _restore_arrays(path, target)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {name} cannot be restored into this model's state: {e}") from None


def _stderr_warning(message: str) -> None:
    print(f"rate-tuning: warning: {message}", file=sys.stderr, flush=True)


__all__ = ["FORMAT_VERSION", "MANIFEST_FILE", "META_FILE", "CheckpointError", "CheckpointWriteError", "Found",
           "latest_valid", "leftovers", "list_steps", "prune", "restore", "restore_latest", "save", "seal",
           "step_name", "verify"]
