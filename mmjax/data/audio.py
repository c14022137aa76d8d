"""Audio decoding for the input pipeline: bytes -> mono float32 clip of fixed length.

`decode_audio(data, ext, rng, options)`:

  1. decode with libsndfile (`soundfile`): FLAC, WAV, Ogg (Vorbis / Opus) and
     MP3 where the installed libsndfile reads MP3 (1.1 and later);
  2. mix to mono (mean of the channels);
  3. resample to `options.sample_rate` with soxr (`options.resample_quality`,
     default "HQ"), skipped when the rates already agree;
  4. crop to `num_samples = round(sample_rate * clip_seconds)`: a uniformly
     random window drawn from `rng` for training, the centre window
     (`start = (len - num_samples) // 2`) when `options.augment == "center"`;
     a shorter clip is zero-padded at the end.

Randomness comes only from the `numpy.random.Generator` passed in (derived by
the pipeline from seed, epoch, shard and index), so decoding a sample twice
gives the same samples.

Bad inputs raise `mmjax.data.bad.BadSample(reason, message)`, which the
pipeline counts per reason: "empty_audio" (no bytes or no frames),
"corrupt_audio" (libsndfile cannot decode it, non-finite samples, or the file
is shorter than its header says: truncated FLAC and MP3 from the decoder's
frame count, truncated WAV from the RIFF `data` chunk size, truncated Ogg from
a missing end-of-stream page) and "unsupported_audio" (an extension outside
`AUDIO_EXTS`, or MP3 on a libsndfile without MP3 support).
"""
from __future__ import annotations

import io
import re
import struct

import numpy as np

from mmjax.data.bad import BadSample

AUDIO_EXTS = ("flac", "wav", "ogg", "mp3")
_SF_FORMAT = {"flac": "FLAC", "wav": "WAV", "ogg": "OGG", "mp3": "MP3"}
# libmpg123 estimates the length of an MP3 without a Xing/LAME header from its
# bitrate; only a shortfall beyond this fraction counts as truncation.
_MP3_SLACK = 0.02
_INT16_SUBTYPES = ("PCM_16", "PCM_S8", "PCM_U8")


def clip_samples(options) -> int:
    """Samples of a decoded clip: `round(options.sample_rate * options.clip_seconds)`."""
    n = int(round(options.sample_rate * options.clip_seconds))
    if n < 1:
        raise ValueError(f"sample_rate={options.sample_rate} x clip_seconds="
                         f"{options.clip_seconds} gives {n} samples; both must be positive.")
    return n


def _wav_truncated(data: bytes) -> str | None:
    """Why a RIFF/WAVE file is cut short (its `data` chunk declares more bytes
    than follow), else None. libsndfile silently shortens such files."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"data":
            have = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and size > have:  # 0 / -1: streamed, unknown
                return f"WAV data chunk declares {size} bytes, {have} present (truncated)"
            return None
        pos += 8 + size + (size & 1)
    return None


def _ogg_truncated(data: bytes) -> str | None:
    """Why an Ogg stream is cut short (its last page is incomplete or lacks the
    end-of-stream flag), else None. libsndfile decodes up to the cut silently."""
    last = data.rfind(b"OggS")
    if last < 0 or len(data) < last + 27:
        return "Ogg stream ends inside a page header (truncated)"
    nseg = data[last + 26]
    if len(data) < last + 27 + nseg:
        return "Ogg stream ends inside a page (truncated)"
    body = sum(data[last + 27:last + 27 + nseg])
    if len(data) < last + 27 + nseg + body:
        return "Ogg stream ends inside a page (truncated)"
    if not data[last + 5] & 0x04:
        return "Ogg stream has no end-of-stream page (truncated)"
    return None


def read_audio(data: bytes, ext: str, mono: bool = False) -> tuple[np.ndarray, int]:
    """Decode `data` -> `(samples, sample_rate)`: samples `[frames, channels]`
    float32 in [-1, 1], or `[frames]` (the mean of the channels) with `mono=True`.

    8/16-bit PCM (FLAC, WAV) is read as int16 and scaled here, 1.6x faster than
    libsndfile's float conversion for 10 s of stereo 16-bit FLAC and the same
    values (v / 32768). Raises BadSample ("empty_audio", "corrupt_audio",
    "unsupported_audio"); see the module docstring.
    """
    import soundfile as sf

    ext = ext.lower().lstrip(".")
    if ext not in AUDIO_EXTS:
        raise BadSample("unsupported_audio", f"audio extension {ext!r} is not one of "
                        f"{AUDIO_EXTS}")
    if not data:
        raise BadSample("empty_audio", f"empty .{ext} file (0 bytes)")
    if _SF_FORMAT[ext] not in sf.available_formats():
        raise BadSample("unsupported_audio", f"this libsndfile ({sf.__libsndfile_version__}) "
                        f"does not read {ext.upper()}; install libsndfile >= 1.1 for MP3")
    why = _wav_truncated(data) if ext == "wav" else _ogg_truncated(data) if ext == "ogg" else None
    if why:
        raise BadSample("corrupt_audio", f".{ext}: {why}")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, rate = f.frames, f.samplerate
            small_int = f.subtype in _INT16_SUBTYPES
            samples = f.read(dtype="int16" if small_int else "float32", always_2d=True)
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the bytes", str(e))
        msg = (msg.splitlines() or [""])[0][:200]
        raise BadSample("corrupt_audio", f".{ext} does not decode: {type(e).__name__}: "
                        f"{msg}") from None
    got, channels = samples.shape
    slack = int(declared * _MP3_SLACK) if ext == "mp3" else 0
    if 0 < declared and got < declared - slack:
        raise BadSample("corrupt_audio", f".{ext}: decoded {got} of {declared} frames "
                        "(truncated)")
    if got == 0 or channels == 0:
        raise BadSample("empty_audio", f".{ext} has no audio frames")
    if small_int:
        if mono:  # integer sums are exact in float32; the scale is one multiply
            total = samples[:, 0].astype(np.float32)
            for c in range(1, channels):
                total += samples[:, c]
            return total * np.float32(1.0 / (32768 * channels)), int(rate)
        return samples.astype(np.float32) * np.float32(1.0 / 32768), int(rate)
    if not np.isfinite(samples).all():
        raise BadSample("corrupt_audio", f".{ext} decodes to non-finite samples")
    if mono:
        return (samples.mean(axis=1) if channels > 1 else samples[:, 0]), int(rate)
    return samples, int(rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int, quality: str = "HQ") -> np.ndarray:
    """`x [S]` float32 at `rate_in` -> float32 at `rate_out` (soxr; a copy-free
    pass-through when the rates agree)."""
    if rate_in == rate_out:
        return np.ascontiguousarray(x, np.float32)
    import soxr
    return soxr.resample(np.ascontiguousarray(x, np.float32), rate_in, rate_out,
                         quality=quality).astype(np.float32, copy=False)


def crop_or_pad(x: np.ndarray, n: int, rng: np.random.Generator | None,
                center: bool) -> np.ndarray:
    """`x [S]` -> `[n]`: a window of `n` (centre, or uniform from `rng`), or `x`
    followed by zeros when shorter."""
    if len(x) >= n:
        if center:
            start = (len(x) - n) // 2
        else:
            if rng is None:
                raise ValueError("a random audio crop needs an rng (or augment='center')")
            start = int(rng.integers(0, len(x) - n + 1))
        return np.ascontiguousarray(x[start:start + n])
    out = np.zeros(n, np.float32)
    out[:len(x)] = x
    return out


def decode_audio(data: bytes, ext: str, rng: np.random.Generator | None,
                 options) -> np.ndarray:
    """Encoded audio -> mono float32 `[round(sample_rate * clip_seconds)]`.

    Args:
      data: the file's bytes; ext: its extension (one of `AUDIO_EXTS`, any case).
      rng: draws the training crop; unused when `options.augment == "center"`.
      options: any object with `sample_rate` (int), `clip_seconds` (float) and
        `augment` ("center": centre crop for evaluation; anything else: random
        crop); optional `resample_quality` (soxr: "QQ", "LQ", "MQ", "HQ", "VHQ").
    Raises:
      BadSample: "empty_audio", "corrupt_audio" or "unsupported_audio".
    """
    mono, rate = read_audio(data, ext, mono=True)
    mono = resample(mono, rate, int(options.sample_rate),
                    getattr(options, "resample_quality", "HQ"))
    return crop_or_pad(mono, clip_samples(options), rng, options.augment == "center")
