"""Fused attention on TPU: JAX's Pallas splash attention kernel behind the
`dot_product_attention` interface (`attention="splash"`, or None on TPU).

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) never holds the
`[B, H, T, S]` logits or probabilities: it streams key/value blocks through an
online softmax, keeps one float32 log-sum-exp per query for the backward pass and
recomputes the probabilities there block by block. Attention memory goes from
quadratic in the sequence to linear, and blocks that a causal mask hides
entirely are skipped.

What it computes is `ops.attention.xla_attention`'s math (float32 logits and
softmax, grouped-query heads) for the masks it can express:

  no mask                       every key
  key padding                   `make_attention_mask(None, key_valid)`, or any bool
                                mask of shape `[B | 1, 1, 1, S]`: per-example key
                                validity, through segment ids
  causal (+ key padding)        `make_attention_mask(..., causal=True)`: the kernel's
                                static causal block mask, key validity as above

Any other mask (`[T, S]` or per-head masks, the decoding cache masks) is not
expressible and `dot_product_attention` runs `xla_attention` instead
(`splash_applies`). Sequences shorter than one 128-token block on either side
(text of 77 tokens, a MAP head's single probe, cached decoding) also stay on XLA:
the kernel would pad them to 128 and their `[T, S]` logits are small.

Lengths the kernel cannot tile (ViT's 197 tokens, AST's 1,214) are padded to a
multiple of 128 with keys no query attends and queries whose outputs are sliced
off. Differences from `xla_attention`:
  - queries are scaled by 1/sqrt(K) before the kernel (in float32, then rounded
    to their dtype), not the float32 logits after it;
  - a causal query that sees no valid key (left padding: a padding position
    before the first real token) attends the padding keys up to itself instead
    of every key uniformly. In self-attention such a query is itself padding: its
    output is finite and used by nothing downstream (padding positions are
    ignored, and no real query attends a padding key), so nothing that is used
    changes, gradients included. A non-causal example with no valid
    key at all attends its keys uniformly, as in `xla_attention`.

Sharding: a Pallas kernel is a custom call that XLA's SPMD partitioner cannot
split, so under a mesh (`jax.set_mesh`, as the trainer traces) the kernel runs
inside `jax.shard_map` over the axes the logical rules give `act_batch` and
`act_heads` (`mmjax.train.sharding`), each device on its rows and heads; an axis
that does not divide the batch or the heads (query and key/value heads alike) is
left out (those dimensions are gathered).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import AxisType, PartitionSpec as P

from mmjax.models.ops.attention import AttentionMask

Array = jax.Array

BLOCK = 128      # sequences are padded to a multiple of this (the kernel's lane width)
MIN_LEN = BLOCK  # shorter query or key sequences stay on xla_attention
MAX_BLOCK = 512  # largest tile tried (a divisor of the padded length)


def expressible_mask(mask) -> Optional[tuple[Optional[Array], bool]]:
    """`(key_valid [B | 1, S] or None, causal)` for a mask the kernel can express
    (None, an `AttentionMask`, or a bool array of shape `[B | 1, 1, 1, S]`), else None."""
    if mask is None:
        return None, False
    if isinstance(mask, AttentionMask):
        return mask.key_valid, mask.causal
    if jnp.ndim(mask) == 4 and mask.shape[1] == mask.shape[2] == 1:
        return mask[:, 0, 0, :].astype(bool), False
    return None


def splash_applies(q: Array, k: Array, mask) -> bool:
    """Whether `splash_attention` computes this attention (see the module docstring):
    an expressible mask, both sequences at least `MIN_LEN`, equal q/k/v widths."""
    return (expressible_mask(mask) is not None and q.shape[1] >= MIN_LEN
            and k.shape[1] >= MIN_LEN and q.shape[-1] == k.shape[-1]
            and q.shape[2] % k.shape[2] == 0)


def _block(n: int) -> int:
    """Largest of 512, 256, 128 that divides `n` (a multiple of 128)."""
    b = MAX_BLOCK
    while n % b:
        b //= 2
    return b


def _segment_ids(key_valid: Optional[Array], causal: bool, b: int, t: int, s: int,
                 tp: int, sp: int) -> Optional[splash.SegmentIds]:
    """Segment ids `[B, Tp]`, `[B, Sp]` expressing key validity and the padding to
    `(Tp, Sp)`; a query attends the keys of its own id. No row is left without a
    key (the kernel's softmax would divide by zero): see the module docstring."""
    if key_valid is None and tp == t and sp == s:
        return None
    valid = (jnp.ones((b, s), bool) if key_valid is None
             else jnp.broadcast_to(key_valid.astype(bool), (b, s)))
    if causal:
        # Keys: 1 valid, 2 padding; a query attends valid keys (id 1) once one is
        # at or before it, else the padding keys before it (id 2; itself among them).
        kv = jnp.where(valid, 1, 2)
        seen = jnp.cumsum(valid.astype(jnp.int32), axis=-1) > 0           # [B, S]
        q = jnp.where(seen[:, np.minimum(np.arange(tp), s - 1)], 1, 2)    # [B, Tp]
    else:
        # Keys: 1 attended, 0 not; an example without any valid key attends all
        # its keys (uniformly: `splash_attention` zeroes its queries).
        kv = jnp.where(jnp.any(valid, axis=-1, keepdims=True), valid, True).astype(jnp.int32)
        q = jnp.ones((b, tp), jnp.int32)
    kv = jnp.pad(kv.astype(jnp.int32), ((0, 0), (0, sp - s)))  # block padding: id 0
    return splash.SegmentIds(q=q.astype(jnp.int32), kv=kv)


def _local_attention(q: Array, k: Array, v: Array, *seg: Array, causal: bool,
                     interpret: bool) -> Array:
    """The kernel on one device's rows and heads: q `[B, H, Tp, K]`, k/v
    `[B, KV, Sp, K]`, optional segment ids `[B, Tp]`, `[B, Sp]` -> `[B, H, Tp, K]`."""
    h, tp, sp = q.shape[1], q.shape[2], k.shape[2]
    bq, bkv = _block(tp), _block(sp)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                              block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                              block_q_dq=bq, block_kv_dq=bkv)
    one = splash.CausalMask((tp, sp)) if causal else splash.FullMask((tp, sp))
    kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * h), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    if not seg:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(kernel)(q, k, v, splash.SegmentIds(*seg))


def _mesh_specs(b: int, h: int, kv: int):
    """`(mesh, its non-manual axes, batch axes, head axes)` for `shard_map`, or None
    outside a mesh (or inside a `shard_map` over all of its axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    free = [a for a, typ in zip(mesh.axis_names, mesh.axis_types) if typ != AxisType.Manual]
    if not free:
        return None
    rules = nn.logical_to_mesh_axes(("act_batch", "act_heads"))

    def axes(entry, dims):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(a for a in names if a in free)
        size = math.prod(mesh.shape[a] for a in names)
        return names if names and all(d % size == 0 for d in dims) else None
    return mesh, free, axes(rules[0], (b,)), axes(rules[1], (h, kv))


def splash_attention(q: Array, k: Array, v: Array, key_valid: Optional[Array] = None,
                     causal: bool = False, *, interpret: bool = False) -> Array:
    """Attention through the Pallas splash kernel; `xla_attention`'s result for the
    same inputs (see the module docstring for the two differences).

    Args:
      q: `[B, T, H, K]`; k, v: `[B, S, KV, K]` (H % KV == 0).
      key_valid: `[B | 1, S]` bool or None: the keys that may be attended.
      causal: query t attends keys s <= t (T and S aligned at the start).
      interpret: run the kernel in Pallas' interpreter (any backend; for tests).
    Returns: `[B, T, H, K]` in q's dtype.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    tp, sp = -(-t // BLOCK) * BLOCK, -(-s // BLOCK) * BLOCK
    seg = _segment_ids(key_valid, causal, b, t, s, tp, sp)
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(d))).astype(q.dtype)
    if key_valid is not None and not causal:
        # No valid key: xla_attention's softmax over all-masked logits is uniform
        # over the keys; zero queries (logits 0) give that, and zero gradients to
        # q and k, as there.
        any_valid = jnp.any(jnp.broadcast_to(key_valid, (b, s)), axis=-1)
        q = jnp.where(any_valid[:, None, None, None], q, jnp.zeros_like(q))
    qh = q.transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kh = jnp.pad(kh, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vh = jnp.pad(vh, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    args = (qh, kh, vh) + ((seg.q, seg.kv) if seg is not None else ())
    local = functools.partial(_local_attention, causal=causal, interpret=interpret)
    where = _mesh_specs(b, h, kv)
    if where is None:
        out = local(*args)
    else:
        mesh, free, batch, heads = where
        specs = (P(batch, heads, None, None),) * 3 + (P(batch, None),) * (len(args) - 3)
        out = jax.shard_map(local, mesh=mesh, axis_names=set(free), check_vma=False,
                            in_specs=specs, out_specs=specs[0])(*args)
    return out[:, :, :t].transpose(0, 2, 1, 3)
