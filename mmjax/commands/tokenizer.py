"""The ``mmjax tokenizer`` command: train a tokenizer on the captions of a shard set.

    mmjax tokenizer --shards '/data/{00000..00099}.tar' --out /tmp/tok/tokenizer.json
    mmjax tokenizer --shards synthetic --kind sentencepiece --out /tmp/tok/spm.model

Captions are streamed from the shards (`mmjax.data.tario`, the reader of the
training pipeline) straight into the trainer, never held all at once:

* ``--kind bpe``: a byte-level BPE (GPT-2 / CLIP style) trained with the
  Hugging Face ``tokenizers`` library, saved as a ``tokenizer.json`` with the
  special tokens ``<pad>`` (id 0), ``<|startoftext|>`` (1) and
  ``<|endoftext|>`` (2) and the post-processor
  ``<|startoftext|> $A <|endoftext|>`` (what ``hf:`` reads BOS and EOS from);
* ``--kind sentencepiece``: a unigram SentencePiece model (``NAME.model``)
  with pad 0, EOS 1, unk 2, BOS 3 and byte fallback, trained on a uniform
  sample of at most ``--input-sentence-size`` captions.

Bad input is skipped and counted under the training pipeline's names
(``truncated_tar``, ``not_tar``, ``missing_shard``, ``no_caption``,
``invalid_json``, ...). At the end the command prints the tokenizer spec and the
``--config.*`` flags that train a model with it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shlex
import sys
import time
import types
from typing import Iterator

from mmjax.commands.util import error_text, fail, user_errors
from mmjax.errors import UserError

log = logging.getLogger("mmjax")

KINDS = ("bpe", "sentencepiece")
DEFAULT_NAMES = {"bpe": "tokenizer.json", "sentencepiece": "sentencepiece.model"}
SUFFIXES = {"bpe": ".json", "sentencepiece": ".model"}

# BPE: the special tokens, in id order (pad 0 and EOS 2, as the byte tokenizer).
PAD, BOS, EOS = "<pad>", "<|startoftext|>", "<|endoftext|>"
BPE_SPECIALS = (PAD, BOS, EOS)
BPE_MIN_VOCAB = 256 + len(BPE_SPECIALS) + 1  # the byte alphabet, the specials, one merge

# SentencePiece: the ids of its meta pieces.
SP_IDS = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=3)

# Samples read without a single caption before the command gives up (a wrong
# --caption-key shows in the first shard, not after the whole set).
GIVE_UP_AFTER = 10_000
# Captions kept to report the token lengths of the trained tokenizer.
LENGTH_SAMPLE = 1000


class _ArgError(UserError):
    """A `mmjax tokenizer` usage or input error (printed as one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _ArgError(f"{message} (see mmjax tokenizer --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmjax tokenizer", description=(
        "Train a tokenizer on the captions of a webdataset shard set (streamed, skipping "
        "bad shards and samples) and print the flags that train a model with it."))
    p.add_argument("--shards", required=True, metavar="PATTERN",
                   help="shard pattern(s): '/data/{00000..00099}.tar', several joined with "
                        "'::', gs:// or s3:// URLs, or 'synthetic' (the built-in data)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="file to write: a .json file for --kind bpe (e.g. "
                        "/tmp/tok/tokenizer.json), a .model file for --kind sentencepiece; an "
                        "existing folder gets tokenizer.json or sentencepiece.model")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="bpe: byte-level BPE, a Hugging Face tokenizer.json (use as hf:PATH); "
                        "sentencepiece: a unigram SentencePiece model (use as "
                        "sentencepiece:PATH). Default: sentencepiece for an --out ending in "
                        ".model, else bpe")
    p.add_argument("--vocab-size", type=int, default=32000, metavar="N",
                   help="tokens in the vocabulary, special tokens included (default 32000); "
                        "captions too few or too alike for it give a smaller one")
    p.add_argument("--caption-key", default="txt", metavar="KEY",
                   help="caption member: 'txt', or 'json:FIELD' for a field of the JSON member "
                        "(dots for nesting; a list of strings gives several captions)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="stop after this many samples with a caption (default: all); shards "
                        "are read in the order given")
    p.add_argument("--lowercase", action="store_true",
                   help="lowercase text, in training and in every later encoding")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="bpe: fewest occurrences of a pair for it to be merged (default 2)")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, metavar="N",
                   help="sentencepiece: most captions it trains on, a uniform sample of all "
                        "read (default 2000000; 0: all of them, in memory)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   metavar="F",
                   help="sentencepiece: fraction of the characters seen that get their own "
                        "pieces; rarer ones are spelled as UTF-8 bytes (default 0.9995)")
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="with --shards synthetic: the recipe whose built-in data to read (its "
                        "'synthetic' section sizes it; default clip_tiny, the data `mmjax "
                        "train` uses by default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--log-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines (captions read, rate, ETA; default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_args(args) -> None:
    """Checks the options and settles ``args.kind`` and ``args.out`` (an absolute file
    path, whose folder exists and is writable), before any reading."""
    from mmjax.paths import is_remote
    if is_remote(args.out):
        raise _ArgError(f"--out {args.out}: write the tokenizer to a local path (copy it to "
                        "remote storage afterwards)")
    out = os.path.abspath(os.path.expanduser(args.out))
    if args.kind is None:
        args.kind = "sentencepiece" if out.endswith(".model") else "bpe"
    if os.path.isdir(out):
        out = os.path.join(out, DEFAULT_NAMES[args.kind])
    elif not out.endswith(SUFFIXES[args.kind]):
        raise _ArgError(f"--out {args.out}: a --kind {args.kind} tokenizer is a "
                        f"{SUFFIXES[args.kind]} file, e.g. "
                        f"{os.path.join(os.path.dirname(out), DEFAULT_NAMES[args.kind])}")
    if args.vocab_size < 1:
        raise _ArgError(f"--vocab-size must be positive, got {args.vocab_size}")
    if args.kind == "bpe" and args.vocab_size < BPE_MIN_VOCAB:
        raise _ArgError(f"--vocab-size {args.vocab_size} is too small for --kind bpe: the 256 "
                        f"bytes and {len(BPE_SPECIALS)} special tokens take "
                        f"{BPE_MIN_VOCAB - 1}; give at least {BPE_MIN_VOCAB}")
    if args.max_samples is not None and args.max_samples < 1:
        raise _ArgError(f"--max-samples must be positive, got {args.max_samples}")
    if args.min_frequency < 0:
        raise _ArgError(f"--min-frequency must be >= 0, got {args.min_frequency}")
    if args.input_sentence_size != 0 and args.input_sentence_size <= 100:
        raise _ArgError(f"--input-sentence-size must be 0 (all captions) or above 100 "
                        f"(SentencePiece's least), got {args.input_sentence_size}")
    if not 0 < args.character_coverage <= 1:
        raise _ArgError(f"--character-coverage must be in (0, 1], got "
                        f"{args.character_coverage}")
    ext = args.caption_key.partition(":")[0]
    if not ext or any(c.isspace() for c in args.caption_key):
        raise _ArgError(f"--caption-key {args.caption_key!r}: give a member such as 'txt' or "
                        "'json:caption'")
    if args.config is not None and args.shards != "synthetic":
        raise _ArgError("--config applies to --shards synthetic only (it picks the built-in "
                        "data)")
    if os.path.exists(out) and not args.overwrite:
        raise _ArgError(f"--out {out} exists; pass --overwrite to replace it, or choose "
                        "another file")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise _ArgError(f"--out {args.out}: cannot create its folder ({e})") from e
    if not os.access(parent, os.W_OK):
        raise _ArgError(f"--out {args.out}: folder {parent} is not writable")
    args.out = out


def shard_paths(shards: str, recipe: str | None = None) -> list[str]:
    """The paths of ``--shards``: its patterns expanded (`mmjax.data.sources`), or for
    ``"synthetic"`` the built-in train split of ``recipe`` (default ``clip_tiny``),
    written into the cache on first use as ``mmjax train`` does."""
    if shards == "synthetic":
        from mmjax.config.loading import load_config
        from mmjax.data.builtin import builtin_shards
        from mmjax.families import get_family
        config = load_config(recipe or "clip_tiny")
        return builtin_shards(config, "train", get_family(config).media(config.model))
    from mmjax.data.sources import expand_shards
    return expand_shards(shards, key="--shards")


class CaptionReader:
    """The captions of a list of shards, streamed: iterate over it once.

    Bad shards and samples are skipped and counted in ``counters`` (a
    `mmjax.data.counters.Counters`, the training pipeline's names, with its
    rate-limited warnings); ``samples`` counts the samples with a caption,
    ``captions`` the captions yielded (a JSON list gives several per sample),
    ``shards_done`` the shards finished. The first ``LENGTH_SAMPLE`` captions
    are kept in ``first``. A progress line (captions, rate, ETA) is logged
    every ``log_every`` seconds (None: never).
    """

    def __init__(self, paths: list[str], caption_key: str = "txt",
                 max_samples: int | None = None, log_every: float | None = 10.0):
        from mmjax.data.counters import Counters
        self.paths, self.caption_key, self.max_samples = list(paths), caption_key, max_samples
        # Never stop for bad data: only the counts and the warnings of training.
        self.counters = Counters(types.SimpleNamespace(max_bad_fraction=1.0, min_bad_count=0))
        self.samples = self.captions = self.shards_done = 0
        self.first: list[str] = []
        self.members: set[str] = set()  # member extensions seen, for the error of a wrong key
        self.last_bad: str | None = None
        self.log_every = log_every
        self.start = self._last_log = None

    def bad_counts(self) -> dict[str, int]:
        """Skipped shards and samples by reason (the pipeline's names)."""
        return {k: v for k, v in sorted(self.counters.counts.items()) if k != "ok" and v}

    def _bad(self, reason: str, path: str, message: str) -> None:
        self.counters.bad(reason, path, message)
        self.last_bad = f"{path}: {message}"

    def _sample_captions(self, path: str, key: str, members: dict) -> list[str]:
        from mmjax.data.tario import caption_list, json_member_error
        self.counters.seen += 1
        self.members.update(members)
        captions = caption_list(members, self.caption_key)
        if captions:
            self.counters.counts["ok"] += 1
            return captions
        why = json_member_error(members, self.caption_key)
        if why is not None:
            self._bad("invalid_json", path, f"sample {key!r}: {why}")
        else:
            self._bad("no_caption", path, f"sample {key!r} has no caption ({self.caption_key})")
        if self.samples == 0 and self.counters.seen >= GIVE_UP_AFTER:
            raise _ArgError(
                f"no caption in the first {self.counters.seen} samples of --shards: none has "
                f"member --caption-key {self.caption_key!r} (members seen: "
                f"{', '.join(sorted(self.members)) or 'none'}); choose the --caption-key that "
                "holds the captions")
        return []

    def __iter__(self) -> Iterator[str]:
        from mmjax.data.sources import open_shard
        from mmjax.data.tario import ShardReadError, iter_tar_samples
        self.start = self._last_log = time.perf_counter()
        for path in self.paths:
            try:
                with contextlib.closing(open_shard(path)) as f:
                    for _, key, members in iter_tar_samples(f):
                        captions = self._sample_captions(path, key, members)
                        if not captions:
                            continue
                        self.samples += 1
                        for caption in captions:
                            self.captions += 1
                            if len(self.first) < LENGTH_SAMPLE:
                                self.first.append(caption)
                            self._progress()
                            yield caption
                        if self.max_samples is not None and self.samples >= self.max_samples:
                            self.shards_done += 1
                            self._progress(final=True)
                            return
            except (ShardReadError, OSError) as e:
                reason = getattr(e, "reason", None) or (
                    "missing_shard" if isinstance(e, FileNotFoundError) else "unreadable_shard")
                self._bad(reason, path, str(e))
            self.shards_done += 1
        self._progress(final=True)

    def _progress(self, final: bool = False) -> None:
        if self.log_every is None:
            return
        now = time.perf_counter()
        if not final and now - self._last_log < self.log_every:
            return
        self._last_log = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.captions / elapsed
        if final:
            eta = f"read in {elapsed:.1f}s"
        else:
            if self.max_samples:
                left = (self.max_samples - self.samples) / max(self.samples / elapsed, 1e-9)
            elif self.shards_done:
                left = elapsed * (len(self.paths) - self.shards_done) / self.shards_done
            else:
                left = None
            eta = ("eta ?" if left is None or not self.samples
                   else f"eta {int(left // 60)}m{int(left % 60):02d}s")
        bad = sum(self.bad_counts().values())
        log.info("reading captions: %d captions, %d/%d shards | %.0f captions/s | %s%s",
                 self.captions, self.shards_done, len(self.paths), rate, eta,
                 f" | {bad} skipped" if bad else "")


def train_bpe(captions: Iterator[str], out: str, vocab_size: int, min_frequency: int = 2,
              lowercase: bool = False) -> None:
    """Trains a byte-level BPE on ``captions`` (consumed once, streamed) and saves it
    as a Hugging Face ``tokenizer.json`` at ``out``: specials ``<pad>`` 0,
    ``<|startoftext|>`` 1, ``<|endoftext|>`` 2, post-processor
    ``<|startoftext|> $A <|endoftext|>``, NFC (+ lowercase) normalization."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    from mmjax.data.batch import batched

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(batched(captions, 1000), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    tmp = out + ".tmp"
    tok.save(tmp)
    os.replace(tmp, out)


def train_sentencepiece(captions: Iterator[str], out: str, vocab_size: int,
                        input_sentence_size: int = 2_000_000,
                        character_coverage: float = 0.9995, lowercase: bool = False) -> None:
    """Trains a unigram SentencePiece model on ``captions`` (consumed once; the trainer
    keeps a uniform sample of ``input_sentence_size``) and writes it to ``out``:
    pad 0, EOS 1, unk 2, BOS 3, byte fallback, NFKC (+ case folding) normalization.

    Raises _ArgError when ``vocab_size`` cannot hold the pieces it must have.
    """
    import sentencepiece as spm

    failed: list[BaseException] = []

    def sentences():  # an error here reaches the trainer as a RuntimeError: keep it
        try:
            yield from captions
        except BaseException as e:
            failed.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="unigram",
            vocab_size=vocab_size, hard_vocab_limit=False,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            num_threads=os.cpu_count() or 1, minloglevel=2, **SP_IDS)
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if need:
            raise _ArgError(
                f"--vocab-size {vocab_size} is too small for --kind sentencepiece: the "
                f"captions' characters, 256 byte pieces and {len(SP_IDS)} special pieces need "
                f"{need.group(1)}; raise --vocab-size or lower --character-coverage") from e
        raise _ArgError(f"--kind sentencepiece: training failed: "
                        f"{str(e).splitlines()[0]}") from e
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)


def _token_lengths(tok, captions: list[str]) -> list[int]:
    """Tokens per caption, BOS and EOS included (at most ``tok.max_len``), sorted."""
    import numpy as np
    if not captions:
        return []
    ids = tok(captions)
    return sorted(int(n) for n in np.argmax(ids == tok.eos_id, axis=1) + 1)


@contextlib.contextmanager
def _log_to_stderr(enabled: bool):
    """INFO lines of the "mmjax" logger on stderr (timestamped) while inside, unless
    a handler is set up already or ``enabled`` is False."""
    if not enabled or log.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _run(args) -> int:
    paths = shard_paths(args.shards, args.config)
    if not paths:
        raise _ArgError(f"--shards {args.shards}: no shards")
    reader = CaptionReader(paths, args.caption_key, args.max_samples,
                           None if args.quiet else max(args.log_every, 0.0))
    captions = iter(reader)
    first = next(captions, None)  # no caption at all: an error before any training
    if first is None:
        counts = ", ".join(f"{k}={v}" for k, v in reader.bad_counts().items()) or "none"
        raise _ArgError(
            f"no captions in --shards {args.shards} ({len(paths)} shards, "
            f"{reader.counters.seen} samples read; skipped: {counts}"
            + (f"; last: {reader.last_bad}" if reader.last_bad else "")
            + (f"; members seen: {', '.join(sorted(reader.members))}" if reader.members else "")
            + "); check --shards and --caption-key")

    def stream():
        yield first
        yield from captions

    start = time.perf_counter()
    if args.kind == "bpe":
        train_bpe(stream(), args.out, args.vocab_size, args.min_frequency, args.lowercase)
        spec = f"hf:{args.out}"
        what = "byte-level BPE"
    else:
        train_sentencepiece(stream(), args.out, args.vocab_size, args.input_sentence_size,
                            args.character_coverage, args.lowercase)
        spec = f"sentencepiece:{args.out}"
        what = "unigram SentencePiece"
    took = time.perf_counter() - start

    from mmjax.data.tokenizers import build_tokenizer
    tok = build_tokenizer(spec, max_len=1024)  # what training will load
    size = (f"{tok.vocab_size} tokens" if tok.vocab_size == args.vocab_size else
            f"{tok.vocab_size} tokens (--vocab-size {args.vocab_size}: the captions "
            "support no more)")
    counts = reader.bad_counts()
    lengths = _token_lengths(tok, reader.first)
    print(f"wrote {args.out}: {what}, {size}; pad {tok.pad_id}, BOS {tok.bos_id}, "
          f"EOS {tok.eos_id}")
    print(f"trained on {reader.captions} captions of {reader.samples} samples from "
          f"{reader.shards_done}/{len(paths)} shards in {took:.1f}s; skipped: "
          + (", ".join(f"{k}={v}" for k, v in counts.items()) if counts else "none"))
    print(f"tokens per caption (BOS and EOS included) of the first {len(lengths)}: median "
          f"{lengths[len(lengths) // 2]}, 99th percentile "
          f"{lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]}, max {lengths[-1]} "
          "(longer ones are cut to data.train.max_len)")
    print(f"tokenizer: {spec}")
    flags = [f"--config.data.train.tokenizer={spec}",
             f"--config.model.text.vocab_size={tok.vocab_size}",
             f"--config.model.text.eos_id={tok.eos_id}",
             f"--config.model.text.pad_id={tok.pad_id}"]
    print("train with: " + " ".join(shlex.quote(f) for f in flags))
    return 0


def tokenizer_command(argv: list[str]) -> int:
    """Runs ``mmjax tokenizer`` with ``argv`` (without the subcommand); returns the exit
    code (2 with a one-line error for bad options or input)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except _ArgError as e:
        return fail(str(e))
    try:
        _check_args(args)
        with _log_to_stderr(not args.quiet):
            return _run(args)
    except user_errors() as e:
        return fail(error_text(e))
