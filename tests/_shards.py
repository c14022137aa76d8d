"""Test helpers: small webdataset tar shards with real PIL-encoded images."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image


def make_image(seed: int, width: int = 48, height: int = 40, fmt: str = "JPEG",
               quality: int = 90) -> bytes:
    """An encoded image with varied, seed-dependent content (gradients + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.02, 0.2, 3)
    img = np.stack([base[c] / 2 + 60 * np.sin(freq[c] * (x + 2 * y) + c) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]):
    """Writes ``(name, bytes)`` members, in order, as a tar file."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def sample_members(key: str, caption: str | None, image: bytes | None,
                   label: int | None = None, caption_json: bool = False):
    out = []
    if image is not None:
        out.append((f"{key}.jpg", image))
    if caption is not None:
        if caption_json:
            out.append((f"{key}.json", json.dumps({"caption": caption}).encode()))
        else:
            out.append((f"{key}.txt", caption.encode()))
    if label is not None:
        out.append((f"{key}.cls", str(label).encode()))
    return out


def write_dataset(root, num_shards: int, per_shard: int, prefix: str = "shard",
                  size=(48, 40), label: bool = True) -> list[str]:
    """``num_shards`` tar files of ``per_shard`` good samples each; the caption
    of sample j in shard i is ``"{prefix}-{i}-{j}"`` and its label ``i*1000+j``."""
    paths = []
    for i in range(num_shards):
        members = []
        for j in range(per_shard):
            members += sample_members(f"{prefix}{i:03d}_{j:04d}", f"{prefix}-{i}-{j}",
                                      make_image(i * 1000 + j, *size),
                                      label=i * 1000 + j if label else None)
        path = str(root / f"{prefix}-{i:03d}.tar")
        write_tar(path, members)
        paths.append(path)
    return paths


class CharTokenizer:
    """A tiny picklable tokenizer: character codes, 0-padded, ``[N, max_len]``."""

    def __init__(self, max_len: int = 16):
        self.max_len = max_len

    def __call__(self, texts):
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, t in enumerate(texts):
            codes = [ord(c) % 1000 + 1 for c in t][: self.max_len]
            out[i, : len(codes)] = codes
        return out

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 1) for i in ids if i > 0)


def fault_config(shards, **kw):
    """A data.train config for the fault tests: 16 px images, no workers, no shuffle,
    every bad sample tolerated (`max_bad_fraction=1`), keys from `kw`."""
    from mmjax.data import pipeline
    cfg = pipeline.default_data_config()
    cfg.shards = shards
    cfg.image_size = 16
    cfg.workers = 0
    cfg.shuffle_buffer = 0
    cfg.max_pixels = 50_000
    cfg.max_bad_fraction = 1.0
    for k, v in kw.items():
        cfg[k] = v
    return cfg
