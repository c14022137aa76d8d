"""Pairs scored per second: `mmjax curate`'s scoring pass against the plain loop of
decode + encode a script would write (PIL decode, center crop, normalize, the
jitted `encode_image` / `encode_text` of the same model, cosine), on the same
shards and model.

The shards are web-like: JPEG photos-sized images (default 320x240, random
content) with captions, written once into `--data`. The model is a trained
run (`--workdir`, e.g. the default job's `mmjax_runs/clip_tiny`).

    mmjax train   # once: the default job's run in ./mmjax_runs/clip_tiny
    python benchmarks/curate_throughput.py --workdir mmjax_runs/clip_tiny
    python benchmarks/curate_throughput.py --workdir RUN --shards 4 --per-shard 500 --repeats 3

Prints pairs/s of each (the best of `--repeats` runs, each on every shard; the
curate number is its scoring pass alone, from its per-shard timings) and the ratio.
"""
import argparse
import glob
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = "a the red blue green small large circle square cross triangle on of with".split()


def write_shards(root: str, shards: int, per: int, size: tuple[int, int]) -> list[str]:
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = os.path.join(root, f"web-{s:06d}.tar")
        paths.append(path)
        if os.path.exists(path):
            continue
        with tarfile.open(path, "w") as tar:
            for j in range(per):
                w, h = size
                y, x = np.mgrid[0:h, 0:w]
                img = (np.sin(x[..., None] * rng.uniform(0.01, 0.1, 3)) * 80 + 128
                       + rng.normal(0, 20, (h, w, 3)))
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                           quality=90)
                caption = " ".join(rng.choice(WORDS, 8)).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{s:03d}{j:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def plain_loop(workdir: str, paths: list[str], batch: int) -> float:
    """pairs/s of a straightforward script: read, decode, batch, encode, cosine."""
    import jax
    from PIL import Image

    from mmjax.commands.eval import load_run
    from mmjax.data.tario import iter_tar_samples
    from mmjax.data.tokenizers import build_tokenizer
    config, trainer, state, _ = load_run(None, workdir, None, [])
    model, variables = trainer.model, {"params": state["params"]}
    d = config.data.train
    tok = build_tokenizer(d.tokenizer, int(d.max_len))
    size = int(d.image_size)
    mean, std = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)

    @jax.jit
    def score(v, images, text):
        a = model.apply(v, images, method="encode_image")
        b = model.apply(v, text, method="encode_text")
        a = a / jax.numpy.linalg.norm(a, axis=-1, keepdims=True)
        b = b / jax.numpy.linalg.norm(b, axis=-1, keepdims=True)
        return (a * b).sum(-1)

    def decode(data):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((size, size), Image.BICUBIC)
        return (np.asarray(img, np.float32) / 255 - mean) / std

    n, start = 0, time.perf_counter()
    images, texts = [], []

    def flush():
        nonlocal images, texts, n
        if images:
            pad = batch - len(images)
            x = np.stack(images + [images[0]] * pad)
            t = tok(texts + [texts[0]] * pad)
            np.asarray(score(variables, x, t))
            n += len(images)
            images, texts = [], []

    for p in paths:
        with open(p, "rb") as f:
            for _, _, m in iter_tar_samples(f):
                images.append(decode(m["jpg"]))
                texts.append(m["txt"].decode())
                if len(images) == batch:
                    flush()
    flush()
    return n / (time.perf_counter() - start)


def curate_pass(workdir: str, pattern: str, batch: int, out: str, threads: int) -> float:
    """pairs/s of `mmjax curate`'s scoring pass (its own per-shard timings)."""
    from mmjax import cli
    shutil.rmtree(out, ignore_errors=True)
    assert cli.main(["curate", "--workdir", workdir, "--shards", pattern, "--out", out,
                     "--keep-fraction", "0.5", "--batch-size", str(batch), "--quiet"]
                    + (["--decode-threads", str(threads)] if threads else [])) == 0
    marks = [json.load(open(p)) for p in glob.glob(os.path.join(out, "scores", "*.scored.json"))]
    return sum(m["pairs"] for m in marks) / sum(m["seconds"] for m in marks)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a trained run (e.g. mmjax_runs/clip_tiny)")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "mmjax_curate_bench"))
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--size", type=int, nargs=2, default=(320, 240))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-threads", type=int, default=0,
                   help="curate's --decode-threads (default: its own, the CPU cores)")
    a = p.parse_args()
    paths = write_shards(a.data, a.shards, a.per_shard, tuple(a.size))
    pattern = os.path.join(a.data, "web-*.tar")
    plain = max(plain_loop(a.workdir, paths, a.batch) for _ in range(a.repeats))
    cur = max(curate_pass(a.workdir, pattern, a.batch, os.path.join(a.data, "out"),
                          a.decode_threads)
              for _ in range(a.repeats))
    print("| pairs | plain loop (pairs/s) | mmjax curate scoring (pairs/s) | ratio |")
    print(f"| {len(paths) * a.per_shard} | {plain:.0f} | {cur:.0f} | {cur / plain:.2f}x |")


if __name__ == "__main__":
    main()
