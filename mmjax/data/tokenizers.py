"""Text tokenizers: fixed-length int32 token ids for the text towers.

Every tokenizer maps a list of strings to an int32 array ``[N, max_len]``::

    [BOS] tok_1 ... tok_k EOS pad pad ...

BOS is present only when the tokenizer has one. When the text is too long the
*content* is truncated so that EOS is always the last real token (text towers
pool at EOS, so it must never be cut off).

Three kinds, chosen by a spec string (``build_tokenizer``):

- ``"bytes"``: UTF-8 bytes, no files needed (the default; used by the built-in
  synthetic dataset and the tests).
- ``"sentencepiece:/path/model.model"``: a SentencePiece model (big_vision, T5).
- ``"hf:/path/tokenizer.json"``: a Hugging Face ``tokenizers`` JSON file
  (for example the CLIP BPE).

Special-token rule for SentencePiece and Hugging Face files: BOS and EOS are
the model's own (for ``tokenizer.json`` read from the post-processor, else
from well-known special-token names); the pad id is the model's pad token if
it defines one, otherwise the EOS id (what Hugging Face CLIP does). When pad
equals EOS, a padding mask must be derived from the first EOS position, not
from ``ids != pad_id``.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from mmjax.errors import ConfigError

SPEC_FORMS = ('"bytes", "sentencepiece:/path/model.model", '
              '"hf:/path/tokenizer.json"')


class Tokenizer:
    """Base class: subclasses implement ``_encode_content`` and ``_decode_content``.

    Attributes:
      vocab_size: number of ids (embedding table rows needed).
      pad_id: id used to fill positions after EOS.
      bos_id: id put first, or None when the tokenizer has no BOS.
      eos_id: id that ends every sequence.
      max_len: length L of every encoded row.
    """

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    max_len: int

    def _check_max_len(self):
        needed = 2 if self.bos_id is not None else 1
        if self.max_len < needed:
            raise ConfigError(
                f"tokenizer max_len={self.max_len} is too small: it must hold "
                f"{'BOS and ' if self.bos_id is not None else ''}EOS "
                f"(max_len >= {needed}); raise the text length in the config.")

    def _encode_content(self, texts: Sequence[str]) -> list[list[int]]:
        """Content ids of each text, without special tokens."""
        raise NotImplementedError

    def _decode_content(self, ids: list[int]) -> str:
        """Text of content ids (no special tokens among them)."""
        raise NotImplementedError

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes ``texts`` to int32 ids ``[N, max_len]`` (BOS? + content + EOS + pad)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        prefix = [] if self.bos_id is None else [self.bos_id]
        room = self.max_len - len(prefix) - 1  # content positions left for EOS
        for i, content in enumerate(self._encode_content(texts)):
            row = prefix + list(content[:room]) + [self.eos_id]
            out[i, :len(row)] = row
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one row of ids: stops at the first EOS, drops BOS and pad."""
        content = []
        for t in np.asarray(ids).reshape(-1).tolist():
            if t == self.eos_id:
                break
            if t == self.pad_id or (self.bos_id is not None and t == self.bos_id):
                continue
            content.append(int(t))
        return self._decode_content(content)

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"max_len={self.max_len}, pad_id={self.pad_id}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: pad 0, BOS 1, EOS 2, byte b -> b + 3 (vocab 259)."""

    OFFSET = 3

    def __init__(self, max_len: int):
        self.vocab_size = 256 + self.OFFSET
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.max_len = int(max_len)
        self._check_max_len()

    def _encode_content(self, texts):
        return [[b + self.OFFSET for b in t.encode("utf-8")] for t in texts]

    def _decode_content(self, ids):
        data = bytes(i - self.OFFSET for i in ids
                     if self.OFFSET <= i < self.vocab_size)
        # A truncated row can end inside a multi-byte character.
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file; BOS/EOS/pad from the model (pad falls back to EOS)."""

    def __init__(self, model_path: str, max_len: int):
        import sentencepiece as spm

        self.path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        if self._sp.eos_id() < 0:
            raise ConfigError(
                f"SentencePiece model {model_path} has no EOS piece (eos_id=-1); "
                "train it with eos_id >= 0.")
        self.eos_id = int(self._sp.eos_id())
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        self.max_len = int(max_len)
        self._check_max_len()

    def _encode_content(self, texts):
        return self._sp.encode(list(texts), out_type=int)

    def _decode_content(self, ids):
        return self._sp.decode(ids)


# Special-token names tried, in order, when a tokenizer.json post-processor
# does not say which tokens are BOS/EOS.
_BOS_NAMES = ("<|startoftext|>", "<s>", "[CLS]", "<bos>", "<|begin_of_text|>")
_EOS_NAMES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|end_of_text|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _specials_from_post_processor(proc: dict | None) -> tuple[str | None, str | None]:
    """(bos, eos) token strings named by a tokenizer.json post_processor, if any."""
    if not proc:
        return None, None
    kind = proc.get("type")
    if kind in ("RobertaProcessing", "BertProcessing"):
        return proc["cls"][0], proc["sep"][0]
    if kind == "TemplateProcessing":
        single = proc.get("single", [])
        first = single[0].get("SpecialToken") if single else None
        last = single[-1].get("SpecialToken") if single else None
        return (first["id"] if first else None), (last["id"] if last else None)
    if kind == "Sequence":
        bos = eos = None
        for p in proc.get("processors", []):
            b, e = _specials_from_post_processor(p)
            bos, eos = bos or b, eos or e
        return bos, eos
    return None, None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (e.g. CLIP BPE).

    BOS/EOS come from the post-processor (Roberta/Bert/Template), else from
    well-known special-token names; pad is the file's padding token or a
    ``<pad>``-like special token, else the EOS id.
    """

    def __init__(self, path: str, max_len: int):
        from tokenizers import Tokenizer as _HFTok

        self.path = path
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        self._tok = _HFTok.from_file(path)
        # Truncation and padding are done here so that EOS survives truncation.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

        specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
        bos, eos = _specials_from_post_processor(spec.get("post_processor"))
        if eos is None:
            eos = next((n for n in _EOS_NAMES if n in specials), None)
            bos = bos or next((n for n in _BOS_NAMES if n in specials), None)
        if eos is None:
            raise ConfigError(
                f"{path}: cannot tell the EOS token: the post_processor names none and "
                f"no special token is one of {list(_EOS_NAMES)}. Add a "
                "TemplateProcessing post-processor ending in the EOS token.")
        self.eos_id = self._id(eos)
        self.bos_id = self._id(bos) if bos is not None else None

        padding = spec.get("padding") or {}
        if padding.get("pad_token") in self._tok.get_vocab(with_added_tokens=True):
            self.pad_id = self._id(padding["pad_token"])
        else:
            pad = next((n for n in _PAD_NAMES if n in specials), None)
            self.pad_id = self._id(pad) if pad is not None else self.eos_id
        self.max_len = int(max_len)
        self._check_max_len()

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(f"{self.path}: special token {token!r} is not in the vocabulary.")
        return int(i)

    def _encode_content(self, texts):
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def _decode_content(self, ids):
        return self._tok.decode(ids, skip_special_tokens=True)


def build_tokenizer(spec: str = "bytes", max_len: int = 64) -> Tokenizer:
    """Tokenizer from a spec string.

    Args:
      spec: ``"bytes"``, ``"sentencepiece:/path/model.model"`` or
        ``"hf:/path/tokenizer.json"``.
      max_len: length L of every encoded row ``[N, L]``.

    Raises:
      ValueError: unknown spec form.
      FileNotFoundError: the model file does not exist.
    """
    spec = (spec or "bytes").strip()
    if spec == "bytes":
        return ByteTokenizer(max_len)
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("sentencepiece", "hf") or not path:
        raise ConfigError(
            f"unknown tokenizer spec {spec!r}; "
            f"accepted forms: {SPEC_FORMS}.")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} from spec {spec!r} does not exist; "
            f"accepted forms: {SPEC_FORMS}.")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, max_len)
    return HFTokenizer(path, max_len)
