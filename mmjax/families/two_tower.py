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
from mmjax.models.flops import (TRAIN, similarity_flops, text_flops, tower_config,
                                tower_flops)


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


def tower_tokens_cosine(model: Any):
    """Grounding of a contrastive model: the cosine, tapped at the media tower's final
    tokens (after `ln_post`; the frame ViT's for video), which the pooling (mean, MAP
    head) reads; with class-token pooling the patches' final tokens do not reach
    the embedding, so the tap is the normalized tokens the last block's attention reads."""
    from mmjax.models.grounding import GroundingSpec, cosine_score
    from mmjax.models.towers import tower_fields
    cls, fields = tower_fields(model.image)
    tower = cls(**fields)
    # (a VideoViT has the fields of its frame ViT)
    prefix = ("image_tower", "frame") if plain(model.image).get("kind") == "video_vit" \
        else ("image_tower",)
    pool = tower.pool
    if pool in ("cls", "cls_dist"):
        return GroundingSpec(score=cosine_score, tap=("last_block", prefix))
    if getattr(tower, "ln_post", True):
        return GroundingSpec(score=cosine_score, tap=("output_of", prefix + ("ln_post",)))
    return GroundingSpec(score=cosine_score, tap=("last_block_output", prefix))


def check_embeddings(family: Family, config: Any) -> None:
    """The media and text towers must embed into one space: `zimg` and `ztxt` of one
    shape (traced on one example, nothing allocated)."""
    import jax
    from mmjax.models import build, towers
    media, text = family.sample_inputs(config)
    tower = towers.build_tower(config.model.get("image"), jnp.float32)
    pooled, _ = jax.eval_shape(lambda: tower.init_with_output(jax.random.key(0), media)[0])
    if pooled is None:
        kind = (config.model.get("image") or {}).get("kind", towers.DEFAULT_KIND)
        raise ConfigError(f"the {family.name} family contrasts pooled embeddings, but the "
                          f"{kind!r} tower pools none (config.model.image.pool="
                          f"{config.model.image.get('pool')!r}); choose a pooling.")
    model = build(config.model)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), media, text)[0])
    zimg, ztxt = out["zimg"].shape, out["ztxt"].shape
    if zimg != ztxt:
        raise ConfigError(f"config.model.image embeds into [B, {zimg[-1]}] but config.model.text "
                          f"into [B, {ztxt[-1]}]; give both towers one embed_dim (or width).")


class TwoTowerFamily(Family):
    name = "two_tower"
    objectives = ("softmax_contrastive", "sigmoid_contrastive")
    evaluators = ("zeroshot", "retrieval", "grounding")
    patch_dropout = True

    def check_objectives(self, model: Any, objectives: Mapping[str, float]) -> None:
        super().check_objectives(model, objectives)
        want = "sigmoid_contrastive" if model.contrastive == "sigmoid" else "softmax_contrastive"
        if want not in objectives:
            raise ConfigError(f"config.objectives: model.contrastive={model.contrastive!r} needs {want!r}.")

    def check_config(self, config):
        check_embeddings(self, config)

    def grounding(self, model):
        return tower_tokens_cosine(model)

    def losses(self, model, params, batch, objectives, rng):
        out = self.apply(model, params, *self.model_inputs(model, batch), rng=rng)
        return contrastive_terms(out, objectives)

    def train_flops(self, model_cfg, batch, text_len, frozen=()):
        """Both towers and the `[B, B]` similarities, 3x forward; a frozen media tower
        (LiT: `image_tower` in `frozen`) 1x, and the similarities then need the
        gradient of the text side only (2x)."""
        m = plain(model_cfg)
        tower, img = self.tower(m), tower_config(m)
        trained = not any(f.strip("/") == "image_tower" for f in frozen)
        e = img.get("embed_dim") or tower.token_width(img)  # the pooled embedding's width
        per = tower_flops(tower, img, trained) + text_flops(plain(m["text"]), text_len, TRAIN)
        sims = similarity_flops(batch, e, mode=TRAIN) if trained \
            else 2 * similarity_flops(batch, e)
        return batch * per + sims
