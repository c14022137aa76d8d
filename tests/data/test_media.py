"""Media registry (mmjax.data.media): modality choice, decoders, BadSample skipping."""
import io
import json
import logging

import numpy as np
import pytest

from _shards import CharTokenizer, make_image, write_tar
from mmjax.data import decode, media, pipeline
from mmjax.data.bad import BadSample
from mmjax.data.tario import IMAGE_EXTS
from mmjax.errors import ConfigError

TOK = CharTokenizer(12)
WINDOW = 4  # data.train.sample_rate in these tests: the toy decoder's output length


def decode_toy(data: bytes, ext: str, rng: np.random.Generator, options) -> np.ndarray:
    """A toy modality: an .npy vector -> a random window of `options.sample_rate` values."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise BadSample("corrupt_toy", f"not an .npy file ({e})") from None
    n = int(options.sample_rate)
    if len(arr) < n:
        raise BadSample("short_toy", f"{len(arr)} values, need {n}")
    start = int(rng.integers(len(arr) - n + 1))
    return arr[start:start + n].astype(np.float32)


TOY = media.MediaSpec("toy", ("npy",), f"{__name__}:decode_toy", key="toy_wave")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(media.MEDIA, "toy", TOY)


def _npy(values) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, np.float32))
    return buf.getvalue()


def _toy_shards(root, num_shards=2, caption_list=False):
    """Per shard: good (6 values), short (2), corrupt, no .npy member, good (9), good (4).
    Values of sample (i, j) are 1000*i + 100*j + arange(n); label 10*i + j.
    Returns the paths and {label: (values, caption or captions)} of the good samples."""
    paths, good = [], {}
    for i in range(num_shards):
        members = []
        for j, kind in enumerate(("good6", "short", "corrupt", "missing", "good9", "good4")):
            key, label = f"s{i}_{j}", 10 * i + j
            caps = [f"t{i}{j}", f"u{i}{j}"][:1 + j % 2]
            if kind == "corrupt":
                members.append((f"{key}.npy", b"this is not numpy"))
            elif kind != "missing":
                n = {"good6": 6, "short": 2, "good9": 9, "good4": 4}[kind]
                values = 1000 * i + 100 * j + np.arange(n, dtype=np.float32)
                members.append((f"{key}.npy", _npy(values)))
                if kind.startswith("good"):
                    good[label] = (values, caps if caption_list else caps[0])
            text = {"captions": caps} if caption_list else {"caption": caps[0]}
            members += [(f"{key}.json", json.dumps(text).encode()),
                        (f"{key}.cls", str(label).encode())]
        path = str(root / f"toy-{i}.tar")
        write_tar(path, members)
        paths.append(path)
    return paths, good


def _cfg(shards, **kw):
    cfg = pipeline.default_data_config()
    cfg.update(dict(shards=shards, caption_key="json:caption", workers=0,
                    shuffle_buffer=0, sample_rate=WINDOW, max_len=TOK.max_len,
                    start_method="spawn"))
    cfg.update(kw)
    return cfg


def _is_window(row: np.ndarray, values: np.ndarray) -> bool:
    return any(np.array_equal(row, values[s:s + len(row)])
               for s in range(len(values) - len(row) + 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_of_a_registered_decoder_are_skipped_and_counted(toy, tmp_path, workers):
    paths, good = _toy_shards(tmp_path)
    it = pipeline.build_train_iterator(_cfg(paths, workers=workers), 3, process_index=0,
                                       process_count=1, tokenizer=TOK, media="toy")
    try:
        batches = [next(it), next(it)]  # 6 good samples: exactly one epoch
        stats = it.stats()
    finally:
        it.close()
    for b in batches:
        assert set(b) == {"toy_wave", "text", "label"}
        assert b["toy_wave"].shape == (3, WINDOW) and b["toy_wave"].dtype == np.float32
    labels = [int(x) for b in batches for x in b["label"]]
    assert sorted(labels) == sorted(good)
    rows = [(int(lab), w, t) for b in batches for lab, w, t in zip(b["label"], b["toy_wave"],
                                                                     b["text"])]
    for label, window, text in rows:
        values, caption = good[label]
        assert _is_window(window, values), (label, window)
        assert TOK.decode(text) == caption
    assert stats == {"ok": 6, "short_toy": 2, "corrupt_toy": 2, "no_toy": 2}


def test_decoder_bad_samples_follow_max_bad_fraction(toy, tmp_path, caplog):
    members = []
    for j in range(6):
        members += [(f"k{j}.npy", _npy(np.arange(2))), (f"k{j}.json", b'{"caption": "c"}')]
    write_tar(tmp_path / "short.tar", members)
    it = pipeline.build_train_iterator(
        _cfg(str(tmp_path / "short.tar"), min_bad_count=3, max_bad_fraction=0.5), 2,
        process_index=0, process_count=1, tokenizer=TOK, media="toy")
    with caplog.at_level(logging.WARNING, logger="mmjax.data.pipeline"), \
            pytest.raises(pipeline.DataError, match=r"3 of 3 samples.*short\.tar \(short_toy: "
                          r"sample 2: 2 values, need 4\)"):
        next(it)
    assert any("short_toy" in r.getMessage() for r in caplog.records)


def test_caption_list_and_labels_work_for_any_modality(toy, tmp_path):
    paths, good = _toy_shards(tmp_path, num_shards=1, caption_list=True)
    it = pipeline.build_eval_iterator(
        _cfg(paths, caption_key="json:captions", text_format="caption_list", num_captions=3),
        4, process_index=0, process_count=1, tokenizer=TOK, media="toy")
    batches = list(it)
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[valid].tolist()
    text = np.concatenate([b["text"] for b in batches])[valid]
    assert labels == sorted(good) and text.shape == (3, 3, TOK.max_len)
    for label, rows in zip(labels, text):
        want = good[label][1]
        assert [TOK.decode(r) for r in rows] == want + [""] * (3 - len(want))


def test_unknown_modality_names_what_is_registered(tmp_path):
    write_tar(tmp_path / "a.tar", [("k.jpg", make_image(0)), ("k.txt", b"x")])
    for build in (pipeline.build_train_iterator, pipeline.build_eval_iterator):
        with pytest.raises(ConfigError, match=r"no media decoder is registered for modality "
                                              r"'smell' \(have 'audio', 'image'.*register_tower"):
            build(_cfg(str(tmp_path / "a.tar")), 2, process_index=0, process_count=1,
                  tokenizer=TOK, media="smell")


def test_image_spec_decodes_as_decode_and_crop_and_names_its_bad_samples(tmp_path):
    spec = media.get_media_spec("image")
    assert spec.exts == IMAGE_EXTS and spec.batch_key == "image"
    assert spec.missing_reason == "no_image"
    write_tar(tmp_path / "a.tar", [("k.jpg", make_image(0)), ("k.txt", b"x")])
    cfg = _cfg(str(tmp_path / "a.tar"), caption_key="txt", image_size=20,
               crop_scale=(0.3, 1.0), flip=True, max_pixels=5000)
    opts = pipeline.build_options(cfg, mode="train", process_index=0, process_count=1,
                                  seed=None, tokenizer=TOK)
    jpeg = make_image(3, 60, 50)
    got = spec.decode(jpeg, "jpg", np.random.default_rng(5), opts)
    want, _ = decode.decode_and_crop(jpeg, 20, np.random.default_rng(5), augment="rrc",
                                     scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), flip=True,
                                     max_pixels=5000)
    assert np.array_equal(got, want)
    stacked = spec.stack([got, want], opts)
    ref = (np.stack([want, want]).astype(np.float64) / 255 - decode.CLIP_MEAN) / decode.CLIP_STD
    np.testing.assert_allclose(stacked, ref, atol=1e-5)
    with pytest.raises(BadSample) as e:
        spec.decode(jpeg[:200], "jpg", np.random.default_rng(0), opts)
    assert e.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as e:
        spec.decode(make_image(1, 100, 80), "jpg", np.random.default_rng(0), opts)
    assert e.value.reason == "too_many_pixels" and "max_pixels" in str(e.value)


def test_function_references_must_name_module_and_function():
    assert media.load_function("mmjax.data.media:stack_arrays") is media.stack_arrays
    for ref in ("mmjax.data.media", ":decode_image", "mmjax.data.media:"):
        with pytest.raises(ValueError, match="module:function"):
            media.load_function(ref)
