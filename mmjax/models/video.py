"""Video tower (CLIP4Clip): a ViT on every frame, then a temporal model over frames.

`VideoViT(...)(videos [B, T, H, W, 3]) -> (pooled [B, E], tokens [B, T, E])`

The frames are folded into the batch (`[B*T, H, W, 3]`) for the per-frame
ViT, whose parameters sit under `frame` with exactly a `ViT`'s tree: an
image-text run's image tower (`image_tower` of its parameters) initialises
`image_tower/frame` as it is. The pooled frame embeddings `[B, T, E]`
(E = `embed_dim`, else `width`) then go through the temporal model:

* `temporal="mean"` (CLIP4Clip "meanP"): pooled = mean over frames.
* `temporal="transformer"` (CLIP4Clip "seqTransf"): a learned frame position
  embedding (`frame_posemb [num_frames, E]`) is added, `temporal_depth`
  pre-norm Transformer blocks (`temporal_heads` heads, MLP 4E) run over the
  frames, their output is added back to the frame embeddings (residual), and
  pooled = mean over frames.

`center_frames=True` (seqTransf only, off by default: CLIP4Clip feeds the
frame embeddings as they are) feeds the temporal blocks what changes between
frames: each clip's frame embeddings minus their mean over frames, scaled to
unit RMS over the clip (`d * rsqrt(mean(d^2) + 1e-4 mean(x^2))` with
`d = x - mean_t x`: changes under 1% of the embeddings' RMS are damped, a
clip whose frames are all alike gives zeros), and
starts `frame_posemb` at std 1, the scale of that input. The blocks' output is
added to the frame embeddings as before. Trained from scratch, CLIP4Clip's
input is dominated by the clip's static appearance (identical in every frame)
and its frame position embedding (std 0.02) is negligible next to
unit-scale frame embeddings, so the blocks start blind to frame order and to
what moves. On the built-in clips (`configs/video_clip_tiny.py`) a 300-step
run from scratch reaches 94.4% zero-shot with every direction of motion right;
without centring its loss stalls near 3.06 (12% zero-shot).

`normalize_frames=True` L2-normalizes each frame's embedding before the mean,
as CLIP4Clip does (the default, False, averages them as they are).
`tokens` are the per-frame embeddings after the temporal model. With
`pool="none"` (towers whose consumer attends over tokens: CoCa, BLIP-2)
pooled is None and tokens are every frame's ViT tokens, `[B, T*N, D]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.flops import layer_flops, vit_flops
from mmjax.models.layers import (Block, boundary, constrain, kept_patches, logical,
                                 normal_init, stacked)
from mmjax.models.ops.matmul import broadcast_param
from mmjax.models.vit import ViT

TEMPORAL = ("mean", "transformer")
_VIT_FIELDS = tuple(f.name for f in dataclasses.fields(ViT) if f.name not in ("parent", "name"))


class VideoViT(ViT):
    """CLIP4Clip video tower.

    Fields (those of `ViT` configure the per-frame encoder, as in `ViT`):
      image_size: frame height and width in pixels (square; `data.train.image_size`
        must match); a multiple of `patch_size`.
      patch_size: patch side in pixels: (image_size / patch_size)^2 tokens per frame.
      width: token width D of the frame ViT.
      depth: number of Transformer blocks of the frame ViT.
      heads: attention heads of the frame ViT (and its MAP head); must divide width.
      mlp_dim: MLP hidden width of the frame ViT; None = 4 * width (the temporal
        blocks always use 4E).
      act: MLP activation of the frame ViT and the temporal blocks: "gelu",
        "gelu_tanh", "quick_gelu", "relu", "silu" or "swiglu".
      norm_eps: epsilon of every LayerNorm (frame ViT and temporal blocks).
      pool: the frame's pooled vector fed to the temporal model: "cls", "gap" or
        "map" (as in `ViT`); "none": no temporal model, tokens = all frames' tokens.
      posemb: the frame ViT's patch position embedding: "learned", "sincos2d" or "none".
      ln_pre: LayerNorm after the frame ViT's embeddings (CLIP).
      ln_post: final LayerNorm over the frame ViT's tokens.
      patch_bias: bias in the patch embedding (CLIP has none).
      embed_dim: size E of the projection of each frame's pooled vector (the
        temporal model's width); None = no projection (E = width).
      proj_bias: bias of that projection.
      scan: `nn.scan` over the frame ViT's blocks (the temporal blocks are never scanned).
      remat: `jax.checkpoint` policy per block (frame ViT and temporal): "none",
        "full", "dots", "dots_no_batch" or "save_everything".
      attention: attention implementation: "xla", "cudnn" (GPU), "splash" (TPU) or
        None (the platform's best).
      dtype: compute dtype (params stay float32); in a model config, `model.dtype`
        unless this section sets it.
      patch_dropout: fraction of each frame's patch tokens the frame ViT drops in
        training (FLIP), in [0, 1): every frame of every clip keeps its own random
        patches (as `ViT`); evaluation sees every patch. 0 = off.
      num_frames: frames per clip (`data.train.num_frames` must match); with
        `temporal="transformer"` the length of `frame_posemb`: no more frames.
      temporal: "mean" (meanP: mean of the frame embeddings) or "transformer"
        (seqTransf: temporal blocks with a residual, then the mean).
      temporal_depth: number of temporal Transformer blocks (`temporal="transformer"`).
      temporal_heads: attention heads of the temporal blocks; must divide E.
      center_frames: the temporal blocks see per-clip centred, unit-RMS frame
        embeddings and `frame_posemb` starts at std 1 (module docstring).
      normalize_frames: L2-normalize each frame's embedding (after the temporal
        model) before the mean; `tokens` are the normalized embeddings.

    Returns `(pooled [B, E], tokens [B, T, E])`, or `(None, [B, T*N, D])` with
    `pool="none"`.
    """
    num_frames: int = 8
    temporal: str = "mean"
    temporal_depth: int = 4
    temporal_heads: int = 8
    center_frames: bool = False
    normalize_frames: bool = False

    # Tower protocol (mmjax.models.towers).
    modality = "video"

    @staticmethod
    def example_input(cfg: dict, data: Any) -> tuple[tuple[int, ...], Any]:
        """One example as the pipeline emits it: `([T, S, S, 3], uint8 | float32)`,
        T = `data.num_frames`."""
        (s, _, c), dtype = ViT.example_input(cfg, data)
        return (int(data.num_frames), s, s, c), dtype

    @staticmethod
    def forward_flops(cfg: dict, frames: int | None = None) -> float:
        """Forward FLOPs per clip in a training step: `frames` (default `num_frames`) ViT
        passes (over the patches `patch_dropout` keeps) plus the temporal Transformer
        (none with `pool="none"`, which returns the frames' tokens)."""
        c = {f.name: f.default for f in dataclasses.fields(VideoViT)
             if f.name not in ("parent", "name")}
        c.update(cfg)
        t = int(frames or c["num_frames"])
        f = t * vit_flops(c)
        if c["temporal"] == "transformer" and c["pool"] != "none":
            e = c["embed_dim"] or c["width"]
            f += c["temporal_depth"] * layer_flops(t, e, 4 * e, gated=c["act"] == "swiglu")
        return f

    @staticmethod
    def num_tokens(cfg: dict, frames: int | None = None) -> int:
        """N of the `tokens [B, N, D]` output for `frames` (default `num_frames`) frames
        in a training step: one per frame, or with `pool="none"` every frame's patch
        tokens (those `patch_dropout` keeps)."""
        m = VideoViT(**cfg)
        t = int(frames or m.num_frames)
        return t * kept_patches(m.grid ** 2, m.patch_dropout) if m.pool == "none" else t

    @staticmethod
    def prefix_tokens(cfg: dict) -> int:
        """How many of the `tokens` are not media content: none (one token per frame, or
        every frame's patch tokens with `pool="none"`)."""
        return 0

    @staticmethod
    def token_width(cfg: dict) -> int:
        """D of the `tokens [B, N, D]` output: the frame embedding width (`embed_dim`,
        else `width`), or `width` with `pool="none"`."""
        m = VideoViT(**cfg)
        return int(m.width if m.pool == "none" or m.embed_dim is None else m.embed_dim)

    @staticmethod
    def data_keys(cfg: dict) -> dict:
        """The `data.train` keys this tower's input fixes: `image_size`, `num_frames`."""
        m = VideoViT(**cfg)
        return {"image_size": int(m.image_size), "num_frames": int(m.num_frames)}

    @staticmethod
    def tiny(cfg: dict) -> dict:
        """Field updates of the `:tiny` shrink: the ViT's, and one temporal block."""
        return dict(ViT.tiny(cfg), temporal_depth=1, temporal_heads=2)

    def frame_vit(self, **overrides) -> ViT:
        """The per-frame encoder: a `ViT` with this module's ViT fields."""
        kwargs = {k: getattr(self, k) for k in _VIT_FIELDS}
        return ViT(**{**kwargs, **overrides})

    @nn.compact
    def __call__(self, videos):
        if videos.ndim != 5:
            raise ConfigError(f"VideoViT expects videos [B, T, H, W, 3], got shape "
                              f"{tuple(videos.shape)} (model.image.kind='video_vit' reads "
                              "video clips).")
        if self.temporal not in TEMPORAL:
            raise ConfigError(f"Unknown temporal model {self.temporal!r} (config key "
                              f"`model.image.temporal`); choose one of {TEMPORAL}.")
        b, t = videos.shape[:2]
        videos = constrain(videos, ("act_batch", None, None, None, None))
        frames = constrain(videos.reshape((b * t,) + videos.shape[2:]),
                           ("act_batch", None, None, None))
        pooled, tokens = self.frame_vit(name="frame")(frames)
        if pooled is None:                                   # pool="none": every frame's tokens
            n, d = tokens.shape[1:]
            return None, boundary(tokens.reshape(b, t * n, d))
        x = boundary(pooled.reshape(b, t, pooled.shape[-1]))  # [B, T, E]
        if self.temporal == "transformer":
            x = x + self._temporal(x)
        if self.normalize_frames:
            xf = x.astype(jnp.float32)
            x = (xf * jnp.reciprocal(jnp.linalg.norm(xf, axis=-1, keepdims=True) + 1e-6)
                 ).astype(x.dtype)
        x = boundary(x)
        return boundary(x.astype(jnp.float32).mean(axis=1).astype(x.dtype)), x

    def _temporal(self, x):
        """seqTransf: frame position embedding + `temporal_depth` blocks; `[B, T, E]`."""
        b, t, e = x.shape
        if t > self.num_frames:
            raise ConfigError(f"clips have {t} frames, more than model.image.num_frames="
                              f"{self.num_frames} (the frame position embedding's length); "
                              "raise num_frames or lower data.train.num_frames.")
        if e % self.temporal_heads:
            raise ConfigError(f"model.image.temporal_heads={self.temporal_heads} does not "
                              f"divide the frame embedding width {e}.")
        pe = self.param("frame_posemb", logical(normal_init(1.0 if self.center_frames else 0.02),
                                                (None, "embed")), (self.num_frames, e))
        if self.center_frames:
            x = center_clip(x)
        h = x + broadcast_param(pe[None, :t], (b, t, e), x.dtype)
        h = constrain(h, ("act_batch", "act_length", "act_embed"))
        blocks = stacked(Block, self.temporal_depth, scan=False, remat=self.remat,
                         name="temporal", num_heads=self.temporal_heads, mlp_dim=4 * e,
                         act=self.act, norm_eps=self.norm_eps,
                         implementation=self.attention, dtype=self.dtype)
        return blocks(h, (None, None, None))


def center_clip(x):
    """`[B, T, E]` frame embeddings -> each clip's deviations from its mean over
    frames, scaled to unit RMS over the clip (`center_frames`); all-alike frames
    give zeros. Computed in float32, returned in `x`'s dtype."""
    xf = x.astype(jnp.float32)
    d = xf - xf.mean(axis=1, keepdims=True)
    ms = jnp.mean(d * d, axis=(1, 2), keepdims=True)
    floor = 1e-4 * jnp.mean(xf * xf, axis=(1, 2), keepdims=True) + 1e-30
    return (d * jax.lax.rsqrt(ms + floor)).astype(x.dtype)
