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
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), self.param_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), self.param_dtype))
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xs = x.astype(stat_dtype)
        if use_ra:
            mean, var = ra_mean.value.astype(stat_dtype), ra_var.value.astype(stat_dtype)
        else:
            mean = jnp.mean(xs, axis=axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(xs - mean), axis=axes)  # two-pass: exact to round-off
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        if self.smooth_epsilon:
            if weight_sq_norm is None:
                raise ValueError("smooth BatchNorm needs weight_sq_norm, the per-channel ||w||^2")
            var = var + self.smooth_epsilon * weight_sq_norm.astype(stat_dtype)
        y = (xs - mean) * jax.lax.rsqrt(var)
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
