"""The FLOP counter of the benchmarks' utilisation figures against closed forms of the models' layers."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops
from rate_tuning import models

B = 4


def test_mlp_forward_flops_are_its_matrix_products():
    model = models.build("mlp", "paper", widths=(32, 16))
    x = jnp.zeros((B, 8, 8, 1))
    v = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes suffice: nothing is computed
    want = 2 * B * (64 * 32 + 32 * 16 + 16 * 10)  # 64-32-16-10, bias-free: one product per weight
    assert flops.train_flops(model, v, x) == 3 * want


@pytest.mark.parametrize("impl", models.CONV_IMPLS)
def test_conv_flops_do_not_depend_on_the_formulation(impl):
    """convnet 8x8x3 -> 3x3 s2 -> 4x4x4 -> 3x3 s2 -> 2x2x6 -> GAP -> 6 -> 10, however it is lowered."""
    model = models.build("convnet", "paper", channels=(4, 6), conv_impl=impl)
    x = jnp.zeros((B, 8, 8, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes suffice: nothing is computed
    want = 2 * B * (4 * 4 * 4 * (9 * 3) + 2 * 2 * 6 * (9 * 4) + 6 * 10)
    assert flops.train_flops(model, v, x) == 3 * want


def test_scan_bodies_count_once_per_iteration():
    w = jnp.ones((5, 7))
    f = lambda x: jax.lax.scan(lambda c, _: (c, c @ w), x, None, length=3)[1]
    assert flops.forward_flops(f, jnp.ones((2, 5))) == 3 * 2 * 2 * 5 * 7


def test_matmul_runner_counts_the_products_of_its_size():
    run, per_call, n = flops.matmul_runner("float32", 64)
    run(2)  # compiles and runs; the suite times it
    assert n == 64 and per_call == 2 * 64 ** 3
