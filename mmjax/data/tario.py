"""Streaming reads of webdataset tar shards, grouped into samples by key.

A tar is read front to back in stream mode (works on any file object with
``read``, local or remote) and never extracted: member names are only data.
Consecutive members that share a key form one sample: ``dir/abc.jpg``,
``dir/abc.txt`` and ``dir/abc.json`` become ``("dir/abc", {"jpg": ...,
"txt": ..., "json": ...})``. The key is the member name up to the first dot of
its basename (directories, dots included, are part of the key); the
extension is the rest, lowercased.
"""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from typing import Callable, Iterator

# Reasons a whole shard (or its remainder) cannot be read; the pipeline
# counts them by these names.
EMPTY_SHARD = "empty_shard"
NOT_TAR = "not_tar"
TRUNCATED_TAR = "truncated_tar"

# Image members, in order of preference.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardReadError(Exception):
    """A shard could not be read (further). ``reason`` is a stats key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Prefixed(io.RawIOBase):
    """A read-only stream: some already-read bytes, then the rest of ``f``."""

    def __init__(self, head: bytes, f):
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self._f.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._f.read(n - len(out))
            return out
        return self._f.read(n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"a.b/c.seg.JPG"`` -> ``("a.b/c", "seg.jpg")``; None for names that are
    not sample members (no extension, hidden files)."""
    dirname, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    key = posixpath.join(dirname, stem) if dirname else stem
    return key, ext.lower()


def iter_tar_samples(fileobj, keep: Callable[[int], bool] | None = None,
                     stop_after: int | None = None,
                     ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yields ``(index, key, {ext: bytes})`` for each sample of a tar stream.

    Args:
      fileobj: binary file object positioned at the start of the tar.
      keep: if given, only samples whose index satisfies it are read and
        yielded; the data of the others is skipped without being copied
        (indices still count every sample, so they are stable).
      stop_after: stop once the sample with this index has been passed.

    Raises:
      ShardReadError: ``empty_shard`` (zero bytes), ``not_tar`` (no valid tar
        header), or ``truncated_tar`` (the stream broke mid-way; samples read
        so far were yielded, the incomplete one is dropped).
    """
    head = fileobj.read(512)
    if not head:
        raise ShardReadError(EMPTY_SHARD, "the shard is empty (zero bytes)")
    try:
        tar = tarfile.open(fileobj=_Prefixed(head, fileobj), mode="r|*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(NOT_TAR, f"not a tar file ({e})") from e
    index, key, members = -1, None, {}
    try:
        for info in tar:
            if not info.isfile():
                continue
            parsed = split_member_name(info.name)
            if parsed is None:
                continue
            mkey, ext = parsed
            if mkey != key:
                if key is not None and members:
                    yield index, key, members
                index, key, members = index + 1, mkey, {}
                if stop_after is not None and index > stop_after:
                    return
            if keep is None or keep(index):
                members[ext] = tar.extractfile(info).read()
        if key is not None and members:
            yield index, key, members
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardReadError(TRUNCATED_TAR,
                             f"tar stream broken after sample {index} ({e})") from e
    finally:
        tar.close()


def json_field(raw: bytes, field: str):
    """The value at ``field`` (dots for nesting, "" = the whole document) of a
    JSON member. Raises ValueError, KeyError, TypeError or IndexError when the
    bytes are not JSON or the path does not exist."""
    value = json.loads(raw)
    for part in filter(None, field.split(".")):
        value = value[part]
    return value


def sample_fields(members: dict[str, bytes], caption_key: str = "txt",
                  ) -> tuple[bytes | None, str | None, int]:
    """``{ext: bytes}`` -> (image bytes, caption, label) of one sample.

    The image is the first of ``IMAGE_EXTS`` present; the caption is member
    ``caption_key`` as UTF-8 (``"txt"``), or a field of a JSON member
    (``"json:caption"``, dots for nesting: ``"json:meta.caption"``); the label
    is the integer in ``cls``, -1 when absent or not an integer. Missing image
    or caption come back as None.
    """
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    caption = None
    ext, _, field = caption_key.partition(":")
    raw = members.get(ext)
    if raw is not None:
        try:
            if field:
                value = json_field(raw, field)
                caption = str(value).strip() if value is not None else None
            else:
                caption = raw.decode("utf-8", errors="replace").strip()
        except (ValueError, KeyError, TypeError):
            caption = None
    label = -1
    if "cls" in members:
        try:
            label = int(members["cls"].decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            label = -1
    return image, caption, label


def caption_list(members: dict[str, bytes], caption_key: str) -> list[str]:
    """Every caption of a sample: the ``caption_key`` value when it is a JSON
    list of strings (e.g. ``"json:captions"``, COCO-style 5 captions), else
    the single caption ``sample_fields`` finds. Empty entries are dropped."""
    ext, _, field = caption_key.partition(":")
    raw = members.get(ext)
    if field and raw is not None:
        try:
            value = json_field(raw, field)
        except (ValueError, KeyError, TypeError):
            value = None
        if isinstance(value, list):
            return [str(v).strip() for v in value if isinstance(v, str) and v.strip()]
    caption = sample_fields(members, caption_key)[1]
    return [caption] if caption else []
