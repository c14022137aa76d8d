"""Workdir paths that may be local or remote (`gs://`, `s3://`, ... through fsspec).

`file://` URLs are local paths (`mmjax.paths.is_remote`, the rule shared with
the data shards).

Checkpoints go through orbax (which handles both); the small files of a run
(config.json, metrics.jsonl, eval results) go through these helpers.
"""
from __future__ import annotations

import os
import posixpath
from mmjax.errors import UserError
from mmjax.paths import is_remote, local_path


def resolve(path: str) -> str:
    """Absolute local path (`file://` prefix dropped), or the URL unchanged."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(local_path(path))


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def _fs(path: str):
    import fsspec
    return fsspec.core.url_to_fs(path)[0]


def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(local_path(path))


def isdir(path: str) -> bool:
    return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(local_path(path))


def makedirs(path: str) -> None:
    if is_remote(path):
        _fs(path).makedirs(path, exist_ok=True)
    else:
        os.makedirs(local_path(path), exist_ok=True)


def read_text(path: str) -> str:
    if is_remote(path):
        with _fs(path).open(path, "r", encoding="utf-8") as f:
            return f.read()
    with open(local_path(path), encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write a whole file, atomically: a reader sees the old file or the new one,
    never a part (local: a temporary file in the same folder, then a rename;
    object stores publish an object only when its upload completes)."""
    if is_remote(path):
        with _fs(path).open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    path = local_path(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class WorkdirBusy(UserError, RuntimeError):
    """Another live training run holds the workdir (message names it and its holder)."""


class WorkdirLock:
    """Exclusive lock on a local workdir for the lifetime of one training run.

    `flock(LOCK_EX | LOCK_NB)` on `WORKDIR/.lock`, kept open until `release()`.
    The kernel drops the lock when the holding process ends in any way
    (exit, crash, SIGKILL), so a dead run never leaves it held; the file stays
    behind and only records the last holder (host, pid, start time) for the
    message another run prints. A lock on a network filesystem is only as
    good as its `flock` support (NFSv4 and Lustre with `flock` honour it).

    One job takes one lock: every process of a multi-process job writes the
    same workdir, so only process 0 takes it (see `train`), and the other
    processes learn the outcome from process 0.
    """

    NAME = ".lock"

    def __init__(self, workdir: str):
        self.workdir = local_path(workdir)
        self.path = os.path.join(self.workdir, self.NAME)
        self._file = None

    def holder(self) -> str:
        """'host H, pid P, since T' from the lock file (best effort)."""
        import json
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
                f"since {info.get('started', '?')}")

    def acquire(self) -> "WorkdirLock":
        import datetime
        import fcntl
        import json
        import socket
        os.makedirs(self.workdir, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise WorkdirBusy(f"--workdir {self.workdir} is in use by another `mmjax train` "
                              f"({self.holder()}); wait for it to end or stop it, or use "
                              "another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.datetime.now().astimezone()
                            .isoformat(timespec="seconds")}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
