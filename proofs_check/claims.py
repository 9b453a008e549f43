"""The registry of the paper's claims: id, location in the paper, statement, check and negative controls.

A claim is registered with :func:`claim`; its check is a function ``check(settings) -> list[Evidence]``
where ``settings`` is the claim's ``quick`` or ``full`` settings dict. Every claim must produce at least
one record with ``negative_control=True`` (a setting that breaks one hypothesis, which the check must
report violated): :func:`run` refuses a claim whose check produces none.

Claim ids are those of ``PAPER.md`` §7 (C1..C27); they are never renumbered.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

from proofs_check.evidence import Evidence

REGISTRY: dict[str, "Claim"] = {}


@dataclasses.dataclass(frozen=True)
class Claim:
    """A numerically checkable statement of the paper.

    Attributes:
      id: ``'C1'`` ...
      paper_ref: where in the paper (e.g. ``'Lemma 2.4 (1)'``), with the certainty tag of PAPER.md.
      statement: the statement in math (plain text / LaTeX-ish), one or two lines.
      hypotheses: what must hold for the statement (e.g. ``'train-mode BN, epsilon = 0'``).
      negative_controls: one line per control: which hypothesis it breaks.
      check: ``settings -> list[Evidence]``.
      quick, full: settings dicts (quick: the whole registry in under a minute on 2 CPU cores).
    """

    id: str
    paper_ref: str
    statement: str
    hypotheses: str
    negative_controls: tuple[str, ...]
    check: Callable[[dict], list[Evidence]]
    quick: dict
    full: dict


def claim(id: str, *, paper_ref: str, statement: str, hypotheses: str, negative_controls: Iterable[str],
          quick: dict | None = None, full: dict | None = None):
    """Decorator registering ``check`` as the check of claim ``id``."""
    def register(check):
        if id in REGISTRY:
            raise ValueError(f"claim {id} registered twice")
        REGISTRY[id] = Claim(id, paper_ref, statement, hypotheses, tuple(negative_controls), check,
                             dict(quick or {}), dict(full if full is not None else quick or {}))
        return check
    return register


def load_all() -> dict[str, Claim]:
    """Import every check module (registering its claims) and return the registry, sorted by id."""
    from proofs_check import checks  # noqa: F401  (registration side effect)
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[0][0] != "C", int(kv[0][1:]))))


@dataclasses.dataclass
class ClaimResult:
    """The evidence of one claim, its wall time, and its verdict."""

    claim: Claim
    evidence: list[Evidence]
    seconds: float

    @property
    def ok(self) -> bool:
        """Every record passes and every negative control is reported violated."""
        return bool(self.evidence) and all(e.ok for e in self.evidence)


def run(claim: Claim, quick: bool = True) -> ClaimResult:
    """Run one claim's check (in float64 where the check asks for it) and time it."""
    start = time.perf_counter()
    evidence = list(claim.check(claim.quick if quick else claim.full))
    seconds = time.perf_counter() - start
    if not any(e.negative_control for e in evidence):
        raise RuntimeError(f"claim {claim.id} produced no negative control: its check cannot be shown to fail")
    bad = [e.claim for e in evidence if e.claim != claim.id]
    if bad:
        raise RuntimeError(f"claim {claim.id} produced evidence labelled {bad[0]}")
    return ClaimResult(claim, evidence, seconds)
