"""Curves for the report: the entries of ``Evidence.details['curves']`` (:mod:`proofs_check.report`).

A curve is ``{'x': [...], 'y': [...], 'xlabel', 'ylabel', 'logy'}``, plus ``'logx': True`` on a log x
axis; ``y`` may be a dict ``{label: [...]}`` of series sharing ``x``. At most :data:`MAX_POINTS` points are
kept: all of them when there are fewer, else evenly spaced indices (geometrically spaced on a log x axis,
so that the early steps stay visible). Values are float64; non-finite and, on a log axis, non-positive
points are left out by the plot, not here (:func:`magnitude` lifts the exact zeros of a residual instead).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

MAX_POINTS = 400
"""Points kept per curve (the report's convention: a few hundred)."""


def indices(n: int, max_points: int = MAX_POINTS, logx: bool = False) -> np.ndarray:
    """The indices of ``n`` points kept: ``0..n-1`` if ``n <= max_points``, else ``max_points`` (up to
    rounding duplicates) evenly spaced in ``[0, n - 1]``, or geometrically spaced in ``[1, n]`` minus 1 when
    ``logx``."""
    if n <= max_points:
        return np.arange(n)
    if logx:
        return np.unique(np.round(np.geomspace(1, n, max_points)).astype(int) - 1)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


def magnitude(y) -> np.ndarray:
    """``|y|`` with exact zeros (common for round-off residuals) raised to the smallest non-zero ``|y|``
    (``1e-300`` if all are zero), so that a log axis draws them."""
    y = np.abs(np.asarray(y, np.float64))
    positive = y[y > 0]
    return np.maximum(y, positive.min() if positive.size else 1e-300)


def curve(x, y, xlabel: str, ylabel: str, *, logy: bool, logx: bool = False,
          max_points: int = MAX_POINTS) -> dict:
    """A report curve of ``y`` (an array, or a dict of named arrays sharing ``x``) against ``x``.

    ``x=None`` is the index ``0, 1, ..., len(y) - 1`` (the step). Subsampled with :func:`indices`.
    """
    if x is None:
        x = np.arange(len(y))
    x = np.asarray(x, np.float64)
    idx = indices(len(x), max_points, logx)
    pick = lambda v: np.asarray(v, np.float64)[idx].tolist()  # noqa: E731
    ys = {str(k): pick(v) for k, v in y.items()} if isinstance(y, Mapping) else pick(y)
    out = {"x": x[idx].tolist(), "y": ys, "xlabel": xlabel, "ylabel": ylabel, "logy": bool(logy)}
    if logx:
        out["logx"] = True
    return out
