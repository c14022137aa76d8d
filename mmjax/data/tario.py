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

import bz2
import io
import json
import lzma
import posixpath
import zlib
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


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"a.b/c.seg.JPG"`` -> ``("a.b/c", "seg.jpg")``; None for names that are
    not sample members (no extension, hidden files)."""
    dirname, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    key = posixpath.join(dirname, stem) if dirname else stem
    return key, ext.lower()


# Magic numbers of compressed tars (gzip, bzip2, xz), decompressed as they stream.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


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
        header), or ``truncated_tar`` (the stream broke mid-way, or a gzip /
        bzip2 / xz stream is cut short or corrupt anywhere; samples read so far
        were yielded, one whose member data was cut is dropped).
    """
    head = fileobj.read(512)
    if not head:
        raise ShardReadError(EMPTY_SHARD, "the shard is empty (zero bytes)")
    if head.startswith(_COMPRESSED):
        members = _compressed_tar_members(head, fileobj)
    else:
        members = _plain_tar_members(head, fileobj)
    index, key, samples = -1, None, {}
    members = iter(members)
    while True:
        try:
            name, read = next(members)
        except StopIteration:
            break
        except ShardReadError:
            # Broken between members: every member of the sample in hand was
            # read whole, so it is delivered before the error.
            if key is not None and samples and (stop_after is None or index <= stop_after):
                yield index, key, samples
            raise
        parsed = split_member_name(name)
        if parsed is None:
            continue
        mkey, ext = parsed
        if mkey != key:
            if key is not None and samples:
                yield index, key, samples
            index, key, samples = index + 1, mkey, {}
            if stop_after is not None and index > stop_after:
                return
        if keep is None or keep(index):
            samples[ext] = read()
    if key is not None and samples:
        yield index, key, samples


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of a gzip, bzip2 or xz stream (concatenated
    streams of the same kind read as one, as ``gzip -d`` does), read in
    bounded chunks. ``read(n)`` returns ``n`` bytes unless the data ends.

    Where the compressed stream is cut short (the file ends before its end
    marker and checksum) or its data is corrupt, the bytes read so far come
    out and then the stream ends; ``problem`` says why. Bytes after the last
    complete stream that do not start another one are ignored.
    """

    _CHUNK = 1 << 16   # compressed bytes read at a time
    _OUT = 1 << 20     # most decompressed bytes per decompress call

    def __init__(self, head: bytes, f):
        self._f, self._input = f, head
        self._magic = next(m for m in _COMPRESSED if head.startswith(m))
        self.kind = {b"\x1f\x8b": "gzip", b"BZh": "bzip2"}.get(self._magic, "xz")
        self._buf = bytearray()
        self._end = False
        self.problem: str | None = None
        self._d = self._decompressor()

    def _decompressor(self):
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def readable(self) -> bool:
        return True

    def _take_input(self) -> bytes:
        data, self._input = self._input, b""
        return data or self._f.read(self._CHUNK)

    def _stream_end(self):
        """One compressed stream is complete: another may follow."""
        rest = self._d.unused_data
        while len(rest) < len(self._magic):
            more = self._f.read(self._CHUNK)
            if not more:
                break
            rest += more
        if rest.startswith(self._magic):
            self._input, self._d = rest, self._decompressor()
        else:
            self._end = True

    def _step(self) -> bytes:
        d = self._d
        if d.eof:
            self._stream_end()
            return b""
        try:
            if self.kind == "gzip":
                data = d.unconsumed_tail or self._take_input()
            else:
                data = self._take_input() if d.needs_input else b""
            if not data and (self.kind == "gzip" or d.needs_input):
                self.problem = f"the {self.kind} stream is cut short (the file ends inside it)"
                self._end = True
                return b""
            return d.decompress(data, self._OUT)
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
            self.problem = f"corrupt {self.kind} data ({e})"
            self._end = True
            return b""

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and not self._end:
            self._buf += self._step()
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Reads (and drops) the rest, so that a cut or corrupt end shows in ``problem``."""
        while not self._end:
            self._step()
            self._buf.clear()


def _compressed_tar_members(head: bytes, f) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read-the-data) of each regular file of a gzip / bzip2 / xz tar.

    The tar inside is read by the same reader as a plain tar. A compressed
    stream that is cut short or corrupt is a truncated tar wherever the cut
    falls (inside a member, at a member boundary, or after the tar's end
    blocks): the members before it are delivered, then ``truncated_tar``.
    """
    stream = _Decompressed(head, f)
    count = 0
    try:
        for name, read in _plain_tar_members(stream.read(512), stream):
            count += 1
            yield name, _explained(read, stream)
        stream.drain()  # the end blocks may come before a cut: check the stream's end
    except ShardReadError as e:
        if stream.problem is None:
            raise
        if e.reason == NOT_TAR:
            raise ShardReadError(NOT_TAR, f"{e} ({stream.problem})") from e
        raise _broken(count, stream.problem) from e
    if stream.problem is not None:
        raise _broken(count, stream.problem)


def _explained(read: Callable[[], bytes], stream: _Decompressed) -> Callable[[], bytes]:
    """``read``, whose truncation error also says what happened to the compressed stream."""
    def read_member() -> bytes:
        try:
            return read()
        except ShardReadError as e:
            if stream.problem is None:
                raise
            raise ShardReadError(e.reason, f"{e}; {stream.problem}") from e
    return read_member


def _broken(count: int, why: str) -> ShardReadError:
    """The error of a tar stream that ends or breaks after `count` members."""
    return ShardReadError(TRUNCATED_TAR, f"tar stream broken after {count} members ({why})")


def _octal(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256."""
    if field[0] & 0x80:  # base-256 (sizes over 8 GiB)
        return int.from_bytes(field[1:], "big") | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _checksum_ok(header: bytes) -> bool:
    """The header's sum with its checksum field read as spaces, unsigned (POSIX) or,
    for old writers, with bytes taken as signed."""
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return True
    high = sum(1 for b in header[:148] + header[156:] if b > 127)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _plain_tar_members(head: bytes, f) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read-the-data) of each regular file of an uncompressed tar stream.

    A lean reader of the ustar / GNU / PAX layouts (512-byte headers, data
    padded to 512): a member's data is read only when its ``read`` is called,
    otherwise skipped. Several times faster per member than `tarfile`, which
    parses every header field.
    """
    header, count, long_name, pax = head, 0, None, {}
    while True:
        if len(header) < 512:
            if count == 0 and header is head:
                raise ShardReadError(NOT_TAR, f"not a tar file ({len(header)} bytes, "
                                              "shorter than one tar header)")
            if header:
                raise _broken(count, "partial header")
            return  # ended at a member boundary without the end-of-archive blocks
        if header == b"\0" * 512:
            return  # end of archive
        try:
            ok = _checksum_ok(header)
            size = _octal(header[124:136])
        except ValueError:
            ok = False
        if not ok:
            if count == 0:
                raise ShardReadError(NOT_TAR, "not a tar file (bad header checksum)")
            raise _broken(count, "bad header checksum")
        kind = header[156:157]
        if kind in (b"L", b"x", b"g"):  # metadata for the next member
            data = _MemberData(f, size, count).read()
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data)
            header = f.read(512)
            continue
        if kind in (b"0", b"\0", b"7"):  # regular file (7: contiguous)
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar" and header[345] != 0:
                    prefix = header[345:500].split(b"\0", 1)[0].decode(
                        "utf-8", "surrogateescape")
                    name = prefix + "/" + name
            member = _MemberData(f, int(pax.get("size", size)), count + 1)
            count += 1
            yield name, member.read
        else:  # directories, links, devices: data (if any) is skipped
            member = _MemberData(f, size, count)
        long_name, pax = None, {}
        if not member.done:  # nobody read the data
            _skip(f, member.size + member.padding, count)
        header = f.read(512)


class _MemberData:
    """The data of one tar member, `size` bytes then padding to 512."""

    def __init__(self, f, size: int, count: int):
        self.f, self.size, self.padding, self.count = f, size, -size % 512, count
        self.done = False

    def read(self) -> bytes:
        data = self.f.read(self.size)
        if len(data) < self.size or len(self.f.read(self.padding)) < self.padding:
            raise _broken(self.count, "data cut short")
        self.done = True
        return data


def _skip(f, n: int, count: int) -> None:
    try:
        if f.seekable():
            end = f.seek(0, io.SEEK_CUR) + n
            if end <= f.seek(0, io.SEEK_END):
                f.seek(end)
                return
            raise _broken(count, "data cut short")
    except (OSError, AttributeError, io.UnsupportedOperation):
        pass
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise _broken(count, "data cut short")
        n -= len(chunk)


def json_field(raw: bytes, field: str):
    """The value at ``field`` (dots for nesting, "" = the whole document) of a
    JSON member. Raises ValueError, KeyError, TypeError or IndexError when the
    bytes are not JSON or the path does not exist."""
    value = json.loads(raw)
    for part in filter(None, field.split(".")):
        value = value[part]
    return value


def json_member_error(members: dict[str, bytes], caption_key: str) -> str | None:
    """Why the JSON member that ``caption_key`` (``"json:FIELD"``) reads is not
    valid JSON (UTF-8 included), or None: valid, absent, or not a JSON key."""
    ext, _, field = caption_key.partition(":")
    raw = members.get(ext)
    if not field or raw is None:
        return None
    try:
        json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return f"member {ext!r} is not valid JSON ({type(e).__name__}: {e})"
    return None


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
