"""More bad data: compressed shards cut short, worker processes outliving a
killed trainer, 16-bit images, invalid JSON captions, bad-sample totals."""
import gzip
import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest

from _helpers import TESTS, process_alive
from _shards import (CharTokenizer, fault_config as _cfg, make_image, sample_members,
                     write_dataset, write_tar)
from mmjax.data import pipeline, tario

TOK = CharTokenizer(16)


# --- compressed shards cut short ----------------------------------------------

def _gz_cut(tar_bytes: bytes, at: int) -> bytes:
    """A gzip of ``tar_bytes`` cut so that it decompresses to exactly ``tar_bytes[:at]``
    (a full flush at ``at``, the file ends there: no rest of the stream, no trailer)."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = c.compress(tar_bytes[:at]) + c.flush(zlib.Z_FULL_FLUSH)
    assert zlib.decompressobj(31).decompress(out) == tar_bytes[:at]  # the premise
    return out


@pytest.fixture(scope="module")
def gz_shards(tmp_path_factory):
    """A good plain shard, a .tar.gz cut inside member data, one cut exactly at a
    member boundary (tarfile reads that as a clean end), one whole .tar.gz minus
    its last 8 bytes (the gzip trailer), and another good shard."""
    root = tmp_path_factory.mktemp("gz")
    paths = write_dataset(root, 1, 3, prefix="a")
    full = root / "full.tar"
    write_tar(full, sum((sample_members(f"t{j}", f"t{j}", make_image(7000 + j), 7000 + j)
                         for j in range(4)), []))
    raw = full.read_bytes()
    with tarfile.open(full) as tf:
        t2 = tf.getmember("t2.jpg")
    in_data = _gz_cut(raw, t2.offset_data + 20)   # inside sample 2's image data
    at_boundary = _gz_cut(raw, t2.offset)         # right before sample 2's header
    # Check the boundary cut really looks like a clean end to tarfile.
    with tarfile.open(fileobj=io.BytesIO(at_boundary), mode="r|gz") as tf:
        assert [m.name for m in tf][-1] == "t1.cls"
    whole = gzip.compress(raw, mtime=0)
    files = {"cut_data.tar.gz": in_data, "cut_boundary.tar.gz": at_boundary,
             "no_trailer.tar.gz": whole[:-8]}
    for name, data in files.items():
        (root / name).write_bytes(data)
    paths += [str(root / n) for n in files]
    paths += write_dataset(root, 1, 2, prefix="z")
    full.unlink()
    good = sorted([j for j in range(3)] + [7000, 7001] * 2 + [7000, 7001, 7002, 7003]
                  + [j for j in range(2)])
    return paths, good


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_tar_gz_is_counted_and_keeps_earlier_samples(gz_shards, workers, caplog):
    paths, good = gz_shards
    it = pipeline.build_eval_iterator(_cfg(paths, workers=workers), 4, process_index=0,
                                      process_count=1, tokenizer=TOK)
    try:
        with caplog.at_level(logging.WARNING, logger="mmjax.data.pipeline"):
            labels = [int(x) for b in it for x in b["label"][b["valid"]]]
        # The samples before each cut exactly once; the cut sample left out.
        assert sorted(labels) == good
        assert it.stats() == {"ok": len(good), "truncated_tar": 3}
    finally:
        it.close()
    if workers == 0:  # log lines of worker processes do not reach caplog
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "truncated_tar" in text and "cut_data.tar.gz" in text


@pytest.mark.parametrize("name,keys", [("cut_data.tar.gz", ["t0", "t1"]),
                                       ("cut_boundary.tar.gz", ["t0", "t1"]),
                                       ("no_trailer.tar.gz", ["t0", "t1", "t2", "t3"])])
def test_tar_gz_cut_raises_truncated_after_the_complete_samples(gz_shards, name, keys):
    paths, _ = gz_shards
    path = next(p for p in paths if p.endswith(name))
    seen = []
    with open(path, "rb") as f, pytest.raises(tario.ShardReadError) as e:
        for _, key, _ in tario.iter_tar_samples(f):
            seen.append(key)
    assert e.value.reason == tario.TRUNCATED_TAR and seen == keys
    assert "gzip" in str(e.value)


def test_compressed_tars_read_whole_and_concatenated(tmp_path):
    import bz2
    import lzma
    members = sum((sample_members(f"c{j}", f"c{j}", make_image(j), j) for j in range(3)), [])
    write_tar(tmp_path / "c.tar", members)
    raw = (tmp_path / "c.tar").read_bytes()
    want = [f"c{j}" for j in range(3)]
    half = len(raw) // 2  # two gzip members, one tar (as bgzip writes)
    for data in (gzip.compress(raw), bz2.compress(raw), lzma.compress(raw),
                 gzip.compress(raw[:half]) + gzip.compress(raw[half:])):
        got = [k for _, k, _ in tario.iter_tar_samples(io.BytesIO(data))]
        assert got == want
    bad = bytearray(gzip.compress(raw))
    bad[len(bad) // 2] ^= 0xFF  # corrupt deflate data mid-way
    with pytest.raises(tario.ShardReadError) as e:
        list(tario.iter_tar_samples(io.BytesIO(bytes(bad))))
    assert e.value.reason == tario.TRUNCATED_TAR


# --- worker processes die with the trainer -------------------------------------

_TRAINER = r"""
import multiprocessing, sys, time
sys.path.insert(0, sys.argv[1])
from _shards import CharTokenizer
from mmjax.data import pipeline
cfg = pipeline.default_data_config()
cfg.shards = sys.argv[2]
cfg.image_size = 16
cfg.workers = 2
cfg.shuffle_buffer = 4
it = pipeline.build_train_iterator(cfg, 2, process_index=0, process_count=1,
                                   tokenizer=CharTokenizer(16))
next(it)
from multiprocessing import resource_tracker
tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True)
print("tracker", tracker or "", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_workers_and_resource_tracker_exit_when_the_trainer_is_killed(tmp_path):
    write_dataset(tmp_path, 2, 8)
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, TESTS,
                             str(tmp_path / "shard-*.tar")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        lines = {}
        for _ in range(2):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            name, *values = line.split()
            lines[name] = [int(v) for v in values]
        workers, tracker = lines["workers"], lines["tracker"]
        pids = workers + tracker
        assert len(workers) == 2 and all(process_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(process_alive(p) for p in pids):
            time.sleep(0.1)
        alive = [p for p in pids if process_alive(p)]
        assert not alive, (f"still running {5.0}s after the trainer was killed: {alive} "
                           f"(workers {workers}, resource tracker {tracker})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:  # do not leave them behind when the test fails
            if process_alive(p):
                os.kill(p, signal.SIGKILL)


# --- 16-bit images ------------------------------------------------------------------

def _to8(v):
    """The expected 8-bit value of a 16-bit one: round(v / 257) (0 -> 0, 65535 -> 255,
    an 8-bit value widened by x257 comes back exactly); v >> 8 is within 1 of it."""
    return np.floor(np.asarray(v, np.float64) / 257 + 0.5)


def _png16_rgb(arr):
    """A 48-bit RGB PNG written by hand (Pillow does not write them)."""
    import struct
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _gray16(side=32, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 65536, (side, side)).astype(np.uint16)
    values[0, :4] = [0, 257, 32896, 65535]  # 0, 1, 128, 255 in 8 bits
    return values


def _pil(mode, values):
    from PIL import Image
    if mode == "I;16":
        return Image.fromarray(values)  # little-endian uint16 -> I;16
    if mode == "I;16B":
        return Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    return Image.fromarray(values.astype(np.int32))  # "I": 32-bit integer pixels


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"),
                                      ("I", "TIFF")])
def test_16_bit_grayscale_is_scaled_to_8_bits(mode, fmt):
    from mmjax.data import decode
    values = _gray16()
    img = _pil(mode, values)
    assert img.mode == mode
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    side = values.shape[0]
    # Center crop of a square image at its own size: no resampling, pixels as decoded.
    out, _ = decode.decode_and_crop(buf.getvalue(), side, None, augment="center")
    want = _to8(values)
    assert out.shape == (side, side, 3) and out.dtype == np.uint8
    for c in range(3):
        assert np.abs(out[..., c].astype(int) - want).max() <= 1
    assert abs(out.mean() - want.mean()) < 0.5  # was ~254 against ~127
    assert out[0, :4, 0].tolist() == [0, 1, 128, 255]


def test_48_bit_rgb_png_is_scaled_to_8_bits():
    from mmjax.data import decode
    values = np.random.default_rng(1).integers(0, 65536, (24, 24, 3)).astype(np.uint16)
    out, _ = decode.decode_and_crop(_png16_rgb(values), 24, None, augment="center")
    assert np.abs(out.astype(int) - _to8(values)).max() <= 1


def test_16_bit_png_through_the_pipeline(tmp_path):
    from PIL import Image
    values = np.full((16, 16), 32896, np.uint16)  # 128 in 8 bits
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    write_tar(tmp_path / "g.tar", [("g0.png", buf.getvalue()), ("g0.txt", b"grey")])
    cfg = _cfg(str(tmp_path / "g.tar"), output="uint8")
    batch = next(pipeline.build_eval_iterator(cfg, 1, process_index=0, process_count=1,
                                              tokenizer=TOK))
    assert np.abs(batch["image"][0].astype(int) - 128).max() <= 1


# --- invalid JSON captions ----------------------------------------------------------

def test_invalid_json_caption_is_its_own_reason(tmp_path, caplog):
    members = (sample_members("j0", "first", make_image(0), caption_json=True)
               + [("j1.jpg", make_image(1)), ("j1.json", b'{"caption": "unterminated')]
               + [("j2.jpg", make_image(2)), ("j2.json", b'{"text": "no caption field"}')]
               + [("j3.jpg", make_image(3)), ("j3.json", b'{"caption": "caf\xe9"}')]  # not UTF-8
               + sample_members("j4", "last", make_image(4), caption_json=True))
    write_tar(tmp_path / "js.tar", members)
    cfg = _cfg(str(tmp_path / "js.tar"), caption_key="json:caption")
    it = pipeline.build_eval_iterator(cfg, 8, process_index=0, process_count=1, tokenizer=TOK)
    with caplog.at_level(logging.WARNING, logger="mmjax.data.pipeline"):
        batches = list(it)
    texts = [TOK.decode(t) for b in batches for t, v in zip(b["text"], b["valid"]) if v]
    assert texts == ["first", "last"]
    assert it.stats() == {"ok": 2, "invalid_json": 2, "no_caption": 1}
    lines = [r.getMessage() for r in caplog.records if "invalid_json" in r.getMessage()]
    assert lines and "js.tar" in lines[0] and "'j1'" in lines[0] and "JSON" in lines[0]


# --- the too-many-bad-samples error adds up ------------------------------------------

def test_bad_sample_error_totals_match_its_counts(tmp_path):
    import re
    members = []
    for j in range(10):  # 2 good, 5 corrupt images, 3 without caption, interleaved
        kind = "gcncgcnccc"[j]
        image = make_image(j) if kind in "gn" else b"\xff\xd8 not a jpeg" * 10
        members += sample_members(f"s{j}", None if kind == "n" else f"s{j}", image, j)
    write_tar(tmp_path / "mixed.tar", members)
    # A shuffle buffer holds samples that are read (parsed) but not yet decoded.
    cfg = _cfg(str(tmp_path / "mixed.tar"), shuffle_buffer=4, max_bad_fraction=0.5,
               min_bad_count=8)
    it = pipeline.build_train_iterator(cfg, 1, process_index=0, process_count=1, tokenizer=TOK)
    delivered = 0
    with pytest.raises(pipeline.DataError) as e:
        for _ in range(100):
            next(it)
            delivered += 1
    msg = str(e.value)
    bad, total = map(int, re.search(r"(\d+) of (\d+) samples", msg).groups())
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", msg.split("Counts:")[1])}
    assert bad == 8 == counts["corrupt_image"] + counts["no_caption"]
    assert counts["ok"] == delivered  # every sample handed out is an "ok"
    assert total == bad + delivered
    assert set(counts) == {"ok", "corrupt_image", "no_caption"}
