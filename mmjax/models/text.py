"""Text Transformers: the contrastive text encoder and the captioning decoder.

`TextEncoder(...)(ids [B, L]) -> (pooled [B, E], tokens [B, L, D])`
  causal + EOS pooling (CLIP), bidirectional + CLS pooling (BERT-like), or
  bidirectional + last-token pooling without a padding mask (SigLIP).
`CaptionDecoder(...)(text [B, L, D], image_tokens [B, N, Dv]) -> logits [B, L, V]`
  the CoCa multimodal decoder: causal self-attention, cross-attention to the
  image tokens in every block, vocabulary projection.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import (Block, Norm, constrain, default_kernel_init, logical,
                                 make_attention_mask, normal_init, stacked)


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


class TextEncoder(nn.Module):
    """Text Transformer encoder.

    Fields:
      vocab_size, max_len: vocabulary and context length (learned positions).
      width, depth, heads, mlp_dim, act, norm_eps: Transformer size.
      causal: causal self-attention (CLIP) or bidirectional (BERT/SigLIP).
      mask_padding: mask pad keys in attention (SigLIP attends to pads).
      pool: "eos", "last", "cls" (first token) or "none".
      eos_id, pad_id: token ids used for pooling and padding masks.
      embed_dim / proj_bias: output projection (None = none).
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

    def setup(self):
        self.embedding = nn.Embed(self.vocab_size, self.width,
                                  embedding_init=logical(normal_init(0.02), ("vocab", "embed")),
                                  name="token_embedding")

    @nn.compact
    def __call__(self, ids):
        b, l = ids.shape
        if l > self.max_len:
            raise ValueError(f"text length {l} exceeds the model's context length {self.max_len} "
                             "(config key `max_len`).")
        x = self.embedding(ids).astype(self.dtype)
        pos = self.param("posemb", logical(normal_init(0.01), (None, "embed")),
                         (self.max_len, self.width))
        x = x + pos[None, :l].astype(self.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        valid = ids != self.pad_id if self.mask_padding else None
        mask = make_attention_mask(None, valid, causal=self.causal, q_len=l, k_len=l)

        encoder = stacked(Block, self.depth, scan=self.scan, remat=self.remat, name="layers",
                          num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                          act=self.act, norm_eps=self.norm_eps,
                          implementation=self.attention, dtype=self.dtype)
        x = encoder(x, (mask, None, None))
        x = Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_final")(x)

        if self.pool == "eos":
            pooled = x[jnp.arange(b), eos_positions(ids, self.eos_id, self.pad_id)]
        elif self.pool == "last":
            pooled = x[:, -1]
        elif self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "none":
            return None, x
        else:
            raise ValueError(f"Unknown text pool {self.pool!r} (config key `pool`); choose "
                             "'eos', 'last', 'cls' or 'none'.")
        if self.embed_dim is not None:
            pooled = nn.Dense(self.embed_dim, use_bias=self.proj_bias, dtype=self.dtype,
                              kernel_init=logical(default_kernel_init, ("embed", "proj")),
                              bias_init=logical(nn.initializers.zeros, ("proj",)),
                              name="proj")(pooled)
        return pooled, x

    def embed_tokens(self, ids):
        """Token embeddings `[B, L, D]` (shared with a decoder that ties them)."""
        return self.embedding(ids)


class CaptionDecoder(nn.Module):
    """CoCa multimodal decoder returning vocabulary logits `[B, L, V]`.

    Input `text [B, L, D]` are the unimodal text encoder's token outputs,
    `image_tokens [B, N, Dv]` the image side's tokens; `text_valid [B, L]`
    (optional) masks padding keys. Each block: causal self-attention,
    cross-attention to the image tokens, MLP (all pre-norm).
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

    @nn.compact
    def __call__(self, text, image_tokens, text_valid=None):
        b, l, _ = text.shape
        mask = make_attention_mask(None, text_valid, causal=True, q_len=l, k_len=l)
        decoder = stacked(Block, self.depth, scan=self.scan, remat=self.remat, name="layers",
                          num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                          act=self.act, norm_eps=self.norm_eps, cross_attention=True,
                          implementation=self.attention, dtype=self.dtype)
        x = decoder(text.astype(self.dtype), (mask, image_tokens.astype(self.dtype), None))
        x = Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_final")(x)
        logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                          kernel_init=logical(default_kernel_init, ("embed", "vocab")),
                          name="lm_head")(x)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))
