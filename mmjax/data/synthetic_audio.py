"""Built-in synthetic audio–caption dataset: procedural sounds with their descriptions.

Each clip holds one *class sound* (2 pitches x 3 contours x 3 textures = 18
classes, class name e.g. ``"low rising tone"``) and, in half of the clips, a
short secondary sound (a beep, two clicks or a burst of noise, at a middle
pitch that is neither low nor high) before or after it. The caption names the
class sound in one of several phrasings and the secondary sound with "then",
"followed by" or "after", e.g. ``"a low tone rising, then two short clicks"``.

* pitch: low (centre 200-350 Hz) or high (1.4-2.4 kHz);
* contour: steady, rising or falling by one octave (log-linear sweep) over the
  sound, centred on the pitch (the two pitch ranges never meet);
* texture: a tone (sine plus two harmonics), a train of 5-9 short (15 ms)
  pitched clicks, or 3-5 bursts (80-200 ms) of noise in a band 20% of the
  pitch wide that follows the contour.

The class sound lasts 50-65% of the clip and is louder than the secondary one,
so the class is plain in a log-mel spectrogram: a 2-layer, 64-wide `AST` on
64 mel bins of 1 s clips, trained as a classifier on 3,000 clips, reached
98.8% 18-way accuracy on 500 held-out clips after 800 steps of batch 64 (97 s
on 2 CPU cores, clips generated included). Amplitudes, timings and a faint
background noise vary per clip.

Samples are a pure function of ``(seed, split, index)`` (``make_sample``);
``write_audio_shards`` writes them as webdataset shards with ``key.flac``
(16-bit FLAC), ``key.txt`` (caption), ``key.cls`` (label) and ``key.json``.
"""
from __future__ import annotations

import io
import logging
import zlib
from typing import Union

import numpy as np

from mmjax.data.cache import cached_shards
from mmjax.errors import ConfigError

log = logging.getLogger("mmjax")

# Bump when the generator changes, so cached shards are rebuilt.
GENERATOR_VERSION = 1

PITCHES = ("low", "high")
CONTOURS = ("steady", "rising", "falling")
TEXTURES = ("tone", "clicks", "noise bursts")
CLASSES: list[str] = [f"{p} {c} {t}" for p in PITCHES for c in CONTOURS for t in TEXTURES]
"""Label i -> class name; label = (pitch * 3 + contour) * 3 + texture."""

_PITCH_HZ = {"low": (200.0, 350.0), "high": (1400.0, 2400.0)}
_SECOND_HZ = (600.0, 900.0)
_SECOND_KINDS = ("beep", "clicks", "noise")
MIN_SAMPLE_RATE = 8000

_PITCH_WORDS = {"low": ("low", "low-pitched", "deep"), "high": ("high", "high-pitched", "shrill")}
_CONTOUR_ADJ = {"steady": ("steady", "constant", "flat"), "rising": ("rising", "ascending"),
                "falling": ("falling", "descending")}
_CONTOUR_VERB = {"steady": ("holding steady", "staying level"),
                 "rising": ("rising", "going up", "sweeping upward"),
                 "falling": ("falling", "going down", "sweeping downward")}
_NOUNS = {"tone": (("tone", False), ("note", False), ("sine tone", False)),  # (noun, plural)
          "clicks": (("clicks", True), ("ticks", True), ("series of clicks", False)),
          "noise bursts": (("noise bursts", True), ("bursts of noise", True),
                           ("hiss bursts", True))}
_MAIN_TEMPLATES = ("{a}{pitch} {noun} {verb}", "{a}{adj} {pitch} {noun}",
                   "the sound of {a}{pitch} {noun} {verb}", "{a}{pitch} {adj} {noun}")
_SECOND_WORDS = {"beep": ("a short beep", "a brief beep"),
                 "clicks": ("two short clicks", "a double click"),
                 "noise": ("a burst of noise", "a short hiss")}
_JOIN = {"after": ("{m}, then {s}", "{m} followed by {s}"),
         "before": ("{s}, then {m}", "{m} after {s}")}


def _split_stream(split: str) -> int:
    if not split or not isinstance(split, str):
        raise ValueError(f"split must be a non-empty string like 'train' or 'test', got {split!r}")
    return zlib.crc32(split.encode("utf-8"))


def _pick(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


def sample_params(label: int, rng: np.random.Generator) -> dict:
    """Random parameters of a clip of class `label` (timings as fractions of the
    clip, frequencies in Hz, word choices of its caption)."""
    if not 0 <= int(label) < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    label = int(label)
    pitch, contour, texture = (PITCHES[label // 9], CONTOURS[label // 3 % 3],
                               TEXTURES[label % 3])
    centre = rng.uniform(*_PITCH_HZ[pitch])
    ratio = {"steady": 1.0, "rising": 2.0, "falling": 0.5}[contour]
    p = dict(label=label, pitch=pitch, contour=contour, texture=texture,
             f0=centre / np.sqrt(ratio), f1=centre * np.sqrt(ratio),
             amp=rng.uniform(0.25, 0.5), events=int(rng.integers(5, 10) if texture == "clicks"
                                                     else rng.integers(3, 6)),
             background=rng.uniform(0.002, 0.008))
    has_second = rng.uniform() < 0.5
    where = ("before", "after")[_pick(rng, 2)]
    dur = rng.uniform(0.5, 0.65)
    if not has_second:
        p.update(start=rng.uniform(0.05, 0.95 - dur), dur=dur, second=None)
    else:
        kind = _SECOND_KINDS[_pick(rng, 3)]
        sdur = rng.uniform(0.08, 0.15)
        if where == "before":
            sstart = rng.uniform(0.02, 0.08)
            start = rng.uniform(sstart + sdur + 0.04, 0.97 - dur)
        else:
            start = rng.uniform(0.02, 0.08)
            sstart = rng.uniform(start + dur + 0.04, 0.98 - sdur)
        p.update(start=start, dur=dur, second=dict(
            kind=kind, where=where, start=sstart, dur=sdur, freq=rng.uniform(*_SECOND_HZ),
            amp=p["amp"] * rng.uniform(0.3, 0.45)))
    p["words"] = dict(pitch=_pick(rng, 3), adj=_pick(rng, len(_CONTOUR_ADJ[contour])),
                      verb=_pick(rng, len(_CONTOUR_VERB[contour])), noun=_pick(rng, 3),
                      template=_pick(rng, len(_MAIN_TEMPLATES)), second=_pick(rng, 2),
                      join=_pick(rng, 2))
    return p


def caption(params: dict) -> str:
    """The caption of a clip's parameters (a pure function of `params`)."""
    w = params["words"]
    noun, plural = _NOUNS[params["texture"]][w["noun"]]
    adj = _CONTOUR_ADJ[params["contour"]][w["adj"]]
    template = _MAIN_TEMPLATES[w["template"]]
    pitch = _PITCH_WORDS[params["pitch"]][w["pitch"]]
    first = (pitch if template.startswith("{a}{pitch}") or "of {a}{pitch}" in template else adj)
    article = "" if plural else ("an " if first[0] in "aeiou" else "a ")
    m = template.format(a=article, pitch=pitch, noun=noun, adj=adj,
                        verb=_CONTOUR_VERB[params["contour"]][w["verb"]])
    second = params["second"]
    if second is None:
        return m
    s = _SECOND_WORDS[second["kind"]][w["second"]]
    return _JOIN[second["where"]][w["join"]].format(m=m, s=s)


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def _sweep_phase(tau: np.ndarray, d: float, f0: float, f1: float) -> np.ndarray:
    """Phase (radians) of a log-linear sweep f0 -> f1 over `d` seconds at times `tau`."""
    if abs(f1 - f0) < 1e-9:
        return 2 * np.pi * f0 * tau
    k = np.log(f1 / f0) / d
    return 2 * np.pi * f0 * np.expm1(k * tau) / k


def _fade(tau: np.ndarray, d: float, ramp: float) -> np.ndarray:
    """Raised-cosine fade in and out of `ramp` seconds over [0, d]."""
    r = min(ramp, d / 2)
    up = np.clip(tau / r, 0, 1)
    down = np.clip((d - tau) / r, 0, 1)
    return np.sin(0.5 * np.pi * np.minimum(up, down)) ** 2


def _pulses(tau: np.ndarray, centres: np.ndarray, width: float) -> np.ndarray:
    """Sum of Hann pulses of `width` seconds centred at `centres`."""
    env = np.zeros_like(tau)
    for c in centres:
        x = (tau - c) / width
        inside = np.abs(x) < 0.5
        env[inside] += np.cos(np.pi * x[inside]) ** 2
    return env


def _band_noise(rng: np.random.Generator, n: int, sample_rate: int,
                bandwidth: float) -> np.ndarray:
    """Unit-RMS noise low-passed to about +-bandwidth / 2 Hz (a moving average), to
    be shifted to a band by multiplying with a carrier."""
    k = max(1, int(sample_rate / bandwidth))
    x = np.convolve(rng.standard_normal(n + k), np.ones(k) / k, mode="valid")[:n]
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _harmonics(phase: np.ndarray, f_max: float, sample_rate: int) -> np.ndarray:
    """Sine plus 2nd / 3rd harmonics (0.35, 0.15), each only below 0.45 x sample rate."""
    out = np.sin(phase)
    for h, a in ((2, 0.35), (3, 0.15)):
        if h * f_max < 0.45 * sample_rate:
            out += a * np.sin(h * phase)
    return out


def _render_main(p: dict, rng: np.random.Generator, tau: np.ndarray, d: float,
                 sample_rate: int) -> np.ndarray:
    phase = _sweep_phase(tau, d, p["f0"], p["f1"])
    f_max = max(p["f0"], p["f1"])
    if p["texture"] == "tone":
        return _harmonics(phase, f_max, sample_rate) * _fade(tau, d, 0.02)
    n = p["events"]
    slots = (np.arange(n) + 0.5) / n * d
    if p["texture"] == "clicks":
        centres = slots + rng.uniform(-0.15, 0.15, n) * d / n
        return 1.5 * _harmonics(phase, f_max, sample_rate) * _pulses(tau, centres, 0.015)
    width = np.clip(rng.uniform(0.5, 0.7) * d / n, 0.08, 0.2)
    env = _pulses(tau, slots, width)
    noise = _band_noise(rng, len(tau), sample_rate, 0.2 * np.sqrt(p["f0"] * p["f1"]))
    return 1.2 * np.sin(phase) * noise * env


def _render_second(s: dict, rng: np.random.Generator, tau: np.ndarray, d: float,
                   sample_rate: int) -> np.ndarray:
    phase = 2 * np.pi * s["freq"] * tau
    if s["kind"] == "beep":
        return _harmonics(phase, s["freq"], sample_rate) * _fade(tau, d, 0.01)
    if s["kind"] == "clicks":
        return 1.5 * np.sin(phase) * _pulses(tau, np.array([0.25, 0.75]) * d, 0.015)
    return rng.standard_normal(len(tau)) * 0.5 * _fade(tau, d, 0.01)


def make_clip(label_or_params: Union[int, dict], rng: np.random.Generator,
              sample_rate: int = 16000, seconds: float = 2.0) -> np.ndarray:
    """A clip `[round(sample_rate * seconds)]` float32 in [-1, 1].

    `label_or_params`: a class label (parameters drawn from `rng` by
    `sample_params`) or a parameter dict. The noise of noisy textures and the
    background come from `rng`, so the same rng state gives the same clip.
    """
    if sample_rate < MIN_SAMPLE_RATE:
        raise ConfigError(f"synthetic audio needs sample_rate >= {MIN_SAMPLE_RATE} Hz (the high "
                          f"pitches sweep up to 3.4 kHz), got {sample_rate}.")
    n = int(round(sample_rate * seconds))
    if seconds <= 0 or n < 1:
        raise ConfigError(f"synthetic audio seconds must be positive, got {seconds}.")
    p = sample_params(label_or_params, rng) if not isinstance(label_or_params, dict) \
        else label_or_params
    t = np.arange(n) / sample_rate
    out = np.zeros(n)
    parts = [(p, p["amp"], _render_main)]
    if p["second"] is not None:
        parts.append((p["second"], p["second"]["amp"], _render_second))
    for part, amp, render in parts:
        t0, d = part["start"] * seconds, part["dur"] * seconds
        i0, i1 = int(np.floor(t0 * sample_rate)), min(n, int(np.ceil((t0 + d) * sample_rate)))
        if i1 > i0:
            tau = t[i0:i1] - t0
            out[i0:i1] += amp * render(part, rng, np.clip(tau, 0, d), d, sample_rate)
    out += p["background"] * rng.standard_normal(n)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _sample_rng(index: int, split: str, seed: int) -> np.random.Generator:
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([int(seed), _split_stream(split), int(index)])


def make_sample(index: int, split: str = "train", sample_rate: int = 16000,
                seconds: float = 2.0, seed: int = 0) -> dict:
    """Sample `index` of `split`, deterministic in `(seed, split, index)`: dict with
    `audio` float32 `[round(sample_rate * seconds)]`, `caption` str, `label` int in
    [0, 18), `classname` str and `params` (see `sample_params`)."""
    rng = _sample_rng(index, split, seed)
    label = int(rng.integers(len(CLASSES)))
    params = sample_params(label, rng)
    audio = make_clip(params, rng, sample_rate, seconds)
    return dict(audio=audio, caption=caption(params), label=label, classname=CLASSES[label],
                params=params)


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """`audio [S]` float32 in [-1, 1] -> 16-bit FLAC bytes."""
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_audio_shards(out_dir: str, num_samples: int = 10_000, sample_rate: int = 16000,
                       seconds: float = 2.0, samples_per_shard: int = 1_000, seed: int = 0,
                       split: str = "train", prefix: str | None = None,
                       progress=None, make=None, extra: tuple = ()) -> list[str]:
    """Writes samples `0 .. num_samples-1` of `split` as webdataset shards
    `{prefix or split}-000000.tar`, ... in `out_dir` (plus `sizes.json`).

    Members per sample: `{key}.flac` (16-bit, `sample_rate`), `{key}.txt`
    (caption), `{key}.cls` (label) and `{key}.json` ({"caption", "label",
    "classname"}). The same arguments give byte-identical shards. `progress`,
    if given, is called with the number of samples written after each one.
    `make(i) -> dict` replaces `make_sample` (another generator with its fields);
    `extra` names further fields of those samples that go into the JSON.
    Returns the shard paths, in order.
    """
    from mmjax.data.writer import ShardWriter

    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    with ShardWriter(out_dir, max_count=samples_per_shard, max_bytes=1 << 40,
                     prefix=prefix or split) as writer:
        for i in range(num_samples):
            s = make(i) if make else make_sample(i, split, sample_rate, seconds, seed)
            writer.write({"__key__": f"{i:09d}", "flac": encode_flac(s["audio"], sample_rate),
                          "txt": s["caption"], "cls": s["label"],
                          "json": {"caption": s["caption"], "label": s["label"],
                                   "classname": s["classname"],
                                   **{k: s[k] for k in extra}}})
            if progress is not None:
                progress(i + 1)
    return writer.shards


def ensure_audio_shards(cache_dir: str, split: str = "train", num_samples: int = 10_000,
                        sample_rate: int = 16000, seconds: float = 2.0,
                        samples_per_shard: int = 1_000, seed: int = 0) -> list[str]:
    """Shards of the synthetic audio set, written once into
    `cache_dir/synthetic-audio-{split}-{hash}` (the hash covers every argument
    and the generator version) and reused; written to a temporary folder and
    renamed into place, so concurrent callers never see a partial set.
    Returns the shard paths, in order."""
    params = dict(version=GENERATOR_VERSION, split=split, num_samples=int(num_samples),
                  sample_rate=int(sample_rate), seconds=float(seconds),
                  samples_per_shard=int(samples_per_shard), seed=int(seed))

    def write(folder, progress):
        write_audio_shards(folder, num_samples, sample_rate, seconds, samples_per_shard, seed,
                           split, progress=progress)
    return cached_shards(cache_dir, f"synthetic-audio-{split}", params, write,
                         what=f"built-in {split} audio", detail=f", {seconds:g} s clips")
