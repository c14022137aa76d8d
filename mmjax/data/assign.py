"""Which shards a worker reads, in which order, and where it stands in them.

Epoch mode: every epoch ``e`` permutes all shards with a RNG seeded by
``(seed, e)`` -- the same permutation on every process -- and worker
``(p, w)`` of ``P x W`` reads ``perm[p + P*w :: P*W]`` in that order.
Resampled mode: worker ``(p, w)`` draws its k-th shard with replacement
(source weights respected) from a RNG seeded by ``(seed, 7, p, w, k)``.
Eval: shards in the given order, split the same way, read once.
"""
from __future__ import annotations

import bisect
import logging
from typing import Callable

import numpy as np

from mmjax.data import sources as sources_lib
from mmjax.data.counters import Counters, DataError
from mmjax.data.tario import ShardReadError, iter_tar_samples

log = logging.getLogger("mmjax.data.pipeline")


def seeded(*ints: int) -> np.random.Generator:
    """A numpy Generator seeded by a sequence of integers."""
    return np.random.default_rng([int(i) for i in ints])


def worker_shards(num_shards: int, seed: int, epoch: int, process_index: int,
                  process_count: int, worker_index: int, num_workers: int,
                  shuffle: bool = True) -> list[int]:
    """Shard indices read by worker ``(process_index, worker_index)`` in an epoch.

    Shards are permuted with a RNG seeded by ``(seed, epoch)`` (identical on
    every process), then split by process, then by worker.
    """
    order = seeded(seed, epoch).permutation(num_shards) if shuffle else np.arange(num_shards)
    stride = process_count * num_workers
    return [int(i) for i in order[process_index + process_count * worker_index::stride]]


class ShardStream:
    """The samples of one worker, in order, with a resumable position.

    Position: ``epoch``, ``cursor`` (index into this epoch's shard list, or
    the draw number in resampled mode) and ``offset`` (samples of the current
    shard already taken). Yields samples parsed by ``parse(path, key,
    members)`` (None: a bad sample, already counted); lost shards are counted.
    """

    def __init__(self, options, worker: int, counters: Counters,
                 parse: Callable[[str, str, dict], tuple | None]):
        self.o, self.worker, self.counters, self.parse = options, worker, counters, parse
        self.epoch = self.cursor = self.offset = 0
        self.finished = False
        self._lists: dict[int, list[int]] = {}
        self._it = None
        self._good_in_round, self._empty_rounds = 0, 0
        probs = options.probs
        self._cdf = np.cumsum(probs).tolist() if probs is not None else None

    # --- where we are
    def _shard_list(self, epoch: int) -> list[int]:
        if epoch not in self._lists:
            o = self.o
            self._lists = {epoch: worker_shards(
                len(o.paths), o.seed, epoch, o.process_index, o.process_count,
                self.worker, o.num_workers, shuffle=o.mode == "train")}
        return self._lists[epoch]

    def _current(self) -> tuple[int, int]:
        """(pass id for per-sample RNG, shard index) of the current shard."""
        if self.o.resampled:
            u = seeded(self.o.seed, 7, self.o.process_index, self.worker, self.cursor).random()
            n = len(self.o.paths)
            shard = min(bisect.bisect_right(self._cdf, u * self._cdf[-1]), n - 1)
            return self.cursor, shard
        return self.epoch, self._shard_list(self.epoch)[self.cursor]

    def _advance_shard(self):
        self._it, self.offset = None, 0
        self.cursor += 1
        if self.o.resampled:
            self._round_end(self.cursor % max(64, len(self.o.paths)) == 0)
        elif self.cursor >= len(self._shard_list(self.epoch)):
            if self.o.mode == "eval":
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
            raise DataError(f"worker {self.worker} of process {self.o.process_index} found "
                            "no readable sample in its shards; check data.train.shards.")

    def position(self) -> dict:
        """``{"epoch", "cursor", "offset"}`` of the next sample."""
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def set_position(self, pos: dict):
        """Continues from a ``position()`` (its shard is reopened on the next read)."""
        self.epoch, self.cursor, self.offset = pos["epoch"], pos["cursor"], pos["offset"]
        self._it = None

    # --- reading
    def _open(self, shard: int, keep=None, stop_after=None):
        f = sources_lib.open_shard(self.o.paths[shard])
        try:
            yield from iter_tar_samples(f, keep=keep, stop_after=stop_after)
        finally:
            f.close()

    def next(self):
        """Next good parsed sample ``(pass, shard, index, *parsed)``, or None at
        the end of an eval pass."""
        while not self.finished:
            if not self.o.resampled and not self._shard_list(self.epoch):
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
                self.counters.bad(reason, self.o.paths[shard], str(e))
                self._advance_shard()
                continue
            self.offset = index + 1
            parsed = self.parse(self.o.paths[shard], key, members)
            if parsed is not None:
                self._good_in_round += 1
                return (pass_id, shard, index) + parsed
        return None

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
                            self.o.paths[shard], e)
        out = []
        seen = self.counters.seen
        for pass_id, shard, index in refs:
            if (shard, index) in found:
                parsed = self.parse(self.o.paths[shard], *found[(shard, index)])
                if parsed is not None:
                    out.append((pass_id, shard, index) + parsed)
        self.counters.seen = seen  # these were counted when first read
        return out
