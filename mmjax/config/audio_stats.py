"""Log-mel statistics of a run's own audio, measured when the run starts.

An AST tower (`mmjax.models.ast`) normalizes its log-mel as `(x - spec_mean) /
(2 * spec_std)`; the defaults are AST's AudioSet numbers. A training config that
sets `spec_mean=None` / `spec_std=None` gets them from its data instead:
`fill_spectrogram_stats` reads the first `clips` clips of `data.train.shards` (in
shard order, centre crops: the same clips, hence the same numbers, in every
process of a job), computes the tower's log-mel and writes the mean and standard
deviation over all frames and mel bins into the config, so the run's saved
config (and every later eval or resume) holds them.
"""
from __future__ import annotations

import logging
import types
from typing import Any

import numpy as np

from mmjax.errors import ConfigError

log = logging.getLogger("mmjax")


def unset_sections(config: Any) -> list[str]:
    """Names of the `config.model` sections of AST towers whose `spec_mean` or
    `spec_std` is None under `spec_norm="fixed"`."""
    out = []
    for name, section in config.model.items():
        if not hasattr(section, "get") or section.get("kind") != "ast":
            continue
        if section.get("spec_norm", "fixed") != "fixed":
            continue
        if ("spec_mean" in section and section.spec_mean is None) or \
                ("spec_std" in section and section.spec_std is None):
            out.append(name)
    return out


def read_clips(shards: list[str], clips: int, sample_rate: int, seconds: float) -> np.ndarray:
    """The first `clips` decodable audio members of `shards` (in order), centre-cropped
    or zero-padded to `seconds` at `sample_rate` -> float32 `[N, S]`. Samples whose
    audio does not decode are skipped; ConfigError when none does."""
    from mmjax.data.audio import AUDIO_EXTS, decode_audio
    from mmjax.data.bad import BadSample
    from mmjax.data.sources import open_shard
    from mmjax.data.tario import ShardReadError, iter_tar_samples
    options = types.SimpleNamespace(sample_rate=sample_rate, clip_seconds=seconds,
                                    augment="center")
    waves: list[np.ndarray] = []
    for path in shards:
        try:
            with open_shard(path) as f:
                for _, _, members in iter_tar_samples(f):
                    ext = next((e for e in members if e.lower() in AUDIO_EXTS), None)
                    if ext is None:
                        continue
                    try:
                        waves.append(decode_audio(members[ext], ext.lower(), None, options))
                    except BadSample:
                        continue
                    if len(waves) >= clips:
                        return np.stack(waves)
        except (OSError, ShardReadError):
            continue  # the training pipeline reports unreadable shards
    if not waves:
        raise ConfigError("spec_mean / spec_std = None: no audio clip could be read from "
                          "config.data.train.shards to measure them; fix the shards or set "
                          "both numbers (--config.model.image.spec_mean=..., spec_std=...).")
    return np.stack(waves)


def spectrogram_stats(section: Any, waves: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the un-normalized log-mel of `waves [N, S]`
    under the tower config `section` (over clips, frames and mel bins)."""
    import jax
    from mmjax.models.ast import AST
    fields = {k: v for k, v in dict(section).items() if k != "kind" and k in AST.__dataclass_fields__}
    tower = AST(**dict(fields, spec_norm="fixed", spec_mean=0.0, spec_std=0.5))
    spec = jax.jit(lambda w: tower.apply({}, w, method="spectrogram"))
    total = total_sq = 0.0
    count = 0
    for i in range(0, len(waves), 128):
        s = np.asarray(spec(waves[i:i + 128]), np.float64)
        total, total_sq, count = total + s.sum(), total_sq + (s ** 2).sum(), count + s.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12)))


def fill_spectrogram_stats(config: Any, clips: int = 512) -> None:
    """Fills `spec_mean` / `spec_std` of the AST sections that leave them None (see
    the module docstring), in `config` itself. No-op without such a section."""
    names = unset_sections(config)
    if not names:
        return
    from mmjax.data.sources import expand_shards
    d = config.data.train
    if d.shards == "synthetic":
        from mmjax.data.builtin import builtin_shards
        shards = builtin_shards(config, "train", "audio")
    else:
        shards = expand_shards(d.shards)
    waves = read_clips(shards, clips, int(d.sample_rate), float(d.clip_seconds))
    for name in names:
        mean, std = spectrogram_stats(config.model[name], waves)
        config.model[name].spec_mean = round(mean, 5)
        config.model[name].spec_std = round(std, 5)
        log.info(f"model.{name}.spec_mean / spec_std measured on {len(waves)} clips of "
                 f"data.train.shards: {mean:.4f} / {std:.4f} (kept in the run's config)")
