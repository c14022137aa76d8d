"""Text tokenizers: fixed-length int32 token ids for the text towers.

Every tokenizer maps a list of strings to an int32 array ``[N, max_len]``::

    [BOS] tok_1 ... tok_k EOS pad pad ...

BOS is present only when the tokenizer has one. When the text is too long the
*content* is truncated so that EOS is always the last real token (text towers
pool at EOS, so it must never be cut off).

Chosen by a spec string (``build_tokenizer``):

- ``"bytes"``: UTF-8 bytes, no files needed (the default; used by the built-in
  synthetic dataset and the tests).
- ``"sentencepiece:/path/model.model"``: a SentencePiece model (big_vision, T5).
- ``"hf:/path/tokenizer.json"``: a Hugging Face ``tokenizers`` JSON file
  (for example the CLIP BPE).
- A name of ``NAMED``: ``"clip"``, ``"siglip"``, ``"bert-base-uncased"``, ``"t5"``,
  or ``"hub:ORG/NAME"`` for any Hugging Face Hub repository holding tokenizer
  files (e.g. the language model's own for LLaVA). The files come from the hub
  cache (``mmjax.data.hub``: ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE``),
  downloaded on first use where there is network. The ids equal those of
  transformers' tokenizer of the repository (``CLIPTokenizer``,
  ``SiglipTokenizer``, ``BertTokenizer``, ``T5Tokenizer``, ``RobertaTokenizer``): a
  ``tokenizer.json`` is loaded when the repository has one (except for SigLIP,
  whose text is canonicalized first: lowercased, punctuation removed, whitespace
  collapsed), else the tokenizer is built from ``vocab.json`` + ``merges.txt``
  (CLIP; RoBERTa where ``tokenizer_config.json`` names ``RobertaTokenizer``),
  ``vocab.txt`` (BERT) or the SentencePiece model; the special tokens are those of
  ``tokenizer_config.json`` / ``special_tokens_map.json`` (transformers' class
  defaults where they say nothing). transformers itself is not needed.

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
import re
import string
from typing import Sequence

import numpy as np

from mmjax.errors import ConfigError

SPEC_FORMS = ('"bytes", "sentencepiece:/path/model.model", '
              '"hf:/path/tokenizer.json", "synthetic", "clip", "siglip", "bert-base-uncased", "t5", '
              '"hub:ORG/NAME"')


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
    """A SentencePiece model file; BOS/EOS/pad from the model (pad falls back to EOS).

    ``tokens`` overrides them by piece (``{"eos": "</s>", "pad": "<pad>"}``; a ``None``
    value: no such token, e.g. ``{"bos": None}``).
    """

    def __init__(self, model_path: str, max_len: int, tokens: dict | None = None):
        import sentencepiece as spm

        self.path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        own = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        ids = {k: int(v) if v >= 0 else None for k, v in own.items()}
        for key, piece in (tokens or {}).items():
            ids[key] = None if piece is None else self._piece_id(piece)
        if ids["eos"] is None:
            raise ConfigError(
                f"SentencePiece model {model_path} has no EOS piece (eos_id=-1); "
                "train it with eos_id >= 0.")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.max_len = int(max_len)
        self._check_max_len()

    def _piece_id(self, piece: str) -> int:
        i = int(self._sp.piece_to_id(piece))
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise ConfigError(f"{self.path}: special token {piece!r} is not a piece of the model.")
        return i

    def _encode_content(self, texts):
        return self._sp.encode(list(texts), out_type=int)

    def _decode_content(self, ids):
        return self._sp.decode(ids)


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


class SiglipTokenizer(SentencePieceTokenizer):
    """SigLIP's SentencePiece tokenizer, as transformers' ``SiglipTokenizer``: no BOS;
    the text is canonicalized (lowercased unless ``lowercase=False``, ASCII
    punctuation removed, whitespace runs collapsed, stripped) after a leading word
    boundary ``\u2581``, then encoded after ``unk`` whose pieces are dropped."""

    def __init__(self, model_path: str, max_len: int, eos: str, pad: str, unk: str,
                 lowercase: bool = True):
        super().__init__(model_path, max_len, {"bos": None, "eos": eos, "pad": pad})
        self.unk, self.lowercase = unk, lowercase

    def _encode_content(self, texts):
        skip = len(self._sp.encode(self.unk))
        out = []
        for text in texts:
            text = "\u2581" + text.replace("\u2581", " ")
            text = (text.lower() if self.lowercase else text).translate(_NO_PUNCTUATION)
            text = re.sub(r"\s+", " ", text).strip()
            out.append(self._sp.encode(self.unk + text)[skip:])
        return out


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
    """A Hugging Face ``tokenizers`` JSON file (e.g. CLIP BPE), or a built
    ``tokenizers.Tokenizer`` (``tokenizer``; ``path`` then names it in messages).

    BOS/EOS come from the post-processor (Roberta/Bert/Template), else from
    well-known special-token names; pad is ``pad_token`` if it is in the vocabulary,
    else the file's padding token, else a ``<pad>``-like special token, else the EOS
    id.
    """

    def __init__(self, path: str, max_len: int, *, tokenizer=None, pad_token: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        self.path = path
        self._tok = tokenizer if tokenizer is not None else _HFTok.from_file(path)
        spec = json.loads(self._tok.to_str())
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

        vocab = self._tok.get_vocab(with_added_tokens=True)
        pad = next((t for t in (pad_token, (spec.get("padding") or {}).get("pad_token"))
                    if t in vocab), None)
        pad = pad or next((n for n in _PAD_NAMES if n in specials), None)
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
        text = self._tok.decode(ids, skip_special_tokens=True)
        # CLIP's BPE marks word ends with "</w>", which its byte-level decoder keeps:
        # spaces, as in transformers' CLIPTokenizer.
        suffix = getattr(self._tok.model, "end_of_word_suffix", None)
        return text.replace(suffix, " ").strip() if suffix else text


# ---- named tokenizers: files from the Hugging Face Hub cache ----------------------

# name -> (repository, then older names of it looked for in the cache; kind).
NAMED = {
    "clip": (("openai/clip-vit-base-patch32",), "clip"),
    "siglip": (("google/siglip-base-patch16-224",), "siglip"),
    "bert-base-uncased": (("google-bert/bert-base-uncased", "bert-base-uncased"), "bert"),
    "t5": (("google-t5/t5-base", "t5-base"), "t5"),
}
# The file sets a kind loads from, best first (None: a `hub:` repository of any kind).
_FILES = {
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "siglip": (("spiece.model",),),
    "bert": (("tokenizer.json",), ("vocab.txt",)),
    "t5": (("tokenizer.json",), ("spiece.model",)),
    "roberta": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    None: (("tokenizer.json",), ("spiece.model",), ("tokenizer.model",), ("vocab.txt",),
           ("vocab.json", "merges.txt")),
}
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# tokenizer_config.json's `tokenizer_class` -> kind (a `hub:` repository).
_CLASS_KINDS = {"CLIPTokenizer": "clip", "SiglipTokenizer": "siglip", "BertTokenizer": "bert",
                "RobertaTokenizer": "roberta",
                "T5Tokenizer": "t5"}
# transformers' defaults of each class, where the repository's config says nothing.
_DEFAULTS = {
    "clip": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "siglip": {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
               "do_lower_case": True},
    "bert": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "cls_token": "[CLS]", "mask_token": "[MASK]", "do_lower_case": True,
             "tokenize_chinese_chars": True, "strip_accents": None},
    "t5": {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 100},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
                "add_prefix_space": False, "trim_offsets": True},
}
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
               r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def _read_config(folder: str) -> dict:
    """tokenizer_config.json with special_tokens_map.json over it; token values as strings."""
    cfg = {}
    for name in _CONFIG_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg.update({k: v.get("content") if k.endswith("_token") and isinstance(v, dict)
                            else v for k, v in json.load(f).items() if v is not None})
    return cfg


def _vocab_id(vocab: dict, token: str, where: str) -> int:
    if token not in vocab:
        raise ConfigError(f"{where}: special token {token!r} is not in the vocabulary.")
    return vocab[token]


def _clip_bpe(folder: str, cfg: dict):
    """CLIP's BPE from vocab.json + merges.txt, built as transformers' CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors

    vocab, merges = models.BPE.read_file(os.path.join(folder, "vocab.json"),
                                         os.path.join(folder, "merges.txt"))
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False,
                               unk_token=cfg["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    bos, eos = cfg["bos_token"], cfg["eos_token"]
    tok.post_processor = processors.RobertaProcessing(
        (eos, _vocab_id(vocab, eos, folder)), (bos, _vocab_id(vocab, bos, folder)),
        trim_offsets=False, add_prefix_space=False)
    tok.add_special_tokens(sorted({cfg[k] for k in ("bos_token", "eos_token", "pad_token",
                                                   "unk_token")}))
    return tok


def _bert_wordpiece(folder: str, cfg: dict):
    """BERT's WordPiece from vocab.txt, built as transformers' BertTokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = models.WordPiece.read_file(os.path.join(folder, "vocab.txt"))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=cfg["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=cfg["tokenize_chinese_chars"],
        strip_accents=cfg["strip_accents"], lowercase=cfg["do_lower_case"])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = cfg["cls_token"], cfg["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, _vocab_id(vocab, cls, folder)),
                                                  (sep, _vocab_id(vocab, sep, folder))])
    tok.add_special_tokens([cfg[k] for k in ("pad_token", "unk_token", "cls_token",
                                             "sep_token", "mask_token")])
    return tok


def _roberta_bpe(folder: str, cfg: dict):
    """RoBERTa's byte-level BPE (GPT-2's: no word-end suffix, cased) from vocab.json +
    merges.txt, built as transformers' RobertaTokenizer: `<s> ... </s>`, `<mask>`
    taking the space before it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = models.BPE.read_file(os.path.join(folder, "vocab.json"),
                                         os.path.join(folder, "merges.txt"))
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    prefix_space, trim = bool(cfg["add_prefix_space"]), bool(cfg["trim_offsets"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    cls, sep = cfg["cls_token"], cfg["sep_token"]
    tok.post_processor = processors.RobertaProcessing(
        (sep, _vocab_id(vocab, sep, folder)), (cls, _vocab_id(vocab, cls, folder)),
        trim_offsets=trim, add_prefix_space=prefix_space)
    tok.add_special_tokens([cfg[k] for k in ("bos_token", "eos_token", "unk_token", "sep_token",
                                             "pad_token", "cls_token")]
                           + [AddedToken(cfg["mask_token"], lstrip=True)])
    return tok


def load_pretrained(folder: str, max_len: int, kind: str | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face tokenizer folder (e.g. a hub snapshot).

    Args:
      folder: holds tokenizer.json, or vocab.json + merges.txt (CLIP, RoBERTa), vocab.txt
        (BERT), spiece.model / tokenizer.model (SentencePiece), with
        tokenizer_config.json / special_tokens_map.json.
      max_len: length L of every encoded row ``[N, L]``.
      kind: "clip", "siglip", "bert", "t5", "roberta", or None to read it from
        tokenizer_config.json's ``tokenizer_class`` (else: a generic tokenizer).
    """
    cfg = _read_config(folder)
    kind = kind or _CLASS_KINDS.get(str(cfg.get("tokenizer_class", "")).removesuffix("Fast"))
    cfg = {**_DEFAULTS.get(kind, {}), **cfg}

    def path(name):
        return os.path.join(folder, name)

    def has(*names):
        return all(os.path.isfile(path(n)) for n in names)

    if kind == "siglip" and has("spiece.model"):
        return SiglipTokenizer(path("spiece.model"), max_len, cfg["eos_token"],
                               cfg["pad_token"], cfg["unk_token"], bool(cfg["do_lower_case"]))
    if has("tokenizer.json"):
        return HFTokenizer(path("tokenizer.json"), max_len, pad_token=cfg.get("pad_token"))
    if kind == "clip" and has("vocab.json", "merges.txt"):
        return HFTokenizer(folder, max_len, tokenizer=_clip_bpe(folder, cfg),
                           pad_token=cfg["pad_token"])
    if kind == "roberta" and has("vocab.json", "merges.txt"):
        return HFTokenizer(folder, max_len, tokenizer=_roberta_bpe(folder, cfg),
                           pad_token=cfg["pad_token"])
    if kind == "bert" and has("vocab.txt"):
        return HFTokenizer(folder, max_len, tokenizer=_bert_wordpiece(folder, cfg),
                           pad_token=cfg["pad_token"])
    for name in ("spiece.model", "tokenizer.model"):
        if has(name):
            tokens = {k: cfg[f"{k}_token"] for k in ("eos", "pad") if cfg.get(f"{k}_token")}
            if kind == "t5":
                tokens["bos"] = None
            tok = SentencePieceTokenizer(path(name), max_len, tokens)
            # Ids past the model's pieces count too (T5's sentinels <extra_id_N>, tokens
            # added in tokenizer_config.json), as in transformers' len(tokenizer).
            added = [int(i) + 1 for i in cfg.get("added_tokens_decoder") or {}]
            tok.vocab_size = max([tok.vocab_size + int(cfg.get("extra_ids") or 0), *added])
            return tok
    raise ConfigError(
        f"{folder}: no tokenizer files mmjax can load for a {kind or 'generic'} tokenizer "
        f"(needs {' or '.join(' + '.join(s) for s in _FILES[kind])}).")


BYTE_IDS = {"vocab_size": 259, "pad_id": 0, "bos_id": 1, "eos_id": 2}
"""The byte tokenizer's vocabulary size and special ids."""


def token_ids(spec: str, max_len: int) -> dict:
    """`{vocab_size, pad_id, bos_id, eos_id}` of tokenizer `spec` (as
    `data.train.tokenizer` names it): the byte tokenizer's without building it, else
    the tokenizer's own (built: a named one read from the hub cache)."""
    if spec == "bytes":
        return dict(BYTE_IDS)
    tok = build_tokenizer(spec, int(max_len))
    return {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id}


def named_tokenizer(spec: str, max_len: int) -> Tokenizer:
    """The tokenizer named by ``spec`` (a name of ``NAMED`` or ``"hub:ORG/NAME"``), its
    files from the Hugging Face Hub cache (``mmjax.data.hub.snapshot_folder``: fetched
    on first use where there is network; ConfigError naming the repository, the files,
    the cache and the fetch command otherwise)."""
    from mmjax.data import hub

    if spec in NAMED:
        repos, kind = NAMED[spec]
    else:
        repos, kind = (spec[len("hub:"):].strip(),), None
        if repos[0].count("/") != 1:
            raise ConfigError(f"tokenizer spec {spec!r}: expected hub:ORG/NAME, a Hugging "
                              "Face Hub repository id.")
    needed = _FILES[kind]
    patterns = sorted({f for files in needed for f in files} | set(_CONFIG_FILES))
    folder = hub.snapshot_folder(repos, patterns, needed, f"tokenizer {spec!r}")
    return load_pretrained(folder, max_len, kind)


# `synthetic`: a byte-level BPE of the built-in captions (every word of them one token),
# `mmjax tokenizer --shards synthetic --config configs/one_tower_tiny.py --vocab-size 600`.
SYNTHETIC_BPE = os.path.join(os.path.dirname(__file__), "assets", "synthetic_bpe.json")


def build_tokenizer(spec: str = "bytes", max_len: int = 64) -> Tokenizer:
    """Tokenizer from a spec string.

    Args:
      spec: ``"bytes"``, ``"synthetic"`` (a word-level BPE of the built-in
        captions, shipped), ``"sentencepiece:/path/model.model"``,
        ``"hf:/path/tokenizer.json"``, a name of ``NAMED`` (``"clip"``, ``"siglip"``,
        ``"bert-base-uncased"``, ``"t5"``) or ``"hub:ORG/NAME"``.
      max_len: length L of every encoded row ``[N, L]``.

    Raises:
      ValueError: unknown spec form; a named tokenizer whose files are neither in the
        hub cache nor downloadable (ConfigError, a ValueError).
      FileNotFoundError: the model file does not exist.
    """
    spec = (spec or "bytes").strip()
    if spec == "bytes":
        return ByteTokenizer(max_len)
    if spec == "synthetic":
        return HFTokenizer(SYNTHETIC_BPE, max_len)
    if spec in NAMED or spec.startswith("hub:"):
        return named_tokenizer(spec, max_len)
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
