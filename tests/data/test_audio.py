"""Audio: decoding (mono mix, resampling, crops, bad files), the JAX log-mel
front end against librosa, SpecAugment masks, and the synthetic audio set."""
import io
import os
import tarfile
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from mmjax.data import synthetic_audio as sa
from mmjax.data.audio import AUDIO_EXTS, decode_audio
from mmjax.data.bad import BadSample
from mmjax.models import audio

librosa = pytest.importorskip("librosa")
soxr = pytest.importorskip("soxr")


def _encode(x, rate, fmt, subtype=None):
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _stereo(seconds=1.0, rate=44100, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    left = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    right = 0.3 * np.sin(2 * np.pi * 1234 * t + 1.0)
    return np.stack([left, right], 1).astype(np.float32)


def _opts(rate, seconds, augment="center"):
    return SimpleNamespace(sample_rate=rate, clip_seconds=seconds, augment=augment)


# ----------------------------------------------------------------------------
# decode_audio
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,subtype,ext", [("FLAC", "PCM_16", "flac"), ("FLAC", "PCM_24", "flac"),
                                            ("WAV", "PCM_16", "wav"), ("WAV", "FLOAT", "wav")])
def test_stereo_is_mean_of_channels(fmt, subtype, ext):
    x = _stereo(rate=16000)
    data = _encode(x, 16000, fmt, subtype)
    got = decode_audio(data, ext, None, _opts(16000, 1.0))
    ref, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert got.dtype == np.float32 and got.shape == (16000,)
    np.testing.assert_allclose(got, ref.astype(np.float64).mean(1), atol=1e-7)
    if subtype == "FLOAT":  # float WAV is lossless: the mean of what was written
        np.testing.assert_allclose(got, x.astype(np.float64).mean(1), atol=1e-7)
    # three channels and one channel
    for y in (np.c_[x, -0.5 * x[:, :1]], x[:, :1]):
        data = _encode(y, 16000, fmt, subtype)
        ref, _ = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
        got = decode_audio(data, ext, None, _opts(16000, 1.0))
        np.testing.assert_allclose(got, ref.mean(1), atol=1e-7)


def test_resample_matches_independent_resamplers():
    x = _stereo(seconds=2.0, rate=44100)
    data = _encode(x, 44100, "WAV", "FLOAT")
    got = decode_audio(data, ".WAV", None, _opts(16000, 2.0))
    mono = x.mean(1)
    ref = soxr.resample(mono.astype(np.float64), 44100, 16000, quality="HQ")
    assert ref.shape == (32000,) and got.shape == (32000,)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # librosa's soxr_hq path: an independent call through librosa.
    ref2 = librosa.resample(mono, orig_sr=44100, target_sr=16000, res_type="soxr_hq")
    np.testing.assert_allclose(got, ref2, atol=1e-5)
    # The 440 and 1234 Hz lines survive at the new rate.
    spec = np.abs(np.fft.rfft(got))
    peaks = sorted(np.argsort(spec)[-2:] * 16000 / len(got))
    np.testing.assert_allclose(peaks, [440, 1234], atol=1)


def test_crops_and_padding():
    rate = 8000
    x = np.arange(3 * rate, dtype=np.float32) / (3 * rate)  # a ramp: position is readable
    data = _encode(x, rate, "WAV", "FLOAT")
    # centre crop: exactly the middle 1 s
    got = decode_audio(data, "wav", None, _opts(rate, 1.0))
    np.testing.assert_array_equal(got, x[rate:2 * rate])
    odd = decode_audio(data, "wav", None, _opts(rate, 1.2345))
    n = round(rate * 1.2345)
    start = (3 * rate - n) // 2
    np.testing.assert_array_equal(odd, x[start:start + n])
    # random crop: contiguous windows from the rng, different starts, reproducible
    starts = []
    for seed in range(6):
        a = decode_audio(data, "wav", np.random.default_rng(seed), _opts(rate, 1.0, "rrc"))
        b = decode_audio(data, "wav", np.random.default_rng(seed), _opts(rate, 1.0, "rrc"))
        np.testing.assert_array_equal(a, b)
        s0 = int(np.argmin(np.abs(x - a[0])))
        np.testing.assert_array_equal(a, x[s0:s0 + rate])
        starts.append(s0)
    assert len(set(starts)) == 6 and max(starts) <= 2 * rate
    # shorter than the clip: zero-padded at the end, both modes
    short = decode_audio(_encode(x[:rate // 2], rate, "WAV", "FLOAT"), "wav",
                         np.random.default_rng(0), _opts(rate, 1.0, "rrc"))
    np.testing.assert_array_equal(short[:rate // 2], x[:rate // 2])
    assert short.shape == (rate,) and not short[rate // 2:].any()
    with pytest.raises(ValueError, match="rng"):
        decode_audio(data, "wav", None, _opts(rate, 1.0, "random"))


def test_formats_decode():
    x = _stereo(rate=16000)[:, 0]
    assert set(AUDIO_EXTS) == {"flac", "wav", "ogg", "mp3"}
    for fmt, sub, ext in [("OGG", "VORBIS", "ogg"), ("MP3", "MPEG_LAYER_III", "mp3")]:
        if fmt not in sf.available_formats():
            with pytest.raises(BadSample) as e:
                decode_audio(b"ID3", ext, None, _opts(16000, 1.0))
            assert e.value.reason == "unsupported_audio"
            continue
        got = decode_audio(_encode(x, 16000, fmt, sub), ext, None, _opts(16000, 0.5))
        assert got.shape == (8000,)
        spec = np.abs(np.fft.rfft(got))
        assert abs(np.argmax(spec) * 16000 / len(got) - 440) <= 2  # lossy, same tone


def _reason(data, ext):
    with pytest.raises(BadSample) as e:
        decode_audio(data, ext, np.random.default_rng(0), _opts(16000, 1.0, "rrc"))
    return e.value.reason


def test_bad_audio_reasons():
    x = _stereo(rate=16000)
    flac = _encode(x, 16000, "FLAC", "PCM_16")
    wav = _encode(x, 16000, "WAV", "PCM_16")
    ogg = _encode(x, 16000, "OGG", "VORBIS")
    assert _reason(b"", "flac") == "empty_audio"
    assert _reason(_encode(np.zeros((0, 2), np.float32), 16000, "WAV", "PCM_16"),
                   "wav") == "empty_audio"
    assert _reason(flac[:len(flac) // 2], "flac") == "corrupt_audio"        # truncated
    assert _reason(wav[:len(wav) // 2], "wav") == "corrupt_audio"          # truncated
    assert _reason(ogg[:len(ogg) // 2], "ogg") == "corrupt_audio"          # truncated
    assert _reason(b"\x00" * 4000, "flac") == "corrupt_audio"              # garbage
    assert _reason(flac[:40], "flac") == "corrupt_audio"                   # header only
    assert _reason(flac, "aiff") == "unsupported_audio"
    if "MP3" in sf.available_formats():
        mp3 = _encode(x, 16000, "MP3", "MPEG_LAYER_III")
        assert _reason(mp3[:len(mp3) // 2], "mp3") == "corrupt_audio"
    # intact files of each kind decode
    for data, ext in ((flac, "flac"), (wav, "wav"), (ogg, "ogg")):
        assert decode_audio(data, ext, None, _opts(16000, 1.0)).shape == (16000,)


# ----------------------------------------------------------------------------
# log-mel front end vs librosa
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(n_fft=512, hop_length=160, win_length=400, n_mels=128, fmin=0.0, fmax=None, htk=False,
         norm="slaney"),
    dict(n_fft=1024, hop_length=320, win_length=None, n_mels=64, fmin=50.0, fmax=7000.0,
         htk=True, norm=None)])
def test_log_mel_matches_librosa(kw):
    sr = 16000
    rng = np.random.default_rng(0)
    t = np.arange(10 * sr) / sr
    waves = np.stack([
        0.05 * rng.standard_normal(len(t)) + 0.5 * np.sin(2 * np.pi * 440 * t)
        + 0.3 * np.sin(2 * np.pi * 2000 * t * (1 + t / 20)),
        0.3 * rng.standard_normal(len(t)) * (t < 6)]).astype(np.float32)
    scale, ours_kw = ("htk" if kw["htk"] else "slaney"), dict(
        sample_rate=sr, n_fft=kw["n_fft"], hop_length=kw["hop_length"],
        win_length=kw["win_length"], n_mels=kw["n_mels"], f_min=kw["fmin"], f_max=kw["fmax"])
    fb = librosa.filters.mel(sr=sr, n_fft=kw["n_fft"], n_mels=kw["n_mels"], fmin=kw["fmin"],
                             fmax=kw["fmax"], htk=kw["htk"], norm=kw["norm"])
    ours_fb = audio.mel_filterbank(sr, kw["n_fft"], kw["n_mels"], kw["fmin"], kw["fmax"], scale,
                                   kw["norm"])
    np.testing.assert_allclose(ours_fb, fb.T, rtol=1e-5, atol=1e-5 * np.abs(fb).max())

    ref_pow = np.stack([librosa.feature.melspectrogram(
        y=w, sr=sr, n_fft=kw["n_fft"], hop_length=kw["hop_length"], win_length=kw["win_length"],
        center=True, pad_mode="reflect", power=2.0, n_mels=kw["n_mels"], fmin=kw["fmin"],
        fmax=kw["fmax"], htk=kw["htk"], norm=kw["norm"]).T for w in waves])
    ref_db = np.stack([librosa.power_to_db(p, ref=1.0, amin=1e-10, top_db=80.0) for p in ref_pow])
    fn = jax.jit(lambda w, log: audio.log_mel(w, mel_scale=scale, mel_norm=kw["norm"],
                                              log=log, **ours_kw), static_argnums=1)
    got_db = np.asarray(fn(jnp.asarray(waves), "db"))
    got_pow = np.asarray(fn(jnp.asarray(waves), "none"))
    assert got_db.shape == ref_db.shape == (2, 1 + 10 * sr // kw["hop_length"], kw["n_mels"])
    # dB: within 1e-4 of the dynamic range of each example.
    for g, r in zip(got_db, ref_db):
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max()
    # power: elementwise relative 1e-4 wherever above float32 noise of the peak.
    big = ref_pow > 1e-5 * ref_pow.max(axis=(1, 2), keepdims=True)
    rel = np.abs(got_pow - ref_pow)[big] / ref_pow[big]
    assert rel.max() <= 1e-4, rel.max()
    # the silent tail of the second example is floored at max - 80 dB
    assert np.isclose(got_db[1, -5:].min(), got_db[1].max() - 80.0, atol=1e-3)
    # natural-log variant
    got_ln = np.asarray(fn(jnp.asarray(waves), "ln"))
    np.testing.assert_allclose(got_ln, np.log(np.maximum(got_pow, audio.KALDI_EPS)), atol=1e-5)


def test_frame_and_num_frames():
    x = jnp.arange(2 * 1000, dtype=jnp.float32).reshape(2, 1000)
    for n_fft, hop in ((256, 80), (64, 64), (100, 7)):
        f = np.asarray(audio.frame(x, n_fft, hop))
        t = 1 + (1000 - n_fft) // hop
        assert f.shape == (2, t, n_fft)
        for i in (0, t // 2, t - 1):
            np.testing.assert_array_equal(f[:, i], np.asarray(x)[:, i * hop:i * hop + n_fft])
        assert audio.num_frames(1000 - n_fft, n_fft, hop, center=True) == \
            1 + (1000 - n_fft) // hop


# ----------------------------------------------------------------------------
# SpecAugment
# ----------------------------------------------------------------------------

def _runs(mask):
    """Start/length of the runs of True in a 1-D bool array."""
    d = np.diff(np.r_[0, mask.astype(int), 0])
    return list(zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - np.nonzero(d == 1)[0]))


def test_spec_augment_masks():
    b, t, f = 64, 100, 40
    spec = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (b, t, f)), jnp.float32)
    kw = dict(time_masks=2, time_width=15, freq_masks=1, freq_width=8)
    out = np.asarray(jax.jit(lambda s, k: audio.spec_augment(s, k, **kw))(spec, jax.random.key(3)))
    again = np.asarray(audio.spec_augment(spec, jax.random.key(3), **kw))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, np.asarray(audio.spec_augment(spec, jax.random.key(4), **kw)))
    zero = out == 0
    np.testing.assert_array_equal(out[~zero], np.asarray(spec)[~zero])  # rest unchanged
    masked_t, masked_f, patterns = 0, 0, set()
    for i in range(b):
        rows = zero[i].all(axis=1)   # whole frames masked
        cols = zero[i].all(axis=0)   # whole mel bins masked
        # every zero lies in a masked frame or bin
        assert (zero[i] == (rows[:, None] | cols[None, :])).all()
        rt, rf = _runs(rows), _runs(cols)
        # two bands of <= 15 frames, which may overlap or touch (one run of <= 30)
        assert len(rt) <= 2 and sum(n for _, n in rt) <= 30
        assert len(rt) < 2 or all(n <= 15 for _, n in rt)
        assert len(rf) <= 1 and all(n <= 8 for _, n in rf)
        masked_t += rows.sum()
        masked_f += cols.sum()
        patterns.add((tuple(rows), tuple(cols)))
    assert len(patterns) == b  # independent per example
    # expected widths: 2 x 7.5 frames and 1 x 4 bins on average (minus overlaps)
    assert 8 < masked_t / b <= 15 and 2.5 < masked_f / b <= 4.5
    none = audio.spec_augment(spec, jax.random.key(0), time_masks=0, freq_masks=0)
    np.testing.assert_array_equal(np.asarray(none), np.asarray(spec))


# ----------------------------------------------------------------------------
# Synthetic audio
# ----------------------------------------------------------------------------

def test_synthetic_samples_deterministic_and_captioned():
    a = sa.make_sample(7, "train", 16000, 1.0, seed=3)
    b = sa.make_sample(7, "train", 16000, 1.0, seed=3)
    np.testing.assert_array_equal(a["audio"], b["audio"])
    assert a["caption"] == b["caption"] and a["label"] == b["label"]
    assert not np.array_equal(a["audio"], sa.make_sample(7, "test", 16000, 1.0, 3)["audio"])
    assert not np.array_equal(a["audio"], sa.make_sample(7, "train", 16000, 1.0, 4)["audio"])
    assert len(sa.CLASSES) == 18 == len(set(sa.CLASSES))
    seen = set()
    for i in range(120):
        s = sa.make_sample(i, "train", 16000, 0.5)
        p, cap = s["params"], s["caption"]
        assert s["audio"].shape == (8000,) and s["audio"].dtype == np.float32
        assert np.abs(s["audio"]).max() <= 1.0
        assert s["classname"] == sa.CLASSES[s["label"]] == f"{p['pitch']} {p['contour']} " \
            f"{p['texture']}"
        # the caption names the class sound's pitch, contour and texture ...
        w = p["words"]
        assert sa._PITCH_WORDS[p["pitch"]][w["pitch"]] in cap
        assert any(x in cap for x in sa._CONTOUR_ADJ[p["contour"]] + sa._CONTOUR_VERB[p["contour"]])
        assert sa._NOUNS[p["texture"]][w["noun"]][0] in cap
        # ... and the secondary sound exactly when there is one
        has = any(x in cap for v in sa._SECOND_WORDS.values() for x in v)
        assert has == (p["second"] is not None)
        seen.add(s["label"])
    assert len(seen) == 18


def _measure(w, sr):
    """(mel centroid, its slope per frame, frames per burst above -15 dB of the peak),
    each `[B]`, energy-weighted over frames."""
    p = np.asarray(audio.log_mel(jnp.asarray(w), sample_rate=sr, n_fft=1024, hop_length=160,
                                 n_mels=64, log="none"))
    e = p.sum(2)
    wt = e / e.sum(1, keepdims=True)
    cen = (p * np.arange(p.shape[2])).sum(2) / (e + 1e-12)
    t = np.arange(p.shape[1])[None]
    tm, cm = (wt * t).sum(1, keepdims=True), (wt * cen).sum(1, keepdims=True)
    slope = (wt * (t - tm) * (cen - cm)).sum(1) / (wt * (t - tm) ** 2).sum(1)
    on = 10 * np.log10(e / e.max(1, keepdims=True) + 1e-12) > -15
    bursts = np.maximum((np.diff(on.astype(int), axis=1) == 1).sum(1), 1)
    return cm[:, 0], slope, on.sum(1) / bursts


def test_synthetic_classes_sound_as_named():
    # Class sounds alone (no secondary sound): pitch, contour and texture are
    # each readable from the log-mel with one threshold, for every class.
    sr, rng = 16000, np.random.default_rng(0)
    labels = np.arange(90) % 18
    clips = []
    for y in labels:
        p = sa.sample_params(int(y), rng)
        p["second"] = None
        clips.append(sa.make_clip(p, rng, sr, 1.0))
    centroid, slope, burst = _measure(np.stack(clips), sr)
    pitch, contour, texture = labels // 9, labels // 3 % 3, labels % 3
    np.testing.assert_array_equal(centroid > 16, pitch == 1)
    np.testing.assert_array_equal(np.where(slope > 0.03, 1, np.where(slope < -0.03, 2, 0)), contour)
    np.testing.assert_array_equal(burst > 20, texture == 0)  # one long sound vs pulses
    # clicks are short, noise bursts long
    assert np.median(burst[texture == 1]) + 1.5 < np.median(burst[texture == 2])


def test_audio_shards(tmp_path):
    a = sa.write_audio_shards(str(tmp_path / "a"), 5, 16000, 0.5, 2, seed=1, split="test")
    b = sa.write_audio_shards(str(tmp_path / "b"), 5, 16000, 0.5, 2, seed=1, split="test")
    assert [os.path.basename(p) for p in a] == ["test-000000.tar", "test-000001.tar",
                                                "test-000002.tar"]
    for x, y in zip(a, b):
        assert open(x, "rb").read() == open(y, "rb").read()  # byte-identical
    with tarfile.open(a[0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["000000000.flac", "000000000.txt", "000000000.cls",
                             "000000000.json"]
        flac = tar.extractfile("000000001.flac").read()
        txt = tar.extractfile("000000001.txt").read().decode()
        cls = int(tar.extractfile("000000001.cls").read())
    ref = sa.make_sample(1, "test", 16000, 0.5, seed=1)
    assert txt == ref["caption"] and cls == ref["label"]
    got = decode_audio(flac, "flac", None, _opts(16000, 0.5))
    np.testing.assert_allclose(got, ref["audio"], atol=1 / 32768 + 1e-7)  # 16-bit FLAC
    cached = sa.ensure_audio_shards(str(tmp_path / "cache"), "test", 5, 16000, 0.5, 2, seed=1)
    assert [open(p, "rb").read() for p in cached] == [open(p, "rb").read() for p in a]
    assert sa.ensure_audio_shards(str(tmp_path / "cache"), "test", 5, 16000, 0.5, 2, 1) == cached
