"""Objectives: one function computes the weighted losses of every recipe.

`config.objectives` maps an objective name to its weight, e.g.
  CLIP     {"softmax_contrastive": 1.0}
  SigLIP   {"sigmoid_contrastive": 1.0}
  CoCa     {"softmax_contrastive": 1.0, "caption": 2.0}
  BLIP-2   {"itc": 1.0, "itm": 1.0, "itg": 1.0}
  BLIP-2 stage 2 / LLaVA   {"lm": 1.0}  (next-token loss on answer/caption tokens)
The train step calls `compute_losses`; it never branches on the recipe.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.errors import ConfigError
from mmjax.models import Blip2Stage1, CoCa, TwoTower, VisionLM
from mmjax.models.vlm import vlm_targets

VALID = {
    TwoTower: ("softmax_contrastive", "sigmoid_contrastive"),
    CoCa: ("softmax_contrastive", "sigmoid_contrastive", "caption"),
    Blip2Stage1: ("itc", "itm", "itg"),
    VisionLM: ("lm",),
}


def check_objectives(model: Any, objectives: Mapping[str, float]) -> None:
    """Raise a ValueError naming `config.objectives.X` if X does not apply to the model."""
    valid = VALID[type(model)]
    if not objectives:
        raise ConfigError(f"config.objectives is empty; choose from {valid}.")
    for name in objectives:
        if name not in valid:
            raise ConfigError(f"config.objectives.{name}: not an objective of "
                              f"{type(model).__name__}; choose from {valid}.")
    if isinstance(model, TwoTower):
        want = "sigmoid_contrastive" if model.head == "sigmoid" else "softmax_contrastive"
        if want not in objectives:
            raise ConfigError(f"config.objectives: model.head={model.head!r} needs {want!r}.")


def text_pad_id(model: Any) -> int:
    if isinstance(model, (Blip2Stage1, VisionLM)):
        return model.pad_id
    return int(dict(model.text).get("pad_id", 0))


def compute_losses(model: Any, params: Any, batch: Mapping[str, jax.Array],
                   objectives: Mapping[str, float], rng: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted total loss and metrics for one (micro-)batch.

    Args:
      batch: `image` `[B, H, W, 3]` float, `text` `[B, L]` int32, optional
        `loss_mask` `[B, L]` (VisionLM: 1 on answer/caption tokens).
      objectives: name -> weight.
      rng: key for stochastic parts (BLIP-2 ITM negative sampling).
    Returns: `(total, metrics)` with `loss/<name>` per objective and the
      head scalars (`scale`, `bias`, `temp`) where present.
    """
    v = {"params": params}
    images, text = batch["image"], batch["text"]
    pad = text_pad_id(model)
    terms: dict[str, jax.Array] = {}
    extra: dict[str, jax.Array] = {}
    if isinstance(model, VisionLM):
        out = model.apply(v, images, text)
        targets, weights = vlm_targets(text, batch.get("loss_mask"), out["text_index"], pad)
        terms["lm"] = losses.caption_loss(out["logits"][:, :-1], targets, weights)
    elif isinstance(model, Blip2Stage1):
        f = model.apply(v, images, text, method="itc_features")
        extra["temp"] = f["temp"]
        itc, sim = losses.blip2_itc_loss(f["image_feats"], f["text_feat"], f["temp"])
        if "itc" in objectives:
            terms["itc"] = itc
        if "itm" in objectives:
            tri = losses.blip2_itm_triples(sim, rng, temp=f["temp"])
            logits = model.apply(v, f["image_tokens"][tri["image_index"]],
                                 text[tri["text_index"]], method="itm_logits")
            terms["itm"] = losses.itm_loss(logits, tri["labels"])
        if "itg" in objectives:
            logits = model.apply(v, f["image_tokens"], text, method="itg_logits")
            terms["itg"] = losses.next_token_loss(logits, text, pad, label_smoothing=0.1)
    else:
        out = model.apply(v, images, text)
        extra["scale"] = out["scale"]
        if "bias" in out:
            extra["bias"] = out["bias"]
        if "softmax_contrastive" in objectives:
            terms["softmax_contrastive"] = losses.softmax_contrastive_loss(
                out["zimg"], out["ztxt"], out["scale"])
        if "sigmoid_contrastive" in objectives:
            bias = out.get("bias", jnp.zeros((), jnp.float32))
            terms["sigmoid_contrastive"] = losses.sigmoid_contrastive_loss(
                out["zimg"], out["ztxt"], out["scale"], bias)
        if "caption" in objectives:
            terms["caption"] = losses.next_token_loss(out["logits"], text, pad)
    total = sum(float(objectives[k]) * terms[k] for k in terms)
    metrics = {f"loss/{k}": t for k, t in terms.items()}
    metrics.update(extra)
    return total, metrics
