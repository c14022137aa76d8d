"""Question/answer text encoding for visual question answering and instruction tuning.

A dialog is a list of ``(question, answer)`` pairs, laid out by a
``DialogTemplate`` (config key ``data.train.dialog_template``): a row is BOS
(when the tokenizer has one), the template's system text (if any), then per
turn the prompt (``"Q: {question} A:"`` in the default "qa" template,
``"USER: {question} ASSISTANT:"`` in LLaVA's "vicuna_v1") followed by
``" {answer}"`` and EOS, then pad. Only the answer tokens and their EOS are
trained on (``loss_mask`` 1).

The text ``"<image>"`` inside a question marks where the image goes: it
becomes one id (``image_token_id``), or is removed when there is none.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from typing import Any, Sequence, Union

import numpy as np

from mmjax.data.tario import json_field
from mmjax.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass(frozen=True)
class DialogTemplate:
    """How question/answer turns become text.

    Attributes:
      prompt: one turn's prompt, containing ``"{question}"``; the answer
        follows as ``" {answer}"`` + EOS.
      system: text once before the first turn ("" = none), encoded as its own
        piece followed by a space.
    """
    prompt: str
    system: str = ""

    def __post_init__(self):
        if self.prompt.count("{question}") != 1:
            raise ConfigError(f"dialog template prompt {self.prompt!r} must contain "
                              "'{question}' exactly once")


VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's "
                    "questions.")

DIALOG_TEMPLATES = {
    "qa": DialogTemplate("Q: {question} A:"),
    # LLaVA-1.5 / Vicuna v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": DialogTemplate("USER: {question} ASSISTANT:", system=VICUNA_V1_SYSTEM),
    # BLIP-2's VQA prompt (OPT / Flan-T5 zero-shot VQA).
    "blip2_vqa": DialogTemplate("Question: {question} Answer:"),
}

TemplateSpec = Union[str, DialogTemplate]


def dialog_template(spec: TemplateSpec = "qa") -> DialogTemplate:
    """A ``DialogTemplate`` from its name in ``DIALOG_TEMPLATES`` (or itself)."""
    if isinstance(spec, DialogTemplate):
        return spec
    if spec not in DIALOG_TEMPLATES:
        raise ConfigError(f"data.train.dialog_template={spec!r} is not a known template; "
                          f"choose one of {sorted(DIALOG_TEMPLATES)}")
    return DIALOG_TEMPLATES[spec]

_HUMAN_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    return value


def _turns_from_conversations(turns: list) -> list[tuple[str, str]]:
    if len(turns) % 2:
        raise ValueError(
            f"conversations has {len(turns)} turns; it must alternate human, gpt, ... "
            "and end with a gpt turn (an even count).")
    pairs = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] must be a dict with keys 'from' and "
                             f"'value', got {turn!r}")
        roles = _HUMAN_ROLES if i % 2 == 0 else _ASSISTANT_ROLES
        if turn["from"] not in roles:
            raise ValueError(
                f"conversations[{i}] has from={turn['from']!r}; expected one of "
                f"{list(roles)} (turns alternate human, gpt, ... starting with human).")
        text = _text(turn["value"], f"conversations[{i}]['value']")
        if i % 2 == 0:
            question = text
        else:
            pairs.append((question, text))
    return pairs


def _pair_from_dict(item: Any, what: str) -> tuple[str, str]:
    if not isinstance(item, dict) or "question" not in item or "answer" not in item:
        raise ValueError(f"{what} must be a dict with keys 'question' and 'answer', "
                         f"got {item!r}")
    return (_text(item["question"], f"{what}['question']"),
            _text(item["answer"], f"{what}['answer']"))


def turns_from_json(value) -> list[tuple[str, str]]:
    """Question/answer pairs from parsed JSON.

    Accepts (a) LLaVA ``conversations``: a list of ``{"from": "human"|"user",
    "value": str}`` / ``{"from": "gpt"|"assistant", "value": str}`` dicts
    alternating human, gpt, ...; also a record holding such a list under the
    key ``"conversations"``; (b) a list of ``{"question": str, "answer": str}``
    dicts; (c) one such dict. A ``str``/``bytes`` value is parsed as JSON first.

    Returns:
      ``[(question, answer), ...]``, at least one pair.

    Raises:
      ValueError: malformed input (wrong roles or order, missing keys, empty
        list, non-string texts, invalid JSON text).
    """
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"question/answer text is not valid JSON: {e}") from e
    if isinstance(value, dict):
        if "conversations" in value:
            value = value["conversations"]
            if not isinstance(value, list):
                raise ValueError("'conversations' must be a list of turns, got "
                                 f"{type(value).__name__}")
        else:
            return [_pair_from_dict(value, "question/answer dict")]
    if not isinstance(value, list):
        raise ValueError(
            "question/answer JSON must be a list of turns ({'from', 'value'}), a list of "
            f"{{'question', 'answer'}} dicts, or one such dict; got {type(value).__name__}")
    if not value:
        raise ValueError("question/answer list is empty; need at least one pair")
    if isinstance(value[0], dict) and "from" in value[0]:
        return _turns_from_conversations(value)
    return [_pair_from_dict(item, f"question/answer list[{i}]") for i, item in enumerate(value)]


def system_ids(tokenizer, template: TemplateSpec = "qa") -> list[int]:
    """Content ids of the template's system text (``[]`` when it has none)."""
    return list(_system_ids(tokenizer, dialog_template(template)))


@functools.lru_cache(maxsize=16)
def _system_ids(tokenizer, template: DialogTemplate) -> tuple[int, ...]:
    # Encoded once per tokenizer and template, not once per training sample.
    system = template.system
    return tuple(int(t) for t in tokenizer._encode_content([system + " "])[0]) if system else ()


def _prompt_content(tokenizer, question: str, image_token_id: int | None,
                    template: TemplateSpec = "qa", first: bool = True) -> list[int]:
    """Ids of one turn's prompt without specials (system text first when
    ``first``); the image placeholder handled."""
    question = _text(question, "question")
    prompt = dialog_template(template).prompt
    if image_token_id is None:
        # Drop the placeholder and the whitespace around it, keeping one space
        # between words it separated.
        question = re.sub(rf"\s*{re.escape(IMAGE_PLACEHOLDER)}\s*", " ", question).strip()
        pieces = [prompt.replace("{question}", question)]
    else:
        pieces = prompt.replace("{question}", question).split(IMAGE_PLACEHOLDER)
    encoded = tokenizer._encode_content([p for p in pieces if p])
    ids, k = (system_ids(tokenizer, template) if first else []), 0
    for i, piece in enumerate(pieces):
        if i:
            ids.append(int(image_token_id))
        if piece:
            ids.extend(int(t) for t in encoded[k])
            k += 1
    return ids


def encode_prompt(tokenizer, question: str, image_token_id: int | None = None,
                  template: TemplateSpec = "qa") -> list[int]:
    """Ids of ``[BOS] + system + prompt`` for a first turn, e.g.
    ``[BOS] + "Q: {question} A:"`` (no EOS, no padding).

    ``"<image>"`` inside the question becomes the single id ``image_token_id``;
    when that is None the placeholder is removed together with the whitespace
    around it (words it separated keep one space).
    """
    prefix = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    return prefix + _prompt_content(tokenizer, question, image_token_id, template)


def question_text(prompt_text: str, template: TemplateSpec = "qa") -> str:
    """The question inside a decoded first-turn prompt: for the "qa" template,
    ``"Q: what ...? A:"`` -> ``"what ...?"``."""
    t = dialog_template(template)
    text = prompt_text.strip()
    if t.system and text.startswith(t.system):
        text = text[len(t.system):].strip()
    before, after = (part.strip() for part in t.prompt.split("{question}"))
    if before and text.startswith(before):
        text = text[len(before):]
    if after and text.endswith(after):
        text = text[:-len(after)]
    return text.strip()


def encode_dialog(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int,
                  image_token_id: int | None = None, template: TemplateSpec = "qa",
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of a dialog.

    Layout: ``[BOS]`` + the template's system text + for each pair the prompt
    (``"Q: q A:"`` in "qa"; mask 0) then ``" a"`` + ``[EOS]`` (mask 1), then
    ``tokenizer.pad_id`` (mask 0). The first pair's prompt part equals
    ``encode_prompt(tokenizer, q, image_token_id, template)``.
    Pairs that do not fit entirely are dropped from the end; when even the first
    one does not fit, its answer is cut so that EOS lands at ``max_len - 1``.

    Args:
      pairs: ``[(question, answer), ...]``, e.g. from ``turns_from_json``.
      max_len: row length L.

    Returns:
      ``ids`` int32 ``[L]`` and ``loss_mask`` int32 ``[L]``.

    Raises:
      ValueError: no pairs, a malformed pair, or a first prompt too long for
        ``max_len`` (config key ``data.train.max_len``).
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("encode_dialog needs at least one (question, answer) pair")
    ids = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    mask = [0] * len(ids)
    eos = int(tokenizer.eos_id)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (question, answer) pair, got {pair!r}")
        question, answer = pair
        prompt = _prompt_content(tokenizer, question, image_token_id, template, first=not i)
        reply = [int(t) for t in tokenizer._encode_content(
            [" " + _text(answer, f"pairs[{i}] answer")])[0]]
        room = max_len - len(ids) - len(prompt) - 1  # answer tokens that fit before EOS
        if room < len(reply):
            if i:
                break
            if room < 0:
                raise ValueError(
                    f"the first prompt takes {len(ids) + len(prompt)} tokens (with BOS), "
                    f"which leaves no room for EOS within max_len={max_len}; raise "
                    "data.train.max_len or shorten the question.")
            reply = reply[:room]
        ids += prompt + reply + [eos]
        mask += [0] * len(prompt) + [1] * (len(reply) + 1)
    out_ids = np.full((max_len,), tokenizer.pad_id, np.int32)
    out_mask = np.zeros((max_len,), np.int32)
    out_ids[:len(ids)] = ids
    out_mask[:len(mask)] = mask
    return out_ids, out_mask


def dialog_from_members(members: dict, text_key: str, tokenizer, max_len: int,
                        image_token_id: int | None = None, template: TemplateSpec = "qa",
                        ) -> tuple[np.ndarray | None, str]:
    """Encode one webdataset sample's dialog: ``(int32 [2, max_len], "")`` with
    rows (ids, loss_mask), or ``(None, reason)`` when the sample has none.

    ``text_key`` is ``"json:FIELD"`` (dots for nesting; ``"json"`` alone = the
    whole JSON) holding any form ``turns_from_json`` accepts.
    """
    ext, _, field = text_key.partition(":")
    raw = members.get(ext)
    if raw is None:
        return None, f"no {ext!r} member"
    try:
        pairs = turns_from_json(json_field(raw, field))
        ids, mask = encode_dialog(tokenizer, pairs, max_len, image_token_id, template)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return None, f"{text_key}: {e}"
    return np.stack([ids, mask]).astype(np.int32), ""


def split_dialog(ids: Sequence[int], loss_mask: Sequence[int], bos_id: int | None,
                 eos_id: int, system: Sequence[int] = ()) -> list[tuple[list[int], list[int]]]:
    """Inverse of ``encode_dialog`` on ids: ``[(prompt_ids, answer_ids), ...]``.

    Each prompt comes back as a first-turn prompt (BOS + system + "Q: ... A:",
    the ids ``encode_prompt`` gives; ``system`` = ``system_ids(tokenizer,
    template)``); answers exclude EOS. Used to ask every question of an
    evaluation dialog on its own.
    """
    ids, mask = list(map(int, ids)), list(map(int, loss_mask))
    head = [bos_id] if bos_id is not None and ids and ids[0] == bos_id else []
    start = len(head)
    system = [int(t) for t in system]
    if system and ids[start:start + len(system)] == system:
        start += len(system)  # the system text is put back in front of every prompt
    head += system
    pairs, prompt, answer, i = [], [], [], start
    while i < len(ids):
        if mask[i]:
            if ids[i] == eos_id:
                pairs.append((head + prompt, answer))
                prompt, answer = [], []
            else:
                answer.append(ids[i])
        elif answer:  # a cut answer without EOS ends the dialog
            break
        else:
            prompt.append(ids[i])
        i += 1
    return [(p, a) for p, a in pairs if len(p) > len(head)]


def _vqa_items(value) -> list[tuple[str, list[str]]]:
    """`[(question, [answers])]` from a VQA JSON value: a list of (or one)
    ``{"question": str, "answer": str}`` or ``{"question": str, "answers": [str, ...]}``
    (VQAv2's ten human answers; dicts ``{"answer": str}`` accepted in the list)."""
    if isinstance(value, (str, bytes)):
        value = json.loads(value)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("question list is empty")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "question" not in item or not (
                "answer" in item or "answers" in item):
            raise ValueError(f"question {i} must be a dict with 'question' and 'answer' (or "
                             f"'answers'), got {item!r}")
        answers = item["answers"] if "answers" in item else [item["answer"]]
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        out.append((_text(item["question"], f"question {i}"),
                    [_text(a, f"question {i}'s answer") for a in answers]))
    return out


def vqa_from_members(members: dict, text_key: str, tokenizer, max_len: int,
                     answer_index: dict, num_questions: int, max_answers: int = 10,
                     template: TemplateSpec = "qa"):
    """Encode one sample's questions for VQA as classification (`text_format="vqa"`).

    Each question becomes its first-turn prompt (`encode_prompt`: ``[BOS] "Q: {q} A:"``
    in the "qa" template, the ids VQA evaluation asks with), padded to `max_len`.
    Its answers (one, or VQAv2's ten) are looked up in `answer_index` (answer ->
    class, matched after `strip().lower()`); each distinct in-vocabulary answer
    gets the soft score min(1, count / 3) (1 for a single answer), the
    `max_answers` most frequent kept.

    Returns ``((ids int32 [Q, L], answer_ids int32 [Q, K], answer_scores float32
    [Q, K]), "")`` with Q = `num_questions` (rows after the sample's last question:
    pad ids, answer ids -1) and K = `max_answers`, or ``(None, reason)`` when the
    sample has no question or none of its answers is in the vocabulary.
    """
    ext, _, field = text_key.partition(":")
    raw = members.get(ext)
    if raw is None:
        return None, f"no {ext!r} member"
    try:
        items = _vqa_items(json_field(raw, field))[:num_questions]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return None, f"{text_key}: {e}"
    ids = np.full((num_questions, max_len), tokenizer.pad_id, np.int32)
    answer_ids = np.full((num_questions, max_answers), -1, np.int32)
    scores = np.zeros((num_questions, max_answers), np.float32)
    for i, (question, answers) in enumerate(items):
        prompt = encode_prompt(tokenizer, question, None, template)[:max_len]
        ids[i, :len(prompt)] = prompt
        counts = collections.Counter(a.strip().lower() for a in answers)
        known = [(a, c) for a, c in counts.most_common() if a in answer_index][:max_answers]
        for j, (answer, count) in enumerate(known):
            answer_ids[i, j] = answer_index[answer]
            scores[i, j] = 1.0 if len(answers) == 1 else min(1.0, count / 3.0)
    if not (answer_ids >= 0).any():
        return None, f"{text_key}: no answer is in the answer vocabulary (model.answers)"
    return (ids, answer_ids, scores), ""
