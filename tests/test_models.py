"""Presets yield labels that verify_labels accepts on a real batch in float64, and wrong labels are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rate_tuning import groups as G, models
from tests.helpers import TINY, build, digits_batch

@pytest.mark.parametrize("arch", [a if a in ("mlp", "convnet") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in TINY])
@pytest.mark.parametrize("preset", list(models.PRESETS))
def test_preset_labels_verify_in_float64(x64, arch, preset):
    model, params, loss = build(arch, preset)
    for grouping in models.GROUPINGS:
        labels = model.labels(grouping)
        report = G.verify_labels(loss, params, labels)
        n_si = len(G.si_groups(params, labels))
        assert len(report) == n_si
        if preset == "no_bn":
            assert n_si == 0
        else:
            assert n_si > 0
            # sqrt(eps) is the default tolerance; exact BN keeps both measures at round-off (~1e-15).
            assert max(max(r.values()) for r in report.values()) < 1e-12


@pytest.mark.parametrize("arch", list(TINY))
def test_channel_grouping_makes_every_kernel_per_channel(arch):
    model = models.build(arch, "paper", num_classes=10, **TINY[arch])
    flat = jax.tree_util.tree_leaves(model.labels("channel"), is_leaf=G.is_label)
    kernels = [l for l in flat if l.kind == G.SI and l.group.endswith(":kernel")]
    assert kernels and all(l.per_channel for l in kernels)
    affine = [l for l in flat if l.kind == G.SI and not l.group.endswith(":kernel")]
    assert affine and not any(l.per_channel for l in affine)


def relabel(labels, path, label):
    """A copy of ``labels`` with the leaves under ``path`` (a key tuple) replaced by ``label``."""
    out = jax.tree_util.tree_map(lambda l: l, labels, is_leaf=G.is_label)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = jax.tree_util.tree_map(lambda _: label, node[path[-1]], is_leaf=G.is_label)
    return out


WRONG = [
    # (arch, preset, bn, path to relabel, the path the error must name)
    ("mlp", "paper", None, ("bn_out",), "bn_out/bias, bn_out/scale"),            # last BN is scale-variant
    ("convnet", "paper", None, ("bn_out", "scale"), "bn_out/scale"),            # gamma alone, last BN
    ("mlp", "no_bn", None, ("layer0", "kernel"), "layer0/kernel"),              # no BN: not SI
    ("vgg", "smoothed", None, ("bn0",), "bn0/bias, bn0/scale"),                 # softplus breaks homogeneity
    ("resnet", "paper", None, ("block1_0_bn2",), "block1_0_bn2/bias, block1_0_bn2/scale"),  # only jointly SI
    ("mlp", "fully_si", None, ("classifier", "kernel"), "classifier/kernel"),   # frozen head is not SI
]


@pytest.mark.parametrize("arch,preset,bn,path,named",
                         [w if w[0] in ("mlp", "convnet") else pytest.param(*w, marks=pytest.mark.slow) for w in WRONG])
def test_wrong_si_label_is_rejected_naming_the_path(x64, arch, preset, bn, path, named):
    model, params, loss = build(arch, preset, bn)
    labels = relabel(model.labels("layer"), path, G.si("wrong"))
    with pytest.raises(G.LabelError) as err:
        G.verify_labels(loss, params, labels)
    msg = str(err.value)
    assert named in msg and "\n" not in msg and "group 'wrong'" in msg


def test_standard_epsilon_bn_breaks_kernel_invariance(x64):
    """Flax's epsilon = 1e-5 BN: the kernel labels of the paper preset are rejected (claim C19's control)."""
    model, params, loss = build("mlp", "fully_si", bn="standard")
    with pytest.raises(G.LabelError, match="not scale-invariant"):
        G.verify_labels(loss, params, model.labels("layer"))


def test_label_tree_mismatch_is_named():
    model = models.build("mlp", "paper", num_classes=10, **TINY["mlp"])
    x, _ = digits_batch()
    params = model.init(jax.random.key(0), x)["params"]
    labels = model.labels("layer")
    del labels["bn_out"]
    with pytest.raises(G.LabelError, match="no label for parameter bn_out/bias"):
        G.flatten_labelled(params, labels)
    labels = model.labels("layer")
    labels["extra"] = {"kernel": G.VARIANT_LABEL}
    with pytest.raises(G.LabelError, match="extra/kernel, which is not a parameter"):
        G.flatten_labelled(params, labels)


@pytest.mark.parametrize("bad", [dict(arch="transformer"), dict(preset="huge"), dict(bn="layernorm"),
                                 dict(preset="no_bn", bn="exact"), dict(widths=("a",)), dict(widths=(0,)),
                                 dict(widths=()), dict(arch="convnet", channels=(4, -1)),
                                 dict(arch="vgg", config=("M", 4)), dict(arch="resnet", blocks_per_stage=0),
                                 dict(arch="convnet", conv_impl="fft")])
def test_build_rejects_unknown_names(bad):
    kw = dict(arch="mlp", preset="paper") | bad
    with pytest.raises(ValueError):
        models.build(**kw)


def test_eval_mode_uses_running_statistics():
    model = models.build("mlp", "paper", num_classes=10, **TINY["mlp"])
    x, y = digits_batch()
    v = model.init(jax.random.key(0), x)
    loss_train, (_, stats) = models.batch_loss(model, v["params"], v["batch_stats"], x, y, train=True)
    loss_eval, (_, same) = models.batch_loss(model, v["params"], v["batch_stats"], x, y, train=False)
    assert same is v["batch_stats"]
    assert not np.allclose(loss_train, loss_eval)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), stats, v["batch_stats"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0
