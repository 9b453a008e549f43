"""The checks of the paper's claims, one module per family; importing this package registers them all.

* :mod:`proofs_check.checks.identities`: exact identities of scale invariance (C1, C2, C3, C19, C20, C21);
* :mod:`proofs_check.checks.dynamics`: Lemma 2.4 along trajectories and its consequences (C4-C8, C13, I3);
* :mod:`proofs_check.checks.gd`: the GD theorem with explicit constants (C9-C12, C14, C15);
* :mod:`proofs_check.checks.sgd`: SGD norm growth and rate (C16-C18);
* :mod:`proofs_check.checks.experiments`: the App. D learning-rate sweeps on real data (C22, C23);
* :mod:`proofs_check.checks.followups`: results beyond the paper (C24-C27);
* :mod:`proofs_check.checks.assumptions`: the smoothness assumption A1 and proof step I2.
"""
from proofs_check.checks import dynamics, experiments, gd, identities, sgd  # noqa: F401  (registration)
from proofs_check.checks import followups  # noqa: F401  (registration: C24-C27)
from proofs_check.checks import assumptions  # noqa: F401  (registration: A1, I2)
