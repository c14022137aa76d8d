"""CoCa: contrastive + captioning image-text model (open_clip layout).

`CoCa(...)(images [B, H, W, 3], text [B, L])` returns a dict with
`zimg, ztxt` (`[B, E]` normalized), `scale`, and `logits` `[B, L, V]` of the
multimodal decoder (position i predicts token i + 1).

Image side: ViT tokens -> attentional pooler with 1 + `caption_queries`
queries -> LayerNorm; query 0 is projected to the contrastive embedding, the
rest are the decoder's image tokens. Text side: causal text encoder with EOS
pooling for the contrastive embedding; its token outputs feed the decoder.

Incremental caption decoding: `model.clone(cached_decode=True, cache_len=S)`
gives the text tower and the decoder key/value caches (the `cache`
collection, see `mmjax.models.text`); `decode(text [B, T], image_tokens | None)` appends
T tokens per call and returns their logits `[B, T, V]`. The image tokens are
needed on the first call only (their cross-attention keys/values are kept).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import Dense, MAPHead, Norm, boundary, l2_normalize
from mmjax.models.text import CaptionDecoder, TextEncoder, real_tokens
from mmjax.models.two_tower import _scalar
from mmjax.models.towers import build_tower


class CoCa(nn.Module):
    """CoCa image-text model (see the module docstring).

    Fields:
      image: the media tower's config section (`kind` and its class's keyword
        arguments, as in `TwoTower`); its `pool` is forced to "none" and its
        `embed_dim` to None: the attentional pooler reads all its tokens.
      text: `TextEncoder` keyword arguments (causal, EOS pooling); its `embed_dim`,
        `decode` and `cache_len` are set from the fields below.
      decoder: `CaptionDecoder` keyword arguments; `decode` and `cache_len` are
        set from the fields below.
      embed_dim: contrastive embedding size E (image projection and text tower).
      caption_queries: image tokens given to the decoder: the attentional pooler
        has 1 + caption_queries queries, the first one is the contrastive one.
      pooler_heads: attention heads of the attentional pooler; must divide the
        image tower's width.
      max_log_scale: upper bound of the log-scale (init log(1/0.07)), applied to
        the parameter after every optimizer update (None = no bound).
      dtype: compute dtype of the towers, pooler and decoder (params stay
        float32; embeddings are float32), unless a section sets its own `dtype`.
      cached_decode: KV-cache mode of the text tower and the decoder for
        incremental captioning (the captioning evaluator sets it by `clone`).
      cache_len: length of those caches in tokens, prefix included (None = the
        text tower's max_len).
    """
    image: dict
    text: dict
    decoder: dict
    embed_dim: int = 512
    caption_queries: int = 256
    pooler_heads: int = 8
    max_log_scale: Optional[float] = math.log(100.0)
    dtype: Any = jnp.float32
    cached_decode: bool = False
    cache_len: Optional[int] = None

    def setup(self):
        self.image_tower = build_tower(self.image, self.dtype, pool="none", embed_dim=None)
        self.pooler = MAPHead(self.pooler_heads, num_queries=1 + self.caption_queries,
                              use_mlp=False, dtype=self.dtype)
        self.pool_norm = Norm(dtype=self.dtype)
        self.image_proj = Dense(self.embed_dim, ("embed", "proj"), use_bias=False,
                                dtype=self.dtype)
        self.text_tower = TextEncoder(**{"dtype": self.dtype, **dict(self.text),
                                         "embed_dim": self.embed_dim,
                                         "decode": self.cached_decode,
                                         "cache_len": self.cache_len})
        self.text_decoder = CaptionDecoder(**{
            "dtype": self.dtype, **dict(self.decoder), "decode": self.cached_decode,
            "cache_len": self.cache_len or self.text_tower.max_len})
        self.log_scale = _scalar(self, "log_scale", math.log(1 / 0.07))

    def param_bounds(self) -> dict:
        """The log-scale is clamped to [0, max_log_scale] after each update (open_clip)."""
        return {} if self.max_log_scale is None else {"log_scale": (0.0, float(self.max_log_scale))}

    def _image(self, images):
        _, tokens = self.image_tower(images)
        pooled = boundary(self.pool_norm(self.pooler(tokens)))
        return self.image_proj(pooled[:, 0]).astype(jnp.float32), pooled[:, 1:]

    def encode_image(self, images):
        """`[B, H, W, 3]` -> projected, unnormalized `[B, E]`."""
        return self._image(images)[0]

    def encode_text(self, text):
        """`[B, L]` -> projected, unnormalized `[B, E]`."""
        return self.text_tower(text)[0].astype(jnp.float32)

    def image_tokens(self, images):
        """Decoder-side image tokens `[B, caption_queries, D]`."""
        return self._image(images)[1]

    def _real(self, text):
        """The decoder's key mask `[B, L]`: text tokens, not padding (`real_tokens`)."""
        return real_tokens(text, self.text_tower.pad_id, self.text_tower.eos_id)

    def decode(self, text, image_tokens):
        """Caption logits `[B, L, V]` for `text [B, L]` given `image_tokens [B, N, D]`.

        In decode mode: logits of the `L` new tokens appended to the cache;
        `image_tokens` only on the first call (None afterwards).
        """
        _, tok = self.text_tower(text)
        return self.text_decoder(tok, image_tokens, self._real(text))

    def __call__(self, images, text):
        zimg, img_tokens = self._image(images)
        ztxt, tok = self.text_tower(text)
        logits = self.text_decoder(tok, img_tokens, self._real(text))
        return {"zimg": l2_normalize(zimg), "ztxt": l2_normalize(ztxt.astype(jnp.float32)),
                "scale": jnp.exp(self.log_scale), "logits": logits}
