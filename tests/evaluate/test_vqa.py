"""VQA accuracy: answer normalization and the 10-annotator consensus formula."""
import pytest

from mmjax.evaluate.vqa import normalize_answer, vqa_accuracy, vqa_scores


@pytest.mark.parametrize("text, want", [
    ("  Red ", "red"),
    ("Two", "2"),
    ("a dog.", "dog"),
    ("The Cat!", "cat"),
    ("3.5", "3.5"),           # decimal point between digits kept
    ("1,000", "1000"),        # comma inside a number: punctuation deleted
    ("black/white", "black white"),  # no adjacent space: replaced by a space
    ("yes , sir", "yes sir"),        # touches a space: deleted
    ("dont know", "don't know"),
    ("an   apple\tpie", "apple pie"),
    ("ten o'clock", "10 o'clock"),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_single_answer_is_normalized_exact_match():
    assert vqa_accuracy("Two.", ["two"]) == 1.0
    assert vqa_accuracy("2 dogs", ["two"]) == 0.0
    assert vqa_accuracy("the circle", ["circle"]) == 1.0


def test_ten_answers_consensus():
    # 3 of 10 match. Leaving out a matching one leaves 2 -> 2/3; leaving out a
    # non-matching one leaves 3 -> 1. (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("Red", answers) == pytest.approx(0.9)
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    assert vqa_accuracy("green", ["green"] + ["blue"] * 9) == pytest.approx(0.3)
    # 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6.
    assert vqa_accuracy("green", ["green"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 4 or more matches: every subset has >= 3 -> 1.
    assert vqa_accuracy("blue", ["blue"] * 4 + ["red"] * 6) == 1.0
    assert vqa_accuracy("pink", ["blue"] * 10) == 0.0


def test_vqa_scores_per_type():
    preds = ["red", "circle", "2", "none"]
    refs = [["red"], ["square"], ["two"], ["red"] * 3 + ["blue"] * 7]
    got = vqa_scores(preds, refs, types=["color", "shape", "count", "color"])
    # color: (1 + 0) / 2; shape 0; count 1; overall (1 + 0 + 1 + 0) / 4.
    assert got == {"vqa_accuracy": 0.5, "vqa_accuracy/color": 0.5,
                   "vqa_accuracy/shape": 0.0, "vqa_accuracy/count": 1.0, "count": 4}
    assert vqa_scores(["a"], [["a"]]) == {"vqa_accuracy": 1.0, "count": 1}
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="one list of reference answers"):
        vqa_scores(["a"], ["a"])
