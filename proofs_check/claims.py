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

COVERAGE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # (paper item [certainty tag of PAPER.md], the claims that check it, how / why it is not checked)
    ("Definition 2.1, scale invariance [Q]", ("C19", "C20", "C21"),
     "L(c w) = L(w) measured on BN layers and BN networks (exact, smooth, standard epsilon as control)"),
    ("Sec. 2 gradient lemma: <grad, w> = 0, grad(c w) = grad(w)/c [R/D]", ("C1", "C2"), "BN networks and toys"),
    ("Hessian scaling c^-2 and Euler H w = -grad [D] (PAPER §2 fact 3)", ("C3",), "Hessian-vector products"),
    ("Lemma 2.4 (1) and (2) [Q]", ("C1", "C4", "C21"), "per step, GD and SGD, per layer and per channel"),
    ("consequences of Lemma 2.4: monotone norm, decaying effective rate [D]", ("C5",), ""),
    ("§2.4 intrinsic problem: ||grad L(V; g)|| as the convergence measure [S/R]", ("C2", "C9"),
     "the scale transfer (C2) and the measure computed in closed form beside the library's record (C9)"),
    ("§2.5 WNGrad / AdaGrad-norm reformulation and scale equivalence [D]", ("C6", "C7", "C8"), ""),
    ("A1 smoothness on the unit set [R]", ("A1",),
     "Hessian blocks of the smoothed network on the sphere against a derived bound; exact-BN ReLU as control"),
    ("A2 loss bounded below [R]", (),
     "not a statement with a consequence to measure: an input of the constants (L_min bounded analytically per "
     "problem in checks/gd.py, and checked there as part of the region R of C14)"),
    ("A3 bounded SGD noise [R]", (),
     "a hypothesis: the toy problems' noise is Gaussian with a known covariance, used by C16-C18 as an input"),
    ("GD theorem ('Theorem 3.1' [R]): any lr_w, lr_g < 2/L^gg, min ||grad||^2 = O(1/T) [Q/S]",
     ("C9", "C10", "C11", "C12", "C14", "C15"), "explicit constants of the project (docs/derivations.md)"),
    ("proof step I1 (scale transfer of gradients and Hessians) [D]", ("C2", "C3"), ""),
    ("proof step I2 (the norm is smallest at the start of a step's segment) [D]", ("I2",), ""),
    ("proof step I3 (one-step descent inequality) [D]", ("I3",), ""),
    ("proof steps I4, I6 (monotone phase, phase-1 budget) [D]", ("C14",), ""),
    ("proof steps I5, I7 (norm recursion, norm plateau) [D]", ("C4", "C6", "C12"), ""),
    ("proof step I8 (sum of squared gradients <= C) [D]", ("C9", "C10"), ""),
    ("limit of the effective rate below 2/lambda_max [D, not in the paper]", ("C13",), ""),
    ("SGD theorem ('Theorem 4.2' [R]): lr/sqrt(t+1), min E||grad||^2 = O~(T^-1/2) [Q/S]", ("C16", "C18"), ""),
    ("SGD with a constant lr_w: ||w||^4 ~ T [D, not in the paper]", ("C17",), ""),
    ("smoothed network (§5): sqrt(sigma^2 + eps ||w||^2) BN and softplus [R]", ("C19", "A1"), ""),
    ("App. D architecture: inner (gamma, beta) scale-invariant, the last BN's not [S/D]", ("C20", "C21"), ""),
    ("App. D experiments: every lr_w trains, extremes slower; projected SGD fails [R]", ("C22", "C23"), ""),
    ("Li & Arora, ICLR 2020: exponential learning rate = weight decay, with and without momentum [S/D]", ("C24",),
     "beyond the paper: directions and losses equal to round-off (proofs_check/checks/followups.py)"),
    ("van Laarhoven 2017; Wan et al., NeurIPS 2021: norm equilibrium under weight decay [S/Q]", ("C25",),
     "beyond the paper: ||w||^4 against the formula within the run's fluctuation band (checks/followups.py)"),
    ("Wan et al., NeurIPS 2021: angular update at equilibrium [Q]", ("C26",),
     "beyond the paper: the angle against sqrt(2 lambda eta / (1 + alpha)) (checks/followups.py)"),
    ("Kodryan et al., NeurIPS 2022: three regimes at a fixed effective rate [S]", ("C27",),
     "beyond the paper: converge / chaotic equilibrium / no training, boundaries on a grid (checks/followups.py)"),
    ("exact constants and theorem numbering of the paper [U]", (),
     "not recoverable: the checks use the project's own derived constants and say so"),
)
"""The paper's items against the claims that check them; the report renders it (``report.coverage_lines``)."""


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
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[0][0] != "C", kv[0][0], int(kv[0][1:]))))


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
