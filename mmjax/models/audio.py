"""Audio front end in JAX: log-mel spectrograms and SpecAugment, computed on device.

`log_mel(waveform [B, S]) -> [B, T, n_mels]` is librosa's
`power_to_db(melspectrogram(...))` (or a natural-log variant) written with
static framing, `jnp.fft.rfft` and one matmul against a constant mel
filterbank, so a batch of waveforms becomes features inside the jitted step:

  1. pad `n_fft // 2` samples at both ends (`center=True`; "reflect" as
     torchaudio and the audio-tagging literature, or "constant" zeros), then
     cut `T = 1 + (S_padded - n_fft) // hop_length` frames of `n_fft` samples;
  2. multiply by a periodic Hann window of `win_length` samples, centred in
     `n_fft` (librosa's `pad_center`), `rfft`, power `|X|^2` (computed from the
     `win_length` windowed samples zero-padded to `n_fft`: the same power);
  3. mel filterbank `[n_fft // 2 + 1, n_mels]` (`mel_filterbank`: librosa's
     `filters.mel`, Slaney or HTK mel scale, Slaney area normalization or none);
  4. log: `log="db"`: `10 * log10(max(amin, S))` floored at `max - top_db` per
     example (librosa's `power_to_db(ref=1.0)`, which takes the maximum over the
     array it is given: one example); `log="ln"`: `ln(max(S, eps))` (the
     Kaldi-fbank convention that AST checkpoints were trained on, eps = float32
     machine epsilon).

Frames are cut with reshapes and static slices (no gather), and the mel
matmul runs at `Precision.HIGHEST`, so TPUs do not round the power spectrum to
bfloat16. Everything is float32.

`spec_augment(spec, rng, ...)` masks random time and frequency bands of a
`[B, T, F]` spectrogram (SpecAugment, Park et al. 2019), independently per
example. It is a plain function of an explicit key: the AST tower stays
deterministic, and a training step applies augmentation between
`AST.spectrogram` and the tower.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError

Array = jax.Array

MEL_SCALES = ("slaney", "htk")
MEL_NORMS = (None, "slaney")
LOG_KINDS = ("db", "ln", "none")
PAD_MODES = ("reflect", "constant")
KALDI_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07: Kaldi's log floor


# ----------------------------------------------------------------------------
# Mel filterbank (NumPy, float64, built once per trace)
# ----------------------------------------------------------------------------

def hz_to_mel(hz, mel_scale: str = "slaney"):
    """Frequency in Hz -> mels. "htk": 2595 log10(1 + f / 700); "slaney": linear
    below 1 kHz (200/3 Hz per mel), logarithmic above (librosa's default)."""
    hz = np.asarray(hz, np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(hz >= min_log_hz,
                    min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                    hz / f_sp)


def mel_to_hz(mels, mel_scale: str = "slaney"):
    """Inverse of `hz_to_mel`."""
    mels = np.asarray(mels, np.float64)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)),
                    f_sp * mels)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: Optional[float] = None, mel_scale: str = "slaney",
                   norm: Optional[str] = "slaney") -> np.ndarray:
    """Triangular mel filters as `[n_fft // 2 + 1, n_mels]` float32 (the transpose of
    `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min,
    fmax=f_max, htk=mel_scale == "htk", norm=norm)`).

    `norm="slaney"` scales each filter by 2 / (its bandwidth in Hz) (constant
    energy per band); `norm=None` leaves peaks at 1 (HTK / Kaldi).
    """
    if mel_scale not in MEL_SCALES:
        raise ConfigError(f"mel_scale={mel_scale!r} (config key `mel_scale`); choose "
                          f"one of {MEL_SCALES}.")
    if norm not in MEL_NORMS:
        raise ConfigError(f"mel norm={norm!r} (config key `mel_norm`); choose None or 'slaney'.")
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ConfigError(f"mel range f_min={f_min}, f_max={f_max} (config keys `f_min`, "
                          f"`f_max`) must satisfy 0 <= f_min < f_max <= sample_rate / 2 "
                          f"= {sample_rate / 2}.")
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale),
                                  n_mels + 2), mel_scale)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # [n_mels, n_freq]
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return np.ascontiguousarray(weights.T.astype(np.float32))


def hann_window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window of `win_length`, zero-padded centred to `n_fft`
    (`librosa.filters.get_window("hann", win_length)` + `util.pad_center`)."""
    n = np.arange(win_length, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    left = (n_fft - win_length) // 2
    return np.pad(w, (left, n_fft - win_length - left)).astype(np.float32)


def num_frames(num_samples: int, n_fft: int, hop_length: int, center: bool = True) -> int:
    """Frames `log_mel` returns for `num_samples` samples."""
    padded = num_samples + (2 * (n_fft // 2) if center else 0)
    if padded < n_fft:
        raise ConfigError(f"{num_samples} samples are fewer than n_fft={n_fft} (config keys "
                          "`clip_seconds`, `n_fft`); use a longer clip or center=True.")
    return 1 + (padded - n_fft) // hop_length


# ----------------------------------------------------------------------------
# STFT and log-mel (JAX)
# ----------------------------------------------------------------------------

def frame(x: Array, n_fft: int, hop_length: int) -> Array:
    """Overlapping frames `[B, T, n_fft]` of `x [B, L]`, `T = 1 + (L - n_fft) // hop`,
    frame t = `x[:, t * hop : t * hop + n_fft]`. Built from a reshape into hops
    and `ceil(n_fft / hop)` static slices (no gather)."""
    b, length = x.shape
    t = 1 + (length - n_fft) // hop_length
    m = -(-n_fft // hop_length)
    need = (t - 1 + m) * hop_length
    x = jnp.pad(x, ((0, 0), (0, max(0, need - length))))[:, :need]
    chunks = x.reshape(b, t - 1 + m, hop_length)
    return jnp.concatenate([chunks[:, i:i + t] for i in range(m)], axis=-1)[..., :n_fft]


def power_spectrogram(waveform: Array, *, n_fft: int, hop_length: int,
                      win_length: Optional[int] = None, center: bool = True,
                      pad_mode: str = "reflect") -> Array:
    """`|STFT|^2` of `waveform [B, S]` -> `[B, T, n_fft // 2 + 1]` float32 (periodic
    Hann window; see the module docstring for framing)."""
    win_length = n_fft if win_length is None else win_length
    if not 0 < win_length <= n_fft or hop_length < 1:
        raise ConfigError(f"STFT sizes win_length={win_length}, n_fft={n_fft}, "
                          f"hop_length={hop_length} (config keys `win_length`, `n_fft`, "
                          "`hop_length`): need 0 < win_length <= n_fft and hop_length >= 1.")
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"pad_mode={pad_mode!r} (config key `pad_mode`); choose one of "
                          f"{PAD_MODES}.")
    x = jnp.asarray(waveform, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"waveform must be [B, S], got shape {x.shape}")
    if center:
        p = n_fft // 2
        if pad_mode == "reflect" and x.shape[1] <= p:
            raise ConfigError(f"reflect padding needs more than n_fft // 2 = {p} samples, got "
                              f"{x.shape[1]}; use pad_mode='constant' or a longer clip.")
        x = jnp.pad(x, ((0, 0), (p, p)), mode=pad_mode)
    t = num_frames(x.shape[1] - (2 * (n_fft // 2) if center else 0), n_fft, hop_length, center)
    # The window is zero outside its `win_length` samples in the middle of each
    # `n_fft` frame, so only those are cut, windowed and zero-padded to n_fft by
    # the FFT: a circular shift of the frame, which leaves |X|^2 unchanged (10%
    # faster on CPU at 48 kHz, 1200-sample window in 2048).
    left = (n_fft - win_length) // 2
    x = x[:, left:left + (t - 1) * hop_length + win_length]
    frames = frame(x, win_length, hop_length) * jnp.asarray(hann_window(win_length, win_length))
    spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    return jnp.square(spec.real) + jnp.square(spec.imag)


def power_to_db(power: Array, *, amin: float = 1e-10, top_db: Optional[float] = 80.0) -> Array:
    """`10 log10(max(amin, power))` (ref 1.0), floored at each example's maximum minus
    `top_db` (the maximum over all axes but the first). `[B, ...]` -> same shape."""
    db = 10.0 * jnp.log10(jnp.maximum(amin, power))
    if top_db is not None:
        peak = jnp.max(db, axis=tuple(range(1, db.ndim)), keepdims=True)
        db = jnp.maximum(db, peak - top_db)
    return db


def log_mel(waveform: Array, *, sample_rate: int, n_fft: int = 512, hop_length: int = 160,
            win_length: Optional[int] = None, n_mels: int = 128, f_min: float = 0.0,
            f_max: Optional[float] = None, mel_scale: str = "slaney",
            mel_norm: Optional[str] = "slaney", center: bool = True,
            pad_mode: str = "reflect", log: str = "db", amin: float = 1e-10,
            top_db: Optional[float] = 80.0, eps: float = KALDI_EPS) -> Array:
    """Log-mel spectrogram of `waveform [B, S]` -> `[B, T, n_mels]` float32.

    With `log="db"` equal (float32 rounding) to, per example,
    `librosa.power_to_db(librosa.feature.melspectrogram(y=w, sr=sample_rate,
    n_fft=n_fft, hop_length=hop_length, win_length=win_length, center=center,
    pad_mode=pad_mode, power=2.0, n_mels=n_mels, fmin=f_min, fmax=f_max,
    htk=mel_scale == "htk", norm=mel_norm), ref=1.0, amin=amin, top_db=top_db).T`.
    `log="ln"`: `ln(max(mel, eps))`; `log="none"`: the mel power itself.
    T = `num_frames(S, n_fft, hop_length, center)`.
    """
    if log not in LOG_KINDS:
        raise ConfigError(f"log={log!r} (config key `log`); choose one of {LOG_KINDS}.")
    power = power_spectrogram(waveform, n_fft=n_fft, hop_length=hop_length,
                              win_length=win_length, center=center, pad_mode=pad_mode)
    fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, mel_norm)
    mel = jnp.einsum("btf,fm->btm", power, jnp.asarray(fb),
                     precision=jax.lax.Precision.HIGHEST)
    if log == "db":
        return power_to_db(mel, amin=amin, top_db=top_db)
    if log == "ln":
        return jnp.log(jnp.maximum(mel, eps))
    return mel


# ----------------------------------------------------------------------------
# SpecAugment
# ----------------------------------------------------------------------------

def _band_mask(key: Array, batch: int, size: int, count: int, max_width: int) -> Array:
    """`[B, size]` bool: the union of `count` bands per row, each of width uniform
    in [0, max_width] (at most `size`) and start uniform over the positions where
    it fits."""
    if count <= 0 or max_width <= 0:
        return jnp.zeros((batch, size), bool)
    kw, ks = jax.random.split(key)
    width = jax.random.randint(kw, (batch, count), 0, min(max_width, size) + 1)
    start = jnp.floor(jax.random.uniform(ks, (batch, count)) * (size - width + 1)).astype(jnp.int32)
    pos = jnp.arange(size)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return inside.any(axis=1)


def spec_augment(spec: Array, rng: Array, *, time_masks: int = 2, time_width: int = 20,
                 freq_masks: int = 2, freq_width: int = 8, fill: float = 0.0) -> Array:
    """SpecAugment time and frequency masking of `spec [B, T, F]` -> `[B, T, F]`.

    Each example gets `time_masks` bands of whole frames (width uniform in
    [0, time_width]) and `freq_masks` bands of whole mel bins (width in
    [0, freq_width]) set to `fill` (0.0 suits normalized features; bands may
    overlap). Deterministic in `rng` (a `jax.random` key); no time warping.
    """
    b, t, f = spec.shape
    kt, kf = jax.random.split(rng)
    tmask = _band_mask(kt, b, t, time_masks, time_width)
    fmask = _band_mask(kf, b, f, freq_masks, freq_width)
    masked = tmask[:, :, None] | fmask[:, None, :]
    return jnp.where(masked, jnp.asarray(fill, spec.dtype), spec)
