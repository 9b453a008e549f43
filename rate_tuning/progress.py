"""What a training run prints while it runs: a tqdm bar on long runs in a terminal, else plain lines."""
from __future__ import annotations

import sys

import numpy as np

TQDM_MIN_STEPS = 500
"""Runs at least this long get a tqdm bar when stdout is a terminal; others print plain lines."""


def fmt(v, spec: str) -> str:
    """``v`` formatted with ``spec``; ``nan`` for a missing (non-finite, written as ``null``) number."""
    return "nan" if v is None else format(v, spec)


def mean_eff_lr(record: dict) -> str:
    """The mean of a train record's ``eff_lr/<group>`` values, formatted (``-`` without groups)."""
    vals = [v for k, v in record.items() if k.startswith("eff_lr/") and v is not None]
    return f"{np.mean(vals):.2e}" if vals else "-"


class Progress:
    """Progress on stdout: a tqdm bar on long runs when stdout is a terminal, else one plain line per
    logged step (``step 200  loss 0.123  acc 0.97  eff_lr 1.2e-03``; ``eff_lr`` is the mean over groups)."""

    def __init__(self, steps: int, enabled: bool = True, initial: int = 0):
        self.enabled = enabled
        self.bar = None
        if enabled and steps >= TQDM_MIN_STEPS and sys.stdout.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, initial=initial, unit="step", dynamic_ncols=True)

    def message(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, r: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=fmt(r["loss"], ".4g"), acc=fmt(r["accuracy"], ".3f"),
                                 eff_lr=mean_eff_lr(r), refresh=False)
        else:
            self.message(f"step {r['step']}  loss {fmt(r['loss'], '.4g')}  acc {fmt(r['accuracy'], '.3f')}  "
                         f"eff_lr {mean_eff_lr(r)}")

    def eval(self, r: dict) -> None:
        self.message(f"eval step {r['step']}  {r['split']}_loss {fmt(r['loss'], '.4g')}  "
                     f"{r['split']}_acc {fmt(r['accuracy'], '.4f')}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["Progress", "TQDM_MIN_STEPS", "fmt", "mean_eff_lr"]
