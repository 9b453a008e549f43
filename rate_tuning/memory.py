"""Will it fit? A run's memory, estimated from shapes alone, against the memory there is, before anything
is allocated or written.

The estimate of one train step (:func:`step_bytes`) is ``5 x`` the parameters (params, gradient, updated
params, and up to two optimizer buffers: momentum, and the weight-decay or projection temporaries) plus
``3 x`` every intermediate output of the forward pass (kept for the backward pass, its cotangent, and one
temporary), all from ``jax.eval_shape`` (no allocation). It is an order of magnitude, not a profile: a run
refused by it would have needed at least that much; one accepted may still need up to a few times more.
:func:`check_fits` refuses (``MemoryBudgetError``, a ``ValueError``, one line with the estimate) what needs
more than the available memory: ``MemAvailable`` of ``/proc/meminfo`` on a CPU backend, the device's
``bytes_limit`` on an accelerator.
"""
from __future__ import annotations

import math

import numpy as np

PARAM_COPIES = 5
ACTIVATION_COPIES = 3


class MemoryBudgetError(ValueError):
    """A run that needs more memory than there is (one-line message with the estimate)."""


def available_bytes() -> int | None:
    """Memory a run may use now: the default device's ``bytes_limit`` (accelerators) or ``MemAvailable``
    (CPU backend); None when unknown."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        try:
            return int((device.memory_stats() or {})["bytes_limit"])
        except (KeyError, TypeError, ValueError, NotImplementedError):
            return None
    return host_available_bytes()


def host_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (host memory, for data held by numpy); None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tree_bytes(tree) -> int:
    """Bytes of the arrays (or shape-dtype structs) of a pytree."""
    import jax

    return sum(int(np.prod(a.shape, dtype=np.float64)) * np.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(tree))


def step_bytes(model, key, x) -> tuple[int, int]:
    """``(parameter bytes, estimated bytes of one train step)`` of the linen ``model`` on the batch ``x``
    (module docstring), from shapes only."""
    import jax

    x = jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
    variables = jax.eval_shape(lambda k, xb: model.init(k, xb, train=True), key, x)
    params = tree_bytes(variables.get("params", {}))

    def forward(v, xb):
        return model.apply(v, xb, train=True, capture_intermediates=True, mutable=["intermediates", "batch_stats"])

    _, state = jax.eval_shape(forward, variables, x)
    activations = tree_bytes(state.get("intermediates", {}))
    return params, PARAM_COPIES * params + ACTIVATION_COPIES * activations


def check_fits(what: str, needed: int, available: int | None = None) -> None:
    """:class:`MemoryBudgetError` when ``needed`` bytes exceed the available memory (when that is known)."""
    available = available_bytes() if available is None else available
    if available is not None and needed > available:
        raise MemoryBudgetError(f"{what} needs about {_human(needed)} of memory; {_human(available)} is available")


def _human(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KB", "MB", "GB", "TB", "PB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** k:.3g} {units[k]}"


__all__ = ["MemoryBudgetError", "available_bytes", "check_fits", "host_available_bytes", "step_bytes", "tree_bytes"]
