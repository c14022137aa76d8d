"""Matmul kernels: `linear` (every projection and MLP) and `matmul_2d`.

Paths, chosen by the active `KernelPolicy` (`ops.policy`):

- CPU, bfloat16/float16 compute: `dtype x dtype -> float32` GEMMs with a
  custom backward (`matmul_f32_out`), under the `CPU_PATH_SCOPE` name scope.
  XLA:CPU runs a low-precision GEMM fast only in that form, with row-major
  operands (`transposed` copies them).
- Accelerators, low-precision compute, float32 kernel and
  `grad_reduce_dtype="float32"`: the plain `dtype` product whose kernel
  gradient comes from a float32-output GEMM (`matmul_f32_dw`).
- Otherwise: the plain product in `dtype`.

Speed figures: benchmarks/cpu_train_step.py and BENCHMARKS.md.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mmjax.models.ops.policy import f32_accumulating, float32_weight_grads, gather_weights

Dtype = Any
Array = jax.Array

# Name scope of the CPU-only low-precision GEMM path, visible in HLO op names, so a
# compile for an accelerator can show that the path did not leak into it.
CPU_PATH_SCOPE = "mmjax_cpu_bf16_gemm"

# Name of a kernel cast to the compute dtype and gathered for its matmul
# (`KernelPolicy.gather_weights`); every remat policy of `models.layers` keeps it.
GATHERED_WEIGHT = "mmjax_gathered_weight"


def broadcast_param(p: Array, shape: Sequence[int], dtype: Dtype) -> Array:
    """A parameter broadcast to `shape` (e.g. a class token to `[B, 1, D]`), then cast
    to `dtype`. In this order the gradient's sum over the broadcast (batch) axes
    runs in the parameter's float32, and so does its reduction across replicas;
    cast first, both would be bfloat16."""
    return jnp.broadcast_to(p, tuple(shape)).astype(dtype)


def transposed(a: Array) -> Array:
    """`a [..., n, k] -> [..., k, n]` as a row-major copy. A plain transpose feeding a
    dot becomes a column-major layout of the operand, which XLA:CPU's YNNPACK GEMM
    rejects; the dot then falls back to float32 (upcast operands)."""
    *lead, n, k = a.shape
    return jnp.swapaxes(a.reshape(*lead, n, k, 1), -3, -1)[..., 0, :, :]


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@jax.named_scope(CPU_PATH_SCOPE)
def matmul_f32_out(x: Array, w: Array, dtype: Dtype) -> Array:
    """`x [..., N, In] @ w [..., In, Out]` (same leading batch dims) with both operands
    cast to the low-precision `dtype`, accumulated and returned in float32.

    The backward pass casts the cotangent to `dtype` so its two matmuls are
    low-precision-in, float32-out too (autodiff would multiply the float32
    cotangent by the low-precision operand, i.e. run float32 GEMMs). Gradients
    come back in the operands' own dtypes: a float32 kernel gets its float32 dW
    without a round trip through `dtype`.
    """
    return _matmul_f32_out_vjp(x, w, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32_out_vjp(x: Array, w: Array, dtype: Dtype) -> Array:
    return _matmul_f32_out_fwd(x, w, dtype)[0]


def _matmul_f32_out_fwd(x, w, dtype):
    xl, wl = x.astype(dtype), w.astype(dtype)
    return _mm(xl, wl), (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_f32_out_bwd(dtype, res, g):
    x, w, x_like, w_like = res
    g = g.astype(dtype)
    dx = _mm(g, transposed(w)).astype(x_like.dtype)
    # dW = x^T g, with the narrower of x [N, In] and g [N, Out] transposed.
    dw = (_mm(transposed(x), g) if x.shape[-1] <= g.shape[-1]
          else transposed(_mm(transposed(g), x)))
    return dx, dw.astype(w_like.dtype)


_matmul_f32_out_vjp.defvjp(_matmul_f32_out_fwd, _matmul_f32_out_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_f32_dw(x: Array, w: Array, dtype: Dtype,
                  gather: Optional[tuple] = None) -> Array:
    """`x [N, In] @ w [In, Out]` in `dtype` (output `dtype`), whose kernel gradient
    `x^T g` is a float32-output GEMM returned in `w`'s float32: the partial dW of
    each batch shard is then summed across replicas in float32.

    `gather` (logical axis names of `w`): the cast kernel is first constrained to
    that layout (the FSDP shard gathered, tensor parallelism kept) and named
    `GATHERED_WEIGHT`; the backward pass's input-gradient matmul uses the same
    gathered copy, and dW still leaves in float32 (reduce-scattered in float32).
    """
    return _matmul_f32_dw_fwd(x, w, dtype, gather)[0]


def _matmul_f32_dw_fwd(x, w, dtype, gather):
    xl, wl = x.astype(dtype), w.astype(dtype)
    if gather is not None:
        wl = checkpoint_name(nn.with_logical_constraint(wl, gather), GATHERED_WEIGHT)
    return xl @ wl, (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_f32_dw_bwd(dtype, gather, res, g):
    x, w, x_like, w_like = res
    g = g.astype(dtype)
    dx = (g @ w.T).astype(x_like.dtype)
    dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32)
    return dx, dw.astype(w_like.dtype)


matmul_f32_dw.defvjp(_matmul_f32_dw_fwd, _matmul_f32_dw_bwd)


def linear(x: Array, kernel: Array, bias: Optional[Array], dtype: Dtype,
           act: Optional[Callable[[Array], Array]] = None,
           names: Optional[Sequence[Optional[str]]] = None) -> Array:
    """`act(x [N, In] @ kernel [In, Out] (+ bias [Out]))` computed in `dtype`: `[N, Out]`.

    On the CPU backend with bfloat16/float16 `dtype` the product is accumulated
    and returned in float32, the bias is added in float32 and the sum is cast to
    `dtype` once; the backward pass multiplies `dtype` operands into float32 as
    well (`matmul_f32_out`). That is the only low-precision GEMM XLA:CPU runs
    fast (a bfloat16-output dot is slower, and so is float32), and it keeps the
    bias gradient a float32 sum (a bfloat16 one becomes a slow, rounding chain
    of 32-wide reduce-windows). The activation `act` (if any) is applied to the
    float32 sum too: XLA:CPU computes bfloat16 elementwise ops in float32 with a
    rounding after every op, slower and less exact. GPUs and TPUs accumulate in
    float32 inside their bfloat16 GEMMs already, so there the plain `dtype`
    product is kept (and remat policies that save dot outputs keep them in
    `dtype`); with `KernelPolicy.grad_reduce_dtype="float32"` (the default) the
    float32 kernel's dW and the bias gradient come out in float32, so their sum
    across data-parallel replicas is a float32 sum. The platform is the kernel
    policy's (the mesh's devices under the trainer), not the host's. `names`: the
    kernel's logical axes, for `KernelPolicy.gather_weights`.
    """
    if f32_accumulating(dtype):
        y = matmul_f32_out(x, kernel, dtype)
        y = y if bias is None else y + bias.astype(jnp.float32)
        return (y if act is None else act(y)).astype(dtype)
    if float32_weight_grads(dtype, kernel.dtype):
        # float32 parameter gradients: dW from a float32-output GEMM, the bias
        # gradient summed over rows in float32 (see `KernelPolicy`).
        gather = tuple(names) if names is not None and gather_weights() else None
        y = matmul_f32_dw(x, kernel, dtype, gather)
        y = y if bias is None else y + broadcast_param(bias, y.shape, dtype)
    else:
        y = x.astype(dtype) @ kernel.astype(dtype)
        y = y if bias is None else y + bias.astype(dtype)
    return y if act is None else act(y)


def matmul_2d(x: Array, kernel: Array, in_dims: int, bias: Optional[Array] = None,
              dtype: Optional[Dtype] = None,
              act: Optional[Callable[[Array], Array]] = None,
              names: Optional[Sequence[Optional[str]]] = None) -> Array:
    """`act(x [..., *kernel.shape[:in_dims]] @ kernel (+ bias [*kernel.shape[in_dims:]]))`
    computed as ONE 2-D matmul `[N, In] @ [In, Out]` (N = product of x's leading
    dims) by `linear` in `dtype` (default: x's dtype).

    Same numbers as the einsum, but XLA's CPU backend runs the backward pass of
    the 2-D form faster than that of a rank-3 dot_general; merging the leading
    (batch-sharded) dims is free under SPMD. `names`: logical axes of the 2-D
    kernel `[In, Out]` (see `linear`).
    """
    lead = x.shape[:x.ndim - in_dims]
    k_in, k_out = kernel.shape[:in_dims], kernel.shape[in_dims:]
    n_in, n_out = int(np.prod(k_in)), int(np.prod(k_out))
    y = linear(x.reshape((-1, n_in)), kernel.reshape((n_in, n_out)),
               None if bias is None else bias.reshape((n_out,)),
               x.dtype if dtype is None else dtype, act, names)
    return y.reshape(lead + k_out)


def fused_matmul_2d(x: Array, kernels: Sequence[Array], biases: Optional[Sequence[Array]],
                    dtype: Dtype) -> list[Array]:
    """`[x @ k (+ b) for k, b in zip(kernels, biases)]` for same-shape `[In, H, K]`
    kernels (and `[H, K]` biases) as ONE matmul against their concatenation:
    same parameters and numbers, fewer and larger matmuls. Returns the
    `[..., H, K]` outputs."""
    kernel = jnp.concatenate(list(kernels), axis=1)
    bias = None if biases is None else jnp.concatenate(list(biases), axis=0)
    y = matmul_2d(x, kernel, 1, bias, dtype)
    # split (not slices): its gradient is one concatenate, where the slices'
    # is several pads summed (much slower on CPU in bfloat16).
    return jnp.split(y, len(kernels), axis=-2)
