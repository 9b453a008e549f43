"""Any flax model as a loss of ``(params, batch)``, factories, and the round-off budget of a program.

The audit (:mod:`rate_tuning.audit`) and the assertions (:mod:`rate_tuning.testing`) probe a *target*: a
train-mode ``loss(params, batch) -> scalar``, the ``params`` as plain nested dicts, and a ``batch``.
:func:`from_linen` and :func:`from_nnx` build one from a flax linen model and its variables or from an
``nnx.Module`` (through ``nnx.split``/``nnx.merge``); :func:`load_factory` from ``MODULE:FACTORY``.

The factory contract (``rate-tuning audit MODULE:FACTORY``, ``python -m proofs_check --model MODULE:FACTORY``).
``MODULE`` is a dotted module name importable from the current directory or a path to a ``.py`` file;
``FACTORY`` is a function of no arguments returning one of::

    (model, variables, batch)        # flax.linen: variables = model.init(...), with 'params'
    (model, batch)                   # flax.nnx: an nnx.Module (its nnx.Param are the parameters)
    {'model': ..., 'variables': ..., 'batch': ..., 'loss': ..., 'call_kwargs': ..., 'frozen': ...}

``batch`` is ``(inputs, targets)`` or ``inputs`` alone; ``inputs`` is an array or a tuple of arrays passed
positionally to the model. Train mode: a linen model is applied with every non-``params`` collection
mutable (BatchNorm statistics) and, when its ``__call__`` has them, ``train=True``, ``training=True``,
``is_training=True``, ``use_running_average=False``, ``deterministic=True`` (``call_kwargs`` replaces
them); an NNX model gets ``use_running_average=False`` and ``deterministic=True`` through
``set_attributes`` on a copy. ``loss`` is ``loss(outputs, batch) -> scalar``; by default the mean softmax
cross-entropy for integer targets with ``outputs.shape[:-1] == targets.shape``, half the mean squared error
for float targets of the outputs' shape, and half the mean squared distance to a fixed random target when
there are no targets. ``frozen`` lists parameter paths (``'classifier/kernel'``) the user does not train:
labelled ``'frozen'``, never probed (freezing is a choice, not a property of the loss).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_TRAIN_KWARGS = {"train": True, "training": True, "is_training": True, "use_running_average": False,
                 "deterministic": True}


class AuditError(ValueError):
    """Bad input to the audit: an import path, a factory, a batch, a model without parameters."""


# ---------------------------------------------------------------------------------------------------------
# round-off budget
# ---------------------------------------------------------------------------------------------------------

_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}


def _reduction_length(eqn) -> int:
    shape = lambda v: tuple(getattr(getattr(v, "aval", None), "shape", ()))  # noqa: E731
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        return max(1, math.prod(shape(eqn.invars[0])[d] for d in contract))
    if name == "conv_general_dilated":
        rhs = shape(eqn.invars[1])
        return max(1, math.prod(rhs) // max(1, rhs[eqn.params["dimension_numbers"].rhs_spec[0]]))
    if name in _REDUCTIONS:
        return max(1, math.prod(shape(eqn.invars[0])[a] for a in eqn.params["axes"]))
    if name.startswith("cum"):
        return max(1, shape(eqn.invars[0])[eqn.params["axis"]])
    return 1


_EXACT = {"reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
          "dynamic_update_slice", "concatenate", "pad", "gather", "select_n", "rev", "copy", "copy_p", "iota",
          "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "stop_gradient", "max", "min", "abs", "neg",
          "sign", "reduce_max", "reduce_min", "argmax", "argmin", "reduce_precision", "clamp", "sort"}
"""Primitives that never round (their outputs are some of their inputs' values, rearranged or compared)."""


def _widening(eqn) -> bool:
    """A ``convert_element_type`` to a type at least as precise as its input (float32 -> float64): exact."""
    if eqn.primitive.name != "convert_element_type":
        return False
    a, b = eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype
    return jnp.issubdtype(a, jnp.floating) and jnp.issubdtype(b, jnp.floating) and np.finfo(b).eps <= np.finfo(a).eps


def _inexact(v) -> bool:
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and not hasattr(v, "val")


def _budget(jaxpr) -> float:
    """``sum_e u_e n_e`` over the equations the outputs depend on (dead code, such as BatchNorm's
    discarded running statistics, adds no error to them); sub-jaxprs are counted whole."""
    live = {v for v in jaxpr.outvars if not hasattr(v, "val")}
    total = 0.0
    for eqn in reversed(jaxpr.eqns):
        if not any(v in live for v in eqn.outvars):
            continue
        live.update(v for v in eqn.invars if not hasattr(v, "val"))
        subs = [s for v in eqn.params.values() for s in (v if isinstance(v, (tuple, list)) else (v,))]
        subs = [getattr(s, "jaxpr", s) for s in subs]
        subs = [s for s in subs if hasattr(s, "eqns")]
        if subs:
            repeat = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
            total += repeat * sum(_budget(s) for s in subs)
            continue
        if not any(_inexact(v) for v in eqn.invars) or eqn.primitive.name in _EXACT or _widening(eqn):
            continue  # exact: data movement, comparisons, max/min, widening conversions, integer-only inputs
        dtypes = [getattr(getattr(v, "aval", None), "dtype", None) for v in eqn.outvars]
        u = max([np.finfo(d).eps / 2 for d in dtypes if d is not None and jnp.issubdtype(d, jnp.inexact)],
                default=0.0)
        total += u * _reduction_length(eqn)
    return total


def roundoff_budget(fn: Callable, *args) -> float:
    """``rho = sum_e u_e n_e``: a first-order bound on the relative round-off of any output of ``fn(*args)``.

    Over every equation ``e`` of the jaxpr that the outputs depend on (sub-jaxprs included, ``scan`` bodies
    times their length, both branches of a ``cond``, a ``while`` body once): ``u_e`` is the unit round-off
    of the equation's output dtype and ``n_e`` its reduction length (contraction length of ``dot_general``
    and convolutions, reduced size of ``reduce_sum``; 1 for elementwise arithmetic). Equations that never
    round count 0: data movement (reshape, slice, gather, select...), comparisons, ``max``/``min``/``abs``/
    ``neg``, widening conversions (float32 -> float64), and equations without a floating-point variable among
    their inputs (masks, ``iota``, small integers). A sum of ``n`` terms carries a relative error of at most
    ``gamma_n ~ n u`` (Higham, *Accuracy and Stability*, §3.1); to first order the errors along a dependency
    path add, and every path is a subset of the equations.

    Example::

        roundoff_budget(lambda w: w @ w, jnp.ones(8))   # 8 * 2**-24 (float32)
    """
    return max(_budget(jax.make_jaxpr(fn)(*args).jaxpr), float(np.finfo(np.float64).eps) / 2)


# ---------------------------------------------------------------------------------------------------------
# targets: a loss of (params, batch), from linen, NNX or a factory
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """What the audit probes: ``loss(params, batch) -> scalar`` (train mode), the ``params`` pytree (plain
    nested dicts), the ``batch``, the ``frozen`` paths, and ``kind`` (``'linen'``, ``'nnx'``, ``'loss'``)."""

    loss: Callable
    params: Any
    batch: Any
    frozen: tuple[str, ...] = ()
    kind: str = "loss"
    name: str = "model"


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    return batch, None


def _default_loss(seed: int = 0):
    def loss(out, batch):
        _, y = _split_batch(batch)
        if not hasattr(out, "shape"):
            raise AuditError("the model returns a pytree, not an array: give the factory a 'loss'")
        out = jnp.asarray(out)
        if y is None:
            target = jax.random.normal(jax.random.key(seed), out.shape, out.dtype)
            return 0.5 * jnp.mean(jnp.square(out - target))
        y = jnp.asarray(y)
        if jnp.issubdtype(y.dtype, jnp.integer) and out.shape[:-1] == y.shape:
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        if jnp.issubdtype(y.dtype, jnp.floating) and out.shape == y.shape:
            return 0.5 * jnp.mean(jnp.square(out - y.astype(out.dtype)))
        raise AuditError(f"targets of shape {tuple(y.shape)} ({y.dtype}) do not fit the outputs of shape "
                         f"{tuple(out.shape)}: integer class labels of shape {tuple(out.shape[:-1])} or float "
                         "targets of the outputs' shape, or give the factory a 'loss'")
    return loss


def _inputs(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def from_linen(model, variables, batch, *, loss: Callable | None = None, call_kwargs: dict | None = None,
               frozen: Sequence[str] = (), name: str | None = None) -> Target:
    """A :class:`Target` for a flax linen ``model`` with ``variables`` (``model.init(...)``) on ``batch``."""
    if not isinstance(variables, dict) and not hasattr(variables, "keys"):
        raise AuditError(f"variables must be the dict model.init returns, got {type(variables).__name__}")
    variables = dict(variables)
    if "params" not in variables or not jax.tree_util.tree_leaves(variables["params"]):
        raise AuditError("the model has no parameters (variables has no 'params' collection)")
    if call_kwargs is None:
        try:
            accepted = inspect.signature(type(model).__call__).parameters
        except (TypeError, ValueError):
            accepted = {}
        call_kwargs = {k: v for k, v in _TRAIN_KWARGS.items() if k in accepted}
    rest = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(rest) or False
    out_loss = loss or _default_loss()

    def f(params, b):
        x, _ = _split_batch(b)
        out = model.apply({**rest, "params": params}, *_inputs(x), mutable=mutable, **call_kwargs)
        return out_loss(out[0] if mutable else out, b)

    return Target(f, jax.tree_util.tree_map(jnp.asarray, _plain(variables["params"])), batch, tuple(frozen),
                  "linen", name or type(model).__name__)


def _plain(tree):
    """Nested ``dict`` s (FrozenDict and the like unfrozen), so paths and label trees are plain."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def from_nnx(model, batch, *, loss: Callable | None = None, frozen: Sequence[str] = (),
             name: str | None = None) -> Target:
    """A :class:`Target` for an ``nnx.Module`` on ``batch``: its ``nnx.Param`` are the parameters (as the
    nested dict of ``state.to_pure_dict()``; wrap labels with :func:`nnx_labels` for ``nnx.Optimizer``)."""
    from flax import nnx

    model = nnx.clone(model)
    model.set_attributes(use_running_average=False, deterministic=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = params.to_pure_dict()
    if not jax.tree_util.tree_leaves(pure):
        raise AuditError("the model has no parameters (no nnx.Param)")
    treedef = jax.tree_util.tree_structure(params)
    if len(jax.tree_util.tree_leaves(params)) != len(jax.tree_util.tree_leaves(pure)):
        raise AuditError("the model's nnx.Param state does not flatten to one array per parameter")
    rest_leaves, rest_def = jax.tree_util.tree_flatten(rest)
    out_loss = loss or _default_loss()

    def f(p, b):  # fresh Variables inside the trace: BatchNorm may update its statistics there
        x, _ = _split_batch(b)
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(p)),
                      jax.tree_util.tree_unflatten(rest_def, rest_leaves))
        return out_loss(m(*_inputs(x)), b)

    return Target(f, jax.tree_util.tree_map(jnp.asarray, pure), batch, tuple(frozen), "nnx",
                  name or type(model).__name__)


def nnx_labels(labels):
    """A label tree from :meth:`AuditResult.labels` of an NNX model as an ``nnx.State``, the form
    ``nnx.Optimizer(model, two_rate_sgd(nnx_labels(labels), ...), wrt=nnx.Param)`` takes."""
    import warnings

    from flax import nnx

    with warnings.catch_warnings():  # flax 0.12 announces a dict-based State; nnx.Optimizer still wants this
        warnings.simplefilter("ignore", DeprecationWarning)
        return nnx.State(labels)


def target(obj, name: str = "model") -> Target:
    """A :class:`Target` from what a factory returned (module docstring, "The factory contract")."""
    if isinstance(obj, Target):
        return obj
    if isinstance(obj, dict) and "model" in obj:
        kw = {k: obj[k] for k in ("loss", "frozen") if obj.get(k) is not None}
        model, batch = obj["model"], obj.get("batch")
        variables = obj.get("variables")
        if obj.get("call_kwargs") is not None:
            kw["call_kwargs"] = obj["call_kwargs"]
    elif isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        model, variables, batch = (obj[0], None, obj[1]) if len(obj) == 2 else tuple(obj)
        kw = {}
    else:
        raise AuditError(f"the factory returned {type(obj).__name__}; expected (model, variables, batch) for "
                         "flax linen, (model, batch) for an nnx.Module, or a dict with 'model' and 'batch'")
    if batch is None:
        raise AuditError("the factory gave no batch")
    try:
        from flax import nnx
        is_nnx = isinstance(model, nnx.Module)
    except ImportError:  # pragma: no cover
        is_nnx = False
    if is_nnx:
        kw.pop("call_kwargs", None)
        return from_nnx(model, batch, name=name, **kw)
    if not hasattr(model, "apply"):
        raise AuditError(f"the model is a {type(model).__name__}, neither a flax linen Module nor an nnx.Module")
    if variables is None:
        raise AuditError("a flax linen model needs its variables: return (model, variables, batch)")
    return from_linen(model, variables, batch, name=name, **kw)


def import_module(name: str):
    """The module ``name``: a dotted name importable from the current directory, or a path to a ``.py`` file
    (imported once, under a name made from its absolute path). Failures are :class:`AuditError`."""
    try:
        if name.endswith(".py") or os.sep in name:
            if not os.path.isfile(name):
                raise AuditError(f"no file {name}")
            path = os.path.abspath(name)
            key = "audit_file_" + "".join(ch if ch.isalnum() else "_" for ch in path)
            module = sys.modules.get(key)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[key] = module  # dataclasses (flax modules) look their module up while it runs
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    except AuditError:
        raise
    except Exception as e:  # ImportError, SyntaxError, whatever the module raises at import
        raise AuditError(f"cannot import {name}: {type(e).__name__}: {e}") from None


def load_factory(spec: str) -> Target:
    """Import ``MODULE:FACTORY`` (:func:`import_module`), call the factory and return its :class:`Target`;
    every failure is an :class:`AuditError`."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise AuditError(f"expected MODULE:FACTORY, got {spec!r}")
    module = import_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AuditError(f"{module_name} has no callable {attr!r}")
    try:
        obj = factory()
    except Exception as e:
        raise AuditError(f"the factory {spec} raised {type(e).__name__}: {e}") from None
    return target(obj, name=attr)
