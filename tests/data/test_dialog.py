"""Question/answer encoding: exact byte-tokenizer ids and loss masks, placeholder,
truncation, and parsing of the accepted JSON forms."""
import numpy as np
import pytest

from mmjax.data.dialog import encode_dialog, encode_prompt, turns_from_json
from mmjax.data.tokenizers import build_tokenizer

BOS, EOS, PAD = 1, 2, 0


def _b(text):
    """Byte-tokenizer content ids: byte b -> b + 3."""
    return [b + 3 for b in text.encode("utf-8")]


def test_two_turn_dialog_exact_ids_and_mask():
    tok = build_tokenizer("bytes", 8)  # the tokenizer's own max_len plays no role here
    pairs = [("what colour?", "red"), ("how many?", "two")]
    ids, mask = encode_dialog(tok, pairs, 64)
    p1, a1 = _b("Q: what colour? A:"), _b(" red")
    p2, a2 = _b("Q: how many? A:"), _b(" two")
    want = [BOS] + p1 + a1 + [EOS] + p2 + a2 + [EOS]
    want_mask = [0] + [0] * len(p1) + [1] * (len(a1) + 1) + [0] * len(p2) + [1] * (len(a2) + 1)
    assert len(want) == 1 + 18 + 4 + 1 + 15 + 4 + 1 == 44
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (64,)
    assert ids.tolist() == want + [PAD] * 20
    assert mask.tolist() == want_mask + [0] * 20
    # The first turn's prompt part is exactly the generation prompt.
    prompt = encode_prompt(tok, "what colour?")
    assert prompt == [BOS] + p1
    assert ids[:len(prompt)].tolist() == prompt and mask[:len(prompt)].sum() == 0
    # " red": 0x20 0x72 0x65 0x64 -> 35 117 104 103
    assert ids[19:24].tolist() == [35, 117, 104, 103, EOS]


def test_image_placeholder():
    tok = build_tokenizer("bytes", 8)
    assert encode_prompt(tok, "<image>\nwhat is it?", image_token_id=300) == \
        [BOS] + _b("Q: ") + [300] + _b("\nwhat is it? A:")
    assert encode_prompt(tok, "look <image> here", image_token_id=7) == \
        [BOS] + _b("Q: look ") + [7] + _b(" here A:")
    # Without an image id the placeholder and its surrounding whitespace go.
    assert encode_prompt(tok, "<image>\nwhat is it?") == [BOS] + _b("Q: what is it? A:")
    assert encode_prompt(tok, "look <image>  here") == [BOS] + _b("Q: look here A:")
    ids, mask = encode_dialog(tok, [("<image>\nq", "a")], 16, image_token_id=300)
    want = [BOS] + _b("Q: ") + [300] + _b("\nq A:") + _b(" a") + [EOS]
    assert ids.tolist() == want + [PAD] * (16 - len(want))
    assert mask.tolist() == [0] * 10 + [1, 1, 1] + [0] * 3  # 1 + 3 + 1 + 5 prompt ids


def test_truncation_drops_whole_pairs_then_cuts_first_answer():
    tok = build_tokenizer("bytes", 8)
    pairs = [("a?", "yes"), ("b?", "no"), ("c?", "maybe")]
    # Each full turn: "Q: x? A:" (8) + " ans" + EOS -> 13, 12, 15 tokens; BOS 1.
    full = encode_dialog(tok, pairs, 64)[0]
    assert (full != PAD).sum() == 1 + 13 + 12 + 15
    for max_len, kept in ((26, 2), (40, 2), (41, 3), (25, 1), (14, 1)):
        ids, mask = encode_dialog(tok, pairs, max_len)
        n = 1 + [0, 13, 25, 40][kept]
        assert ids[:n].tolist() == full[:n].tolist(), (max_len, kept)
        assert (ids[n:] == PAD).all() and mask[n:].sum() == 0
        assert ids[n - 1] == EOS
    # The first pair alone does not fit: its answer is cut, EOS at max_len - 1.
    ids, mask = encode_dialog(tok, pairs, 11)
    assert ids.tolist() == [BOS] + _b("Q: a? A:") + _b(" ") + [EOS]
    assert mask.tolist() == [0] * 9 + [1, 1]
    ids, mask = encode_dialog(tok, pairs, 10)  # room for EOS only
    assert ids.tolist() == [BOS] + _b("Q: a? A:") + [EOS] and mask.sum() == 1
    with pytest.raises(ValueError, match="data.train.max_len"):
        encode_dialog(tok, pairs, 9)


def test_turns_from_json_forms():
    conv = [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]
    assert turns_from_json(conv) == [("<image>\nq1", "a1"), ("q2", "a2")]
    assert turns_from_json({"id": 3, "conversations": conv[:2]}) == [("<image>\nq1", "a1")]
    assert turns_from_json([{"question": "q", "answer": "a"},
                            {"question": "r", "answer": "b", "type": "x"}]) == \
        [("q", "a"), ("r", "b")]
    assert turns_from_json({"question": "q", "answer": "a"}) == [("q", "a")]
    assert turns_from_json('{"question": "q", "answer": "a"}') == [("q", "a")]


@pytest.mark.parametrize("value, match", [
    ([], "empty"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "conversations\\[0\\]"),
    ([{"from": "human", "value": "q"}], "even"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "conversations\\[1\\]"),
    ([{"from": "human", "value": "q"}, {"from": "gpt"}], "'value'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "must be a string"),
    ({"question": "q"}, "'answer'"),
    ([{"question": "q", "answer": "a"}, {"question": "q"}], "list\\[1\\]"),
    ({"question": "q", "answer": None}, "must be a string"),
    ("not json", "valid JSON"),
    (5, "got int"),
])
def test_turns_from_json_errors(value, match):
    with pytest.raises(ValueError, match=match):
        turns_from_json(value)


def test_vicuna_template_layout_split_and_question_text():
    from mmjax.data.dialog import (VICUNA_V1_SYSTEM, dialog_template, question_text,
                                   split_dialog, system_ids)
    tok = build_tokenizer("bytes", 8)
    pairs = [("<image>\nwhat colour?", "red"), ("how many?", "two")]
    ids, mask = encode_dialog(tok, pairs, 512, image_token_id=300, template="vicuna_v1")
    sys_ids = _b(VICUNA_V1_SYSTEM + " ")
    p1 = _b("USER: ") + [300] + _b("\nwhat colour? ASSISTANT:")
    p2, a1, a2 = _b("USER: how many? ASSISTANT:"), _b(" red"), _b(" two")
    want = [BOS] + sys_ids + p1 + a1 + [EOS] + p2 + a2 + [EOS]
    want_mask = [0] * (1 + len(sys_ids) + len(p1)) + [1] * (len(a1) + 1) + \
        [0] * len(p2) + [1] * (len(a2) + 1)
    n = len(want)
    assert ids[:n].tolist() == want and ids[n:].tolist() == [PAD] * (512 - n)
    assert mask.tolist() == want_mask + [0] * (512 - n)
    # Every question comes back as a first-turn prompt: BOS + system + its own turn.
    first = encode_prompt(tok, pairs[0][0], 300, "vicuna_v1")
    assert first == [BOS] + sys_ids + p1 and system_ids(tok, "vicuna_v1") == sys_ids
    split = split_dialog(ids, mask, BOS, EOS, sys_ids)
    assert split == [(first, a1), (encode_prompt(tok, "how many?", None, "vicuna_v1"), a2)]
    assert question_text(tok.decode(split[1][0]), "vicuna_v1") == "how many?"
    assert question_text("Q: what colour? A:") == "what colour?"
    assert question_text("Question: where? Answer:", "blip2_vqa") == "where?"
    # The default template has no system text: unchanged behaviour.
    assert split_dialog(*encode_dialog(tok, pairs[1:], 64), BOS, EOS) == [
        (encode_prompt(tok, "how many?"), a2)]
    with pytest.raises(ValueError, match="data.train.dialog_template='chatml'"):
        dialog_template("chatml")
