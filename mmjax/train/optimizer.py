"""Optimizer: optax AdamW with masked weight decay, schedules, clipping, freezing.

config.optim fields:
  lr, warmup_steps, schedule ("cosine" | "linear" | "const"), end_lr_frac,
  b1, b2, eps, weight_decay, clip_norm (None/0 = off),
  freeze: list of parameter-path prefixes (e.g. ["image_tower"]) that are
    not updated at all (LiT); implemented with `optax.multi_transform`.
Weight decay skips every parameter with ndim < 2 (norm scales, biases,
scalars such as the logit scale/bias) and embeddings (token, position,
class token, query tokens, MAP probe), as open_clip and big_vision do.
"""
from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

NO_DECAY_PATTERN = re.compile(
    r"(embedding|posemb|position_embeddings|query_tokens|/cls$|probe|log_scale|logit_bias|temp)")


def lr_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) then cosine / linear decay to `end_lr_frac * lr`, or constant."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    end = lr * float(optim.get("end_lr_frac", 0.0))
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif optim.schedule == "const":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.optim.schedule={optim.schedule!r}; choose 'cosine', "
                         "'linear' or 'const'.")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x.ndim >= 2 and not NO_DECAY_PATTERN.search(_path(p)), params)


def frozen_labels(params: Any, freeze: list[str]) -> Any:
    """"frozen" / "trained" label per parameter from path prefixes."""
    def label(p, _):
        path = _path(p)
        return "frozen" if any(path == f or path.startswith(f.rstrip("/") + "/")
                               for f in freeze) else "trained"
    return jax.tree_util.tree_map_with_path(label, params)


def check_freeze(optim: Any, params: Any) -> None:
    """Every `config.optim.freeze` prefix must name at least one parameter."""
    for prefix in list(optim.get("freeze") or []):
        if "frozen" not in jax.tree.leaves(frozen_labels(params, [prefix])):
            raise ValueError(f"config.optim.freeze: {prefix!r} matches no parameter; top-level "
                             f"names are {sorted(flax.core.unfreeze(params))}.")


def build_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """`(tx, schedule)`: the optimizer for `config.optim` and its learning-rate schedule."""
    schedule = lr_schedule(optim, total_steps)
    parts = []
    if optim.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2),
                             eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                             mask=decay_mask))
    tx = optax.chain(*parts)
    freeze = list(optim.get("freeze") or [])
    if freeze:
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                   lambda params: frozen_labels(params, freeze))
    return tx, schedule


def clamp_head_params(params: Any, max_log_scale: float | None) -> Any:
    """Clamp a top-level `log_scale` to [0, max_log_scale] after each update (open_clip)."""
    if max_log_scale is None or "log_scale" not in params:
        return params
    params = dict(params)
    params["log_scale"] = jnp.clip(params["log_scale"], 0.0, max_log_scale)
    return params
