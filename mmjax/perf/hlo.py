"""Reading a compiled step's HLO text: which collectives it runs, in which dtypes.

`collectives(compiled.as_text())` lists every cross-device collective of an
optimized HLO module (`all-reduce`, `reduce-scatter`, `all-gather`,
`all-to-all`, `collective-permute`, their async `-start` forms included), with
the element types and sizes of what it produces. Combined collectives (one
instruction over a tuple of arrays, as XLA merges gradient reductions) count
each array. `step_collectives` also multiplies each by the number of times it
runs per step (collectives inside a scanned layer stack run once per layer):
XLA's cost analysis counts a loop body once, so it cannot give per-step traffic;
a collective in the branch of a windowed matmul loop that is skipped on the last
iteration (`false_computation=last_iteration_noop`) runs trip count - 1 times.
`summarize_collectives(colls, by="source")` groups them by the JAX operation
each came from (its `op_name` metadata), which tells a weight gather of FSDP
from a loss's gather and the forward pass from the backward.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4,
         "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")  # an instruction's name
_OP = re.compile(r"\s*(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: `kind` ("all-reduce", ...), the arrays it
    produces as `(dtype, shape)` pairs (HLO element type names: f32, bf16, ...),
    the size of its replica groups (None for collective-permute or unknown), and
    how often it runs per step (`runs`: loop trip counts applied)."""
    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]
    line: str
    group: Optional[int] = None
    runs: int = 1

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


def _group_size(line: str) -> Optional[int]:
    """Replica-group size from `replica_groups=` in any of XLA's three spellings."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)?\s*\{([^}]*)\}",
                  line)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return None


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of an HLO module's text (see module docstring);
    `runs` is 1 (see `step_collectives`)."""
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
        if op.group(2) and op.group(1) in ("all-gather", "collective-permute"):
            # The async -start forms return (operands, results[, u32 contexts]):
            # count what arrives, once.
            arrays = tuple(a for a in arrays if a[1] or a[0] not in ("u32", "s32"))
            if len(arrays) >= 2 and len(arrays) % 2 == 0:
                arrays = arrays[len(arrays) // 2:]
        group = None if op.group(1) == "collective-permute" else _group_size(line)
        found.append(Collective(op.group(1), arrays, line.strip(), group))
    return found


# ----------------------------------------------------------------------------
# Computations, loops and how often each collective runs

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                     r"true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], Optional[str]]:
    """`({name: instruction lines}, entry name)` of an HLO module's text."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif line.rstrip() == "}":  # (a custom call's config may start a line with "}}")
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


_SCALAR_INT = r"[su](?:8|16|32|64)\[\]"


def _definitions(lines: list[str]) -> dict[str, str]:
    """`{instruction name: its line}` of one computation."""
    return {m.group(1): line for line in lines if (m := _HEAD.match(line))}


def _int_constant(line: Optional[str]) -> Optional[int]:
    m = re.search(_SCALAR_INT + r"[^ ]* constant\((-?\d+)\)", line or "")
    return int(m.group(1)) if m else None


def _tuple_index(line: Optional[str]) -> Optional[int]:
    """`i` of a `get-tuple-element(...), index=i` line."""
    m = re.search(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)", line or "")
    return int(m.group(1)) if m else None


def _operands(line: str, op: str) -> list[str]:
    """Operand names of the `op(...)` call on `line`."""
    m = re.search(r"\b" + re.escape(op) + r"\(([^)]*)\)", line)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _through_copies(defs: dict[str, str], name: Optional[str]) -> Optional[str]:
    """The line defining `name`, following `copy(...)` chains to what was copied."""
    line = defs.get(name or "")
    for _ in range(8):
        copied = _operands(line, "copy") if line else []
        if len(copied) != 1 or copied[0] not in defs:
            break
        line = defs[copied[0]]
    return line


def trip_count(condition: list[str], line: str, body: Optional[list[str]] = None,
               caller: Optional[list[str]] = None) -> Optional[int]:
    """Iterations of the `while` on `line`: XLA's `known_trip_count` when given,
    else from the loop counter: `counter < limit` (or `<=`) in `condition`, the
    counter's start in the tuple the `while` starts from (`caller`) and its step
    in `body`'s root tuple (`counter + step`); a scan counts 0, 1, ..., n - 1, and
    XLA:TPU's windowed matmul loops count 0, 2, 4, ... Where the start or step
    cannot be followed (or without `body`/`caller`) the counter is taken to
    start at 0 and step by 1. None without a `counter < constant` condition."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if m:
        return int(m.group(1))
    cond = _definitions(condition)
    index = limit = None
    for l in condition:
        c = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=(LT|LE)", l)
        if c:
            index, limit = _tuple_index(cond.get(c.group(1))), _int_constant(cond.get(c.group(2)))
            limit = None if limit is None else limit + (c.group(3) == "LE")
            break
    if limit is None:
        return None
    start, step = 0, 1
    if index is not None and body is not None and caller is not None:
        defs = _definitions(body)
        root = next((l for l in body if l.lstrip().startswith("ROOT") and " tuple(" in l), None)
        elems = _operands(root, "tuple") if root else []
        update = _through_copies(defs, elems[index]) if index < len(elems) else None
        args = _operands(update, "add") if update else []
        steps = [_int_constant(_through_copies(defs, a)) for a in args]
        counters = [_tuple_index(_through_copies(defs, a)) for a in args]
        init = _operands(line, "while")
        start_line = None
        if init:
            calls = _definitions(caller)
            start_tuple = _operands(calls.get(init[0], ""), "tuple")
            if index < len(start_tuple):
                start_line = _through_copies(calls, start_tuple[index])
        if len(args) == 2 and index in counters and _int_constant(start_line) is not None \
                and any(x is not None and x > 0 for x in steps):
            step = next(x for x in steps if x is not None and x > 0)
            start = _int_constant(start_line)
        # else: a counter this reading does not follow; taken as 0, 1, ..., limit - 1
    return max(0, -(-(limit - start) // step))


def step_collectives(hlo_text: str) -> tuple[list[Collective], list[str]]:
    """Collectives with `runs` = executions per step (trip counts of enclosing
    loops multiplied), and the names of loops whose trip count was not found
    (their collectives are counted once)."""
    comps, entry = computations(hlo_text)
    calls: dict[str, list[tuple[str, float]]] = {name: [] for name in comps}
    unknown = []
    trips: dict[str, int] = {}  # loop body -> its trip count
    edges = []  # (caller, kind, callee names, line)
    for caller, lines in comps.items():
        for line in lines:
            for kind, ref in _CALLEE.findall(line):
                names = re.findall(r"%?([\w.\-]+)", ref.strip("{}"))
                edges.append((caller, kind, names, line))
                if kind == "body":
                    cond = re.search(r"condition=%?([\w.\-]+)", line)
                    n = trip_count(comps.get(cond.group(1), []) if cond else [], line,
                                   comps.get(names[0], []), lines)
                    if n is None:
                        unknown.append(names[0])
                    trips[names[0]] = n or 1
    for caller, kind, names, line in edges:
        factor: float = trips[names[0]] if kind == "body" else 1
        if kind == "true_computation" and re.search(
                r"false_computation=%?last_iteration_noop", line) and trips.get(caller):
            # XLA's one-way windowed matmul loop: the block is passed on in every
            # iteration but the last
            factor = (trips[caller] - 1) / trips[caller]
        for name in names:
            if name in calls:
                calls[name].append((caller, factor))
    memo: dict[str, float] = {}

    def runs(name: str, seen=()) -> float:
        if name == entry:
            return 1
        if name not in memo:
            memo[name] = sum(runs(c, seen + (name,)) * f for c, f in calls.get(name, [])
                             if c not in seen)
        return memo[name]
    out = []
    for name, lines in comps.items():
        count = round(runs(name))
        for c in collectives("\n".join(lines)):
            out.append(dataclasses.replace(c, runs=count))
    return out, unknown


_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WRAPPER = re.compile(r"^(?:jit|pjit)\([^()]*\)$")


def source(line: str) -> str:
    """The JAX operation a collective instruction came from: its `op_name`
    metadata without the outer `jit(...)` scopes, e.g.
    `transpose(jvp(TwoTower))/encode_image/vision_tower/.../dot_general` (the
    backward of an image-tower matmul); "?" when the line has none (a
    collective XLA built from others)."""
    m = _OP_NAME.search(line)
    if not m:
        return "?"
    parts = m.group(1).split("/")
    while len(parts) > 1 and _WRAPPER.match(parts[0]):
        parts = parts[1:]
    return "/".join(parts)


def summarize_collectives(colls: list, by: str = "kind") -> list[dict]:
    """Group collectives by (kind, dtype, group size), or with `by="source"` by
    (kind, dtype, `source`): instructions, runs per step and bytes per step per
    device (array bytes x runs; for reduce-scatter the operand), largest first."""
    if by not in ("kind", "source"):
        raise ValueError(f"summarize_collectives: by must be 'kind' or 'source', not {by!r}")
    rows: dict[tuple, dict] = collections.OrderedDict()
    for c in colls:
        dtype = "+".join(sorted(c.dtypes)) or "?"
        if by == "source":
            key = (c.kind, dtype, source(c.line))
            fields = {"kind": c.kind, "dtype": dtype, "source": key[2]}
        else:
            key = (c.kind, dtype, c.group)
            fields = {"kind": c.kind, "dtype": dtype, "group": c.group}
        row = rows.setdefault(key, {**fields, "instructions": 0, "runs_per_step": 0,
                                    "bytes_per_step": 0})
        payload = c.bytes * (c.group or 1) if c.kind == "reduce-scatter" else c.bytes
        row["instructions"] += 1
        row["runs_per_step"] += c.runs
        row["bytes_per_step"] += payload * c.runs
    return sorted(rows.values(), key=lambda r: -r["bytes_per_step"])
