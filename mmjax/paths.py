"""Local or remote: the one rule for every path mmjax reads or writes.

A path with a URL scheme (``gs://``, ``s3://``, ``http://``, ...) is remote and
goes through fsspec; a plain path and a ``file://`` URL are local files.
"""
from __future__ import annotations

_FILE = "file://"


def is_remote(path: str) -> bool:
    """True for URLs with a scheme other than ``file://`` (``gs://b/x`` -> True,
    ``/data/x`` and ``file:///data/x`` -> False)."""
    return "://" in path and not path.startswith(_FILE)


def local_path(path: str) -> str:
    """A local path without its ``file://`` prefix (``file:///data/x`` -> ``/data/x``);
    other paths unchanged."""
    return path[len(_FILE):] if path.startswith(_FILE) else path
