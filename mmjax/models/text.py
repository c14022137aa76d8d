"""Text Transformers: the contrastive text encoder and the captioning decoder.

`TextEncoder(...)(ids [B, L]) -> (pooled [B, E], tokens [B, L, D])`
  causal + EOS pooling (CLIP), bidirectional + CLS pooling (BERT-like), or
  bidirectional + last-token pooling without a padding mask (SigLIP).
`CaptionDecoder(...)(text [B, L, D], image_tokens [B, N, Dv]) -> logits [B, L, V]`
  the CoCa multimodal decoder: causal self-attention, cross-attention to the
  image tokens in every block, vocabulary projection.

Incremental decoding (both modules): `decode=True, cache_len=S` keeps per
layer fixed-size key/value buffers `[B, S, H, K]` in the `cache` collection,
one write index per row and the validity of every written key (pad keys stay
masked, as in a full pass). Each call appends its tokens at each row's index
(learned positions follow the index) and attends to everything written
before; the decoder's cross-attention keys/values of the image tokens are
computed on the first call and kept (pass `image_tokens=None` after it). The
cache mechanism is `mmjax.models.decoding`'s, shared with the Q-Former and the
Llama decoder.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.decoding import decode_slots
from mmjax.models.layers import (Block, Dense, Norm, boundary, constrain, logical,
                                 normal_init, stacked)
from mmjax.models.ops.matmul import broadcast_param
from mmjax.models.ops.attention import make_attention_mask


def eos_positions(ids, eos_id: Optional[int], pad_id: int):
    """Index `[B]` of the pooling token: first `eos_id` in each row.

    With `eos_id=None` the highest token id is used (legacy CLIP, where EOT is
    the largest id). Rows without EOS fall back to their last non-pad token.
    """
    if eos_id is None:
        return jnp.argmax(ids, axis=-1)
    is_eos = ids == eos_id
    last_real = jnp.maximum(jnp.sum(ids != pad_id, axis=-1) - 1, 0)
    return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), last_real)


def real_tokens(ids, pad_id: int, eos_id: Optional[int] = None):
    """Bool `[B, L]`: the text tokens of each row, the padding after them False.

    `ids != pad_id`, except where the tokenizer pads with its EOS token (Hugging
    Face's CLIP, GPT-2 style): then the first EOS of a row is text and only what
    follows it is padding.
    """
    if eos_id is None or eos_id != pad_id:
        return ids != pad_id
    is_eos = ids == eos_id
    return jnp.cumsum(is_eos, axis=-1) - is_eos == 0  # up to and including the first EOS


class TextEncoder(nn.Module):
    """Text Transformer encoder.

    Fields:
      vocab_size: rows of the token embedding (the tokenizer's ids must be below it).
      max_len: context length: rows of the learned position embedding (longer
        inputs are an error).
      width: token width D.
      depth: number of Transformer blocks.
      heads: attention heads; must divide width.
      mlp_dim: MLP hidden width; None = 4 * width.
      act: MLP activation: "gelu", "gelu_tanh", "quick_gelu" (CLIP), "relu",
        "silu" or "swiglu".
      norm_eps: epsilon of every LayerNorm (blocks and the final `ln_final`).
      causal: causal self-attention (CLIP) or bidirectional (BERT/SigLIP).
      mask_padding: mask pad keys in attention (SigLIP attends to pads).
      pool: "eos" (each row's first `eos_id`, else its last non-pad token),
        "last" (position L-1), "cls" (first token) or "none" (pooled = None).
      eos_id: the token "eos" pooling reads; None = each row's highest id
        (legacy CLIP, whose EOT is the largest id).
      pad_id: padding token id: pad keys are masked with `mask_padding`, "eos"
        pooling's fallback skips pads, CoCa's caption loss ignores pad targets.
      embed_dim: size E of a linear projection of the pooled vector; None for no
        projection (CoCa sets it to `model.embed_dim`).
      proj_bias: bias of the output projection.
      scan: run the blocks as one `nn.scan` (params `layers` with a leading depth
        axis, else `layers_0..`): the same numbers, compile time flat in depth.
      remat: `jax.checkpoint` policy per block: "none", "full", "dots",
        "dots_no_batch" or "save_everything" (not applied in decode mode).
      attention: attention implementation: "xla", "cudnn" (GPU), "splash" (TPU) or
        None (the platform's best).
      dtype: compute dtype (params stay float32); in a model config, `model.dtype`
        unless this section sets it.
      decode: KV-cache mode (causal only; see the module docstring): no pooling,
        the call returns `(None, tokens [B, T, D])` for the new tokens. CoCa
        sets it from `model.cached_decode`.
      cache_len: KV-cache length in tokens (None = max_len; at most max_len).
        CoCa sets it from `model.cache_len`.
    """
    vocab_size: int = 49408
    max_len: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: Optional[int] = None
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    mask_padding: bool = True
    pool: str = "eos"
    eos_id: Optional[int] = 2
    pad_id: int = 0
    embed_dim: Optional[int] = None
    proj_bias: bool = False
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    decode: bool = False
    cache_len: Optional[int] = None

    def setup(self):
        self.embedding = nn.Embed(self.vocab_size, self.width,
                                  embedding_init=logical(normal_init(0.02), ("vocab", "embed")),
                                  name="token_embedding")

    @nn.compact
    def __call__(self, ids):
        b, l = ids.shape
        if l > self.max_len:
            raise ConfigError(f"text length {l} exceeds the model's context length {self.max_len} "
                              "(config key `max_len`).")
        x = self.embedding(ids).astype(self.dtype)
        pos = self.param("posemb", logical(normal_init(0.01), (None, "embed")),
                         (self.max_len, self.width))
        valid = real_tokens(ids, self.pad_id, self.eos_id) if self.mask_padding else None
        cache_kw = {}
        if self.decode:
            cache_len = self.cache_len or self.max_len
            if not self.causal or cache_len > self.max_len:
                raise ValueError(f"TextEncoder decode mode needs `causal=True` and cache_len "
                                 f"({cache_len}) <= max_len ({self.max_len}).")
            mask, start, slots = decode_slots(self, valid, b, l, cache_len)
            x = x + broadcast_param(pos[slots], x.shape, self.dtype)
            extras = (mask, None, None, start)
            cache_kw = dict(decode=True, cache_len=cache_len)
        else:
            x = x + broadcast_param(pos[None, :l], x.shape, self.dtype)
            mask = make_attention_mask(None, valid, causal=self.causal, q_len=l, k_len=l)
            extras = (mask, None, None)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))

        # Decoding computes no gradients: no rematerialization there.
        encoder = stacked(Block, self.depth, scan=self.scan,
                          remat="none" if self.decode else self.remat, name="layers",
                          num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                          act=self.act, norm_eps=self.norm_eps,
                          implementation=self.attention, dtype=self.dtype, **cache_kw)
        x = encoder(x, extras)
        x = boundary(Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_final")(x))

        if self.decode:
            return None, x
        if self.pool == "eos":
            pooled = x[jnp.arange(b), eos_positions(ids, self.eos_id, self.pad_id)]
        elif self.pool == "last":
            pooled = x[:, -1]
        elif self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "none":
            return None, x
        else:
            raise ConfigError(f"Unknown text pool {self.pool!r} (config key `pool`); choose "
                              "'eos', 'last', 'cls' or 'none'.")
        pooled = boundary(pooled)
        if self.embed_dim is not None:
            pooled = boundary(Dense(self.embed_dim, ("embed", "proj"), use_bias=self.proj_bias,
                                    dtype=self.dtype, name="proj")(pooled))
        return pooled, x

    def embed_tokens(self, ids):
        """Token embeddings `[B, L, D]` (shared with a decoder that ties them)."""
        return self.embedding(ids)

    def attend(self, x):
        """`[..., D] -> [..., vocab_size]` logits tied to the token embeddings (a masked-LM
        or decoder head that shares them)."""
        return self.embedding.attend(x)


class CaptionDecoder(nn.Module):
    """CoCa multimodal decoder returning vocabulary logits `[B, L, V]`.

    Input `text [B, L, D]` are the unimodal text encoder's token outputs,
    `image_tokens [B, N, Dv]` the image side's tokens; `text_valid [B, L]`
    (optional) masks padding keys. Each block: causal self-attention,
    cross-attention to the image tokens, MLP (all pre-norm).

    `decode=True, cache_len=S`: incremental decoding (module docstring);
    `image_tokens` are needed on the first call only (None afterwards).

    Fields:
      vocab_size: size V of the output logits (the `lm_head` projection).
      width: should equal the text tower's width: the blocks run at the width D
        of their input `text`, this only sets the default `mlp_dim`.
      depth: number of decoder blocks.
      heads: attention heads (self- and cross-attention); must divide D.
      mlp_dim: MLP hidden width; None = 4 * width.
      act: MLP activation: "gelu", "gelu_tanh", "quick_gelu", "relu", "silu" or
        "swiglu".
      norm_eps: epsilon of every LayerNorm (blocks and the final `ln_final`).
      scan: run the blocks as one `nn.scan` (params `layers` with a leading depth
        axis, else `layers_0..`).
      remat: `jax.checkpoint` policy per block: "none", "full", "dots",
        "dots_no_batch" or "save_everything" (not applied in decode mode).
      attention: attention implementation: "xla", "cudnn" (GPU), "splash" (TPU) or
        None (the platform's best).
      dtype: compute dtype (params stay float32); in a model config, `model.dtype`
        unless this section sets it.
      decode: KV-cache mode (incremental decoding); CoCa sets it from
        `model.cached_decode`.
      cache_len: cache length in tokens, prefix included (required in decode
        mode); CoCa sets it to `model.cache_len`, else the text tower's max_len.
    """
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: Optional[int] = None
    act: str = "gelu"
    norm_eps: float = 1e-5
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    decode: bool = False
    cache_len: Optional[int] = None

    @nn.compact
    def __call__(self, text, image_tokens, text_valid=None):
        b, l, _ = text.shape
        text = boundary(text)
        context = None if image_tokens is None else boundary(image_tokens.astype(self.dtype))
        cache_kw = {}
        if self.decode:
            if not self.cache_len:
                raise ValueError("CaptionDecoder decode mode needs `cache_len` (the longest "
                                 "caption, prefix included).")
            mask, start, _ = decode_slots(self, text_valid, b, l, self.cache_len)
            extras = (mask, context, None, start)
            cache_kw = dict(decode=True, cache_len=self.cache_len)
        else:
            mask = make_attention_mask(None, text_valid, causal=True, q_len=l, k_len=l)
            extras = (mask, context, None)
        decoder = stacked(Block, self.depth, scan=self.scan,
                          remat="none" if self.decode else self.remat, name="layers",
                          num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                          act=self.act, norm_eps=self.norm_eps, cross_attention=True,
                          implementation=self.attention, dtype=self.dtype, **cache_kw)
        x = decoder(text.astype(self.dtype), extras)
        x = Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_final")(x)
        logits = Dense(self.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                       name="lm_head")(boundary(x))
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))
