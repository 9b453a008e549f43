"""Flax linen models with BatchNorm, and the presets that say which parameters are scale-invariant.

Architectures: ``mlp``, ``convnet`` (strided convolutions, global average pooling), ``vgg`` (3x3
convolutions with max-pooling), ``resnet`` (small, basic blocks). Every one ends in the paper's App. D
head: a bias-free linear classifier followed by a last BN layer ``bn_out``.

Presets (:data:`PRESETS`) and their labels (PAPER §1, App. D; claims C20, C21):

* ``paper``: exact BN, ReLU. Every kernel feeding a BN is scale-invariant; the ``(gamma, beta)`` of every
  inner BN is one scale-invariant group (BN -> ReLU/max-pool/avg-pool -> bias-free linear -> BN is
  positively homogeneous); the last BN's ``(gamma, beta)`` are scale-variant.
* ``fully_si``: exact BN without affine parameters and a frozen fixed-norm classifier: every trainable
  parameter is scale-invariant.
* ``smoothed``: smooth scale-invariant BN (``sqrt(sigma^2 + eps ||w||^2)``) and softplus (PAPER §5): kernels
  stay scale-invariant, inner ``(gamma, beta)`` do not (softplus is not homogeneous) and are scale-variant.
* ``no_bn``: no normalisation, biases everywhere, every parameter scale-variant: the control.

In a ResNet, an identity shortcut carries a BN's output past the next BN, so the ``(gamma, beta)`` of the
stem BN, of every block's second BN and of every shortcut BN are scale-invariant only *jointly* (one group,
``residual_stream``); each block's first BN is a group of its own.

Labels come from here, from the definition of the model (``model.labels(grouping)``), never from
matching parameter names; :func:`rate_tuning.groups.verify_labels` checks them numerically.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rate_tuning import groups as G
from rate_tuning import layers

GROUPINGS = ("layer", "channel")
CONV_IMPLS = ("auto", "xla", "im2col", "chunked")
"""How convolutions are computed: ``'xla'`` (``lax.conv_general_dilated``), ``'im2col'``
(:func:`rate_tuning.layers.conv_im2col`: patches times kernel), ``'chunked'`` (XLA's, with the kernel
gradient summed over batch chunks: :func:`rate_tuning.layers.conv_chunked_kernel_grad`), or ``'auto'``: on
the CPU backend im2col for strided convolutions and for layers with at most :data:`IM2COL_MAX_IN_CHANNELS`
input channels (the image's first layer), chunked for the others, where each is faster; XLA's convolution
on other backends. Same parameters, same function: they agree to round-off.

Inside a loop body (``lax.scan``, ``fori_loop``: :mod:`rate_tuning.sweep`, ``proofs_check`` trajectories)
XLA's CPU backend runs convolutions on a naive kernel (it canonicalises convolution layouts only in the
entry computation; jax-ml/jax#12868), many times slower than from Python, while ``'im2col'`` has no
convolution op (benchmarks/README.md, loops). :func:`for_loops` makes that choice
(:func:`rate_tuning.sweep.bn_problem` applies it)."""


IM2COL_MAX_IN_CHANNELS = 4
"""``'auto'`` on CPU computes stride-1 convolutions with at most this many input channels by im2col: the
image's few-channel first layer is faster that way, wider layers are not (measured per layer in
benchmarks/README.md, few-channel layers)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """How a preset builds a network: BN variant (None: no BN), activation, the kind of the inner BN
    ``(gamma, beta)`` (``'si'``, ``'variant'`` or None for no affine) and the head (``'bn'``: classifier
    + last BN; ``'frozen'``: fixed-norm frozen classifier; ``'linear'``: a classifier with bias)."""

    bn: str | None
    activation: str
    inner_affine: str | None
    head: str


PRESETS = {
    "paper": Preset(bn="exact", activation="relu", inner_affine=G.SI, head="bn"),
    "fully_si": Preset(bn="exact", activation="relu", inner_affine=None, head="frozen"),
    "smoothed": Preset(bn="smooth", activation="softplus", inner_affine=G.VARIANT, head="bn"),
    "no_bn": Preset(bn=None, activation="relu", inner_affine=None, head="linear"),
}
ACTIVATIONS = {"relu": nn.relu, "softplus": nn.softplus}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One linear (``'dense'``) or convolutional (``'conv'``) layer, its BN, the activation and an optional
    pooling (``'max'``: 2x2 max-pool; ``'global'``: global average pool)."""

    kind: str
    features: int
    kernel_size: int = 3
    stride: int = 1
    pool: str | None = None


class _BNNetBase(nn.Module):
    """Shared pieces: layer -> BN -> activation blocks and the head, with their labels."""

    num_classes: int = 10
    preset: Preset = PRESETS["paper"]
    smooth_epsilon: float = layers.STANDARD_EPSILON
    classifier_norm: float = 10.0
    param_dtype: Any = jnp.float32
    conv_impl: str = "auto"

    # -- forward pieces -------------------------------------------------------------------------------
    def _bn(self, name: str, train: bool, affine: bool):
        return layers.batch_norm(self.preset.bn, smooth_epsilon=self.smooth_epsilon)(
            use_running_average=not train, use_scale=affine, use_bias=affine,
            param_dtype=self.param_dtype, name=name)

    def _layer_bn(self, x, kind, features, name, bn_name, train, affine, kernel_size=3, stride=1):
        """``BN(W x)`` (or ``W x + b`` without BN); ``W`` is a Dense or Conv kernel."""
        use_bn = self.preset.bn is not None
        if kind == "dense":
            x = x.reshape(x.shape[0], -1)
            layer = nn.Dense(features, use_bias=not use_bn, param_dtype=self.param_dtype, name=name)
        else:
            layer = nn.Conv(features, (kernel_size, kernel_size), strides=stride, padding="SAME",
                            use_bias=not use_bn, param_dtype=self.param_dtype, name=name,
                            conv_general_dilated=self._conv_function(stride, x.shape[-1]))
        x = layer(x)
        if not use_bn:
            return x
        kernel = layer.variables["params"]["kernel"]
        w_sq = jnp.sum(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1)))
        return self._bn(bn_name, train, affine)(x, weight_sq_norm=w_sq)

    def _conv_function(self, stride: int, in_channels: int):
        """The ``conv_general_dilated`` of a layer with this stride and input channel count (None: flax's
        default), by :data:`CONV_IMPLS`."""
        impl = _check_conv_impl(self.conv_impl)
        if impl == "auto":
            if jax.default_backend() != "cpu":
                impl = "xla"
            else:
                impl = "im2col" if stride > 1 or in_channels <= IM2COL_MAX_IN_CHANNELS else "chunked"
        return {"xla": None, "im2col": layers.conv_im2col, "chunked": layers.conv_chunked_kernel_grad}[impl]

    def _head(self, x, train):
        x = x.reshape(x.shape[0], -1)
        if self.preset.head == "frozen":
            return layers.FixedNormDense(self.num_classes, self.classifier_norm, self.param_dtype,
                                         name="classifier")(x)
        return self._layer_bn(x, "dense", self.num_classes, "classifier", "bn_out", train, affine=True)

    # -- labels ---------------------------------------------------------------------------------------
    def _layer_labels(self, name: str, grouping: str) -> dict:
        if self.preset.bn is None:
            return {"kernel": G.VARIANT_LABEL, "bias": G.VARIANT_LABEL}
        return {"kernel": G.si(f"{name}:kernel", per_channel=grouping == "channel")}

    def _affine_labels(self, name: str, kind: str | None, group: str | None = None) -> dict:
        if self.preset.bn is None or kind is None:
            return {}
        label = G.si(group or f"{name}:affine") if kind == G.SI else G.Label(kind)
        return {name: {"scale": label, "bias": label}}

    def _head_labels(self, grouping: str) -> dict:
        if self.preset.head == "frozen":
            return {"classifier": {"kernel": G.FROZEN_LABEL}}
        return {"classifier": self._layer_labels("classifier", grouping),
                **self._affine_labels("bn_out", G.VARIANT)}

    def labels(self, grouping: str = "layer") -> dict:
        """The label tree of this model's params (``grouping``: ``'layer'`` or per-output-``'channel'``)."""
        raise NotImplementedError

    def _check_grouping(self, grouping):
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {grouping!r}; known: {', '.join(GROUPINGS)}")


class BNNet(_BNNetBase):
    """A chain of :class:`Unit` s (layer -> BN -> activation -> pool) and the App. D head."""

    units: Sequence[Unit] = ()

    @nn.compact
    def __call__(self, x, train: bool = True):
        act = ACTIVATIONS[self.preset.activation]
        affine = self.preset.inner_affine is not None
        for i, u in enumerate(self.units):
            x = act(self._layer_bn(x, u.kind, u.features, f"layer{i}", f"bn{i}", train, affine,
                                   u.kernel_size, u.stride))
            if u.pool == "max":
                x = layers.max_pool_2x2(x)
            elif u.pool == "global":
                x = jnp.mean(x, axis=(1, 2))
        return self._head(x, train)

    def labels(self, grouping: str = "layer") -> dict:
        self._check_grouping(grouping)
        tree = {}
        for i in range(len(self.units)):
            tree[f"layer{i}"] = self._layer_labels(f"layer{i}", grouping)
            tree.update(self._affine_labels(f"bn{i}", self.preset.inner_affine))
        tree.update(self._head_labels(grouping))
        return tree


class ResNet(_BNNetBase):
    """A small ResNet of basic blocks (conv-BN-act-conv-BN plus shortcut, then act)."""

    stage_channels: Sequence[int] = (16, 32)
    blocks_per_stage: int = 1

    def _blocks(self):
        """``(name, channels, stride, has_projection_shortcut)`` of every block, in order."""
        out, prev = [], self.stage_channels[0]
        for s, c in enumerate(self.stage_channels):
            for b in range(self.blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                out.append((f"block{s}_{b}", c, stride, stride != 1 or c != prev))
                prev = c
        return out

    @nn.compact
    def __call__(self, x, train: bool = True):
        act = ACTIVATIONS[self.preset.activation]
        affine = self.preset.inner_affine is not None
        conv_bn = functools.partial(self._layer_bn, kind="conv", train=train, affine=affine)
        x = act(conv_bn(x, features=self.stage_channels[0], name="stem", bn_name="stem_bn"))
        for name, c, stride, project in self._blocks():
            y = act(conv_bn(x, features=c, name=f"{name}_conv1", bn_name=f"{name}_bn1", stride=stride))
            y = conv_bn(y, features=c, name=f"{name}_conv2", bn_name=f"{name}_bn2")
            if project:
                x = conv_bn(x, features=c, name=f"{name}_proj", bn_name=f"{name}_proj_bn", kernel_size=1,
                            stride=stride)
            x = act(x + y)
        return self._head(jnp.mean(x, axis=(1, 2)), train)

    def labels(self, grouping: str = "layer") -> dict:
        self._check_grouping(grouping)
        kind, stream = self.preset.inner_affine, "residual_stream:affine"
        tree = {"stem": self._layer_labels("stem", grouping), **self._affine_labels("stem_bn", kind, stream)}
        for name, _, _, project in self._blocks():
            convs = ("conv1", "conv2") + (("proj",) if project else ())
            for conv in convs:
                tree[f"{name}_{conv}"] = self._layer_labels(f"{name}_{conv}", grouping)
            tree.update(self._affine_labels(f"{name}_bn1", kind))
            tree.update(self._affine_labels(f"{name}_bn2", kind, stream))
            if project:
                tree.update(self._affine_labels(f"{name}_proj_bn", kind, stream))
        tree.update(self._head_labels(grouping))
        return tree


def _check_conv_impl(name: str) -> str:
    """``name`` if it is one of :data:`CONV_IMPLS`, else a ``ValueError`` listing them."""
    if name not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {name!r}; known: {', '.join(CONV_IMPLS)}")
    return name


def for_loops(model: nn.Module) -> nn.Module:
    """``model`` for programs that apply it inside a loop body (``lax.scan``, ``fori_loop``): on the CPU
    backend a model with ``conv_impl='auto'`` becomes the same model with ``'im2col'`` (no convolution op,
    so no naive in-loop kernel: :data:`CONV_IMPLS`); a model with another ``conv_impl``, or none, is returned as
    it is. Same
    parameters, same function to round-off."""
    if getattr(model, "conv_impl", None) == "auto" and jax.default_backend() == "cpu":
        return model.clone(conv_impl="im2col")
    return model


def _positive_ints(name: str, values) -> tuple[int, ...]:
    """``values`` as a non-empty tuple of positive ints, or a ``ValueError`` naming ``name``."""
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")
    return values


def mlp(widths: Sequence[int] = (64, 64), **kw) -> BNNet:
    """Dense -> BN -> act for each width, then the head."""
    return BNNet(units=tuple(Unit("dense", w) for w in _positive_ints("widths", widths)), **kw)


def convnet(channels: Sequence[int] = (16, 32, 64), **kw) -> BNNet:
    """3x3 stride-2 convolutions, global average pool, head."""
    units = [Unit("conv", c, stride=2) for c in _positive_ints("channels", channels)]
    units[-1] = dataclasses.replace(units[-1], pool="global")
    return BNNet(units=tuple(units), **kw)


def vgg(config: Sequence[int | str] = (32, "M", 64, "M", 128, 128, "M"), **kw) -> BNNet:
    """VGG-style: 3x3 stride-1 convolutions, ``'M'`` = 2x2 max-pool after the previous convolution."""
    units: list[Unit] = []
    _positive_ints("vgg config", [c for c in config if c != "M"])
    if not config or config[0] == "M":
        raise ValueError(f"vgg config must start with a channel count, got {config!r}")
    for item in config:
        if item == "M":
            units[-1] = dataclasses.replace(units[-1], pool="max")
        else:
            units.append(Unit("conv", int(item)))
    return BNNet(units=tuple(units), **kw)


def resnet(stage_channels: Sequence[int] = (16, 32), blocks_per_stage: int = 1, **kw) -> ResNet:
    """Small ResNet: stem, ``blocks_per_stage`` basic blocks per stage (stride 2 between stages)."""
    _positive_ints("blocks_per_stage", blocks_per_stage)
    return ResNet(stage_channels=_positive_ints("stage_channels", stage_channels),
                  blocks_per_stage=blocks_per_stage, **kw)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "convnet": convnet, "vgg": vgg,
                                                      "resnet": resnet}


def build(arch: str, preset: str = "paper", *, bn: str | None = None, **kw) -> _BNNetBase:
    """The model ``arch`` under ``preset``; ``bn`` overrides the preset's BN variant (e.g. ``'standard'``).

    Example::

        model = build("mlp", "paper", num_classes=10, widths=(32,))
        variables = model.init(jax.random.key(0), x)
        labels = model.labels("channel")
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    _check_conv_impl(kw.get("conv_impl", "auto"))
    if bn is not None:
        if spec.bn is None:
            raise ValueError(f"preset {preset!r} has no BatchNorm to replace with {bn!r}")
        if bn not in layers.BN_VARIANTS:
            raise ValueError(f"unknown BatchNorm variant {bn!r}; known: {', '.join(layers.BN_VARIANTS)}")
        spec = dataclasses.replace(spec, bn=bn)
    return ARCHITECTURES[arch](preset=spec, **kw)


def batch_loss(model: nn.Module, params, batch_stats, x, y, train: bool = True):
    """Mean softmax cross-entropy ``F_z(theta)`` on the batch ``(x, y)``.

    Train mode normalises with the batch statistics (where scale invariance holds) and also returns the
    updated running statistics; eval mode uses the running statistics.

    Returns:
      ``(loss, (logits, new_batch_stats))``.
    """
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        new_stats = updates.get("batch_stats", batch_stats)
    else:
        logits, new_stats = model.apply(variables, x, train=False), batch_stats
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, new_stats)
