"""Shard writer, shards_from_folder and the `mmjax shards` command, read back with tarfile."""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmjax.commands.shards import shards_command
from mmjax.data.writer import ShardWriter, shards_from_folder


def _read_tar(path):
    """[(member name, bytes)] of a tar file, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _samples_in(shards):
    """{key: {ext: bytes}} over shards; fails if a key appears in two shards."""
    out = {}
    for path in shards:
        seen_here = set()
        for name, data in _read_tar(path):
            key, ext = name.split(".", 1)
            assert key not in out or key in seen_here, f"{key} split across shards"
            seen_here.add(key)
            out.setdefault(key, {})[ext] = data
    return out


def _random_samples(n, seed=0, max_payload=3000):
    rng = np.random.default_rng(seed)
    return [{"__key__": f"s{i:05d}",
             "bin": rng.integers(0, 256, rng.integers(1, max_payload), dtype=np.uint8).tobytes(),
             "txt": f"caption number {i} ✓",
             "cls": int(i % 7),
             "json": {"i": i, "text": "naïve"}} for i in range(n)]


def _expected_bytes(sample):
    """Independent encoding of each field: what the tar must contain."""
    return {"bin": sample["bin"], "txt": sample["txt"].encode("utf-8"),
            "cls": str(sample["cls"]).encode(),
            "json": json.dumps(sample["json"], ensure_ascii=False, sort_keys=True).encode()}


def test_max_count_and_sizes_json(tmp_path):
    samples = _random_samples(30)
    with ShardWriter(str(tmp_path), max_count=7, prefix="train") as w:
        for s in samples:
            w.write(s)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted([f"train-{i:06d}.tar" for i in range(5)] + ["sizes.json"])
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {f"train-{i:06d}.tar": n for i, n in enumerate([7, 7, 7, 7, 2])}
    for name, n in sizes.items():  # sizes.json agrees with the tar contents
        assert len(_read_tar(tmp_path / name)) == 4 * n
    got = _samples_in(w.shards)
    assert list(got) == [s["__key__"] for s in samples]  # each once, in order
    for s in samples:
        assert got[s["__key__"]] == _expected_bytes(s)


def test_max_bytes_respected_and_pattern(tmp_path):
    samples = _random_samples(40, seed=1, max_payload=9000)
    limit = 40_000
    pattern = str(tmp_path / "out" / "part-%04d.tar")
    with ShardWriter(pattern, max_count=1000, max_bytes=limit) as w:
        for s in samples:
            w.write(s)
    assert len(w.shards) > 3
    names = [os.path.basename(p) for p in w.shards]
    assert names == [f"part-{i:04d}.tar" for i in range(len(w.shards))]
    for p in w.shards:
        assert os.path.getsize(p) <= limit
    # Greedy packing: a shard plus the next shard's first sample (4 members)
    # would have been over the limit, measured by writing that tar in memory.
    for cur, nxt in zip(w.shards, w.shards[1:]):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in _read_tar(cur) + _read_tar(nxt)[:4]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert len(buf.getvalue()) > limit
    got = _samples_in(w.shards)
    assert list(got) == [s["__key__"] for s in samples]
    assert sum(json.loads((tmp_path / "out" / "sizes.json").read_text()).values()) == 40
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_oversized_sample_gets_own_shard(tmp_path):
    big = {"__key__": "big", "bin": b"x" * 50_000}
    small = {"__key__": "small", "bin": b"y"}
    with ShardWriter(str(tmp_path), max_bytes=20_000) as w:
        for s in (small, big, small | {"__key__": "small2"}):
            w.write(s)
    assert [len(_read_tar(p)) for p in w.shards] == [1, 1, 1]


def test_deterministic_bytes(tmp_path):
    samples = _random_samples(12, seed=3)
    outs = []
    for d in ("a", "b"):
        with ShardWriter(str(tmp_path / d), max_count=5) as w:
            for s in samples:
                w.write(s)
        outs.append([open(p, "rb").read() for p in w.shards])
    assert outs[0] == outs[1]
    with tarfile.open(w.shards[0]) as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_bad_samples_rejected(tmp_path):
    with ShardWriter(str(tmp_path)) as w:
        with pytest.raises(ValueError, match="__key__"):
            w.write({"txt": "no key"})
        with pytest.raises(TypeError, match="float"):
            w.write({"__key__": "k", "x": 1.5})


# ---- shards_from_folder ------------------------------------------------------

@pytest.fixture()
def image_folder(tmp_path):
    """Five real image files (png/jpg/jpeg) with random content."""
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    files = {}
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.JPEG", "d.png", "e.jpg"]):
        img = Image.fromarray(rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG" if name.endswith("png") else "JPEG")
        (d / name).write_bytes(buf.getvalue())
        files[name] = buf.getvalue()
    return d, files


def _check_report(report, rows_good, files, expect_labels):
    got = _samples_in(report.shards)
    assert report.written == len(rows_good) == len(got)
    # Each good row exactly once, image bytes unchanged under their extension.
    by_file = {}
    for sample in got.values():
        meta = json.loads(sample["json"])
        assert meta["file"] not in by_file
        by_file[meta["file"]] = sample
    for name, caption, label in rows_good:
        s = by_file[name]
        ext = name.rsplit(".", 1)[1].lower()
        assert s[ext] == files[name]
        assert s["txt"].decode() == caption
        if expect_labels:
            assert int(s["cls"]) == label and json.loads(s["json"])["label"] == label


def test_shards_from_folder_csv(image_folder, tmp_path):
    d, files = image_folder
    cap = tmp_path / "captions.csv"
    good = [("a.png", "a cat, on a mat", 3), ("b.jpg", "a dog", 0),
            ("sub/c.JPEG", 'quoted "caption"', 5), ("e.jpg", "last one", 1)]
    with open(cap, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption", "label"])
        w.writerow(good[0]); w.writerow(good[1])
        w.writerow(["missing.png", "no such image", 1])
        w.writerow(["d.png", "", 2])                # empty caption
        w.writerow(good[2])
        w.writerow(["notes.txt", "not an image", 1])
        w.writerow(["", "no file", 1])
        w.writerow(good[3])
    report = shards_from_folder(str(d), str(cap), str(tmp_path / "out"), max_count=3,
                                progress=False)
    assert dict(report.skipped) == {"missing image file": 1, "missing caption": 1,
                                    "not an image extension": 1, "no file/image field": 1}
    assert len(report.shards) == 2
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == \
        {"shard-000000.tar": 3, "shard-000001.tar": 1}
    _check_report(report, good, files, expect_labels=True)
    assert "skipped 4" in report.summary()


def test_shards_from_folder_jsonl(image_folder, tmp_path):
    d, files = image_folder
    cap = tmp_path / "captions.jsonl"
    good = [("d.png", "json one", None), ("a.png", "json two", None), ("b.jpg", "three", None)]
    lines = [json.dumps({"image": good[0][0], "caption": good[0][1], "source": "x"}),
             "{not json",
             json.dumps({"image": good[1][0], "caption": good[1][1]}),
             json.dumps({"image": "gone.jpg", "caption": "missing"}),
             json.dumps({"image": "e.jpg"}),           # no caption
             json.dumps([1, 2]),                       # not an object
             "",
             json.dumps({"file": good[2][0], "caption": good[2][1]})]
    cap.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = shards_from_folder(str(d), str(cap), str(tmp_path / "out"), progress=False)
    assert dict(report.skipped) == {"unparseable row": 2, "missing image file": 1,
                                    "missing caption": 1}
    _check_report(report, good, files, expect_labels=False)
    got = _samples_in(report.shards)
    assert all("cls" not in s for s in got.values())
    assert json.loads(got["000000000"]["json"])["source"] == "x"  # extra fields kept


# ---- the command -----------------------------------------------------------------

def test_shards_command_folder_and_errors(image_folder, tmp_path, capsys):
    d, files = image_folder
    cap = tmp_path / "c.csv"
    cap.write_text("image,caption\na.png,one\nb.jpg,two\n", encoding="utf-8")
    out = tmp_path / "out"
    assert shards_command(["--images", str(d), "--captions", str(cap), "--out", str(out),
                           "--max-count", "1", "--quiet"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == \
        {"shard-000000.tar": 1, "shard-000001.tar": 1}

    capsys.readouterr()
    assert shards_command(["--images", str(tmp_path / "nope"), "--captions", str(cap),
                           "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "--images" in err
    assert shards_command(["--images", str(d), "--captions", str(tmp_path / "x.csv"),
                           "--out", str(out)]) == 2
    assert "x.csv" in capsys.readouterr().err
    assert shards_command(["--images", str(d), "--out", str(out)]) == 2
    assert "--captions" in capsys.readouterr().err
    assert shards_command(["--bogus"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\nmissing.png,x\n", encoding="utf-8")
    assert shards_command(["--images", str(d), "--captions", str(bad), "--out",
                           str(tmp_path / "o2"), "--quiet"]) == 2
    assert "1 missing image file" in capsys.readouterr().err


def test_shards_command_synthetic(tmp_path):
    out = tmp_path / "syn"
    assert shards_command(["--synthetic", "--split", "test", "--num-samples", "10",
                           "--image-size", "16", "--max-count", "4", "--out", str(out)]) == 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"test-000000.tar": 4, "test-000001.tar": 4, "test-000002.tar": 2}
    got = _samples_in([str(out / n) for n in sizes])
    assert len(got) == 10
    img = Image.open(io.BytesIO(got["000000003"]["jpg"]))
    assert img.size == (16, 16)


# ---- `mmjax shards` into a used folder, undecodable images, bad captions files ------

def _cli(argv, capsys):
    """(exit code, stderr lines) of ``mmjax shards ...`` through the real entry point."""
    from mmjax.cli import main
    capsys.readouterr()
    code = main(["shards", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_shards_command_refuses_non_empty_out_unless_overwrite(image_folder, tmp_path, capsys):
    d, files = image_folder
    cap = tmp_path / "c.csv"
    cap.write_text("file,caption\na.png,one\nb.jpg,two\nd.png,three\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--images", str(d), "--captions", str(cap), "--out", str(out), "--quiet"]
    assert _cli(args + ["--max-count", "1"], capsys)[0] == 0
    assert _cli(args + ["--prefix", "old"], capsys)[0] == 2  # the folder is in use now
    (out / "notes.txt").write_text("mine")
    (out / "mine.tar").write_bytes(b"not a shard of the writer")
    (out / "sub").mkdir()
    before = sorted(os.listdir(out))

    code, err = _cli(args + ["--max-count", "5"], capsys)
    assert code == 2 and len(err) == 1
    assert str(out) in err[0] and "not empty" in err[0] and "--overwrite" in err[0]
    assert sorted(os.listdir(out)) == before  # nothing touched

    code, err = _cli(args + ["--max-count", "5", "--overwrite"], capsys)
    assert code == 0
    # The earlier shards are gone; files the writer does not make are kept.
    assert sorted(os.listdir(out)) == ["mine.tar", "notes.txt", "shard-000000.tar",
                                       "sizes.json", "sub"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 3}
    assert (out / "notes.txt").read_text() == "mine"
    assert len(_samples_in([str(out / "shard-000000.tar")])) == 3


def test_shards_command_synthetic_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["--synthetic", "--num-samples", "4", "--image-size", "8", "--max-count", "2",
            "--out", str(out)]
    assert _cli(args, capsys)[0] == 0
    code, err = _cli(args[:-4] + ["--max-count", "4", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert _cli(args[:-4] + ["--max-count", "4", "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["sizes.json", "train-000000.tar"]


def test_shards_command_leaves_out_undecodable_images(image_folder, tmp_path, capsys):
    d, files = image_folder
    (d / "cut.png").write_bytes(files["a.png"][: len(files["a.png"]) // 2])
    (d / "noise.jpg").write_bytes(np.random.default_rng(3).bytes(500))
    (d / "empty.jpg").write_bytes(b"")
    cap = tmp_path / "c.csv"
    cap.write_text("file,caption\na.png,one\ncut.png,two\nb.jpg,three\nnoise.jpg,four\n"
                   "empty.jpg,five\ne.jpg,six\n", encoding="utf-8")
    out = tmp_path / "out"
    code, err = _cli(["--images", str(d), "--captions", str(cap), "--out", str(out),
                      "--quiet"], capsys)
    assert code == 0
    for name in ("cut.png", "noise.jpg", "empty.jpg"):  # one line each, naming the file
        assert len([line for line in err if name in line]) == 1
    assert "3 image does not decode" in err[-1] and "wrote 3 samples" in err[-1]
    got = _samples_in([str(out / "shard-000000.tar")])
    assert sorted(json.loads(s["json"])["file"] for s in got.values()) == \
        ["a.png", "b.jpg", "e.jpg"]


def test_many_undecodable_images_are_reported_rate_limited(image_folder, tmp_path, capsys):
    d, _ = image_folder
    rows = ["file,caption", "a.png,good"]
    for i in range(40):
        (d / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
        rows.append(f"bad{i}.png,bad")
    cap = tmp_path / "c.csv"
    cap.write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, err = _cli(["--images", str(d), "--captions", str(cap), "--out",
                      str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0
    assert len([line for line in err if "bad" in line and ".png" in line]) <= 12
    assert "40 image does not decode" in err[-1]


@pytest.mark.parametrize("content,row", [
    (b"file,caption\na.png,one\nb.jpg,caf\xe9 latin-1\nd.png,three\n", 3),
    (b"a.png,one\nb.jpg,two\n", 1),          # no header row
    (b"file,text\na.png,one\n", 1),           # no caption column
    (b"", 1),                                 # empty
])
def test_shards_command_bad_captions_csv_writes_nothing(image_folder, tmp_path, capsys,
                                                        content, row):
    d, _ = image_folder
    cap = tmp_path / "caps.csv"
    cap.write_bytes(content)
    out = tmp_path / "out"
    code, err = _cli(["--images", str(d), "--captions", str(cap), "--out", str(out),
                      "--quiet"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "caps.csv" in err[0] and f"row {row}" in err[0]
    assert not out.exists() or os.listdir(out) == []
    # With --overwrite into a used folder, a bad captions file deletes nothing either.
    out.mkdir(exist_ok=True)
    (out / "shard-000000.tar").write_bytes(b"old")
    assert _cli(["--images", str(d), "--captions", str(cap), "--out", str(out),
                 "--quiet", "--overwrite"], capsys)[0] == 2
    assert os.listdir(out) == ["shard-000000.tar"]


def test_synthetic_export_images_writes_the_samples_as_png(tmp_path):
    """`mmjax shards --synthetic --export-images`: the README's way to get an image for
    `mmjax generate --image`; PNG is lossless, so the files are the samples exactly."""
    from mmjax.data.synthetic import make_sample
    out = tmp_path / "shapes"
    assert shards_command(["--synthetic", "--split", "test", "--num-samples", "3",
                           "--export-images", "--out", str(out)]) == 0
    lines = (out / "captions.txt").read_text().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        name, caption = line.split("\t")
        want = make_sample(i, "test", 64, 0)
        assert caption == want["caption"]
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), want["image"])
    assert shards_command(["--synthetic", "--num-samples", "1", "--export-images",
                           "--out", str(out)]) == 2  # not empty
