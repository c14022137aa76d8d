"""Visual question answering accuracy (the VQAv2 metric).

Answers are compared after VQA-style normalization (``normalize_answer``).
With a single reference answer the score is exact match (0 or 1). With the
usual 10 human answers it is the official consensus score: for each of the 10
subsets that leave one human answer out, ``min(1, matches / 3)``, averaged.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!")
_COMMA_IN_NUMBER = re.compile(r"(\d),(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.|\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
    "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "im": "i'm", "isnt": "isn't", "itll": "it'll", "ive": "i've", "mightnt": "mightn't",
    "mustnt": "mustn't", "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've",
    "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's",
    "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've",
    "youre": "you're", "youve": "you've", "oclock": "o'clock",
}


def normalize_answer(text: str) -> str:
    """VQA-style normalized answer.

    Lowercases and strips; removes punctuation (deleted when it touches a space
    or the text has a comma inside a number such as ``"1,000"``, else replaced
    by a space); removes periods except decimal points between digits; maps
    number words to digits (``"two"`` -> ``"2"``; as in the official evaluation
    ``"none"`` -> ``"0"`` too); drops the articles a/an/the; restores common
    contractions (``"dont"`` -> ``"don't"``); collapses spaces.
    """
    if not isinstance(text, str):
        raise ValueError(f"answer must be a string, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    delete = bool(_COMMA_IN_NUMBER.search(text))
    out = text
    for p in _PUNCT:
        if p not in out:
            continue
        out = out.replace(p, "" if delete or f"{p} " in text or f" {p}" in text else " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Score of one prediction against its reference answers.

    One answer: normalized exact match (0.0 or 1.0). Several (VQAv2 has 10):
    the mean over the leave-one-out subsets of ``min(1, #matches in subset / 3)``.
    """
    answers = list(answers)
    if not answers:
        raise ValueError(f"no reference answers for prediction {prediction!r}")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return float(np.mean([min(1.0, (total - h) / 3.0) for h in hits]))


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]],
               types: Sequence[str] | None = None) -> dict:
    """Mean VQA accuracy over N questions, overall and per question type.

    Args:
      predictions: N predicted answers.
      answers: N lists of reference answers.
      types: optional N question types.

    Returns:
      ``{"vqa_accuracy": float, "vqa_accuracy/<type>": float, ..., "count": N}``.
    """
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if types is not None and len(types) != len(predictions):
        raise ValueError(f"{len(types)} question types but {len(predictions)} predictions")
    if isinstance(answers[0] if answers else None, str):
        raise ValueError("answers must hold one list of reference answers per question, "
                         f"got a string {answers[0]!r}")
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    out = {"vqa_accuracy": float(np.mean(scores)) if scores else 0.0, "count": len(scores)}
    if types is not None:
        by_type: dict[str, list[float]] = {}
        for t, s in zip(types, scores):
            by_type.setdefault(str(t), []).append(s)
        out.update({f"vqa_accuracy/{t}": float(np.mean(v)) for t, v in sorted(by_type.items())})
    return out


def vqa_answers(answerer, batches, tokenizer, *, media: str = "image", max_new_tokens: int = 16,
                question_types: dict | None = None, chunk: int = 64,
                template="qa") -> dict:
    """Greedy answers of a model to every question of dialog batches.

    Every question of every valid row is asked on its own (as the first
    turn) and decoded greedily.

    Args:
      answerer: the model's answering function, `Family.answerer(model,
        variables)`: `(media [B, ...], prompts, tokenizer, max_new_tokens, width,
        chunk) -> B answers`.
      batches: iterable of dialog batches (`text_format="dialog"`), each a dict
        with the media under `media` (e.g. "image" `[B, H, W, 3]`), "text"
        (`[B, L]` dialog ids),
        "loss_mask" (`[B, L]`, 1 on answer tokens) and optionally "valid"
        (`[B]` bool; rows that are False are skipped).
      tokenizer: the tokenizer the batches were encoded with (its bos/eos/pad
        ids, `decode`).
      max_new_tokens: most tokens generated per answer.
      question_types: optional map question text -> type (for per-type
        scores in `vqa_report`); questions not in it get type "all".
      chunk: prompts decoded per compiled call.
      template: the dialog template the batches were encoded with.

    Returns:
      dict of N-long lists, one entry per question in batch order:
      "prediction", "answer" (the reference), "question" (decoded prompt),
      "type" (from `question_types`, else "all") and "batch" (int: which
      batch of `batches`, counting from 0, the question came from).
    """
    from mmjax.data.dialog import question_text, split_dialog, system_ids
    system = system_ids(tokenizer, template)
    out: dict = {k: [] for k in ("prediction", "answer", "question", "type", "batch")}
    for b, batch in enumerate(batches):
        valid = np.asarray(batch.get("valid", np.ones(len(batch["text"]), bool)), bool)
        rows, prompts = [], []
        for i in np.flatnonzero(valid):
            for prompt, answer in split_dialog(batch["text"][i], batch["loss_mask"][i],
                                               tokenizer.bos_id, tokenizer.eos_id, system):
                rows.append(i)
                prompts.append(prompt)
                q = tokenizer.decode(prompt)
                out["answer"].append(tokenizer.decode(answer).strip())
                out["question"].append(q)
                out["type"].append((question_types or {}).get(question_text(q, template), "all"))
                out["batch"].append(b)
        if prompts:
            out["prediction"] += answerer(np.asarray(batch[media])[np.asarray(rows)], prompts,
                                          tokenizer, max_new_tokens,
                                          width=int(batch["text"].shape[1]), chunk=chunk)
    return out


def vqa_report(answers: dict, *, typed: bool = False,
               baseline_answer: str | None = None) -> dict:
    """`vqa_scores` of `vqa_answers`'s dict (per type when `typed`), plus
    "baseline_accuracy" of always answering `baseline_answer` (when given) and
    "examples" (the first five question/answer/prediction triples)."""
    refs = [[a] for a in answers["answer"]]
    preds, questions = answers["prediction"], answers["question"]
    scores = vqa_scores(preds, refs, answers["type"] if typed else None)
    if baseline_answer is not None:
        scores["baseline_accuracy"] = float(np.mean(
            [vqa_accuracy(baseline_answer, r) for r in refs])) if refs else 0.0
    scores["examples"] = [dict(question=q, answer=r[0], prediction=p)
                          for q, r, p in list(zip(questions, refs, preds))[:5]]
    return scores
