"""Audio and video through the real pipeline: decoded batches, bad files skipped and counted."""
import io

import numpy as np
import soundfile as sf

from _shards import CharTokenizer, write_tar
from mmjax.data import pipeline
from mmjax.data.audio import decode_audio
from mmjax.data.synthetic_video import encode_mp4, make_clip

TOK = CharTokenizer(12)


def _flac(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _iterate(cfg, batch, n, media):
    it = pipeline.build_train_iterator(cfg, batch, process_index=0, process_count=1,
                                       tokenizer=TOK, media=media)
    try:
        return [next(it) for _ in range(n)], it.stats()
    finally:
        it.close()


def test_audio_batches_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    rate, good = 8000, {}
    members = [("a_first.txt", b"no audio member")]
    for j in range(6):
        key = f"a{j}"
        wave = (0.3 * rng.standard_normal(int(rate * 0.5))).astype(np.float32)
        data = {0: _flac(wave, rate), 1: _flac(np.stack([wave, -wave], 1), rate),
                2: b"not audio at all", 3: _flac(wave, rate)[:200],
                4: _flac(np.zeros(0, np.float32), rate), 5: _flac(wave, rate)}[j]
        members += [(f"{key}.flac", data), (f"{key}.txt", f"c{j}".encode()),
                    (f"{key}.cls", str(j).encode())]
        if j in (0, 1, 5):
            good[j] = data
    path = str(tmp_path / "audio-0.tar")
    write_tar(path, members)
    cfg = pipeline.default_data_config()
    cfg.update(dict(shards=[path], sample_rate=rate, clip_seconds=0.25,
                    augment="center", workers=0, shuffle_buffer=0, max_len=TOK.max_len,
                    max_bad_fraction=0.9))
    (batch,), stats = _iterate(cfg, 3, 1, "audio")
    assert batch["audio"].shape == (3, 2000) and batch["audio"].dtype == np.float32
    opts = pipeline.build_options(cfg, mode="eval", process_index=0, process_count=1,
                                  seed=0, tokenizer=TOK, media="audio")
    for row, label in zip(batch["audio"], batch["label"]):
        want = decode_audio(good[int(label)], "flac", None, opts)  # independent call
        np.testing.assert_array_equal(row, want)
    assert stats["ok"] == 3 and stats["no_audio"] == 1
    assert stats.get("corrupt_audio", 0) + stats.get("empty_audio", 0) == 3, stats


def test_video_batches_and_bad_files(tmp_path):
    members = []
    for j in range(4):
        clip = make_clip(j, "train", 8, 32, 0)
        data = encode_mp4(clip["frames"], 8)
        if j == 0:
            data = data[: len(data) // 3]       # cut short
        if j == 1:
            data = b"\x00" * 500                # not a video
        members += [(f"v{j}.mp4", data), (f"v{j}.txt", clip["caption"].encode()),
                    (f"v{j}.cls", str(j).encode())]
    path = str(tmp_path / "video-0.tar")
    write_tar(path, members)
    cfg = pipeline.default_data_config()
    cfg.update(dict(shards=[path], num_frames=4, image_size=32,
                    augment="center", workers=0, shuffle_buffer=0, max_len=TOK.max_len,
                    max_bad_fraction=0.9, output="uint8"))
    (batch,), stats = _iterate(cfg, 2, 1, "video")
    assert batch["video"].shape == (2, 4, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert sorted(int(x) for x in batch["label"]) == [2, 3]
    assert stats["ok"] == 2
    assert stats.get("corrupt_video", 0) + stats.get("empty_video", 0) == 2, stats
