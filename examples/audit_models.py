"""Models a user might bring to ``rate-tuning audit``: factories of the form the audit takes.

Each factory returns ``(model, variables, batch)`` (flax linen) or ``(model, batch)`` (flax NNX), on a
small batch (8x8 digits images, or random tokens for the transformer), so the audit runs in seconds::

    rate-tuning audit examples/audit_models.py:groupnorm_resnet
    python -m proofs_check --model examples/audit_models.py:nnx_batchnorm --quick

The groups each model must have are derived by hand in ``docs/derivations.md`` ("Auditing a model") and
checked in ``tests/test_audit.py``; ``EXPECTED`` lists them here (leaf paths; ``'channel'``: every output
channel its own group).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rate_tuning import data

BATCH = 32


def digits(n: int = BATCH):
    """``(x, y)``: ``n`` scikit-learn digits images ``(n, 8, 8, 1)`` and their labels."""
    ds = data.digits(seed=0)
    return np.asarray(ds.x_train[:n], np.float32), np.asarray(ds.y_train[:n])


class GroupNormResNet(nn.Module):
    """conv -> GroupNorm -> ReLU stem, basic blocks (projection shortcut when the shape changes), global
    average pooling and a linear head with bias. ``epsilon=0``: exact GroupNorm."""

    channels: tuple = (8, 16)
    num_groups: int = 2
    num_classes: int = 10
    epsilon: float = 0.0

    @nn.compact
    def __call__(self, x):
        conv = lambda f, s, name, k=3: nn.Conv(f, (k, k), strides=s, padding="SAME", use_bias=False,  # noqa: E731
                                               name=name)
        gn = lambda name: nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, name=name)  # noqa: E731
        x = nn.relu(gn("stem_gn")(conv(self.channels[0], 1, "stem")(x)))
        for s, c in enumerate(self.channels):
            stride = 1 if s == 0 else 2
            y = nn.relu(gn(f"block{s}_gn1")(conv(c, stride, f"block{s}_conv1")(x)))
            y = gn(f"block{s}_gn2")(conv(c, 1, f"block{s}_conv2")(y))
            if stride != 1 or c != x.shape[-1]:
                x = gn(f"block{s}_proj_gn")(conv(c, stride, f"block{s}_proj", k=1)(x))
            x = nn.relu(x + y)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class TransformerBlock(nn.Module):
    """A one-block causal language model: token and position embeddings, self-attention and a ReLU MLP on a
    residual stream, LayerNorm before each branch and at the end (``pre_norm``) or after each residual
    sum (post-norm), and a linear head with bias. ``epsilon=0``: exact LayerNorm."""

    pre_norm: bool = True
    vocab: int = 16
    width: int = 16
    heads: int = 2
    hidden: int = 32
    length: int = 8
    epsilon: float = 0.0

    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.5), (self.length, self.width))
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens) + pos[:tokens.shape[-1]]
        ln = lambda name: nn.LayerNorm(epsilon=self.epsilon, name=name)  # noqa: E731
        mask = nn.make_causal_mask(tokens)
        attn = lambda h: nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, mask=mask)  # noqa: E731
        mlp = lambda h: nn.Dense(self.width, name="mlp_out")(  # noqa: E731
            nn.relu(nn.Dense(self.hidden, name="mlp_in")(h)))
        if self.pre_norm:
            x = x + attn(ln("ln1")(x))
            x = ln("ln_f")(x + mlp(ln("ln2")(x)))
        else:
            x = ln("ln1")(x + attn(x))
            x = ln("ln2")(x + mlp(x))
        return nn.Dense(self.vocab, name="head")(x)


class WeightNormMLP(nn.Module):
    """Dense layers reparametrised by ``flax.linen.WeightNorm`` (``W = g v / ||v||`` per output column),
    ReLU between them. ``epsilon=0``: exact weight normalisation."""

    widths: tuple = (32, 32)
    num_classes: int = 10
    epsilon: float = 0.0

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for w in self.widths:
            x = nn.relu(nn.WeightNorm(nn.Dense(w), epsilon=self.epsilon)(x))
        return nn.WeightNorm(nn.Dense(self.num_classes), epsilon=self.epsilon)(x)


class PlainMLP(nn.Module):
    """No normalisation anywhere: no scale-invariant group."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class NoParams(nn.Module):
    """No parameters at all: the audit refuses it."""

    @nn.compact
    def __call__(self, x):
        return x.reshape(x.shape[0], -1)[:, :10]


class NNXBatchNormNet(nnx.Module):
    """flax NNX: Linear (no bias) -> BatchNorm -> ReLU, twice, then a Linear head with bias."""

    def __init__(self, din: int = 64, hidden: int = 16, classes: int = 10, epsilon: float = 0.0, *,
                 rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(hidden, epsilon=epsilon, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(hidden, epsilon=epsilon, rngs=rngs)
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.l1(x.reshape(x.shape[0], -1))))
        return self.head(nnx.relu(self.bn2(self.l2(x))))


def _linen(model, x, y):
    return model, model.init(jax.random.key(0), x), (x, y)


def groupnorm_resnet():
    return _linen(GroupNormResNet(), *digits())


def transformer(pre_norm: bool = True, epsilon: float = 0.0):
    tokens = np.random.default_rng(0).integers(0, 16, (BATCH, 9))
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = TransformerBlock(pre_norm=pre_norm, epsilon=epsilon)
    return model, model.init(jax.random.key(0), x), (x, y)


def transformer_pre_norm():
    return transformer(True)


def transformer_post_norm():
    return transformer(False)


def transformer_pre_norm_default_epsilon():
    """flax's default LayerNorm epsilon (1e-6): the residual stream is only almost invariant."""
    return transformer(True, epsilon=1e-6)


def weightnorm_mlp():
    return _linen(WeightNormMLP(), *digits())


def plain_mlp():
    return _linen(PlainMLP(), *digits())


def no_params():
    return _linen(NoParams(), *digits())


def nnx_batchnorm():
    return NNXBatchNormNet(rngs=nnx.Rngs(0)), digits()


def nnx_batchnorm_default_epsilon():
    """nnx.BatchNorm's default epsilon (1e-5): kernels and the inner (scale, bias) only almost invariant."""
    return NNXBatchNormNet(epsilon=1e-5, rngs=nnx.Rngs(0)), digits()


def raises():
    raise RuntimeError("this factory fails on purpose")


def wrong_batch():
    """The GroupNorm ResNet with a batch of flat vectors instead of images."""
    model, variables, (x, y) = groupnorm_resnet()
    return model, variables, (x.reshape(x.shape[0], -1), y)


_STREAM_0 = ("block0_gn2/bias", "block0_gn2/scale", "stem_gn/bias", "stem_gn/scale")
EXPECTED = {
    "groupnorm_resnet": {
        "si": [("stem/kernel",), ("block0_conv1/kernel",), ("block0_conv2/kernel",), ("block1_conv1/kernel",),
               ("block1_conv2/kernel",), ("block1_proj/kernel",), ("block0_gn1/bias", "block0_gn1/scale"),
               ("block1_gn1/bias", "block1_gn1/scale"), _STREAM_0],
        "channel": []},
    "transformer_pre_norm": {
        "si": [("attn/out/bias", "attn/out/kernel", "embed/embedding", "mlp_out/bias", "mlp_out/kernel", "pos")],
        "channel": []},
    "transformer_post_norm": {
        "si": [("ln1/bias", "ln1/scale", "mlp_in/bias", "mlp_out/bias")], "channel": []},
    "weightnorm_mlp": {
        "si": [("Dense_0/kernel",), ("Dense_1/kernel",), ("Dense_2/kernel",)],
        "channel": ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]},
    "nnx_batchnorm": {
        "si": [("l1/kernel",), ("l2/kernel",), ("bn1/bias", "bn1/scale")], "channel": ["l1/kernel", "l2/kernel"]},
    "plain_mlp": {"si": [], "channel": []},
}
"""The scale-invariant groups derived by hand (docs/derivations.md, "Auditing a model")."""
