"""Data curation: score every pair of webdataset shards with a trained model, choose
the pairs to keep, and write them into new shards (`mmjax curate` drives it).

Scores of one pair (image or other media + its caption), all float32:

* ``clip``: the cosine similarity of the model's normalized media and text
  embeddings (`encode_image` / `encode_text`; for a Q-Former model the best
  query, as BLIP-2's image-text contrast), the CLIP score DataComp filters by;
* ``itm``: the image-text matching probability, ``softmax(itm_logits)[1]``
  (BLIP-2 stage 1, one-tower models), the score BLIP's CapFilt filters by.

With a captioner (CoCa, BLIP-2 stage 1) each image also gets a synthetic
caption, scored by the same model, and the filter keeps, per image, the web
caption, the synthetic one, both or neither (CapFilt).

Two passes, each resumable per shard (a shard whose marker file exists is not
redone; partial files of a killed pass are redone):

1. ``score_shard``: a JSONL table of the shard's pairs (key, caption, scores,
   synthetic caption) and, for de-duplication, the normalized media embeddings;
2. ``select`` (every process reads every table and reaches the same choice:
   the global top fraction needs the whole score distribution, and an exact
   sort of a float per pair is cheap next to running the model on it), then
   ``write_shard``: the kept samples of one input shard, every member byte for
   byte, original keys, and the scores added to its JSON member.

Bad samples (no media, corrupt media, no caption, broken JSON, truncated tar)
are skipped and counted under the training pipeline's reasons.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.bad import BadSample
from mmjax.data.batch import batched
from mmjax.data.counters import Counters
from mmjax.data.samples import SampleParser
from mmjax.data.sources import open_shard
from mmjax.data.tario import ShardReadError, iter_tar_samples, sample_fields
from mmjax.data.writer import _member_info  # deterministic tar headers, as `mmjax shards`
from mmjax.models.jitted import per_model

SCORES = ("clip", "itm")
SYNTHETIC_SUFFIX = "_syn"  # key of a kept synthetic caption's sample: "<key>_syn"


# ---------------------------------------------------------------- reading pairs


@dataclasses.dataclass
class Pair:
    """One readable sample: stream index, key, caption, decoded media, caption ids."""
    index: int
    key: str
    caption: str
    media: np.ndarray
    tokens: np.ndarray


def read_pairs(path: str, options: Any, counters: Counters, tokenize: Callable,
               extra_views: Sequence[Any] = (), threads: int = 1, chunk: int = 64
               ) -> Iterator[tuple[Pair, list[np.ndarray]]]:
    """Yields each usable sample of shard `path` as `(Pair, [media decoded by each of
    extra_views])` (a captioner may read another image size / normalization), in
    shard order.

    `options`: the scoring model's eval `DataOptions` (center crops). Media of
    `chunk` samples at a time is decoded by `threads` threads (image decoders
    release the GIL). Bad samples and a shard that cannot be read (further) are
    counted in `counters` under the training pipeline's reasons and skipped."""
    from concurrent.futures import ThreadPoolExecutor
    views = (options,) + tuple(extra_views)

    def decode(item):
        index, _, _, (ext, data), _ = item
        try:
            rng = np.random.default_rng(index)
            return [v.media.decode(data, ext, rng, v) for v in views]
        except BadSample as e:
            return e

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for items in batched(_parsed(path, options, counters, tokenize), chunk):
            for item, media in zip(items, pool.map(decode, items) if threads > 1
                                   else map(decode, items)):
                index, key, caption, _, tokens = item
                if isinstance(media, BadSample):
                    counters.bad(media.reason, path, f"sample {key!r}: {media}")
                    continue
                counters.counts["ok"] += 1
                yield Pair(index, key, caption, media[0], tokens), media[1:]


def _parsed(path: str, options: Any, counters: Counters, tokenize: Callable) -> Iterator:
    """`(index, key, caption, (ext, media bytes), tokens)` of each sample with media and
    caption (the others counted); a shard that breaks is counted and ends the stream."""
    parser = SampleParser(options, counters, tokenize)
    try:
        with open_shard(path) as f:
            for index, key, members in iter_tar_samples(f):
                row = parser(path, key, members)
                if row is not None:
                    caption = sample_fields(members, options.caption_key)[1]
                    yield index, key, caption, row[0], np.asarray(row[1], np.int32)
    except ShardReadError as e:
        counters.bad(e.reason, path, str(e))


# ---------------------------------------------------------------- scoring


def available_scores(model: Any) -> tuple[str, ...]:
    """The scores `model` can give: "clip" with `encode_image`/`encode_text`, "itm" with
    `image_tokens`/`itm_logits`."""
    have = []
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        have.append("clip")
    if hasattr(model, "itm_logits") and hasattr(model, "image_tokens"):
        have.append("itm")
    return tuple(have)


def _normalized(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@per_model(maxsize=8)
def pair_score_fn(model: Any, kinds: tuple[str, ...]) -> Callable:
    """`fn(variables, media [B, ...], text int32 [B, L]) -> {kind: float32 [B],
    "embedding": float32 [B, E]}` for `kinds` (a subset of `SCORES`).

    "clip" is the cosine of the normalized embeddings (for `[B, Q, E]` media
    embeddings, the best query); "itm" the match probability; "embedding" the
    normalized media embedding (the mean over queries, normalized), which
    near-duplicate removal compares (present with "clip")."""
    unknown = set(kinds) - set(SCORES)
    if unknown:
        raise ValueError(f"unknown scores {sorted(unknown)}; choose from {SCORES}")

    def score(variables, media, text):
        out = {}
        if "clip" in kinds:
            img = _normalized(model.apply(variables, media, method="encode_image"))
            txt = _normalized(model.apply(variables, text, method="encode_text"))
            if img.ndim == 3:  # [B, Q, E]: the best query, as BLIP-2's contrast
                out["clip"] = jnp.max(jnp.einsum("bqe,be->bq", img, txt), axis=1)
                img = _normalized(jnp.mean(img, axis=1))
            else:
                out["clip"] = jnp.sum(img * txt, axis=-1)
            out["embedding"] = img
        if "itm" in kinds:
            tokens = model.apply(variables, media, method="image_tokens")
            logits = model.apply(variables, tokens, text, method="itm_logits")
            out["itm"] = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]
        return out
    return score


# ---------------------------------------------------------------- choosing


def order_by_score(scores: np.ndarray) -> np.ndarray:
    """Indices of `scores` best first; ties keep their order (the table's order:
    shard, then position), so every process sorts identically."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def duplicates(embeddings: np.ndarray, scores: np.ndarray, threshold: float,
               block: int = 2048) -> np.ndarray:
    """bool `[N]`: True for a pair whose media embedding has cosine >= `threshold`
    with that of a better-scored pair (ties: the earlier one), i.e. every
    near-duplicate but the best of its group.

    Exact, in blocks of `block` rows (`O(N^2 E)` work, `O(block N)` memory):
    right for up to a few million pairs per run; `embeddings` are normalized
    `[N, E]` (float16 is fine)."""
    emb = np.asarray(embeddings, np.float32)
    n = len(emb)
    rank = np.empty(n, np.int64)
    rank[order_by_score(scores)] = np.arange(n)
    dup = np.zeros(n, bool)
    for s in range(0, n, block):
        sim = emb[s:s + block] @ emb.T  # [b, N]
        better = rank[None, :] < rank[s:s + block, None]
        dup[s:s + block] = np.any((sim >= threshold) & better, axis=1)
    return dup


def keep_mask(scores: np.ndarray, keep_fraction: Optional[float] = None,
              threshold: Optional[float] = None, drop: Optional[np.ndarray] = None
              ) -> tuple[np.ndarray, float]:
    """Which pairs to keep and the score threshold that decided it.

    Exactly one of `keep_fraction` (the best `round(f * N)` pairs of the `N`
    scored, ties broken by table order; the pairs in `drop` are out first) or
    `threshold` (score >= threshold). Returns `(bool [N], threshold)`; with a
    fraction, the threshold is the lowest kept score (+inf when none is kept)."""
    scores = np.asarray(scores, np.float64)
    drop = np.zeros(len(scores), bool) if drop is None else np.asarray(drop, bool)
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of keep_fraction and threshold")
    if threshold is not None:
        return (scores >= threshold) & ~drop, float(threshold)
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    k = int(round(keep_fraction * len(scores)))
    order = [i for i in order_by_score(scores) if not drop[i]][:k]
    keep = np.zeros(len(scores), bool)
    keep[order] = True
    return keep, float(scores[order[-1]]) if order else float("inf")


# ---------------------------------------------------------------- writing


def _with_scores(members: dict[str, bytes], scores: dict, caption: Optional[str] = None,
                 caption_key: str = "txt") -> dict[str, bytes]:
    """The members of one output sample: the JSON member gains "curate" (the scores);
    a synthetic sample's caption replaces the caption member."""
    out = dict(members)
    doc = {}
    if "json" in out:
        try:
            doc = json.loads(out["json"])
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {"value": doc}
    if caption is not None:
        ext, _, field = caption_key.partition(":")
        if field:
            target = doc
            parts = field.split(".")
            for p in parts[:-1]:
                target = target.setdefault(p, {})
            target[parts[-1]] = caption
        else:
            out[ext] = caption.encode("utf-8")
    doc["curate"] = scores
    out["json"] = json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return out


def write_shard(in_path: str, out_path: str, kept: dict[str, dict],
                synthetic: dict[str, tuple[str, dict]], caption_key: str = "txt") -> int:
    """Writes the kept samples of shard `in_path` to `out_path` (via `out_path.tmp`,
    renamed when complete); returns the number of samples written.

    `kept`: key -> scores of the web pairs kept; `synthetic`: key -> (caption,
    scores) of the synthetic captions kept, each written as its own sample
    `<key>_syn` after the original (same media)."""
    tmp = out_path + ".tmp"
    written = 0
    with open_shard(in_path) as f, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT,
                                                encoding="utf-8") as tar:
        for key, members in _kept_samples(f, kept, synthetic, caption_key):
            for ext in sorted(members):
                data = members[ext]
                tar.addfile(_member_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
            written += 1
    os.replace(tmp, out_path)
    return written


def _kept_samples(f, kept: dict, synthetic: dict, caption_key: str):
    try:
        for _, key, members in iter_tar_samples(f):
            if key in kept:
                yield key, _with_scores(members, kept[key])
            if key in synthetic:
                caption, scores = synthetic[key]
                yield (key + SYNTHETIC_SUFFIX,
                       _with_scores(members, scores, caption, caption_key))
    except ShardReadError:  # counted when the shard was scored; what was read is written
        return


# ---------------------------------------------------------------- one shard


@dataclasses.dataclass
class Captioner:
    """A synthetic-caption source: `caption(media [B, ...], tokenizer, max_len) ->
    B strings` (`Family.captioner`), the `DataOptions` its media is decoded
    with, its tokenizer and the caption length."""
    caption: Callable
    options: Any
    tokenizer: Any
    max_len: int


def score_shard(path: str, runner: Callable, kinds: Sequence[str], options: Any,
                counters: Counters, tokenize: Callable, batch_size: int = 64,
                captioner: Optional[Captioner] = None, threads: int = 1
                ) -> tuple[list[dict], np.ndarray]:
    """Scores every usable pair of shard `path`.

    Args:
      runner: `runner(media [b, ...], text [b, L]) -> pair_score_fn's dict` (a
        `BatchRunner` of `pair_score_fn(model, kinds)` with the variables).
      kinds: the scores `runner` returns.
      options, counters, tokenize: as `read_pairs` (tokenize also encodes the
        synthetic captions).
      captioner: optional; each image also gets a synthetic caption, scored.
      threads: media decoding threads (`read_pairs`).
    Returns:
      `(records, embeddings)`: one JSON-able dict per usable sample, in shard
      order (`index`, `key`, `caption`, each score; with a captioner
      `synthetic` and `synthetic_<score>`), and float16 `[n, E]` normalized
      media embeddings (`[n, 0]` without "clip").
    """
    records, embs = [], []
    views = [captioner.options] if captioner else []
    pairs_ = read_pairs(path, options, counters, tokenize, views, threads, max(batch_size, 16))
    for chunk in batched(pairs_, batch_size):
        pairs = [p for p, _ in chunk]
        media = options.media.stack([p.media for p in pairs], options)
        out = runner(media, np.stack([p.tokens for p in pairs]))
        rows = [dict(index=p.index, key=p.key, caption=p.caption) for p in pairs]
        for k in kinds:
            for row, v in zip(rows, out[k]):
                row[k] = float(v)
        if "embedding" in out:
            embs.append(np.asarray(out["embedding"], np.float16))
        if captioner is not None:
            o = captioner.options
            texts = captioner.caption(o.media.stack([e[0] for _, e in chunk], o),
                                      captioner.tokenizer, captioner.max_len)
            syn = runner(media, np.asarray(tokenize(list(texts)), np.int32))
            for i, row in enumerate(rows):
                row["synthetic"] = texts[i]
                for k in kinds:
                    row[f"synthetic_{k}"] = float(syn[k][i])
        records.extend(rows)
    width = embs[0].shape[1] if embs else 0
    emb = np.concatenate(embs) if embs else np.zeros((len(records), width), np.float16)
    return records, emb
