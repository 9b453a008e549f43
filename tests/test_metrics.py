"""Metrics against independent computations: the gradient at the normalised point computed directly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rate_tuning import groups as G, metrics
from tests.helpers import build


@pytest.mark.parametrize("arch,preset", [("mlp", "paper"), pytest.param("convnet", "smoothed", marks=pytest.mark.slow),
                                         pytest.param("resnet", "paper", marks=pytest.mark.slow)])
@pytest.mark.parametrize("grouping", ["layer", "channel"])
def test_intrinsic_gradient_equals_gradient_at_normalised_point(x64, arch, preset, grouping):
    """sum_i ||w_i||^2 ||grad_i L(theta)||^2 + ||grad_g L||^2 == ||grad L(V; g)||^2, the right side by
    autodiff at V = normalize(theta). Both are sums of O(10^3) float64 terms: rel. tolerance 1e-12."""
    model, params, loss = build(arch, preset)
    labels = model.labels(grouping)
    params = G.scale_groups(params, labels, {k: 7.0 for k in G.si_groups(params, labels)})  # off-sphere
    per_group, total = metrics.intrinsic_grad_sq_norms(jax.grad(loss)(params), params, labels)
    v = metrics.normalize(params, labels)
    sq = G.group_sq_norms(v, labels)
    assert all(np.allclose(s, 1.0, rtol=1e-14) for s in sq.values())
    grads_v = jax.grad(loss)(v)
    direct = {k: float(jnp.sum(s)) for k, s in G.group_sq_norms(grads_v, labels).items()}
    direct[G.VARIANT] = float(metrics.variant_sq_norm(grads_v, labels))
    for k, value in direct.items():
        assert float(per_group[k]) == pytest.approx(value, rel=1e-12, abs=1e-300)
    assert float(total) == pytest.approx(sum(direct.values()), rel=1e-12)


def test_norms_effective_lr_and_angle_closed_form(x64):
    labels = {"a": G.si("a"), "b": G.si("b", per_channel=True), "g": G.VARIANT_LABEL}
    params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "g": jnp.array([9.0])}
    norms = metrics.group_norms(params, labels)
    assert float(norms["a"]) == 5.0
    np.testing.assert_array_equal(norms["b"], [1.0, 2.0])
    eff = metrics.effective_lr(0.5, params, labels)
    assert float(eff["a"]) == 0.5 / 25
    np.testing.assert_array_equal(eff["b"], [0.5, 0.125])
    theta = 1e-9  # tiny rotation: arccos(cos) would lose ~half the digits here
    new = dict(params, a=5.0 * jnp.array([jnp.cos(jnp.arctan2(4.0, 3.0) + theta),
                                          jnp.sin(jnp.arctan2(4.0, 3.0) + theta)]) * 2.0)
    ang = metrics.angular_update(params, new, labels)
    assert float(ang["a"]) == pytest.approx(theta, rel=1e-6)
    np.testing.assert_array_equal(ang["b"], [0.0, 0.0])


def test_metrics_are_jit_safe(x64):
    labels = {"a": G.si("a"), "g": G.VARIANT_LABEL}
    params = {"a": jnp.array([3.0, 4.0]), "g": jnp.array([1.0])}
    grads = {"a": jnp.array([4.0, -3.0]), "g": jnp.array([2.0])}
    f = jax.jit(lambda g, p: metrics.intrinsic_grad_sq_norms(g, p, labels))
    per_group, total = f(grads, params)
    assert float(per_group["a"]) == 25.0 * 25.0 and float(per_group[G.VARIANT]) == 4.0
    assert float(total) == 629.0


@pytest.mark.parametrize("theta", [1e-12, 1e-6, 0.3, 1.0, np.pi / 2, 2.5])
def test_angle_is_accurate_over_the_range_of_rotations(x64, theta):
    """A rotation by ``theta`` in a random plane of R^50, scaled by 3: the angle to round-off. Building
    ``new`` rounds each of its 50 components (error <= eps/2 of each), which moves it by up to
    ``sqrt(50) eps / 2`` relative, about 1e-15 rad: the absolute tolerance (2e-15). The measured
    ``d = ||u - v||`` is summed directly: ~n eps relative (n = 50), so 1e-13 relative is ~10x that bound;
    beyond pi/2 ``sqrt(4 - d^2)`` is still well conditioned at 2.5 rad (d^2 = 3.6). ``arccos`` of the
    cosine would be off by ~1e-8 rad at the two smallest angles."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(50, 2)))
    old = jnp.asarray(q[:, 0] * 2.0)
    new = jnp.asarray((np.cos(theta) * q[:, 0] + np.sin(theta) * q[:, 1]) * 6.0)
    labels = {"w": G.si("w")}
    got = float(metrics.angular_update({"w": old}, {"w": new}, labels)["w"])
    assert abs(got - theta) <= 2e-15 + 1e-13 * theta
