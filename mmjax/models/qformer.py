"""BLIP-2 Querying Transformer (Q-Former).

A BERT-style post-norm Transformer over `[queries ; text]`:
- `num_queries` learned query tokens, self-attention shared by queries and text,
- cross-attention to frozen image features in every `cross_attention_freq`-th
  layer (layers 0, f, 2f, ...), applied to query positions only,
- separate FFNs for query positions and text positions,
- three attention-mask modes (`mask_mode`):
    "unimodal"       queries see queries, text sees text (ITC, one pass),
    "bidirectional"  everything sees everything (ITM),
    "causal"         queries see queries; text sees queries and earlier text (ITG).

`QFormer(...)(image_feats [B, N, Dv] | None, text_ids [B, L] | None, mask_mode)`
returns hidden states `[B, Q + L, D]` (Q = 0 when `image_feats` is None).

Incremental decoding of the causal mode (BLIP-2's ITG head):
`decode=True, cache_len=S` keeps per layer a self-attention key/value buffer
`[B, Q + S, H, K]` in the `cache` collection: slots 0..Q-1 hold the query
tokens' keys/values, written once by the first call (the prefill, the only
call given `image_feats`), text slot j lives at Q + j. As queries never see
text, their states (and the cross-attention to the image) are final after
the prefill; later calls pass text only and run the text rows alone.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.layers import (HIDDEN, Attention, Dense, Norm, boundary, constrain,
                                 logical, normal_init, remat_policy)
from mmjax.models.ops.activations import get_activation
from mmjax.models.decoding import decode_slots

MASK_MODES = ("unimodal", "bidirectional", "causal")


def qformer_mask(num_queries: int, text_valid: Optional[jax.Array], mode: str,
                 batch: int) -> jax.Array:
    """Attention mask `[B, 1, Q+L, Q+L]` (True = attend) for a Q-Former pass."""
    if mode not in MASK_MODES:
        raise ValueError(f"Unknown Q-Former mask mode {mode!r}; choose one of {MASK_MODES}.")
    q = num_queries
    if text_valid is None:
        text_valid = jnp.zeros((batch, 0), bool)
    l = text_valid.shape[1]
    key_valid = jnp.concatenate([jnp.ones((batch, q), bool), text_valid], axis=1)
    n = q + l
    is_q = jnp.arange(n) < q
    if mode == "bidirectional":
        pattern = jnp.ones((n, n), bool)
    elif mode == "unimodal":
        pattern = is_q[:, None] == is_q[None, :]
    else:  # causal: queries -> queries; text -> queries and earlier/equal text
        causal_text = jnp.tril(jnp.ones((n, n), bool))
        pattern = jnp.where(is_q[:, None], is_q[None, :], is_q[None, :] | causal_text)
    return pattern[None, None] & key_valid[:, None, None, :]


class _PostNormFFN(nn.Module):
    """BERT FFN: LN(x + W2 act(W1 x))."""
    mlp_dim: int
    act: str
    norm_eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1",
                  kernel_init=normal_init(0.02), act=get_activation(self.act))(x)
        h = constrain(h, HIDDEN)
        h = Dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2",
                  kernel_init=normal_init(0.02))(h)
        return Norm(eps=self.norm_eps, dtype=self.dtype, name="norm")(x + h)


class _PostNormAttention(nn.Module):
    """BERT attention sub-layer: LN(x + Attn(x, context)); `kv_cache`/`cache_len`
    as in `layers.Attention`."""
    heads: int
    norm_eps: float
    attention: Optional[str]
    dtype: Any
    kv_cache: Optional[str] = None
    cache_len: int = 0

    @nn.compact
    def __call__(self, x, context=None, mask=None, write_index=None):
        y = Attention(self.heads, implementation=self.attention, dtype=self.dtype,
                      kernel_init=normal_init(0.02), kv_cache=self.kv_cache,
                      cache_len=self.cache_len, name="attn")(x, context, mask, write_index)
        return Norm(eps=self.norm_eps, dtype=self.dtype, name="norm")(x + y)


class QFormerLayer(nn.Module):
    """One Q-Former layer. `num_queries` leading positions are queries.

    `extras` is `(mask, image_feats)`, plus `write_index [B]` in decode mode
    (`cache_len` > 0: the self-attention keeps a key/value cache of that
    many slots, queries' included).
    """
    heads: int
    mlp_dim: int
    num_queries: int
    cross_attention: bool
    act: str = "gelu"
    norm_eps: float = 1e-12
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    cache_len: int = 0

    @nn.compact
    def __call__(self, x, extras):
        mask, image_feats, *rest = extras
        write_index = rest[0] if rest else None
        sub = functools.partial(_PostNormAttention, self.heads, self.norm_eps, self.attention,
                                self.dtype)
        ffn = functools.partial(_PostNormFFN, self.mlp_dim, self.act, self.norm_eps, self.dtype)
        x = sub(kv_cache="self" if self.cache_len else None, cache_len=self.cache_len,
                name="self_attn")(x, mask=mask, write_index=write_index)
        q, t = x[:, :self.num_queries], x[:, self.num_queries:]
        parts = []
        if self.num_queries:
            if self.cross_attention:
                q = sub(name="cross_attn")(q, image_feats.astype(self.dtype))
            parts.append(ffn(name="ffn_query")(q))
        if t.shape[1]:
            parts.append(ffn(name="ffn_text")(t))
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], None


class _QFormerGroup(nn.Module):
    """`freq` consecutive layers, the first with cross-attention (the scan unit)."""
    freq: int
    layer_kwargs: dict

    @nn.compact
    def __call__(self, x, extras):
        for i in range(self.freq):
            x, _ = QFormerLayer(cross_attention=(i == 0), name=f"layer_{i}",
                                **self.layer_kwargs)(x, extras)
        return x, None


class QFormer(nn.Module):
    """BLIP-2 Q-Former (see module docstring).

    Fields follow BERT-base by default: width 768, 12 layers, 12 heads, MLP
    3072, LayerNorm eps 1e-12, exact GELU; 32 queries; cross-attention every
    2nd layer; `vocab_size`/`max_len` for the text side.

    Fields:
      num_queries: learned query tokens Q (the image side's output is `[B, Q, width]`).
      width: hidden width D of queries and text.
      depth: number of layers.
      heads: attention heads (self- and cross-attention); must divide width.
      mlp_dim: hidden width of the FFNs (one for query positions, one for text).
      cross_attention_freq: cross-attention to the image features in layers 0,
        f, 2f, ... (f = this; 1 = every layer).
      vocab_size: text vocabulary (word embeddings and the tied ITG LM head;
        30523 = BERT's 30522 + [DEC]).
      max_len: text positions (learned position embedding); longer text is an error.
      act: activation of the FFNs and of the LM head's transform: "gelu",
        "gelu_tanh", "quick_gelu", "relu" or "silu" (no "swiglu").
      norm_eps: epsilon of every LayerNorm (post-norm layers, embeddings, LM head).
      scan: scan the layers in groups of `cross_attention_freq` (requires
        depth % freq == 0): params live under `groups` with a leading axis,
        otherwise under `layers_i`.
      remat: `jax.checkpoint` policy per layer (per group with `scan`): "none",
        "full", "dots", "dots_no_batch" or "save_everything" (not in decode mode).
      attention: attention implementation: "xla", "cudnn" (GPU), "splash" (TPU) or
        None (the platform's best).
      dtype: compute dtype (params stay float32; LM logits are float32); in a
        model config, `model.dtype` unless this section sets it.
      decode: KV-cache mode of the causal (ITG) text path (module docstring);
        Blip2Stage1 sets it from `model.cached_decode`.
      cache_len: text slots of that cache (None = max_len; at most max_len), plus
        num_queries slots for the queries; Blip2Stage1 sets it from `model.cache_len`.
    """
    num_queries: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    vocab_size: int = 30523
    max_len: int = 512
    act: str = "gelu"
    norm_eps: float = 1e-12
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    decode: bool = False
    cache_len: Optional[int] = None

    def _layers(self, num_queries: int):
        kw = dict(heads=self.heads, mlp_dim=self.mlp_dim, num_queries=num_queries, act=self.act,
                  norm_eps=self.norm_eps, attention=self.attention, dtype=self.dtype)
        # Decoding computes no gradients: no rematerialization there.
        remat = "none" if self.decode else self.remat
        if self.decode:
            kw["cache_len"] = self.num_queries + (self.cache_len or self.max_len)
        f = self.cross_attention_freq
        if self.scan:
            if self.depth % f:
                raise ConfigError(f"Q-Former scan needs depth ({self.depth}) divisible by "
                                  f"cross_attention_freq ({f}); set `scan=False`.")
            cls = _QFormerGroup
            if remat != "none":
                cls = nn.remat(cls, policy=remat_policy(remat))
            axes = {"params": 0, "cache": 0} if self.decode else {"params": 0}
            scanned = nn.scan(cls, variable_axes=axes, split_rngs={"params": True},
                              in_axes=nn.broadcast, length=self.depth // f,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            return [scanned(freq=f, layer_kwargs=kw, name="groups")]
        cls = QFormerLayer
        if remat != "none":
            cls = nn.remat(cls, policy=remat_policy(remat))
        return [cls(cross_attention=(i % f == 0), name=f"layers_{i}", **kw)
                for i in range(self.depth)]

    @nn.compact
    def __call__(self, image_feats=None, text_ids=None, mask_mode: str = "unimodal",
                 text_valid=None, pad_id: int = 0, lm_logits: bool = False):
        """Run the Q-Former.

        Args:
          image_feats: `[B, N, Dv]` frozen image features, or None (text only).
          text_ids: `[B, L]` int32, or None (queries only).
          mask_mode: "unimodal", "bidirectional" or "causal".
          text_valid: `[B, L]` bool; default `text_ids != pad_id`.
          lm_logits: also return the tied-embedding LM head's logits `[B, Q + L, V]`
            (BERT prediction head: dense, act, LayerNorm, embeddings^T + bias).
        Returns: hidden `[B, Q + L, D]` (Q = num_queries if image_feats is given,
          else 0), or `(hidden, logits)` with `lm_logits=True`.

        In decode mode only `mask_mode="causal"` applies; `image_feats` must be
        given on the first call (cache index 0) and only there, and `text_ids`
        on every call (the new tokens).
        """
        query_tokens = self.param("query_tokens", logical(normal_init(0.02), (None, "embed")),
                                  (self.num_queries, self.width))
        word_embeddings = nn.Embed(self.vocab_size, self.width, name="word_embeddings",
                                   embedding_init=logical(normal_init(0.02), ("vocab", "embed")))
        position_embeddings = self.param(
            "position_embeddings", logical(normal_init(0.02), (None, "embed")),
            (self.max_len, self.width))
        if image_feats is None and text_ids is None:
            raise ValueError("QFormer needs image_feats, text_ids or both.")
        parts = []
        b = (image_feats if image_feats is not None else text_ids).shape[0]
        q = self.num_queries if image_feats is not None else 0
        if q:
            parts.append(jnp.broadcast_to(query_tokens[None], (b, q, self.width)))
        if text_ids is not None:
            l = text_ids.shape[1]
            if l > self.max_len:
                raise ValueError(f"text length {l} exceeds Q-Former max_len {self.max_len}.")
            if text_valid is None:
                text_valid = text_ids != pad_id
        if self.decode:
            mask, write_index, slots = self._decode_mask(q, text_ids, text_valid, mask_mode, b)
            extras = (mask, image_feats, write_index)
        else:
            extras = (qformer_mask(q, text_valid, mask_mode, b), image_feats)
        if text_ids is not None:
            pos = position_embeddings[slots] if self.decode else position_embeddings[None, :l]
            parts.append(word_embeddings(text_ids) + pos)
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        x = Norm(eps=self.norm_eps, dtype=self.dtype, name="embed_norm")(x.astype(self.dtype))
        for layer in self._layers(q):
            x, _ = layer(x, extras)
        x = boundary(x)
        if not lm_logits:
            return x
        h = Dense(self.width, ("embed", "embed_out"), dtype=self.dtype, name="lm_transform",
                  kernel_init=normal_init(0.02))(x)
        h = Norm(eps=self.norm_eps, dtype=self.dtype, name="lm_norm")(get_activation(self.act)(h))
        bias = self.param("lm_bias", logical(nn.initializers.zeros, ("vocab",)), (self.vocab_size,))
        logits = word_embeddings.attend(h.astype(jnp.float32)) + bias
        return x, constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def _decode_mask(self, q: int, text_ids, text_valid, mask_mode: str, b: int):
        """Decode mode: `(mask [B, 1, q + L, Q + S], write_index [B], slots [B, L])`.

        Queries (present on the prefill only, q = Q) see the Q query slots; a
        text token at position j sees the query slots and the valid text
        slots Q..Q+j. The call's keys/values go to slot `write_index`:
        Q + the row's text position, or 0 for the prefill's [queries; text].
        """
        if mask_mode != "causal":
            raise ValueError(f"Q-Former decode mode runs the causal (ITG) mask only, got "
                             f"mask_mode={mask_mode!r}.")
        if text_ids is None:
            raise ValueError("Q-Former decode mode needs `text_ids` on every call.")
        cache_len = self.cache_len or self.max_len
        if cache_len > self.max_len:
            raise ValueError(f"Q-Former cache_len {cache_len} exceeds max_len {self.max_len}.")
        nq, l = self.num_queries, text_ids.shape[1]
        text_mask, start, slots = decode_slots(self, text_valid, b, l, cache_len)
        text_rows = jnp.concatenate([jnp.ones((b, 1, l, nq), bool), text_mask], axis=-1)
        if not q:
            return text_rows, start + nq, slots
        query_rows = jnp.broadcast_to(jnp.arange(nq + cache_len) < nq, (b, 1, q, nq + cache_len))
        return jnp.concatenate([query_rows, text_rows], axis=2), start + nq - q, slots


def group_qformer_params(tree: dict, depth: int, freq: int) -> dict:
    """Unrolled Q-Former params (`layers_i`) -> scanned layout (`groups`)."""
    tree = dict(tree)
    groups = []
    for g in range(depth // freq):
        groups.append({f"layer_{j}": tree.pop(f"layers_{g * freq + j}") for j in range(freq)})
    tree["groups"] = jax.tree.map(lambda *xs: jnp.stack(xs), *groups)
    return tree
