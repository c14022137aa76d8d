"""Two-tower contrastive family: CLIP (softmax), SigLIP (sigmoid), LiT; any media tower.

`model.name = "two_tower"`; the media tower is `model.image.kind` ("vit" for
images; see `mmjax.models.towers`), so the same family aligns text with
images, audio or video.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from mmjax import losses
from mmjax.errors import ConfigError
from mmjax.families.base import Family, plain
from mmjax.models.flops import text_flops


def contrastive_terms(out: Mapping, objectives: Mapping) -> tuple[dict, dict]:
    """Softmax / sigmoid contrastive losses from a model output with `zimg`, `ztxt`,
    `scale` (and `bias`); returns `(terms, extra)`."""
    terms = {}
    extra = {"scale": out["scale"]}
    if "bias" in out:
        extra["bias"] = out["bias"]
    if "softmax_contrastive" in objectives:
        terms["softmax_contrastive"] = losses.softmax_contrastive_loss(
            out["zimg"], out["ztxt"], out["scale"])
    if "sigmoid_contrastive" in objectives:
        bias = out.get("bias", jnp.zeros((), jnp.float32))
        terms["sigmoid_contrastive"] = losses.sigmoid_contrastive_loss(
            out["zimg"], out["ztxt"], out["scale"], bias)
    return terms, extra


class TwoTowerFamily(Family):
    name = "two_tower"
    objectives = ("softmax_contrastive", "sigmoid_contrastive")
    evaluators = ("zeroshot", "retrieval")

    def check_objectives(self, model: Any, objectives: Mapping[str, float]) -> None:
        super().check_objectives(model, objectives)
        want = "sigmoid_contrastive" if model.contrastive == "sigmoid" else "softmax_contrastive"
        if want not in objectives:
            raise ConfigError(f"config.objectives: model.contrastive={model.contrastive!r} needs {want!r}.")

    def losses(self, model, params, batch, objectives, rng):
        out = self.apply(model, params, *self.model_inputs(model, batch), rng=rng)
        return contrastive_terms(out, objectives)

    def train_flops(self, model_cfg, batch, text_len, frozen=()):
        m = plain(model_cfg)
        img = plain(m.get("image"))
        fwd = self.media_flops(m) + text_flops(plain(m["text"]), text_len)
        e = img.get("embed_dim") or img["width"]
        return 3 * batch * fwd + 3 * 2 * batch * batch * e  # + the [B, B] logits
