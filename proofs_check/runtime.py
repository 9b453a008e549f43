"""How ``python -m proofs_check`` spends its time: the persistent compilation cache, compile/run timing, progress.

* :func:`compilation_cache` points JAX's persistent compilation cache at a directory for the duration of a
  run (default :func:`default_cache_dir`: ``$XDG_CACHE_HOME/rate_tuning/jax``, else
  ``~/.cache/rate_tuning/jax``) and restores the previous settings afterwards. Every program is cached
  (no minimum compile time or size): the report compiles ~300 small programs, most under the 1 s that JAX
  keeps by default, and together they are most of a cold run. A cache hit returns the executable that was
  compiled, so the numbers are the same bits.
* :class:`CompileClock` sums JAX's own compilation events (``jax.monitoring``: tracing to a jaxpr,
  lowering to StableHLO, XLA compilation or the cache read that replaces it) while it is active, so a
  claim's wall time splits into *compile* (those three) and *run* (the rest: execution, Python, host work).
* :class:`Progress` prints one line when a claim starts (to stderr: position, elapsed time, an estimate of
  what is left from the previous report in the same directory, else from the mean so far), and a tqdm bar
  of the records made inside a claim when stderr is a terminal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping, TextIO

import jax
from jax import monitoring

from proofs_check import evidence as E

__all__ = ["default_cache_dir", "compilation_cache", "CompileClock", "ClaimTime", "Progress", "COMPILE_EVENTS"]

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"
COMPILE_EVENTS = (TRACE_EVENT, LOWER_EVENT, BACKEND_EVENT)
"""The ``jax.monitoring`` duration events counted as compile time (tracing, lowering, XLA compile or cache read)."""

_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rate_tuning/jax`` when ``XDG_CACHE_HOME`` is set (and absolute), else
    ``~/.cache/rate_tuning/jax``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "rate_tuning" / "jax"


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike | None) -> Iterator[Path | None]:
    """JAX's persistent compilation cache in ``path`` inside the block (None: the cache off), every program
    cached; the previous settings are restored on exit (the cache object is reset both ways, so the change
    takes effect in a process that has compiled before)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    if path is None:
        new = {"jax_enable_compilation_cache": False}
    else:
        path = Path(path).expanduser().absolute()  # created by JAX at its first write
        new = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": 0, "jax_enable_compilation_cache": True}
    try:
        for name, value in new.items():
            jax.config.update(name, value)
        cc.reset_cache()
        yield path
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        cc.reset_cache()


# ---------------------------------------------------------------------------------------------------------
# compile time
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClaimTime:
    """Where one claim's wall time went.

    Attributes:
      wall: seconds from start to end.
      trace, lower, compile: seconds tracing to jaxprs, lowering, and in XLA compilation (or the cache read
        that replaced it).
      programs: XLA compilations requested; cache_hits: of them, read from the persistent cache.
      cpu: process CPU seconds (both cores count).
    """

    wall: float = 0.0
    trace: float = 0.0
    lower: float = 0.0
    compile: float = 0.0
    programs: int = 0
    cache_hits: int = 0
    cpu: float = 0.0

    @property
    def compile_total(self) -> float:
        """Tracing + lowering + compilation."""
        return self.trace + self.lower + self.compile

    @property
    def run(self) -> float:
        """Wall time not spent compiling (execution, Python, host work)."""
        return max(self.wall - self.compile_total, 0.0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "compile_total": self.compile_total, "run": self.run}


_ACTIVE: list[ClaimTime] = []
_LOCK = threading.Lock()
_REGISTERED = False


def _on_duration(event: str, duration: float, **_) -> None:
    if not _ACTIVE:
        return
    with _LOCK:
        for t in _ACTIVE:
            if event == TRACE_EVENT:
                t.trace += duration
            elif event == LOWER_EVENT:
                t.lower += duration
            elif event == BACKEND_EVENT:
                t.compile += duration
                t.programs += 1
            elif event == CACHE_HIT_EVENT:
                t.cache_hits += 1


class CompileClock:
    """Context manager timing a block: wall and CPU time, and JAX's compile events inside it.

    Example::

        with CompileClock() as t:
            claims.run(claim)
        t.compile_total, t.run, t.programs, t.cache_hits
    """

    def __init__(self):
        global _REGISTERED
        with _LOCK:
            if not _REGISTERED:  # one listener per process; it only counts while a clock is active
                monitoring.register_event_duration_secs_listener(_on_duration)
                _REGISTERED = True
        self.time = ClaimTime()

    def __enter__(self) -> ClaimTime:
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        with _LOCK:
            _ACTIVE.append(self.time)
        return self.time

    def __exit__(self, *exc) -> None:
        with _LOCK:
            _ACTIVE.remove(self.time)
        self.time.wall = time.perf_counter() - self._t0
        self.time.cpu = time.process_time() - self._c0


# ---------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Progress:
    """Start lines and an in-claim bar for a sequence of claims.

    Args:
      ids: the claims, in run order.
      previous: ``{claim id: (seconds, records)}`` of an earlier run with the same settings (e.g. the
        report already in the output directory), for the estimates; may be empty.
      stream: where the start lines and the bar go (default ``sys.stderr``).
      bar: show a tqdm bar of the records inside each claim; default: when ``stream`` is a terminal.
    """

    def __init__(self, ids, previous: Mapping[str, tuple[float, int]] | None = None, stream: TextIO | None = None,
                 bar: bool | None = None):
        self.ids = list(ids)
        self.previous = dict(previous or {})
        self.stream = sys.stderr if stream is None else stream
        self.bar = bool(getattr(self.stream, "isatty", lambda: False)()) if bar is None else bool(bar)
        self.start = time.perf_counter()
        self.done: dict[str, float] = {}
        self.records = 0  # records made so far in the current claim (counted when the bar is shown)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float | None:
        """Estimated seconds left for the claims not done: their previous times where known, else the mean
        so far (None before anything is known)."""
        todo = [c for c in self.ids if c not in self.done]
        known = [self.previous[c][0] for c in todo if c in self.previous]
        unknown = len(todo) - len(known)
        if not self.done:
            return sum(known) if not unknown else None
        mean = (sum(self.done.values()) / len(self.done)) if self.done else 0.0
        if self.previous:  # scale the previous run's times by how this run compares so far
            prev_done = sum(self.previous[c][0] for c in self.done if c in self.previous)
            now_done = sum(s for c, s in self.done.items() if c in self.previous)
            ratio = now_done / prev_done if prev_done > 0 else 1.0
            return sum(known) * ratio + unknown * mean
        return unknown * mean

    def _status(self) -> str:
        left = self.left()
        return f"{_fmt_s(self.elapsed())} elapsed" + (f", ~{_fmt_s(left)} left" if left is not None else "")

    @contextlib.contextmanager
    def claim(self, cid: str) -> Iterator[None]:
        """Print the start line of ``cid``, show the records bar while the block runs, record its time."""
        i = self.ids.index(cid) + 1 if cid in self.ids else len(self.done) + 1
        print(f"[{i}/{len(self.ids)}] {cid} started; {self._status()}", file=self.stream, flush=True)
        t0 = time.perf_counter()
        self.records = 0
        pbar = None
        if self.bar:
            from tqdm import tqdm

            total = self.previous.get(cid, (None, None))[1]
            pbar = tqdm(total=total or None, desc=cid, unit=" records", file=self.stream, leave=False,
                        dynamic_ncols=True)
        try:
            if pbar is None:
                yield
            else:
                def count(_):
                    self.records += 1
                    pbar.update(1)

                with E.observe(count):
                    yield
        finally:
            if pbar is not None:
                pbar.close()
            self.done[cid] = time.perf_counter() - t0

    def status(self) -> str:
        """``'<elapsed> elapsed, ~<left> left'`` after the claims done so far."""
        return self._status()
