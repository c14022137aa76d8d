"""Vision-language models: the tokens of a media tower fed into a decoder-only LM.

The media tower is the one `model.image.kind` names (`mmjax.models.towers`): a
ViT on images `[B, H, W, 3]` in the BLIP-2 and LLaVA recipes; an AST on audio
`[B, num_samples]` or a VideoViT on video `[B, T, H, W, 3]` plug in the same
way, their tokens `[B, N, Dv]` taking the place of the ViT's. The names
`image`, `image_tower`, `image_embeds` and `<image>` stand for the media of
any kind.

`VisionLM` covers the two common connectors:

- `connector="qformer"` (BLIP-2 stage 2): frozen tower tokens (all of them, the
  class token included, exactly what the stage-1 Q-Former saw) -> Q-Former
  query outputs `[B, Q, Dq]` -> linear projection -> `Q` soft tokens in front
  of the text (or at the `<image>` placeholder).
- `connector="mlp"` (LLaVA-1.5): tower tokens `[B, N, Dv]` (without the
  tower's leading class / distillation tokens, `prefix_tokens`: ViT's class
  token with `pool="cls"`, AST's two) -> 2-layer GELU MLP -> `N`
  tokens spliced in at the `<image>` placeholder (or prepended when the text
  has none).

Parameter names: `image_tower` (the media tower), `qformer_module` (Q-Former,
BLIP-2 only; the same names as `Blip2Stage1`, so a stage-1 checkpoint maps one
to one), `projector` (BLIP-2) or `projector_fc1`/`projector_fc2` (LLaVA),
`lm_module` (a `DecoderLM`). Freezing, loading from other runs or imported
weights are config matters (`optim.freeze`, `init`).

Sequence layout: text `[B, L]` is right-padded; the spliced sequence has
length `T = L + P` (P media tokens): text before the placeholder, the media
tokens, the text after it, then padding. Valid positions stay a prefix of
each row, so the LM's right-padded prefill/decoding applies unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.layers import HIDDEN, TOKENS, Dense, boundary, constrain
from mmjax.models.ops.activations import gelu
from mmjax.models.lm import DecoderLM
from mmjax.models.qformer import QFormer
from mmjax.models import towers
from mmjax.models.towers import build_tower

Array = jax.Array


def splice_image_tokens(text_embeds: Array, image_embeds: Array, text: Array, valid: Array,
                        placeholder_id: Optional[int]) -> dict:
    """Insert media (image, audio or video) embeddings into the text sequence, per row.

    Args:
      text_embeds: `[B, L, D]` embeddings of `text`.
      image_embeds: `[B, P, D]` media embeddings (`VisionLM.image_embeds`).
      text: int32 `[B, L]` ids (right-padded).
      valid: bool `[B, L]` real text tokens.
      placeholder_id: id of the `<image>` token. A row holding it gets the
        image there (the placeholder itself is dropped); a row without it (or
        `placeholder_id=None`) gets the image first.
    Returns: dict with `embeds [B, T, D]`, `valid [B, T]` (a prefix per row),
      `text_index [B, T]` (source text position, -1 at image positions),
      T = L + P.
    """
    b, l, _ = text_embeds.shape
    p = image_embeds.shape[1]
    t = l + p
    if placeholder_id is None:  # image first: a concatenation, no gather
        out_valid = jnp.concatenate([jnp.ones((b, p), bool), valid], axis=1)
        index = jnp.broadcast_to(jnp.arange(-p, l, dtype=jnp.int32), (b, t))
        embeds = jnp.concatenate([image_embeds.astype(text_embeds.dtype), text_embeds], axis=1)
        return {"embeds": jnp.where(out_valid[..., None], embeds, 0), "valid": out_valid,
                "text_index": jnp.where(index < 0, -1, index)}
    hit = (text == placeholder_id) & valid
    has = hit.any(axis=1)
    start = jnp.where(has, jnp.argmax(hit, axis=1), 0).astype(jnp.int32)
    j = jnp.arange(t, dtype=jnp.int32)[None, :]
    start_, skip = start[:, None], has.astype(jnp.int32)[:, None]
    in_image = (j >= start_) & (j < start_ + p)
    src = jnp.where(j < start_, j, j - p + skip)  # text position for non-image slots
    in_range = (src >= 0) & (src < l)
    src_c = jnp.clip(src, 0, l - 1)
    text_valid = jnp.take_along_axis(valid, src_c, axis=1) & in_range
    img_idx = jnp.clip(j - start_, 0, p - 1)
    gathered_txt = jnp.take_along_axis(text_embeds, src_c[..., None], axis=1)
    gathered_img = jnp.take_along_axis(image_embeds, img_idx[..., None], axis=1)
    embeds = jnp.where(in_image[..., None], gathered_img.astype(text_embeds.dtype), gathered_txt)
    out_valid = in_image | text_valid
    embeds = jnp.where(out_valid[..., None], embeds, 0)
    return {"embeds": embeds, "valid": out_valid,
            "text_index": jnp.where(in_image | ~in_range, -1, src_c)}


class VisionLM(nn.Module):
    """Media tower + connector + decoder LM (BLIP-2 stage 2 or LLaVA).

    Fields:
      image: the media tower's config section: `kind` ("vit", the default;
        "ast", "video_vit") and the keyword arguments of its class (`ViT`,
        `AST`, `VideoViT`).
      lm: `DecoderLM` keyword arguments; its `width` is the connector's output width.
      qformer: `QFormer` keyword arguments; needed by connector "qformer" only.
      connector: "qformer" (BLIP-2: Q-Former queries, then a linear projection)
        or "mlp" (LLaVA-1.5: 2-layer GELU MLP on the tower's content tokens, its
        class / distillation tokens dropped: the tower's `prefix_tokens`).
      image_token_id: id of the `<image>` placeholder in the text (None: image
        tokens always go first). It must be < lm.vocab_size (never predicted:
        it carries no loss).
      pad_id: text padding id: pad tokens are not attended and get no loss.
      freeze_image: stop gradients at the media tower's output. Off by default: a
        tower listed in `optim.freeze` gets no gradient work at all (the
        train step differentiates trained parameters only).
      dtype: compute dtype of the tower, connector and LM (params stay float32;
        logits are float32), unless a section sets its own `dtype`.
    """
    image: dict
    lm: dict
    qformer: Optional[dict] = None
    connector: str = "mlp"
    image_token_id: Optional[int] = None
    pad_id: int = 0
    freeze_image: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        if self.connector not in ("qformer", "mlp"):
            raise ConfigError(f"config key `model.connector` is {self.connector!r}; choose "
                              "'qformer' (BLIP-2) or 'mlp' (LLaVA).")
        if self.connector == "qformer" and not self.qformer:
            raise ConfigError("model.connector='qformer' needs config key `model.qformer`.")
        self.image_tower = build_tower(self.image, self.dtype)
        self.lm_module = DecoderLM(**{"dtype": self.dtype, **dict(self.lm)})
        width = self.lm_module.width
        dense = lambda act=None: Dense(width, ("mlp", "embed"), dtype=self.dtype,  # noqa: E731
                                       act=act)
        if self.connector == "qformer":
            self.qformer_module = QFormer(**{"dtype": self.dtype, **dict(self.qformer)})
            self.projector = dense()
        else:
            self.projector_fc1, self.projector_fc2 = dense(gelu), dense()

    def image_embeds(self, images: Array) -> Array:
        """Media tokens in the LM's input space: media `[B, ...]` (images `[B, H, W, 3]`,
        audio `[B, num_samples]`, video `[B, T, H, W, 3]`) -> `[B, P, D_lm]`
        (P = Q-Former queries, or the tower's tokens)."""
        _, tokens = self.image_tower(images)
        if self.connector == "mlp":  # LLaVA uses content tokens only; BLIP-2 feeds all of them
            tokens = tokens[:, towers.prefix_tokens(*towers.tower_fields(self.image)):]
        if self.freeze_image:
            tokens = jax.lax.stop_gradient(tokens)
        tokens = boundary(tokens)
        if self.connector == "qformer":
            return boundary(self.projector(self.qformer_module(tokens, None)))
        hidden = constrain(self.projector_fc1(tokens), HIDDEN)  # GELU applied inside
        return boundary(self.projector_fc2(hidden))

    def splice(self, image_embeds: Array, text: Array) -> dict:
        """Spliced LM inputs (see `splice_image_tokens`) from `image_embeds [B, P, D]`."""
        out = splice_image_tokens(constrain(self.lm_module.embed(text), TOKENS),
                                  constrain(image_embeds, TOKENS), text,
                                  text != self.pad_id, self.image_token_id)
        out["embeds"] = constrain(out["embeds"], TOKENS)
        return out

    def inputs(self, images: Array, text: Array) -> dict:
        """Spliced LM inputs for media `[B, ...]` (as `image_embeds`) and text `[B, L]`."""
        return self.splice(self.image_embeds(images), text)


    def __call__(self, images: Array, text: Array) -> dict:
        """Media `[B, ...]` (as `image_embeds`) and text `[B, L]` -> `logits [B, T, V]`
        (float32) over the spliced sequence, plus its `valid [B, T]` and
        `text_index [B, T]` (for the loss)."""
        x = self.inputs(images, text)
        logits = self.lm_module(inputs_embeds=x["embeds"], attention_mask=x["valid"])
        return {"logits": logits, "valid": x["valid"], "text_index": x["text_index"]}


def language_model(model: VisionLM) -> DecoderLM:
    """A standalone `DecoderLM` for `variables["params"]["lm_module"]` of `model` (generation)."""
    return DecoderLM(**{"dtype": model.dtype, **dict(model.lm)})


def vlm_targets(text: Array, loss_mask: Optional[Array], text_index: Array, pad_id: int
                ) -> tuple[Array, Array]:
    """Next-token targets on the spliced sequence.

    Returns `(targets [B, T-1], weights [B, T-1])`: position j predicts the
    token at j + 1, weighted 1 where that token is text, not padding, and
    (when `loss_mask [B, L]` is given) marked trainable there.
    """
    idx = jnp.clip(text_index, 0, text.shape[1] - 1)
    tokens = jnp.take_along_axis(text, idx, axis=1)
    w = (text_index >= 0) & (tokens != pad_id)
    if loss_mask is not None:
        w = w & (jnp.take_along_axis(loss_mask, idx, axis=1) > 0)
    return tokens[:, 1:], w[:, 1:].astype(jnp.float32)
