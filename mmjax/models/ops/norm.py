"""Normalization kernels over the last axis, statistics in float32.

`layer_norm` has a closed-form backward pass (custom VJP); `rms_norm` is
plain autodiff. Both return `dtype`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float, dtype: Dtype) -> Array:
    """LayerNorm over the last axis in float32, cast to `dtype`: `x [..., D]`,
    `scale, bias [D]` -> `[..., D]`.

    The backward pass is the closed form (dx = rstd * (dxhat - mean(dxhat) -
    xhat * mean(dxhat * xhat)), from the saved input, mean and 1/std) instead of
    autodiff's chain of broadcasts and reductions: the same values, faster on CPU.
    """
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    return (((xf - mean) * rstd * scale + bias).astype(dtype),
            (x, mean, rstd, scale, jnp.zeros((0,), bias.dtype)))


def _layer_norm_bwd(eps, dtype, res, g):
    x, mean, rstd, scale, bias_like = res
    g = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    axes = tuple(range(g.ndim - 1))
    dxhat = g * scale
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return (dx.astype(x.dtype), jnp.sum(g * xhat, axes).astype(scale.dtype),
            jnp.sum(g, axes).astype(bias_like.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def rms_norm(x: Array, scale: Array, eps: float, dtype: Dtype) -> Array:
    """RMSNorm over the last axis in float32, cast to `dtype`: `x [..., D]`,
    `scale [D]` -> `x / sqrt(mean(x^2) + eps) * scale`, `[..., D]`."""
    xf = x.astype(jnp.float32)
    ms = jnp.square(xf).mean(-1, keepdims=True)
    return (xf * jax.lax.rsqrt(ms + eps) * scale).astype(dtype)
