"""The two-rate optimizer against hand-computed updates, and Lemma 2.4 on a real BN network."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rate_tuning import groups as G, optim
from tests.helpers import build

LABELS = {"w": G.si("w"), "g": G.VARIANT_LABEL, "f": G.FROZEN_LABEL}


def toy_params():
    return {"w": jnp.array([3.0, -4.0]), "g": jnp.array([1.0, 2.0, 3.0]), "f": jnp.array([5.0])}


def toy_grads(step):
    """Fixed, step-dependent gradients (the optimizer must not care where they come from)."""
    return {"w": jnp.array([0.5, 1.0]) * (step + 1), "g": jnp.array([-1.0, 0.0, 2.0]) / (step + 1),
            "f": jnp.array([7.0])}


@pytest.mark.parametrize("schedule", ["constant", "inverse_sqrt"])
def test_two_steps_match_hand_computation(schedule):
    lr_w, lr_g = 0.3, 0.05
    tx = optim.two_rate_sgd(LABELS, optim.schedule(schedule, lr_w), optim.schedule(schedule, lr_g))
    params = toy_params()
    state = tx.init(params)
    expected = {k: np.asarray(v, np.float64) for k, v in toy_params().items()}
    for t in range(2):
        factor = 1.0 if schedule == "constant" else 1.0 / math.sqrt(t + 1)  # lr / sqrt(t + 1), t = 0 first
        grads = toy_grads(t)
        expected["w"] = expected["w"] - lr_w * factor * np.asarray(grads["w"])
        expected["g"] = expected["g"] - lr_g * factor * np.asarray(grads["g"])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for k in expected:  # float32 arithmetic on O(1) numbers: a few ulps
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.asarray(params["f"]), np.asarray(toy_params()["f"]))  # bit-identical


def test_weight_decay_and_momentum_follow_their_formulas():
    lr, wd, mu = 0.1, 0.01, 0.9
    tx = optim.two_rate_sgd(LABELS, lr, lr, weight_decay=wd, momentum=mu)
    params, state = toy_params(), None
    state = tx.init(params)
    w, v = np.asarray(params["w"], np.float64), np.zeros(2)
    for t in range(2):
        g = np.asarray(toy_grads(t)["w"]) + wd * w
        v = mu * v + g
        w = w - lr * v
        updates, state = tx.update(toy_grads(t), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], w, rtol=1e-6)
    assert np.array_equal(np.asarray(params["f"]), np.asarray(toy_params()["f"]))


def test_projection_keeps_the_norm_and_the_direction_of_the_plain_step(x64):
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), toy_params())
    grads = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), toy_grads(0))
    plain = optim.two_rate_sgd(LABELS, 0.7, 0.1)
    proj = optim.two_rate_sgd(LABELS, 0.7, 0.1, project=True)
    p_plain = optax.apply_updates(params, plain.update(grads, plain.init(params), params)[0])
    p_proj = optax.apply_updates(params, proj.update(grads, proj.init(params), params)[0])
    assert abs(float(jnp.linalg.norm(p_proj["w"])) - 5.0) < 1e-14  # ||w_0|| = 5
    np.testing.assert_allclose(p_proj["w"] / 5.0, p_plain["w"] / jnp.linalg.norm(p_plain["w"]), rtol=1e-14)
    np.testing.assert_array_equal(p_proj["g"], p_plain["g"])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "fast", None])
@pytest.mark.parametrize("which", ["lr_w", "lr_g"])
def test_bad_learning_rates_are_named(bad, which):
    kw = {"lr_w": 0.1, "lr_g": 0.1, which: bad}
    with pytest.raises(ValueError, match=f"^{which} must be a positive finite number"):
        optim.two_rate_sgd(LABELS, **kw)


def test_bad_schedule_and_options():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        optim.schedule("cosine", 0.1)
    with pytest.raises(ValueError, match="lr_w must be"):
        optim.two_rate_sgd(LABELS, lambda t: -1.0, 0.1)  # a schedule with a bad value at step 0
    with pytest.raises(ValueError, match="weight_decay"):
        optim.two_rate_sgd(LABELS, 0.1, 0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        optim.two_rate_sgd(LABELS, 0.1, 0.1, momentum=1.0)


def gd_step_residuals(weight_decay, lr_w=3.0):
    """One jitted GD step on the tiny fully scale-invariant MLP; Lemma 2.4 residual per group.

    Returns per step ``(residual, before, after)`` dicts: ``||w_{t+1}||^2 - ||w_t||^2 - lr_w^2 ||grad||^2``,
    ``||w_t||^2`` and ``||w_{t+1}||^2``.
    """
    model, params, loss = build("mlp", "fully_si")
    labels = model.labels("layer")
    tx = optim.two_rate_sgd(labels, lr_w, 0.1, weight_decay=weight_decay)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state):
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    opt_state = tx.init(params)
    out = []
    for _ in range(3):  # three steps, one trace
        new, opt_state, grads = step(params, opt_state)
        before, after = G.group_sq_norms(params, labels), G.group_sq_norms(new, labels)
        g_sq = G.group_sq_norms(grads, labels)
        out.append(({k: float(after[k] - before[k] - lr_w ** 2 * g_sq[k]) for k in before},
                    {k: float(before[k]) for k in before}, {k: float(after[k]) for k in after}))
        params = new
    return out


def test_lemma_2_4_norm_identity_after_gd_steps(x64):
    """||w_{t+1}||^2 - ||w_t||^2 - lr_w^2 ||grad||^2 = 0 (Lemma 2.4 (2)) at round-off in float64.

    Tolerance: each squared norm is a sum of n <= 10^3 products, so its relative round-off is below
    n * eps ~ 2e-13; the residual of three such sums is below 1e-12 * ||w_{t+1}||^2.
    """
    for residual, _, after in gd_step_residuals(weight_decay=0.0):
        for k in residual:
            assert abs(residual[k]) <= 1e-12 * after[k], (k, residual[k], after[k])


def test_lemma_2_4_fails_with_weight_decay(x64):
    """With coupled decay lambda, w_{t+1} = (1 - lr lambda) w_t - lr grad and grad is orthogonal to w_t, so
    the residual is exactly ((1 - lr lambda)^2 - 1) ||w_t||^2: with lr = 3, lambda = 1e-3 that is
    -6e-3 ||w_t||^2, far above the 1e-12 round-off tolerance of the identity."""
    lr, wd = 3.0, 1e-3
    for residual, before, after in gd_step_residuals(weight_decay=wd, lr_w=lr):
        for k in residual:
            assert abs(residual[k]) > 1e-3 * before[k]
            expected = ((1 - lr * wd) ** 2 - 1) * before[k]
            assert abs(residual[k] - expected) <= 1e-12 * after[k], (k, residual[k], expected)
