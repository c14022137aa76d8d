"""Media registry: which member of a sample is its media, and how it becomes an array.

The model's media tower names an entry of ``MEDIA`` (its ``modality``; towers
and their media are registered together: ``mmjax.registry.register_tower``). An
entry says
which member extensions hold the media (the first one present is used), the
batch key, and, as ``"module:function"`` strings imported on first use (in
each worker process), how to decode one sample and how to stack a batch:

* ``decode(data: bytes, ext: str, rng: np.random.Generator, options) ->
  np.ndarray``: one sample; ``options`` is the iterator's ``DataOptions``
  (``image_size``, ``augment``, ``sample_rate``, ``clip_seconds``,
  ``num_frames``, ``mode``, ...), ``rng`` is seeded by the sample's place in
  the stream, so a resumed run decodes identical arrays. A sample that cannot
  be used raises ``mmjax.data.bad.BadSample(reason, message)``: the pipeline
  skips it and counts it under ``reason`` (``data.train.max_bad_fraction``).
  Other exceptions are bugs and stop the run.
* ``stack(arrays: list[np.ndarray], options) -> np.ndarray``: the batch
  ``[B, ...]`` (e.g. normalized float32 pixels).

A sample without any of the entry's members is counted as ``no_<modality>``.
Text (caption, caption list, dialog) and ``cls`` labels are read the same way
for every modality (``mmjax.data.samples``).

A new modality is one spec, e.g.::

    MediaSpec("audio", ("flac", "wav", "mp3", "ogg"),
              "mmjax.data.audio:decode_audio")   # float32 [B, num_samples]
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Sequence

import numpy as np

from mmjax.data import decode as decode_lib
from mmjax.data.bad import BadSample
from mmjax.data.tario import IMAGE_EXTS
from mmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MediaSpec:
    """One modality: member extensions, decoder, batch stacking, batch key.

    Attributes:
      name: the modality (a tower's ``modality``).
      exts: member extensions (lower case, no dot), in order of preference.
      decoder: ``"module:function"`` of ``decode(data, ext, rng, options)``.
      stacker: ``"module:function"`` of ``stack(arrays, options)``.
      key: the batch key (default: ``name``).
    """
    name: str
    exts: tuple[str, ...]
    decoder: str
    stacker: str = "mmjax.data.media:stack_arrays"
    key: str | None = None

    @property
    def batch_key(self) -> str:
        """Key of the stacked media in each batch."""
        return self.key or self.name

    @property
    def missing_reason(self) -> str:
        """Bad-sample reason of a sample with none of ``exts``: ``no_<name>``."""
        return f"no_{self.name}"

    def find(self, members: dict[str, bytes]) -> tuple[str, bytes] | None:
        """``(ext, bytes)`` of the first of ``exts`` among a sample's members, or None."""
        return next(((e, members[e]) for e in self.exts if e in members), None)

    def decode(self, data: bytes, ext: str, rng: np.random.Generator, options) -> np.ndarray:
        """One sample's array (may raise ``BadSample``)."""
        return load_function(self.decoder)(data, ext, rng, options)

    def stack(self, arrays: Sequence[np.ndarray], options) -> np.ndarray:
        """The batch ``[B, ...]`` of decoded samples."""
        return load_function(self.stacker)(list(arrays), options)


@functools.lru_cache(maxsize=None)
def load_function(ref: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (imported once per process)."""
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"media function reference {ref!r} is not 'module:function'")
    return getattr(importlib.import_module(module), name)


def decode_image(data: bytes, ext: str, rng: np.random.Generator | None,
                 options) -> np.ndarray:
    """Encoded image -> uint8 ``[S, S, 3]`` (``S = options.image_size``), cropped by
    ``options.augment`` (``rrc`` draws from ``rng``), ``crop_scale``,
    ``crop_ratio``, ``flip``.

    Raises ``BadSample``: ``too_many_pixels`` when the header declares more than
    ``options.max_pixels``, ``corrupt_image`` when it does not decode.
    """
    try:
        image, _ = decode_lib.decode_and_crop(
            data, options.image_size, rng, augment=options.augment,
            scale=options.crop_scale, ratio=options.crop_ratio, flip=options.flip,
            max_pixels=options.max_pixels)
    except decode_lib.ImageTooLarge as e:
        raise BadSample("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return image


def stack_pixels(arrays: list[np.ndarray], options) -> np.ndarray:
    """uint8 ``[..., 3]`` arrays -> ``[B, ..., 3]``: uint8 with
    ``options.output="uint8"``, else float32 ``(x / 255 - mean) / std``."""
    out = np.stack(arrays)
    if options.output == "float32":
        out = decode_lib.normalize(out, options.mean, options.std)
    return out


def stack_arrays(arrays: list[np.ndarray], options) -> np.ndarray:
    """Arrays of one shape -> ``[B, ...]``, dtype kept."""
    return np.stack(arrays)


MEDIA: dict[str, MediaSpec] = {
    "image": MediaSpec("image", IMAGE_EXTS, "mmjax.data.media:decode_image",
                       "mmjax.data.media:stack_pixels"),  # [B, S, S, 3]
    "video": MediaSpec("video", ("mp4", "webm", "mkv", "avi"), "mmjax.data.video:decode_video",
                       "mmjax.data.media:stack_pixels"),  # [B, T, S, S, 3]
    "audio": MediaSpec("audio", ("flac", "wav", "ogg", "mp3"), "mmjax.data.audio:decode_audio",
                       "mmjax.data.media:stack_arrays"),  # [B, num_samples] float32
}


def get_media_spec(modality: str) -> MediaSpec:
    """The ``MEDIA`` entry of a modality; ``ConfigError`` if none is registered."""
    spec = MEDIA.get(modality) if isinstance(modality, str) else None
    if spec is None:
        raise ConfigError(f"no media decoder is registered for modality {modality!r} (have "
                          f"{', '.join(repr(m) for m in sorted(MEDIA))}); register the "
                          "tower with its media (mmjax.registry.register_tower).")
    return spec
