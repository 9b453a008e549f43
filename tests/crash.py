"""Crash injection for the resume tests, patched in at run time: the library reads no hook of its own.

``install(kill_at)`` wraps library functions so that the process dies at ``kill_at = '<phase>:<step>'``:

* ``step``: right after the update of step ``t`` (the new state has ``step == t + 1``);
* ``metrics``: half-way through writing the train record of step ``t`` (half of its line reaches the file);
* ``checkpoint``: checkpoint ``t`` fully written and fsync'ed, not yet sealed (``checkpoint.seal``);
* ``prune``: checkpoint ``t`` sealed, older ones not yet pruned (``checkpoint.prune``).

In a subprocess (``python -m tests.crash PHASE:STEP train --config ...``) the death is a SIGKILL; in-process
tests pass ``die`` (e.g. raising ``KeyboardInterrupt``) and a ``setattr`` that undoes itself
(``monkeypatch.setattr``).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from rate_tuning import checkpoint, cli, jsonio, rundir, steps

PHASES = ("step", "metrics", "checkpoint", "prune")


def sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill_at: str, *, setattr: Callable = setattr, die: Callable[[], None] = sigkill) -> None:
    """Patch the library so that the process calls ``die()`` at ``kill_at`` (module docstring)."""
    phase, _, step = kill_at.partition(":")
    if phase not in PHASES or not step.isdigit():
        raise ValueError(f"kill_at must be PHASE:STEP with PHASE in {PHASES}, got {kill_at!r}")
    t = int(step)
    if phase == "step":
        make = steps.make_train_step

        def make_train_step(*args, **kwargs):
            inner = make(*args, **kwargs)
            if not kwargs.get("jit", True):  # traced inside another jit: no concrete step to look at
                return inner

            def train_step(state, x, y):
                new_state, out = inner(state, x, y)
                if int(new_state.step) == t + 1:
                    die()
                return new_state, out

            return train_step

        setattr(steps, "make_train_step", make_train_step)
    elif phase == "metrics":
        write = rundir.MetricsWriter.write

        def write_half(self, record):
            if record.get("split") == "train" and record.get("step") == t:
                line = jsonio.dumps(record) + "\n"
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line[:len(line) // 2])
                die()
            return write(self, record)

        setattr(rundir.MetricsWriter, "write", write_half)
    elif phase == "checkpoint":
        seal = checkpoint.seal

        def seal_or_die(staging, step_, *args, **kwargs):
            if step_ == t:
                die()
            return seal(staging, step_, *args, **kwargs)

        setattr(checkpoint, "seal", seal_or_die)
    else:
        prune = checkpoint.prune

        def prune_or_die(directory, keep, *args, newest, **kwargs):
            if newest == t:
                die()
            return prune(directory, keep, *args, newest=newest, **kwargs)

        setattr(checkpoint, "prune", prune_or_die)


def main(argv: list[str]) -> int:
    """``python -m tests.crash PHASE:STEP <rate-tuning arguments>``: the CLI, dying at ``PHASE:STEP``."""
    install(argv[0])
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
