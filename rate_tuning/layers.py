"""BatchNorm variants and a frozen fixed-norm classifier (flax linen).

* ``'exact'``: ``gamma (x - mu) / sigma + beta`` with batch mean ``mu`` and the biased two-pass variance
  ``sigma^2 = mean((x - mu)^2)`` (eq. (1) of the paper; epsilon = 0). The kernel feeding it is exactly
  scale-invariant in train mode.
* ``'smooth'``: ``gamma (x - mu) / sqrt(sigma^2 + eps ||w||^2) + beta`` where ``w`` is the output
  channel's kernel, i.e. ``sqrt(w^T (Sigma_B + eps I) w)``: still exactly scale-invariant in ``w``, and the
  denominator stays ``>= sqrt(eps)`` on the unit sphere (the smoothed network of the paper's appendix,
  PAPER §5; the exact form there is a recollection, see claim C19).
* ``'standard'``: flax's ``nn.BatchNorm`` with epsilon = 1e-5 (``sqrt(sigma^2 + eps)``), which breaks scale
  invariance at about 1e-4 and is here for comparison and as a negative control.

Eval mode (``use_running_average=True``) uses running statistics and is never scale-invariant.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_VARIANTS = ("exact", "smooth", "standard")
STANDARD_EPSILON = 1e-5


def _batch_mean(v, axis_name):
    """Mean over every axis but the last, and over the mapped axis ``axis_name`` if given."""
    m = jnp.mean(v, axis=tuple(range(v.ndim - 1)))
    return m if axis_name is None else jax.lax.pmean(m, axis_name)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def normalize(x, offset, axis_name=None):
    """Train-mode normalisation ``y = (x - mu) / sqrt(sigma^2 + offset)`` with its derivative by hand.

    ``mu`` and the biased two-pass variance ``sigma^2 = mean((x - mu)^2)`` are taken over every axis but
    the last (and over ``axis_name``); ``offset`` is 0 (exact BN, eq. (1)) or ``eps ||w||^2`` (smooth BN).

    The JVP is the textbook one: with ``r = (sigma^2 + offset)^(-1/2)`` and ``s = mean(y dx)``,
    ``dy = r (dx - mean(dx) - y (s + r d(offset) / 2))``, ``d mu = mean(dx)``, ``d sigma^2 = 2 s / r``.
    JAX transposes it for the gradient (about 3 passes over the activation instead of the ~10 of autodiff
    through the two-pass variance; benchmarks/README.md, BatchNorm backward) and differentiates it again
    for Hessian-vector products, so forward mode and jvp-over-grad keep working.

    Returns:
      ``(y, mu, sigma^2)``; ``mu`` and ``sigma^2`` (without ``offset``) feed the running statistics.
    """
    mean = _batch_mean(x, axis_name)
    xc = x - mean
    var = _batch_mean(jnp.square(xc), axis_name)
    return xc * jax.lax.rsqrt(var + offset), mean, var


@normalize.defjvp
def _normalize_jvp(axis_name, primals, tangents):
    x, offset = primals
    dx, d_offset = tangents
    y, mean, var = normalize(x, offset, axis_name)
    r = jax.lax.rsqrt(var + offset)
    d_mean = _batch_mean(dx, axis_name)
    s = _batch_mean(y * dx, axis_name)  # = r mean((x - mu) dx): y, not x - mu, is the one residual
    dy = r * (dx - d_mean - y * (s + 0.5 * r * d_offset))
    return (y, mean, var), (dy, d_mean, 2 * s / r)


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last, with the exact or the smooth denominator.

    Attributes:
      use_running_average: eval mode (running statistics) if True.
      momentum: decay of the running statistics.
      smooth_epsilon: 0 for exact BN; ``eps > 0`` for ``sqrt(sigma^2 + eps ||w||^2)``, which needs the
        per-channel ``weight_sq_norm`` at call time.
      use_scale, use_bias: learn ``gamma`` / ``beta``.
      axis_name: the mapped axis to average statistics over (inside ``shard_map``/``pmap``).
      param_dtype: dtype of ``gamma``, ``beta`` and the running statistics.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    smooth_epsilon: float = 0.0
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, weight_sq_norm=None):
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), self.param_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), self.param_dtype))
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xs = x.astype(stat_dtype)
        offset = jnp.zeros((), stat_dtype)
        if self.smooth_epsilon:
            if weight_sq_norm is None:
                raise ValueError("smooth BatchNorm needs weight_sq_norm, the per-channel ||w||^2")
            offset = self.smooth_epsilon * weight_sq_norm.astype(stat_dtype)
        if use_ra:
            mean, var = ra_mean.value.astype(stat_dtype), ra_var.value.astype(stat_dtype)
            y = (xs - mean) * jax.lax.rsqrt(var + offset)
        else:
            y, mean, var = normalize(xs, offset, self.axis_name)
            if not self.is_initializing():  # in stat_dtype, stored in param_dtype (bfloat16 stays bfloat16)
                for ra, batch in ((ra_mean, mean), (ra_var, var)):
                    ra.value = (self.momentum * ra.value.astype(stat_dtype)
                                + (1 - self.momentum) * batch).astype(self.param_dtype)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        return y.astype(x.dtype)


def batch_norm(variant: str, *, smooth_epsilon: float = STANDARD_EPSILON, **kwargs) -> functools.partial:
    """A BN constructor for ``variant`` in :data:`BN_VARIANTS`; call it with ``use_scale``, ``name``...

    All variants accept ``weight_sq_norm`` at call time (ignored unless ``'smooth'``).
    """
    if variant == "exact":
        return functools.partial(BatchNorm, **kwargs)
    if variant == "smooth":
        return functools.partial(BatchNorm, smooth_epsilon=smooth_epsilon, **kwargs)
    if variant == "standard":
        return functools.partial(StandardBatchNorm, **kwargs)
    raise ValueError(f"unknown BatchNorm variant {variant!r}; known: {', '.join(BN_VARIANTS)}")


class StandardBatchNorm(nn.BatchNorm):
    """flax's ``nn.BatchNorm`` (``epsilon = 1e-5``) with the call signature of :class:`BatchNorm`."""

    momentum: float = 0.9
    epsilon: float = STANDARD_EPSILON
    force_float32_reductions: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, weight_sq_norm=None, mask=None):
        del weight_sq_norm
        return super().__call__(x, use_running_average, mask=mask)


class FixedNormDense(nn.Module):
    """Linear classifier ``x @ W`` whose columns have norm ``norm`` at init; meant to be ``'frozen'``.

    With every trainable parameter upstream scale-invariant, the whole network is then scale-invariant
    group by group (the ``fully_si`` preset).
    """

    features: int
    norm: float = 10.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        def init(key, shape, dtype):
            w = jax.random.normal(key, shape, dtype)
            return self.norm * w / jnp.linalg.norm(w, axis=0, keepdims=True)

        kernel = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
        return x @ kernel.astype(x.dtype)


def max_pool_2x2(x):
    """2x2 stride-2 max-pool (``VALID``: an odd last row or column is dropped) as a reshape and a max.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``. Its gradient is JAX's ``reduce_max`` rule,
    an equality mask that splits the cotangent evenly between exact ties in a window, instead of XLA's
    ``select-and-scatter`` (the gradient of ``reduce_window``), which gives it all to the first; after a
    ReLU the only ties of any likelihood are zeros, whose gradient the ReLU mask removes anyway. On CPU
    the mask is several times faster (measured in benchmarks/README.md, max-pool).
    """
    n, h, w, c = x.shape
    return jnp.max(x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def im2col_conv(x, kernel, strides, padding, *, precision=None, preferred_element_type=None):
    """Convolution of an NHWC ``x`` with an HWIO ``kernel`` as patches times kernel.

    ``y = patches(x) @ kernel.reshape(kh kw C, F)``: the patches are the ``kh kw`` strided slices of the
    padded input, concatenated along channels in HWI order. Forward, input and kernel gradients are then
    slices, pads, adds and dots: no convolution op. For strided convolutions on XLA's CPU backend this is
    faster (whole convnet step +26 %, benchmarks/README.md): there the input gradient of a strided
    convolution is a base-dilated convolution, which YNNPACK does not take and Eigen runs slowly. Stride-1
    layers are 3-20x slower this way (the patches are ``kh kw`` times the activation).

    Args:
      strides: ``(sh, sw)``; padding: ``'SAME'``, ``'VALID'`` or ``((lo, hi), (lo, hi))``.
    """
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    sh, sw = strides
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads((h, w), (kh, kw), strides, padding)
    (lh, hh), (lw, hw) = padding
    xp = jnp.pad(x, ((0, 0), (lh, hh), (lw, hw), (0, 0)))
    oh, ow = (h + lh + hh - kh) // sh + 1, (w + lw + hw - kw) // sw + 1
    cols = [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    y = jnp.dot(patches.reshape(n * oh * ow, kh * kw * c), kernel.reshape(kh * kw * c, f), precision=precision,
                preferred_element_type=preferred_element_type)
    return y.reshape(n, oh, ow, f)


def conv_im2col(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """:func:`im2col_conv` behind ``lax.conv_general_dilated``'s signature, for flax ``nn.Conv``'s
    ``conv_general_dilated`` attribute: NHWC inputs and HWIO kernels without dilation or feature groups
    (what ``nn.Conv`` passes for 2-D inputs); anything else goes to ``lax.conv_general_dilated`` unchanged.
    """
    dn = dimension_numbers
    plain = (lhs.ndim == 4 and feature_group_count == 1 and kwargs.get("batch_group_count", 1) == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
             and dn is not None and (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC_HWIO)
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn,
                                            feature_group_count, precision=precision, **kwargs)
    return im2col_conv(lhs, rhs, window_strides, padding, precision=precision,
                       preferred_element_type=kwargs.get("preferred_element_type"))


KERNEL_GRAD_CHUNK = 128
"""Examples per batch chunk of :func:`conv_chunked_kernel_grad`'s kernel gradient."""


def conv_chunked_kernel_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` whose kernel gradient is a sum over batch chunks of at most
    :data:`KERNEL_GRAD_CHUNK` examples.

    ``grad_K = sum_c grad_K(x_c, dy_c)``: the same sum, taken chunk by chunk. On XLA's CPU backend the
    kernel-gradient convolution (the batch is its reduction axis) slows down per example as the batch
    grows (measured in benchmarks/README.md, large batches). Forward and input
    gradient are XLA's own. Written as a ``custom_jvp`` whose kernel tangent is the chunked convolution, so
    JAX's transpose of it is the chunked sum and forward mode (Hessian-vector products) keeps working.
    Takes flax ``nn.Conv``'s call (its ``conv_general_dilated`` attribute).
    """
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                             lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                             dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                             precision=precision, **kwargs)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    in_axis, out_axis = dn.lhs_spec[0], dn.out_spec[0]
    n = lhs.shape[in_axis]
    if n <= KERNEL_GRAD_CHUNK or kwargs.get("batch_group_count", 1) != 1:
        return conv(lhs, rhs)

    def by_chunks(x, k):
        return jnp.concatenate([conv(jax.lax.slice_in_dim(x, i, min(i + KERNEL_GRAD_CHUNK, n), axis=in_axis), k)
                                for i in range(0, n, KERNEL_GRAD_CHUNK)], axis=out_axis)

    @jax.custom_jvp
    def convolve(x, k):
        return conv(x, k)

    @convolve.defjvp
    def _(primals, tangents):
        (x, k), (dx, dk) = primals, tangents
        return conv(x, k), conv(dx, k) + by_chunks(x, dk)

    return convolve(lhs, rhs)
