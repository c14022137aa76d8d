"""Input pipeline throughput per CPU core: mmjax decode path vs full-decode baseline.

Generates a few hundred 512-640 px JPEGs with varied content, writes them as
webdataset shards, then measures samples/s in one process (= one core) for
decode + random-resized-crop to 224 + tokenize:

* baseline: full PIL decode, then crop + resize (what PyTorch pipelines do);
* mmjax: crop chosen from the header, JPEG draft-mode decode, one bilinear
  warp of the crop box (OpenCV) when the remaining shrink is below 2;
* from shards: a plain tar-streaming loader with the baseline decode vs the
  whole mmjax training iterator (tar streaming, shuffle buffer, decode,
  batching, state tracking), workers=0, rrc scale (0.9, 1.0).
A last row repeats the comparison on 1024-1280 px sources (draft scale 1/4).
Quality: PSNR of each path's 224 px crops against a Lanczos resize of the
same crop box from the full-resolution decode.

Usage: python benchmarks/input_pipeline.py [--num 300] [--repeat 3]
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from mmjax.data import decode, pipeline


def make_photo(rng: np.random.Generator, lo: int = 512, hi: int = 640) -> bytes:
    """A lo-hi px JPEG with gradients, shapes and noise (photo-like entropy,
    about 1.7 bits per pixel)."""
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.005, 0.05, 3)
    img = np.stack([127 + 100 * np.sin(f[c] * x + rng.uniform(0, 6) + f[c] * y * (c - 1))
                    for c in range(3)], -1)
    img += rng.normal(0, rng.uniform(2, 15), img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(5, 30))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 200)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def write_shards(root: str, num: int, per_shard: int = 100) -> tuple[list[bytes], list[str]]:
    rng = np.random.default_rng(0)
    images = [make_photo(rng) for _ in range(num)]
    captions = [f"a photo of object number {i} with some {'red ' * (i % 5)}detail" for i in range(num)]
    for s in range(0, num, per_shard):
        with tarfile.open(os.path.join(root, f"bench-{s // per_shard:03d}.tar"), "w") as tf:
            for i in range(s, min(num, s + per_shard)):
                for ext, data in (("jpg", images[i]), ("txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return images, captions


def baseline(data: bytes, rng, size: int, scale) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")  # full-resolution decode
    left, top, w, h = decode.random_resized_crop_box(img.width, img.height, rng, scale)
    return np.asarray(img.crop((left, top, left + w, top + h)).resize(
        (size, size), decode.RESAMPLE), np.uint8)


def mmjax_path(data: bytes, rng, size: int, scale) -> np.ndarray:
    return decode.decode_and_crop(data, size, rng, augment="rrc", scale=scale)[0]


def baseline_iterator(paths: list[str], tokenize, size: int, batch: int):
    """What a plain webdataset + PyTorch-style loader does, in one process:
    stream each tar, group members by key, full decode + random-resized-crop,
    tokenize, stack batches."""
    rows, caps, n = [], [], 0
    for path in paths:
        with tarfile.open(path, mode="r|") as tf:
            sample: dict = {}
            for member in tf:
                key, ext = member.name.rsplit(".", 1)
                if sample and key != sample["key"]:
                    yield from _emit(sample, rows, caps, tokenize, size, batch, n)
                    n += 1
                    sample = {}
                sample["key"] = key
                sample[ext] = tf.extractfile(member).read()
            if sample:
                yield from _emit(sample, rows, caps, tokenize, size, batch, n)
                n += 1


def _emit(sample, rows, caps, tokenize, size, batch, n):
    rows.append(baseline(sample["jpg"], np.random.default_rng([0, n]), size, (0.9, 1.0)))
    caps.append(sample["txt"].decode())
    if len(rows) == batch:
        out = {"image": np.stack(rows), "text": tokenize(caps)}
        rows.clear(), caps.clear()
        yield out


def psnr(fn, images, size, scale) -> float:
    """Mean PSNR (dB) of ``fn``'s crops vs a Lanczos resize of the same box."""
    errs = []
    for i, data in enumerate(images):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = decode.random_resized_crop_box(
            img.width, img.height, np.random.default_rng([0, i]), scale)
        ref = np.asarray(img.resize((size, size), Image.LANCZOS,
                                    box=(left, top, left + w, top + h)), np.float64)
        out = fn(data, np.random.default_rng([0, i]), size, scale).astype(np.float64)
        errs.append(np.mean((out - ref) ** 2))
    return float(10 * np.log10(255 ** 2 / np.mean(errs)))


def rate(fn, images, captions, tokenize, size, scale, repeat) -> float:
    best = 0.0
    for r in range(repeat):
        start = time.perf_counter()
        for i, (data, cap) in enumerate(zip(images, captions)):
            tokenize([cap])
            fn(data, np.random.default_rng([r, i]), size, scale)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    from mmjax.data.tokenizers import build_tokenizer
    tokenize = build_tokenizer("bytes", 32)
    rows, quality = [], []
    with tempfile.TemporaryDirectory() as root:
        images, captions = write_shards(root, args.num)
        for scale in ((0.9, 1.0), (0.08, 1.0)):
            base = rate(baseline, images, captions, tokenize, args.size, scale, args.repeat)
            ours = rate(mmjax_path, images, captions, tokenize, args.size, scale, args.repeat)
            rows.append((f"512-640 px, rrc scale {scale}", base, ours))
            quality.append((scale, psnr(baseline, images[:100], args.size, scale),
                            psnr(mmjax_path, images[:100], args.size, scale)))
        large = [make_photo(np.random.default_rng(i), 1024, 1280) for i in range(args.num // 3)]
        base = rate(baseline, large, captions, tokenize, args.size, (0.9, 1.0), args.repeat)
        ours = rate(mmjax_path, large, captions, tokenize, args.size, (0.9, 1.0), args.repeat)
        rows.append(("1024-1280 px, rrc scale (0.9, 1.0)", base, ours))
        paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
        best = 0.0
        for _ in range(args.repeat):
            start = time.perf_counter()
            n = sum(len(b["text"]) for b in baseline_iterator(paths, tokenize, args.size, 50))
            best = max(best, n / (time.perf_counter() - start))
        cfg = pipeline.default_data_config()
        cfg.shards = os.path.join(root, "bench-*.tar")
        cfg.update(workers=0, image_size=args.size, shuffle_buffer=100, output="uint8",
                   tokenizer="bytes", max_len=32, crop_scale=(0.9, 1.0), flip=False)
        ours = 0.0
        for r in range(args.repeat):  # one pass over all samples, best of `repeat`
            cfg.seed = r
            it = pipeline.build_train_iterator(cfg, 50, process_index=0, process_count=1)
            start = time.perf_counter()
            n = sum(len(next(it)["label"]) for _ in range(args.num // 50))
            ours = max(ours, n / (time.perf_counter() - start))
            it.close()
        rows.append(("512-640 px, from the tar shards, batches of 50 (mmjax: train iterator, "
                     "workers=0, shuffle buffer 100)", best, ours))
    print(f"\nInput pipeline, samples/s per CPU core ({args.num} JPEGs 512-640 px -> "
          f"{args.size}px), {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Pillow {Image.__version__}\n")
    print("Each row: decode + random-resized-crop to the output size + tokenize.\n")
    print("| images | baseline: full decode + crop/resize | mmjax: draft decode | speed-up |")
    print("|---|---:|---:|---:|")
    for name, base, ours in rows:
        b = f"{base:.0f}" if base else "-"
        s = f"{ours / base:.2f}x" if base else "-"
        print(f"| {name} | {b} | {ours:.0f} | {s} |")
    print("\nPSNR (dB) vs a Lanczos resize of the same crop from the full decode:\n")
    print("| rrc scale | baseline | mmjax |")
    print("|---|---:|---:|")
    for scale, qb, qm in quality:
        print(f"| {scale} | {qb:.2f} | {qm:.2f} |")


if __name__ == "__main__":
    main()
