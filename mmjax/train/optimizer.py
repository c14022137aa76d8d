"""Optimizer: optax AdamW with masked weight decay, schedules, clipping, freezing.

config.optim fields:
  lr, warmup_steps, schedule ("cosine" | "linear" | "const"), end_lr_frac,
  b1, b2, eps, weight_decay, clip_norm (None/0 = off),
  freeze: list of parameter-path prefixes (e.g. ["image_tower"]) that are
    not updated at all (LiT); implemented with `optax.multi_transform`.
  decay_embeddings: also decay embeddings (token / position tables, class
    token, query tokens, MAP probes); default False.

Weight decay is decided by what a parameter is, read from its name, never by
its rank (`nn.scan` adds a leading layers axis, so a scanned LayerNorm scale is
2-D and an attention bias `[H, K]` is 2-D even unscanned): weight matrices
(`kernel`, `patch_kernel`) are decayed; norm scales, biases and head scalars
(logit scale / bias, temperature) never are; embeddings by
`optim.decay_embeddings`. A parameter name outside these kinds is an error, so
a new module cannot silently change the policy.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.errors import ConfigError

# Parameter kinds by leaf name (the last path component).
KERNELS = re.compile(r"(^|_)kernel$")
EMBEDDINGS = frozenset({"embedding", "posemb", "position_embeddings", "query_tokens", "cls",
                        "frame_posemb", "dist", "type_embedding",
                        "probe"})
NEVER_DECAYED = re.compile(r"^(scale|(\w+_)?bias|log_scale|temp)$")


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
        raise ConfigError(f"config.optim.schedule={optim.schedule!r}; choose 'cosine', "
                          "'linear' or 'const'.")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_kind(path: str) -> str:
    """"kernel", "embedding" or "other" (norm scale, bias, head scalar) for a
    parameter path like `image_tower/layers/mlp/fc1/kernel`."""
    name = path.rsplit("/", 1)[-1]
    if KERNELS.search(name):
        return "kernel"
    if name in EMBEDDINGS:
        return "embedding"
    if NEVER_DECAYED.match(name):
        return "other"
    raise ValueError(f"parameter {path!r}: unknown kind for weight decay; name it like a "
                     "kernel (`kernel`), an embedding, a norm scale or a bias, or add its "
                     "name to mmjax.train.optimizer's parameter kinds.")


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True where weight decay applies: kernels, and embeddings if `decay_embeddings`."""
    kinds = ("kernel", "embedding") if decay_embeddings else ("kernel",)
    return jax.tree_util.tree_map_with_path(lambda p, _: param_kind(_path(p)) in kinds, params)


def frozen_labels(params: Any, freeze: list[str]) -> Any:
    """"frozen" / "trained" label per parameter from path prefixes."""
    def label(p, _):
        path = _path(p)
        return "frozen" if any(path == f or path.startswith(f.rstrip("/") + "/")
                               for f in freeze) else "trained"
    return jax.tree_util.tree_map_with_path(label, params)


def frozen_dtype(optim: Any) -> Any:
    """The dtype `config.optim.frozen_dtype` stores frozen weights in (None: as initialized)."""
    from mmjax.models import DTYPES
    name = optim.get("frozen_dtype")
    if name in (None, "None", "none", ""):
        return None
    if name not in DTYPES:
        raise ConfigError(f"config.optim.frozen_dtype={name!r}; choose one of "
                          f"{sorted(DTYPES)} or None.")
    return DTYPES[name]


def cast_frozen(params: Any, optim: Any) -> Any:
    """`params` with the frozen ones (`optim.freeze`) in `optim.frozen_dtype`.

    Training stores frozen weights this way (a frozen LM in bfloat16), so every
    path that rebuilds a run's model (`Trainer`, `restore_run_params` for
    `mmjax generate` and `config.init` sources) computes with the same weights.
    Works on jax and numpy leaves alike.
    """
    dtype, freeze = frozen_dtype(optim), list(optim.get("freeze") or [])
    if dtype is None or not freeze:
        return params
    return jax.tree.map(lambda p, lab: p.astype(dtype) if lab == "frozen" else p,
                        params, frozen_labels(params, freeze))


def build_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """`(tx, schedule)`: the optimizer for `config.optim` and its learning-rate schedule."""
    schedule = lr_schedule(optim, total_steps)
    parts = []
    if optim.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2),
                             eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                             mask=functools.partial(
                                 decay_mask,
                                 decay_embeddings=bool(optim.get("decay_embeddings", False)))))
    tx = optax.chain(*parts)
    freeze = list(optim.get("freeze") or [])
    if freeze:
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                   lambda params: frozen_labels(params, freeze))
    return tx, schedule


def clamp_params(params: Any, bounds: dict[str, tuple[float, float]]) -> Any:
    """Clamp top-level scalar parameters into `bounds` (name -> (low, high)) after an
    update, as open_clip does for CLIP's logit scale and LAVIS for BLIP-2's
    temperature. The forward pass uses the parameter as it is, so its gradient
    is never cut off by the bound."""
    if not bounds:
        return params
    params = dict(params)
    for name, (low, high) in bounds.items():
        if name in params:
            params[name] = jnp.clip(params[name], low, high)
    return params
