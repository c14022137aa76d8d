"""Media towers by name: `model.image.kind` picks the encoder of the non-text input.

A tower is a Flax module whose `__call__(x)` returns `(pooled [B, E] or None,
tokens [B, N, D])`, whose fields are the config keys of its section
(`model.image`), and whose class says what every family and the data pipeline
need to know of its media (see `ViT`): `modality` (the batch key and the
decoder's name), `example_input(cfg, data)`, `forward_flops(cfg)`,
`num_tokens(cfg)` / `token_width(cfg)` (of `tokens`), `prefix_tokens(cfg)` (its
leading non-content tokens; optional, 0) and `tiny(cfg)`.
Towers are registered with their media decoder and built-in data in one call,
`mmjax.registry.register_tower`, which fills `TOWERS` here.

    kind          input                                 module
    "vit"         images  [B, H, W, 3] float            mmjax.models.vit.ViT
    "ast"         audio   [B, num_samples] float        mmjax.models.ast.AST
    "video_vit"   video   [B, T, H, W, 3] float         mmjax.models.video.VideoViT
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from mmjax.errors import ConfigError

# kind -> the class, or "module:Class" (imported on first use, so a tower's
# optional dependencies are only needed by the runs that use it).
TOWERS: dict[str, Any] = {
    "vit": "mmjax.models.vit:ViT",
    "video_vit": "mmjax.models.video:VideoViT",
    "ast": "mmjax.models.ast:AST",
}
DEFAULT_KIND = "vit"


def tower_class(kind: str | None, key: str = "model.image") -> type:
    """The module class registered for `kind` (None: "vit")."""
    kind = DEFAULT_KIND if kind is None else kind
    if kind not in TOWERS:
        raise ConfigError(f"config key `{key}.kind` is {kind!r}; choose one of {sorted(TOWERS)}.")
    return load_tower(TOWERS[kind])


def load_tower(ref: Any) -> type:
    """A tower class, or the class a "module:Class" reference names (imported)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def prefix_tokens(cls: type, fields: Mapping) -> int:
    """How many leading `tokens` of tower `cls` with constructor `fields` are not media
    content (class / distillation tokens): `cls.prefix_tokens(fields)`, 0 if the tower
    does not say."""
    return int(cls.prefix_tokens(fields)) if hasattr(cls, "prefix_tokens") else 0


def data_keys(cls: type, fields: Mapping) -> dict:
    """The `data.train` keys the input of tower `cls` fixes: `cls.data_keys(fields)`,
    none if the tower does not say."""
    return dict(cls.data_keys(fields)) if hasattr(cls, "data_keys") else {}


def tower_fields(cfg: Mapping | None, key: str = "model.image") -> tuple[type, dict]:
    """`(class, constructor kwargs)` of a tower config section (`kind` removed)."""
    cfg = dict(cfg or {})
    cls = tower_class(cfg.pop("kind", None), key)
    return cls, cfg


def build_tower(cfg: Mapping | None, dtype: Any, key: str = "model.image", **overrides):
    """Instantiate the tower of a config section; `dtype` unless the section sets it."""
    cls, kwargs = tower_fields(cfg, key)
    kwargs = {"dtype": dtype, **kwargs, **overrides}
    return cls(**kwargs)
