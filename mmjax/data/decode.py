"""Image decoding and augmentation: DCT-scaled JPEG decode, crops, normalization.

The crop is chosen first, from the image header alone (size known before any
pixel is decoded); then a JPEG is decoded at the smallest DCT scale (1/2,
1/4, 1/8) that keeps the crop at least ``size`` pixels on each side (by
libjpeg-turbo through ``simplejpeg``, else Pillow's draft mode; other formats
by Pillow), and only the crop box is resampled to ``size x size`` (one OpenCV
bilinear warp when the remaining shrink is below 2, else Pillow's
antialiased filter). For web images that are several times the training
resolution this skips most of the decode work, which dominates an input
pipeline's CPU time.

All randomness comes from a ``numpy.random.Generator`` passed in, which the
pipeline derives per sample from (seed, epoch, shard, index), so decoding the
same sample twice gives the same pixels.
"""
from __future__ import annotations

import importlib
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from mmjax.errors import ConfigError

# CLIP's normalization constants (RGB, on a 0..1 scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESAMPLE = Image.BILINEAR


class ImageTooLarge(ValueError):
    """The image header declares more pixels than the configured limit."""


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3),
                            ) -> tuple[int, int, int, int]:
    """Crop box ``(left, top, w, h)`` with torchvision RandomResizedCrop rules.

    Up to 10 tries: area fraction uniform in ``scale``, aspect ratio
    log-uniform in ``ratio``; the first box that fits is placed uniformly.
    Otherwise a center crop at the nearest allowed aspect ratio.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square ``(left, top, side, side)``: resize-shorter-side then
    center-crop, expressed as one box in source pixels."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def draft_factor(crop_w: int, crop_h: int, size: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) keeping the crop >= ``size`` px."""
    for k in (8, 4, 2):
        if crop_w // k >= size and crop_h // k >= size:
            return k
    return 1


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Opens (does not decode) an image; checks the pixel count from its header."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit "
                            f"{max_pixels} (data.train.max_pixels)")
    return img


def to_8_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (mode ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``,
    or ``I``, Pillow's 32-bit integer mode, read as 16-bit values as 16-bit PNGs
    give them) -> mode ``L`` with ``round(v / 257)``: 0 -> 0, 65535 -> 255, an
    8-bit value widened by x257 comes back exactly. Values outside 0..65535 are
    clipped. (Pillow's own ``convert`` clips at 255, making images nearly white.)
    48-bit RGB PNGs need nothing: Pillow reads them as 8-bit ``RGB``, within 1
    of this scaling."""
    values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # mode L


def decode_and_crop(data: bytes, size: int, rng: np.random.Generator | None, *,
                    augment: str = "rrc", scale: Sequence[float] = (0.9, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = False,
                    max_pixels: int | None = None, use_draft: bool = True,
                    ) -> tuple[np.ndarray, int]:
    """Decodes encoded image bytes into a ``[size, size, 3]`` uint8 crop.

    Args:
      data: encoded image (JPEG, PNG, WebP, ... anything PIL opens).
      size: output side in pixels.
      rng: source of randomness for "rrc" and flips (None: no flip, and
        "rrc" is not allowed).
      augment: "rrc" (random resized crop) or "center" (eval crop).
      scale, ratio: RandomResizedCrop area-fraction and aspect ranges.
      flip: random horizontal flip with probability 1/2.
      max_pixels: skip images whose header declares more pixels.
      use_draft: decode JPEGs in draft (DCT-scaled) mode when it helps.

    Returns:
      ``(image [size, size, 3] uint8, draft scale used)``.

    Raises:
      ImageTooLarge, or PIL/OSError errors for corrupt or truncated data.
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    if augment == "rrc":
        if rng is None:
            raise ValueError("augment='rrc' needs an rng")
        left, top, cw, ch = random_resized_crop_box(width, height, rng, scale, ratio)
    elif augment == "center":
        left, top, cw, ch = center_crop_box(width, height)
    else:
        raise ConfigError(f"data.train.augment must be 'rrc' or 'center', got {augment!r}")
    factor, pixels = 1, None
    if img.format == "JPEG":
        k = draft_factor(cw, ch, size) if use_draft else 1
        pixels = _turbo_decode(data, -(-width // k), -(-height // k))
        if pixels is not None:
            factor = max(1, round(width / pixels.shape[1]))
        elif k > 1:
            # Requesting (W // k, H // k) makes PIL pick exactly scale k.
            img.draft("RGB", (width // k, height // k))
            factor = max(1, round(width / img.size[0]))
    if pixels is None:
        if img.mode == "I" or img.mode.startswith("I;16"):
            img = to_8_bit(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = img
    out_w, out_h = (pixels.shape[1], pixels.shape[0]) if isinstance(pixels, np.ndarray) \
        else pixels.size
    sx, sy = out_w / width, out_h / height
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    # Draw the flip before resampling (same random stream as flipping after).
    flipped = bool(flip and rng is not None and rng.random() < 0.5)
    return resample_box(pixels, box, size, flip=flipped), factor


def _turbo_decode(data: bytes, min_width: int, min_height: int) -> np.ndarray | None:
    """RGB uint8 ``[h, w, 3]`` of a JPEG through libjpeg-turbo (``simplejpeg``)
    at the smallest DCT scale with ``w >= min_width`` and ``h >= min_height``
    (so exactly 1/k for ``min = ceil(size / k)``); None when simplejpeg is not
    installed or cannot decode it (CMYK, corrupt, truncated: Pillow then
    decodes it or raises). Same pixels as Pillow's draft decode, without
    Pillow's 4-byte-per-pixel buffer and its copy out."""
    sj = _optional("simplejpeg")
    if sj is None:
        return None
    try:
        return sj.decode_jpeg(data, "RGB", min_width=min_width, min_height=min_height)
    except ValueError:
        return None


def resample_box(img: Image.Image | np.ndarray, box: Sequence[float], size: int, *,
                 flip: bool = False) -> np.ndarray:
    """Resamples the sub-pixel ``box`` (left, top, right, bottom) of an RGB
    image (PIL, or uint8 ``[H, W, 3]``) to ``[size, size, 3]`` uint8,
    optionally mirrored left-right.

    When the box shrinks by at most ``MAX_LINEAR_SHRINK`` per axis (the
    usual case after a draft decode, whose DCT scaling already low-passed
    the image), one OpenCV bilinear warp does it: 5-6x faster than Pillow's
    two-pass antialiased resize, and within ~0.6 dB PSNR of it against a
    Lanczos reference (benchmarks/input_pipeline.py). Larger shrinks, or no
    OpenCV, use Pillow's antialiased bilinear filter.
    """
    left, top, right, bottom = box
    fx, fy = (right - left) / size, (bottom - top) / size
    cv2 = _optional("cv2")
    if cv2 is not None and max(fx, fy) <= MAX_LINEAR_SHRINK:
        # Inverse map: output pixel centre (u + 0.5) -> source left + (u + 0.5) * fx
        # in pixel-edge coordinates, i.e. minus 0.5 in OpenCV's centre coordinates.
        if flip:
            m = [[-fx, 0.0, right - 0.5 * fx - 0.5], [0.0, fy, top + 0.5 * fy - 0.5]]
        else:
            m = [[fx, 0.0, left + 0.5 * fx - 0.5], [0.0, fy, top + 0.5 * fy - 0.5]]
        return cv2.warpAffine(np.ascontiguousarray(img), np.asarray(m, np.float32), (size, size),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    out = img.resize((size, size), RESAMPLE, box=tuple(box))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


# A plain bilinear warp reads 2 source pixels per output pixel and axis, so
# it only stays alias-free for shrinks below 2; draft decoding leaves < 2.
MAX_LINEAR_SHRINK = 2.0
_OPTIONAL: dict = {}


def _optional(name: str):
    """``cv2`` or ``simplejpeg``, imported once (OpenCV limited to one thread:
    the pipeline's parallelism is its worker processes); None when missing."""
    if name not in _OPTIONAL:
        try:
            module = importlib.import_module(name)
            if name == "cv2":
                module.setNumThreads(1)
        except ImportError:
            module = None
        _OPTIONAL[name] = module
    return _OPTIONAL[name]


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std``, on the host."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((images.astype(np.float32) * np.float32(1 / 255)) - mean) / std


def normalize_on_device(images, mean: Sequence[float], std: Sequence[float]):
    """uint8 ``[B, H, W, 3]`` jax array -> float32 normalized, on the device.

    Use with ``output="uint8"``: the host ships 4x fewer bytes and the device
    does this elementwise step (fused into the first conv/patch embedding).
    """
    import jax.numpy as jnp
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) * (1 / 255) - mean) / std
