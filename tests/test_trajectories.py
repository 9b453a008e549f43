"""proofs_check.trajectories: the recorded quantities against an independent hand loop, scan against a Python loop."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proofs_check import problems
from proofs_check import trajectories as T
from rate_tuning import optim

STEPS = 6


def _sphere_params(prob, scale=0.7):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(prob.init(jax.random.key(0))["w"].shape)
    return {"w": jnp.asarray(scale * w / np.linalg.norm(w))}


def test_gd_records_match_a_numpy_hand_loop(x64):
    """Sphere function, inverse-sqrt schedule: every record against numpy with the closed-form gradient."""
    prob = problems.sphere_function(dim=12, seed=1)
    p0 = _sphere_params(prob)
    lr = optim.inverse_sqrt(0.8)
    tx = optim.two_rate_sgd(prob.labels, lr, 0.1)
    tr = T.run(prob, p0, None, tx, STEPS, lr_w=lr, lr_g=0.1, snapshot_every=1)

    w = np.asarray(p0["w"], np.float64)
    for t in range(STEPS):
        g = np.asarray(prob.grad_closed_form({"w": jnp.asarray(w)})["w"])
        eta = 0.8 / np.sqrt(t + 1.0)
        w_next = w - eta * g
        r2 = w @ w
        np.testing.assert_allclose(tr.snapshots["w"][t], w, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(tr.loss[t], float(prob.loss({"w": jnp.asarray(w)})), rtol=1e-13)
        np.testing.assert_allclose(tr.lr_w[t], eta, rtol=1e-15)
        assert tr.count[t] == t
        np.testing.assert_allclose(tr.w_sq["w"][t], r2, rtol=1e-13)
        np.testing.assert_allclose(tr.w_sq_next["w"][t], w_next @ w_next, rtol=1e-13)
        np.testing.assert_allclose(tr.grad_sq["w"][t], g @ g, rtol=1e-12)
        assert abs(tr.grad_dot_w["w"][t]) <= 1e-13 * np.sqrt(g @ g * r2)  # Lemma 2.4 (1)
        np.testing.assert_allclose(tr.update_sq["w"][t], eta**2 * (g @ g), rtol=1e-12)
        np.testing.assert_allclose(tr.grad_sq_intrinsic_groups["w"][t], r2 * (g @ g), rtol=1e-12)
        np.testing.assert_allclose(tr.grad_sq_intrinsic[t], r2 * (g @ g), rtol=1e-12)
        np.testing.assert_allclose(tr.eff_lr["w"][t], eta / r2, rtol=1e-13)
        cos = (w @ w_next) / np.sqrt(r2 * (w_next @ w_next))
        np.testing.assert_allclose(tr.angle["w"][t], np.arccos(np.clip(cos, -1, 1)), rtol=1e-6)
        assert tr.variant_grad_sq[t] == 0.0
        w = w_next
    np.testing.assert_allclose(tr.final_params["w"], w, rtol=1e-13)
    np.testing.assert_allclose(tr.final_loss, float(prob.loss({"w": jnp.asarray(w)})), rtol=1e-13)


def test_two_rates_and_groups_match_a_hand_loop(x64):
    """multi_group: each SI group with lr_w, g with lr_g; per-group records and the 'variant' block."""
    prob = problems.multi_group(group_dims=(3, 5), g_dim=2, seed=2, noise_std=0.0)
    p0 = jax.tree_util.tree_map(lambda x: x * 1.3, prob.init(jax.random.key(4)))
    tx = optim.two_rate_sgd(prob.labels, 2.0, 0.3)
    tr = T.run(prob, p0, None, tx, STEPS, lr_w=2.0, lr_g=0.3)
    p = {k: np.asarray(v, np.float64) for k, v in p0.items()}
    for t in range(STEPS):
        g = {k: np.asarray(v) for k, v in prob.grad_closed_form({k: jnp.asarray(v) for k, v in p.items()}).items()}
        for name in ("w0", "w1"):
            np.testing.assert_allclose(tr.w_sq[name][t], p[name] @ p[name], rtol=1e-13)
            np.testing.assert_allclose(tr.grad_sq[name][t], g[name] @ g[name], rtol=1e-12)
            np.testing.assert_allclose(tr.grad_sq_intrinsic_groups[name][t], (p[name] @ p[name]) * (g[name] @ g[name]), rtol=1e-12)
        np.testing.assert_allclose(tr.grad_sq_intrinsic_groups["variant"][t], g["g"] @ g["g"], rtol=1e-12)
        np.testing.assert_allclose(tr.variant_grad_sq[t], g["g"] @ g["g"], rtol=1e-12)
        p = {k: p[k] - (0.3 if k == "g" else 2.0) * g[k] for k in p}
    for k in p:
        np.testing.assert_allclose(tr.final_params[k], p[k], rtol=1e-12)
    assert tr.groups == ("w0", "w1")
    assert np.all(tr.lr_g == 0.3)


def test_sgd_scan_equals_a_python_loop(x64):
    """SGD with momentum (a stateful optimizer): the scan and an eager loop with the same per-step keys."""
    prob = problems.noisy_sphere_function(dim=6, seed=0, noise_std=0.5)
    p0 = _sphere_params(prob)
    tx = optim.two_rate_sgd(prob.labels, 0.5, 0.1, momentum=0.5)
    key = jax.random.key(11)
    tr = T.run(prob, p0, None, tx, STEPS, stochastic=True, key=key, lr_w=0.5, lr_g=0.1, snapshot_every=1)

    params, state = p0, tx.init(p0)
    for t in range(STEPS):
        key, sub = jax.random.split(key)
        np.testing.assert_array_equal(tr.step_keys[t], jax.random.key_data(sub))
        value, grads = jax.value_and_grad(prob.stochastic_loss)(params, sub)
        np.testing.assert_allclose(tr.loss[t], value, rtol=1e-13)
        np.testing.assert_allclose(tr.grad_sq["w"][t], jnp.sum(grads["w"] ** 2), rtol=1e-13)
        # compiled (fused) and eager arithmetic may round differently: compare to round-off of ||w||
        np.testing.assert_allclose(tr.snapshots["w"][t], params["w"], rtol=0, atol=1e-14 * jnp.linalg.norm(params["w"]))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(tr.w_sq_next["w"][t], jnp.sum(params["w"] ** 2), rtol=1e-13)
    np.testing.assert_allclose(tr.final_params["w"], params["w"], rtol=0, atol=1e-14 * jnp.linalg.norm(params["w"]))


def test_continuation_and_chunked_snapshots_equal_one_run(x64):
    """Two runs chained through final_params/final_opt_state equal one run (the schedule count continues)."""
    prob = problems.sphere_function(dim=8)
    p0 = _sphere_params(prob)
    lr = optim.inverse_sqrt(1.0)
    tx = optim.two_rate_sgd(prob.labels, lr, 0.1)
    whole = T.run(prob, p0, None, tx, 8, lr_w=lr, lr_g=0.1, snapshot_every=2)
    a = T.run(prob, p0, None, tx, 4, lr_w=lr, lr_g=0.1, snapshot_every=2)
    b = T.run(prob, a.final_params, None, tx, 4, lr_w=lr, lr_g=0.1, snapshot_every=2, opt_state=a.final_opt_state)
    np.testing.assert_array_equal(np.concatenate([a.count, b.count]), np.arange(8))
    np.testing.assert_allclose(np.concatenate([a.lr_w, b.lr_w]), whole.lr_w, rtol=1e-15)
    np.testing.assert_allclose(np.concatenate([a.w_sq["w"], b.w_sq["w"]]), whole.w_sq["w"], rtol=1e-14)
    np.testing.assert_allclose(b.final_params["w"], whole.final_params["w"], rtol=1e-14)
    np.testing.assert_array_equal(whole.snapshot_steps, [0, 2, 4, 6])
    np.testing.assert_allclose(whole.snapshots["w"][2], a.final_params["w"], rtol=1e-14)


def test_path_record_and_step_loss(x64):
    """record='path' keeps loss and snapshots only; step_loss receives the step index t."""
    prob = problems.sphere_function(dim=5)
    p0 = _sphere_params(prob)
    tx = optim.two_rate_sgd(prob.labels, 0.3, 0.1)
    seen = lambda p, t: prob.loss(p) * (1.0 + 0.0 * t) + 1e-3 * t  # noqa: E731  (gradient independent of t)
    full = T.run(prob.loss, p0, prob.labels, tx, 5, step_loss=seen, lr_w=0.3, lr_g=0.1, snapshot_every=1,
                 full_loss=True)
    path = T.run(prob.loss, p0, prob.labels, tx, 5, step_loss=seen, lr_w=0.3, lr_g=0.1, snapshot_every=1,
                 record="path")
    np.testing.assert_allclose(full.loss - full.full_loss, 1e-3 * np.arange(5), atol=1e-14)
    np.testing.assert_allclose(path.loss, full.loss, rtol=1e-15)
    np.testing.assert_allclose(path.snapshots["w"], full.snapshots["w"], rtol=1e-15)
    np.testing.assert_allclose(full.final_loss, prob.loss(full.final_params) + 5e-3, rtol=1e-13)
    assert path.w_sq == {} and path.grad_sq_intrinsic is None


def test_compiled_scan_is_reused():
    """A second run with other initial params (same shapes) does not build a new program."""
    prob = problems.sphere_function(dim=4)
    tx = optim.two_rate_sgd(prob.labels, 0.3, 0.1)
    p0 = prob.init(jax.random.key(0))
    T.run(prob, p0, None, tx, 3, lr_w=0.3, lr_g=0.1)
    n = len(T._COMPILED)
    tr = T.run(prob, prob.init(jax.random.key(1), scale=2.0), None, tx, 3, lr_w=0.3, lr_g=0.1)
    assert len(T._COMPILED) == n
    assert tr.dtype == "float32" and np.all(np.diff(tr.w_sq["w"]) >= -1e-6 * tr.w_sq["w"][1:])


@pytest.mark.parametrize("kwargs, match", [
    (dict(stochastic=True), "key"),
    (dict(snapshot_every=4), "multiple"),
    (dict(record="everything"), "record"),
    (dict(stochastic=True, key=jax.random.key(0), step_loss=lambda p, t: 0.0), "either"),
])
def test_bad_arguments(kwargs, match):
    prob = problems.noisy_sphere_function(dim=4)
    tx = optim.two_rate_sgd(prob.labels, 0.3, 0.1)
    with pytest.raises(ValueError, match=match):
        T.run(prob, prob.init(jax.random.key(0)), None, tx, 6, **kwargs)
