"""`mmjax tokenizer`: a BPE or SentencePiece tokenizer trained on the captions of a
shard set loads through `build_tokenizer`, round-trips the captions, has the
vocabulary asked for, skips and counts bad input, and trains a tiny model."""
from __future__ import annotations

import json
import math
import os
import shlex
import tarfile

import pytest

from _shards import make_image, sample_members, write_tar
from mmjax import cli
from mmjax.data.synthetic import make_sample
from mmjax.data.tokenizers import build_tokenizer


def _captions(start: int, n: int) -> list[str]:
    """Varied captions: those of the built-in data's samples start .. start+n-1."""
    return [make_sample(i, "train", 8)["caption"] for i in range(start, start + n)]


def _members(prefix: str, captions: list[str], caption_json: bool = False) -> list:
    out = []
    for j, caption in enumerate(captions):
        out += sample_members(f"{prefix}_{j:04d}", caption, make_image(j, 8, 8), label=j,
                              caption_json=caption_json)
    return out


def _cut_inside(path: str, member: str) -> None:
    """Truncates the tar at `path` one byte into the data of `member`."""
    with tarfile.open(path) as tf:
        offset = tf.getmember(member).offset_data
    with open(path, "r+b") as f:
        f.truncate(offset + 1)


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["tokenizer", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(argv, capsys) -> str:
    """The run exits 2 and its stderr ends in one `mmjax: error:` line (after any
    progress lines): that line."""
    code, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("mmjax: error: "), err
    assert "Traceback" not in err and sum(ln.startswith("mmjax: error") for ln in lines) == 1, err
    return lines[-1]


def _flags(out: str) -> dict[str, str]:
    """The `--config.KEY=VALUE` flags of the `train with:` line -> {KEY: VALUE}."""
    line = next(ln for ln in out.splitlines() if ln.startswith("train with: "))
    return dict(f[len("--config."):].split("=", 1) for f in shlex.split(line[12:]))


@pytest.fixture
def bad_shard_set(tmp_path):
    """part-000: 40 good samples; part-001: 40 good and one without a caption;
    part-002: cut inside the caption of its 11th sample (10 samples readable);
    part-003: missing. Returns (pattern, the captions of the readable samples)."""
    data = tmp_path / "data"
    data.mkdir()
    first, second, cut = _captions(0, 40), _captions(40, 40), _captions(80, 20)
    write_tar(data / "part-000.tar", _members("a", first))
    members = _members("b", second)
    write_tar(data / "part-001.tar", members[:60] + sample_members("b_nocap", None,
                                                                   make_image(1, 8, 8), label=1)
              + members[60:])
    write_tar(data / "part-002.tar", _members("c", cut))
    _cut_inside(str(data / "part-002.tar"), "c_0010.txt")
    return str(data / "part-{000..003}.tar"), first + second + cut[:10]


def test_bpe_round_trips_the_captions_and_counts_what_it_skipped(tmp_path, bad_shard_set,
                                                                 capsys):
    pattern, captions = bad_shard_set
    out_file = str(tmp_path / "tok" / "tokenizer.json")
    code, out, err = _run(["--shards", pattern, "--out", out_file, "--vocab-size", "300",
                           "--log-every", "0"], capsys)
    assert code == 0, err
    assert f"trained on {len(captions)} captions of {len(captions)} samples from 4/4 shards" \
        in out, out
    assert "skipped: missing_shard=1, no_caption=1, truncated_tar=1" in out, out

    tok = build_tokenizer(f"hf:{out_file}", max_len=64)
    assert tok.vocab_size == 300  # as asked
    assert f"{out_file}: byte-level BPE, 300 tokens;" in out
    from tokenizers import Tokenizer
    names = Tokenizer.from_file(out_file)
    assert [names.id_to_token(i) for i in (tok.pad_id, tok.bos_id, tok.eos_id)] == \
        ["<pad>", "<|startoftext|>", "<|endoftext|>"]
    ids = tok(captions)
    assert (ids[:, 0] == tok.bos_id).all()
    assert [tok.decode(row) for row in ids] == captions
    # Learned merges: the captions take far fewer tokens than their bytes.
    assert (ids != tok.pad_id).sum() < 0.6 * sum(len(c.encode()) + 2 for c in captions)

    assert _flags(out) == {"data.train.tokenizer": f"hf:{out_file}",
                           "model.text.vocab_size": "300",
                           "model.text.eos_id": str(tok.eos_id),
                           "model.text.pad_id": str(tok.pad_id)}
    assert f"tokenizer: hf:{out_file}" in out
    progress = [ln for ln in err.splitlines() if "reading captions:" in ln]
    assert progress and all("captions/s" in ln for ln in progress), err
    assert any("eta " in ln for ln in progress) and "read in" in progress[-1], progress
    assert f"{len(captions)} captions, 4/4 shards" in progress[-1]

    # --max-samples: reading stops there, inside the second shard.
    code, out, err = _run(["--shards", pattern, "--out", out_file, "--vocab-size", "270",
                           "--max-samples", "50", "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert "trained on 50 captions of 50 samples from 2/4 shards" in out, out
    assert build_tokenizer(f"hf:{out_file}", max_len=64).vocab_size == 270


def test_sentencepiece_lowercase_json_captions(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    captions = [c.upper() if i % 3 == 0 else c for i, c in enumerate(_captions(0, 64))]
    members = _members("s", captions, caption_json=True)
    broken = [("s_bad.jpg", make_image(2, 8, 8)), ("s_bad.json", b"{not json")]
    write_tar(data / "json-000.tar", members[:30] + broken + members[30:])
    pattern = str(data / "json-000.tar")

    # The vocabulary asked for, and one larger than the captions can fill.
    for asked in (300, 32000):
        out_file = str(tmp_path / f"spm{asked}.model")  # .model: --kind sentencepiece
        code, out, err = _run(["--shards", pattern, "--out", out_file, "--vocab-size",
                               str(asked), "--caption-key", "json:caption", "--lowercase",
                               "--quiet"], capsys)
        assert code == 0, err
        assert "reading captions" not in err  # --quiet
        assert "skipped: invalid_json=1" in out and "trained on 64 captions" in out, out
        tok = build_tokenizer(f"sentencepiece:{out_file}", max_len=64)
        assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3)
        assert [tok.decode(row) for row in tok(captions)] == [c.lower() for c in captions]
        flags = _flags(out)
        assert flags["data.train.tokenizer"] == f"sentencepiece:{out_file}"
        assert flags["model.text.vocab_size"] == str(tok.vocab_size)
        assert (flags["model.text.eos_id"], flags["model.text.pad_id"]) == ("1", "0")
        if asked == 300:
            assert tok.vocab_size == 300
            assert "unigram SentencePiece, 300 tokens;" in out
        else:  # a soft limit: all the pieces 64 captions support
            assert 300 < tok.vocab_size < asked
            assert (f"{tok.vocab_size} tokens (--vocab-size {asked}: the captions support "
                    "no more)") in out


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "a.tar", _members("a", _captions(0, 8)))
    (data / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    out_file = str(tmp_path / "tok.json")
    pattern = str(data / "a.tar")

    line = _error(["--shards", str(tmp_path / "none-{0..3}.tar"), "--out", out_file],
                  capsys)
    assert "--shards" in line and "no files match" in line, line
    line = _error(["--shards", pattern, "--out", out_file, "--caption-key", "json:text"],
                  capsys)
    assert "no captions" in line and "no_caption=8" in line and "--caption-key" in line, line
    assert "members seen: cls, jpg, txt" in line, line
    line = _error(["--shards", str(data / "junk.tar"), "--out", out_file], capsys)
    assert "no captions" in line and "not_tar=1" in line, line
    line = _error(["--shards", pattern, "--out", str(tmp_path / "new" / "tok.json"),
                   "--vocab-size", "100"], capsys)  # checked before --out's folder is made
    assert "--vocab-size 100" in line and "at least 260" in line, line
    line = _error(["--shards", pattern, "--out", out_file, "--kind", "sentencepiece",
                   "--vocab-size", "100"], capsys)
    assert line.startswith("mmjax: error: --out") and ".model file" in line, line
    line = _error(["--shards", pattern, "--out", str(tmp_path / "spm.model"),
                   "--vocab-size", "100"], capsys)
    assert "--vocab-size 100 is too small for --kind sentencepiece" in line, line
    assert os.listdir(tmp_path) == ["data"]  # nothing written

    open(out_file, "w").close()
    line = _error(["--shards", pattern, "--out", out_file], capsys)
    assert "exists" in line and "--overwrite" in line, line
    assert os.path.getsize(out_file) == 0
    line = _error(["--out", out_file], capsys)
    assert "--shards" in line and "mmjax tokenizer --help" in line, line


def test_a_tokenizer_of_the_built_in_data_trains_a_tiny_model(tmp_path, mmjax_cache, capsys):
    recipe = ["--config", "configs/clip_tiny.py:tiny"]
    out_file = str(tmp_path / "tok" / "tokenizer.json")
    code, out, err = _run(["--shards", "synthetic", *recipe, "--out", out_file,
                           "--vocab-size", "300"], capsys)
    assert code == 0, err
    assert "from 4/4 shards" in out and "skipped: none" in out, out  # 64 samples, 16 a shard
    flags = _flags(out)
    assert flags["data.train.tokenizer"] == f"hf:{out_file}"
    assert flags["model.text.vocab_size"] == "300"

    workdir = tmp_path / "run"
    argv = ["train", *recipe, "--workdir", str(workdir)]
    argv += [f"--config.{k}={v}" for k, v in flags.items()]
    assert cli.main(argv) == 0
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows and rows[-1]["step"] == 3 and math.isfinite(rows[-1]["loss"]), rows
    with open(workdir / "config.json", encoding="utf-8") as f:
        config = json.load(f)["config"]  # the run used the new tokenizer
    assert config["data"]["train"]["tokenizer"] == f"hf:{out_file}"
    assert config["model"]["text"]["vocab_size"] == 300
