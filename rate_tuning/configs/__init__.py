"""Experiment configs, as code: one module per config, each with ``get_config() -> Config``.

:class:`Config` is defined once, here; a config module only fills in the fields that differ from the
defaults. :func:`get` loads a config by name, :func:`override` applies ``key=value`` strings from the
command line, :func:`available` lists the configs with their one-line descriptions (the first line of
each module's docstring).

Override syntax (:func:`override`), parsed by the field's type:

* ``int`` fields: an integer literal (``steps=2000``, ``steps=2_000``) or a float literal with an integral
  value (``steps=1e3``). ``True``/``False`` are not integers here.
* ``float`` fields: anything Python's ``float()`` accepts (``lr_w=0.1``, ``lr_w=1e-3``, ``lr_w=inf``,
  ``lr_w=nan``). Parsing does not judge the value: :func:`validate` rejects a non-positive or
  non-finite learning rate with a message about the learning rate.
* ``bool`` fields: ``true``/``false``, ``yes``/``no``, ``1``/``0`` (any case).
* fields that may be ``None`` (``bn``, ``momentum``): ``None``, ``none`` or ``null`` give ``None``.
* ``str`` fields: the text as written (surrounding quotes are removed).
* ``dict`` fields (``arch_kwargs``, ``data_kwargs``): either the whole dict as a Python literal
  (``arch_kwargs={'widths': (32, 32)}``), or one entry with a dotted key, whose value is read with
  :func:`ast.literal_eval`: ``arch_kwargs.widths=(64,64)``, ``arch_kwargs.widths=64,64`` (a tuple),
  ``data_kwargs.limit_train=10000``. A value that is not a Python literal is kept as a plain string
  (``data_kwargs.path=/data/fashion-mnist``) unless it starts with a bracket or a quote or contains a
  comma: then it is a malformed literal and an error (quote it to force a string: ``data_kwargs.path='a,b'``).

Unknown keys and unparsable values raise :class:`ConfigError`, naming the key and the known keys.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import numbers
import pkgutil
import types
import typing
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config that cannot be run: an unknown name or key, an unparsable or invalid value."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on (with the thread count: same config, same numbers)."""

    dataset: str = "synthetic"
    """Dataset name for :func:`rate_tuning.data.load`: ``synthetic``, ``digits``, ``fashion_mnist``, ``cifar10``."""

    data_kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments of the dataset loader (e.g. ``path``, ``limit_train``, ``flatten``, ``seed``)."""

    arch: str = "mlp"
    """Architecture for :func:`rate_tuning.models.build`: ``mlp``, ``convnet``, ``vgg``, ``resnet``."""

    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments of the architecture (e.g. ``widths`` for ``mlp``, ``channels`` for ``convnet``)."""

    preset: str = "paper"
    """Which parameters are scale-invariant and which BN is used: ``paper``, ``fully_si``, ``smoothed``,
    ``no_bn`` (see :mod:`rate_tuning.models`)."""

    bn: str | None = None
    """BatchNorm variant replacing the preset's (``exact``, ``smooth``, ``standard``); ``None``: the
    preset's own."""

    grouping: str = "layer"
    """Scale-invariant groups: one per ``layer`` (per parameter group), or one per output ``channel``."""

    lr_w: float = 0.1
    """Base learning rate ``eta_w`` of the scale-invariant groups (finite, > 0)."""

    lr_g: float = 0.1
    """Base learning rate ``eta_g`` of the scale-variant parameters (finite, > 0)."""

    schedule: str = "constant"
    """Schedule of both rates: ``constant`` or ``inverse_sqrt`` (``lr / sqrt(t + 1)``, the paper's SGD)."""

    weight_decay: float = 0.0
    """Coupled L2 coefficient on every trainable parameter; 0 in the paper (> 0 breaks Lemma 2.4)."""

    momentum: float | None = None
    """Heavy-ball momentum in ``[0, 1)``; ``None`` (plain (S)GD) in the paper."""

    project: bool = False
    """Rescale each scale-invariant group to its pre-step norm after every step (sphere-projected
    baseline: fixed effective learning rate, no auto-tuning)."""

    batch_size: int = 128
    """Examples per SGD step; ``0`` means full-batch gradient descent on the whole training split."""

    steps: int = 1000
    """Number of optimizer steps (> 0)."""

    eval_every: int = 0
    """Evaluate on the test split every this many steps (and always at the end); ``0``: only at the end."""

    log_every: int = 100
    """Write the train metrics of every this many steps (and of the last one) and print a progress line."""

    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps, and always at step 0 and after the last step; ``0``: only
    those two (:mod:`rate_tuning.checkpoint`). Does not change the results, so a run may be resumed with
    another value."""

    keep_checkpoints: int = 3
    """How many checkpoints to keep, the newest (>= 1); may differ on resume."""

    seed: int = 0
    """Seed of the parameter initialisation and of the batch order (>= 0)."""

    dtype: str = "float32"
    """Parameter and input dtype: ``float32``, or ``float64`` (enables x64 for the run only)."""

    verify_labels: bool = False
    """Before training, check numerically on the first batch that every group labelled scale-invariant
    is (:func:`rate_tuning.groups.verify_labels`); meaningful in ``float64``."""


DTYPES = ("float32", "float64")
"""Supported run dtypes (params and inputs)."""

MAX_SEED = 2**32 - 1
"""Largest seed (``jax.random.key`` takes an unsigned 32-bit seed here: 2^32 gives the key of 0)."""

MAX_STEPS = 2**31 - 1
"""Most steps of a run (the train state counts steps in int32)."""


def _choice(name: str, value, known) -> None:
    if value not in known:
        raise ConfigError(f"unknown {name} {value!r}; known: {', '.join(map(str, known))}")


def _integer(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        limits = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name} must be an integer {limits}, got {value!r}")


def validate(config: Config) -> None:
    """Raise :class:`ConfigError` (one line) unless ``config`` names known things and has valid values.

    Checks: known dataset, arch, preset, bn variant (and that the preset has a BN to replace), grouping,
    schedule and dtype; ``lr_w``, ``lr_g`` finite and > 0 (:func:`rate_tuning.optim.check_learning_rate`);
    ``1 <= steps <= 2^31 - 1``, ``batch_size >= 0`` (0: full batch), ``eval_every >= 0``, ``log_every >= 1``,
    ``0 <= seed <= 2^32 - 1``, ``checkpoint_every >= 0``, ``keep_checkpoints >= 1``. What needs the data
    (batch size vs. dataset size), the model (arch_kwargs, labels) or the optimizer (``weight_decay``,
    ``momentum``) is checked where those are built (:func:`rate_tuning.train.load_dataset`,
    :func:`rate_tuning.train.create_train_state`).
    """
    from rate_tuning import data, layers, models, optim  # configs stays importable without JAX

    if not isinstance(config, Config):
        raise ConfigError(f"expected a rate_tuning.configs.Config, got {type(config).__name__}")
    _choice("dataset", str(config.dataset).replace("-", "_").lower(), list(data.LOADERS))
    _choice("arch", config.arch, list(models.ARCHITECTURES))
    _choice("preset", config.preset, list(models.PRESETS))
    if config.bn is not None:
        _choice("bn", config.bn, list(layers.BN_VARIANTS))
        if models.PRESETS[config.preset].bn is None:
            raise ConfigError(f"preset {config.preset!r} has no BatchNorm to replace with bn={config.bn!r}")
    _choice("grouping", config.grouping, list(models.GROUPINGS))
    _choice("schedule", config.schedule, list(optim.SCHEDULES))
    _choice("dtype", config.dtype, list(DTYPES))
    for name in ("lr_w", "lr_g"):
        try:
            optim.check_learning_rate(name, getattr(config, name))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for name, minimum in (("batch_size", 0), ("eval_every", 0), ("log_every", 1), ("checkpoint_every", 0),
                          ("keep_checkpoints", 1)):
        _integer(name, getattr(config, name), minimum)
    _integer("steps", config.steps, 1, MAX_STEPS)
    _integer("seed", config.seed, 0, MAX_SEED)
    for name in ("project", "verify_labels"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(config, name)!r}")
    for name in ("arch_kwargs", "data_kwargs"):
        value = getattr(config, name)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name} must be a dict with string keys, got {value!r}")


_HINTS: dict[str, Any] | None = None


def field_types() -> dict[str, Any]:
    """The resolved type of every :class:`Config` field."""
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    return _HINTS


def available() -> dict[str, str]:
    """``{name: one-line description}`` of every config module in this package, sorted by name."""
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            doc = importlib.import_module(f"{__name__}.{info.name}").__doc__ or ""
            out[info.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def get(name: str) -> Config:
    """The config ``name`` (a module of this package); :class:`ConfigError` listing the known ones."""
    known = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    if name not in known:
        raise ConfigError(f"unknown config {name!r}; known configs: {', '.join(sorted(known))}")
    config = importlib.import_module(f"{__name__}.{name}").get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"config module {name!r}: get_config() returned {type(config).__name__}, not a Config")
    return config


def override(config: Config, assignments: Iterable[str]) -> Config:
    """``config`` with the ``key=value`` strings applied in order (syntax: see the module docstring).

    Example::

        config = override(get("digits"), ["lr_w=100", "arch_kwargs.widths=(32,32)"])

    Raises:
      ConfigError: an assignment without ``=``, an unknown key, or a value that does not parse.
    """
    types_ = field_types()
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        name, dot, entry = key.partition(".")
        if name not in types_:
            raise ConfigError(f"unknown config key {name!r}; known keys: {', '.join(types_)}")
        if dot:
            if _base(types_[name]) is not dict or not entry:
                raise ConfigError(f"config key {key!r}: only the dict fields "
                                  f"({', '.join(k for k, t in types_.items() if _base(t) is dict)}) take a dotted entry")
            current = dict(changes.get(name, getattr(config, name)))
            current[entry] = _parse_entry(key, text)
            changes[name] = current
        else:
            changes[name] = parse_value(name, types_[name], text)
    return dataclasses.replace(config, **changes)


def _base(tp) -> Any:
    """``X`` for ``X`` and for ``X | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_value(key: str, tp, text: str) -> Any:
    """Parse ``text`` as a value of the field ``key`` of type ``tp``; :class:`ConfigError` if it does not."""
    raw = text.strip()
    if _optional(tp) and raw.lower() in ("none", "null"):
        return None
    base = _base(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key {key!r}: cannot parse {text!r} as {expected}")

    if base is bool:
        table = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if raw.lower() not in table:
            raise bad("a boolean (true/false)")
        return table[raw.lower()]
    if base is int:
        try:
            return int(raw.replace("_", "")) if raw.lstrip("+-").replace("_", "").isdigit() else _integral(raw)
        except ValueError:
            raise bad("an integer") from None
    if base is float:
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if base is str:
        return _unquote(raw)
    if base is dict:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise bad("a Python dict literal") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a Python dict literal with string keys")
        return value
    raise ConfigError(f"config key {key!r}: no parser for type {tp!r}")  # pragma: no cover


def _integral(raw: str) -> int:
    value = float(raw)
    if not (math.isfinite(value) and value.is_integer()):
        raise ValueError(raw)
    return int(value)


def _parse_entry(key: str, text: str) -> Any:
    """A dict entry: a Python literal, else a plain string (see the module docstring)."""
    raw = text.strip()
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if not raw or raw[0] in "([{'\"" or "," in raw:
            raise ConfigError(f"config key {key!r}: cannot parse {text!r} as a Python literal") from None
        return raw


__all__ = ["Config", "ConfigError", "DTYPES", "MAX_SEED", "MAX_STEPS", "available", "field_types", "get", "override", "parse_value",
           "validate"]
