"""The layers' fast formulations equal the plain ones: BN's hand-written JVP (first and second order, named
axes), im2col convolutions and the reshape max-pool, in float64 against autodiff of the textbook formulas
and flax's own modules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proofs_check import numerics
from rate_tuning import layers, models

RNG = np.random.default_rng(0)
SHAPE = (4, 5, 5, 3)  # N, H, W, C: each channel's statistics are means over n = 100 values
N_REDUCED = 100
X = RNG.normal(size=SHAPE) * 2 + 1
W_OUT = RNG.normal(size=SHAPE)
OFFSET = RNG.uniform(size=SHAPE[-1])


def reference_normalize(x, offset):
    """Eq. (1) as written, differentiated by JAX: ``((x - mu) / sqrt(var + offset), mu, var)``."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + offset), mean, var


def objective(fn):
    """A scalar that depends on all three outputs non-linearly, so every cotangent path is exercised."""
    def f(x, offset):
        y, mean, var = fn(x, offset)
        return jnp.sum(jnp.sin(y) * W_OUT) + jnp.sum(var ** 2) + 3 * jnp.sum(mean)
    return f


def tolerance(ref):
    """Both sides compute the same expressions in another order: each output is a few means of n terms
    times factors bounded by the data, so each differs from the exact value by at most about
    ``gamma_n max|.|`` (Higham, Thm 3.1) per chained mean; 4 chained means, and both sides err: 8."""
    return 8 * numerics.gamma(N_REDUCED, jnp.float64) * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("smooth", [False, True], ids=["exact", "smooth"])
def test_normalize_gradient_and_hvp_equal_autodiff_of_eq1(x64, smooth):
    x, offset = jnp.asarray(X), jnp.asarray(OFFSET if smooth else 0.0)
    fast, ref = objective(layers.normalize), objective(reference_normalize)
    for got, want in zip(layers.normalize(x, offset), reference_normalize(x, offset)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))
    g_fast, g_ref = jax.grad(fast, (0, 1))(x, offset), jax.grad(ref, (0, 1))(x, offset)
    for got, want in zip(g_fast, g_ref):
        assert float(jnp.max(jnp.abs(got - want))) <= tolerance(want)
    # Forward over reverse (proofs_check.curvature.hvp's mode) through the custom JVP.
    t = jnp.asarray(RNG.normal(size=SHAPE))
    hvp = lambda f: jax.jvp(lambda x: jax.grad(f)(x, offset), (x,), (t,))[1]
    want = hvp(ref)
    assert float(jnp.max(jnp.abs(hvp(fast) - want))) <= tolerance(want)


def test_normalize_with_a_named_axis_uses_the_global_batch(x64):
    """Under a mapped axis (``axis_name``), statistics and gradients are those of the whole batch."""
    x, offset = jnp.asarray(X), jnp.asarray(0.0)
    shards = x.reshape(2, 2, *SHAPE[1:])
    mapped = jax.vmap(lambda s: layers.normalize(s, offset, "batch")[0], axis_name="batch")
    loss_mapped = lambda xs: jnp.sum(jnp.sin(mapped(xs)).reshape(SHAPE) * W_OUT)
    loss_full = lambda x: jnp.sum(jnp.sin(reference_normalize(x, offset)[0]) * W_OUT)
    want = jax.grad(loss_full)(x)
    got = jax.grad(loss_mapped)(shards).reshape(SHAPE)
    assert float(jnp.max(jnp.abs(got - want))) <= tolerance(want)


@pytest.mark.slow
def test_batchnorm_gradient_is_orthogonal_to_the_kernel(x64):
    """Lemma 2.4's premise through the fast BN: <grad_W L, W> = 0 to round-off for the kernel feeding it."""
    model = models.build("convnet", "paper", num_classes=3, channels=(4, 6), param_dtype=jnp.float64)
    x = jnp.asarray(RNG.normal(size=(8, 8, 8, 3)))
    y = jnp.asarray(RNG.integers(0, 3, size=8))
    v = model.init(jax.random.key(0), x)
    g = jax.grad(lambda p: models.batch_loss(model, p, v["batch_stats"], x, y)[0])(v["params"])
    for name in ("layer0", "layer1", "classifier"):
        w, gw = v["params"][name]["kernel"], g[name]["kernel"]
        # Relative to ||g|| ||w||: a sum of |W| products, each within gamma_|W| of exact.
        rel = abs(float(jnp.vdot(gw, w))) / float(jnp.linalg.norm(gw) * jnp.linalg.norm(w))
        assert rel <= numerics.gamma(w.size, jnp.float64), (name, rel)


CONVS = [  # (h, w, c_in, c_out, kernel, stride, padding)
    (9, 8, 3, 5, 3, 2, "SAME"), (8, 8, 4, 6, 1, 2, "SAME"), (7, 7, 2, 3, 3, 1, "VALID"),
    (8, 9, 2, 3, 3, 3, ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("h,w,c,f,k,s,pad", CONVS)
def test_im2col_convolution_equals_flax_conv(x64, h, w, c, f, k, s, pad):
    x = jnp.asarray(RNG.normal(size=(2, h, w, c)))
    plain = nn.Conv(f, (k, k), strides=s, padding=pad, use_bias=False, param_dtype=jnp.float64)
    fast = nn.Conv(f, (k, k), strides=s, padding=pad, use_bias=False, param_dtype=jnp.float64,
                   conv_general_dilated=layers.conv_im2col)
    p = plain.init(jax.random.key(0), x)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    kernel = p["params"]["kernel"]
    # Each output is a sum of k k c products, in another order on each side: within
    # gamma_{k k c} sum|products| <= gamma_{k k c} max|x| sum|K| of exact (Higham, Thm 3.1), twice.
    tol = 2 * numerics.gamma(k * k * c, jnp.float64) * float(jnp.max(jnp.abs(x)) * jnp.sum(jnp.abs(kernel)))
    np.testing.assert_allclose(fast.apply(p, x), plain.apply(p, x), rtol=0, atol=tol)
    # Gradients (cotangent cos(y), |.| <= 1): dK sums N h w products x * ct, dx sums k k f products K * ct.
    n_terms = max(x.shape[0] * h * w, k * k * f)
    tol = 2 * numerics.gamma(n_terms, jnp.float64) * float(max(jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(kernel))))
    for got, want in zip(jax.tree_util.tree_leaves(jax.grad(loss(fast), (0, 1))(p, x)),
                         jax.tree_util.tree_leaves(jax.grad(loss(plain), (0, 1))(p, x))):
        assert float(jnp.max(jnp.abs(got - want))) <= tol


def test_im2col_falls_back_on_what_it_does_not_cover(x64):
    x = jnp.asarray(RNG.normal(size=(2, 8, 8, 4)))
    for kw in (dict(kernel_dilation=2), dict(feature_group_count=2)):
        plain = nn.Conv(4, (3, 3), use_bias=False, **kw)
        fast = nn.Conv(4, (3, 3), use_bias=False, conv_general_dilated=layers.conv_im2col, **kw)
        p = plain.init(jax.random.key(0), x)
        np.testing.assert_array_equal(fast.apply(p, x), plain.apply(p, x))


def test_reshape_max_pool_equals_flax_max_pool_and_its_gradient_after_relu(x64):
    x = jnp.asarray(RNG.normal(size=(2, 7, 6, 3)))  # odd height: the last row is dropped, as VALID does
    flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(layers.max_pool_2x2(x), flax_pool(x))
    relu_then = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(nn.relu(x)))))(x)
    np.testing.assert_array_equal(relu_then(layers.max_pool_2x2), relu_then(flax_pool))


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw", [("convnet", dict(channels=(4, 6))), ("resnet", dict(stage_channels=(4, 6))),
                                     ("vgg", dict(config=(4, "M", 6, "M")))])
def test_conv_impls_give_the_same_model(x64, monkeypatch, arch, kw):
    monkeypatch.setattr(layers, "KERNEL_GRAD_CHUNK", 3)  # batch 8: the chunked kernel gradient is exercised
    x = jnp.asarray(RNG.normal(size=(8, 8, 8, 3)))
    y = jnp.asarray(RNG.integers(0, 10, size=8))
    results = {}
    for impl in models.CONV_IMPLS:
        model = models.build(arch, "paper", param_dtype=jnp.float64, conv_impl=impl, **kw)
        v = model.init(jax.random.key(0), x)
        results[impl] = jax.value_and_grad(lambda p: models.batch_loss(model, p, v["batch_stats"], x, y)[0])(
            v["params"])
    ref_loss, ref_grad = results["xla"]
    for impl, (loss, grad) in results.items():
        # Same parameters (one init, the same names and shapes); values to float64 round-off of the
        # network: 1e-12 is ~5000 unit round-offs, far above the ~100 chained operations of these nets,
        # far below any formulation error (a wrong pad or stride moves the loss by > 1e-3).
        assert abs(float(loss - ref_loss)) <= 1e-12, impl
        diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grad, ref_grad)
        assert max(jax.tree_util.tree_leaves(diff)) <= 1e-12, impl


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the 'auto' rule of the CPU backend")
def test_auto_picks_im2col_for_strided_and_few_channel_layers_on_cpu(monkeypatch):
    """vgg (stride 1) on a 3-channel image: im2col for the first layer only; the convnet (stride 2): im2col."""
    used = []
    for name in ("conv_im2col", "conv_chunked_kernel_grad"):
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _real=real, _name=name, **k: (used.append(_name), _real(*a, **k))[1])
    x = jnp.zeros((2, 8, 8, 3))
    models.build("vgg", "paper", config=(8, "M", 8, 8)).init(jax.random.key(0), x)
    assert used == ["conv_im2col", "conv_chunked_kernel_grad", "conv_chunked_kernel_grad"]
    used.clear()
    models.build("convnet", "paper", channels=(8, 8)).init(jax.random.key(0), x)
    assert used == ["conv_im2col", "conv_im2col"]
    used.clear()
    wide = jnp.zeros((2, 8, 8, models.IM2COL_MAX_IN_CHANNELS + 1))
    models.build("vgg", "paper", config=(8,)).init(jax.random.key(0), wide)
    assert used == ["conv_chunked_kernel_grad"]


@pytest.mark.parametrize("s,pad", [(1, "SAME"), (2, "VALID")])
def test_chunked_kernel_gradient_equals_the_plain_one(x64, monkeypatch, s, pad):
    """Batch 8 in chunks of 3 (3 + 3 + 2): values, both gradients and a Hessian-vector product (forward over
    reverse, through the custom JVP) equal flax's plain convolution. Each side sums the same products in
    another order: dK sums N h w products (both sides within gamma_{N h w} of exact), the HVP twice that."""
    monkeypatch.setattr(layers, "KERNEL_GRAD_CHUNK", 3)
    x = jnp.asarray(RNG.normal(size=(8, 6, 6, 2)))
    plain = nn.Conv(3, (3, 3), strides=s, padding=pad, use_bias=False, param_dtype=jnp.float64)
    fast = nn.Conv(3, (3, 3), strides=s, padding=pad, use_bias=False, param_dtype=jnp.float64,
                   conv_general_dilated=layers.conv_chunked_kernel_grad)
    p = plain.init(jax.random.key(0), x)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    np.testing.assert_array_equal(fast.apply(p, x), plain.apply(p, x))  # the forward is XLA's own
    tol = 2 * numerics.gamma(8 * 6 * 6, jnp.float64) * float(
        max(jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(p["params"]["kernel"]))))
    for got, want in zip(jax.tree_util.tree_leaves(jax.grad(loss(fast), (0, 1))(p, x)),
                         jax.tree_util.tree_leaves(jax.grad(loss(plain), (0, 1))(p, x))):
        assert float(jnp.max(jnp.abs(got - want))) <= tol
    t = jax.tree_util.tree_map(lambda a: jnp.asarray(RNG.normal(size=a.shape)), p)
    hvp = lambda m: jax.jvp(lambda p: jax.grad(loss(m))(p, x), (p,), (t,))[1]
    got, want = hvp(fast)["params"]["kernel"], hvp(plain)["params"]["kernel"]
    assert float(jnp.max(jnp.abs(got - want))) <= 2 * tol * (1 + float(jnp.sum(jnp.abs(t["params"]["kernel"]))))
