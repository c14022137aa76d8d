"""Attention kernels: boolean masks and scaled dot-product attention.

Shapes: B batch, T query length, S key length, H query heads, KV key/value
heads (H % KV == 0: grouped-query attention), K head width.

Implementations (config key `attention`): "xla" (`xla_attention`, any device),
"cudnn" (`jax.nn.dot_product_attention`'s GPU kernel), "splash" (the Pallas TPU
kernel of `ops.tpu_attention` when the kernel policy's platform is TPU, else
"xla") and None (the platform's best: "splash" on TPU where it applies, else
`jax.nn.dot_product_attention`'s own choice).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.ops.matmul import matmul_f32_out, transposed
from mmjax.models.ops.policy import f32_accumulating, fused_attention

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn", "splash", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AttentionMask:
    """A boolean mask (`array`, True = attend) together with what it was built
    from, so a fused kernel can take the structure instead of the `[T, S]` array
    (`make_attention_mask`). It stands for `array` wherever an array is expected
    (`jnp.asarray`, `np.asarray`, `.shape`); the kernel paths that do not read
    `array` leave it out of the compiled program."""
    array: Array                     # bool, broadcastable to [B, H, T, S]
    key_valid: Optional[Array]       # [B, S] bool or None
    causal: bool = dataclasses.field(metadata=dict(static=True))

    shape = property(lambda self: self.array.shape)
    ndim = property(lambda self: self.array.ndim)
    dtype = property(lambda self: self.array.dtype)

    def __jax_array__(self):
        return self.array

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.array, dtype)


def make_attention_mask(query_valid: Optional[Array], key_valid: Optional[Array],
                        causal: bool = False, q_len: Optional[int] = None,
                        k_len: Optional[int] = None) -> Optional[AttentionMask]:
    """Boolean attention mask `[B, 1, T, S]` (True = attend), or None if nothing is
    masked, as an `AttentionMask` (the array and the key validity / causal flag).

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
    return None if mask is None else AttentionMask(mask, key_valid, causal)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None,
                          implementation: Optional[str] = "xla") -> Array:
    """Scaled dot-product attention: `xla_attention` for "xla", the Pallas splash
    kernel for "splash" on TPU, else `jax.nn.dot_product_attention` (cuDNN's fused
    kernel, or JAX's choice).

    Args:
      q: `[B, T, H, K]`; k, v: `[B, S, KV, K]`.
      mask: bool, broadcastable to `[B, H, T, S]`, True = attend, or an
        `AttentionMask` (`make_attention_mask`).
      implementation: "xla" (any device), "cudnn" (GPU fused kernel), "splash"
        (TPU fused kernel; "xla" on other platforms) or None (the platform's best:
        "splash" on TPU, else JAX's pick). "splash" and None on TPU run the kernel
        for no mask, key-padding masks and `make_attention_mask`'s causal masks,
        with both sequences at least 128 long; otherwise (other masks, e.g. `[T, S]`
        or the decoding cache's, shorter sequences; see `ops.tpu_attention`)
        "splash" runs `xla_attention` and None JAX's pick.
    Returns: `[B, T, H, K]`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} (config key "
                          "`attention`): choose 'xla', 'cudnn', 'splash' or None.")
    if implementation in ("splash", None) and fused_attention():
        from mmjax.models.ops import tpu_attention
        if tpu_attention.splash_applies(q, k, mask):
            return tpu_attention.splash_attention(q, k, v, *tpu_attention.expressible_mask(mask))
    if implementation == "splash":
        implementation = "xla"
    if isinstance(mask, AttentionMask):
        mask = mask.array
    if mask is not None:
        b, t, h, _ = q.shape
        mask = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))  # [T, S] -> 4-D
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, k.shape[1]))
    if implementation == "xla":
        return xla_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def xla_attention(q: Array, k: Array, v: Array, mask: Optional[Array]) -> Array:
    """The math of `jax.nn.dot_product_attention(implementation="xla")` (float32
    logits and softmax, masked logits at the dtype's most negative value,
    grouped-query heads), with heads moved before the sequence axes so each
    einsum is a plain batched matmul (faster on CPU, forward and backward).
    `mask`: None or bool `[B, H | 1, T, S]`."""
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    low = f32_accumulating(q.dtype) and k.dtype == v.dtype == q.dtype
    if low:  # bf16 x bf16 -> f32 batched GEMMs, as in `ops.matmul.linear`
        logits = matmul_f32_out(qh.reshape(b, kv, g * t, d), transposed(kh), q.dtype)
        logits = logits.reshape(b, kv, g, t, s)
    else:
        logits = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / np.sqrt(d))
    if mask is not None:
        m = mask.reshape(b, kv, g, t, s) if mask.shape[1] == n else mask[:, :, None]
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if low:
        out = matmul_f32_out(probs.reshape(b, kv, g * t, s), vh, v.dtype).astype(v.dtype)
        out = out.reshape(b, kv, g, t, d)
    else:
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, vh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
