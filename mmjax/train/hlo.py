"""Reading a compiled step's HLO text: which collectives it runs, in which dtypes.

`collectives(compiled.as_text())` lists every cross-device collective of an
optimized HLO module (`all-reduce`, `reduce-scatter`, `all-gather`,
`all-to-all`, `collective-permute`, their async `-start` forms included), with
the element types and sizes of what it produces. Combined collectives (one
instruction over a tuple of arrays, as XLA merges gradient reductions) count
each array.
"""
from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4,
         "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*")
_OP = re.compile(r"\s*(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: `kind` ("all-reduce", ...) and the arrays it
    produces as `(dtype, shape)` pairs (HLO element type names: f32, bf16, ...)."""
    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]
    line: str

    @property
    def dtypes(self) -> set[str]:
        return {d for d, _ in self.arrays}

    @property
    def bytes(self) -> int:
        return sum(BYTES.get(d, 4) * math.prod(s) for d, s in self.arrays)


def _shape_text(rest: str) -> tuple[str, str]:
    """Split `rest` (after `= `) into the result shape and what follows it."""
    if not rest.startswith("("):
        cut = rest.find(" ")
        return rest[:cut], rest[cut:]
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i + 1], rest[i + 1:]
    return rest, ""


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of an HLO module's text (see module docstring)."""
    found = []
    for line in hlo_text.splitlines():
        head = _HEAD.match(line)
        if not head:
            continue
        shape, after = _shape_text(line[head.end():])
        op = _OP.match(after)
        if not op:
            continue
        arrays = tuple((d, tuple(int(x) for x in dims.split(",") if x))
                       for d, dims in _ARRAY.findall(shape))
        if op.group(2) and op.group(1) == "all-gather" and len(arrays) == 2:
            arrays = arrays[1:]  # async all-gather-start returns (operand, result)
        found.append(Collective(op.group(1), arrays, line.strip()))
    return found
