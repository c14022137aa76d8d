"""VQA as classification data (`text_format="vqa"`): one sample's questions and
soft answer scores (`mmjax.data.dialog.vqa_from_members`), and the same through
the webdataset pipeline (batch fields, bad samples skipped and counted)."""
import json

import numpy as np
import pytest

from _shards import make_image
from mmjax.data import pipeline
from mmjax.data.dialog import encode_prompt, vqa_from_members
from mmjax.data.tokenizers import build_tokenizer
from mmjax.data.writer import ShardWriter
from mmjax.errors import ConfigError

BOS, PAD = 1, 0
L = 40
ANSWERS = ["yes", "no", "two", "blue", "red", "circle"]
INDEX = {a: i for i, a in enumerate(ANSWERS)}
TOK = build_tokenizer("bytes", L)


def _prompt(question):
    """Hand-computed byte-tokenizer ids of the "qa" prompt: BOS, then byte b -> b + 3."""
    return [BOS] + [b + 3 for b in f"Q: {question} A:".encode("utf-8")]


def _padded(ids, length=L):
    return list(ids) + [PAD] * (length - len(ids))


def _members(value):
    return {"json": json.dumps(value).encode("utf-8")}


def test_builtin_style_questions_give_prompts_and_one_answer_each():
    """The built-in data's `{"qa": [{"question", "answer", "type"}]}`: the prompt VQA
    evaluation asks with, padded; the answer's class with score 1; rows after the
    last question all pad with answer ids -1."""
    qa = [{"question": "colour of the big shape?", "answer": "blue", "type": "color"},
          {"question": "how many shapes?", "answer": "Two ", "type": "count"},  # case, space
          {"question": "shape of the big one?", "answer": "circle", "type": "shape"}]
    fields, why = vqa_from_members(_members({"qa": qa, "caption": "x"}), "json:qa", TOK, L,
                                   INDEX, num_questions=5, max_answers=4)
    assert why == ""
    ids, answer_ids, scores = fields
    assert ids.shape == (5, L) and ids.dtype == np.int32
    assert answer_ids.shape == scores.shape == (5, 4)
    assert answer_ids.dtype == np.int32 and scores.dtype == np.float32
    for i, item in enumerate(qa):
        assert ids[i].tolist() == _padded(_prompt(item["question"]))
        assert ids[i].tolist() == _padded(encode_prompt(TOK, item["question"], None, "qa"))
    assert (ids[3:] == PAD).all()
    assert answer_ids.tolist() == [[INDEX["blue"], -1, -1, -1], [INDEX["two"], -1, -1, -1],
                                   [INDEX["circle"], -1, -1, -1]] + [[-1] * 4] * 2
    assert scores.tolist() == [[1, 0, 0, 0]] * 3 + [[0] * 4] * 2
    # One dict instead of a list; more questions than rows: the first ones are kept.
    fields, _ = vqa_from_members(_members({"qa": qa[0]}), "json:qa", TOK, L, INDEX, 2)
    assert fields[0][0].tolist() == _padded(_prompt(qa[0]["question"]))
    assert (fields[0][1] == PAD).all() and fields[1][1].tolist() == [-1] * 10
    fields, _ = vqa_from_members(_members({"qa": qa}), "json:qa", TOK, L, INDEX, 2)
    assert fields[0].shape == (2, L) and fields[1][:, 0].tolist() == [INDEX["blue"],
                                                                       INDEX["two"]]
    # A prompt longer than max_len is cut to it.
    fields, _ = vqa_from_members(_members({"qa": qa}), "json:qa", TOK, 10, INDEX, 1)
    assert fields[0][0].tolist() == _prompt(qa[0]["question"])[:10]


def test_vqav2_style_ten_answers_give_soft_scores_most_frequent_first():
    """VQAv2's ten human answers: each distinct in-vocabulary answer scores
    min(1, count / 3), the most frequent first, at most `max_answers` of them;
    out-of-vocabulary answers take no slot."""
    answers = (["yes"] * 4 + ["no"] * 2 + ["blue", " Blue"] + ["two"] + ["maybe"])
    item = {"question": "is it?", "answers": [{"answer": a} for a in answers],
            "answer_type": "yes/no"}
    fields, why = vqa_from_members(_members([item]), "json:", TOK, L, INDEX, 2,
                                   max_answers=10)
    assert why == ""
    ids, answer_ids, scores = fields
    got = {int(a): float(s) for a, s in zip(answer_ids[0], scores[0]) if a >= 0}
    assert got == pytest.approx({INDEX["yes"]: 1.0, INDEX["no"]: 2 / 3, INDEX["blue"]: 2 / 3,
                                 INDEX["two"]: 1 / 3})
    assert answer_ids[0, 0] == INDEX["yes"] and answer_ids[0, 3] == INDEX["two"]
    assert (np.diff(scores[0][:4]) <= 0).all() and (answer_ids[0, 4:] == -1).all()
    assert (scores[0, 4:] == 0).all() and (answer_ids[1] == -1).all()
    # Capped at max_answers: the least frequent ("two", 1/3) is the one dropped.
    fields, _ = vqa_from_members(_members([item]), "json:", TOK, L, INDEX, 1, max_answers=3)
    answer_ids, scores = fields[1][0], fields[2][0]
    assert answer_ids[0] == INDEX["yes"] and scores[0] == 1.0
    assert sorted(answer_ids[1:].tolist()) == sorted([INDEX["no"], INDEX["blue"]])
    np.testing.assert_allclose(scores[1:], [2 / 3, 2 / 3], rtol=1e-6)
    # A plain list of strings works the same; three of a kind already scores 1.
    fields, _ = vqa_from_members(
        _members({"question": "q?", "answers": ["no", "no", "no", "yes"]}), "json:", TOK, L,
        INDEX, 1, max_answers=2)
    assert fields[1][0].tolist() == [INDEX["no"], INDEX["yes"]]
    np.testing.assert_allclose(fields[2][0], [1.0, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize("members,reason", [
    (_members({"qa": [{"question": "q?", "answer": "purple"},
                      {"question": "r?", "answers": ["maybe", "green"]}]}), "vocabulary"),
    (_members({"qa": []}), "empty"),
    (_members({"qa": [{"question": "q?"}]}), "'answer'"),
    (_members({"other": 1}), "json:qa"),
    ({"json": b"{not json"}, "json:qa"),
    ({"txt": b"a caption"}, "no 'json' member"),
])
def test_samples_without_a_usable_question_are_refused_with_a_reason(members, reason):
    fields, why = vqa_from_members(members, "json:qa", TOK, L, INDEX, 3)
    assert fields is None and reason in why


def test_a_question_without_known_answers_keeps_its_prompt_but_no_target():
    """Only one of two questions has an in-vocabulary answer: the sample is kept,
    the other question's answer ids are all -1 (the loss weights it 0)."""
    fields, _ = vqa_from_members(_members({"qa": [{"question": "q?", "answer": "purple"},
                                                  {"question": "r?", "answer": "red"}]}),
                                 "json:qa", TOK, L, INDEX, 3, max_answers=2)
    ids, answer_ids, scores = fields
    assert ids[0].tolist() == _padded(_prompt("q?")) and ids[1].tolist() == _padded(_prompt("r?"))
    assert answer_ids.tolist() == [[-1, -1], [INDEX["red"], -1], [-1, -1]]
    assert scores.tolist() == [[0, 0], [1, 0], [0, 0]]


# --- through the pipeline ------------------------------------------------------

QA = [  # (question, answer) pool; sample j asks 1 + j % 6 of them (tagged "#j")
    ("colour of the big shape?", "red"), ("how many shapes?", "two"),
    ("shape of the big one?", "circle"), ("is it big?", "yes"), ("is it small?", "no"),
    ("colour of the small shape?", "blue")]


def _sample_qa(j):
    n = 1 + j % 6
    return [{"question": f"{QA[(j + i) % 6][0]} #{j}", "answer": QA[(j + i) % 6][1],
             "type": "t"} for i in range(n)]


def _write_shards(root):
    """Two shards of 6 good samples each, plus one corrupt JSON member and one
    sample without any in-vocabulary answer."""
    with ShardWriter(str(root / "vqa-%06d.tar"), max_count=7) as w:
        for j in range(12):
            w.write({"__key__": f"s{j:04d}", "jpg": make_image(j, 40, 36),
                     "json": {"qa": _sample_qa(j), "caption": f"cap {j}"}})
            if j == 3:
                w.write({"__key__": "broken", "jpg": make_image(99), "json": b"{\"qa\": [oops"})
            if j == 8:
                w.write({"__key__": "unknown", "jpg": make_image(98),
                         "json": {"qa": [{"question": "what?", "answer": "purple"}]}})
    return w.shards


def _cfg(shards, **kw):
    cfg = pipeline.default_data_config()
    cfg.update(dict(shards=shards, image_size=24, workers=0, shuffle_buffer=0, max_len=L,
                    tokenizer="bytes", text_format="vqa", caption_key="json:qa",
                    num_captions=5, answers=list(ANSWERS), max_answers=3,
                    max_bad_fraction=1.0))
    cfg.update(kw)
    return cfg


def test_vqa_batches_through_the_pipeline(tmp_path):
    shards = _write_shards(tmp_path)
    assert len(shards) == 2
    it = pipeline.build_train_iterator(_cfg(shards), 4, process_index=0, process_count=1)
    try:
        batches = [next(it) for _ in range(3)]  # the 12 good samples, once each
        stats = it.stats()
    finally:
        it.close()
    expected = {}
    for j in range(12):
        fields, _ = vqa_from_members(_members({"qa": _sample_qa(j)}), "json:qa", TOK, L, INDEX,
                                     5, 3)
        expected[fields[0].tobytes()] = fields
    seen = set()
    for batch in batches:
        assert set(batch) == {"image", "text", "label", "answer_ids", "answer_scores"}
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
        assert batch["text"].shape == (4, 5, L) and batch["text"].dtype == np.int32
        assert batch["answer_ids"].shape == (4, 5, 3) and batch["answer_ids"].dtype == np.int32
        assert batch["answer_scores"].shape == (4, 5, 3)
        assert batch["answer_scores"].dtype == np.float32
        for text, ids, scores in zip(batch["text"], batch["answer_ids"],
                                     batch["answer_scores"]):
            want = expected[text.tobytes()]  # one of the written samples, exactly
            np.testing.assert_array_equal(ids, want[1])
            np.testing.assert_array_equal(scores, want[2])
            seen.add(text.tobytes())
            n = int((text != PAD).any(-1).sum())  # questions of this sample
            assert (ids[:n, 0] >= 0).all() and (ids[n:] == -1).all()
            assert ((scores >= 0) & (scores <= 1)).all()
    assert len(seen) == 12  # every good sample once in the first epoch
    # The corrupt JSON member and the unanswerable sample were skipped and counted.
    assert stats["ok"] == 12 and stats["invalid_json"] == 1 and stats["no_vqa"] == 1, stats


def test_vqa_format_without_answers_names_the_key(tmp_path):
    shards = _write_shards(tmp_path)
    for answers in ([], None):
        with pytest.raises(ConfigError, match=r"data\.train\.answers"):
            pipeline.build_train_iterator(_cfg(shards, answers=answers), 4, process_index=0,
                                          process_count=1)
