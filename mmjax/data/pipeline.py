"""Webdataset input pipeline: shard order, shuffle buffer, workers, exact resume.

Order of the stream, for JAX process ``p`` of ``P`` and worker ``w`` of ``W``:

* epoch mode: every epoch ``e`` permutes all shards with a RNG seeded by
  ``(seed, e)`` -- the same permutation on every process -- and worker
  ``(p, w)`` reads shards ``perm[p + P*w :: P*W]`` in that order. Every shard
  is read exactly once per epoch by exactly one worker. Needs
  ``num_shards >= P * W``. Training repeats epochs forever.
* resampled mode: worker ``(p, w)`` draws its k-th shard with replacement
  (source weights respected) from a RNG seeded by ``(seed, p, w, k)``.
* eval: shards in the given order, split the same way, read once.

Samples pass through a shuffle buffer (tokenized text + encoded image bytes;
decoding happens on the way out), then are decoded with randomness from a
RNG seeded by ``(seed, epoch, shard, index)``. Each worker builds whole local
batches; the iterator takes them round-robin, worker 0, 1, ..., W-1, 0, ...

Exact resume: a worker's position is ``(epoch, cursor, offset)`` plus its
shuffle buffer as sample references ``[epoch, shard, index]`` and a counter
for its shuffle RNG. ``get_state()`` returns, per worker, the state after the
last batch handed out, so restoring it re-reads the referenced samples and
continues with exactly the batches the uninterrupted run would have given.
A position only means something in the stream it came from, so the state also
records that stream's identity (``stream_identity``: a sha256 of the ordered
shard list, the seed, shuffle buffer, sampling mode, workers, processes) and
``set_state`` refuses a state of another stream (``StreamMismatchError``).

Batches per step: the training stream is infinite on every process, so all
processes can always take the same number of batches per step (and no
process runs dry while another waits in a collective).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Callable

import ml_collections
import numpy as np

from mmjax.data import decode as decode_lib
from mmjax.data.dialog import dialog_from_members, dialog_template
from mmjax.data import sources as sources_lib
from mmjax.data.tario import (IMAGE_EXTS, ShardReadError, caption_list, iter_tar_samples,
                              json_member_error, sample_fields)
from mmjax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

STATE_VERSION = 1


class DataError(UserError, RuntimeError):
    """Too much bad data, or no readable data at all."""


class StreamMismatchError(DataError):
    """A saved iterator state belongs to another data stream (shards, seed, ...)."""


def default_data_config() -> ml_collections.ConfigDict:
    """Every key of the data pipeline (``config.data.train``), with defaults."""
    c = ml_collections.ConfigDict()
    c.shards = None            # required: pattern, "::"-joined patterns, or list; {000..099} / {a,b}
    c.weights = None           # None, or one sampling weight per pattern (needs resampled=True)
    c.caption_key = "txt"      # caption member: "txt", or "json:FIELD" for a JSON field
    c.text_format = "caption"  # "caption"; "captions": text [B, num_captions, L] from a JSON
                               # list (retrieval evals); "dialog": caption_key names JSON Q/A
                               # turns (mmjax.data.dialog), batches gain loss_mask [B, L]
    c.num_captions = 5         # "captions": rows per image (missing ones are all pad)
    c.image_token_id = None    # dialog: id that "<image>" in a question becomes (None: dropped)
    c.dialog_template = "qa"   # dialog: "qa" ("Q: {q} A:"), "vicuna_v1" (LLaVA), "blip2_vqa"
    c.tokenizer = "bytes"      # "bytes" | "sentencepiece:PATH" | "hf:PATH"
    c.max_len = 32             # text length L of the int32 [B, L] token ids
    c.image_size = 224         # output side in pixels
    c.augment = "rrc"          # "rrc" (random resized crop) or "center" (resize + center crop)
    c.crop_scale = (0.9, 1.0)  # rrc: range of the crop's fraction of the image area
    c.crop_ratio = (3 / 4, 4 / 3)  # rrc: range of the crop's aspect ratio (log-uniform)
    c.flip = False             # random horizontal flip
    c.mean = decode_lib.CLIP_MEAN  # per-channel mean on a 0..1 scale (CLIP's)
    c.std = decode_lib.CLIP_STD    # per-channel std on a 0..1 scale (CLIP's)
    c.output = "float32"       # "float32" (normalized on host) or "uint8" (normalize_on_device)
    c.shuffle_buffer = 1000    # samples held for shuffling per worker; 0 or 1 = no shuffle
    c.resampled = False        # True: infinite, shards drawn with replacement per worker
    c.workers = 4              # decoding processes per JAX process; 0 = decode in this process
    c.prefetch = 2             # batches each worker may prepare ahead
    c.max_pixels = 89_478_485  # skip images whose header declares more pixels (PIL's limit)
    c.max_bad_fraction = 0.1   # raise once this fraction of samples seen is bad ...
    c.min_bad_count = 100      # ... and at least this many were bad
    c.seed = 0                 # shard order, shuffle buffer and augmentation RNG seed
    c.reset_stream_on_resume = False  # True: a resumed run keeps the checkpoint's train state
                               # but starts the data stream afresh (needed to resume after
                               # changing shards, seed, shuffle_buffer, resampled, weights, workers)
    c.start_method = "spawn"   # multiprocessing start method for workers
    return c


def _cfg_get(cfg, key, default=None):
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None and default is not None else value


def _seeded(*ints: int) -> np.random.Generator:
    return np.random.default_rng([int(i) for i in ints])


class _RateLimitedLog:
    """At most one log line per reason per ``period`` seconds."""

    def __init__(self, period: float = 10.0):
        self.period, self.last = period, {}

    def __call__(self, reason: str, message: str, count: int):
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) >= self.period:
            self.last[reason] = now
            log.warning("skipped (%s, %d so far): %s", reason, count, message)


def worker_shards(num_shards: int, seed: int, epoch: int, process_index: int,
                  process_count: int, worker_index: int, num_workers: int,
                  shuffle: bool = True) -> list[int]:
    """Shard indices read by worker ``(process_index, worker_index)`` in an epoch.

    Shards are permuted with a RNG seeded by ``(seed, epoch)`` (identical on
    every process), then split by process, then by worker.
    """
    order = _seeded(seed, epoch).permutation(num_shards) if shuffle else np.arange(num_shards)
    stride = process_count * num_workers
    return [int(i) for i in order[process_index + process_count * worker_index::stride]]


class _ShardStream:
    """The samples of one worker, in order, with a resumable position.

    Position: ``epoch``, ``cursor`` (index into this epoch's shard list, or
    the draw number in resampled mode) and ``offset`` (samples of the current
    shard already taken). Yields parsed samples; bad ones are counted.
    """

    def __init__(self, opts: dict, worker: int, counters: "_Counters", tokenize):
        self.o, self.worker, self.counters, self.tokenize = opts, worker, counters, tokenize
        self.epoch = self.cursor = self.offset = 0
        self.finished = False
        self._lists: dict[int, list[int]] = {}
        self._it = None
        self._good_in_round, self._empty_rounds = 0, 0
        probs = opts["probs"]
        self._cdf = np.cumsum(probs).tolist() if probs is not None else None

    # --- where we are
    def _shard_list(self, epoch: int) -> list[int]:
        if epoch not in self._lists:
            o = self.o
            self._lists = {epoch: worker_shards(
                len(o["paths"]), o["seed"], epoch, o["process_index"], o["process_count"],
                self.worker, o["num_workers"], shuffle=o["mode"] == "train")}
        return self._lists[epoch]

    def _current(self) -> tuple[int, int]:
        """(pass id for per-sample RNG, shard index) of the current shard."""
        if self.o["resampled"]:
            u = _seeded(self.o["seed"], 7, self.o["process_index"], self.worker,
                        self.cursor).random()
            n = len(self.o["paths"])
            shard = min(bisect.bisect_right(self._cdf, u * self._cdf[-1]), n - 1)
            return self.cursor, shard
        return self.epoch, self._shard_list(self.epoch)[self.cursor]

    def _advance_shard(self):
        self._it, self.offset = None, 0
        self.cursor += 1
        if self.o["resampled"]:
            self._round_end(self.cursor % max(64, len(self.o["paths"])) == 0)
        elif self.cursor >= len(self._shard_list(self.epoch)):
            if self.o["mode"] == "eval":
                self.finished = True
                return
            self.epoch, self.cursor = self.epoch + 1, 0
            self._round_end(True)

    def _round_end(self, is_end: bool):
        # A whole epoch (or many draws) without one good sample would loop forever.
        if not is_end:
            return
        self._empty_rounds = 0 if self._good_in_round else self._empty_rounds + 1
        self._good_in_round = 0
        if self._empty_rounds >= 2:
            raise DataError(f"worker {self.worker} of process {self.o['process_index']} found "
                            "no readable sample in its shards; check data.train.shards.")

    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def set_position(self, pos: dict):
        self.epoch, self.cursor, self.offset = pos["epoch"], pos["cursor"], pos["offset"]
        self._it = None

    # --- reading
    def _open(self, shard: int, keep=None, stop_after=None):
        path = self.o["paths"][shard]
        f = sources_lib.open_shard(path)
        try:
            yield from iter_tar_samples(f, keep=keep, stop_after=stop_after)
        finally:
            f.close()

    def next(self):
        """Next good parsed sample ``(pass, shard, index, image_bytes, tokens,
        label)``, or None at the end of an eval pass."""
        while not self.finished:
            if not self.o["resampled"] and not self._shard_list(self.epoch):
                self.finished = True  # eval with more workers than shards
                break
            pass_id, shard = self._current()
            if self._it is None:
                start = self.offset
                self._it = self._open(shard, keep=lambda i: i >= start)
            try:
                index, key, members = next(self._it)
            except StopIteration:
                self._advance_shard()
                continue
            except (ShardReadError, OSError) as e:
                reason = getattr(e, "reason", None) or (
                    "missing_shard" if isinstance(e, FileNotFoundError) else "unreadable_shard")
                self.counters.bad(reason, self.o["paths"][shard], str(e))
                self._advance_shard()
                continue
            self.offset = index + 1
            parsed = self.parse(shard, key, members)
            if parsed is not None:
                self._good_in_round += 1
                return (pass_id, shard, index) + parsed
        return None

    def parse(self, shard: int, key: str, members: dict):
        """members -> (image bytes, tokens [L] int32, label), or None if bad.
        Text is tokenized here, before any image is decoded."""
        path = self.o["paths"][shard]
        self.counters.seen += 1
        image, caption, label = sample_fields(members, self.o["caption_key"])
        if image is None:
            self.counters.bad("no_image", path, f"sample {key!r} has no {'/'.join(IMAGE_EXTS)}")
            return None
        if not caption:
            why = json_member_error(members, self.o["caption_key"])
            if why is not None:
                self.counters.bad("invalid_json", path, f"sample {key!r}: {why}")
                return None
            self.counters.bad("no_caption", path,
                              f"sample {key!r} has no caption ({self.o['caption_key']})")
            return None
        if self.o["text_format"] == "captions":  # [C, L]: up to C captions, pad rows after
            captions = caption_list(members, self.o["caption_key"])[:self.o["num_captions"]]
            if not captions:
                self.counters.bad("no_caption", path, f"sample {key!r} has no caption "
                                  f"({self.o['caption_key']})")
                return None
            tokens = np.zeros((self.o["num_captions"], self.o["max_len"]), np.int32)
            tokens[:] = getattr(self.tokenize, "pad_id", 0)
            tokens[:len(captions)] = self.tokenize(captions)
            return image, tokens, label
        if self.o["text_format"] == "dialog":
            tokens, why = dialog_from_members(members, self.o["caption_key"], self.tokenize,
                                              self.o["max_len"], self.o["image_token_id"],
                                              self.o["dialog_template"])
            if tokens is None:
                self.counters.bad("no_dialog", path, f"sample {key!r}: {why}")
                return None
            return image, tokens, label
        tokens = np.asarray(self.tokenize([caption])[0], np.int32)
        return image, tokens, label

    def read_refs(self, refs: list) -> list:
        """Re-reads the samples named by ``[pass, shard, index]`` references."""
        wanted: dict[int, set] = {}
        for _, shard, index in refs:
            wanted.setdefault(shard, set()).add(index)
        found = {}
        for shard, indices in wanted.items():
            try:
                for index, key, members in self._open(shard, keep=indices.__contains__,
                                                      stop_after=max(indices)):
                    found[(shard, index)] = (key, members)
            except (ShardReadError, OSError) as e:
                log.warning("restoring shuffle buffer: shard %s unreadable (%s)",
                            self.o["paths"][shard], e)
        out = []
        seen = self.counters.seen
        for pass_id, shard, index in refs:
            if (shard, index) in found:
                parsed = self.parse(shard, *found[(shard, index)])
                if parsed is not None:
                    out.append((pass_id, shard, index) + parsed)
        self.counters.seen = seen  # these were counted when first read
        return out


class _Counters:
    """Per-worker counts: "ok" (samples emitted) and bad samples by reason."""

    def __init__(self, opts: dict, state: dict | None = None):
        self.o = opts
        self.counts: Counter = Counter(state["stats"] if state else {})
        self.seen = state["seen"] if state else 0
        self._log = _RateLimitedLog()

    def bad(self, reason: str, path: str, message: str):
        """Counts one bad sample (or lost shard); raises DataError once too many
        of the samples judged so far (``ok`` + bad: not those still waiting in
        the shuffle buffer) were bad."""
        self.counts[reason] += 1
        if reason.endswith("_shard") or reason in ("not_tar", "truncated_tar"):
            self.seen += 1  # a lost shard counts as one bad event
        self._log(reason, f"{path}: {message}", self.counts[reason])
        n_bad = sum(v for k, v in self.counts.items() if k != "ok")
        judged = n_bad + self.counts["ok"]
        if n_bad >= self.o["min_bad_count"] and n_bad > self.o["max_bad_fraction"] * judged:
            counts = ", ".join([f"ok={self.counts['ok']}"] + [
                f"{k}={v}" for k, v in sorted(self.counts.items()) if k != "ok" and v])
            raise DataError(
                f"{n_bad} of {judged} samples were bad (over data.train.max_bad_fraction="
                f"{self.o['max_bad_fraction']}; a lost shard counts as one sample); last bad "
                f"shard: {path} ({reason}: {message}). Counts: {counts}")


class WorkerPipeline:
    """One worker's whole pipeline: stream -> shuffle buffer -> decode -> batch.

    Runs inside a worker process, or in the main process when workers=0.
    """

    def __init__(self, opts: dict, worker: int, state: dict | None = None):
        self.o, self.worker = opts, worker
        self.counters = _Counters(opts, state)
        self.stream = _ShardStream(opts, worker, self.counters, _make_tokenizer(opts))
        self.buffer: list = []
        self.draws = 0
        if state is not None:
            self.stream.set_position(state)
            self.draws = state["draws"]
            self.buffer = self.stream.read_refs(state["buffer"])

    def state(self) -> dict:
        """JSON-serializable state of this worker (see module docstring)."""
        return {**self.stream.position(), "draws": self.draws,
                "buffer": [[p, s, i] for p, s, i, *_ in self.buffer],
                "stats": dict(self.counters.counts), "seen": self.counters.seen}

    def _next_raw(self):
        size = self.o["shuffle_buffer"]
        if size <= 1:
            return self.stream.next()
        while len(self.buffer) < size:
            item = self.stream.next()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        j = int(_seeded(self.o["seed"], 11, self.o["process_index"], self.worker,
                        self.draws).integers(len(self.buffer)))
        self.draws += 1
        item, self.buffer[j] = self.buffer[j], self.buffer[-1]
        self.buffer.pop()
        return item

    def next_sample(self):
        """Next decoded sample ``(image [S, S, 3] uint8, tokens [L], label)``."""
        o = self.o
        while True:
            raw = self._next_raw()
            if raw is None:
                return None
            pass_id, shard, index, image_bytes, tokens, label = raw
            rng = _seeded(o["seed"], pass_id, shard, index)
            try:
                image, _ = decode_lib.decode_and_crop(
                    image_bytes, o["image_size"], rng, augment=o["augment"],
                    scale=o["crop_scale"], ratio=o["crop_ratio"], flip=o["flip"],
                    max_pixels=o["max_pixels"])
            except decode_lib.ImageTooLarge as e:
                self.counters.bad("too_many_pixels", o["paths"][shard], f"sample {index}: {e}")
                continue
            except Exception as e:  # PIL raises many types for corrupt data
                self.counters.bad("corrupt_image", o["paths"][shard],
                                  f"sample {index}: {type(e).__name__}: {e}")
                continue
            self.counters.counts["ok"] += 1
            return image, tokens, label

    def next_batch(self, batch_size: int):
        """A dict of numpy arrays with up to ``batch_size`` rows, or None at the
        end (eval). Training batches are always full."""
        rows = []
        while len(rows) < batch_size:
            sample = self.next_sample()
            if sample is None:
                break
            rows.append(sample)
        if not rows:
            return None
        return _stack(rows, self.o)


def _stack(rows: list, o: dict) -> dict:
    images = np.stack([r[0] for r in rows])
    if o["output"] == "float32":
        images = decode_lib.normalize(images, o["mean"], o["std"])
    text = np.stack([r[1] for r in rows]).astype(np.int32)
    out = {"image": images, "label": np.asarray([r[2] for r in rows], np.int32)}
    if o["text_format"] == "dialog":  # rows of (ids, loss_mask)
        return dict(out, text=text[:, 0], loss_mask=text[:, 1])
    return dict(out, text=text)


def _make_tokenizer(opts: dict) -> Callable:
    tok = opts["tokenizer"]
    if callable(tok):
        return tok
    from mmjax.data.tokenizers import build_tokenizer
    return build_tokenizer(tok, opts["max_len"])


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_with_parent(parent_pid: int | None, period: float = 0.25):
    """Makes this worker process end when the process that started it dies
    (e.g. a SIGKILLed trainer), instead of blocking on a queue nobody reads.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``;
    strictly, on the exit of the parent's thread that started the worker: the
    iterator starts its workers from the thread that iterates). Everywhere, as
    well: a daemon thread that exits the process within ``period`` seconds once
    the parent is gone (``os.getppid()`` changed, or multiprocessing's parent
    sentinel closed). ``parent_pid``: the trainer's pid when it is this
    process's parent (spawn, fork), to catch a parent that died before the
    watch began; None under forkserver, whose server process is the parent
    (it exits when the trainer does). With the workers gone, multiprocessing's
    resource tracker (started for the queues' semaphores) sees its pipe close
    and exits too.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watch below still applies
    watched = os.getppid()
    parent = mp.parent_process()

    def parent_gone() -> bool:
        return os.getppid() != watched or (parent is not None and not parent.is_alive())

    if (parent_pid is not None and watched != parent_pid) or parent_gone():
        os._exit(1)  # the parent died before the death signal was armed

    def watch():
        while not parent_gone():
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="mmjax-data-parent-watch", daemon=True).start()


def _worker_main(opts, worker, state, batch_size, out_q, stop, parent_pid=None):
    """Worker process loop: put ("batch", batch, state) until told to stop.
    Ends by itself when its parent process dies (``_exit_with_parent``)."""
    try:
        _exit_with_parent(parent_pid)
        pipe = WorkerPipeline(opts, worker, state)
        while not stop.is_set():
            batch = pipe.next_batch(batch_size)
            item = ("end", None, pipe.state()) if batch is None else ("batch", batch, pipe.state())
            while not stop.is_set():
                try:
                    out_q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if batch is None:
                return
    except BaseException as e:  # report everything to the main process
        msg = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            out_q.put(("error", msg, None), timeout=5)
        except Exception:
            pass


def _sha256(items) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _shards_root(paths: list[str]) -> str:
    """Longest common folder prefix of the shard paths, with its "/" ('' if none)."""
    prefix = os.path.commonprefix(paths) if paths else ""
    return prefix[:prefix.rfind("/") + 1]


def stream_identity(opts: dict) -> dict:
    """What fixes which sample a training stream yields at a given position.

    Saved in every iterator state (readable, so a mismatch can say what
    changed): a sha256 of the ordered, resolved shard list (the same list on
    every process) and of the names below their common folder, the first and
    last shard, the seed, shuffle buffer, sampling mode and weights, loader
    workers and this process's place among the processes.
    """
    paths = list(opts["paths"])
    root = _shards_root(paths)
    probs = opts["probs"]
    return {"shards_sha256": _sha256(paths), "num_shards": len(paths),
            "shards_root": root, "shard_names_sha256": _sha256(p[len(root):] for p in paths),
            "first_shard": paths[0] if paths else None,
            "last_shard": paths[-1] if paths else None,
            "seed": opts["seed"], "shuffle_buffer": opts["shuffle_buffer"],
            "resampled": opts["resampled"],
            "weights_sha256": None if probs is None else _sha256(repr(float(p)) for p in probs),
            "workers": opts["num_workers"], "process_index": opts["process_index"],
            "process_count": opts["process_count"]}


def _shard_difference(saved: dict, now: dict) -> str | None:
    if saved.get("num_shards") != now["num_shards"]:
        return (f"config.data.train.shards has {now['num_shards']} shards, the checkpoint's "
                f"stream had {saved.get('num_shards')}")
    if "shards_sha256" not in saved or saved["shards_sha256"] == now["shards_sha256"]:
        return None
    if saved.get("shard_names_sha256") == now["shard_names_sha256"]:
        log.warning("config.data.train.shards moved from %r to %r (the same %d shard names in "
                    "the same order): resuming the data stream at its saved position",
                    saved.get("shards_root"), now["shards_root"], now["num_shards"])
        return None
    name = lambda ident, key: (ident.get(key) or "")[len(ident.get("shards_root") or ""):]  # noqa: E731
    for key, which in (("first_shard", "shard 0"),
                       ("last_shard", f"shard {now['num_shards'] - 1}")):
        if name(saved, key) != name(now, key):
            where = f"{which} {saved.get(key)!r} vs {now[key]!r}"
            break
    else:
        where = (f"same first and last shard {now['first_shard']!r} .. {now['last_shard']!r}, "
                 f"but the {now['num_shards']} shards differ in names or order")
    return f"config.data.train.shards is another shard list ({where})"


def stream_differences(state: dict, now: dict) -> list[str]:
    """What differs between the stream a saved state belongs to and ``now``
    (a ``stream_identity``), one phrase per difference; empty when they match.

    States saved without an identity (older mmjax) are checked on what they
    recorded: shard count, seed, workers and process count (with a warning).
    """
    saved = state.get("stream")
    if saved is None:
        log.warning("the checkpoint's data state does not record the identity of its stream "
                    "(saved by an older mmjax): only the shard count, seed, workers and process "
                    "count are checked")
        saved = {k: state[k] for k in ("num_shards", "seed", "workers", "process_count")
                 if k in state}
    diffs = []
    if saved.get("process_count") != now["process_count"]:
        diffs.append(f"the number of processes changed from {saved.get('process_count')} to "
                     f"{now['process_count']}")
    elif saved.get("process_index", now["process_index"]) != now["process_index"]:
        diffs.append(f"the state is process {saved['process_index']}'s, this is process "
                     f"{now['process_index']}")
    if saved.get("workers") != now["workers"]:
        diffs.append(f"config.data.train.workers changed from {saved.get('workers')} to "
                     f"{now['workers']} (0 counts as 1)")
    shards = _shard_difference(saved, now)
    if shards:
        diffs.append(shards)
    for key, norm in (("seed", int), ("resampled", bool),
                      ("shuffle_buffer", lambda n: max(1, int(n)))):  # 0 and 1: no shuffle
        if key in saved and norm(saved[key]) != norm(now[key]):
            diffs.append(f"config.data.train.{key} changed from {saved[key]!r} to {now[key]!r}")
    if ("weights_sha256" in saved and saved.get("resampled") == now["resampled"]
            and saved["weights_sha256"] != now["weights_sha256"]):
        diffs.append("config.data.train.weights changed")
    return diffs


class DataIterator:
    """Iterator of batches ``{"image": [b, H, W, 3], "text": int32 [b, L],
    "label": int32 [b]}`` (+ ``"valid"`` bool [b] in eval), with
    ``get_state``/``set_state``/``stats``/``close``. Build it with
    ``build_train_iterator`` or ``build_eval_iterator``.
    """

    def __init__(self, opts: dict, batch_size: int):
        self.o, self.batch_size = opts, batch_size
        self.num_workers = opts["num_workers"]
        self._states: list = [None] * self.num_workers
        self._next_worker = 0
        self._done = [False] * self.num_workers
        self._procs: list = []
        self._queues: list = []
        self._stop = None
        self._local: WorkerPipeline | None = None
        self._pending: list = []  # eval: rows waiting to fill a batch
        self._stream_id: dict | None = None
        self.batches = 0

    # --- workers
    def _start(self):
        if self.o["workers"] == 0:
            self._local = WorkerPipeline(self.o, 0, self._states[0])
            return
        ctx = mp.get_context(self.o["start_method"])
        parent = os.getpid() if ctx.get_start_method() != "forkserver" else None
        self._stop = ctx.Event()
        per_worker = self.batch_size
        for w in range(self.num_workers):
            q = ctx.Queue(maxsize=max(1, self.o["prefetch"]))
            p = ctx.Process(target=_worker_main, name=f"mmjax-data-{w}", daemon=True,
                            args=(self.o, w, self._states[w], per_worker, q, self._stop,
                                  parent))
            p.start()
            self._procs.append(p)
            self._queues.append(q)

    def _started(self) -> bool:
        return self._local is not None or bool(self._procs)

    def _get(self, w: int):
        """(kind, batch, state) from worker ``w``."""
        if self._local is not None:
            batch = self._local.next_batch(self.batch_size)
            return ("end" if batch is None else "batch"), batch, self._local.state()
        while True:
            try:
                return self._queues[w].get(timeout=1.0)
            except queue.Empty:
                if not self._procs[w].is_alive():
                    try:
                        return self._queues[w].get(timeout=1.0)
                    except queue.Empty:
                        raise DataError(f"data worker {w} exited unexpectedly "
                                        f"(exit code {self._procs[w].exitcode})") from None

    def _next_from_workers(self):
        """Next worker batch, round-robin; None when every worker is done."""
        while not all(self._done):
            w = self._next_worker
            self._next_worker = (w + 1) % self.num_workers
            if self._done[w]:
                continue
            kind, batch, state = self._get(w)
            if kind == "error":
                self.close()
                raise DataError(f"data worker {w} failed: {batch}")
            self._states[w] = state
            if kind == "end":
                self._done[w] = True
                continue
            return batch
        return None

    # --- iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._started():
            self._start()
        if self.o["mode"] == "train":
            batch = self._next_from_workers()
            if batch is None:
                raise StopIteration
            self.batches += 1
            return batch
        return self._next_eval()

    def _next_eval(self) -> dict:
        # Worker batches may be partial at each worker's end: regroup so only
        # the very last batch is short, then pad it and mark rows valid.
        while sum(len(b["label"]) for b in self._pending) < self.batch_size:
            batch = self._next_from_workers()
            if batch is None:
                break
            self._pending.append(batch)
        if not self._pending:
            raise StopIteration
        merged = {k: np.concatenate([b[k] for b in self._pending]) for k in self._pending[0]}
        n = min(self.batch_size, len(merged["label"]))
        rest = {k: v[n:] for k, v in merged.items()}
        self._pending = [rest] if len(rest["label"]) else []
        out = {}
        for k, v in merged.items():
            pad = np.zeros((self.batch_size - n,) + v.shape[1:], v.dtype)
            if k == "label":
                pad -= 1
            out[k] = np.concatenate([v[:n], pad])
        out["valid"] = np.arange(self.batch_size) < n
        self.batches += 1
        return out

    # --- state
    def _identity(self) -> dict:
        if self._stream_id is None:
            self._stream_id = stream_identity(self.o)
        return self._stream_id

    def get_state(self) -> dict:
        """Small JSON-serializable position: restoring it with ``set_state`` on a
        fresh iterator (same config and process) continues bit-exactly."""
        if self.o["mode"] != "train":
            raise ValueError("get_state is for training iterators; eval reads from the start")
        states = list(self._states)
        if self._local is not None:
            states = [self._local.state()]
        return {"version": STATE_VERSION, "seed": self.o["seed"],
                "process_index": self.o["process_index"],
                "process_count": self.o["process_count"], "workers": self.num_workers,
                "num_shards": len(self.o["paths"]), "stream": self._identity(),
                "next_worker": self._next_worker,
                "batches": self.batches, "worker_states": states}

    def set_state(self, state: dict):
        """Continues from a ``get_state()`` result (stops and restarts workers).

        Raises ``StreamMismatchError`` (one line, naming what changed) when the
        state comes from another stream: other shard list, seed, shuffle buffer,
        sampling mode or weights, workers, or processes.
        """
        if state.get("version") != STATE_VERSION:
            raise StreamMismatchError(
                f"data iterator state has version {state.get('version')!r}, this mmjax reads "
                f"version {STATE_VERSION}; set config.data.train.reset_stream_on_resume=True "
                "to start a fresh data stream.")
        diffs = stream_differences(state, self._identity())
        if diffs:
            raise StreamMismatchError(
                f"the data stream differs from the one the checkpoint was saved with: "
                f"{'; '.join(diffs)}. Resume with the original settings, or set "
                "config.data.train.reset_stream_on_resume=True to keep the checkpoint's train "
                "state and start a fresh data stream.")
        self.close()
        self._states = [None if s is None else json.loads(json.dumps(s))
                        for s in state["worker_states"]]
        self._next_worker = state["next_worker"]
        self.batches = state["batches"]
        self._done = [False] * self.num_workers
        self._pending = []

    def stats(self) -> dict:
        """Counts so far, summed over workers: ``{"ok": n, reason: count, ...}``."""
        total: Counter = Counter()
        states = [self._local.state()] if self._local is not None else self._states
        for s in states:
            if s:
                total.update(s["stats"])
        total.setdefault("ok", 0)
        return dict(total)

    def close(self):
        """Stops worker processes (safe to call twice)."""
        if self._stop is not None:
            self._stop.set()
        for q in self._queues:
            try:
                while True:
                    q.get_nowait()
            except (queue.Empty, OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
        for q in self._queues:
            q.close()
            q.cancel_join_thread()
        self._procs, self._queues, self._stop, self._local = [], [], None, None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _options(cfg, *, mode: str, process_index, process_count, seed, tokenizer) -> dict:
    """Flattens the config into the plain dict that worker processes receive."""
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    defaults = default_data_config()
    get = lambda k: _cfg_get(cfg, k, defaults[k])  # noqa: E731
    weights = _cfg_get(cfg, "weights")
    resampled = bool(get("resampled")) and mode == "train"
    if weights is not None and not resampled:
        raise ConfigError("data.train.weights needs data.train.resampled=True (weighted "
                          "sources are sampled with replacement).")
    src = sources_lib.build_sources(get("shards"), weights)
    workers = int(get("workers"))
    if workers < 0:
        raise ConfigError(f"data.train.workers must be >= 0, got {workers}")
    num_workers = max(1, workers)
    n = len(src.paths)
    if mode == "train" and not resampled and n < process_count * num_workers:
        raise ConfigError(
            f"data.train.shards has {n} shards but {process_count} processes x {num_workers} "
            f"workers need at least {process_count * num_workers} (one shard per worker per "
            "epoch); lower data.train.workers, use more shards, or set data.train.resampled=True.")
    if get("text_format") not in ("caption", "captions", "dialog"):
        raise ConfigError(f"data.train.text_format must be 'caption', 'captions' or 'dialog', got "
                          f"{get('text_format')!r}")
    template = _cfg_get(cfg, "dialog_template", "qa")
    if get("text_format") == "dialog":
        dialog_template(template)  # unknown name: clear error
    if get("output") not in ("float32", "uint8"):
        raise ConfigError(f"data.train.output must be 'float32' or 'uint8', got {get('output')!r}")
    return {
        "mode": mode, "paths": list(src.paths),
        "probs": src.shard_probabilities() if resampled else None,
        "resampled": resampled, "seed": int(get("seed") if seed is None else seed),
        "process_index": int(process_index), "process_count": int(process_count),
        "workers": workers, "num_workers": num_workers,
        "caption_key": get("caption_key"), "tokenizer": tokenizer or get("tokenizer"),
        "text_format": get("text_format"), "image_token_id": _cfg_get(cfg, "image_token_id"),
        "dialog_template": template,
        "num_captions": int(get("num_captions")),
        "max_len": int(get("max_len")), "image_size": int(get("image_size")),
        "augment": "center" if mode == "eval" else get("augment"),
        "crop_scale": tuple(get("crop_scale")), "crop_ratio": tuple(get("crop_ratio")),
        "flip": bool(get("flip")) and mode == "train",
        "mean": tuple(get("mean")), "std": tuple(get("std")), "output": get("output"),
        "shuffle_buffer": int(get("shuffle_buffer")) if mode == "train" else 0,
        "prefetch": int(get("prefetch")), "max_pixels": get("max_pixels"),
        "max_bad_fraction": float(get("max_bad_fraction")),
        "min_bad_count": int(get("min_bad_count")), "start_method": get("start_method"),
    }


def build_train_iterator(cfg, local_batch_size: int, *, process_index: int | None = None,
                         process_count: int | None = None, seed: int | None = None,
                         tokenizer: Callable | None = None) -> DataIterator:
    """Infinite training iterator over this process's share of the shards.

    Args:
      cfg: a ``default_data_config()``-shaped ConfigDict (or dict).
      local_batch_size: rows per batch on this process (global / process_count).
      process_index, process_count: default ``jax.process_index()/count()``.
      seed: overrides ``cfg.seed``.
      tokenizer: a picklable callable ``list[str] -> int32 [N, L]`` to use
        instead of ``cfg.tokenizer``.

    Returns:
      DataIterator of ``{"image": [b, S, S, 3] float32|uint8, "text": int32
      [b, L], "label": int32 [b] (-1 if absent)}``.
    """
    opts = _options(cfg, mode="train", process_index=process_index,
                    process_count=process_count, seed=seed, tokenizer=tokenizer)
    return DataIterator(opts, local_batch_size)


def build_eval_iterator(cfg, batch_size: int, *, process_index: int | None = None,
                        process_count: int | None = None,
                        tokenizer: Callable | None = None) -> DataIterator:
    """Reads this process's shards once, in the given order, with center crops.

    Batches are ``{"image", "text", "label", "valid": bool [b]}``; the last one
    is padded (``valid`` False, label -1). With several processes each reads
    ``shards[p::P]`` and batch counts may differ between processes.
    """
    opts = _options(cfg, mode="eval", process_index=process_index,
                    process_count=process_count, seed=None, tokenizer=tokenizer)
    return DataIterator(opts, batch_size)
