"""Audio input throughput per CPU core: mmjax decode + batched JAX log-mel vs librosa.

Generates stereo 10 s 44.1 kHz 16-bit FLAC files (procedural tones, clicks and
noise), then measures samples/s in one process pinned to one core (XLA, BLAS
and OpenMP limited to one thread) for decode -> mono -> resample -> 10 s clip
-> 128-bin log-mel (25 ms Hann window, 10 ms hop, dB):

* baseline: `librosa.load(path, sr=target)` (soundfile decode, mono mix,
  soxr_hq resampling), cut to 10 s, + `librosa.feature.melspectrogram` +
  `power_to_db`, per sample;
* mmjax: `mmjax.data.audio.decode_audio` (soundfile, mono mix, soxr HQ,
  centre crop) per sample, then `mmjax.models.audio.log_mel` jitted over a
  batch on the CPU (in training it runs on the accelerator instead).

Rows for 16 kHz and 48 kHz targets, a per-stage split of the mmjax path, and
the largest difference between the two paths' features (dB).

Usage: python benchmarks/audio_pipeline.py [--num 48] [--batch 16] [--repeat 3]
"""
from __future__ import annotations

import os
import sys

# One core, one thread everywhere, before numpy / jax start their pools.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                           " intra_op_parallelism_threads=1").strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmjax.data import audio as adata  # noqa: E402
from mmjax.data import synthetic_audio as sa  # noqa: E402
from mmjax.models import audio as afront  # noqa: E402

SOURCE_RATE, SECONDS, N_MELS = 44100, 10.0, 128


def write_files(root: str, num: int) -> list[str]:
    """`num` stereo 10 s 44.1 kHz FLACs: a synthetic sound per channel."""
    import soundfile as sf
    rng = np.random.default_rng(0)
    paths = []
    for i in range(num):
        left = sa.make_clip(int(rng.integers(18)), rng, SOURCE_RATE, SECONDS)
        right = 0.7 * left + 0.3 * sa.make_clip(int(rng.integers(18)), rng, SOURCE_RATE, SECONDS)
        path = os.path.join(root, f"{i:04d}.flac")
        sf.write(path, np.stack([left, right], 1), SOURCE_RATE, format="FLAC", subtype="PCM_16")
        paths.append(path)
    return paths


def stft_sizes(rate: int) -> dict:
    win, hop = int(0.025 * rate), int(0.010 * rate)
    return dict(n_fft=1 << (win - 1).bit_length(), hop_length=hop, win_length=win)


def baseline(paths: list[str], rate: int) -> list[np.ndarray]:
    import librosa
    out = []
    for p in paths:
        y, _ = librosa.load(p, sr=rate, mono=True, duration=SECONDS)
        y = librosa.util.fix_length(y, size=int(round(rate * SECONDS)))  # the 10 s clip
        s = librosa.feature.melspectrogram(y=y, sr=rate, n_mels=N_MELS, center=True,
                                           pad_mode="reflect", power=2.0, **stft_sizes(rate))
        out.append(librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=80.0).T)
    return out


def mmjax_path(paths: list[str], rate: int, batch: int, log_mel, timer=None) -> list[np.ndarray]:
    opts = SimpleNamespace(sample_rate=rate, clip_seconds=SECONDS, augment="center")
    out = []
    for i in range(0, len(paths), batch):
        t0 = time.perf_counter()
        waves = []
        for p in paths[i:i + batch]:
            with open(p, "rb") as f:
                waves.append(adata.decode_audio(f.read(), "flac", None, opts))
        t1 = time.perf_counter()
        out.extend(np.asarray(log_mel(jnp.asarray(np.stack(waves)))))
        if timer is not None:
            timer["decode"] += t1 - t0
            timer["log-mel"] += time.perf_counter() - t1
    return out


def stage_split(paths: list[str], rate: int) -> dict:
    """Seconds per sample of decode (soundfile + mono mix) and soxr resampling alone."""
    t = {"soundfile decode + mono": 0.0, "soxr resample": 0.0}
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        t0 = time.perf_counter()
        x, sr = adata.read_audio(data, "flac", mono=True)
        t1 = time.perf_counter()
        adata.resample(x, sr, rate)
        t2 = time.perf_counter()
        t["soundfile decode + mono"] += t1 - t0
        t["soxr resample"] += t2 - t1
    return {k: v / len(paths) for k, v in t.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import librosa
    import soundfile as sf
    import soxr

    with tempfile.TemporaryDirectory() as root:
        paths = write_files(root, args.num)
        rows = []
        for rate in (16000, 48000):
            fn = jax.jit(lambda w, rate=rate: afront.log_mel(
                w, sample_rate=rate, n_mels=N_MELS, log="db", **stft_sizes(rate)))
            fn(jnp.zeros((args.batch, int(rate * SECONDS)), jnp.float32)).block_until_ready()
            baseline(paths[:1], rate)  # librosa's first-call set-up stays out of the timing
            if args.num % args.batch:  # the last, smaller batch compiles too
                fn(jnp.zeros((args.num % args.batch, int(rate * SECONDS)), jnp.float32))
            base_t, ours_t, timers = [], [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ref = baseline(paths, rate)
                base_t.append(time.perf_counter() - t0)
                timers.append({"decode": 0.0, "log-mel": 0.0})
                t0 = time.perf_counter()
                got = mmjax_path(paths, rate, args.batch, fn, timers[-1])
                ours_t.append(time.perf_counter() - t0)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
            split = stage_split(paths, rate)
            best = timers[int(np.argmin(ours_t))]
            host = args.num / min(t["decode"] for t in timers)
            rows.append((rate, args.num / min(base_t), args.num / min(ours_t), diff, split,
                         {k: v / args.num for k, v in best.items()}, host))

    print(f"\nAudio input, samples/s per CPU core ({args.num} stereo 10 s {SOURCE_RATE} Hz "
          f"16-bit FLACs -> mono 10 s clip -> {N_MELS}-bin log-mel, 25 ms / 10 ms, dB), "
          f"best of {args.repeat}")
    print(f"{datetime.date.today()} · {cpu_name()} · {os.cpu_count()} cores, 1 used · "
          f"jax {jax.__version__}, librosa {librosa.__version__}, soundfile {sf.__version__} "
          f"(libsndfile {sf.__libsndfile_version__}), soxr {soxr.__version__}, "
          f"Python {platform.python_version()}\n")
    print("| target rate | baseline: librosa.load + melspectrogram | mmjax: decode_audio + "
          f"batched JAX log-mel on this core (batch {args.batch}) | speed-up | mmjax host part "
          "only (log-mel on the accelerator) | speed-up | max |diff| dB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rate, b, m, diff, _, _, host in rows:
        print(f"| {rate // 1000} kHz | {b:.1f} | {m:.1f} | {m / b:.2f}x | {host:.1f} | "
              f"{host / b:.2f}x | {diff:.2g} |")
    print("\nmmjax path, ms per sample by stage (fastest run; decode / resample split from a "
          "separate pass):\n")
    print("| target rate | soundfile decode + mono | soxr resample | decode_audio total | "
          "JAX log-mel |")
    print("|---|---:|---:|---:|---:|")
    for rate, _, _, _, split, timer, _ in rows:
        print(f"| {rate // 1000} kHz | {1e3 * split['soundfile decode + mono']:.1f} | "
              f"{1e3 * split['soxr resample']:.1f} | {1e3 * timer['decode']:.1f} | "
              f"{1e3 * timer['log-mel']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
