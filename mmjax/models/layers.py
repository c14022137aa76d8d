"""Shared Transformer layers: attention, MLP, norms, position embeddings, pooling.

Every parameter carries logical axis names (see `mmjax.train.sharding` for the
table that maps them to mesh axes):

  embed   model width            mlp    MLP hidden width
  heads   attention heads        kv     per-head width
  vocab   vocabulary             layers stacked (scanned) layers
  proj    output projection      None   never sharded

Activations use the same names with an `act_` prefix (`act_batch`, `act_length`,
`act_embed`, ...) so weights and activations are laid out independently.

Shapes: B batch, T query length, S key length, D width, H heads, K head width.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError

Dtype = Any
Array = jax.Array

# Initializers used across mmjax (CLIP/BERT-style small normal inits).
default_kernel_init = nn.initializers.xavier_uniform()
normal_init = nn.initializers.normal


def logical(init: Callable, names: Sequence[Optional[str]]) -> Callable:
    """Attach logical axis `names` to a parameter initializer."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
    """Logical sharding constraint on an activation (no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(names))


# Activation layouts at module boundaries. Every module that hands activations
# on (tower outputs, connector inputs and outputs, heads) pins them to one of
# these, so the partitioner never has to infer a layout across a module: where
# FSDP- and tensor-sharded weights meet, XLA's SPMD partitioner has been seen to
# swap batch shards when left to choose (tests/test_xla_shard_swap.py).
TOKENS = ("act_batch", "act_length", "act_embed")     # [B, N, D]
HIDDEN = ("act_batch", "act_length", "act_mlp")       # [B, N, F] between two matmuls
POOLED = ("act_batch", "act_embed")                   # [B, D]


def boundary(x: Optional[Array]) -> Optional[Array]:
    """`constrain` a module-boundary activation by its rank: `[B, D]` -> POOLED,
    `[B, N, D]` -> TOKENS (None passes through)."""
    if x is None:
        return None
    return constrain(x, {2: POOLED, 3: TOKENS}[x.ndim])


# ----------------------------------------------------------------------------
# Kernel policy: which matmul path and which gradient precision
# ----------------------------------------------------------------------------

GRAD_REDUCE_DTYPES = ("float32", "compute")


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """How low-precision matmuls are lowered, read while a function is traced.

    platform: "cpu", "gpu" or "tpu" of the devices the computation is compiled
      for (the trainer sets it from its mesh); None = `jax.default_backend()`,
      right for code that runs where it is traced. Never the host's backend when
      compiling for an accelerator from a CPU host.
    grad_reduce_dtype: "float32" (default): a float32 kernel used in a bfloat16
      matmul gets its gradient from a float32-output dW GEMM, so the sum of the
      per-replica partial gradients (all-reduce / reduce-scatter over the batch
      axes) runs in float32, as large-scale recipes do. "compute": dW in the
      compute dtype (half the gradient traffic, bfloat16 rounding of the sum).
    """
    platform: Optional[str] = None
    grad_reduce_dtype: str = "float32"

    def __post_init__(self):
        if self.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ConfigError(f"config.optim.grad_reduce_dtype={self.grad_reduce_dtype!r}; "
                              f"choose one of {GRAD_REDUCE_DTYPES}.")


_POLICY: contextvars.ContextVar[KernelPolicy] = contextvars.ContextVar(
    "mmjax_kernel_policy", default=KernelPolicy())


@contextlib.contextmanager
def kernel_policy(policy: KernelPolicy) -> Iterator[KernelPolicy]:
    """Trace under `policy` (see `KernelPolicy`)."""
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def current_platform() -> str:
    """The platform matmuls are lowered for: the policy's, else the default backend."""
    return _POLICY.get().platform or jax.default_backend()


def broadcast_param(p: Array, shape: Sequence[int], dtype: Dtype) -> Array:
    """A parameter broadcast to `shape` (e.g. a class token to `[B, 1, D]`), then cast
    to `dtype`. In this order the gradient's sum over the broadcast (batch) axes
    runs in the parameter's float32, and so does its reduction across replicas;
    cast first, both would be bfloat16."""
    return jnp.broadcast_to(p, tuple(shape)).astype(dtype)


# ----------------------------------------------------------------------------
# Activations and norms
# ----------------------------------------------------------------------------

def quick_gelu(x: Array) -> Array:
    """x * sigmoid(1.702 x), the activation of the original CLIP models."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: Array) -> Array:
    """Exact GELU `x * Phi(x)`, written with `erf` (as PyTorch does): the same values
    as `jax.nn.gelu(approximate=False)` (which uses `erfc`; max difference 5e-7 on
    N(0, 1) inputs) at 2.5x its forward speed on CPU."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"Unknown activation {name!r} (config key `act`); "
                          f"choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class Norm(nn.Module):
    """LayerNorm (`kind="layernorm"`) or RMSNorm (`kind="rmsnorm"`) over the last dim.

    Statistics are computed in float32; the output is cast to `dtype`.
    """
    kind: str = "layernorm"
    eps: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (d,))
        if self.kind == "layernorm":
            bias = (self.param("bias", logical(nn.initializers.zeros, ("embed",)), (d,))
                    if self.use_bias else jnp.zeros((d,), jnp.float32))
            return layer_norm(x, scale, bias, self.eps, self.dtype)
        elif self.kind == "rmsnorm":
            xf = x.astype(jnp.float32)
            ms = jnp.square(xf).mean(-1, keepdims=True)
            y = xf * jax.lax.rsqrt(ms + self.eps) * scale
        else:
            raise ConfigError(f"Unknown norm {self.kind!r} (config key `norm`); "
                              "choose 'layernorm' or 'rmsnorm'.")
        return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float, dtype: Dtype) -> Array:
    """LayerNorm over the last axis in float32, cast to `dtype`: `x [..., D]`,
    `scale, bias [D]` -> `[..., D]`.

    The backward pass is the closed form (dx = rstd * (dxhat - mean(dxhat) -
    xhat * mean(dxhat * xhat)), from the saved input, mean and 1/std) instead of
    autodiff's chain of broadcasts and reductions: the same values, ~30% less
    time per norm on CPU.
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


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------

def make_attention_mask(query_valid: Optional[Array], key_valid: Optional[Array],
                        causal: bool = False, q_len: Optional[int] = None,
                        k_len: Optional[int] = None) -> Optional[Array]:
    """Boolean attention mask `[B, 1, T, S]` (True = attend), or None if nothing is masked.

    Args:
      query_valid: `[B, T]` bool or None (padding queries still attend; their
        outputs are simply ignored downstream, so this is only used for shape).
      key_valid: `[B, S]` bool or None: keys that may be attended.
      causal: additionally forbid attending to later positions (T == S).
    """
    del query_valid
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
    if causal:
        t = q_len if q_len is not None else key_valid.shape[1]
        s = k_len if k_len is not None else t
        c = jnp.tril(jnp.ones((t, s), bool))[None, None]
        mask = c if mask is None else jnp.logical_and(mask, c)
    return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None,
                          implementation: Optional[str] = "xla") -> Array:
    """Scaled dot-product attention: `_xla_attention` for "xla", else
    `jax.nn.dot_product_attention` (cuDNN's fused kernel, or JAX's choice).

    Args:
      q: `[B, T, H, K]`; k, v: `[B, S, H, K]`.
      mask: bool, broadcastable to `[B, H, T, S]`, True = attend.
      implementation: "xla" (any device), "cudnn" (GPU fused kernel) or None
        (let JAX pick).
    Returns: `[B, T, H, K]`.
    """
    if implementation not in ("xla", "cudnn", None):
        raise ConfigError(f"attention implementation {implementation!r} (config key "
                          "`attention`): choose 'xla', 'cudnn' or None.")
    if mask is not None:
        b, t, h, _ = q.shape
        mask = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))  # [T, S] -> 4-D
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, k.shape[1]))
    if implementation == "xla":
        return _xla_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _xla_attention(q: Array, k: Array, v: Array, mask: Optional[Array]) -> Array:
    """The math of `jax.nn.dot_product_attention(implementation="xla")` (float32
    logits and softmax, masked logits at the dtype's most negative value,
    grouped-query heads), with heads moved before the sequence axes so each
    einsum is a plain batched matmul: on CPU this runs the forward 2.5x and
    the backward 2.4x faster ([64, 50, 4, 64]: 8.7 vs 21 ms per gradient)."""
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    low = _f32_accumulating(q.dtype) and k.dtype == v.dtype == q.dtype
    if low:  # bf16 x bf16 -> f32 batched GEMMs, as in `linear`
        logits = _matmul_f32_out(qh.reshape(b, kv, g * t, d), _transposed(kh), q.dtype)
        logits = logits.reshape(b, kv, g, t, s)
    else:
        logits = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / np.sqrt(d))
    if mask is not None:
        m = mask.reshape(b, kv, g, t, s) if mask.shape[1] == n else mask[:, :, None]
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if low:
        out = _matmul_f32_out(probs.reshape(b, kv, g * t, s), vh, v.dtype).astype(v.dtype)
        out = out.reshape(b, kv, g, t, d)
    else:
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, vh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


class _HeadsIn(nn.Module):
    """`[B, T, Din] -> [B, T, H, K]` projection; kernel `[Din, H, K]` (logical embed, heads, kv)."""
    in_features: int
    heads: int
    head_dim: int
    use_bias: bool
    dtype: Dtype
    kernel_init: Callable

    def setup(self):
        self.kernel = self.param("kernel", logical(self.kernel_init, ("embed", "heads", "kv")),
                                 (self.in_features, self.heads, self.head_dim))
        self.bias = (self.param("bias", logical(nn.initializers.zeros, ("heads", "kv")),
                                (self.heads, self.head_dim)) if self.use_bias else None)

    def __call__(self, x):
        return matmul_2d(x, self.kernel, 1, self.bias, self.dtype)


def _low_precision(dtype: Dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _f32_accumulating(dtype: Dtype) -> bool:
    """Whether matmuls of `dtype` inputs run as `dtype x dtype -> float32` (see `linear`)."""
    return _low_precision(dtype) and current_platform() == "cpu"


def _transposed(a: Array) -> Array:
    """`a [..., n, k] -> [..., k, n]` as a row-major copy. A plain transpose feeding a
    dot becomes a column-major layout of the operand, which XLA:CPU's YNNPACK GEMM
    rejects; the dot then falls back to float32 (upcast operands, ~3x slower in
    bfloat16)."""
    *lead, n, k = a.shape
    return jnp.swapaxes(a.reshape(*lead, n, k, 1), -3, -1)[..., 0, :, :]


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


# Name scope of the CPU-only low-precision GEMM path, visible in HLO op names, so a
# compile for an accelerator can show that the path did not leak into it.
CPU_PATH_SCOPE = "mmjax_cpu_bf16_gemm"


@jax.named_scope(CPU_PATH_SCOPE)
def _matmul_f32_out(x: Array, w: Array, dtype: Dtype) -> Array:
    return _matmul_f32_out_vjp(x, w, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32_out_vjp(x: Array, w: Array, dtype: Dtype) -> Array:
    """`x [..., N, In] @ w [..., In, Out]` (same leading batch dims) with both operands
    cast to the low-precision `dtype`, accumulated and returned in float32.

    The backward pass casts the cotangent to `dtype` so its two matmuls are
    low-precision-in, float32-out too (autodiff would multiply the float32
    cotangent by the low-precision operand, i.e. run float32 GEMMs). Gradients
    come back in the operands' own dtypes: a float32 kernel gets its float32 dW
    without a round trip through `dtype`.
    """
    return _matmul_f32_out_fwd(x, w, dtype)[0]


def _matmul_f32_out_fwd(x, w, dtype):
    xl, wl = x.astype(dtype), w.astype(dtype)
    return _mm(xl, wl), (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_f32_out_bwd(dtype, res, g):
    x, w, x_like, w_like = res
    g = g.astype(dtype)
    dx = _mm(g, _transposed(w)).astype(x_like.dtype)
    # dW = x^T g, with the narrower of x [N, In] and g [N, Out] transposed.
    dw = (_mm(_transposed(x), g) if x.shape[-1] <= g.shape[-1]
          else _transposed(_mm(_transposed(g), x)))
    return dx, dw.astype(w_like.dtype)


_matmul_f32_out_vjp.defvjp(_matmul_f32_out_fwd, _matmul_f32_out_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32_dw(x: Array, w: Array, dtype: Dtype) -> Array:
    """`x [N, In] @ w [In, Out]` in `dtype` (output `dtype`), whose kernel gradient
    `x^T g` is a float32-output GEMM returned in `w`'s float32: the partial dW of
    each batch shard is then summed across replicas in float32."""
    return _matmul_f32_dw_fwd(x, w, dtype)[0]


def _matmul_f32_dw_fwd(x, w, dtype):
    xl, wl = x.astype(dtype), w.astype(dtype)
    return xl @ wl, (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_f32_dw_bwd(dtype, res, g):
    x, w, x_like, w_like = res
    g = g.astype(dtype)
    dx = (g @ w.T).astype(x_like.dtype)
    dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32)
    return dx, dw.astype(w_like.dtype)


_matmul_f32_dw.defvjp(_matmul_f32_dw_fwd, _matmul_f32_dw_bwd)


def linear(x: Array, kernel: Array, bias: Optional[Array], dtype: Dtype,
           act: Optional[Callable[[Array], Array]] = None) -> Array:
    """`act(x [N, In] @ kernel [In, Out] (+ bias [Out]))` computed in `dtype`: `[N, Out]`.

    On the CPU backend with bfloat16/float16 `dtype` the product is accumulated
    and returned in float32, the bias is added in float32 and the sum is cast to
    `dtype` once; the backward pass multiplies `dtype` operands into float32 as
    well (`_matmul_f32_out`). That is the only low-precision GEMM XLA:CPU runs
    fast (YNNPACK with avx512_bf16: 750-850 GFLOP/s on [3200, 256] x [256, 1024]
    here, vs 300-375 for a bfloat16-output dot and ~400 in float32), and it keeps
    the bias gradient a float32 sum (a bfloat16 one becomes a slow, rounding
    chain of 32-wide reduce-windows). The activation `act` (if any) is applied to
    the float32 sum too: XLA:CPU computes bfloat16 elementwise ops in float32
    with a rounding after every op, slower and less exact. GPUs and TPUs
    accumulate in float32 inside their bfloat16 GEMMs already, so there the plain
    `dtype` product is kept (and remat policies that save dot outputs keep them
    in `dtype`); with `KernelPolicy.grad_reduce_dtype="float32"` (the default) the
    float32 kernel's dW and the bias gradient come out in float32, so their sum
    across data-parallel replicas is a float32 sum. The platform is the kernel
    policy's (the mesh's devices under the trainer), not the host's.
    """
    if _f32_accumulating(dtype):
        y = _matmul_f32_out(x, kernel, dtype)
        y = y if bias is None else y + bias.astype(jnp.float32)
        return (y if act is None else act(y)).astype(dtype)
    if (_low_precision(dtype) and kernel.dtype == jnp.float32
            and _POLICY.get().grad_reduce_dtype == "float32"):
        # float32 parameter gradients: dW from a float32-output GEMM, the bias
        # gradient summed over rows in float32 (see `KernelPolicy`).
        y = _matmul_f32_dw(x, kernel, dtype)
        y = y if bias is None else y + broadcast_param(bias, y.shape, dtype)
    else:
        y = x.astype(dtype) @ kernel.astype(dtype)
        y = y if bias is None else y + bias.astype(dtype)
    return y if act is None else act(y)


def matmul_2d(x: Array, kernel: Array, in_dims: int, bias: Optional[Array] = None,
              dtype: Optional[Dtype] = None,
              act: Optional[Callable[[Array], Array]] = None) -> Array:
    """`act(x [..., *kernel.shape[:in_dims]] @ kernel (+ bias [*kernel.shape[in_dims:]]))`
    computed as ONE 2-D matmul `[N, In] @ [In, Out]` (N = product of x's leading
    dims) by `linear` in `dtype` (default: x's dtype).

    Same numbers as the einsum, but XLA's CPU backend runs the backward pass
    of the 2-D form about 2x faster than that of a rank-3 dot_general
    (measured: [64, 50, 256] x [256, 1024], 21 vs 48 ms); merging the leading
    (batch-sharded) dims is free under SPMD.
    """
    lead = x.shape[:x.ndim - in_dims]
    k_in, k_out = kernel.shape[:in_dims], kernel.shape[in_dims:]
    n_in, n_out = int(np.prod(k_in)), int(np.prod(k_out))
    y = linear(x.reshape((-1, n_in)), kernel.reshape((n_in, n_out)),
               None if bias is None else bias.reshape((n_out,)),
               x.dtype if dtype is None else dtype, act)
    return y.reshape(lead + k_out)


class Dense(nn.Module):
    """`[..., In] -> [..., features]` (then `act`, if given) through `linear`; parameters
    `kernel [In, features]` and `bias [features]` as in `flax.linen.Dense` (same
    names, shapes and init), with logical axis `names` for the kernel (the bias
    takes the last one)."""
    features: int
    names: Sequence[Optional[str]] = (None, None)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    act: Optional[Callable[[Array], Array]] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", logical(self.kernel_init, self.names),
                            (x.shape[-1], self.features))
        bias = (self.param("bias", logical(self.bias_init, self.names[-1:]), (self.features,))
                if self.use_bias else None)
        return matmul_2d(x, kernel, 1, bias, self.dtype, self.act)


def _fused_qkv(x: Array, projs: Sequence[_HeadsIn], dtype: Dtype) -> list[Array]:
    """q, k, v of self-attention as ONE matmul against the concatenated kernels
    (same parameters and numbers as three projections; fewer, larger matmuls
    run faster, notably on CPU)."""
    kernel = jnp.concatenate([p.kernel for p in projs], axis=1)
    bias = jnp.concatenate([p.bias for p in projs], axis=0) if projs[0].use_bias else None
    y = matmul_2d(x, kernel, 1, bias, dtype)
    # split (not three slices): its gradient is one concatenate, where the slices'
    # is three pads summed (on CPU 5-10x slower in bfloat16).
    return jnp.split(y, 3, axis=-2)


class _HeadsOut(nn.Module):
    """`[B, T, H, K] -> [B, T, D]` projection; kernel `[H, K, D]` (logical heads, kv, embed)."""
    features: int
    use_bias: bool
    dtype: Dtype
    kernel_init: Callable

    @nn.compact
    def __call__(self, x):
        h, k = x.shape[-2:]
        kernel = self.param("kernel", logical(self.kernel_init, ("heads", "kv", "embed")),
                            (h, k, self.features))
        bias = (self.param("bias", logical(nn.initializers.zeros, ("embed",)), (self.features,))
                if self.use_bias else None)
        return matmul_2d(x, kernel, 2, bias, self.dtype)


KV_CACHE_KINDS = (None, "self", "context")


class Attention(nn.Module):
    """Multi-head attention (self- or cross-) with separate q/k/v projections.

    `__call__(x [B, T, D], context [B, S, Dc] | None, mask [B, 1|H, T, S] | None)`
    returns `[B, T, D]`. With `context=None` it is self-attention.

    Optional key/value cache for incremental decoding (`kv_cache`, variables in
    the `cache` collection; the non-cached path is unchanged):
      "self"     self-attention; the keys/values of `x` are written into
                 `[B, cache_len, H, K]` buffers at each row's `write_index [B]`
                 and the queries attend to the whole buffer (S = cache_len;
                 `mask` must hide the slots not written yet).
      "context"  cross-attention whose context is fixed during decoding: a call
                 with `context` stores its keys/values `[B, S, H, K]`, a call
                 with `context=None` attends to the stored ones.
    """
    num_heads: int
    qkv_bias: bool = True
    out_bias: bool = True
    out_features: Optional[int] = None
    implementation: Optional[str] = "xla"
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    kv_cache: Optional[str] = None
    cache_len: int = 0

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None,
                 mask: Optional[Array] = None, write_index: Optional[Array] = None) -> Array:
        d = x.shape[-1]
        if d % self.num_heads:
            raise ConfigError(f"width {d} is not divisible by num_heads {self.num_heads} "
                              "(config keys `width`, `heads`).")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"Attention kv_cache {self.kv_cache!r}: choose one of "
                             f"{KV_CACHE_KINDS}.")
        head_dim = d // self.num_heads

        def heads_in(name, inp):
            return _HeadsIn(inp.shape[-1], self.num_heads, head_dim, self.qkv_bias, self.dtype,
                            self.kernel_init, name=name)

        if self.kv_cache == "context":
            q = heads_in("query", x)(x)
            if context is not None:
                k, v = heads_in("key", context)(context), heads_in("value", context)(context)
                for name, new in (("cached_key", k), ("cached_value", v)):
                    var = self.variable("cache", name, jnp.zeros, new.shape, self.dtype)
                    var.value = new.astype(self.dtype)
            elif not self.has_variable("cache", "cached_key"):
                raise ValueError("cross-attention with kv_cache='context' got context=None "
                                 "before any call stored the context's keys/values: pass the "
                                 "context (e.g. image tokens) on the first (prefill) call.")
            else:
                k = self.get_variable("cache", "cached_key")
                v = self.get_variable("cache", "cached_value")
        else:
            context = x if context is None else context
            projs = [heads_in(name, inp)
                     for name, inp in (("query", x), ("key", context), ("value", context))]
            if context is x and current_platform() == "cpu":
                # One matmul for q, k and v is faster on CPU; on accelerators the
                # concatenation of head-sharded kernels costs all-to-alls under
                # tensor parallelism, and three matmuls cost nothing extra.
                q, k, v = _fused_qkv(x, projs, self.dtype)
            else:
                q, k, v = projs[0](x), projs[1](context), projs[2](context)
            if self.kv_cache == "self":
                if write_index is None:
                    raise ValueError("self-attention with kv_cache='self' needs `write_index` "
                                     "[B] (each row's first cache slot for this call).")
                k, v = (self._write_cache(name, new, write_index)
                        for name, new in (("cached_key", k), ("cached_value", v)))
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        k = constrain(k, ("act_batch", "act_length", "act_heads", "act_kv"))
        v = constrain(v, ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, v, mask, self.implementation)
        out = _HeadsOut(self.out_features or d, self.out_bias, self.dtype, self.kernel_init,
                        name="out")(out)
        return constrain(out, ("act_batch", "act_length", "act_embed"))

    def _write_cache(self, name: str, new: Array, write_index: Array) -> Array:
        """Writes `new [B, T, H, K]` into the `[B, cache_len, H, K]` buffer `name`
        at each row's `write_index`; returns the whole buffer."""
        b, _, h, k = new.shape
        buf = self.variable("cache", name, jnp.zeros, (b, self.cache_len, h, k), self.dtype)
        buf.value = write_rows(buf.value, new, write_index)
        return buf.value


# ----------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------

class Mlp(nn.Module):
    """Two-layer MLP, or gated SwiGLU when `act == "swiglu"`.

    `[..., D] -> [..., D]` with hidden width `hidden`.
    """
    hidden: int
    act: str = "gelu"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    def _dense(self, features, names, name, act=None):
        return Dense(features, names, use_bias=self.use_bias, dtype=self.dtype,
                     kernel_init=self.kernel_init, act=act, name=name)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, lead = x.shape[-1], x.shape[:-1]
        x = x.reshape((-1, d))  # 2-D matmuls: see `matmul_2d`
        if self.act == "swiglu":
            h = self._dense(self.hidden, ("embed", "mlp"), "gate", jax.nn.silu)(x)
            h = h * self._dense(self.hidden, ("embed", "mlp"), "fc1")(x)
        else:
            h = self._dense(self.hidden, ("embed", "mlp"), "fc1", get_activation(self.act))(x)
        if len(lead) == 2:
            h = constrain(h.reshape(lead + (self.hidden,)), ("act_batch", "act_length", "act_mlp"))
        return self._dense(d, ("mlp", "embed"), "fc2")(h.reshape((-1, self.hidden))).reshape(
            lead + (d,))


# ----------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------

def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding `[h * w, dim]` (MAE / big_vision layout)."""
    if dim % 4:
        raise ConfigError(f"sincos2d position embedding needs width % 4 == 0, got {dim}.")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1)
    omega = 1.0 / (temperature ** omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
    """Adds a position embedding to `[B, N, D]`: `kind="learned"` or `"sincos2d"` (grid `hw`)."""
    kind: str = "learned"
    hw: Optional[tuple[int, int]] = None
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, d = x.shape[1], x.shape[2]
        if self.kind == "learned":
            pe = self.param("embedding", logical(normal_init(self.init_std), (None, "embed")), (n, d))
        elif self.kind == "sincos2d":
            h, w = self.hw if self.hw is not None else (int(np.sqrt(n)),) * 2
            if h * w != n:
                raise ValueError(f"sincos2d grid {h}x{w} does not match {n} tokens.")
            pe = jnp.asarray(sincos_2d(h, w, d))
        elif self.kind == "none":
            return x
        else:
            raise ConfigError(f"Unknown position embedding {self.kind!r} (config key `posemb`); "
                              "choose 'learned', 'sincos2d' or 'none'.")
        return x + broadcast_param(pe[None], x.shape, x.dtype)


# ----------------------------------------------------------------------------
# Transformer blocks and the (optionally scanned) stack
# ----------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)) [+ cross-attn] + mlp(norm(x)).

    `__call__(x [B, T, D], extras)` returns `[B, T, D]`; `extras` is
    `(mask, context [B, S, Dc] | None, context_mask)`, plus `write_index [B]`
    in decode mode. Signature is scan-friendly: `(x, extras) -> (x, None)`.

    `decode=True`: the self-attention keeps a `cache_len` key/value cache
    (`mask [B, 1, T, cache_len]` over its slots) and the cross-attention keeps
    the context's keys/values (pass `context=None` after the first call); see
    `Attention.kv_cache`.
    """
    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    cross_attention: bool = False
    implementation: Optional[str] = "xla"
    dtype: Dtype = jnp.float32
    decode: bool = False
    cache_len: int = 0

    @nn.compact
    def __call__(self, x: Array, extras: tuple) -> tuple[Array, None]:
        mask, context, context_mask, *rest = extras
        write_index = rest[0] if rest else None
        norm = functools.partial(Norm, kind=self.norm, eps=self.norm_eps, dtype=self.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        x = x + Attention(self.num_heads, implementation=self.implementation,
                          dtype=self.dtype, kv_cache="self" if self.decode else None,
                          cache_len=self.cache_len, name="attn")(
            norm(name="norm1")(x), mask=mask, write_index=write_index)
        if self.cross_attention:
            x = x + Attention(self.num_heads, implementation=self.implementation,
                              dtype=self.dtype, kv_cache="context" if self.decode else None,
                              name="cross_attn")(
                norm(name="norm_cross")(x), context, context_mask)
        x = x + Mlp(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(norm(name="norm2")(x))
        return x, None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ConfigError(f"Unknown remat policy {name!r} (config key `remat`); "
                          f"choose one of {sorted(REMAT_POLICIES)}.")
    return REMAT_POLICIES[name]


def stacked(block_cls: type[nn.Module], depth: int, *, scan: bool, remat: str,
            name: str = "layers", **block_kwargs) -> Callable:
    """A stack of `depth` blocks applied as `fn(x, extras) -> x`.

    With `scan=True` the blocks are one `nn.scan` over a leading `layers` axis
    of the parameters (compile time flat in depth); otherwise they are named
    `{name}_0 .. {name}_{depth-1}`. `remat` names a `jax.checkpoint` policy
    applied per block ("none" disables rematerialization). Both layouts
    compute the same numbers; `mmjax.models.layers.stack_layer_params`
    converts between them. With `block_kwargs["decode"]` true (a KV cache in
    the `cache` collection) the scanned cache gets a leading `layers` axis too.
    """
    cls = block_cls
    if remat != "none":
        cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=not scan)
    if scan:
        axes = {"params": 0, "cache": 0} if block_kwargs.get("decode") else {"params": 0}
        scanned = nn.scan(cls, variable_axes=axes, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=depth,
                          metadata_params={nn.PARTITION_NAME: "layers"})(name=name, **block_kwargs)

        def run(x, extras):
            return scanned(x, extras)[0]
        return run

    blocks = [cls(name=f"{name}_{i}", **block_kwargs) for i in range(depth)]

    def run_unrolled(x, extras):
        for blk in blocks:
            x = blk(x, extras)[0]
        return x
    return run_unrolled


def write_rows(buf: Array, new: Array, index: Array) -> Array:
    """`buf [B, S, ...]` with `new [B, T, ...]` written at slots `index[b]..index[b]+T-1`
    of each row b (per-row cache offsets: rows of a batch sit at different lengths)."""
    def one(row, upd, i):
        return jax.lax.dynamic_update_slice(row, upd, (i,) + (0,) * (row.ndim - 1))
    return jax.vmap(one)(buf, new.astype(buf.dtype), index)


# Names of scanned stacks: their cache leaves carry a leading depth axis.
SCANNED_STACKS = ("layers", "groups")


def gather_cache(cache: Any, rows: Array) -> Any:
    """Cache for rows `rows [B']` (select, reorder or repeat; beam search) of a
    `cache` collection. Leaves under a scanned stack (`layers`, the Q-Former's
    `groups`) have the depth axis first and the batch axis second."""
    def take(path, x):
        scanned = any(getattr(k, "key", None) in SCANNED_STACKS for k in path)
        return jnp.take(x, rows, axis=1 if scanned else 0)
    return jax.tree_util.tree_map_with_path(take, cache)


def stack_layer_params(tree: dict, depth: int, name: str = "layers") -> dict:
    """Unrolled params (`{name}_i`) -> scanned params (`{name}` with leading depth axis)."""
    tree = dict(tree)
    per_layer = [tree.pop(f"{name}_{i}") for i in range(depth)]
    tree[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return tree


def unstack_layer_params(tree: dict, depth: int, name: str = "layers") -> dict:
    """Scanned params (`{name}` with leading depth axis) -> unrolled (`{name}_i`)."""
    tree = dict(tree)
    st = tree.pop(name)
    for i in range(depth):
        tree[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], st)
    return tree


# ----------------------------------------------------------------------------
# Attention pooling (MAP head)
# ----------------------------------------------------------------------------

class MAPHead(nn.Module):
    """Multihead attention pooling: learned queries attend to the tokens.

    `[B, N, D] -> [B, num_queries, D]` (SigLIP / big_vision MAP head:
    y = attn(probe, x); y = y + mlp(norm(y))). With `mlp=False` only the
    attention (CoCa's attentional pooler, followed by a norm outside).
    """
    num_heads: int
    num_queries: int = 1
    mlp_dim: Optional[int] = None
    act: str = "gelu"
    norm_eps: float = 1e-5
    use_mlp: bool = True
    implementation: Optional[str] = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, _, d = x.shape
        probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, "embed")),
                           (self.num_queries, d))
        q = broadcast_param(probe[None], (b, self.num_queries, d), self.dtype)
        y = Attention(self.num_heads, implementation=self.implementation, dtype=self.dtype,
                      name="attn")(q, x)
        if self.use_mlp:
            h = Norm(eps=self.norm_eps, dtype=self.dtype, name="norm")(y)
            y = y + Mlp(self.mlp_dim or 4 * d, self.act, dtype=self.dtype, name="mlp")(h)
        return boundary(y)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
