"""Grounding maps: where in the media a model finds a phrase.

`grounding_maps(config, model, variables, media, text)` returns one float map per
row over the media tower's patch grid: `[B, gh, gw]` for images, `[B, F, T]`
(mel-frequency x time patches) for audio, `[B, frames, gh, gw]` for video.

Method: Grad-CAM on tokens (gradient x activation). The family names a scalar
score S of a (media, text) pair and a place where media tokens `A [B, N, D]`
are tapped; the map of patch i is `relu(sum_d A[i, d] * dS/dA[i, d])`:

  family      score S                                  tokens A
  two_tower   cosine of the media and text embeddings  the media tower's final
  coca                                                 tokens (after ln_post; the
                                                       frame ViT's for video), which
                                                       mean / MAP pooling reads; with
                                                       class-token pooling the
                                                       normalized tokens the last
                                                       block's attention reads
  one_tower   ITM log-odds (match - no match)          the normalized tokens the
                                                       fused stack's last attention
                                                       reads, media positions
  blip2       ITM log-odds                             the image features the
                                                       Q-Former's cross-attention reads
  vision_lm   log-likelihood of the phrase after the   LLaVA: the projected patch
              media (a caption of it)                  tokens the LM reads; BLIP-2
                                                       stage 2: as blip2

Why these: the tokens must still be one per patch and must reach the score. A
class-token tower's final patch tokens do not reach its embedding, so there the
keys and values of the last attention are used (Grad-CAM's "last convolutional
layer"); not the block's input, whose gradient the pre-norm LayerNorm makes
orthogonal to it. Raw gradients on pixels are noisy. For BLIP-2 the features the cross-attention
reads are the keys and values of LAVIS's cross-attention Grad-CAM (attention x
gradient, at one layer); grad x activation on them needs no attention
probabilities, so it works with fused attention kernels that never form them.
Scanned stacks are evaluated unrolled (the same numbers; `unrolled`), so the
tap finds one layer.

Contrastive maps: given alternative phrases (`ref`), S is the phrase's score
minus the mean score of the alternatives. A contrastive model's tokens share
a large component that supports every caption of the image (after two
attention layers the background tokens carry the objects' description too:
the "opposite visualization" CLIP Surgery reports), so a plain map of "a green
triangle" lights up the background; against "an orange triangle" only what
tells the two apart remains, which is the object. `mmjax explain` with several
`--text` phrases and the pointing game use it.

`pointing_game` scores maps where the truth is known: the built-in shapes
images (`mmjax.data.synthetic`) with two objects, the phrase naming one of
them; a hit is the map's maximum (upsampled to pixels) inside the object's
box. Chance is the box's share of the image (a random point's hit rate).
`grounding_eval` is the `evals.grounding` evaluator; `overlay` draws a map.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.evaluate.gather import Share, combine
from mmjax.models.grounding import media_grid, tap_path, token_cam, unrolled


class Grounder:
    """Grounding maps of one model, compiled once per input shape.

    `Grounder(config, model, variables)(media [B, ...], text [B, L] int32)` ->
    `(maps [B, *grid] float32 >= 0, scores [B] float32)` with `grid` from
    `media_grid`. Maps are not normalized (`normalize_maps`)."""

    def __init__(self, config: Any, model: Any, variables: Any):
        from mmjax.families import get_family
        family = get_family(config)
        self.spec = family.grounding(model)
        if self.spec is None:
            raise ConfigError(f"config.evals.grounding: the {family.name} family has no "
                              "grounding maps (two_tower, coca, blip2_stage1, one_tower and "
                              "vision_lm do).")
        args = family.sample_inputs(config, 1)
        self.model, params = unrolled(model, variables["params"], args, self.spec.unroll)
        self.variables = {**variables, "params": params}
        self._fn = {}

    def __call__(self, media, text, ref=None):
        media, text = jnp.asarray(media), jnp.asarray(text, jnp.int32)
        ref = None if ref is None else jnp.asarray(ref, jnp.int32)
        key = (media.shape, text.shape, None if ref is None else ref.shape)
        if key not in self._fn:
            path = tap_path(self.model, self.variables, media, text, self.spec)
            self._fn[key] = jax.jit(
                lambda v, m, t, r: token_cam(self.model, v, m, t, self.spec, path, r))
        cam, scores = self._fn[key](self.variables, media, text, ref)
        cam = np.asarray(cam, np.float32)
        grid = media_grid(self.model, media.shape)
        b = media.shape[0]
        n = int(np.prod(grid))
        if cam.shape[0] != b:  # frames folded into the batch (video): [B*T, N]
            cam = cam.reshape(b, -1)
            per = cam.shape[1] // grid[0]
            cam = cam.reshape(b, grid[0], per)[:, :, per - n // grid[0]:]
        else:  # content tokens are the last ones (after class / text tokens)
            cam = cam[:, cam.shape[1] - n:]
        return cam.reshape((b,) + grid), np.asarray(scores, np.float32)


def grounding_maps(config: Any, model: Any, variables: Any, media, text) -> np.ndarray:
    """Grounding maps of `text [B, L]` int32 in `media [B, ...]` (the media tower's
    input, normalized as in training) -> `[B, *grid]` float32 in [0, 1] (each map
    divided by its maximum; all-zero where the score has no positive evidence)."""
    return normalize_maps(Grounder(config, model, variables)(media, text)[0])


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Each map `[B, ...]` divided by its maximum (zeros stay zeros)."""
    maps = np.asarray(maps, np.float32)
    top = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0)
    top = np.where(top > 0, top, 1.0).reshape((-1,) + (1,) * (maps.ndim - 1))
    return maps / top


# ------------------------------------------------------------------ drawing


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`[h, w]` map -> `[H, W]` float32, bilinear (cell centres on pixel centres)."""
    from PIL import Image
    img = Image.fromarray(np.asarray(heat, np.float32), mode="F")
    return np.asarray(img.resize((int(size[1]), int(size[0])), Image.BILINEAR), np.float32)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB `[..., 3]`: dark blue, cyan, yellow, red ("jet")."""
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.round(np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`image` uint8 `[H, W, 3]` with `heat` `[h, w]` (>= 0; scaled by its maximum)
    upsampled and drawn over it in `colormap` -> uint8 `[H, W, 3]`."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    heat = normalize_maps(np.asarray(heat, np.float32)[None])[0]
    up = upsample(heat, image.shape[:2])
    out = (1 - alpha) * image.astype(np.float32) + alpha * colormap(up).astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ pointing game


def pointing_hits(maps: np.ndarray, boxes: np.ndarray, image_size: int) -> np.ndarray:
    """Pointing game: `maps [B, h, w]`, `boxes [B, 4]` (x0, y0, x1, y1) in pixels of a
    square `image_size` image -> `[B]` bool: the maximum of the map upsampled to
    pixels lies inside the box. A constant map's maximum is its first pixel."""
    hits = []
    for heat, (x0, y0, x1, y1) in zip(maps, boxes):
        up = upsample(heat, (image_size, image_size))
        y, x = np.unravel_index(int(np.argmax(up)), up.shape)
        cx, cy = x + 0.5, y + 0.5  # pixel centre
        hits.append(x0 <= cx <= x1 and y0 <= cy <= y1)
    return np.asarray(hits, bool)


def box_share(boxes: np.ndarray, image_size: int) -> np.ndarray:
    """`[B]` share of the image each box `[B, 4]` covers (clipped to the image)."""
    b = np.clip(np.asarray(boxes, np.float64), 0, image_size)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / float(image_size) ** 2


def pointing_examples(split: str, num_images: int, image_size: int, seed: int = 0,
                      image_format: str = "jpg") -> list[dict]:
    """Built-in images with two shapes, each with the phrase naming each shape.

    Walks samples 0, 1, ... of `split` (`mmjax.data.synthetic`) and keeps the
    first `num_images` that show two objects; each gives two rows
    `{"index", "image" uint8 [S, S, 3], "phrase", "box" (x0, y0, x1, y1) pixels,
    "which": "big" | "small", "share"}`. Images go through the same encoding
    (JPEG) and decoding as the built-in shards, so they equal the eval images."""
    from mmjax.data import synthetic
    from mmjax.data.decode import decode_and_crop
    rows, i = [], 0
    while len(rows) < 2 * num_images:
        s = synthetic.make_sample(i, split, image_size, seed)
        objs = s["objects"]
        if len(objs) == 2:
            data = synthetic.encode_image(s["image"], image_format)
            image, _ = decode_and_crop(data, image_size, None, augment="center")
            for o in objs:
                box = np.asarray(o["box"], np.float64) * image_size
                rows.append({"index": i, "image": image,
                             "phrase": synthetic.article(o["name"]), "box": tuple(box),
                             "which": o["size"]})
        i += 1
    return rows


def pointing_game(config: Any, model: Any, variables: Any, tokenizer: Any, *,
                  num_images: int = 200, split: str = "test", batch_size: int = 32) -> dict:
    """Pointing-game accuracy on `num_images` held-out built-in images with two shapes
    (2 phrases each). Each map explains its phrase against the other shape's phrase
    (`Grounder` with `ref`): where the image supports one shape more than the other.

    Returns `{"pointing": acc, "chance": mean box share, "pointing_big", "chance_big",
    "pointing_small", "chance_small", "n": rows, "rows": the example rows with
    "map" [h, w] and "hit" added}`."""
    from mmjax.data.decode import normalize
    d = config.data.train
    size = int(d.image_size)
    batch_size += batch_size % 2
    rows = pointing_examples(split, num_images, size, seed=0,
                             image_format=str(config.synthetic.get("image_format", "jpg")))
    grounder = Grounder(config, model, variables)
    # In a multi-process job chunk i is computed by process i % P, then gathered.
    share = Share([rows[s:s + batch_size] for s in range(0, len(rows), batch_size)])
    maps = []
    for chunk in share:
        s = share.own[-1] * batch_size  # the chunk's first row
        pad = batch_size - len(chunk)  # one compiled shape
        images = np.stack([r["image"] for r in chunk] + [chunk[0]["image"]] * pad)
        text = np.asarray(tokenizer([r["phrase"] for r in chunk] + [chunk[0]["phrase"]] * pad),
                          np.int32)
        # rows come in pairs (the two shapes of one image): each one's alternative is
        # the other's phrase
        other = [rows[(s + j) ^ 1]["phrase"] for j in range(len(chunk))]
        ref = np.asarray(tokenizer(other + [chunk[0]["phrase"]] * pad), np.int32)[:, None]
        m, _ = grounder(normalize(images, d.mean, d.std), text, ref)
        maps.append(m[:len(chunk)])
    grid = media_grid(grounder.model, (1,) + rows[0]["image"].shape)
    maps, = combine(share.rows(), np.concatenate(maps) if maps else
                    np.zeros((0,) + grid, np.float32))
    boxes = np.asarray([r["box"] for r in rows])
    hits = pointing_hits(maps, boxes, size)
    share = box_share(boxes, size)
    which = np.asarray([r["which"] for r in rows])
    out = {"pointing": float(hits.mean()), "chance": float(share.mean()), "n": len(rows)}
    for w in ("big", "small"):
        sel = which == w
        out[f"pointing_{w}"] = float(hits[sel].mean())
        out[f"chance_{w}"] = float(share[sel].mean())
    for r, m, h in zip(rows, maps, hits):
        r["map"], r["hit"] = m, bool(h)
    out["rows"] = rows
    return out


def grounding_eval(config: Any, model: Any, variables: Any, tokenizer: Any) -> tuple[dict, dict]:
    """The `evals.grounding` evaluator: pointing game on held-out built-in images.

    Returns `(metrics, details)`: metrics `grounding/pointing` (accuracy),
    `grounding/chance` (mean box share), the same per object (`_big`, `_small`) and
    `grounding/n`; details `{"examples": [dict(image uint8 [H, W, 3], text str,
    map float32 [h, w] in [0, 1], overlay uint8 [H, W, 3], box (x0, y0, x1, y1)
    pixels, hit bool), ...]}` for the first `evals.grounding.examples` rows.

    In a multi-process job every process computes the maps of its share of the
    batches; the maps are gathered, so every process returns the same result."""
    section = config.evals.grounding
    if str(section.shards) != "synthetic":
        raise ConfigError(f"config.evals.grounding.shards={section.shards!r}: the pointing "
                          "game needs object boxes, which only the built-in data has; set "
                          "it to 'synthetic' or ''.")
    from mmjax.families import get_family
    if get_family(config).media(config.model) != "image":
        raise ConfigError("config.evals.grounding: the pointing game runs on the built-in "
                          "images; for audio or video use `mmjax explain` (maps only).")
    r = pointing_game(config, model, variables, tokenizer,
                      num_images=int(section.num_images), split="test",
                      batch_size=int(config.evals.batch_size))
    metrics = {f"grounding/{k}": v for k, v in r.items() if k != "rows"}
    if jax.process_index() == 0:
        import logging
        logging.getLogger("mmjax").info(
            "grounding: pointing game %.1f%% (chance %.1f%%) on %d phrases; big shape %.1f%% "
            "(%.1f%%), small %.1f%% (%.1f%%)", 100 * r["pointing"], 100 * r["chance"], r["n"],
            100 * r["pointing_big"], 100 * r["chance_big"], 100 * r["pointing_small"],
            100 * r["chance_small"])
    examples = [dict(image=row["image"], text=row["phrase"],
                     map=normalize_maps(row["map"][None])[0],
                     overlay=overlay(row["image"], row["map"]), box=row["box"], hit=row["hit"])
                for row in r["rows"][:int(section.examples)]]
    return metrics, {"examples": examples}
