"""Video decode throughput per CPU core: `mmjax.data.video.decode_video` vs full decode.

Generates 10 s, 30 fps, 320x240 H.264 clips (libx264 defaults: a keyframe
every 250 frames, B-frames) and the same clips with a keyframe every 2 s
(`-g 60`, common for web video), then measures, in this process with one
decoder thread, samples per CPU-second (= per core) of T=8 frames at
S=224 and S=64:

* baseline: PyAV decodes every frame and converts each to RGB, then the T
  sampled frames are cropped and resized (same sampling rule and crop);
* mmjax: `decode_video` (demux, decode from the keyframe before each needed
  frame when one lies ahead, skip non-reference frames that are not needed,
  convert only needed frames, at reduced size).

"train" is TSN sampling + random resized crop (scale 0.9-1.0) + flip;
"eval" is segment centres + centre crop.

Usage: python benchmarks/video_pipeline.py [--clips 6] [--repeat 2]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmjax.data.decode import center_crop_box, random_resized_crop_box, resample_box  # noqa: E402
from mmjax.data.video import decode_video, frame_indices  # noqa: E402


def make_clip(rng: np.random.Generator, seconds: float = 10.0, fps: int = 30,
              width: int = 320, height: int = 240, gop: int | None = None) -> bytes:
    """An MP4 (libx264, default settings unless `gop`) of a panning textured scene
    with moving shapes and sensor-like noise."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.options = {"g": str(gop)}
        big = 2 * max(width, height)
        y, x = np.mgrid[0:big, 0:big].astype(np.float32)
        texture = np.stack([
            127 + 60 * np.sin(x / rng.uniform(9, 30) + rng.uniform(0, 6))
            + 50 * np.cos(y / rng.uniform(9, 30)) for _ in range(3)], -1)
        texture += rng.normal(0, 12, texture.shape)
        dx, dy = rng.uniform(-3, 3, 2)
        blobs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-4, 4),
                  rng.uniform(-4, 4), rng.uniform(12, 40), rng.integers(0, 255, 3))
                 for _ in range(4)]
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(int(seconds * fps)):
            ox = int(abs(dx * i)) % (big - width)
            oy = int(abs(dy * i)) % (big - height)
            frame = texture[oy:oy + height, ox:ox + width].copy()
            for bx, by, vx, vy, r, color in blobs:
                cx, cy = (bx + vx * i) % width, (by + vy * i) % height
                frame[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = color
            frame += rng.normal(0, 4, frame.shape)
            image = np.clip(frame, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def baseline(data: bytes, rng: np.random.Generator | None, o) -> np.ndarray:
    """PyAV full decode, every frame to RGB, then pick T frames and crop them."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    idx = frame_indices(len(frames), o.num_frames, rng)
    h, w = frames[0].shape[:2]
    if rng is None:
        left, top, cw, ch = center_crop_box(w, h)
        flip = False
    else:
        left, top, cw, ch = random_resized_crop_box(w, h, rng, o.crop_scale, o.crop_ratio)
        flip = o.flip and rng.random() < 0.5
    box = (left, top, left + cw, top + ch)
    return np.stack([resample_box(frames[i], box, o.image_size, flip=flip) for i in idx])


def rate(fn, clips, o, train: bool, repeat: int) -> float:
    """Samples per CPU-second (best of `repeat` passes over `clips`)."""
    best = 0.0
    for r in range(repeat):
        start = time.process_time()
        for i, data in enumerate(clips):
            rng = np.random.default_rng([r, i]) if train else None
            fn(data, rng, o)
        best = max(best, len(clips) / (time.process_time() - start))
    return best


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_name()}; one decoder thread, samples per CPU-second")
    sets = {}
    for name, gop in (("x264 default GOP (250)", None), ("GOP 60 (2 s)", 60)):
        start = time.perf_counter()
        sets[name] = [make_clip(rng, gop=gop) for _ in range(args.clips)]
        kb = np.mean([len(c) for c in sets[name]]) / 1024
        print(f"generated {args.clips} clips, {name}: 10 s 30 fps 320x240, {kb:.0f} KiB each "
              f"({time.perf_counter() - start:.1f} s)")

    def mmjax(data, r, o):
        return decode_video(data, "mp4", r, o)

    print("\n| clips | mode | T | S | baseline | mmjax | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, clips in sets.items():
        for mode in ("train", "eval"):
            for size in (224, 64):
                o = SimpleNamespace(num_frames=8, image_size=size, flip=True,
                                    augment="rrc" if mode == "train" else "center",
                                    crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3))
                base = rate(baseline, clips, o, mode == "train", args.repeat)
                ours = rate(mmjax, clips, o, mode == "train", args.repeat)
                print(f"| {name} | {mode} | 8 | {size} | {base:.1f} | {ours:.1f} | "
                      f"{ours / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
