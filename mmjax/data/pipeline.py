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

Samples pass through a shuffle buffer (tokenized text + encoded media bytes;
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

This module is the public face; the parts live in their own modules:
``options`` (config keys, ``DataOptions``), ``assign`` (shard order and a
worker's position), ``samples`` (members -> tokens, label, media bytes;
batches), ``media`` (modality registry: member extensions, decoders),
``counters`` (bad samples, ``DataError``), ``workers`` (worker pipeline and
processes), ``resume`` (state and stream identity).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Callable

import numpy as np

from mmjax.data.assign import worker_shards
from mmjax.data.counters import DataError
from mmjax.data.media import MediaSpec
from mmjax.data.options import DataOptions, build_options, default_data_config
from mmjax.data.resume import (STATE_VERSION, StreamMismatchError, check_state,
                               iterator_state, stream_differences, stream_identity)
from mmjax.data.workers import WorkerPipeline, WorkerProcesses

__all__ = ["DataError", "StreamMismatchError", "STATE_VERSION", "DataOptions", "DataIterator",
           "WorkerPipeline", "build_eval_iterator", "build_options", "build_train_iterator",
           "default_data_config", "stream_differences", "stream_identity", "worker_shards"]


class DataIterator:
    """Iterator of batches ``{"image": [b, H, W, 3], "text": int32 [b, L],
    "label": int32 [b]}`` (+ ``"valid"`` bool [b] in eval; the media key is
    the modality's, ``mmjax.data.media``), with
    ``get_state``/``set_state``/``stats``/``close``. Build it with
    ``build_train_iterator`` or ``build_eval_iterator``.
    """

    def __init__(self, options: DataOptions, batch_size: int):
        self.o, self.batch_size = options, batch_size
        self.num_workers = options.num_workers
        self._states: list = [None] * self.num_workers
        self._next_worker = 0
        self._done = [False] * self.num_workers
        self._procs: WorkerProcesses | None = None
        self._local: WorkerPipeline | None = None
        self._pending: list = []  # eval: rows waiting to fill a batch
        self._stream_id: dict | None = None
        self.batches = 0

    # --- workers
    def _start(self):
        if self.o.workers == 0:
            self._local = WorkerPipeline(self.o, 0, self._states[0])
            return
        self._procs = WorkerProcesses(self.o, self._states, self.batch_size)

    def _started(self) -> bool:
        return self._local is not None or self._procs is not None

    def _get(self, w: int):
        """(kind, batch, state) from worker ``w``."""
        if self._local is not None:
            batch = self._local.next_batch(self.batch_size)
            return ("end" if batch is None else "batch"), batch, self._local.state()
        return self._procs.get(w)

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
        if self.o.mode == "train":
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
            if k in ("label", "group"):
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
        if self.o.mode != "train":
            raise ValueError("get_state is for training iterators; eval reads from the start")
        states = list(self._states)
        if self._local is not None:
            states = [self._local.state()]
        return iterator_state(self.o, self._identity(), next_worker=self._next_worker,
                              batches=self.batches, worker_states=states)

    def set_state(self, state: dict):
        """Continues from a ``get_state()`` result (stops and restarts workers).

        Raises ``StreamMismatchError`` (one line, naming what changed) when the
        state comes from another stream: other shard list, seed, shuffle buffer,
        sampling mode or weights, workers, or processes.
        """
        check_state(state, self._identity())
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
        if self._procs is not None:
            self._procs.close()
        self._procs, self._local = None, None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_train_iterator(cfg, local_batch_size: int, *, process_index: int | None = None,
                         process_count: int | None = None, seed: int | None = None,
                         tokenizer: Callable | None = None,
                         media: MediaSpec | str = "image") -> DataIterator:
    """Infinite training iterator over this process's share of the shards.

    Args:
      cfg: a ``default_data_config()``-shaped ConfigDict (or dict).
      local_batch_size: rows per batch on this process (global / process_count).
      process_index, process_count: default ``jax.process_index()/count()``.
      seed: overrides ``cfg.seed``.
      tokenizer: a picklable callable ``list[str] -> int32 [N, L]`` to use
        instead of ``cfg.tokenizer``.
      media: the media of each sample, a ``MediaSpec`` or a name in
        ``mmjax.data.media.MEDIA`` (a model's is ``Family.media``).

    Returns:
      DataIterator of ``{"image": [b, S, S, 3] float32|uint8, "text": int32
      [b, L], "label": int32 [b] (-1 if absent)}`` (the media key and array
      are the ``media``'s: ``"audio": [b, num_samples]``, ...).
    """
    opts = build_options(cfg, mode="train", process_index=process_index,
                         process_count=process_count, seed=seed, tokenizer=tokenizer,
                         media=media)
    return DataIterator(opts, local_batch_size)


def build_eval_iterator(cfg, batch_size: int, *, process_index: int | None = None,
                        process_count: int | None = None,
                        tokenizer: Callable | None = None,
                        media: MediaSpec | str = "image") -> DataIterator:
    """Reads this process's shards once, in the given order, with center crops.

    Batches are ``{"image", "text", "label", "valid": bool [b]}``; the last one
    is padded (``valid`` False, label -1). With several processes each reads
    ``shards[p::P]`` and batch counts may differ between processes.
    """
    opts = build_options(cfg, mode="eval", process_index=process_index,
                         process_count=process_count, seed=None, tokenizer=tokenizer,
                         media=media)
    return DataIterator(opts, batch_size)
