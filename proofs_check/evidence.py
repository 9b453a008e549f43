"""Evidence records: what a check measured, what the theory predicts, and how the two must relate.

Every check returns a list of :class:`Evidence` (DESIGN.md, "Evidence"), never a bare boolean. ``passed``
is computed from ``measured``, ``bound``, ``relation`` and ``tolerance`` here, in one place:

* ``'<='``: ``measured <= bound + tolerance``;
* ``'>='``: ``measured >= bound - tolerance``;
* ``'=='``: ``|measured - bound| <= tolerance``;
* ``'>'`` : ``measured > bound + tolerance``.

A negative control carries the claim's own relation: it is *confirmed* when that relation fails on a
measured number. A NaN measurement is no measurement, so it never confirms a control (a divergence to
infinity does: record it as ``inf``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator

RELATIONS = ("<=", ">=", "==", ">")


def holds(measured: float, relation: str, bound: float, tolerance: float) -> bool:
    """Whether ``measured relation bound`` holds within ``tolerance``; NaN never holds."""
    m, b, t = float(measured), float(bound), float(tolerance)
    if math.isnan(m) or math.isnan(b):
        return False
    if relation == "<=":
        return m <= b + t
    if relation == ">=":
        return m >= b - t
    if relation == "==":
        return abs(m - b) <= t
    if relation == ">":
        return m > b + t
    raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")


_OBSERVERS: list[Callable[["Evidence"], None]] = []


@contextlib.contextmanager
def observe(callback: Callable[["Evidence"], None]) -> Iterator[None]:
    """Call ``callback(record)`` for every :class:`Evidence` created inside the block (the progress bar of
    ``python -m proofs_check`` counts records with it)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One measurement of one claim in one setting.

    Attributes:
      claim: claim id (``'C4'``).
      setting: what was run (problem, BN variant, optimizer, steps...), one line.
      measured: the number measured (e.g. the worst residual over all steps).
      bound: the number the theory predicts or bounds it by.
      relation: one of :data:`RELATIONS`.
      tolerance: the derived numerical slack (see ``docs/derivations.md``), >= 0.
      dtype: ``'float64'`` or ``'float32'``.
      bn: the BatchNorm variant used (``'exact'``, ``'smooth'``, ``'standard'``, ``'eval-mode'``, ``'none'``).
      negative_control: True when the setting breaks a hypothesis on purpose: the claim's conclusion must
        then be reported violated (the record's ``passed`` says whether the relation holds; a control is
        *confirmed* when it does not).
      details: anything else worth keeping; ``details['curves']`` holds curves for the report's plots
        (``{name: {'x', 'y', 'xlabel', 'ylabel', 'logy'[, 'logx']}}``, ``y`` a list or a dict of named series
        sharing ``x``, at most a few hundred points: :func:`proofs_check.curves.curve`).
    """

    claim: str
    setting: str
    measured: float
    bound: float
    relation: str
    tolerance: float
    dtype: str
    bn: str
    negative_control: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; known: {RELATIONS}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance!r}")
        for callback in _OBSERVERS:  # progress display only (proofs_check.runtime); never changes the record
            callback(self)

    @property
    def passed(self) -> bool:
        """Whether ``measured relation bound`` holds within ``tolerance``."""
        return holds(self.measured, self.relation, self.bound, self.tolerance)

    @property
    def ok(self) -> bool:
        """The verdict for the report: a claim record must pass; a negative control must fail on a
        measured (non-NaN) number."""
        if self.negative_control:
            return not self.passed and not math.isnan(float(self.measured))
        return self.passed

    @property
    def margin(self) -> float:
        """Signed slack of the relation: positive when it holds (in the units of ``measured``)."""
        m, b, t = float(self.measured), float(self.bound), float(self.tolerance)
        return {"<=": b + t - m, ">=": m - b + t, "==": t - abs(m - b), ">": m - b - t}[self.relation]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(passed=self.passed, ok=self.ok, margin=self.margin)
        return d
