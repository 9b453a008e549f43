"""PyTorch peers of :mod:`rate_tuning.models` (preset ``'paper'``) and of the two-rate SGD step, for timing.

Optional: needs the ``bench`` extra (``pip install torch==2.13.0``, pinned: an unpinned ``torch`` pulls a
multi-GB CUDA build). Nothing in ``rate_tuning`` imports this module.

Same network, built from the linen model object itself (:func:`from_jax_model` reads its ``units`` or its
ResNet stages), so the two cannot drift apart:

* layers: bias-free ``Linear`` / ``Conv2d`` (3x3 'SAME', the unit's stride), then **exact BatchNorm**
  (batch mean, biased two-pass variance, epsilon = 0: ``torch.nn.functional.batch_norm`` refuses
  ``eps=0`` in training, "batch_norm eps must be positive during training", so BN is written out with the
  same four operations as :class:`rate_tuning.layers.BatchNorm`; running statistics are updated with the
  same momentum), ReLU, 2x2 max-pool or global average pool; the App. D head (bias-free linear classifier
  then ``bn_out``). ResNet: stem, basic blocks with 1x1 projection shortcuts, as
  :class:`rate_tuning.models.ResNet`.
* update: ``torch.optim.SGD`` with two parameter groups: every ``'si'`` parameter of the JAX label tree at
  ``lr_w``, every ``'variant'`` one at ``lr_g`` (no momentum, no weight decay: Lemma 2.4's update);
  ``'frozen'`` parameters get ``requires_grad=False``.
* layout: NCHW (PyTorch's native layout) or ``channels_last`` (NHWC memory, often faster for oneDNN on
  CPU); see :func:`make_step`.

Padding: XLA's 'SAME' for a stride-2 3x3 convolution on an even size pads 0 before and 1 after;
``Conv2d(padding=1)`` pads 1 on both sides (same output size and cost, windows shifted by one pixel). The
timed model uses ``padding=1`` (how one writes it in PyTorch); ``exact_padding=True`` pads like XLA, and is
what :func:`check_parity` uses to show that the two implementations compute the same step.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ExactBatchNorm(nn.Module):
    """``gamma (x - mu) / sigma + beta`` over every axis but the channel axis (dim 1), epsilon = 0,
    two-pass biased variance; running statistics ``m <- momentum m + (1 - momentum) batch`` (flax style)."""

    def __init__(self, features: int, affine: bool = True, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x):
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = x.mean(dim=dims, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dim=dims, keepdim=True)
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean.reshape(-1))
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var.reshape(-1))
        y = xc * torch.rsqrt(var)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


class _Conv(nn.Module):
    def __init__(self, cin, cout, k, stride, exact_padding):
        super().__init__()
        self.k, self.stride, self.exact = k, stride, exact_padding
        pad = 0 if exact_padding else (k - 1) // 2
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False)

    def forward(self, x):
        if self.exact:  # XLA 'SAME': total padding max((ceil(n/s)-1) s + k - n, 0), the extra pixel after
            pads = []
            for n in (x.shape[3], x.shape[2]):
                total = max((math.ceil(n / self.stride) - 1) * self.stride + self.k - n, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return self.conv(x)


class TorchBNNet(nn.Module):
    """A chain of units (``kind, features, kernel_size, stride, pool``) and the App. D head."""

    def __init__(self, units, in_shape, num_classes=10, exact_padding=False):
        super().__init__()
        self.units = list(units)
        self.layers, self.bns = nn.ModuleDict(), nn.ModuleDict()
        shape = tuple(in_shape)  # (C, H, W) or (D,)
        for i, u in enumerate(self.units):
            if u.kind == "dense":
                fan_in = int(np.prod(shape))
                self.layers[f"layer{i}"] = nn.Linear(fan_in, u.features, bias=False)
                shape = (u.features,)
            else:
                c, h, w = shape
                self.layers[f"layer{i}"] = _Conv(c, u.features, u.kernel_size, u.stride, exact_padding)
                h, w = math.ceil(h / u.stride), math.ceil(w / u.stride)
                if u.pool == "max":
                    h, w = h // 2, w // 2
                shape = (u.features,) if u.pool == "global" else (u.features, h, w)
            self.bns[f"bn{i}"] = ExactBatchNorm(u.features)
        self.classifier = nn.Linear(int(np.prod(shape)), num_classes, bias=False)
        self.bn_out = ExactBatchNorm(num_classes)

    def forward(self, x):
        for i, u in enumerate(self.units):
            x = F.relu(self.bns[f"bn{i}"](self.layers[f"layer{i}"](x.flatten(1) if u.kind == "dense" else x)))
            if u.pool == "max":
                x = F.max_pool2d(x, 2, 2)
            elif u.pool == "global":
                x = x.mean(dim=(2, 3))
        if x.ndim == 4:  # flatten in NHWC order, like the linen model
            x = x.permute(0, 2, 3, 1)
        return self.bn_out(self.classifier(x.flatten(1)))


class TorchResNet(nn.Module):
    """:class:`rate_tuning.models.ResNet`: stem, basic blocks (conv-BN-ReLU-conv-BN + shortcut, ReLU)."""

    def __init__(self, blocks, stem_channels, in_channels, num_classes=10, exact_padding=False):
        super().__init__()
        self.blocks = list(blocks)  # (name, channels, stride, project)
        self.layers, self.bns = nn.ModuleDict(), nn.ModuleDict()
        self.layers["stem"] = _Conv(in_channels, stem_channels, 3, 1, exact_padding)
        self.bns["stem_bn"] = ExactBatchNorm(stem_channels)
        prev = stem_channels
        for name, c, stride, project in self.blocks:
            self.layers[f"{name}_conv1"] = _Conv(prev, c, 3, stride, exact_padding)
            self.bns[f"{name}_bn1"] = ExactBatchNorm(c)
            self.layers[f"{name}_conv2"] = _Conv(c, c, 3, 1, exact_padding)
            self.bns[f"{name}_bn2"] = ExactBatchNorm(c)
            if project:
                self.layers[f"{name}_proj"] = _Conv(prev, c, 1, stride, exact_padding)
                self.bns[f"{name}_proj_bn"] = ExactBatchNorm(c)
            prev = c
        self.classifier = nn.Linear(prev, num_classes, bias=False)
        self.bn_out = ExactBatchNorm(num_classes)

    def forward(self, x):
        x = F.relu(self.bns["stem_bn"](self.layers["stem"](x)))
        for name, _, _, project in self.blocks:
            y = F.relu(self.bns[f"{name}_bn1"](self.layers[f"{name}_conv1"](x)))
            y = self.bns[f"{name}_bn2"](self.layers[f"{name}_conv2"](y))
            if project:
                x = self.bns[f"{name}_proj_bn"](self.layers[f"{name}_proj"](x))
            x = F.relu(x + y)
        return self.bn_out(self.classifier(x.mean(dim=(2, 3))))


def from_jax_model(model, input_shape, exact_padding: bool = False) -> nn.Module:
    """The PyTorch network of the linen ``model`` (a ``BNNet`` or ``ResNet`` of preset ``'paper'``) for
    inputs of shape ``input_shape`` (one example, JAX layout: ``(H, W, C)`` or ``(D,)``)."""
    preset = model.preset
    if preset.bn != "exact" or preset.activation != "relu" or preset.head != "bn" or preset.inner_affine != "si":
        raise ValueError(f"only the 'paper' preset has a PyTorch peer, got {preset}")
    if hasattr(model, "units"):
        shape = (int(np.prod(input_shape)),) if model.units[0].kind == "dense" else \
            (input_shape[2], input_shape[0], input_shape[1])
        return TorchBNNet(model.units, shape, model.num_classes, exact_padding)
    return TorchResNet(model._blocks(), model.stage_channels[0], input_shape[2], model.num_classes, exact_padding)


# ------------------------------------------------------------------------------------------------
# Parameters: names, labels, copies from JAX.


def _torch_name(path: str) -> tuple[str, str]:
    """JAX param path ``'layer0/kernel'`` -> (torch module path, attribute)."""
    module, leaf = path.rsplit("/", 1)
    if module in ("classifier", "bn_out"):
        prefix = module
    elif "bn" in module.split("_")[-1] or module.startswith("bn"):
        prefix = f"bns.{module}"
    else:
        prefix = f"layers.{module}"
    return prefix, {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def _jax_leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _jax_leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _param(module: nn.Module, path: str) -> nn.Parameter:
    prefix, attr = _torch_name(path)
    m = module.get_submodule(prefix)
    if isinstance(m, _Conv):
        m = m.conv
    return getattr(m, attr)


def load_jax_params(module: nn.Module, params) -> None:
    """Copy linen ``params`` into ``module`` (Dense ``(in, out)`` -> ``(out, in)``; Conv HWIO -> OIHW)."""
    with torch.no_grad():
        for path, value in _jax_leaves(params):
            p = _param(module, path)
            v = np.asarray(value)
            if v.ndim == 2:
                v = v.T
            elif v.ndim == 4:
                v = v.transpose(3, 2, 0, 1)
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{path}: JAX shape {v.shape} (converted) vs PyTorch {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.array(v, copy=True)).to(p.dtype))


def param_groups(module: nn.Module, labels, lr_w: float, lr_g: float) -> list[dict]:
    """``torch.optim.SGD`` groups from the JAX label tree: ``'si'`` at ``lr_w``, ``'variant'`` at ``lr_g``;
    ``'frozen'`` parameters are switched off (``requires_grad=False``). Every parameter must be labelled."""
    si, variant, seen = [], [], set()
    for path, label in _jax_leaves(labels):
        p = _param(module, path)
        seen.add(id(p))
        if label.kind == "si":
            si.append(p)
        elif label.kind == "variant":
            variant.append(p)
        else:
            p.requires_grad_(False)
    missing = [n for n, p in module.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(f"PyTorch parameters without a JAX label: {missing}")
    return [g for g in ({"params": si, "lr": lr_w}, {"params": variant, "lr": lr_g}) if g["params"]]


# ------------------------------------------------------------------------------------------------
# The step.


def make_step(model, labels, input_shape, *, lr_w: float = 0.1, lr_g: float = 0.1, dtype=torch.float32,
              device: str | torch.device = "cpu", channels_last: bool = False, compile: bool = False,
              exact_padding: bool = False, seed: int = 0
              ) -> tuple[Callable[[Any, Any], Any], nn.Module, torch.optim.Optimizer]:
    """``(step, module, optimizer)``: ``step(x, y)`` does one two-rate SGD step on a batch (torch tensors on
    ``device`` in the module's layout: NCHW, or NCHW with ``channels_last`` memory) and returns the loss
    tensor. Parameters, BN statistics and activations are all in ``dtype`` (``torch.bfloat16`` too: the
    same as the JAX model built with ``param_dtype=jnp.bfloat16`` on bfloat16 inputs).

    ``compile=True`` wraps forward and backward in ``torch.compile`` (the optimizer step stays eager).
    """
    torch.manual_seed(seed)
    module = from_jax_model(model, input_shape, exact_padding).to(device=device, dtype=dtype)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(module, labels, lr_w, lr_g), lr=lr_w, momentum=0.0)

    def loss_fn(x, y):
        return F.cross_entropy(module(x), y)

    fwd = torch.compile(loss_fn) if compile else loss_fn

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        return loss

    module.train()
    return step, module, opt


def to_torch_batch(x: np.ndarray, y: np.ndarray, dtype=torch.float32, channels_last: bool = False,
                   device: str | torch.device = "cpu"):
    """A JAX-layout numpy batch (``NHWC`` or ``(N, D)``) as torch tensors (``NCHW``) on ``device``."""
    xt = torch.from_numpy(np.array(x, copy=True)).to(device=device, dtype=dtype)
    if xt.ndim == 4:
        xt = xt.permute(0, 3, 1, 2)
        xt = xt.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return xt, torch.from_numpy(np.asarray(y)).long().to(device)


def check_parity(model, params, labels, x: np.ndarray, y: np.ndarray, lr_w: float, lr_g: float):
    """One two-rate SGD step in float64 from the same params in both frameworks: returns
    ``(|loss difference|, max relative difference of the updated params)``. Uses the rate_tuning step
    (:func:`rate_tuning.steps.make_train_step` logic: loss, gradient, :func:`rate_tuning.optim.two_rate_sgd`)."""
    import jax
    import jax.numpy as jnp
    import optax

    from rate_tuning import models, optim

    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        stats = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       jax.jit(model.init)(jax.random.key(0), jnp.asarray(x[:2]))["batch_stats"])
        model64 = model.clone(param_dtype=jnp.float64)
        xs, ys = jnp.asarray(x, jnp.float64), jnp.asarray(y)
        (loss, _), g = jax.jit(jax.value_and_grad(lambda p: models.batch_loss(model64, p, stats, xs, ys, True),
                                                  has_aux=True))(p64)
        tx = optim.two_rate_sgd(labels, lr_w, lr_g)
        updates, _ = tx.update(g, tx.init(p64), p64)
        new = jax.device_get(optax.apply_updates(p64, updates))
        loss = float(loss)
    step, module, _ = make_step(model, labels, x.shape[1:], lr_w=lr_w, lr_g=lr_g, dtype=torch.float64,
                                exact_padding=True)
    load_jax_params(module, jax.device_get(params))
    xt, yt = to_torch_batch(x, y, torch.float64)
    t_loss = float(step(xt, yt).detach())
    worst = 0.0
    for path, value in _jax_leaves(new):
        p = _param(module, path).detach().numpy()
        v = np.asarray(value)
        v = v.T if v.ndim == 2 else v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
        worst = max(worst, float(np.max(np.abs(p - v)) / max(np.max(np.abs(v)), 1e-30)))
    return abs(t_loss - loss), worst


__all__ = ["ExactBatchNorm", "TorchBNNet", "TorchResNet", "check_parity", "from_jax_model", "load_jax_params",
           "make_step", "param_groups", "to_torch_batch"]
