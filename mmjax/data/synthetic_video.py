"""Built-in synthetic video-text dataset: a coloured shape moving across a grey frame.

Classes are colour (red, green, blue) x shape (circle, square) x motion
(moving left, right, up, down): 24 classes, class name e.g.
``"red circle moving left"``; captions name all three in one of several
phrasings (``"a red circle moving left"``, ``"a video of a red circle moving
to the left"``, ...).

Only the motion tells apart the four classes of one colour and shape, and no
single frame shows it: the shape crosses the frame in a straight line at a
constant velocity, staying whole inside it, along a path drawn uniformly among
the paths that fit; moving left is moving right played backwards (and up is
down backwards), so the position in one frame has the same distribution for
both directions of an axis. A model that pools frames without their order
(mean pooling) can tell horizontal from vertical motion at best, not the
direction; a temporal model over the frames can.

Per clip: size, start, speed (0.025-0.045 of the frame per frame), shade of
the colour, background grey and pixel noise vary. Clips are a pure function
of ``(seed, split, index)``; each split is its own random stream.
"""
from __future__ import annotations

import io
import zlib
from typing import Mapping

import numpy as np

from mmjax.errors import ConfigError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 80, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square")
MOTIONS: dict[str, tuple[int, int]] = {  # name -> unit velocity (x right, y down)
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
}
CLASSES: list[str] = [f"{c} {s} moving {m}" for c in COLORS for s in SHAPES for m in MOTIONS]
"""Label i -> class name; label = (colour * len(SHAPES) + shape) * len(MOTIONS) + motion."""

_TEMPLATES = (
    "a {c} {s} moving {m}", "a video of a {c} {s} moving {m}", "a {c} {s} moves {to}{m}",
    "a {c} {s} moving {to}{m}", "a clip of a {c} {s} going {m}",
)
_SUPERSAMPLE = 2  # render at 2x and average: smooth edges without a drawing library
SIZE_RANGE = (0.28, 0.4)      # object side, fraction of the frame
SPEED_RANGE = (0.025, 0.045)  # frame widths per frame


def class_params(label: int) -> dict:
    """``{"color", "shape", "motion"}`` names of class ``label`` (index into ``CLASSES``)."""
    if not 0 <= int(label) < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    color, shape, _, motion = CLASSES[int(label)].split(" ")
    return {"color": color, "shape": shape, "motion": motion}


def class_label(params: Mapping) -> int:
    """Index into ``CLASSES`` of ``{"color", "shape", "motion"}``."""
    return CLASSES.index(f"{params['color']} {params['shape']} moving {params['motion']}")


def render_clip(params: Mapping, rng: np.random.Generator, frames: int = 16,
                size: int = 32) -> np.ndarray:
    """Frames of one clip: uint8 ``[frames, size, size, 3]``.

    ``params`` names the class (``{"color", "shape", "motion"}``); ``rng``
    draws everything else: object size, shade, background, start position
    (uniform among the paths that keep it whole), speed, noise. The object moves
    ``speed`` frame widths per frame along its motion (slower in clips too long
    for the path to fit at that speed).
    """
    if frames < 2 or size < 8:
        raise ConfigError(f"a synthetic clip needs frames >= 2 and size >= 8, got "
                          f"frames={frames}, size={size}")
    vx, vy = MOTIONS[params["motion"]]
    shape = params["shape"]
    side = rng.uniform(*SIZE_RANGE)                    # object size, fraction of the frame
    start, across = rng.uniform(0, 1, 2)
    speed = rng.uniform(*SPEED_RANGE)
    lo, hi = side / 2, 1 - side / 2                    # centre positions that keep it whole
    speed = min(speed, (hi - lo) / (frames - 1))        # long clips: slower, still whole
    travel = speed * (frames - 1)
    first = lo + (hi - lo - travel) * start            # path [first, first + travel]
    along = first + speed * np.arange(frames)          # moving right / down
    if vx + vy < 0:
        along = along[::-1]                            # left / up: the same path backwards
    across = lo + (hi - lo) * across
    rgb = np.clip(np.array(COLORS[params["color"]]) + rng.uniform(-18, 18, 3), 0, 255)
    background = rng.uniform(95, 165) + rng.uniform(-8, 8, 3)

    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(coords, coords)
    out = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        cx, cy = (along[f], across) if vx else (across, along[f])
        dx, dy = xx - cx, yy - cy
        if shape == "circle":
            mask = dx * dx + dy * dy <= (side / 2) ** 2
        else:
            mask = np.maximum(np.abs(dx), np.abs(dy)) <= side / 2 * 0.9
        canvas = np.empty((n, n, 3), np.float32)
        canvas[:] = background
        canvas[mask] = rgb
        out[f] = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean((1, 3))
    out += rng.normal(0, 4, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _sample_rng(index: int, split: str, seed: int) -> np.random.Generator:
    if not split or not isinstance(split, str):
        raise ValueError(f"split must be a non-empty string like 'train', got {split!r}")
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def make_clip(index: int, split: str = "train", frames: int = 16, size: int = 32,
              seed: int = 0) -> dict:
    """One sample, deterministic in ``(seed, split, index)``: ``{"frames" uint8
    [F, S, S, 3], "caption", "label", "classname", "params"}``."""
    rng = _sample_rng(index, split, seed)
    label = int(rng.integers(len(CLASSES)))
    params = class_params(label)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    caption = template.format(c=params["color"], s=params["shape"], m=params["motion"],
                              to="to the " if params["motion"] in ("left", "right") else "")
    return {"frames": render_clip(params, rng, frames, size), "caption": caption,
            "label": label, "classname": CLASSES[label], "params": params}


def video_codec() -> str:
    """The encoder used for the clips: ``libx264`` if this PyAV build has it, else ``mpeg4``."""
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # av raises UnknownCodecError (or ValueError) for a missing encoder
            continue
    raise ConfigError("this PyAV (FFmpeg) build has neither the libx264 nor the mpeg4 "
                      "encoder; install PyAV from PyPI (`pip install av`)")


def encode_mp4(frames: np.ndarray, fps: int = 8, codec: str | None = None) -> bytes:
    """uint8 ``[F, H, W, 3]`` (H, W even) -> MP4 bytes (single-threaded, keyframe every
    8 frames, high quality), byte-identical for identical frames."""
    import av

    codec = codec or video_codec()
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ConfigError(f"video frames need an even size for yuv420p, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        opts = {"g": "8"}
        if codec == "libx264":
            # asm=0: x264's SIMD paths made the bytes vary from run to run on small frames
            # veryfast: a third of the default preset's encode time on these small clips
            opts.update({"crf": "14", "threads": "1", "x264-params": "asm=0",
                         "preset": "veryfast"})
        else:
            from av.codec.context import Flags
            stream.codec_context.flags |= int(Flags.qscale)
            stream.codec_context.global_quality = 2 * 118  # qscale 2 (FF_QP2LAMBDA = 118)
        stream.options = opts
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i  # in 1/fps (the stream's rate), set so the rate control sees the same
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_video_shards(out_dir: str, num_samples: int = 1000, frames: int = 16,
                       size: int = 32, fps: int = 8, samples_per_shard: int = 500,
                       seed: int = 0, split: str = "train", progress=None) -> list[str]:
    """Writes samples ``0 .. num_samples-1`` of ``split`` as webdataset shards
    ``{split}-000000.tar``, ... with ``sizes.json``.

    Members per sample: ``{key}.mp4`` (``frames`` frames of ``size`` px at
    ``fps``), ``{key}.txt`` (caption), ``{key}.cls`` (label into ``CLASSES``)
    and ``{key}.json`` (caption, label, classname, color, shape, motion).
    Same arguments, same bytes. ``progress``, if given, is called with the
    number of samples written after each one.

    Returns:
      the shard paths, in order.
    """
    from mmjax.data.writer import ShardWriter

    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    codec = video_codec()
    with ShardWriter(out_dir, max_count=samples_per_shard, max_bytes=1 << 40,
                     prefix=split) as writer:
        for i in range(num_samples):
            s = make_clip(i, split, frames, size, seed)
            writer.write({
                "__key__": f"{i:09d}",
                "mp4": encode_mp4(s["frames"], fps, codec),
                "txt": s["caption"],
                "cls": s["label"],
                "json": {"caption": s["caption"], "label": s["label"],
                         "classname": s["classname"], **s["params"]},
            })
            if progress is not None:
                progress(i + 1)
    return writer.shards
