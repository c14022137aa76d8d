"""Grounding-map machinery on models: a family's `GroundingSpec` (a pair score and
where media tokens are tapped) and gradient x activation at the tap.

`mmjax.evaluate.grounding` builds the maps, the pointing game and the pictures on
top of it; its docstring explains the method and the taps each family uses.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError

_BLOCK_NAME = re.compile(r"(layers|vl_layers)_(\d+)$")


@dataclass(frozen=True)
class GroundingSpec:
    """What a family grounds with (see the module docstring).

    score: `(module, media [B, ...], text [B, L]) -> [B]` float32, called inside
      `model.apply` as a method.
    tap: `("last_block", prefix)`: the input of the self-attention of the last
      Transformer block whose module path starts with `prefix` (e.g.
      `("image_tower",)`): its normalized tokens,
      `("last_block_output", prefix)`: that block's output,
      `("input_of", path)`: the first positional input of the module at `path`,
      `("output_of", path)`: its output (an array).
    unroll: the model's fields whose scanned stacks are unrolled so that one block
      can be tapped: config sections (e.g. "image") or "self" (the model's own
      `scan` / `remat` fields).
    """
    score: Callable
    tap: tuple
    unroll: tuple = ("image",)


def cosine_score(m: Any, media, text):
    """`[B]` cosine of the media and text embeddings (a model with `encode_image` and
    `encode_text`): the score contrastive models' grounding maps explain."""
    zi, zt = m.encode_image(media), m.encode_text(text)
    zi = zi * jax.lax.rsqrt(jnp.sum(zi * zi, -1, keepdims=True) + 1e-12)
    zt = zt * jax.lax.rsqrt(jnp.sum(zt * zt, -1, keepdims=True) + 1e-12)
    return jnp.sum(zi * zt, -1)


def itm_score(m: Any, media, text):
    """`[B]` image-text matching log-odds (match minus no-match logit) of a model with
    `image_tokens(media)` and `itm_logits(image_tokens, text) -> [B, 2]`."""
    logits = m.itm_logits(m.image_tokens(media), text).astype(jnp.float32)
    return logits[:, 1] - logits[:, 0]


def likelihood_score(m: Any, media, text):
    """`[B]` log-likelihood of the text tokens after the media under a VisionLM (the
    media first when the text has no `<image>` placeholder): what a captioning
    model finds of the phrase in the media."""
    from mmjax.models.vision_lm import vlm_targets
    out = m(media, text)
    targets, weights = vlm_targets(text, None, out["text_index"], m.pad_id)
    logp = jax.nn.log_softmax(out["logits"][:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * weights, axis=-1)


def _no_scan(value: Any) -> Any:
    """`value` with every `scan` key set False and `remat` "none" (nested dicts too)."""
    if not isinstance(value, Mapping):
        return value
    out = {k: _no_scan(v) for k, v in value.items()}
    if out.get("scan"):
        out["scan"] = False
    if out.get("remat") not in (None, "none"):
        out["remat"] = "none"
    return out


def _restack(src: Any, target: Any) -> Any:
    """Params `src` laid out as `target` (a shape tree): scanned `{name}` subtrees with
    a leading depth axis become `{name}_i`."""
    if not isinstance(target, Mapping):
        return src
    out = {}
    for k, t in target.items():
        if k in src:
            out[k] = _restack(src[k], t)
            continue
        m = _BLOCK_NAME.match(k) or re.match(r"(.+)_(\d+)$", k)
        if not (m and m.group(1) in src):
            raise KeyError(f"parameter {k!r} has no counterpart in the checkpoint's params")
        i = int(m.group(2))
        out[k] = _restack(jax.tree.map(lambda x: x[i], src[m.group(1)]), t)
    return out


def unrolled(model: nn.Module, params: Any, sample_args: tuple,
             fields: tuple = ("image",)) -> tuple[nn.Module, Any]:
    """`(model, params)` with the scanned stacks of `fields` unrolled and remat off: the
    same function, with one module per block (`layers_0 ..`), so one block can be
    tapped. `fields`: config sections of the model (e.g. "image") or "self" (its own
    `scan` and `remat`).

    `sample_args`: inputs of `model.init` (shapes only matter)."""
    changes = {}
    for name in model.__dataclass_fields__:
        if name in ("parent", "name"):
            continue
        value = getattr(model, name)
        if name == "scan" and value and "self" in fields:
            changes[name] = False
        elif name == "remat" and value not in (None, "none") and "self" in fields:
            changes[name] = "none"
        elif (name in fields and isinstance(value, Mapping)
              and _no_scan(value) != dict(value)):
            changes[name] = _no_scan(value)
    if not changes:
        return model, params
    flat = model.clone(**changes)
    target = jax.eval_shape(lambda: flat.init(jax.random.key(0), *sample_args))["params"]
    return flat, _restack(nn.unbox(params), nn.unbox(target))


def tap_path(model, variables, media, text, spec: GroundingSpec) -> tuple:
    """Module path of the tap (`spec.tap`), found by tracing the score once."""
    kind, where = spec.tap
    if kind in ("input_of", "output_of"):
        return tuple(where)
    if kind not in ("last_block", "last_block_output"):
        raise ValueError(f"GroundingSpec.tap kind {kind!r}")
    seen = []

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if (context.method_name == "__call__" and path[:len(where)] == tuple(where)
                and len(path) == len(where) + 1 and _BLOCK_NAME.match(path[-1])):
            seen.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.apply, method=spec.score), variables, media, text)
    if not seen:
        raise ConfigError(f"grounding: no Transformer block under {'/'.join(where)} in "
                          f"{type(model).__name__}; the media tower needs depth >= 1.")
    # "last_block": the normalized tokens its attention reads. The block's own input
    # is no tap for a pre-norm block: through the LayerNorm a token's gradient is
    # orthogonal to the token (scale invariance), so gradient x activation is 0.
    return seen[-1] + ("attn",) if kind == "last_block" else seen[-1]


def token_cam(model, variables, media, text, spec: GroundingSpec, path: tuple, ref=None):
    """`(cam [B', N] float32, scores [B])`: relu(sum_d A * dS/dA) at the tap.

    `ref [B, K, L]` (optional): alternative phrases; then S = score(text) minus the
    mean score of the row's K alternatives (one batch: the media are repeated)."""
    b = text.shape[0]
    if ref is not None:
        k = ref.shape[1]
        media = jnp.concatenate([media, jnp.repeat(media, k, axis=0)], axis=0)
        text = jnp.concatenate([text, ref.reshape(b * k, ref.shape[-1])], axis=0)
    captured = []
    output = spec.tap[0] in ("output_of", "last_block_output")

    def tap_fn(delta):
        def add(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or tuple(context.module.path) != path:
                return next_fun(*args, **kwargs)
            if output:  # an array, or a tuple whose first item is the tokens (a block)
                y = next_fun(*args, **kwargs)
                first = y[0] if isinstance(y, tuple) else y
                captured.append(first)
                first = first + delta.astype(first.dtype)
                return (first,) + tuple(y[1:]) if isinstance(y, tuple) else first
            x = args[0]
            captured.append(x)
            return next_fun(x + delta.astype(x.dtype), *args[1:], **kwargs)

        with nn.intercept_methods(add):
            s = model.apply(variables, media, text, method=spec.score).astype(jnp.float32)
        if ref is not None:
            s = s[:b] - s[b:].reshape(b, -1).mean(axis=1)
        return jnp.sum(s), (captured[-1], s)

    shape = tap_shape(model, variables, media, text, spec, path)
    grad, (act, scores) = jax.grad(tap_fn, has_aux=True)(jnp.zeros(shape, jnp.float32))
    rows = act.shape[0] * b // media.shape[0]  # the first b examples' rows (frames folded)
    if ref is not None:  # the repeated media are the same tokens: their gradients add up
        g = grad[rows:].reshape((b, -1) + grad.shape[1:]) if rows == b else \
            grad[rows:].reshape((b, -1, rows // b) + grad.shape[1:])
        grad = grad[:rows] + g.sum(axis=1).reshape((rows,) + grad.shape[1:])
    cam = jnp.sum(act[:rows].astype(jnp.float32) * grad, axis=-1)
    return jax.nn.relu(cam), scores


def tap_shape(model, variables, media, text, spec, path) -> tuple:
    shapes = []
    output = spec.tap[0] in ("output_of", "last_block_output")

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and tuple(context.module.path) == path:
            shapes.append((y[0] if isinstance(y, tuple) else y).shape if output
                          else args[0].shape)
        return y

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.apply, method=spec.score), variables, media, text)
    return shapes[-1]


def media_grid(model: Any, media_shape: tuple) -> tuple[int, ...]:
    """Patch grid of one example's media for the model's media tower: `(gh, gw)`
    (ViT), `(F, T)` (AST: frequency, time) or `(frames, gh, gw)` (VideoViT)."""
    tower = media_tower(model)
    if hasattr(tower, "frame_vit"):  # (an unbound module: no method calls)
        g = int(tower.image_size) // int(tower.patch_size)
        return (int(media_shape[1]), g, g)
    g = tower.grid
    return tuple(int(x) for x in g) if isinstance(g, tuple) else (int(g), int(g))


def media_tower(model: Any):
    from mmjax.models.towers import tower_fields
    cls, fields = tower_fields(getattr(model, "image"))
    return cls(**fields)


