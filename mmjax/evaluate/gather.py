"""Evaluation in a multi-process job: host copies of sharded parameters, each
process's share of an eval stream, and host all-gathers that put per-example
results back in single-process order.

Every process reads the whole eval stream, runs the model on its share of the
batches (batch i on process i % P), and the per-example results are gathered
on the host, so every process returns the metrics a single-process run gives.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils



def host_variables(variables: Any) -> Any:
    """A full NumPy copy of `variables` on every process.

    Arrays sharded over several processes (FSDP train state) are all-gathered
    (every process must call this). We copy rather than evaluate on the
    sharded global arrays so each process runs its batches on its own device
    with the very programs of a single-process run: results match it exactly,
    no collective runs per batch (processes may take different numbers of
    batches), and the Python-driven decoding loops of captioning / VQA need
    no lockstep. The cost is one parameter copy per host, which single-device
    evaluation needs anyway.
    """
    leaves, treedef = jax.tree.flatten(variables)
    spread = [i for i, a in enumerate(leaves)
              if isinstance(a, jax.Array) and not a.is_fully_addressable]
    for i in spread:  # one leaf at a time: the replicated temporary stays small
        leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
    return jax.device_get(jax.tree.unflatten(treedef, leaves))


class Share:
    """This process's share of a stream of eval batches: batch i goes to
    process i % P.

    Every process reads the whole stream (same batches, padding and
    `max_samples` cut as a single process) and hands on only its own batches,
    so each example is evaluated once, in the same batch as in a
    single-process run. Items are batch dicts (rows: the True entries of
    "valid") or sequences (rows: all entries).
    """

    def __init__(self, items):
        self.items = items
        self.own: list[int] = []      # stream index of each batch handed on, in order
        self.counts: list[int] = []   # valid rows of every batch of the stream

    def __iter__(self):
        p, n = jax.process_index(), jax.process_count()
        for i, item in enumerate(self.items):
            self.counts.append(int(np.sum(item["valid"])) if isinstance(item, dict)
                               and "valid" in item else len(item))
            if i % n == p:
                self.own.append(i)
                yield item

    def rows(self) -> np.ndarray:
        """int32 `[n]`: for each valid row of this process's batches (in the
        order handed on), its index among the valid rows of the whole stream
        (= its position in a single-process run). Call after iterating."""
        start = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        return np.concatenate([np.zeros(0, np.int32)] + [
            np.arange(start[i], start[i + 1], dtype=np.int32) for i in self.own])


def allgather(x: np.ndarray) -> np.ndarray:
    """The rows of every process, process 0's first: `[n_p, ...]` -> `[sum n_p, ...]`.

    A fixed-shape host collective: row counts and trailing sizes are
    gathered first, then every process's rows zero-padded to the largest
    shape. Trailing dims may differ (shorter ones come back zero-padded) and a
    process without rows may pass shape `[0]`; the dtype must be the same
    everywhere (no 64-bit types: JAX moves them as 32-bit).
    """
    x = np.asarray(x)
    head = np.full(8, -1, np.int32)  # [rows, trailing dims..., -1 ...]
    head[0] = len(x)
    if len(x):
        if x.ndim > len(head):
            raise ValueError(f"cannot gather a {x.ndim}-d array (at most {len(head)} dims)")
        head[1:x.ndim] = x.shape[1:]
    heads = multihost_utils.process_allgather(head)                         # [P, 8]
    counts = heads[:, 0]
    if not counts.any():
        return x
    shapes = heads[counts > 0, 1:]
    trailing = tuple(int(d) for d in shapes.max(0)[:int((shapes[0] >= 0).sum())])
    buf = np.zeros((int(counts.max()),) + trailing, x.dtype)
    if len(x):
        buf[tuple(slice(0, d) for d in x.shape)] = x
    every = multihost_utils.process_allgather(buf)                         # [P, n, ...]
    return np.concatenate([every[p, :c] for p, c in enumerate(counts)])


def encode_strings(texts: list[str]) -> np.ndarray:
    """uint8 `[n, 4 + W]`: little-endian byte length, then the UTF-8 bytes."""
    data = [t.encode("utf-8") for t in texts]
    out = np.zeros((len(data), 4 + max([len(d) for d in data], default=0)), np.uint8)
    for i, d in enumerate(data):
        out[i, :4] = np.frombuffer(np.uint32(len(d)).tobytes(), np.uint8)
        out[i, 4:4 + len(d)] = np.frombuffer(d, np.uint8)
    return out


def decode_strings(rows: np.ndarray) -> list[str]:
    sizes = rows[:, :4].copy().view("<u4")[:, 0] if len(rows) else []
    return [bytes(r[4:4 + int(n)]).decode("utf-8") for r, n in zip(rows, sizes)]


def combine(keys: np.ndarray, *columns):
    """Per-row results of every process, in single-process order.

    `keys` int `[n]` orders the rows (the stream position from
    `Share.rows()`, or the stream index of the batch a row came from; a
    stable sort keeps the order of rows with equal keys). Columns are arrays
    `[n, ...]` or lists of n strings; they come back in the same kinds.
    """
    if jax.process_count() == 1:
        return columns
    order = np.argsort(allgather(np.asarray(keys, np.int32)), kind="stable")
    out = []
    for c in columns:
        if isinstance(c, list):
            every = decode_strings(allgather(encode_strings(c)))  # one gather per column
            out.append([every[i] for i in order])
        else:
            out.append(allgather(c)[order])
    return out
