"""The ``rate-tuning`` command: a thin layer over :mod:`rate_tuning.configs` and :mod:`rate_tuning.train`.

Usage::

    rate-tuning train --config digits                      # runs/digits-<timestamp>/
    rate-tuning train --config digits lr_w=100 --workdir runs/big-lr
    rate-tuning train --config fashion_mnist data_kwargs.path=/data/fmnist arch_kwargs.widths=128,128
    rate-tuning configs                                    # the configs, one line each

Overrides are ``key=value`` (syntax: :mod:`rate_tuning.configs`). Bad input (an unknown config or key,
an unparsable or invalid value, a missing or corrupt dataset file, labels that do not fit the model)
prints one line ``rate-tuning: error: <message>`` on stderr and exits with status 2, before anything is
written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "rate-tuning"
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (same format as every other bad input)."""

    def error(self, message):
        _fail(f"{message} (see {PROG} --help)")
        sys.exit(EXIT_BAD_INPUT)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train BatchNorm networks with the two-rate (S)GD of Arora, "
                                            "Li & Lyu (ICLR 2019) and record the auto-tuned effective rates.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one config",
                           description="Train a config; writes WORKDIR/metrics.jsonl and WORKDIR/summary.json.")
    train.add_argument("--config", required=True, help="config name (see `rate-tuning configs`)")
    train.add_argument("--workdir", default=None, help="output directory (default: runs/<config>-<timestamp>)")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. lr_w=100 steps=2000 arch_kwargs.widths=64,64")
    sub.add_parser("configs", help="list the configs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rate-tuning``; returns the exit status (0, or 2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT

    from rate_tuning import configs

    if args.command == "configs":
        for name, description in configs.available().items():
            print(f"{name:16s} {description}")
        return 0

    from rate_tuning import train

    try:
        config = configs.override(configs.get(args.config), args.overrides)
        workdir = args.workdir or os.path.join("runs", f"{args.config}-{time.strftime('%Y%m%d-%H%M%S')}")
        train.train_and_evaluate(config, workdir, verbose=not args.quiet)
    except ValueError as e:  # ConfigError, DataError, LabelError and the library's ValueErrors
        return _fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
