"""The convolution formulations the convnet study times compute the same convolution (float64).

The study is research (``benchmarks/studies``), not the library: these tests are ``slow``, out of the quick
loop (``pytest -m "not slow"``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.studies import convnet_study as cs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("impl", ["shift", "winograd", "im2col"])
@pytest.mark.parametrize("h, w, c, f", [(8, 8, 5, 3), (7, 5, 2, 4)])
def test_stride1_formulations_equal_xla_with_gradients(impl, h, w, c, f):
    """Forward and both gradients against ``lax.conv_general_dilated`` ('SAME', stride 1). Winograd's
    transforms have entries 0, +-1/2, +-1 and sum at most 16 products per output, so the difference is a few
    float64 ulps of the output scale: 1e-13 relative (seen: ~1e-15)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, h, w, c)))
        k = jnp.asarray(rng.normal(size=(3, 3, c, f)))
        ct = jnp.asarray(rng.normal(size=(3, h, w, f)))

        def outputs(conv):
            y, vjp = jax.vjp(lambda x, k: conv(x, k, 1), x, k)
            return (y, *vjp(ct))

        for got, want in zip(outputs(cs.IMPLS[impl]), outputs(cs.conv_native)):
            assert got.shape == want.shape
            assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-13
        wrong = outputs(lambda x, k, s: cs.IMPLS[impl](x, k[::-1], s))  # control: a flipped kernel differs
        assert float(jnp.max(jnp.abs(wrong[0] - outputs(cs.conv_native)[0]))) > 1e-3
