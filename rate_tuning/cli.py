"""The ``rate-tuning`` command: a thin layer over :mod:`rate_tuning.configs` and :mod:`rate_tuning.train`.

Usage::

    rate-tuning train --config digits                      # runs/digits-<timestamp>/
    rate-tuning train --config digits lr_w=100 --workdir runs/big-lr
    rate-tuning train --config fashion_mnist data_kwargs.path=/data/fmnist arch_kwargs.widths=128,128
    rate-tuning train --config digits lr_w=100 --workdir runs/big-lr --resume   # continue a killed run
    rate-tuning train --config digits --devices 2          # data-parallel over 2 devices
    rate-tuning train --config digits --workdir runs/mh --coordinator 10.0.0.1:1234 --num-processes 2 \
        --process-id 0                                     # on host 0 (and --process-id 1 on host 1)
    rate-tuning configs                                    # the configs, one line each
    rate-tuning audit examples/audit_models.py:nnx_batchnorm   # scale-invariant groups of any flax model

Overrides are ``key=value`` (syntax: :mod:`rate_tuning.configs`). Errors are one line
``rate-tuning: error: <message>`` on stderr, never a traceback. Exit status:

* 0: done.
* 1: an operating-system error while running (disk full, permission denied...).
* 2: bad input, found before anything is written: an unknown config or key, an unparsable or invalid
  value, a missing or corrupt dataset file, labels that do not fit the model, a workdir that already holds
  a run (without ``--resume``), and for ``--resume`` a missing, corrupt or mismatched checkpoint or a
  corrupt ``metrics.jsonl``. Nothing already saved is changed.
* 3: the run diverged (a non-finite loss, gradient or parameter): the message names the step and the
  parameter groups; the metrics up to that step and the checkpoints before it are kept.
* 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM, at any moment: one line, saying whether there is
  something to continue with ``--resume``. The process ends at once (no Python clean-up, where a signal
  in XLA's threads could crash it); what was saved is complete (checkpoints are atomic, metrics lines are
  flushed one by one, and the run directory's lock dies with the process).

Several processes (multi-host, ``jax.distributed``): start the same command in every process, with
``--coordinator`` (process 0's ``host:port``), ``--num-processes`` and each its own ``--process-id``. The
step runs data-parallel over all devices of all processes (each process places its own slice of the global
batch). Only process 0 reads and writes ``--workdir`` (metrics, checkpoints, summary; for ``--resume`` it
reads the checkpoint and passes it to the others); every process needs the dataset. Every process checks its
inputs, and they agree before anything is written: if one fails, each exits with status 2 and a one-line
error (``process k of n stopped: ...`` in the others). With ``--devices N`` each process has N virtual CPU
devices; on GPU each process uses the GPUs it sees (restrict them with ``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

PROG = "rate-tuning"
EXIT_OS_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (same format as every other bad input)."""

    def error(self, message):
        _fail(f"{message} (see {PROG} --help)")
        sys.exit(EXIT_BAD_INPUT)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    text = " ".join(str(message).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


class SignalPolicy:
    """The one signal policy: SIGINT and SIGTERM, at any moment, end the process at once with one line and
    exit status 130 / 143 (:func:`main` installs it first thing and restores the old handlers on return)."""

    def __init__(self):
        self.workdir: str | None = None
        self.err_fd = 2  # install() points it at a copy of stderr: fd 2 may be silenced while orbax saves
        self.old = {}
        self.write, self.exit = os.write, os._exit  # bound now: usable while the interpreter shuts down

    def install(self) -> "SignalPolicy":
        self.err_fd = os.dup(2)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.old[sig] = signal.signal(sig, self.handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if self.err_fd != 2:
            os.close(self.err_fd)
            self.err_fd = 2

    def hint(self) -> str:
        workdir = self.workdir
        if not workdir:
            return "nothing was saved"
        try:
            if os.path.exists(os.path.join(workdir, "summary.json")):
                return f"the run in {workdir} had completed"
            names = os.listdir(os.path.join(workdir, "checkpoints"))
        except OSError:
            names = []
        if any(n.startswith("step_") and n[5:].isdigit() for n in names):
            return f"continue with --resume --workdir {workdir}"
        return "nothing was saved"

    def handle(self, signum, frame) -> None:
        code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        try:
            line = f"{PROG}: {what} ({self.hint()})\n"
        except BaseException:  # noqa: BLE001 -- e.g. during interpreter shutdown: still one line
            line = f"{PROG}: {what}\n"
        try:
            self.write(self.err_fd, line.encode("utf-8", "backslashreplace"))
        finally:
            self.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train BatchNorm networks with the two-rate (S)GD of Arora, "
                                            "Li & Lyu (ICLR 2019) and record the auto-tuned effective rates.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one config",
                           description="Train a config; writes WORKDIR/metrics.jsonl, WORKDIR/checkpoints/ and "
                                       "WORKDIR/summary.json. Exit status: 0 done, 1 OS error, 2 bad input, "
                                       "3 diverged, 130 interrupted.")
    train.add_argument("--config", required=True, help="config name (see `rate-tuning configs`)")
    train.add_argument("--workdir", default=None, help="output directory (default: runs/<config>-<timestamp>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --workdir from its newest valid checkpoint (give the same "
                            "config and overrides; checkpoint_every and keep_checkpoints may change)")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.add_argument("--devices", type=int, default=None, metavar="N",
                       help="data-parallel over N devices (batch sharded, BN statistics over the global batch); "
                            "on a CPU host, N virtual devices share its cores")
    train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="several processes: process 0's address for jax.distributed (with --num-processes "
                            "and --process-id)")
    train.add_argument("--num-processes", type=int, default=None, metavar="N", help="several processes: how many")
    train.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="several processes: this one's index in [0, N); process 0 writes the workdir")
    train.add_argument("--init-timeout", type=int, default=300, metavar="S",
                       help="several processes: seconds to wait for all of them to join (default 300)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. lr_w=100 steps=2000 arch_kwargs.widths=64,64")
    sub.add_parser("configs", help="list the configs")
    audit = sub.add_parser(
        "audit", help="find the scale-invariant parameter groups of any flax model",
        description="Probe the train-mode loss of MODULE:FACTORY in float64 and print its scale-invariant groups "
                    "(single leaves, per output channel, joint groups), the almost-invariant ones and the "
                    "scale-variant leaves. MODULE is a dotted module importable from the current directory or a "
                    "path to a .py file; FACTORY() returns (model, variables, batch) for flax linen, (model, batch) "
                    "for an nnx.Module, or a dict with model, variables, batch and optionally loss(outputs, batch), "
                    "call_kwargs, frozen; batch is (inputs, targets) or inputs (rate_tuning.targets). Exit "
                    "status: 0 done (also when nothing is invariant), 1 OS error, 2 bad input.")
    audit.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. examples/audit_models.py:groupnorm_resnet")
    audit.add_argument("--frozen", default="", metavar="PATHS",
                       help="comma-separated parameter paths that are not trained (labelled 'frozen')")
    audit.add_argument("--json", default=None, metavar="FILE", help="also write the groups and the label tree here")
    audit.add_argument("--seed", type=int, default=0, help="seed of the probe points and factors (default 0)")
    audit.add_argument("--sub-batch", type=int, default=None, metavar="N",
                       help="examples per sub-batch of the gradient probes (default 8 for batches of 16 or more)")
    audit.add_argument("--almost", type=float, default=1e-3, metavar="X",
                       help="threshold of almost invariance (default 1e-3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rate-tuning``; returns the exit status (module docstring: 0, 1, 2, 3, 130 or 143).

    The signal policy and the quieted asyncio logger hold while it runs and are restored on return (so a
    caller, e.g. a test, gets its own handlers back); :func:`run`, the command, keeps them to the end."""
    signals = SignalPolicy().install()
    asyncio_logger = logging.getLogger("asyncio")  # orbax's failed writes: "Task exception was never retrieved"
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging.CRITICAL + 1)
    try:
        return _main(argv, signals)
    finally:
        asyncio_logger.setLevel(level)
        signals.restore()


def _main(argv: list[str] | None, signals: SignalPolicy) -> int:
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    if extra:  # argparse takes one run of positionals: `x=1 --workdir d y=2` leaves y=2 over
        options = [a for a in extra if a.startswith("-")]
        if options or args.command != "train":
            return _fail(f"unrecognized arguments: {' '.join(options or extra)} (see {PROG} --help)")
        args.overrides = [*args.overrides, *extra]

    from rate_tuning import configs

    if args.command == "configs":
        for name, description in configs.available().items():
            print(f"{name:16s} {description}")
        return 0
    if args.command == "audit":
        from rate_tuning import audit

        try:
            return audit.command(args.factory, frozen=args.frozen, json_path=args.json, seed=args.seed,
                                 sub_batch=args.sub_batch, almost=args.almost)
        except ValueError as e:  # AuditError: the import path, the factory, the batch, the model
            return _fail(str(e) or type(e).__name__)
        except OSError as e:
            return _fail(f"{e.strerror or e}: {getattr(e, 'filename', '')}", EXIT_OS_ERROR)

    if args.devices is not None:
        from rate_tuning import parallel

        try:  # before JAX creates a single device: --devices 100000 would allocate them all
            parallel.check_device_count(args.devices, processes=1)
        except ValueError as e:
            return _fail(f"--{e}")
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)  # before JAX's first computation
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in distributed):
        if any(v is None for v in distributed):
            return _fail("several processes need all of --coordinator, --num-processes and --process-id")
        from rate_tuning import parallel

        try:
            parallel.distributed_initialize(*distributed, initialization_timeout=args.init_timeout)
        except ValueError as e:
            return _fail(str(e))
        args.devices = None  # the mesh spans every device of every process

    from rate_tuning import steps, train

    if args.resume and not args.workdir:
        return _fail("--resume needs --workdir, the directory of the run to continue")
    if args.workdir is not None and not args.workdir.strip():
        return _fail("--workdir must be a non-empty path")
    try:
        config = configs.override(configs.get(args.config), args.overrides)
        workdir = args.workdir or os.path.join("runs", f"{args.config}-{time.strftime('%Y%m%d-%H%M%S')}")
        signals.workdir = workdir
        train.train_and_evaluate(config, workdir, verbose=not args.quiet, resume=args.resume, devices=args.devices)
    except ValueError as e:  # ConfigError, DataError, LabelError, CheckpointError and the library's ValueErrors
        return _fail(str(e) or type(e).__name__)
    except (MemoryError, OverflowError) as e:  # a size no check foresaw: still bad input, still one line
        return _fail(f"the run does not fit: {type(e).__name__}: {e}")
    except RecursionError:
        return _fail("an input is nested too deeply")
    except steps.DivergenceError as e:
        return _fail(str(e), EXIT_DIVERGED)
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return _fail(f"{e.strerror or e}{where}", EXIT_OS_ERROR)
    except KeyboardInterrupt:  # raised by a handler other than ours (e.g. a caller's): same line
        print(f"{PROG}: interrupted ({signals.hint()})", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def run() -> None:
    """The ``rate-tuning`` command: :func:`main`'s work, then the process ends at once with its status.

    The signal policy stays installed to the last instruction, and the interpreter's own shutdown is
    skipped (``os._exit`` after flushing, and after the distributed runtime's shutdown barrier when the
    process joined one): Python's shutdown resets signal handlers, so a signal then would end the process
    without its line, and library threads (e.g. tensorstore's callbacks after a full disk) print
    tracebacks while it runs. What the process had to say is said by then."""
    signals = SignalPolicy().install()  # never restored
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    code = _main(None, signals)
    if "jax" in sys.modules:
        from rate_tuning import parallel

        parallel.distributed_shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
