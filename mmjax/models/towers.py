"""Media towers by name: `model.image.kind` picks the encoder of the non-text input.

A tower is a Flax module whose `__call__(x)` returns `(pooled [B, E] or None,
tokens [B, N, D])` and whose fields are the config keys of its section
(`model.image`). Adding a tower = one module file + one line in `TOWERS`.

    kind          input                        module
    "vit"         images  [B, H, W, 3] float   mmjax.models.vit.ViT
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from mmjax.errors import ConfigError

# kind -> "module:Class" (imported on first use, so a tower's optional
# dependencies are only needed by the runs that use it).
TOWERS: dict[str, str] = {
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
    module, _, name = TOWERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


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
