"""rate_tuning.testing: the assertions pass where the lemmas hold and fail, naming the parameter path, the
measured value and the bound, where a hypothesis is broken."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from rate_tuning import groups as G, models, optim, testing
from tests.helpers import TINY, digits_batch

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def net():
    x, y = digits_batch()
    model = models.build("mlp", "paper", num_classes=10, **TINY["mlp"])
    variables = model.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    loss = lambda p: models.batch_loss(model, p, stats, jnp.asarray(x), jnp.asarray(y))[0]  # noqa: E731
    return model, variables["params"], loss


def bound_of(message: str) -> tuple[float, float]:
    measured = float(re.search(r"= ([0-9.e+-]+)", message).group(1))
    bound = float(re.search(r"bound ([0-9.e+-]+)", message).group(1))
    return measured, bound


@pytest.mark.parametrize("grouping", ["layer", "channel"])
def test_lemmas_hold_on_the_preset_labels(net, grouping):
    model, params, loss = net
    labels = model.labels(grouping)
    inv = testing.assert_scale_invariant(loss, params, labels)
    cos = testing.assert_gradient_orthogonal(loss, params, labels)
    assert set(inv) == set(cos) == set(G.si_groups(params, labels))
    tx = optim.two_rate_sgd(labels, 1.0, 0.1)
    growth = testing.assert_norm_growth(loss, params, labels, tx, steps=3)
    assert max(growth.values()) < 1e-13
    rise = testing.assert_effective_lr_nonincreasing(loss, params, labels, tx, steps=3)
    assert max(rise.values()) < 0  # the norms grew: the effective rates fell


def test_groups_as_paths(net):
    _, params, loss = net
    testing.assert_scale_invariant(loss, params, ["layer0/kernel", ("bn0/scale", "bn0/bias")])
    testing.assert_gradient_orthogonal(loss, params, "layer1/kernel")


def test_scale_invariance_failure_names_path_value_and_bound(net):
    _, params, loss = net
    with pytest.raises(AssertionError) as err:
        testing.assert_scale_invariant(loss, params, [("bn_out/scale", "bn_out/bias"), "layer0/kernel"])
    msg = str(err.value)
    assert msg.startswith("assert_scale_invariant: bn_out/bias, bn_out/scale (group") and "layer0" not in msg
    measured, bound = bound_of(msg)
    assert measured > 1e-3 and 0 < bound < 1e-11 and "at c = " in msg and "float64" in msg


def test_orthogonality_failure_names_path_value_and_bound(net):
    _, params, loss = net
    with pytest.raises(AssertionError, match=r"bn_out/scale \(group 'bn_out/scale'\): \|cos\(grad, w\)\|") as err:
        testing.assert_gradient_orthogonal(loss, params, ["bn_out/scale", "layer0/kernel"])
    measured, bound = bound_of(str(err.value))
    assert measured > 1e-3 > 1e-11 > bound > 0


@pytest.mark.parametrize("tx_kw,what", [({"weight_decay": 1e-2}, "weight decay"), ({"momentum": 0.9}, "momentum")])
def test_norm_growth_fails_under_weight_decay_and_momentum(net, tx_kw, what):
    model, params, loss = net
    labels = model.labels("channel")
    tx = optim.two_rate_sgd(labels, 1.0, 0.1, **tx_kw)
    with pytest.raises(AssertionError, match="not orthogonal to w") as err:
        testing.assert_norm_growth(loss, params, labels, tx, steps=3)
    assert "layer0/kernel (group 'layer0:kernel') at step" in str(err.value)
    measured, bound = bound_of(str(err.value))
    assert measured > 1e3 * bound


def test_effective_lr_fails_for_adamw(net):
    model, params, loss = net
    labels = model.labels("layer")
    with pytest.raises(AssertionError, match="effective rate lr_w / \\|\\|w\\|\\|\\^2 grew by a factor"):
        testing.assert_effective_lr_nonincreasing(loss, params, labels, optax.adamw(0.1, weight_decay=0.5), steps=3)


def test_effective_lr_with_a_schedule_and_batches(net):
    model, params, loss = net
    x, y = digits_batch()
    labels = model.labels("layer")
    batches = [(jnp.asarray(x[i:i + 8]), jnp.asarray(y[i:i + 8])) for i in range(0, 32, 8)]
    stats = model.init(jax.random.key(0), x)["batch_stats"]
    batch_loss = lambda p, b: models.batch_loss(model, p, stats, *b)[0]  # noqa: E731
    tx = optim.two_rate_sgd(labels, optim.inverse_sqrt(1.0), 0.1)
    testing.assert_norm_growth(batch_loss, params, labels, tx, steps=4, batches=batches)
    testing.assert_effective_lr_nonincreasing(batch_loss, params, labels, tx, lr_w=optim.inverse_sqrt(1.0), steps=4,
                                              batches=batches)
    with pytest.raises(ValueError, match="4 steps need 4 batches"):
        testing.assert_norm_growth(batch_loss, params, labels, tx, steps=4, batches=batches[:2])


def test_float32_tolerance_is_wider_and_still_passes(net):
    model, params, loss = net
    labels = model.labels("layer")
    worst64 = testing.assert_gradient_orthogonal(loss, params, labels)
    worst32 = testing.assert_gradient_orthogonal(loss, params, labels, x64=False)
    assert max(worst32.values()) > max(worst64.values())


def test_standard_bn_fails_in_float64(net):
    x, y = digits_batch()
    model = models.build("mlp", "paper", bn="standard", num_classes=10, **TINY["mlp"])
    variables = model.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    loss = lambda p: models.batch_loss(model, p, stats, jnp.asarray(x), jnp.asarray(y))[0]  # noqa: E731
    with pytest.raises(AssertionError, match="layer0/kernel"):
        testing.assert_scale_invariant(loss, variables["params"], ["layer0/kernel"])


def test_unknown_path_and_same_groups(net):
    model, params, loss = net
    with pytest.raises(ValueError, match="no parameter 'layer9/kernel'"):
        testing.assert_scale_invariant(loss, params, ["layer9/kernel"])
    testing.assert_same_groups(params, model.labels("layer"), model.labels("layer"))
    missing = jax.tree_util.tree_map(lambda l: G.VARIANT_LABEL if l.group == "bn0:affine" else l,
                                     model.labels("channel"), is_leaf=G.is_label)
    with pytest.raises(AssertionError, match="expected group .*bn0/bias.* was not found"):
        testing.assert_same_groups(params, missing, model.labels("channel"))


def test_a_zero_group_is_refused(net):
    _, params, loss = net
    with pytest.raises(AssertionError, match="'bn_out/bias' are zero at the given parameters"):
        testing.assert_gradient_orthogonal(loss, params, ["bn_out/bias"])
