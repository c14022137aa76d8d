"""Shared Transformer layers (Flax modules): dense, attention, MLP, norms, position
embeddings, pooling, and the (optionally scanned) block stack.

The kernels these modules call (matmul paths, LayerNorm backward, attention
einsums, the `KernelPolicy` that picks them) live in `mmjax.models.ops`.

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

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.decoding import append_kv, context_kv
from mmjax.models.ops.activations import get_activation
from mmjax.models.ops.attention import dot_product_attention
from mmjax.models.ops.matmul import GATHERED_WEIGHT, broadcast_param, fused_matmul_2d, matmul_2d
from mmjax.models.ops.norm import layer_norm, rms_norm
from mmjax.models.ops.policy import fuse_projections

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
# swap batch shards when left to choose (tests/models/test_xla_shard_swap.py).
TOKENS = ("act_batch", "act_length", "act_embed")     # [B, N, D]
HIDDEN = ("act_batch", "act_length", "act_mlp")       # [B, N, F] between two matmuls
POOLED = ("act_batch", "act_embed")                   # [B, D]


def boundary(x: Optional[Array]) -> Optional[Array]:
    """`constrain` a module-boundary activation by its rank: `[B, D]` -> POOLED,
    `[B, N, D]` -> TOKENS (None passes through)."""
    if x is None:
        return None
    return constrain(x, {2: POOLED, 3: TOKENS}[x.ndim])


class Norm(nn.Module):
    """LayerNorm (`kind="layernorm"`) or RMSNorm (`kind="rmsnorm"`) over the last dim.

    Statistics are computed in float32; the output is cast to `dtype`
    (`ops.norm.layer_norm`, `ops.norm.rms_norm`).
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
        if self.kind == "rmsnorm":
            return rms_norm(x, scale, self.eps, self.dtype)
        raise ConfigError(f"Unknown norm {self.kind!r} (config key `norm`); "
                          "choose 'layernorm' or 'rmsnorm'.")


# ----------------------------------------------------------------------------
# Dense and attention
# ----------------------------------------------------------------------------

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
        return matmul_2d(x, kernel, 1, bias, self.dtype, self.act, self.names)


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
        return matmul_2d(x, self.kernel, 1, self.bias, self.dtype, names=("embed", "heads"))


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
        return matmul_2d(x, kernel, 2, bias, self.dtype, names=("heads", "embed"))


KV_CACHE_KINDS = (None, "self", "context")


class Attention(nn.Module):
    """Multi-head attention (self- or cross-) with separate q/k/v projections.

    `__call__(x [B, T, D], context [B, S, Dc] | None, mask [B, 1|H, T, S] | None)`
    returns `[B, T, D]`. With `context=None` it is self-attention.

    Optional key/value cache for incremental decoding (`kv_cache`, variables in
    the `cache` collection, see `mmjax.models.decoding`; the non-cached path is
    unchanged):
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
            k, v = context_kv(self, None if context is None else
                              (heads_in("key", context)(context),
                               heads_in("value", context)(context)), self.dtype)
        else:
            context = x if context is None else context
            projs = [heads_in(name, inp)
                     for name, inp in (("query", x), ("key", context), ("value", context))]
            if context is x and fuse_projections():  # one matmul for q, k, v (CPU)
                q, k, v = fused_matmul_2d(x, [p.kernel for p in projs],
                                          [p.bias for p in projs] if self.qkv_bias else None,
                                          self.dtype)
            else:
                q, k, v = projs[0](x), projs[1](context), projs[2](context)
            if self.kv_cache == "self":
                k, v = append_kv(self, k, v, write_index, self.cache_len, self.dtype)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        k = constrain(k, ("act_batch", "act_length", "act_heads", "act_kv"))
        v = constrain(v, ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, v, mask, self.implementation)
        out = _HeadsOut(self.out_features or d, self.out_bias, self.dtype, self.kernel_init,
                        name="out")(out)
        return constrain(out, ("act_batch", "act_length", "act_embed"))


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
    """The `jax.checkpoint` policy called `name` (config key `remat`); each also keeps
    the kernels gathered for their matmuls (`ops.matmul.GATHERED_WEIGHT`, only
    present with `config.mesh.fsdp_weights="gather_once"`)."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"Unknown remat policy {name!r} (config key `remat`); "
                          f"choose one of {sorted(REMAT_POLICIES)}.")
    policy = REMAT_POLICIES[name]
    if policy is None:
        return None
    return jax.checkpoint_policies.save_from_both_policies(
        policy, jax.checkpoint_policies.save_only_these_names(GATHERED_WEIGHT))


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
    y = attn(probe, x); y = y + mlp(norm(y))). With `use_mlp=False` only the
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


# ----------------------------------------------------------------------------
# Patch dropout (FLIP)
# ----------------------------------------------------------------------------

def kept_patches(n: int, rate: float) -> int:
    """How many of `n` patch tokens patch dropout at `rate` (the fraction dropped)
    keeps: `max(1, round(n * (1 - rate)))`, halves rounded up; static.

    open_clip floors instead; both give 98 of 196 at 0.5 and 49 at 0.75, and
    rounding cannot lose a token to a float error below an integer (0.7 of 100
    patches floors 29.999... to 29)."""
    return max(1, int(math.floor(n * (1.0 - float(rate)) + 0.5)))


def check_patch_dropout(rate: float, key: str = "model.image.patch_dropout") -> None:
    """ConfigError naming `key` unless 0 <= rate < 1."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"config.{key}={rate!r}: must be a fraction of patches dropped in "
                          "[0, 1) (0: off; FLIP drops 0.5 to 0.75).")


def drop_patches(module: nn.Module, x: Array, rate: float, prefix: int = 0) -> Array:
    """Patch dropout (FLIP; open_clip's `patch_dropout`): in training, each example
    keeps its own random `kept_patches(N, rate)` of its N patch tokens.

    `x [B, prefix + N, D]` (position embeddings added; the `prefix` class /
    distillation tokens first, always kept) -> `[B, prefix + K, D]`, the kept
    patches in their original order (attention does not care, but equal rows of
    the unmasked tokens are easy to check). Only when `module` is called with an
    "augment" rng (`Family.apply` in the train step passes one; evaluation passes
    none), from which it draws: uniform scores per patch, the K highest kept
    (`lax.top_k`, then sorted), gathered with `take_along_axis`, so the work and
    memory of every later layer follow K. `rate == 0` or no rng: `x` unchanged.
    The gather runs per row, so the batch stays sharded like the rest (pinned to
    `TOKENS` again after it); the scores depend only on the key and the shape, so
    every mesh draws the same mask.
    """
    check_patch_dropout(rate)
    if not rate or not module.has_rng("augment"):
        return x
    b, n = x.shape[0], x.shape[1] - prefix
    k = kept_patches(n, rate)
    scores = jax.random.uniform(module.make_rng("augment"), (b, n))
    keep = jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1)        # [B, K]
    x = jnp.concatenate([x[:, :prefix], jnp.take_along_axis(x[:, prefix:], keep[:, :, None],
                                                             axis=1)], axis=1)
    return constrain(x, TOKENS)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
