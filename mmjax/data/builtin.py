"""The built-in datasets (`shards="synthetic"`), one per media kind.

The modality of the model's tower picks the generator: "image" (coloured
shapes, `mmjax.data.synthetic`), "audio", "video" and whatever else is
registered in `BUILTIN` (`mmjax.registry.register_tower(..., builtin=...)`).
Shards are written once into the cache (`$MMJAX_CACHE`, default
`~/.cache/mmjax`) and reused; `config.synthetic` sets their size.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from mmjax.data.cache import cached_shards
from mmjax.errors import ConfigError

# modality -> (shards, classnames): `shards(cache_dir, split, synthetic_config, seed) ->
# [shard paths]` and the names of its `cls` labels (for zero-shot evals), each the
# object itself or a "module:name" reference imported on first use.
BUILTIN = {
    "image": ("mmjax.data.builtin:image_shards", "mmjax.data.synthetic:CLASSNAMES"),
    "video": ("mmjax.data.builtin:video_shards", "mmjax.data.synthetic_video:CLASSES"),
    "audio": ("mmjax.data.builtin:audio_shards", "mmjax.data.synthetic_audio:CLASSES"),
}


def cache_dir() -> str:
    """Where built-in shards are cached: `$MMJAX_CACHE` or `~/.cache/mmjax`."""
    return os.environ.get("MMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmjax"))


def image_shards(cache: str, split: str, syn: Any, seed: int = 0) -> list[str]:
    from mmjax.data.synthetic import ensure_synthetic_shards
    return ensure_synthetic_shards(
        cache, split, num_samples=int(syn[f"{split}_samples"]),
        image_size=int(syn.image_size), samples_per_shard=int(syn.samples_per_shard), seed=seed)


def audio_shards(cache: str, split: str, syn: Any, seed: int = 0) -> list[str]:
    """Procedural sounds (`mmjax.data.synthetic_audio`): `syn.audio_seconds` at
    `syn.audio_sample_rate`."""
    from mmjax.data.synthetic_audio import ensure_audio_shards
    return ensure_audio_shards(cache, split, num_samples=int(syn[f"{split}_samples"]),
                               sample_rate=int(syn.audio_sample_rate),
                               seconds=float(syn.audio_seconds),
                               samples_per_shard=int(syn.samples_per_shard), seed=seed)


def video_shards(cache: str, split: str, syn: Any, seed: int = 0) -> list[str]:
    """Moving shapes (`mmjax.data.synthetic_video`): `syn.video_frames` frames of
    `syn.image_size` px per clip."""
    from mmjax.data.synthetic_video import write_video_shards
    params = dict(kind="video", version=3, split=split, num_samples=int(syn[f"{split}_samples"]),
                  frames=int(syn.video_frames), size=int(syn.image_size),
                  samples_per_shard=int(syn.samples_per_shard), seed=seed)

    def write(folder, progress):
        write_video_shards(folder, params["num_samples"], params["frames"], params["size"],
                           samples_per_shard=params["samples_per_shard"], seed=seed, split=split,
                           progress=progress)
    return cached_shards(cache, f"synthetic-video-{split}", params, write,
                         what=f"built-in {split} video clips")


def builtin_shards(config: Any, split: str, modality: str) -> list[str]:
    """Shard paths of the built-in `split` ("train" or "test") of `modality` (the
    model's tower's), sized by `config.synthetic`."""
    return _resolve(_entry(modality)[0])(cache_dir(), split, config.synthetic, 0)


def builtin_classnames(modality: str) -> list[str]:
    """Class names of the built-in data of `modality` (index = `cls` label)."""
    return list(_resolve(_entry(modality)[1]))


def _entry(modality: str) -> tuple:
    if modality not in BUILTIN:
        raise ConfigError(f"shards='synthetic': no built-in data for the model's {modality} "
                          f"tower (have {sorted(BUILTIN)}); give data.train.shards.")
    return BUILTIN[modality]


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
