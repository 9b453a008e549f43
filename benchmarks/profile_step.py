"""Where the time of one jitted train step goes, per compiled operation, from JAX's profiler.

Usage::

    python -m benchmarks.profile_step --model resnet --batch 128            # every core
    python -m benchmarks.profile_step --model vgg --pin-core 1 --top 30      # one core
    python -m benchmarks.profile_step --model convnet --conv-impl xla        # another conv_impl

Builds the suite's model, data and state (:func:`benchmarks.common.jax_setup`: preset ``'paper'``, float32), compiles
:func:`rate_tuning.steps.make_train_step`, runs a few steps, then traces ``--steps`` more with
``jax.profiler.trace`` (a Perfetto trace) and prints, per step: the time of each compiled operation
(XLA:CPU thunks such as ``ynn_fusion.12`` or ``transpose_copy_fusion.3``; kernels on a GPU), the same
summed by kind (the name without its ``.N``), and their total. The operations' own names say what they
are: ``python -m benchmarks.profile_step --hlo FILE`` also writes the optimised HLO, in which each name
is defined. Durations are the profiler's wall-clock spans of each operation, on a machine shared with
other jobs as noisy as any wall clock (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

from benchmarks.common import MODELS, jax_setup, pin_to_core

# Spans of the runtime around the operations (Python frames, the executor, dispatch), not operations.
_RUNTIME = re.compile(r"^\$|::|^PjitFunction|^ParseArguments|^Handle input|^end: |^Wait for |^AllocateOutputBuffers")


def op_times(trace: dict | list, steps: int) -> dict[str, float]:
    """Milliseconds per step of every compiled operation in a Chrome/Perfetto ``trace`` of ``steps`` steps:
    the summed durations of its complete (``'X'``) events, runtime spans left out."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not _RUNTIME.search(e.get("name", "")):
            total[e["name"]] += e["dur"]
    return {name: us / steps / 1000 for name, us in total.items()}


def by_kind(times: dict[str, float]) -> dict[str, float]:
    """The same times summed over operations of one kind: ``ynn_fusion.12`` and ``ynn_fusion`` are
    ``ynn_fusion``; largest first."""
    kinds: collections.Counter = collections.Counter()
    for name, ms in times.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    return dict(kinds.most_common())


def profile(model_name: str, batch: int, conv_impl: str, steps: int, hlo_path: str | None = None) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from rate_tuning.steps import make_train_step  # not the module: ``steps`` is an argument here

    model, labels, lr, state, x, y, _ = jax_setup(model_name, batch, conv_impl=conv_impl)
    x, y = jnp.asarray(x), jnp.asarray(y)  # on the device once, not transferred every step
    step = make_train_step(model, labels, lr)
    for _ in range(3):  # compile and warm up
        state, _ = step(state, x, y)
    jax.block_until_ready(state.params)
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(step.lower(state, x, y).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, _ = step(state, x, y)
                jax.block_until_ready(state.params)
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not path:
            raise SystemExit("the profiler wrote no Perfetto trace")
        with gzip.open(path[0]) as f:
            return op_times(json.load(f), steps)


def main(argv=None) -> int:
    from rate_tuning.models import CONV_IMPLS

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--conv-impl", default="auto", choices=list(CONV_IMPLS))
    p.add_argument("--steps", type=int, default=10, help="steps traced (after 3 untraced)")
    p.add_argument("--top", type=int, default=25, help="operations listed")
    p.add_argument("--pin-core", type=int, default=None, help="run on this core alone (before JAX starts)")
    p.add_argument("--hlo", default=None, metavar="FILE", help="also write the optimised HLO here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        p.error("--batch and --steps must be >= 1")
    if args.pin_core is not None:
        pin_to_core(args.pin_core)
    times = profile(args.model, args.batch, args.conv_impl, args.steps, args.hlo)
    print(f"{args.model}, batch {args.batch}, conv_impl {args.conv_impl}: {sum(times.values()):.2f} ms of "
          f"operations per step ({args.steps} steps traced)")
    print("\nms per step | kind")
    for kind, ms in list(by_kind(times).items())[:15]:
        print(f"{ms:11.3f} | {kind}")
    print("\nms per step | operation")
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:11.3f} | {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
