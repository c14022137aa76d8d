"""Kernel policy: which matmul path and which gradient precision, read while tracing.

`KernelPolicy(platform, grad_reduce_dtype)` is set with `kernel_policy(...)`
around tracing (the trainer sets it from the platform of its mesh's devices);
outside any policy the default backend decides (right for code that runs where
it is traced).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError

Dtype = Any

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
    gather_weights: such a float32 kernel is cast and gathered to its layout
      without the FSDP shard once, in the forward pass, and the gathered copy is
      kept for the backward pass (named `ops.matmul.GATHERED_WEIGHT`, which every
      remat policy saves), instead of the partitioner gathering it inside the
      forward matmul, again in the recomputed forward and again in the
      input-gradient matmul (`config.mesh.fsdp_weights="gather_once"`).
    """
    platform: Optional[str] = None
    grad_reduce_dtype: str = "float32"
    gather_weights: bool = False

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


def low_precision(dtype: Dtype) -> bool:
    """Whether `dtype` is bfloat16 or float16."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def f32_accumulating(dtype: Dtype) -> bool:
    """Whether matmuls of `dtype` inputs run as `dtype x dtype -> float32` (the CPU
    low-precision path of `ops.matmul.linear`)."""
    return low_precision(dtype) and current_platform() == "cpu"


def float32_weight_grads(dtype: Dtype, weight_dtype: Dtype) -> bool:
    """Whether a `weight_dtype` parameter used in a `dtype` matmul gets a float32
    gradient from a float32-output dW GEMM (`KernelPolicy.grad_reduce_dtype`)."""
    return (low_precision(dtype) and jnp.dtype(weight_dtype) == jnp.float32
            and _POLICY.get().grad_reduce_dtype == "float32")


def gather_weights() -> bool:
    """Whether float32 kernels of low-precision matmuls are gathered once and kept
    (`KernelPolicy.gather_weights`)."""
    return _POLICY.get().gather_weights


def fuse_projections() -> bool:
    """Whether self-attention computes q, k and v as one matmul against the
    concatenated kernels: on CPU one larger matmul is faster; on accelerators the
    concatenation of head-sharded kernels costs all-to-alls under tensor
    parallelism, and three matmuls cost nothing extra."""
    return current_platform() == "cpu"


def fused_attention() -> bool:
    """Whether `attention="splash"` (and None) run the Pallas splash kernel
    (`ops.tpu_attention`): on TPU, where it keeps attention memory linear in the
    sequence; a Mosaic kernel compiles for TPUs only, so every other platform
    takes the XLA path."""
    return current_platform() == "tpu"
