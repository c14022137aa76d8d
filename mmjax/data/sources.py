"""Shard lists: brace expansion, globbing, weighted sources, opening files.

A shard spec is a pattern string (``/data/laion/{00000..09999}.tar``,
``gs://bucket/cc12m-{000..999}.tar``), a ``::``-separated string of patterns,
or a list of patterns. Braces hold either a numeric range ``{a..b}`` (the
zero padding of ``a`` is kept) or a comma set ``{x,y,z}``; several braces and
nested braces expand as a cartesian product, left to right.

Local paths and ``file://`` URLs are opened with plain ``open``; any other
URL scheme (``gs://``, ``s3://``, ``http://``: ``mmjax.paths.is_remote``) goes
through ``fsspec`` and needs that protocol's package installed (``gcsfs``,
``s3fs``, ``aiohttp``).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import os
import re
from typing import Sequence

from mmjax.errors import ConfigError
from mmjax.paths import is_remote, local_path as _local

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = set("*?[")


def _find_brace(pattern: str) -> tuple[int, int] | None:
    """Returns (start, end) of the first top-level ``{...}``, or None."""
    depth, start = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                return start, i
    return None


def _split_top_level(body: str) -> list[str]:
    """Splits ``a,b{c,d},e`` on commas that are not inside nested braces."""
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def expand_braces(pattern: str) -> list[str]:
    """Expands brace ranges and sets in one pattern, in order.

    ``"a{00..02}.tar"`` -> ``["a00.tar", "a01.tar", "a02.tar"]``;
    ``"{x,y}-{1..2}"`` -> ``["x-1", "x-2", "y-1", "y-2"]``. A brace with
    neither ``..`` nor a comma is left as it is.
    """
    span = _find_brace(pattern)
    if span is None:
        return [pattern]
    start, end = span
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    match = _RANGE.match(body)
    if match:
        lo_s, hi_s = match.groups()
        lo, hi = int(lo_s), int(hi_s)
        width = len(lo_s.lstrip("-")) if lo_s.lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(v).zfill(width) if v >= 0 else "-" + str(-v).zfill(width)
                   for v in range(lo, hi + step, step)]
    elif "," in body:
        choices = [c for part in _split_top_level(body) for c in expand_braces(part)]
    else:
        # Not an expansion: keep the literal braces, expand the rest.
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    tails = expand_braces(tail)
    return [head + c + t for c in choices for t in tails]


def _glob(path: str) -> list[str]:
    if is_remote(path):
        import fsspec
        fs, _, paths = fsspec.get_fs_token_paths(path)
        protocol = path.split("://", 1)[0]
        return sorted(p if "://" in p else f"{protocol}://{p}" for p in paths)
    return sorted(globlib.glob(_local(path)))


def split_patterns(spec: str | Sequence[str]) -> list[str]:
    """A shard spec (string, ``::``-joined string, or list) -> list of patterns."""
    if isinstance(spec, str):
        return [p for p in spec.split("::") if p.strip()]
    out = []
    for item in spec:
        out.extend(split_patterns(item))
    return out


def expand_pattern(pattern: str) -> list[str]:
    """One pattern -> its list of shard paths (braces, then globs)."""
    out = []
    for path in expand_braces(pattern.strip()):
        if _GLOB_CHARS & set(path.split("://", 1)[-1]):
            out.extend(_glob(path))
        else:
            out.append(path)
    return out


def expand_shards(spec: str | Sequence[str], key: str = "data.train.shards") -> list[str]:
    """Expands a shard spec to a list of paths, with a clear error if empty.

    Raises ValueError naming ``key`` and the pattern when nothing matches:
    an empty spec, a glob that matches no file, or local paths none of which
    exists. Single missing shards among existing ones (and remote paths,
    which are not checked one by one) are counted as bad shards while
    reading, so a run survives a shard deleted under it.
    """
    patterns = split_patterns(spec) if spec else []
    if not patterns:
        raise ConfigError(f"{key} is empty: set it to a shard pattern such as "
                          "'/data/shards/{00000..00099}.tar' or a list of patterns.")
    paths = []
    for pattern in patterns:
        found = expand_pattern(pattern)
        if not found:
            raise ConfigError(f"{key}: no files match the pattern {pattern!r}. "
                              "Check the path and the glob.")
        paths.extend(found)
    local = [p for p in paths if not is_remote(p)]
    if local and len(local) == len(paths) and not any(os.path.exists(_local(p)) for p in local):
        shown = patterns[0] if len(patterns) == 1 else patterns
        raise ConfigError(f"{key}: no files match the pattern {shown!r}. "
                          "Check the path and the brace ranges.")
    return paths


@dataclasses.dataclass(frozen=True)
class ShardSources:
    """Shards of one or more weighted sources, as one flat list.

    Attributes:
      paths: all shard paths, source after source; a shard's global index
        into this list is how samples are referred to in iterator state.
      source_of: for each path, the index of its source.
      weights: per-source sampling weights (sum 1), or None (no weighting).
    """
    paths: tuple[str, ...]
    source_of: tuple[int, ...]
    weights: tuple[float, ...] | None

    @property
    def num_sources(self) -> int:
        return 1 + max(self.source_of) if self.source_of else 0

    def shard_probabilities(self) -> list[float]:
        """Per-shard draw probability for resampled mode: each source gets its
        weight, shared evenly by its shards (uniform over shards if no weights)."""
        n = len(self.paths)
        if self.weights is None:
            return [1.0 / n] * n
        counts = [0] * self.num_sources
        for s in self.source_of:
            counts[s] += 1
        return [self.weights[s] / counts[s] for s in self.source_of]


def build_sources(shards: str | Sequence[str], weights: Sequence[float] | None = None,
                  key: str = "data.train.shards") -> ShardSources:
    """Expands shard patterns into a ShardSources.

    With ``weights``, each pattern of ``shards`` (a list, or ``::``-joined) is
    one source and ``weights`` must have one positive entry per pattern.
    """
    patterns = split_patterns(shards) if shards else []
    paths, source_of = [], []
    if weights is None:
        paths = expand_shards(shards, key)
        return ShardSources(tuple(paths), (0,) * len(paths), None)
    weights = [float(w) for w in weights]
    wkey = key.rsplit(".", 1)[0] + ".weights"
    if len(weights) != len(patterns):
        raise ConfigError(f"{wkey} has {len(weights)} entries but {key} has "
                          f"{len(patterns)} patterns; give one weight per pattern.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{wkey} must be non-negative with a positive sum, got {weights}.")
    for i, pattern in enumerate(patterns):
        found = expand_shards(pattern, key)
        paths.extend(found)
        source_of.extend([i] * len(found))
    total = sum(weights)
    return ShardSources(tuple(paths), tuple(source_of), tuple(w / total for w in weights))


def open_shard(path: str):
    """Opens a shard for binary streaming reads (local ``open`` or fsspec)."""
    if is_remote(path):
        import fsspec
        return fsspec.open(path, "rb").open()
    return open(_local(path), "rb")
