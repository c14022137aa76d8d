"""Vision Transformer (ViT) image encoder.

`ViT(...)(images [B, H, W, 3]) -> (pooled [B, E], tokens [B, N, D])`

Covers the CLIP (cls token, `ln_pre`, projection, quick_gelu), SigLIP (no cls,
MAP head, no projection), big_vision (gap / map, sin-cos position
embedding) and BLIP-2 (cls, all tokens normed) variants through config fields.
"""
from __future__ import annotations

from typing import Any, Optional

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.flops import vit_flops
from mmjax.models.layers import (Block, Dense, MAPHead, Norm, PositionEmbedding, boundary,
                                 constrain, default_kernel_init, drop_patches, kept_patches,
                                 logical, normal_init, stacked)
from mmjax.models.ops.matmul import broadcast_param, matmul_2d


class ViT(nn.Module):
    """Vision Transformer.

    Fields:
      image_size: input height and width in pixels (square images of exactly this
        size; `data.train.image_size` must match); a multiple of `patch_size`.
      patch_size: patch side in pixels: (image_size / patch_size)^2 patch tokens.
      width: token width D (patch embedding, blocks and `tokens` output).
      depth: number of Transformer blocks.
      heads: attention heads of the blocks and the MAP head; must divide width.
      mlp_dim: hidden width of the blocks' (and the MAP head's) MLP; None = 4 * width.
      act: MLP activation: "gelu" (exact), "gelu_tanh", "quick_gelu" (CLIP),
        "relu", "silu" or "swiglu" (gated MLP).
      norm_eps: epsilon of every LayerNorm of the tower (blocks, ln_pre, ln_post,
        MAP head).
      pool: "cls" (class token), "gap" (mean of patch tokens), "map"
        (attention-pooling head) or "none" (pooled = None).
      posemb: "learned" (trained, one per token, class token included),
        "sincos2d" (fixed 2-D sin-cos over the patch grid; width % 4 == 0) or "none".
      ln_pre: LayerNorm after the embeddings, before the blocks (CLIP).
      ln_post: final LayerNorm over all tokens (before pooling).
      patch_bias: bias in the patch embedding (CLIP has none).
      embed_dim: size E of a linear projection of the pooled vector; None for no
        projection (pooled is `[B, width]`).
      proj_bias: bias of the output projection.
      scan: run the blocks as one `nn.scan` (params `layers` with a leading depth
        axis, else `layers_0..`): the same numbers, compile time flat in depth.
      remat: `jax.checkpoint` policy per block: "none", "full" (recompute
        everything), "dots", "dots_no_batch" or "save_everything".
      attention: attention implementation: "xla" (any device), "cudnn" (GPU
        fused kernel), "splash" (TPU fused kernel) or None (the platform's best;
        see `ops.attention.dot_product_attention`).
      dtype: compute dtype (params stay float32); in a model config, `model.dtype`
        unless this section sets it.
      patch_dropout: fraction of the patch tokens dropped in training (FLIP; open_clip's
        `patch_dropout`), in [0, 1): each example keeps its own random
        max(1, round(N (1 - patch_dropout))) patches after the position embeddings
        (the class token always stays; `layers.drop_patches`), so the blocks run
        on fewer tokens. Only calls with an "augment" rng (the train step) drop;
        evaluation sees every patch. 0 = off. `unmasked_tuning_steps` turns it off
        for the last steps of a run.

    Returns `(pooled [B, E] or [B, D], tokens [B, N(+1), D])`; tokens are after
    `ln_post` and include the class token first when `pool == "cls"`.
    """
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None
    act: str = "gelu"
    norm_eps: float = 1e-5
    pool: str = "cls"
    posemb: str = "learned"
    ln_pre: bool = False
    ln_post: bool = True
    patch_bias: bool = True
    embed_dim: Optional[int] = None
    proj_bias: bool = False
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    patch_dropout: float = 0.0

    # Tower protocol (mmjax.models.towers): the media it reads and its costs.
    modality = "image"

    @staticmethod
    def example_input(cfg: dict, data: Any) -> tuple[tuple[int, ...], Any]:
        """One example as the pipeline emits it: `([S, S, 3], uint8 | float32)`."""
        s = int(data.image_size)
        return (s, s, 3), np.uint8 if data.get("output", "float32") == "uint8" else np.float32

    @staticmethod
    def forward_flops(cfg: dict) -> float:
        """Forward FLOPs per image in a training step (`mmjax.models.flops`): the blocks
        count the kept patches with `patch_dropout`; an evaluation forward is
        `forward_flops({**cfg, "patch_dropout": 0})`."""
        return vit_flops(cfg)

    @staticmethod
    def num_tokens(cfg: dict) -> int:
        """N of the `tokens [B, N, D]` output in a training step: the patches (those
        `patch_dropout` keeps), plus the class token when `pool == "cls"`. Evaluation
        returns every patch: `num_tokens({**cfg, "patch_dropout": 0})`."""
        m = ViT(**cfg)
        return kept_patches(m.grid ** 2, m.patch_dropout) + (1 if m.pool == "cls" else 0)

    @staticmethod
    def prefix_tokens(cfg: dict) -> int:
        """How many of the `tokens` come before the patches and are not media content:
        the class token with `pool == "cls"`."""
        return 1 if cfg.get("pool", ViT.__dataclass_fields__["pool"].default) == "cls" else 0

    @staticmethod
    def token_width(cfg: dict) -> int:
        """D of the `tokens [B, N, D]` output: `width`."""
        return int(ViT(**cfg).width)

    @staticmethod
    def data_keys(cfg: dict) -> dict:
        """The `data.train` keys this tower's input fixes: `image_size`."""
        return {"image_size": int(ViT(**cfg).image_size)}

    @staticmethod
    def tiny(cfg: dict) -> dict:
        """Field updates of the `:tiny` shrink (32 px images, 2 small layers)."""
        out = dict(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)
        return dict(out, embed_dim=32) if cfg.get("embed_dim") else out

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        p = self.patch_size
        if h != self.image_size or w != self.image_size:
            raise ConfigError(f"ViT expects {self.image_size}x{self.image_size} images "
                              f"(config key `image_size`), got {h}x{w}.")
        if self.pool not in ("cls", "gap", "map", "none"):
            raise ConfigError(f"Unknown pool {self.pool!r} (config key `pool`); choose "
                              "'cls', 'gap', 'map' or 'none'.")
        x = images.astype(self.dtype)
        # Patch embedding as one matmul over flattened patches (same math as a
        # stride-p convolution whose kernel is [p, p, 3, D]).
        kernel = self.param("patch_kernel", logical(default_kernel_init, (None, None, None, "embed")),
                            (p, p, c, self.width))
        patches = einops.rearrange(x, "b (gh p1) (gw p2) c -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
        bias = (self.param("patch_bias", logical(nn.initializers.zeros, ("embed",)), (self.width,))
                if self.patch_bias else None)
        x = matmul_2d(patches, kernel.reshape(p * p * c, self.width), 1, bias, self.dtype)

        if self.pool == "cls":
            cls = self.param("cls", logical(normal_init(0.02), ("embed",)), (self.width,))
            cls = broadcast_param(cls, (b, 1, self.width), self.dtype)
        if self.posemb == "learned":
            # CLIP layout: the class token has its own position embedding.
            if self.pool == "cls":
                x = jnp.concatenate([cls, x], axis=1)
            x = PositionEmbedding("learned", name="posemb")(x)
        else:
            x = PositionEmbedding(self.posemb, hw=(self.grid, self.grid), name="posemb")(x)
            if self.pool == "cls":
                x = jnp.concatenate([cls, x], axis=1)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        # Training only (an "augment" rng): each image keeps its own random patches.
        x = drop_patches(self, x, self.patch_dropout, prefix=1 if self.pool == "cls" else 0)
        if self.ln_pre:
            x = Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_pre")(x)

        encoder = stacked(Block, self.depth, scan=self.scan, remat=self.remat, name="layers",
                          num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                          act=self.act, norm_eps=self.norm_eps,
                          implementation=self.attention, dtype=self.dtype)
        x = encoder(x, (None, None, None))
        if self.ln_post:
            x = Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_post")(x)
        x = boundary(x)

        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "gap":
            pooled = x.mean(axis=1)
        elif self.pool == "map":
            pooled = MAPHead(self.heads, mlp_dim=self.mlp_dim or 4 * self.width, act=self.act,
                             norm_eps=self.norm_eps, implementation=self.attention,
                             dtype=self.dtype, name="map_head")(x)[:, 0]
        else:
            return None, x
        pooled = boundary(pooled)
        if self.embed_dim is not None:
            pooled = boundary(Dense(self.embed_dim, ("embed", "proj"), use_bias=self.proj_bias,
                                    dtype=self.dtype, name="proj")(pooled))
        return pooled, x
