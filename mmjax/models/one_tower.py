"""One Transformer over both modalities: ViLT (single stream) and VLMo / BEiT-3 (multiway).

`OneTower(image=..., text=..., ...)` embeds the text (the text tower's embedding:
`TextEncoder` with `depth=0`) and the media (the media tower's embedding, e.g. a
`ViT` with `depth=0`: patches, class token, position embedding), adds a
modality-type embedding (text 0, media 1) and runs ONE stack of pre-norm blocks
over `[text tokens ; media tokens]` (the fused sequence). Each block shares its
self-attention across modalities; its feed-forward part is

  experts="shared"    one FFN for every token (ViLT);
  experts="multiway"  a language FFN on text tokens and a vision FFN on media
                      tokens, and in the top `vl_depth` layers a vision-language
                      FFN on the fused sequence (VLMo's mixture of modality
                      experts, BEiT-3's Multiway Transformer).

Each FFN expert has its own pre-norm. A multiway stack also runs one modality
alone (dual mode): media-only and text-only passes through the same stack with
the modality's FFN in every layer give the `encode_image` / `encode_text`
embeddings of contrastive training, zero-shot classification and fast
retrieval.

Heads (ViLT / VLMo): the pooler (dense + tanh on the fused first token, the
text's [CLS]) feeds the 2-way image-text matching head and the VQA classifier
(`2D` dense, LayerNorm, GELU, `len(answers)` logits); the masked-LM head
(dense, activation, LayerNorm, logits tied to the word embeddings plus a bias)
reads the text positions.

Shapes: B batch, L text length, N media tokens, D width, E `embed_dim`, V vocab,
A answers.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.layers import (TOKENS, Attention, Dense, Mlp, Norm, boundary, constrain,
                                 l2_normalize, logical, normal_init, stacked)
from mmjax.models.ops.activations import get_activation
from mmjax.models.ops.attention import make_attention_mask
from mmjax.models.text import TextEncoder
from mmjax.models.towers import build_tower

EXPERTS = ("shared", "multiway")
MODES = ("fused", "text", "media")


class MultiwayBlock(nn.Module):
    """Pre-norm block: `x + attn(norm1(x))`, then the FFN expert(s) of `mode`.

    `__call__(x [B, T, D], extras)` -> `([B, T, D], None)` (scan-friendly, as
    `layers.Block`); `extras[0]` is the attention mask `[B, 1, T, T]` or None.

    Fields:
      experts: "shared" (one FFN: params `norm2`, `mlp`) or "multiway" (params
        `norm2_text` / `mlp_text`, `norm2_media` / `mlp_media`, and with `vl_ffn`
        `norm2_vl` / `mlp_vl`).
      vl_ffn: this layer has the vision-language expert, used on fused input.
      mode: "fused" (`[text ; media]`, the first `text_len` tokens are text),
        "text" or "media" (one modality alone).
    All experts are created at init whatever the mode, so every mode of one
    parameter tree runs.
    """
    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    norm_eps: float = 1e-12
    experts: str = "shared"
    vl_ffn: bool = False
    mode: str = "fused"
    text_len: int = 0
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, extras):
        mask = extras[0]
        norm = functools.partial(Norm, eps=self.norm_eps, dtype=self.dtype)
        x = constrain(x, TOKENS)
        x = x + Attention(self.num_heads, implementation=self.implementation, dtype=self.dtype,
                          name="attn")(norm(name="norm1")(x), mask=mask)

        def ffn(expert, y):
            suffix = "" if expert is None else f"_{expert}"
            return Mlp(self.mlp_dim, self.act, dtype=self.dtype, name=f"mlp{suffix}")(
                norm(name=f"norm2{suffix}")(y))

        if self.experts == "shared":
            return constrain(x + ffn(None, x), TOKENS), None
        if self.mode in ("text", "media"):
            used = (self.mode,)
            out = x + ffn(self.mode, x)
        elif self.vl_ffn:
            used = ("vl",)
            out = x + ffn("vl", x)
        else:
            t = self.text_len
            used = ("text", "media")
            out = jnp.concatenate([x[:, :t] + ffn("text", x[:, :t]),
                                   x[:, t:] + ffn("media", x[:, t:])], axis=1)
        if self.is_initializing():  # the experts this mode does not use exist too
            for expert in ("text", "media") + (("vl",) if self.vl_ffn else ()):
                if expert not in used:
                    ffn(expert, x[:, :1])
        return constrain(out, TOKENS), None


class FusedEncoder(nn.Module):
    """The stack of `OneTower` (its fields are the model's): the bottom
    `depth - vl_depth` blocks (`layers`), the top `vl_depth` (`vl_layers`, with the
    vision-language expert) and the final LayerNorm (`final_norm`).

    `__call__(x [B, T, D], valid [B, T] | None, mode, text_len=0) -> [B, T, D]`;
    one parameter tree serves every `mode` ("fused", "text", "media")."""
    depth: int
    heads: int
    mlp_dim: int
    act: str = "gelu"
    norm_eps: float = 1e-12
    experts: str = "shared"
    vl_depth: int = 0
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, valid, mode: str, text_len: int = 0):
        mask = make_attention_mask(None, valid) if valid is not None else None
        kw = dict(num_heads=self.heads, mlp_dim=self.mlp_dim, act=self.act,
                  norm_eps=self.norm_eps, experts=self.experts, mode=mode, text_len=text_len,
                  implementation=self.attention, dtype=self.dtype)
        bottom = self.depth - self.vl_depth
        if bottom:
            x = stacked(MultiwayBlock, bottom, scan=self.scan, remat=self.remat,
                        name="layers", **kw)(x, (mask,))
        if self.vl_depth:
            x = stacked(MultiwayBlock, self.vl_depth, scan=self.scan, remat=self.remat,
                        name="vl_layers", vl_ffn=True, **kw)(x, (mask,))
        return boundary(Norm(eps=self.norm_eps, dtype=self.dtype, name="final_norm")(x))


class OneTower(nn.Module):
    """Single-stream (ViLT) or multiway (VLMo) Transformer over text and media.

    Fields:
      image: the media embedding's config section: a media tower (`kind`, default
        "vit") whose `tokens` are the media tokens; for ViLT a `ViT` with
        `depth=0, pool="cls", posemb="learned", ln_pre=False, ln_post=False,
        patch_bias=True, embed_dim=None` (patch embedding, class token, position
        embedding). Its `width` must equal the text's.
      text: `TextEncoder` keyword arguments with `depth=0` and `pool="none"` (the
        word and position embeddings and their LayerNorm, BERT's embedding);
        `vocab_size`, `max_len` and `width` (= D) are the stack's.
      depth: blocks of the stack.
      heads: attention heads; must divide D.
      mlp_dim: FFN hidden width (None = 4 D).
      act: FFN and MLM-transform activation ("gelu" exact, as BERT and ViLT).
      norm_eps: epsilon of the blocks' and heads' LayerNorms (1e-12 in ViLT).
      experts: "shared" (ViLT) or "multiway" (VLMo); see the module docstring.
      vl_depth: multiway: how many top layers have the vision-language expert
        (VLMo-Base: 2 of 12); 0 for none.
      embed_dim: size E of the dual-mode contrastive embeddings (multiway;
        None = D).
      answers: the VQA answer vocabulary (the classifier's A outputs, in order);
        empty = no VQA head.
      pad_id: text padding id (pad keys are masked; MLM never masks them).
      mask_id: the [MASK] token id of masked language modelling (< vocab_size).
      special_ids: token ids MLM never masks ([CLS]/BOS, [SEP]/EOS, pad).
      scale_init: initial log-scale of the contrastive head (None = log(1/0.07)).
      max_log_scale: upper bound of that log-scale after every update (None = none).
      scan: run the blocks as `nn.scan` (params `layers` with a leading depth axis,
        and `vl_layers` for the top `vl_depth`), else `layers_0..`, `vl_layers_0..`.
      remat: `jax.checkpoint` policy per block ("none", "full", "dots", ...).
      attention: attention implementation ("xla", "cudnn", "splash", None).
      dtype: compute dtype (params stay float32); the sections' unless they set one.
    """
    image: dict
    text: dict
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None
    act: str = "gelu"
    norm_eps: float = 1e-12
    experts: str = "shared"
    vl_depth: int = 0
    embed_dim: Optional[int] = None
    answers: tuple = ()
    pad_id: int = 0
    mask_id: int = 103
    special_ids: tuple = (0, 101, 102)
    scale_init: Optional[float] = None
    max_log_scale: Optional[float] = math.log(100.0)
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32

    def setup(self):
        if self.experts not in EXPERTS:
            raise ConfigError(f"config key `model.experts` is {self.experts!r}; choose one of "
                              f"{EXPERTS}.")
        if self.experts == "shared" and self.vl_depth:
            raise ConfigError("config key `model.vl_depth` needs model.experts='multiway' "
                              f"(it is {self.vl_depth}).")
        if not 0 <= self.vl_depth <= self.depth:
            raise ConfigError(f"config key `model.vl_depth`={self.vl_depth} must lie in "
                              f"[0, model.depth={self.depth}].")
        self.text_tower = TextEncoder(**{"dtype": self.dtype, **dict(self.text)})
        self.image_tower = build_tower(self.image, self.dtype)
        d = self.width
        self.type_embedding = self.param(
            "type_embedding", logical(normal_init(0.02), (None, "embed")), (2, d))
        self.encoder = FusedEncoder(self.depth, self.heads, self.mlp_dim or 4 * d, self.act,
                                    self.norm_eps, self.experts, self.vl_depth, self.scan,
                                    self.remat, self.attention, self.dtype)
        dense = functools.partial(Dense, dtype=self.dtype)
        self.pooler = dense(d, ("embed", None), act=jnp.tanh)
        self.itm_head = dense(2, ("embed", None))
        self.mlm_dense = dense(d, ("embed", None), act=get_activation(self.act))
        self.mlm_norm = Norm(eps=self.norm_eps, dtype=self.dtype)
        self.mlm_bias = self.param("mlm_bias", logical(nn.initializers.zeros, ("vocab",)),
                                   (int(self.text["vocab_size"]),))
        if self.answers:
            self.vqa_fc1 = dense(2 * d, ("embed", "mlp"))
            self.vqa_norm = Norm(eps=1e-5, dtype=self.dtype)  # torch.nn.LayerNorm's default
            self.vqa_fc2 = dense(len(self.answers), ("mlp", None))
        if self.experts == "multiway":
            e = self.embed_dim or d
            self.itc_text_proj = dense(e, ("embed", "proj"), use_bias=False)
            self.itc_image_proj = dense(e, ("embed", "proj"), use_bias=False)
            init = math.log(1 / 0.07) if self.scale_init is None else self.scale_init
            self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
                lambda *_: jnp.asarray(init, jnp.float32), ()), ())

    @property
    def width(self) -> int:
        return int(self.text.get("width", TextEncoder.width))

    # --- embeddings ---------------------------------------------------------------------
    def image_tokens(self, images):
        """Media embeddings with the media type added: `[B, N, D]` (the media half of the
        fused sequence; `itm_logits` and retrieval re-ranking take them)."""
        tokens = self.image_tower(images)[1]
        if tokens.shape[-1] != self.width:
            raise ConfigError(f"config.model.image gives tokens of width {tokens.shape[-1]} but "
                              f"the text embedding's width is {self.width}; set "
                              "model.image.width = model.text.width.")
        return boundary(tokens.astype(self.dtype) + self.type_embedding[1].astype(self.dtype))

    def text_tokens(self, text):
        """Text embeddings with the text type added: `[B, L, D]`."""
        tokens = self.text_tower(text)[1]
        return boundary(tokens.astype(self.dtype) + self.type_embedding[0].astype(self.dtype))

    # --- fused mode ---------------------------------------------------------------------
    def fuse(self, image_tokens, text):
        """The fused sequence after the stack: `[B, L + N, D]` (text first) from media
        embeddings `[B, N, D]` (`image_tokens`) and text ids `[B, L]`."""
        l = text.shape[1]
        x = jnp.concatenate([self.text_tokens(text), image_tokens.astype(self.dtype)], axis=1)
        valid = jnp.concatenate([text != self.pad_id,
                                 jnp.ones(image_tokens.shape[:2], bool)], axis=1)
        return self.encoder(x, valid, "fused", l)

    def pooled(self, seq):
        """ViLT's pooler: dense + tanh on the first fused token `[B, D]`."""
        return boundary(self.pooler(seq[:, 0]))

    def itm_logits(self, image_tokens, text):
        """Image-text matching logits `[B, 2]` (class 1 = match) of media embeddings
        `[B, N, D]` and text `[B, L]`."""
        return self.itm_head(self.pooled(self.fuse(image_tokens, text))).astype(jnp.float32)

    def mlm_logits(self, image_tokens, text):
        """Masked-LM logits `[B, L, V]` of (masked) text `[B, L]` given the media."""
        return self.mlm_head(self.fuse(image_tokens, text)[:, :text.shape[1]])

    def mlm_head(self, text_seq):
        """Masked-LM logits `[B, L, V]` of the text half `[B, L, D]` of a fused sequence:
        transform (dense, activation, LayerNorm), then the tied word embeddings + bias."""
        h = self.mlm_norm(self.mlm_dense(text_seq))
        logits = self.text_tower.attend(h) + self.mlm_bias
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

    def vqa_logits(self, images, text):
        """VQA answer logits `[B, A]` of images and question ids `[B, L]`."""
        if not self.answers:
            raise ConfigError("this model has no VQA head: set config.model.answers (the "
                              "answer vocabulary).")
        return self.answer_logits(self.image_tokens(images), text)

    def answer_logits(self, image_tokens, text):
        """VQA answer logits `[B, A]` of media embeddings `[B, N, D]` and questions `[B, L]`."""
        return self.vqa_head(self.pooled(self.fuse(image_tokens, text)))

    def vqa_head(self, pooled):
        h = jax.nn.gelu(self.vqa_norm(self.vqa_fc1(pooled)), approximate=False)
        return self.vqa_fc2(h).astype(jnp.float32)

    # --- dual mode (multiway) -----------------------------------------------------------
    def _need_dual(self):
        if self.experts != "multiway":
            raise ConfigError("dual-mode embeddings (contrastive loss, zero-shot, retrieval) "
                              "need model.experts='multiway'; a shared-expert (ViLT) model "
                              "only scores pairs (itm_logits).")

    def encode_image(self, images):
        """Media-only pass: projected, unnormalized `[B, E]` float32 (the media's first
        token, the class token)."""
        return self.encode_media_tokens(self.image_tokens(images))

    def encode_media_tokens(self, image_tokens):
        """`encode_image` of media embeddings `[B, N, D]` (`image_tokens`)."""
        self._need_dual()
        seq = self.encoder(image_tokens, None, "media")
        return self.itc_image_proj(boundary(seq[:, 0])).astype(jnp.float32)

    def encode_text(self, text):
        """Text-only pass: projected, unnormalized `[B, E]` float32 (the [CLS] token)."""
        self._need_dual()
        seq = self.encoder(self.text_tokens(text), text != self.pad_id, "text")
        return self.itc_text_proj(boundary(seq[:, 0])).astype(jnp.float32)

    def param_bounds(self) -> dict:
        """The contrastive log-scale is clamped to [0, max_log_scale] after each update."""
        if self.experts == "multiway" and self.max_log_scale is not None:
            return {"log_scale": (0.0, float(self.max_log_scale))}
        return {}

    def dual(self, image_tokens, text):
        """`{"zimg", "ztxt"}` L2-normalized `[B, E]` and `scale` (multiway only) of media
        embeddings `[B, N, D]` (`image_tokens`) and text `[B, L]`."""
        return {"zimg": l2_normalize(self.encode_media_tokens(image_tokens)),
                "ztxt": l2_normalize(self.encode_text(text)), "scale": jnp.exp(self.log_scale)}

    def __call__(self, images, text):
        """Every head on matched pairs (init and tests): `itm_logits [B, 2]`,
        `mlm_logits [B, L, V]`, `vqa_logits [B, A]` with answers, and the dual-mode
        `zimg`, `ztxt`, `scale` when multiway."""
        tokens = self.image_tokens(images)
        seq = self.fuse(tokens, text)
        pooled = self.pooled(seq)
        out = {"itm_logits": self.itm_head(pooled).astype(jnp.float32),
               "mlm_logits": self.mlm_head(seq[:, :text.shape[1]])}
        if self.answers:
            out["vqa_logits"] = self.vqa_head(pooled)
        if self.experts == "multiway":
            out.update(self.dual(tokens, text))
        return out
