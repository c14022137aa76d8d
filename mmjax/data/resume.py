"""Iterator state and the identity of the stream it belongs to.

A worker's position only means something in the stream it came from, so a
saved iterator state records that stream's identity (``stream_identity``: a
sha256 of the ordered shard list, the seed, shuffle buffer, sampling mode,
workers, processes), and ``check_state`` refuses a state of another stream
(``StreamMismatchError``, one line naming what changed).
"""
from __future__ import annotations

import hashlib
import logging
import os

from mmjax.data.counters import DataError

log = logging.getLogger("mmjax.data.pipeline")

STATE_VERSION = 1


class StreamMismatchError(DataError):
    """A saved iterator state belongs to another data stream (shards, seed, ...)."""


def _sha256(items) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _shards_root(paths: list[str]) -> str:
    """Longest common folder prefix of the shard paths, with its "/" ('' if none)."""
    prefix = os.path.commonprefix(paths) if paths else ""
    return prefix[:prefix.rfind("/") + 1]


def stream_identity(options) -> dict:
    """What fixes which sample a training stream yields at a given position.

    Saved in every iterator state (readable, so a mismatch can say what
    changed): a sha256 of the ordered, resolved shard list (the same list on
    every process) and of the names below their common folder, the first and
    last shard, the seed, shuffle buffer, sampling mode and weights, loader
    workers and this process's place among the processes. ``options``: the
    iterator's ``DataOptions``.
    """
    paths = list(options.paths)
    root = _shards_root(paths)
    probs = options.probs
    return {"shards_sha256": _sha256(paths), "num_shards": len(paths),
            "shards_root": root, "shard_names_sha256": _sha256(p[len(root):] for p in paths),
            "first_shard": paths[0] if paths else None,
            "last_shard": paths[-1] if paths else None,
            "seed": options.seed, "shuffle_buffer": options.shuffle_buffer,
            "resampled": options.resampled,
            "weights_sha256": None if probs is None else _sha256(repr(float(p)) for p in probs),
            "workers": options.num_workers, "process_index": options.process_index,
            "process_count": options.process_count}


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


def iterator_state(options, identity: dict, *, next_worker: int, batches: int,
                   worker_states: list) -> dict:
    """The JSON-serializable state of a training iterator (``STATE_VERSION``)."""
    return {"version": STATE_VERSION, "seed": options.seed,
            "process_index": options.process_index,
            "process_count": options.process_count, "workers": options.num_workers,
            "num_shards": len(options.paths), "stream": identity,
            "next_worker": next_worker,
            "batches": batches, "worker_states": worker_states}


def check_state(state: dict, identity: dict) -> None:
    """Raises ``StreamMismatchError`` unless ``state`` (an ``iterator_state``)
    is of this version and of the stream ``identity``."""
    if state.get("version") != STATE_VERSION:
        raise StreamMismatchError(
            f"data iterator state has version {state.get('version')!r}, this mmjax reads "
            f"version {STATE_VERSION}; set config.data.train.reset_stream_on_resume=True "
            "to start a fresh data stream.")
    diffs = stream_differences(state, identity)
    if diffs:
        raise StreamMismatchError(
            f"the data stream differs from the one the checkpoint was saved with: "
            f"{'; '.join(diffs)}. Resume with the original settings, or set "
            "config.data.train.reset_stream_on_resume=True to keep the checkpoint's train "
            "state and start a fresh data stream.")
