"""Model families by `config.model.name`; the trainer, bench, compile, the
evaluation runner and `:tiny` ask the family (see `mmjax.families.base`).

Adding a family = one file here with a `Family` subclass + one line in
`FAMILIES` (+ its model class in `mmjax.models.MODELS` if it is a new module).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from mmjax.errors import ConfigError
from mmjax.families.base import Family
from mmjax.families.blip2 import Blip2Family
from mmjax.families.coca import CoCaFamily
from mmjax.families.one_tower import OneTowerFamily
from mmjax.families.two_tower import TwoTowerFamily
from mmjax.families.vision_lm import VisionLMFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (
    TwoTowerFamily(), CoCaFamily(), Blip2Family(), VisionLMFamily(), OneTowerFamily(),
)}

__all__ = ["Family", "FAMILIES", "get_family", "family_of", "compute_losses",
           "model_train_flops"]


def get_family(name_or_config: Any) -> Family:
    """The family of `config.model.name` (a name, `config.model` or the whole config)."""
    name = name_or_config
    if not isinstance(name, str):
        model_cfg = name.get("model", name) if hasattr(name, "get") else name
        name = model_cfg.get("name") if hasattr(model_cfg, "get") else None
    if name not in FAMILIES:
        raise ConfigError(f"config key `model.name` is {name!r}; choose one of "
                          f"{sorted(FAMILIES)}.")
    return FAMILIES[name]


def family_of(model: Any) -> Family:
    """The family of a built model (by its class, `mmjax.models.MODELS`)."""
    from mmjax.models import MODELS
    for name, cls in MODELS.items():
        if type(model) is cls and name in FAMILIES:
            return FAMILIES[name]
    raise ConfigError(f"{type(model).__name__} belongs to no registered family "
                      f"({sorted(FAMILIES)}).")


def compute_losses(model: Any, params: Any, batch: Mapping[str, jax.Array],
                   objectives: Mapping[str, float], rng: jax.Array,
                   family: Family | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted total loss and metrics for one (micro-)batch.

    Args:
      batch: the media (`image [B, H, W, 3]`, `audio [B, S]`, `video [B, T, H, W, 3]`,
        as the tower reads), `text [B, L]` int32, optional `loss_mask [B, L]`
        (VisionLM: 1 on answer/caption tokens).
      objectives: name -> weight (`config.objectives`).
      rng: key for stochastic parts (BLIP-2 ITM negative sampling).
      family: the model's family (default: the one registered for its class,
        `family_of`; give it where several families share a model class).
    Returns: `(total, metrics)` with `loss/<name>` per objective and the head
      scalars (`scale`, `bias`, `temp`) where present.
    """
    terms, extra = (family or family_of(model)).losses(model, params, batch, objectives, rng)
    total = sum(float(objectives[k]) * terms[k] for k in terms)
    metrics = {f"loss/{k}": t for k, t in terms.items()}
    metrics.update(extra)
    return total, metrics


def model_train_flops(config: Any, batch_size: int | None = None) -> float:
    """Model FLOPs of one training step of `config` over a global batch (default
    `config.batch_size`), as the family counts them (`Family.train_flops`: matmuls,
    `mmjax.models.flops` rules), with its `data.train.max_len` text tokens and its
    `optim.freeze` prefixes."""
    return get_family(config).step_flops(config, int(batch_size or config.batch_size))
