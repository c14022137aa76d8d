"""Two-tower contrastive models: CLIP (softmax head), SigLIP (sigmoid head), LiT,
and the same heads over audio (CLAP) and video (video CLIP).

`TwoTower(image=..., text=..., contrastive=...)(media [B, ...], text [B, L])`
returns a dict:
  zimg, ztxt: `[B, E]` L2-normalized embeddings (float32) of the media and the text
  scale:      scalar multiplier exp(t)
  bias:       scalar logit bias (sigmoid head only)
The media tower is the one `image["kind"]` names (`mmjax.models.towers`), and
`media` its input: images `[B, H, W, 3]` float (`kind="vit"`, the default), audio waveforms
  `[B, num_samples]` float (`"ast"`; or log-mel spectrograms `[B, frames,
  n_mels]`) or video clips `[B, T, H, W, 3]` float (`"video_vit"`).
The names `image`, `image_tower`, `zimg` and `encode_image` stand for the
media of any kind. `encode_image` / `encode_text` return the projected,
unnormalized embeddings.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.layers import l2_normalize
from mmjax.models.text import TextEncoder
from mmjax.models.towers import build_tower

CONTRASTIVE = ("softmax", "sigmoid")


def _scalar(module: nn.Module, name: str, value: float):
    return module.param(name, nn.with_logical_partitioning(
        lambda *_: jnp.asarray(value, jnp.float32), ()), ())


class TwoTower(nn.Module):
    """Media tower (image, audio or video) + text tower + contrastive head.

    Fields:
      image: the media tower's config section: `kind` ("vit", the default;
        "ast", "video_vit"; see `mmjax.models.towers`) and the keyword
        arguments of its class (`ViT`, `AST`, `VideoViT`).
      text: keyword arguments of `TextEncoder`.
      contrastive: "softmax" (CLIP: log-scale init log(1/0.07), kept in [0,
        max_log_scale]) or "sigmoid" (SigLIP: t = log 10, b = -10, never clamped,
        as in big_vision).
      scale_init: initial log-scale t (scale = exp(t)); None = log(1/0.07)
        (softmax) or log 10 (sigmoid).
      bias_init: initial logit bias of the sigmoid head (None = -10); unused by softmax.
      max_log_scale: upper bound of the softmax head's log-scale, applied to the
        parameter after every optimizer update (`param_bounds`; None = no bound).
      dtype: compute dtype of both towers (params stay float32; embeddings and
        head are float32), unless a tower's section sets its own `dtype`.
    """
    image: dict
    text: dict
    contrastive: str = "softmax"
    scale_init: Optional[float] = None
    bias_init: Optional[float] = None
    max_log_scale: Optional[float] = math.log(100.0)
    dtype: Any = jnp.float32

    def setup(self):
        if self.contrastive not in CONTRASTIVE:
            raise ConfigError(f"Unknown contrastive head {self.contrastive!r} (config key "
                              f"`model.contrastive`); choose one of {CONTRASTIVE}.")
        self.image_tower = build_tower(self.image, self.dtype)
        self.text_tower = TextEncoder(**{"dtype": self.dtype, **dict(self.text)})
        default_scale = math.log(1 / 0.07) if self.contrastive == "softmax" else math.log(10.0)
        self.log_scale = _scalar(self, "log_scale",
                                 default_scale if self.scale_init is None else self.scale_init)
        if self.contrastive == "sigmoid":
            self.logit_bias = _scalar(self, "logit_bias",
                                      -10.0 if self.bias_init is None else self.bias_init)

    def encode_image(self, images):
        """Media `[B, ...]` (the tower's input: images `[B, H, W, 3]`, audio
        `[B, num_samples]`, video `[B, T, H, W, 3]`) -> projected, unnormalized
        `[B, E]` float32."""
        return self.image_tower(images)[0].astype(jnp.float32)

    def encode_text(self, text):
        """`[B, L]` int32 -> projected, unnormalized `[B, E]`."""
        return self.text_tower(text)[0].astype(jnp.float32)

    def param_bounds(self) -> dict:
        """Top-level scalars the trainer clamps after each update: the softmax head's
        log-scale to [0, max_log_scale] (open_clip); nothing for the sigmoid head."""
        if self.contrastive == "softmax" and self.max_log_scale is not None:
            return {"log_scale": (0.0, float(self.max_log_scale))}
        return {}

    def head_params(self):
        """`(scale, bias)`: exp of the log-scale, and the bias (or None)."""
        return jnp.exp(self.log_scale), (self.logit_bias if self.contrastive == "sigmoid" else None)

    def __call__(self, images, text):
        """`(media [B, ...], text [B, L] int32)` -> the dict of the module docstring."""
        scale, bias = self.head_params()
        out = {"zimg": l2_normalize(self.encode_image(images)),
               "ztxt": l2_normalize(self.encode_text(text)), "scale": scale}
        if bias is not None:
            out["bias"] = bias
        return out
