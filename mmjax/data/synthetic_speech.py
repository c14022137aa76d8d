"""A spoken-word audio–caption set: synthesized speech of confusable words, under noise.

A harder audio set than the procedural sounds of `mmjax.data.synthetic_audio`,
with what makes real speech hard for a small model:

* 32 words, most in confusable groups (cat / cap / cut / cot, ship / sheep /
  chip, three / tree / free, thirteen / thirty, fifteen / fifty, light / right /
  night / white, ...): a class differs from its neighbours by one phoneme;
* many voices: the eSpeak NG synthesizer's English accents (8) x voice variants
  (46 here), pitch and speaking rate drawn per clip; the `test` split speaks
  only with variants the `train` split never uses (unheard speakers);
* the word at a random offset in the clip, at a random level (-30..-6 dBFS
  peak), under white, pink or brown noise at 0-20 dB SNR, with a faint
  mumbled second word (another class) in a third of the clips.

The caption names the word in one of several phrasings ("someone saying the
word cat", "cat, spoken"); the zero-shot class name is the word itself.
Everything but eSpeak's pitch-flutter phase is a function of `(seed, split,
index)` (`make_sample`); that phase runs on across utterances, so shards written
by `write_speech_shards` (in index order, in one process) are byte-identical
for the same arguments, while a sample made alone may be a few milliseconds
longer or shorter. Samples are written like the built-in sounds (`mmjax.data.synthetic_audio`: `key.flac`,
`key.txt`, `key.cls`, `key.json`).

Speech comes from eSpeak NG (formant synthesis) through its C library, which
the `espeakng-loader` package ships (`pip install "mmjax[speech]"`); nothing is
downloaded.
"""
from __future__ import annotations

import ctypes
import threading
import zlib
from typing import Optional

import numpy as np

from mmjax.errors import ConfigError

GENERATOR_VERSION = 1

WORDS: tuple[str, ...] = (
    "cat", "cap", "cut", "cot", "bat", "pat", "ship", "sheep", "chip", "three", "tree",
    "free", "seven", "eleven", "pin", "pen", "bin", "light", "right", "night", "white",
    "thirteen", "thirty", "fifteen", "fifty", "house", "mouse", "boat", "goat", "coat",
    "rock", "lock")
CLASSES: list[str] = list(WORDS)
"""Label i -> class name (the word)."""

ACCENTS = ("en", "en-US", "en-GB-scotland", "en-GB-x-rp", "en-029", "en-US-nyc",
           "en-GB-x-gbclan", "en-GB-x-gbcwmd")
# eSpeak NG voice variants: every 5th (by this order) speaks only in the test split.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "Alex", "Alicia", "Andrea", "Andy",
            "Annie", "Denis", "Gene", "Jacky", "Lee", "Marco", "Michael", "Mike", "Reed",
            "adam", "anika", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
            "edward", "grandma", "grandpa", "linda", "max", "paul", "steph")
TEST_VARIANTS = VARIANTS[4::5]
TRAIN_VARIANTS = tuple(v for v in VARIANTS if v not in TEST_VARIANTS)

_TEMPLATES = ("{w}", "the word {w}", "someone saying the word {w}", "a voice says {w}",
              "{w}, spoken", "the spoken word {w}")
_ESPEAK_RATE = 22050
_lock = threading.Lock()
_engine = None


class _ESpeak:
    """eSpeak NG's C library, synchronous synthesis into a buffer (one per process)."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise ConfigError("The spoken-word set needs eSpeak NG: pip install "
                              "'mmjax[speech]' (the espeakng-loader package).") from e
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                    ctypes.c_void_p)
        self.chunks: list[np.ndarray] = []

        def collect(wav, n, events):
            if wav and n > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0
        self._callback = callback(collect)  # kept alive with the engine
        rate = self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate != _ESPEAK_RATE:
            raise RuntimeError(f"eSpeak NG initialisation failed (returned {rate}).")
        self.lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        """`text` spoken by `voice` ("ACCENT+VARIANT") at `rate` words/min and `pitch`
        (0-99), eSpeak's random numbers (breath noise of some voices) seeded with
        `seed` -> int16 samples at 22,050 Hz."""
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(int(seed)))
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ConfigError(f"eSpeak NG has no voice {voice!r}.")
        self.lib.espeak_SetParameter(1, int(rate), 0)   # espeakRATE
        self.lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
        self.chunks = []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def speak(word: str, voice: str, rate: int = 160, pitch: int = 50,
          sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """`word` synthesized by eSpeak NG -> float32 `[S]` at `sample_rate`, peak 1.

    voice: "ACCENT+VARIANT" (e.g. "en-US+f2"); rate: words per minute; pitch: 0-99;
    seed: eSpeak's random numbers. eSpeak carries its pitch-flutter phase from one
    utterance to the next, so the same call gives the same sound only at the same
    position in a process's sequence of calls (a few samples longer or shorter,
    the same word otherwise).
    """
    from scipy.signal import resample_poly
    global _engine
    with _lock:
        if _engine is None:
            _engine = _ESpeak()
        wav = _engine.say(word, voice, rate, pitch, seed)
    x = wav.astype(np.float32) / 32768.0
    if sample_rate != _ESPEAK_RATE:
        g = np.gcd(int(sample_rate), _ESPEAK_RATE)
        x = resample_poly(x, sample_rate // g, _ESPEAK_RATE // g).astype(np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    return x / peak if peak > 0 else x


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS white, pink (1/f) or brown (1/f^2) noise `[n]`."""
    kind = int(rng.integers(3))
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.arange(spec.shape[0]), 1.0)
    spec = spec / f ** (0.5 * kind)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _place(clip: np.ndarray, sound: np.ndarray, rng: np.random.Generator) -> None:
    """Adds `sound` at a random offset (kept whole where it fits, else a random
    window of it)."""
    n, m = clip.shape[0], sound.shape[0]
    if m >= n:
        start = int(rng.integers(m - n + 1))
        clip += sound[start:start + n]
    else:
        start = int(rng.integers(n - m + 1))
        clip[start:start + m] += sound


def _rng(index: int, split: str, seed: int) -> np.random.Generator:
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test' (unheard voices), got {split!r}")
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def make_sample(index: int, split: str = "train", sample_rate: int = 16000,
                seconds: float = 1.0, seed: int = 0) -> dict:
    """Sample `index` of `split`, deterministic in `(seed, split, index)`: dict with
    `audio` float32 `[round(sample_rate * seconds)]`, `caption` str, `label` int in
    [0, 32), `classname` (the word), `voice` ("ACCENT+VARIANT") and `params`
    (rate, pitch, snr_db: how the word was spoken and buried)."""
    rng = _rng(index, split, seed)
    label = int(rng.integers(len(WORDS)))
    variants = TEST_VARIANTS if split == "test" else TRAIN_VARIANTS
    voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{variants[rng.integers(len(variants))]}"
    rate, pitch = int(rng.integers(120, 221)), int(rng.integers(20, 81))
    n = int(round(sample_rate * seconds))
    word = speak(WORDS[label], voice, rate, pitch, sample_rate, int(rng.integers(1 << 30)))
    clip = np.zeros(n, np.float32)
    _place(clip, word, rng)
    if rng.random() < 1 / 3:  # a faint other word, mumbled by another voice
        other = WORDS[(label + 1 + int(rng.integers(len(WORDS) - 1))) % len(WORDS)]
        voice2 = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{variants[rng.integers(len(variants))]}"
        other = speak(other, voice2, 200, 50, sample_rate, int(rng.integers(1 << 30)))
        _place(clip, 10 ** (-rng.uniform(18, 30) / 20) * other, rng)
    rms = float(np.sqrt(np.mean(word ** 2)))
    snr_db = float(rng.uniform(0.0, 20.0))
    clip += rms * 10 ** (-snr_db / 20) * _noise(rng, n).astype(np.float32)
    clip *= 10 ** (rng.uniform(-30.0, -6.0) / 20) / (np.abs(clip).max() + 1e-12)
    caption = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(w=WORDS[label])
    return dict(audio=np.clip(clip, -1, 1).astype(np.float32), caption=caption, label=label,
                classname=WORDS[label], voice=voice,
                params=dict(rate=rate, pitch=pitch, snr_db=snr_db))


def write_speech_shards(out_dir: str, num_samples: int, split: str = "train",
                        sample_rate: int = 16000, seconds: float = 1.0,
                        samples_per_shard: int = 1_000, seed: int = 0,
                        prefix: Optional[str] = None, progress=None) -> list[str]:
    """Writes samples `0 .. num_samples-1` of `split` as webdataset shards
    `{prefix or split}-000000.tar`, ... in `out_dir` (plus `sizes.json`), with the
    members of `mmjax.data.synthetic_audio.write_audio_shards` (`json` adds
    `voice`). Returns the shard paths, in order."""
    from mmjax.data.synthetic_audio import write_audio_shards
    return write_audio_shards(out_dir, num_samples, sample_rate, seconds, samples_per_shard,
                              seed, split, prefix, progress,
                              make=lambda i: make_sample(i, split, sample_rate, seconds, seed),
                              extra=("voice",))
