"""Writing webdataset tar shards (the ``mmjax shards`` command is `mmjax.commands.shards`).

A shard is a plain tar file whose members are grouped into samples by key:
``{key}.jpg``, ``{key}.txt``, ``{key}.json``, ... Shards are named
``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ...; ``sizes.json`` beside
them maps each shard file name to its sample count (readers use it to know
the dataset size without opening every tar).

Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644, no user names),
so writing the same samples twice gives byte-identical shards.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import tarfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from mmjax.errors import UserError

SIZES_FILE = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


_FORMAT = tarfile.GNU_FORMAT
_BLOCK = tarfile.BLOCKSIZE      # 512: headers and data are padded to blocks
_RECORD = tarfile.RECORDSIZE    # 10240: a closed tar file is padded to records
_END = 2 * _BLOCK               # two zero blocks end an archive


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    """Deterministic tar header: no time, owner or user names."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _member_size(info: tarfile.TarInfo) -> int:
    """Bytes a member takes in the tar: its header block(s) + data padded to 512."""
    header = len(info.tobuf(_FORMAT, "utf-8", "surrogateescape"))
    return header + (info.size + _BLOCK - 1) // _BLOCK * _BLOCK


def _file_size(member_bytes: int) -> int:
    """Size on disk of a closed tar holding members of ``member_bytes`` in all."""
    return (member_bytes + _END + _RECORD - 1) // _RECORD * _RECORD


def _member_bytes(value: Any) -> bytes:
    """Encodes one field of a sample as the bytes stored in the tar."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bool, int)):
        return str(int(value)).encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    raise TypeError(f"cannot store a {type(value).__name__} in a shard; "
                    "pass bytes, str, int, dict or list")


class ShardWriter:
    """Writes samples into numbered webdataset tar shards.

    A new shard starts when the current one holds ``max_count`` samples or
    when the next sample would make the shard file larger than ``max_bytes``
    (tar padding included). A sample is never split, so a single sample larger
    than ``max_bytes`` gets a shard of its own, the only case over the limit.
    Shards are written as ``*.tar.tmp`` and renamed when complete, so a reader
    never sees a half-written shard.

    Args:
      pattern_or_dir: a directory (shards ``{dir}/{prefix}-%06d.tar``) or a
        pattern containing ``%06d``-style formatting, e.g. ``out/train-%06d.tar``.
      max_count: most samples per shard.
      max_bytes: most bytes of a shard file on disk.
      prefix: shard name prefix when a directory is given.
      start_index: number of the first shard.

    Use as a context manager; ``close`` writes ``sizes.json``.
    """

    def __init__(self, pattern_or_dir: str, max_count: int = 10_000,
                 max_bytes: int = 1 << 30, prefix: str = "shard", start_index: int = 0):
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"ShardWriter needs max_count >= 1 and max_bytes >= 1, "
                             f"got max_count={max_count}, max_bytes={max_bytes}")
        pattern_or_dir = os.fspath(pattern_or_dir)
        if "%" in os.path.basename(pattern_or_dir):
            self.pattern = pattern_or_dir
        else:
            self.pattern = os.path.join(pattern_or_dir, f"{prefix}-%06d.tar")
        self.out_dir = os.path.dirname(os.path.abspath(self.pattern))
        os.makedirs(self.out_dir, exist_ok=True)
        self.max_count = int(max_count)
        self.max_bytes = int(max_bytes)
        self.next_index = int(start_index)
        self.shards: list[str] = []          # completed shard paths, in order
        self.counts: dict[str, int] = {}     # shard file name -> samples
        self.total = 0
        self._tar: tarfile.TarFile | None = None
        self._path = ""
        self._count = 0
        self._bytes = 0

    # -- shard lifecycle -------------------------------------------------------

    def _open_next(self):
        self._path = self.pattern % self.next_index
        self.next_index += 1
        self._tar = tarfile.open(self._path + ".tmp", "w", format=_FORMAT,
                                 encoding="utf-8", errors="surrogateescape")
        self._count = 0
        self._bytes = 0

    def _finish_current(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._path + ".tmp", self._path)
        self.shards.append(self._path)
        self.counts[os.path.basename(self._path)] = self._count
        self._tar = None

    # -- writing ---------------------------------------------------------------

    def write(self, sample: dict[str, Any]) -> None:
        """Writes one sample: ``{"__key__": str, ext: bytes | str | int | dict, ...}``."""
        key = sample.get("__key__")
        if not key or not isinstance(key, str) or "/" in key:
            raise ValueError(f"sample needs a '__key__' string without '/', got {key!r}")
        members = []
        for ext, value in sample.items():
            if not ext.startswith("__"):
                data = _member_bytes(value)
                members.append((_member_info(f"{key}.{ext}", len(data)), data))
        if not members:
            raise ValueError(f"sample {key!r} has no fields to write")
        size = sum(_member_size(info) for info, _ in members)
        if self._tar is not None and (
                self._count >= self.max_count or
                _file_size(self._bytes + size) > self.max_bytes):
            self._finish_current()
        if self._tar is None:
            self._open_next()
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.total += 1

    def close(self) -> None:
        """Finishes the open shard and writes ``sizes.json`` (merged with entries
        of other prefixes already there)."""
        self._finish_current()
        sizes_path = os.path.join(self.out_dir, SIZES_FILE)
        sizes = {}
        if os.path.exists(sizes_path):
            try:
                with open(sizes_path, encoding="utf-8") as f:
                    sizes = json.load(f)
            except (OSError, ValueError):
                sizes = {}
        stem = os.path.basename(self.pattern).split("%")[0]
        sizes = {k: v for k, v in sizes.items() if not k.startswith(stem)}
        sizes.update(self.counts)
        tmp = sizes_path + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(sizes.items())), f, indent=1)
        os.replace(tmp, sizes_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


# ---- shards from a folder of images + a captions file -----------------------

@dataclass
class ShardReport:
    """What ``shards_from_folder`` did: shard paths, samples written, rows skipped by reason."""
    shards: list[str]
    written: int
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.written / max(self.seconds, 1e-9)
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return (f"wrote {self.written} samples into {len(self.shards)} shards "
                f"({rate:.0f} samples/s); skipped {sum(self.skipped.values())}"
                + (f" ({skipped})" if skipped else ""))


class CaptionsError(UserError, ValueError):
    """A captions file that cannot be read as a whole (encoding, header)."""


def _text_lines(captions_file: str, what: str) -> Iterator[str]:
    """The lines of a text file, decoded as UTF-8 (a leading BOM dropped), line
    endings kept. Raises CaptionsError naming the file and ``what`` number
    (row or line) of the first line that is not UTF-8."""
    with open(captions_file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise CaptionsError(
                    f"captions file {captions_file}: {what} {number} is not UTF-8 text "
                    f"(byte 0x{raw[e.start]:02x} at column {e.start + 1}); save it as UTF-8"
                ) from None


def _read_rows(captions_file: str) -> Iterator[dict | None]:
    """Rows of a CSV (header row) or JSONL captions file; None for an unparseable line.

    Raises CaptionsError (one line, naming the file and the row) for a file
    that is not UTF-8, a CSV without a header naming ``file`` (or ``image``)
    and ``caption``, or a line the CSV reader rejects.
    """
    if captions_file.endswith((".jsonl", ".json")):
        for line in _text_lines(captions_file, "line"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                yield None
                continue
            yield row if isinstance(row, dict) else None
        return
    # Physical lines are numbered as rows: they are, unless a quoted field spans lines.
    reader = csv.reader(_text_lines(captions_file, "row"))
    try:
        header = next(reader, None)
        if header is None:
            raise CaptionsError(f"captions file {captions_file}: row 1 should be the header "
                                "file,caption (the file is empty)")
        names = [h.strip() for h in header]
        if "caption" not in names or not {"file", "image"} & set(names):
            raise CaptionsError(
                f"captions file {captions_file}: row 1 should be a header naming the columns "
                f"file (or image) and caption, e.g. file,caption; it is {','.join(header)[:80]}")
        for values in reader:
            if not values:
                continue
            yield dict(zip(names, values))
    except csv.Error as e:
        raise CaptionsError(f"captions file {captions_file}: row {reader.line_num}: {e}") from None


def check_captions_file(captions_file: str) -> int:
    """Reads a captions file through once (encoding, header, CSV syntax) without
    writing anything; returns its number of rows. Raises CaptionsError."""
    return sum(1 for _ in _read_rows(captions_file))


def image_problem(data: bytes) -> str | None:
    """Why encoded image bytes do not decode (Pillow, fully: a truncated or
    corrupt file fails here as it would when training), or None when they do."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: size is not our call
            with Image.open(io.BytesIO(data)) as img:
                if img.format == "JPEG":  # DCT-scaled: every byte is still decoded
                    img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
    except UnidentifiedImageError:
        return "not an image format Pillow reads" if data else "empty file"
    except Exception as e:  # Pillow raises many types for bad data
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


UNDECODABLE = "image does not decode"


def _row_sample(row: dict | None, image_dir: str) -> tuple[dict | None, str, str]:
    """(fields of a sample, "", "") for a good row, or (None, reason to skip,
    detail: the image path and Pillow's error for an undecodable image)."""
    if row is None:
        return None, "unparseable row", ""
    name = row.get("file") or row.get("image")
    if not name or not isinstance(name, str):
        return None, "no file/image field", ""
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return None, "missing caption", ""
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        return None, "not an image extension", ""
    path = name if os.path.isabs(name) else os.path.join(image_dir, name)
    try:
        with open(path, "rb") as f:
            image = f.read()
    except OSError:
        return None, "missing image file", ""
    problem = image_problem(image)
    if problem is not None:
        return None, UNDECODABLE, f"{path} ({problem})"
    meta = {k: v for k, v in row.items() if k not in ("image",) and v not in (None, "")}
    meta["file"] = name
    sample = {ext: image, "txt": caption, "json": meta}
    label = row.get("label")
    if label not in (None, ""):
        try:
            sample["cls"] = int(label)
            meta["label"] = int(label)
        except (TypeError, ValueError):
            return None, "label is not an integer", ""
    return sample, "", ""


class _BadImageReport:
    """Prints "skipped, image does not decode: PATH (why)" on stderr: the first
    ``FIRST`` one per line, then at most one line per ``PERIOD`` seconds with
    the count so far (the total is in the summary)."""

    FIRST, PERIOD = 10, 10.0

    def __init__(self, bar=None):
        self.bar, self.count, self.last = bar, 0, -1e9

    def __call__(self, detail: str):
        """``detail``: the image path and why, ``"PATH (why)"``."""
        self.count += 1
        now = time.monotonic()
        if self.count <= self.FIRST:
            line = f"mmjax shards: skipped, {UNDECODABLE}: {detail}"
            if self.count == self.FIRST:
                line += ("; further ones are counted, listed at most every "
                         f"{self.PERIOD:.0f} s")
        elif now - self.last >= self.PERIOD:
            line = f"mmjax shards: skipped, {UNDECODABLE}: {detail}; {self.count} so far"
        else:
            return
        self.last = now
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)


def shards_from_folder(image_dir: str, captions_file: str, out_dir: str,
                       max_count: int = 10_000, max_bytes: int = 1 << 30,
                       prefix: str = "shard", progress: bool = True, *,
                       check: bool = True) -> ShardReport:
    """Packs images listed in a captions file into webdataset shards.

    ``captions_file`` is CSV with a header (columns ``file`` or ``image``,
    ``caption``, optional integer ``label``; other columns go into the json
    member) or JSONL (one object per line with the same keys), in UTF-8. The
    whole file is checked first: one that is not UTF-8, or a CSV without that
    header, raises CaptionsError (naming the row) and nothing is written.
    Image bytes are copied unchanged, stored under their own extension, once
    they decode. Rows whose image is missing or does not decode (each such
    image reported on stderr, the first ``_BadImageReport.FIRST`` one per line,
    then rate-limited), whose caption is empty, or that cannot be parsed are
    skipped and counted by reason; the counts are printed at the end and
    returned.

    ``check=False`` skips the first read-through (for a file already given
    to ``check_captions_file``).

    Returns:
      ShardReport with the shard paths, the number written and the skips.
    """
    from tqdm import tqdm

    for path, what in ((image_dir, "image folder"), (captions_file, "captions file")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    start = time.perf_counter()
    if check:  # before anything is written
        check_captions_file(captions_file)
    skipped: Counter = Counter()
    n = 0
    bar = tqdm(_read_rows(captions_file), unit="sample", disable=not progress,
               desc="shards", file=sys.stderr)
    report_bad = _BadImageReport(bar if progress else None)
    with ShardWriter(out_dir, max_count=max_count, max_bytes=max_bytes,
                     prefix=prefix) as writer:
        for row in bar:
            sample, reason, detail = _row_sample(row, image_dir)
            if sample is None:
                if reason == UNDECODABLE:
                    report_bad(detail)
                skipped[reason] += 1
                continue
            sample["__key__"] = f"{n:09d}"
            writer.write(sample)
            n += 1
    report = ShardReport(writer.shards, n, skipped, time.perf_counter() - start)
    if progress:
        print(report.summary(), file=sys.stderr)
    return report


_WRITER_FILE = re.compile(r".+-\d{6,}\.tar(\.tmp)?|" + re.escape(SIZES_FILE)
                          + r"(\.tmp\d+)?")


def writer_files(out_dir: str) -> list[str]:
    """Names in ``out_dir`` that a ShardWriter with a ``-%06d`` pattern writes:
    ``NAME-NNNNNN.tar``, unfinished ``NAME-NNNNNN.tar.tmp``, ``sizes.json`` and
    its temporary copies. Plain files only."""
    return sorted(n for n in os.listdir(out_dir) if _WRITER_FILE.fullmatch(n)
                  and os.path.isfile(os.path.join(out_dir, n))
                  and not os.path.islink(os.path.join(out_dir, n)))
