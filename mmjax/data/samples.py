"""One sample's members -> fields: media member, tokenized text, label; rows -> batch.

Text is read the same way for every modality (``data.train.text_format``):

* ``caption``: member ``caption_key`` (``"txt"``, or ``"json:FIELD"``) ->
  int32 tokens ``[L]``;
* ``caption_list``: a JSON list under ``caption_key`` -> ``[num_captions, L]``,
  rows after the last caption all pad;
* ``dialog``: JSON Q/A turns -> ``[2, L]`` (ids, loss mask), split into
  ``text`` and ``loss_mask`` in the batch;
* ``vqa``: JSON questions with answers -> ``text [num_captions, L]`` (one prompt
  per question), ``answer_ids`` / ``answer_scores [num_captions, max_answers]``
  (classes of ``answers``, the answer vocabulary).

Labels come from a ``cls`` member (-1 when absent). Text is tokenized when a
sample is read, before its media is decoded.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mmjax.data.counters import Counters
from mmjax.data.dialog import dialog_from_members, vqa_from_members
from mmjax.data.tario import caption_list, json_member_error, sample_fields


def make_tokenizer(options) -> Callable:
    """``options.tokenizer`` as a callable ``list[str] -> int32 [N, max_len]``
    (a callable is used as it is; a spec string is built)."""
    tok = options.tokenizer
    if callable(tok):
        return tok
    from mmjax.data.tokenizers import build_tokenizer
    return build_tokenizer(tok, options.max_len)


def sample_group(members: dict, key: str) -> int:
    """The group id of a sample: a stable 31-bit hash of member ``key`` (``"txt"`` or
    ``"json:FIELD"``), -1 when ``key`` is empty or the sample lacks it."""
    if not key:
        return -1
    import zlib
    from mmjax.data.tario import json_field
    ext, _, field = key.partition(":")
    raw = members.get(ext)
    if raw is None:
        return -1
    try:
        value = json_field(raw, field) if field else raw.decode("utf-8", errors="replace")
    except (ValueError, KeyError, TypeError):
        return -1
    if value is None:
        return -1
    return zlib.crc32(str(value).strip().encode("utf-8")) & 0x7FFFFFFF


class SampleParser:
    """members -> ``((ext, media bytes), tokens, label, group)``, or None for a bad
    sample (counted in ``counters`` under its reason: ``no_<modality>``,
    ``invalid_json``, ``no_caption``, ``no_dialog``, ``no_vqa``)."""

    def __init__(self, options, counters: Counters, tokenize: Callable):
        self.o, self.counters, self.tokenize = options, counters, tokenize
        self.answer_index = {str(a).strip().lower(): i for i, a in enumerate(options.answers)}

    def __call__(self, path: str, key: str, members: dict):
        o, spec = self.o, self.o.media
        self.counters.seen += 1
        media = spec.find(members)
        if media is None:
            self.counters.bad(spec.missing_reason, path,
                              f"sample {key!r} has no {'/'.join(spec.exts)}")
            return None
        _, caption, label = sample_fields(members, o.caption_key)
        ids = (label, sample_group(members, o.group_key))
        if not caption:
            why = json_member_error(members, o.caption_key)
            if why is not None:
                self.counters.bad("invalid_json", path, f"sample {key!r}: {why}")
                return None
            self.counters.bad("no_caption", path,
                              f"sample {key!r} has no caption ({o.caption_key})")
            return None
        if o.text_format == "caption_list":  # [C, L]: up to C captions, pad rows after
            captions = caption_list(members, o.caption_key)[:o.num_captions]
            if not captions:
                self.counters.bad("no_caption", path, f"sample {key!r} has no caption "
                                  f"({o.caption_key})")
                return None
            tokens = np.zeros((o.num_captions, o.max_len), np.int32)
            tokens[:] = getattr(self.tokenize, "pad_id", 0)
            tokens[:len(captions)] = self.tokenize(captions)
            return (media, tokens) + ids
        if o.text_format == "dialog":
            tokens, why = dialog_from_members(members, o.caption_key, self.tokenize,
                                              o.max_len, o.image_token_id, o.dialog_template)
            if tokens is None:
                self.counters.bad("no_dialog", path, f"sample {key!r}: {why}")
                return None
            return (media, tokens) + ids
        if o.text_format == "vqa":
            fields, why = vqa_from_members(members, o.caption_key, self.tokenize, o.max_len,
                                           self.answer_index, o.num_captions, o.max_answers,
                                           o.dialog_template)
            if fields is None:
                self.counters.bad("no_vqa", path, f"sample {key!r}: {why}")
                return None
            return (media, fields) + ids
        tokens = np.asarray(self.tokenize([caption])[0], np.int32)
        return (media, tokens) + ids


def stack_rows(rows: list, options) -> dict:
    """Decoded rows ``(media array, tokens, label, group)`` -> the batch dict:
    ``{<media key>: [B, ...], "text": int32 [B, L] (or [B, C, L]), "label":
    int32 [B]}`` (+ ``"group"`` int32 [B] with ``group_key``; ``"loss_mask"``
    [B, L] for dialogs; ``"answer_ids"``, ``"answer_scores"`` [B, Q, K] for VQA)."""
    spec = options.media
    out = {spec.batch_key: spec.stack([r[0] for r in rows], options),
           "label": np.asarray([r[2] for r in rows], np.int32)}
    if options.group_key:
        out["group"] = np.asarray([r[3] for r in rows], np.int32)
    if options.text_format == "vqa":  # rows of (ids, answer ids, answer scores)
        return dict(out, text=np.stack([r[1][0] for r in rows]).astype(np.int32),
                    answer_ids=np.stack([r[1][1] for r in rows]).astype(np.int32),
                    answer_scores=np.stack([r[1][2] for r in rows]).astype(np.float32))
    text = np.stack([r[1] for r in rows]).astype(np.int32)
    if options.text_format == "dialog":  # rows of (ids, loss_mask)
        return dict(out, text=text[:, 0], loss_mask=text[:, 1])
    return dict(out, text=text)
