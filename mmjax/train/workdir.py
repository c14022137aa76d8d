"""Workdir paths that may be local or remote (`gs://`, `s3://`, ... through fsspec).

Checkpoints go through orbax (which handles both); the small files of a run
(config.json, metrics.jsonl, eval results) go through these helpers.
"""
from __future__ import annotations

import os
import posixpath


def is_remote(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> str:
    """Absolute local path, or the URL unchanged."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def _fs(path: str):
    import fsspec
    return fsspec.core.url_to_fs(path)[0]


def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _fs(path).makedirs(path, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if is_remote(path):
        with _fs(path).open(path, "r", encoding="utf-8") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write a whole file (object stores have no append; callers rewrite)."""
    if is_remote(path):
        with _fs(path).open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
