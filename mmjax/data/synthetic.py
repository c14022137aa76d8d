"""Built-in synthetic image–caption dataset: coloured shapes on a grey background.

Each image shows one large *class object* (one of 6 colours x 4 shapes = 24
classes, class name e.g. ``"red circle"``) and, in 60% of the images, a
smaller second object of another colour placed above, below, left or right of
it. The caption always names the class object first and the second object
with a relation word, in one of several phrasings, e.g.
``"a large red circle above a small blue square"``. Sizes, positions, shades,
background grey level and pixel noise vary per sample.

Each sample also carries five questions about its image (``QUESTIONS``: colour
and shape of the big object, number of objects, colour of the small one and
where it is relative to the big one), with one-word answers from
``ANSWERS_BY_TYPE``, in a per-sample random order.

The class is determined by what is drawn (colour and shape of the largest
object), so a tiny CLIP learns it in minutes on a CPU and its zero-shot
accuracy with prompts like ``"a photo of a red circle."`` is far above chance
(1/24).

Samples are a pure function of ``(seed, split, index)``; each split is its own
random stream, so "train" and "test" never share a sample.
"""
from __future__ import annotations

import collections
import io
import logging
import zlib

import numpy as np

from mmjax.data.cache import cached_shards
from mmjax.errors import ConfigError

log = logging.getLogger("mmjax")

# Bump when the generator changes, so cached shards are rebuilt.
GENERATOR_VERSION = 5

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
    "purple": (150, 55, 200),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CLASSNAMES: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
"""Label i -> class name; label = colour_index * len(SHAPES) + shape_index."""

_COLOR_NAMES = list(COLORS)
_RELATIONS = {  # relation of the class object to the second one -> inverse
    "above": "below", "below": "above",
    "to the left of": "to the right of", "to the right of": "to the left of",
}
# {m} and {s} carry their article ("a red circle", "an orange cross").
_SINGLE_TEMPLATES = (
    "{m}", "a photo of {m}", "a picture of {m}", "a drawing of {m}",
    "{m} on a grey background", "there is {m}",
)
_PAIR_TEMPLATES = (
    "{m} {rel} {s}", "a photo of {m} {rel} {s}", "{m} and {s}",
    "{m} with {s} {inv} it", "a picture of {m} {rel} {s}", "{m} next to {s}",
)
# Complete captions (`full_caption`): sizes, both objects and the relation, always.
_FULL_PAIR_TEMPLATES = (
    "{m} {rel} {s}", "a photo of {m} {rel} {s}", "{m} with {s} {inv} it",
    "a picture of {m} {rel} {s}", "{s} {inv} {m}", "there is {s} {inv} {m}",
)
_SUPERSAMPLE = 2  # render at 2x and average: smooth edges without a drawing library

QUESTIONS: dict[str, str] = {  # question type -> question text
    "color": "colour of the big shape?",
    "shape": "shape of the big one?",
    "count": "how many shapes?",
    "small_color": "colour of the small shape?",
    "where": "where is the small shape?",
}
_WHERE = {"above": "above", "below": "below", "to the left of": "left",
          "to the right of": "right"}
ANSWERS_BY_TYPE: dict[str, tuple[str, ...]] = {  # question type -> every possible answer
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": ("one", "two"),
    "small_color": tuple(COLORS) + ("none",),
    "where": tuple(_WHERE.values()) + ("none",),
}
_QA_STREAM = 1  # extra seed word of the stream that orders the questions
_FULL_CAPTION_STREAM = 2  # ... and of the stream that phrases `full_caption`


def article(phrase: str) -> str:
    """``"red circle"`` -> ``"a red circle"``; ``"orange cross"`` -> ``"an orange cross"``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _split_stream(split: str) -> int:
    if not split or not isinstance(split, str):
        raise ValueError(f"split must be a non-empty string like 'train' or 'test', got {split!r}")
    return zlib.crc32(split.encode("utf-8"))


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float,
                size: float) -> np.ndarray:
    """Boolean mask of a shape of side ``size`` centred at (cx, cy); coords in [0, 1]."""
    h = size / 2
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base at the bottom
        t = (dy + h) / (2 * h)  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    if shape == "cross":
        arm = h / 3
        return (((np.abs(dx) <= arm) & (np.abs(dy) <= h)) |
                ((np.abs(dy) <= arm) & (np.abs(dx) <= h)))
    raise ValueError(f"unknown shape {shape!r}")


def _layout(rng: np.random.Generator, two: bool):
    """Sizes and centres (normalized) of the class object and the optional second one."""
    s1 = rng.uniform(0.45, 0.62)
    if not two:
        return (s1, rng.uniform(s1 / 2, 1 - s1 / 2), rng.uniform(s1 / 2, 1 - s1 / 2)), None, None
    s2 = rng.uniform(0.16, 0.28)
    rel = list(_RELATIONS)[rng.integers(4)]
    gap = 0.02
    # Along the relation axis the two objects occupy disjoint intervals.
    a1 = rng.uniform(s1 / 2, 1 - s2 - gap - s1 / 2)
    a2 = rng.uniform(a1 + s1 / 2 + gap + s2 / 2, 1 - s2 / 2)
    b1 = rng.uniform(s1 / 2, 1 - s1 / 2)
    b2 = rng.uniform(s2 / 2, 1 - s2 / 2)
    if rel in ("below", "to the right of"):  # class object second along the axis
        a1, a2 = 1 - a1, 1 - a2
    if rel in ("above", "below"):
        return (s1, b1, a1), (s2, b2, a2), rel
    return (s1, a1, b1), (s2, a2, b2), rel


def _sample_rng(index: int, split: str, seed: int) -> np.random.Generator:
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([int(seed), _split_stream(split), int(index)])


def _draw_objects(rng: np.random.Generator):
    """First draws of a sample: (color1, shape1, two, color2, shape2, obj1, obj2, rel)."""
    color1 = int(rng.integers(len(COLORS)))
    shape1 = int(rng.integers(len(SHAPES)))
    two = bool(rng.uniform() < 0.6)
    color2 = int((color1 + rng.integers(1, len(COLORS))) % len(COLORS))  # another colour
    shape2 = int(rng.integers(len(SHAPES)))
    obj1, obj2, rel = _layout(rng, two)
    return color1, shape1, two, color2, shape2, obj1, obj2, rel


def _make_qa(index: int, split: str, seed: int, color1: int, shape1: int, two: bool,
             color2: int, rel: str | None) -> list[dict]:
    """The five question/answer dicts of a sample, shuffled.

    The order comes from its own stream (seeded by ``(seed, split, index)``),
    so it never shifts the draws of the image and caption.
    """
    answers = {
        "color": _COLOR_NAMES[color1],
        "shape": SHAPES[shape1],
        "count": "two" if two else "one",
        "small_color": _COLOR_NAMES[color2] if two else "none",
        # `rel` relates the class object to the second one; its inverse places
        # the small object relative to the big one.
        "where": _WHERE[_RELATIONS[rel]] if two else "none",
    }
    qa = [{"question": QUESTIONS[t], "answer": a, "type": t} for t, a in answers.items()]
    order = np.random.default_rng(
        [int(seed), _split_stream(split), int(index), _QA_STREAM]).permutation(len(qa))
    return [qa[i] for i in order]


def _full_caption(index: int, split: str, seed: int, main: str, second: str | None,
                  rel: str | None) -> str:
    """A caption that states the whole scene: one shape (``"a photo of a red circle"``)
    or both, with sizes and the relation (``"a small blue square below a big red
    circle"``), so it is true of exactly the images of its scene. Phrased from its own
    stream, so it never shifts the draws of the image and caption."""
    rng = np.random.default_rng([int(seed), _split_stream(split), int(index),
                                 _FULL_CAPTION_STREAM])
    if second is None:
        return _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))].format(m=article(main))
    template = _FULL_PAIR_TEMPLATES[rng.integers(len(_FULL_PAIR_TEMPLATES))]
    big = "large" if rng.uniform() < 0.5 else "big"
    return template.format(m=article(f"{big} {main}"), s=article(f"small {second}"), rel=rel,
                           inv=_RELATIONS[rel])


def sample_qa(index: int, split: str = "train", seed: int = 0) -> list[dict]:
    """Question/answer list of sample ``index`` without rendering its image.

    Returns:
      the same list as ``make_sample(index, split, ..., seed)["qa"]`` (it does
      not depend on the image size): 5 dicts ``{"question", "answer", "type"}``.
    """
    color1, shape1, two, color2, _, _, _, rel = _draw_objects(_sample_rng(index, split, seed))
    return _make_qa(index, split, seed, color1, shape1, two, color2, rel)


def make_sample(index: int, split: str = "train", image_size: int = 64,
                seed: int = 0) -> dict:
    """One synthetic sample, deterministic in ``(seed, split, index)``.

    Returns:
      dict with ``image`` uint8 ``[H, W, 3]`` (H = W = image_size),
      ``caption`` str, ``label`` int in ``[0, 24)``, ``classname`` str,
      ``qa``: 5 dicts ``{"question", "answer", "type"}`` (see ``QUESTIONS``) and
      ``objects``: one dict per drawn shape, the class object first,
      ``{"name": "red circle", "size": "big" | "small", "box": (x0, y0, x1, y1)}``
      with the box in [0, 1] image coordinates (x right, y down), and
      ``scene``: what every caption of the image can say, e.g. ``"red circle
      above blue square"`` (the same for images no caption tells apart), and
      ``full_caption``: a caption true of exactly the images of its scene (both
      shapes, their sizes and the relation always said; ``caption`` may leave the
      relation out, "a red circle and a blue square", and then is true of images of
      other scenes too).
    """
    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8, got {image_size}")
    rng = _sample_rng(index, split, seed)
    color1, shape1, two, color2, shape2, obj1, obj2, rel = _draw_objects(rng)

    n = image_size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(coords, coords)
    grey = rng.uniform(95, 165)
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = grey + rng.uniform(-8, 8, size=3)  # slightly tinted grey
    objects = [(obj1, color1, shape1)] + ([(obj2, color2, shape2)] if two else [])
    for (size, cx, cy), ci, si in objects:
        rgb = np.clip(np.array(COLORS[_COLOR_NAMES[ci]]) + rng.uniform(-18, 18, 3), 0, 255)
        canvas[_shape_mask(SHAPES[si], xx, yy, cx, cy, size)] = rgb
    image = canvas.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean((1, 3))
    image += rng.normal(0, 5, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    m = m_name = f"{_COLOR_NAMES[color1]} {SHAPES[shape1]}"
    if obj1[0] > 0.56 and rng.uniform() < 0.5:
        m = f"{'large' if rng.uniform() < 0.5 else 'big'} {m}"
    if two:
        s = f"{_COLOR_NAMES[color2]} {SHAPES[shape2]}"
        if rng.uniform() < 0.5:
            s = f"small {s}"
        template = _PAIR_TEMPLATES[rng.integers(len(_PAIR_TEMPLATES))]
        if "next to" in template and rel in ("above", "below"):
            template = _PAIR_TEMPLATES[0]
        caption = template.format(m=article(m), s=article(s), rel=rel,
                                  inv=_RELATIONS[rel])
    else:
        template = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
        caption = template.format(m=article(m))
    label = color1 * len(SHAPES) + shape1
    qa = _make_qa(index, split, seed, color1, shape1, two, color2, rel)
    found = [dict(name=f"{_COLOR_NAMES[ci]} {SHAPES[si]}", size=kind,
                  box=(cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2))
             for ((size, cx, cy), ci, si), kind in zip(objects, ("big", "small"))]
    s_name = f"{_COLOR_NAMES[color2]} {SHAPES[shape2]}" if two else None
    scene = f"{m_name} {rel} {s_name}" if two else m_name
    return dict(image=image, caption=caption, label=label, classname=CLASSNAMES[label], qa=qa,
                objects=found, scene=scene,
                full_caption=_full_caption(index, split, seed, m_name, s_name, rel))


def majority_answer_baselines(split: str = "train", num_samples: int = 10_000,
                              image_size: int = 64, seed: int = 0) -> dict:
    """Accuracy of answer-prior baselines on the questions of samples ``0 .. num_samples-1``.

    Args:
      image_size: accepted for symmetry with the other helpers; the answers do
        not depend on it (no image is rendered).

    Returns:
      ``{"majority_answer": str, "majority_accuracy": float,
      "per_type_prior_accuracy": float}``: the single most frequent answer over
      all questions and its accuracy, and the accuracy of answering every
      question with the most frequent answer of its type.
    """
    del image_size
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    overall, per_type = collections.Counter(), collections.defaultdict(collections.Counter)
    for i in range(num_samples):
        for q in sample_qa(i, split, seed):
            overall[q["answer"]] += 1
            per_type[q["type"]][q["answer"]] += 1
    total = sum(overall.values())
    answer, hits = overall.most_common(1)[0]
    prior_hits = sum(c.most_common(1)[0][1] for c in per_type.values())
    return {"majority_answer": answer, "majority_accuracy": hits / total,
            "per_type_prior_accuracy": prior_hits / total}


def make_batch(indices, split: str = "train", image_size: int = 64, seed: int = 0):
    """Samples ``indices`` stacked: images uint8 ``[N, H, W, 3]``, labels int32 ``[N]``,
    captions list of N str."""
    samples = [make_sample(int(i), split, image_size, seed) for i in indices]
    images = np.stack([s["image"] for s in samples]) if samples else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    labels = np.array([s["label"] for s in samples], np.int32)
    return images, labels, [s["caption"] for s in samples]


def encode_image(image: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """uint8 ``[H, W, 3]`` -> the bytes of a ``"jpg"`` (quality 95) or ``"png"`` file, as
    the built-in shards hold them."""
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    elif image_format == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    return buf.getvalue()


def write_synthetic_shards(out_dir: str, split: str = "train", num_samples: int = 10_000,
                           image_size: int = 64, samples_per_shard: int = 1_000,
                           seed: int = 0, image_format: str = "jpg",
                           prefix: str | None = None, progress=None) -> list[str]:
    """Writes samples ``0 .. num_samples-1`` of ``split`` as webdataset shards.

    ``progress``, if given, is called with the number of samples written so far
    after each sample.

    Members per sample: ``{key}.{jpg|png}``, ``{key}.txt`` (caption),
    ``{key}.cls`` (label) and ``{key}.json`` ({"caption", "label",
    "classname", "qa", "conversations", "scene", "full_caption"}: samples of one
    scene are one group, see ``data.train.group_key``; ``conversations`` holds the
    ``qa`` turns in LLaVA's layout, human question then gpt answer, for the
    instruction-tuning recipes); ``sizes.json`` lists the shards. Shards are named
    ``{prefix or split}-000000.tar``, ...

    Returns:
      the shard paths, in order.
    """
    from mmjax.data.writer import ShardWriter

    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    encode_image(np.zeros((1, 1, 3), np.uint8), image_format)  # validate early
    with ShardWriter(out_dir, max_count=samples_per_shard, max_bytes=1 << 40,
                     prefix=prefix or split) as writer:
        for i in range(num_samples):
            s = make_sample(i, split, image_size, seed)
            writer.write({
                "__key__": f"{i:09d}",
                image_format: encode_image(s["image"], image_format),
                "txt": s["caption"],
                "cls": s["label"],
                "json": {"caption": s["caption"], "label": s["label"],
                         "classname": s["classname"], "qa": s["qa"],
                         "conversations": conversations(s["qa"]), "scene": s["scene"],
                         "full_caption": s["full_caption"]},
            })
            if progress is not None:
                progress(i + 1)
    return writer.shards


def conversations(qa: list[dict]) -> list[dict]:
    """`qa` pairs -> LLaVA `conversations` turns: `{"from": "human", "value": question}`,
    `{"from": "gpt", "value": answer}`, ... (the same text, no `<image>` marker)."""
    return [turn for q in qa for turn in ({"from": "human", "value": q["question"]},
                                           {"from": "gpt", "value": q["answer"]})]


def ensure_synthetic_shards(cache_dir: str, split: str = "train", num_samples: int = 10_000,
                            image_size: int = 64, samples_per_shard: int = 1_000,
                            seed: int = 0, image_format: str = "jpg",
                            log_every_s: float = 5.0) -> list[str]:
    """Shards of the synthetic set, written once into ``cache_dir`` and reused.

    Writing them logs a line through the ``mmjax`` logger when it starts, then
    every ``log_every_s`` seconds (samples written, rate, ETA) and at the end.

    The shards live in ``cache_dir/synthetic-{split}-{hash}`` where the hash
    covers every parameter and the generator version. They are written to a
    temporary folder and renamed into place, so concurrent callers (several
    processes of one job) never see a partial set; the loser of the race
    discards its copy.

    Returns:
      the shard paths, in order.
    """
    params = dict(version=GENERATOR_VERSION, split=split, num_samples=int(num_samples),
                  image_size=int(image_size), samples_per_shard=int(samples_per_shard),
                  seed=int(seed), image_format=image_format)

    def write(folder, progress):
        write_synthetic_shards(folder, split, num_samples, image_size, samples_per_shard, seed,
                               image_format, progress=progress)
    return cached_shards(cache_dir, f"synthetic-{split}", params, write,
                         what=f"built-in {split} data", detail=f", {image_size}px",
                         log_every_s=log_every_s)
