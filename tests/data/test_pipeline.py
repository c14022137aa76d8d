"""Webdataset pipeline: shard lists, tar grouping, order, resume, decoding."""
import io
import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from _shards import CharTokenizer, make_image, sample_members, write_dataset, write_tar
from mmjax.data import decode, pipeline, sources, tario
from mmjax.errors import ConfigError

TOK = CharTokenizer(16)


def _cfg(pattern, **kw):
    cfg = pipeline.default_data_config()
    cfg.shards = pattern
    cfg.image_size = 24
    cfg.workers = 0
    cfg.shuffle_buffer = 0
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for a, b in zip(batches_a, batches_b))


# --- shard lists ----------------------------------------------------------

def test_brace_expansion_ranges_sets_and_lists():
    got = sources.expand_braces("/d/{00008..00011}.tar")
    assert got == [f"/d/{i:05d}.tar" for i in range(8, 12)]
    got = sources.expand_braces("gs://b/{train,val}-{0..2}/x{a,b{1,2}}.tar")
    want = [f"gs://b/{s}-{i}/x{t}.tar" for s in ("train", "val") for i in range(3)
            for t in ("a", "b1", "b2")]
    assert got == want
    assert sources.expand_braces("{9..11}") == ["9", "10", "11"]  # no padding asked
    assert sources.expand_braces("p{}q") == ["p{}q"]
    assert sources.split_patterns("a{0..1}::b") == ["a{0..1}", "b"]
    assert sources.split_patterns(["a", "b::c"]) == ["a", "b", "c"]


def test_shards_from_list_and_missing_pattern_error(tmp_path):
    paths = write_dataset(tmp_path, 3, 1)
    spec = [str(tmp_path / "shard-{000..001}.tar"), paths[2]]
    assert sources.expand_shards(spec) == paths
    assert sources.expand_shards(str(tmp_path / "shard-*.tar")) == paths
    for bad in ("", [], str(tmp_path / "nope-{0..3}.tar"), str(tmp_path / "*.zip")):
        with pytest.raises(ValueError, match="data.train.shards"):
            pipeline.build_train_iterator(_cfg(bad), 2, process_index=0, process_count=1,
                                          tokenizer=TOK)


def test_too_few_shards_for_processes_times_workers(tmp_path):
    write_dataset(tmp_path, 3, 1)
    cfg = _cfg(str(tmp_path / "shard-*.tar"), workers=2)
    with pytest.raises(ValueError, match=r"3 shards but 2 processes x 2 workers"):
        pipeline.build_train_iterator(cfg, 2, process_index=0, process_count=2, tokenizer=TOK)


# --- tar grouping ---------------------------------------------------------

def test_key_grouping_across_members(tmp_path):
    members = [("a.b/c.jpg", b"1"), ("a.b/c.txt", b"2"), ("a.b/c.json", b"{}"),
               ("d/e.f.g/k.seg.PNG", b"3"), ("d/e.f.g/k.cls", b"7"),
               ("README", b"x"), ("z.txt", b"4"), ("a.b/c.cls", b"5")]
    path = tmp_path / "g.tar"
    write_tar(path, members)
    with open(path, "rb") as f:
        got = list(tario.iter_tar_samples(f))
    # Reference: consecutive runs of (dir + basename before its first dot).
    def key(name):
        d, _, b = name.rpartition("/")
        return (d + "/" if d else "") + b.split(".", 1)[0]
    named = [(key(n), n.rsplit("/", 1)[-1].split(".", 1)[1].lower(), v)
             for n, v in members if "." in n.rsplit("/", 1)[-1]]
    want = []
    for k, grp in itertools.groupby(named, key=lambda t: t[0]):
        want.append((k, {e: v for _, e, v in grp}))
    assert [(k, m) for _, k, m in got] == want
    assert [i for i, _, _ in got] == list(range(len(want)))
    assert got[1][1] == "d/e.f.g/k" and set(got[1][2]) == {"seg.png", "cls"}
    with open(path, "rb") as f:  # skipping keeps indices stable
        assert [i for i, _, _ in tario.iter_tar_samples(f, keep=lambda i: i >= 2)] == [2, 3]


class _NoSeek(io.RawIOBase):
    """A stream that can only be read (like a pipe or an HTTP body)."""

    def __init__(self, data):
        self._f = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self._f.readinto(b)


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar", "gz"])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    # Long names (GNU 'L' / PAX records / ustar prefix), non-ASCII names, an
    # empty member, a directory and a symlink; tarfile is the reference.
    import tarfile
    rng = np.random.default_rng(0)
    long_dir = "deep/" + "d" * 120 if fmt != "ustar" else "deep/" + "d" * 90
    files = [(f"{long_dir}/s{i}.{ext}", rng.bytes(int(n)))
             for i in range(3) for ext, n in (("jpg", 700 + 300 * i), ("txt", 5))]
    files += [("x/caf\u00e9.txt", b"pax name" if fmt == "pax" else b"x"), ("x/empty.cls", b"")]
    if fmt == "ustar":
        files = [(n.encode("ascii", "replace").decode(), v) for n, v in files]
    tar_format = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
                  "ustar": tarfile.USTAR_FORMAT, "gz": tarfile.PAX_FORMAT}[fmt]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if fmt == "gz" else "w", format=tar_format) as tf:
        tf.addfile(_dir_info(tarfile))
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("x/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "caf\u00e9.txt"
        tf.addfile(link)
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # the reference reading
        want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    assert [n for n, _ in want] == [n for n, _ in files]
    groups = {}
    for name, value in want:
        key, ext = tario.split_member_name(name)
        groups.setdefault(key, {})[ext] = value
    for stream in (io.BytesIO(data), _NoSeek(data)):
        got = list(tario.iter_tar_samples(stream))
        assert [(k, m) for _, k, m in got] == list(groups.items())
    # Skipping (keep) and stopping keep indices; a cut at any point in the
    # data of sample 1 delivers sample 0 and names the truncation.
    got = list(tario.iter_tar_samples(_NoSeek(data), keep=lambda i: i == 2))
    assert [(i, k) for i, k, m in got] == [(2, list(groups)[2])]
    if fmt != "gz":
        cut = data.index(files[3][1][:64]) + 10  # inside sample 1's jpg
        for stream in (io.BytesIO(data[:cut]), _NoSeek(data[:cut])):
            seen = []
            with pytest.raises(tario.ShardReadError) as e:
                for _, key, _ in tario.iter_tar_samples(stream):
                    seen.append(key)
            assert e.value.reason == tario.TRUNCATED_TAR and seen == [list(groups)[0]]


def _dir_info(tarfile):
    info = tarfile.TarInfo("a_directory")
    info.type = tarfile.DIRTYPE
    return info


def test_tar_reader_rejects_non_tars():
    rng = np.random.default_rng(1)
    for data in (b"hello", rng.bytes(4096), b"\0" * 100):
        with pytest.raises(tario.ShardReadError) as e:
            list(tario.iter_tar_samples(io.BytesIO(data)))
        assert e.value.reason == tario.NOT_TAR
    with pytest.raises(tario.ShardReadError) as e:
        list(tario.iter_tar_samples(io.BytesIO(b"")))
    assert e.value.reason == tario.EMPTY_SHARD


# --- order, splitting, determinism ----------------------------------------

def test_process_worker_split_covers_every_shard_once(tmp_path):
    write_dataset(tmp_path, 12, 4)
    for epoch in (0, 1):
        lists = [pipeline.worker_shards(12, 5, epoch, p, 3, w, 2)
                 for p in range(3) for w in range(2)]
        assert sorted(sum(lists, [])) == list(range(12))
    assert pipeline.worker_shards(12, 5, 0, 0, 3, 0, 2) != pipeline.worker_shards(12, 5, 1, 0, 3, 0, 2) \
        or pipeline.worker_shards(12, 5, 0, 1, 3, 0, 2) != pipeline.worker_shards(12, 5, 1, 1, 3, 0, 2)
    # Real reads: each worker owns 2 shards = 8 samples = 2 batches of 4, so 4
    # batches per process is exactly epoch 0.
    seen = []
    for p in range(3):
        cfg = _cfg(str(tmp_path / "shard-{000..011}.tar"), workers=2, seed=5,
                   start_method="spawn")
        it = pipeline.build_train_iterator(cfg, 4, process_index=p, process_count=3,
                                           tokenizer=TOK)
        try:
            labels = np.concatenate([b["label"] for b in _take(it, 4)]).tolist()
        finally:
            it.close()
        assert len({lab // 1000 for lab in labels}) == 4  # 4 whole shards per process
        seen += labels
    assert sorted(seen) == sorted(i * 1000 + j for i in range(12) for j in range(4))


def test_same_seed_same_stream_different_seed_different(tmp_path):
    write_dataset(tmp_path, 4, 6)
    pat = str(tmp_path / "shard-*.tar")
    run = lambda seed: _take(pipeline.build_train_iterator(  # noqa: E731
        _cfg(pat, shuffle_buffer=5, flip=True, crop_scale=(0.3, 1.0)), 4, seed=seed,
        process_index=0, process_count=1, tokenizer=TOK), 6)
    a, b, c = run(1), run(1), run(2)
    assert _same(a, b)
    assert not any(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_exact(tmp_path, workers):
    write_dataset(tmp_path, 4, 5)
    cfg = _cfg(str(tmp_path / "shard-*.tar"), workers=workers, shuffle_buffer=6, flip=True,
               crop_scale=(0.2, 1.0), output="uint8")
    build = lambda: pipeline.build_train_iterator(  # noqa: E731
        cfg, 3, process_index=0, process_count=1, tokenizer=TOK)
    it = build()
    try:
        _take(it, 5)
        state = json.loads(json.dumps(it.get_state()))
        # 5 + 8 batches x 3 rows > 20 samples: the reference crosses an epoch.
        reference = _take(it, 8)
    finally:
        it.close()
    assert any(len(s["buffer"]) > 0 for s in state["worker_states"])
    resumed = build()
    try:
        resumed.set_state(state)
        assert _same(_take(resumed, 8), reference)
        assert resumed.stats()["ok"] == 13 * 3
    finally:
        resumed.close()


def test_weighted_sources_follow_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_dataset(tmp_path / "a", 4, 2, prefix="a", size=(16, 16))
    write_dataset(tmp_path / "b", 4, 2, prefix="b", size=(16, 16))
    cfg = _cfg([str(tmp_path / "a" / "a-*.tar"), str(tmp_path / "b" / "b-*.tar")],
               weights=[3.0, 1.0], resampled=True, image_size=8)
    it = pipeline.build_train_iterator(cfg, 20, process_index=0, process_count=1, tokenizer=TOK)
    texts = [TOK.decode(t) for b in _take(it, 30) for t in b["text"]]
    frac_a = np.mean([t.startswith("a-") for t in texts])
    # 300 shard draws, p = 0.75: std 0.025.
    assert abs(frac_a - 0.75) < 0.1
    with pytest.raises(ValueError, match="data.train.resampled"):
        pipeline.build_train_iterator(_cfg(cfg.shards, weights=[1.0, 1.0]), 2,
                                      process_index=0, process_count=1, tokenizer=TOK)


def test_eval_reads_every_sample_once_in_fixed_order(tmp_path):
    write_dataset(tmp_path, 3, 5, label=False)
    cfg = _cfg(str(tmp_path / "shard-*.tar"), caption_key="txt")
    batches = list(pipeline.build_eval_iterator(cfg, 4, process_index=0, process_count=1,
                                                tokenizer=TOK))
    assert len(batches) == 4 and batches[-1]["valid"].tolist() == [True, True, True, False]
    texts = [TOK.decode(t) for b in batches for t, v in zip(b["text"], b["valid"]) if v]
    assert texts == [f"shard-{i}-{j}" for i in range(3) for j in range(5)]
    assert (batches[0]["label"] == -1).all()


def test_json_caption_key(tmp_path):
    members = sum((sample_members(f"k{j}", f"cap {j}", make_image(j), caption_json=True)
                   for j in range(3)), [])
    write_tar(tmp_path / "j.tar", members)
    cfg = _cfg(str(tmp_path / "j.tar"), caption_key="json:caption")
    batch = next(pipeline.build_eval_iterator(cfg, 3, process_index=0, process_count=1,
                                              tokenizer=TOK))
    assert [TOK.decode(t) for t in batch["text"]] == ["cap 0", "cap 1", "cap 2"]


# --- decoding -------------------------------------------------------------

def test_rrc_box_follows_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        left, top, cw, ch = decode.random_resized_crop_box(w, h, rng, (0.3, 0.6), (0.5, 2.0))
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
        frac, aspect = cw * ch / (w * h), cw / ch
        fallback = (left, top) == ((w - cw) // 2, (h - ch) // 2)
        if not fallback:  # rounding of w, h to integers allows a small slack
            assert 0.3 * 0.85 < frac < 0.6 * 1.15
            assert 0.5 * 0.85 < aspect < 2.0 * 1.15


def test_draft_decode_of_large_jpeg_matches_full_decode():
    # Smooth content, so the comparison measures geometry, not JPEG noise.
    y, x = np.mgrid[0:768, 0:1024]
    img = np.stack([128 + 100 * np.sin(x / 40), 128 + 100 * np.cos(y / 30),
                    128 + 60 * np.sin((x + y) / 55)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    out, factor = decode.decode_and_crop(buf.getvalue(), 64, None, augment="center")
    assert factor == 8 and out.shape == (64, 64, 3) and out.dtype == np.uint8
    # Reference: the central 768x768 square, float64 12x12 box averages.
    ref = img[:, 128:896].astype(np.float64).reshape(64, 12, 64, 12, 3).mean(axis=(1, 3))
    shifted = img[:, 120:888].astype(np.float64).reshape(64, 12, 64, 12, 3).mean(axis=(1, 3))
    assert np.abs(out - ref).mean() < 1.5 < np.abs(out - shifted).mean()
    small, factor = decode.decode_and_crop(make_image(3, 100, 80), 64, None, augment="center")
    assert factor == 1 and small.shape == (64, 64, 3)


def test_warp_resample_matches_antialiased_resize_and_flips():
    # Smooth content plus a sharp square: the bilinear warp (shrink < 2) must
    # land on the same geometry as Pillow's antialiased filter; a box shifted by
    # one source pixel must not.
    y, x = np.mgrid[0:300, 0:280]
    arr = np.stack([128 + 90 * np.sin(x / 17), 128 + 90 * np.cos(y / 13),
                    128 + 50 * np.sin((x - y) / 23)], -1)
    arr[100:160, 90:150] = 255
    img = Image.fromarray(arr.astype(np.uint8))
    box = (12.5, 20.25, 12.5 + 250.0, 20.25 + 262.0)  # shrink 1.12 x 1.17 to 224
    assert decode._optional("cv2") is not None  # opencv-python-headless is a dependency
    warped = decode.resample_box(img, box, 224).astype(np.float64)
    ref = np.asarray(img.resize((224, 224), decode.RESAMPLE, box=box), np.float64)
    moved = np.asarray(img.resize((224, 224), decode.RESAMPLE,
                                  box=(box[0] + 1, box[1], box[2] + 1, box[3])), np.float64)
    err = np.abs(warped - ref).mean()
    assert err < 0.5 and err * 5 < np.abs(warped - moved).mean()
    flipped = decode.resample_box(img, box, 224, flip=True)
    assert np.abs(flipped[:, ::-1].astype(np.float64) - warped).max() <= 1
    # A shrink over MAX_LINEAR_SHRINK goes through Pillow's antialiased filter.
    big = (0, 0, 280, 300)
    assert np.array_equal(decode.resample_box(img, big, 64),
                          np.asarray(img.resize((64, 64), decode.RESAMPLE, box=big)))


def test_turbo_jpeg_decode_equals_pillow_draft_decode(monkeypatch):
    # simplejpeg (libjpeg-turbo) at scale 1/k gives Pillow's draft pixels (CMYK
    # to RGB within rounding); truncated files fall back to Pillow, which raises.
    assert decode._optional("simplejpeg") is not None  # a dependency
    y, x = np.mgrid[0:300, 0:420]
    arr = np.stack([x % 251, y % 241, (x * y) % 239], -1).astype(np.uint8)
    blobs = {}
    for mode in ("RGB", "L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
        blobs[mode] = buf.getvalue()
    cases = [(mode, size, aug) for mode in blobs for size, aug in ((64, "center"), (100, "rrc"))]
    turbo = [decode.decode_and_crop(blobs[m], s, np.random.default_rng(3), augment=a)
             for m, s, a in cases]
    monkeypatch.setitem(decode._OPTIONAL, "simplejpeg", None)
    pillow = [decode.decode_and_crop(blobs[m], s, np.random.default_rng(3), augment=a)
              for m, s, a in cases]
    for (mode, size, _), (a, fa), (b, fb) in zip(cases, turbo, pillow):
        assert a.shape == (size, size, 3) and fa == fb
        diff = np.abs(a.astype(int) - b).max()
        assert diff <= (3 if mode == "CMYK" else 0), (mode, size, diff)
    assert [f for _, f in turbo] == [4, 2, 4, 2, 4, 2]
    monkeypatch.undo()
    with pytest.raises(OSError):
        decode.decode_and_crop(blobs["RGB"][:len(blobs["RGB"]) // 2], 64, None, augment="center")


def test_rrc_and_center_shapes_and_determinism():
    data = make_image(1, 300, 200)
    png = make_image(1, 300, 200, fmt="PNG")
    for blob in (data, png):
        a, _ = decode.decode_and_crop(blob, 40, np.random.default_rng(7), augment="rrc",
                                      scale=(0.08, 1.0), flip=True)
        b, _ = decode.decode_and_crop(blob, 40, np.random.default_rng(7), augment="rrc",
                                      scale=(0.08, 1.0), flip=True)
        c, _ = decode.decode_and_crop(blob, 40, None, augment="center")
        assert a.shape == c.shape == (40, 40, 3) and np.array_equal(a, b)
    with pytest.raises(decode.ImageTooLarge, match="max_pixels"):
        decode.decode_and_crop(data, 40, None, augment="center", max_pixels=1000)


def test_uint8_and_float32_outputs_agree(tmp_path):
    write_dataset(tmp_path, 2, 4)
    pat = str(tmp_path / "shard-*.tar")
    mk = lambda out: next(pipeline.build_train_iterator(  # noqa: E731
        _cfg(pat, output=out, shuffle_buffer=3, flip=True), 5, process_index=0,
        process_count=1, tokenizer=TOK))
    u8, f32 = mk("uint8"), mk("float32")
    assert u8["image"].dtype == np.uint8 and f32["image"].dtype == np.float32
    mean, std = np.array(decode.CLIP_MEAN), np.array(decode.CLIP_STD)
    ref = (u8["image"].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(f32["image"], ref, atol=1e-5)
    dev = np.asarray(decode.normalize_on_device(u8["image"], decode.CLIP_MEAN, decode.CLIP_STD))
    np.testing.assert_allclose(dev, ref, atol=1e-5)
    assert np.array_equal(u8["text"], f32["text"]) and np.array_equal(u8["label"], f32["label"])
    assert math.isclose(float(ref.std()), float(f32["image"].std()), rel_tol=1e-5)


def test_eval_with_more_workers_than_shards(tmp_path):
    write_dataset(tmp_path, 1, 3)
    cfg = _cfg(str(tmp_path / "shard-*.tar"), workers=2)
    it = pipeline.build_eval_iterator(cfg, 2, process_index=0, process_count=1, tokenizer=TOK)
    try:
        labels = [int(x) for b in it for x in b["label"][b["valid"]]]
    finally:
        it.close()
    assert labels == [0, 1, 2]


# --- config names, paths ---------------------------------------------------

def test_an_unknown_text_format_names_the_choices(tmp_path):
    write_dataset(tmp_path, 1, 2)
    for fmt in ("captions", "lines"):
        with pytest.raises(ConfigError, match=r"text_format must be one of 'caption', "
                                              r"'caption_list', 'dialog', 'vqa', got '" + fmt):
            pipeline.build_eval_iterator(_cfg(str(tmp_path / "shard-*.tar"), text_format=fmt),
                                         2, process_index=0, process_count=1, tokenizer=TOK)


def test_file_urls_are_local_for_shards_and_workdirs(tmp_path):
    from mmjax.paths import is_remote
    from mmjax import workdir as wd
    assert not is_remote("file:///x/y") and not is_remote("/x/y") and is_remote("gs://b/y")
    assert wd.is_remote is sources.is_remote is is_remote  # one answer everywhere
    paths = write_dataset(tmp_path, 2, 3)
    url = "file://" + str(tmp_path / "shard-{000..001}.tar")
    assert sources.expand_shards(url) == ["file://" + p for p in paths]
    batch = next(pipeline.build_eval_iterator(_cfg(url), 6, process_index=0, process_count=1,
                                              tokenizer=TOK))
    assert [TOK.decode(t) for t in batch["text"]] == [f"shard-{i}-{j}" for i in range(2)
                                                        for j in range(3)]
    run = "file://" + str(tmp_path / "run")
    assert wd.resolve(run) == str(tmp_path / "run")
    wd.makedirs(run)
    wd.write_text(wd.join(run, "config.json"), "{}")
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
    assert wd.exists(wd.join(run, "config.json")) and wd.isdir(run)
    assert wd.read_text(wd.join(run, "config.json")) == "{}"
