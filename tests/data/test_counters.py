"""Bad data: skipped, counted by reason, logged rate-limited; the run goes on."""
import logging
import tarfile

import numpy as np
import pytest

from _shards import (CharTokenizer, fault_config as _cfg, make_image, sample_members,
                     write_dataset, write_tar)
from mmjax.data import pipeline

TOK = CharTokenizer(16)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """Good and bad shards mixed; returns (paths, good labels, expected counts)."""
    root = tmp_path_factory.mktemp("faults")
    paths = write_dataset(root, 2, 4)
    good = [i * 1000 + j for i in range(2) for j in range(4)]

    jpg = make_image(99)
    mixed = (sample_members("m0", "ok", make_image(5000), 5000)
             + sample_members("m1", "corrupt", b"\xff\xd8not really a jpeg" * 20, 5001)
             + sample_members("m2", "truncated jpeg", jpg[: len(jpg) // 2], 5002)
             + sample_members("m3", None, make_image(5003), 5003)
             + sample_members("m4", "no image", None, 5004)
             + sample_members("m5", "ok", make_image(5005), 5005)
             + sample_members("m6", "huge", make_image(5006, 300, 300), 5006))
    write_tar(root / "mixed.tar", mixed)
    good += [5000, 5005]

    full = root / "full.tar"
    write_tar(full, sum((sample_members(f"t{j}", f"t{j}", make_image(6000 + j), 6000 + j)
                         for j in range(4)), []))
    with tarfile.open(full) as tf:
        cut = tf.getmember("t2.jpg").offset_data + 20  # inside sample 2's image
    (root / "trunc.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    good += [6000, 6001]

    (root / "empty.tar").write_bytes(b"")
    (root / "notatar.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    paths += [str(root / n) for n in ("mixed.tar", "trunc.tar", "empty.tar", "missing.tar",
                                      "notatar.tar")]
    counts = {"corrupt_image": 2, "no_caption": 1, "no_image": 1, "too_many_pixels": 1,
              "truncated_tar": 1, "empty_shard": 1, "missing_shard": 1, "not_tar": 1,
              "ok": len(good)}
    return paths, sorted(good), counts


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_skips_bad_data_and_counts_reasons(bad_dataset, workers):
    paths, good, counts = bad_dataset
    it = pipeline.build_eval_iterator(_cfg(paths, workers=workers), 5, process_index=0,
                                      process_count=1, tokenizer=TOK)
    try:
        labels = [int(x) for b in it for x in b["label"][b["valid"]]]
        assert sorted(labels) == good  # every good sample exactly once
        assert it.stats() == counts
    finally:
        it.close()


def test_training_epoch_delivers_each_good_sample_once(bad_dataset):
    paths, good, _ = bad_dataset
    # No shuffle buffer: it would mix the next epoch's samples into this one.
    it = pipeline.build_train_iterator(_cfg(paths, seed=3), 1, process_index=0,
                                       process_count=1, tokenizer=TOK)
    labels = [int(next(it)["label"][0]) for _ in range(2 * len(good))]
    assert sorted(labels[:len(good)]) == good and sorted(labels[len(good):]) == good
    stats = it.stats()
    assert stats["ok"] == 2 * len(good) and stats["corrupt_image"] >= 2


def _all_bad(root, n=6):
    path = root / "allbad.tar"
    write_tar(path, sum((sample_members(f"b{j}", "x", b"garbage" * 30, j) for j in range(n)), []))
    return str(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_samples_raises_naming_the_shard(tmp_path, workers):
    good = write_dataset(tmp_path, 1, 4)
    bad = _all_bad(tmp_path)
    cfg = _cfg(good + [bad], workers=workers, max_bad_fraction=0.3, min_bad_count=3)
    it = pipeline.build_train_iterator(cfg, 2, process_index=0, process_count=1, tokenizer=TOK)
    try:
        with pytest.raises(pipeline.DataError, match=r"allbad\.tar.*corrupt_image"):
            for _ in range(20):
                next(it)
    finally:
        it.close()


def test_bad_sample_logging_is_rate_limited(tmp_path, caplog):
    cfg = _cfg(_all_bad(tmp_path) + "::" + write_dataset(tmp_path, 1, 2)[0])
    it = pipeline.build_eval_iterator(cfg, 4, process_index=0, process_count=1, tokenizer=TOK)
    with caplog.at_level(logging.WARNING, logger="mmjax.data.pipeline"):
        batches = list(it)
    assert sum(b["valid"].sum() for b in batches) == 2
    assert it.stats() == {"corrupt_image": 6, "ok": 2}
    lines = [r for r in caplog.records if "corrupt_image" in r.getMessage()]
    assert len(lines) == 1 and "allbad.tar" in lines[0].getMessage()


def test_all_shards_unreadable_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"not a tar" * 100)
    it = pipeline.build_train_iterator(_cfg(str(tmp_path / "*.tar")), 2, process_index=0,
                                       process_count=1, tokenizer=TOK)
    with pytest.raises(pipeline.DataError, match="no readable sample"):
        next(it)
