"""mmjax model library: pure-functional Flax (linen) modules.

    from mmjax.models import ViT, TextEncoder, QFormer, TwoTower, build
    model = build(config.model)
    variables = model.init(rng, images, text)
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.blip2 import Blip2Stage1
from mmjax.models.coca import CoCa
from mmjax.models.lm import DecoderLM
from mmjax.models.one_tower import OneTower
from mmjax.models.layers import MAPHead, Mlp, Norm, Attention, Block
from mmjax.models.qformer import QFormer
from mmjax.models.text import CaptionDecoder, TextEncoder
from mmjax.models.two_tower import TwoTower
from mmjax.models.vit import ViT
from mmjax.models import towers
from mmjax.models.vision_lm import VisionLM

MODELS = {"two_tower": TwoTower, "coca": CoCa, "blip2_stage1": Blip2Stage1,
          "vision_lm": VisionLM, "one_tower": OneTower}
# Nested sections of each model and the module their keys configure; "image" is
# the media tower, whose class `model.image.kind` picks (mmjax.models.towers).
SUBMODULES = {"two_tower": {"image": "tower", "text": TextEncoder},
              "coca": {"image": "tower", "text": TextEncoder, "decoder": CaptionDecoder},
              "blip2_stage1": {"image": "tower", "qformer": QFormer},
              "vision_lm": {"image": "tower", "qformer": QFormer, "lm": DecoderLM},
              "one_tower": {"image": "tower", "text": TextEncoder}}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

__all__ = ["ViT", "TextEncoder", "CaptionDecoder", "QFormer", "TwoTower", "CoCa",
           "Blip2Stage1", "DecoderLM", "VisionLM", "OneTower", "MAPHead", "Mlp", "Norm", "Attention", "Block", "build", "MODELS"]


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenDict -> nested plain dicts (hashable module fields need dicts)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_plain(v) for v in x)
    return x


def build(model_config: Mapping) -> Any:
    """Build a model from `config.model`.

    `model_config.name` picks the class (`two_tower`, `coca`, `blip2_stage1`,
    `vision_lm`, `one_tower`);
    every other key is a constructor field (nested dicts for towers).
    `dtype` may be given as a string ("float32", "bfloat16").
    """
    cfg = _plain(model_config)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"config key `model.name` is {name!r}; choose one of {sorted(MODELS)}.")
    if isinstance(cfg.get("dtype"), str):
        if cfg["dtype"] not in DTYPES:
            raise ConfigError(f"config key `model.dtype` is {cfg['dtype']!r}; choose one of "
                              f"{sorted(DTYPES)}.")
        cfg["dtype"] = DTYPES[cfg["dtype"]]
    cls = MODELS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ConfigError(f"config keys {['model.' + k for k in unknown]} are not fields of "
                          f"{cls.__name__}; valid keys: {sorted(fields)}.")
    for key, sub_cls in SUBMODULES.get(name, {}).items():
        if sub_cls == "tower":
            sub_cls, _ = towers.tower_fields(cfg.get(key), f"model.{key}")
            allowed = set(sub_cls.__dataclass_fields__) - {"parent", "name"} | {"kind"}
        else:
            allowed = set(sub_cls.__dataclass_fields__) - {"parent", "name"}
        bad = sorted(set(cfg.get(key) or {}) - allowed)
        if bad:
            raise ConfigError(f"config keys {[f'model.{key}.{k}' for k in bad]} are not fields of "
                              f"{sub_cls.__name__}; valid keys: {sorted(allowed)}.")
    return cls(**cfg)
