"""BLIP-2 stage 1: frozen ViT + Q-Former trained with ITC, ITM and ITG.

The forward pieces are methods so that the objectives can interleave them
(ITM negatives are mined from the ITC similarities):

- `itc_features(images, text)` -> dict: `image_feats` `[B, Q, E]` (normalized
  query embeddings), `text_feat` `[B, E]` (normalized [CLS] embedding of the
  text-only pass), `temp` (the parameter; the trainer keeps it in [0.001, 0.5]
  after every update, see `param_bounds`), `image_tokens` `[B, N, Dv]`.
- `itm_logits(image_tokens [N, S, Dv], text [N, L])` -> `[N, 2]`: 2-way head on
  every query output of the bidirectional pass, averaged over queries.
- `itg_logits(image_tokens, text [B, L])` -> `[B, L, V]`: the first text token
  is replaced by `dec_id`; queries see queries, text sees queries and earlier
  text. Logits at text position i predict text token i + 1.

Incremental ITG decoding: `model.clone(cached_decode=True, cache_len=S)` runs
the Q-Former with its key/value cache (`mmjax.models.qformer`);
`itg_logits(image_tokens, prefix)` is then the prefill (query keys/values
computed once, [DEC] at position 0) and `itg_logits(None, tokens [B, T])`
appends T tokens and returns their logits `[B, T, V]`.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Dense, boundary, l2_normalize
from mmjax.models.qformer import QFormer
from mmjax.models.towers import build_tower


class Blip2Stage1(nn.Module):
    """BLIP-2 stage-1 model: media tower + Q-Former with ITC, ITM and ITG heads.

    Fields:
      image: the media tower's config section (`kind` and its class's keyword
        arguments, as in `TwoTower`); all its tokens feed the Q-Former.
      qformer: `QFormer` keyword arguments; its `decode` and `cache_len` are set
        from the fields below.
      embed_dim: ITC embedding size (the query and text projections; 256 in BLIP-2).
      dec_id: the [DEC] token id written over text position 0 for ITG; must be
        below `qformer.vocab_size`.
      pad_id: text padding id: pad keys are masked in the Q-Former's text passes
        and the ITG loss ignores pad targets.
      temp_init: initial ITC temperature (logits = similarity / temp), a parameter
        kept in [0.001, 0.5] after every update.
      freeze_image: stop gradients at the tower's output, as BLIP-2 keeps the
        image encoder frozen (`optim.freeze` keeps its parameters untrained).
      dtype: compute dtype of the tower, Q-Former and heads (params stay
        float32), unless a section sets its own `dtype`.
      cached_decode: KV-cache mode of the ITG head for incremental captioning
        (the captioning evaluator sets it by `clone`).
      cache_len: text length of that cache in tokens (None = the Q-Former's max_len).
    """
    image: dict
    qformer: dict
    embed_dim: int = 256
    dec_id: int = 1
    pad_id: int = 0
    temp_init: float = 0.07
    freeze_image: bool = True
    dtype: Any = jnp.float32
    cached_decode: bool = False
    cache_len: Optional[int] = None

    def setup(self):
        self.image_tower = build_tower(self.image, self.dtype)
        self.qformer_module = QFormer(**{"dtype": self.dtype, **dict(self.qformer),
                                         "decode": self.cached_decode,
                                         "cache_len": self.cache_len})
        dense = lambda n, names: Dense(n, names, dtype=self.dtype)  # noqa: E731
        self.vision_proj = dense(self.embed_dim, ("embed", "proj"))
        self.text_proj = dense(self.embed_dim, ("embed", "proj"))
        self.itm_head = dense(2, ("embed", None))
        self.temp = self.param("temp", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(self.temp_init, jnp.float32), ()), ())

    def param_bounds(self) -> dict:
        """The ITC temperature is clamped to [0.001, 0.5] after each update, as LAVIS
        clamps it in place; clipping it in the forward pass instead would zero its
        gradient outside the range, so it could never come back."""
        return {"temp": (0.001, 0.5)}

    def image_tokens(self, images):
        """ViT tokens after its final LayerNorm: `[B, N, Dv]` (no gradient when frozen)."""
        tokens = self.image_tower(images)[1]
        return boundary(jax.lax.stop_gradient(tokens) if self.freeze_image else tokens)

    def encode_image(self, images):
        """Normalized query embeddings `[B, Q, E]`."""
        q = self.qformer_module(self.image_tokens(images), None)
        return l2_normalize(self.vision_proj(q))

    def encode_text(self, text):
        """Normalized [CLS] embedding of the text-only pass `[B, E]`."""
        h = self.qformer_module(None, text, pad_id=self.pad_id)
        return l2_normalize(self.text_proj(boundary(h[:, 0])))

    def itc_features(self, images, text):
        tokens = self.image_tokens(images)
        return {"image_feats": l2_normalize(self.vision_proj(self.qformer_module(tokens, None))),
                "text_feat": self.encode_text(text),
                "temp": self.temp,
                "image_tokens": tokens}

    def itm_logits(self, image_tokens, text):
        h = self.qformer_module(image_tokens, text, "bidirectional", pad_id=self.pad_id)
        q = self.qformer_module.num_queries
        return self.itm_head(boundary(h[:, :q])).astype(jnp.float32).mean(axis=1)

    def itg_logits(self, image_tokens, text):
        """ITG logits `[B, L, V]` of `text [B, L]` given `image_tokens [B, N, Dv]`.

        In decode mode: the first call (with `image_tokens`) is the prefill
        and holds text position 0; later calls pass `image_tokens=None`.
        """
        text = jnp.asarray(text)
        # [DEC] replaces text position 0, which in decode mode only the prefill holds.
        holds_first = image_tokens is not None or not self.cached_decode
        dec = text.at[:, 0].set(self.dec_id) if holds_first else text
        valid = text != self.pad_id
        _, logits = self.qformer_module(image_tokens, dec, "causal", text_valid=valid,
                                        lm_logits=True)
        return logits[:, logits.shape[1] - text.shape[1]:]

    def __call__(self, images, text):
        """All three heads on matched pairs (used for init and tests)."""
        out = self.itc_features(images, text)
        out["itm_logits"] = self.itm_logits(out["image_tokens"], text)
        out["itg_logits"] = self.itg_logits(out["image_tokens"], text)
        return out

