"""Log-mel normalisation of the AST tower: per clip ("example") and measured on the
run's data (`spec_mean=None`, `mmjax.config.audio_stats`)."""
import json

import numpy as np
import pytest

from mmjax.config.audio_stats import fill_spectrogram_stats
from mmjax.data.synthetic_audio import write_audio_shards
from mmjax.errors import ConfigError
from mmjax.models.ast import AST


def _raw_log_mel(waves, **fields):
    """The un-normalized log-mel, from `mmjax.models.audio.log_mel` directly."""
    from mmjax.models import audio
    t = AST(**fields)
    spec = audio.log_mel(waves, sample_rate=t.sample_rate, n_fft=t.n_fft,
                         hop_length=t.hop_length, win_length=t.win_length, n_mels=t.n_mels,
                         f_min=t.f_min, f_max=t.f_max, mel_scale=t.mel_scale,
                         mel_norm=t.mel_norm, center=t.center, pad_mode=t.pad_mode, log=t.log,
                         top_db=t.top_db)
    return np.asarray(spec)[:, :t.frames]


def test_example_norm_standardizes_each_clip_and_ignores_the_level():
    rng = np.random.default_rng(0)
    fields = dict(sample_rate=8000, clip_seconds=0.5, n_mels=32)
    waves = (rng.standard_normal((3, 4000)) * np.array([[1.0], [0.1], [0.01]])).astype(np.float32)
    waves[:, 1000:2000] += np.sin(np.arange(1000) * 0.3).astype(np.float32)[None]
    raw = _raw_log_mel(waves, **fields)
    got = np.asarray(AST(**fields, spec_norm="example").apply({}, waves, method="spectrogram"))
    want = (raw - raw.mean((1, 2), keepdims=True)) / (2 * raw.std((1, 2), keepdims=True))
    np.testing.assert_allclose(got, want, atol=2e-4)
    np.testing.assert_allclose(got.mean((1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(got.std((1, 2)), 0.5, atol=1e-4)
    # the same clip 40 dB quieter (every bin above the log floor): the same input
    clean = (0.3 * rng.standard_normal((1, 4000)) + np.sin(np.arange(4000) * 0.2)[None])
    clean = clean.astype(np.float32)
    a, b = (np.asarray(AST(**fields, spec_norm="example").apply({}, c, method="spectrogram"))
            for c in (clean, clean * np.float32(0.01)))
    np.testing.assert_allclose(a, b, atol=1e-3)
    fixed = [np.asarray(AST(**fields).apply({}, c, method="spectrogram"))
             for c in (clean, clean * np.float32(0.01))]
    assert np.abs(fixed[0] - fixed[1]).mean() > 0.4  # ln(1e4) / (2 * AST_STD)


def test_unknown_norm_and_unset_numbers_name_the_key():
    w = np.zeros((1, 4000), np.float32)
    with pytest.raises(ConfigError, match="spec_norm"):
        AST(sample_rate=8000, clip_seconds=0.5, n_mels=32, spec_norm="batch").apply(
            {}, w, method="spectrogram")
    with pytest.raises(ConfigError, match="spec_mean"):
        AST(sample_rate=8000, clip_seconds=0.5, n_mels=32, spec_mean=None).apply(
            {}, w, method="spectrogram")


def test_none_statistics_are_measured_on_the_first_clips_of_the_shards(tmp_path):
    """`fill_spectrogram_stats` == mean / std of the log-mel of the first N clips,
    recomputed here from the shards' FLAC members; a corrupt member is skipped."""
    import io
    import tarfile

    import soundfile as sf
    from mmjax.config.defaults import base_config
    from mmjax.data.writer import ShardWriter
    folder = tmp_path / "shards"
    write_audio_shards(str(folder), num_samples=12, sample_rate=8000, seconds=0.5,
                       samples_per_shard=6)
    with ShardWriter(str(tmp_path / "bad"), max_count=10, max_bytes=1 << 30, prefix="bad") as w:
        w.write({"__key__": "x", "flac": b"not audio", "txt": "broken"})
    c = base_config()
    c.data.train.shards = f"{tmp_path}/bad/bad-000000.tar::{folder}/train-{{000000..000001}}.tar"
    c.data.train.sample_rate, c.data.train.clip_seconds = 8000, 0.5
    c.model.name = "two_tower"
    c.model.image = dict(kind="ast", sample_rate=8000, clip_seconds=0.5, n_mels=32,
                         spec_mean=None, spec_std=None)
    fill_spectrogram_stats(c, clips=8)
    waves = []
    for path in sorted(folder.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.name.endswith(".flac"):
                    waves.append(sf.read(io.BytesIO(tar.extractfile(m).read()),
                                         dtype="float32")[0])
    raw = _raw_log_mel(np.stack(waves[:8]), sample_rate=8000, clip_seconds=0.5, n_mels=32)
    assert c.model.image.spec_mean == pytest.approx(raw.mean(), abs=1e-4)
    assert c.model.image.spec_std == pytest.approx(raw.std(), abs=1e-4)
    assert abs(c.model.image.spec_mean - (-4.2677393)) > 0.1  # not AST's AudioSet numbers
    json.dumps(c.to_dict())  # plain floats, saved with the run's config
