"""What a compiled program communicates: collectives counted from HLO text, per step, with their bytes.

XLA prints a scanned layer stack once, as the body of a `while` loop whose trip count it knows
(`backend_config={"known_trip_count":{"n":"48"}}`): `collective_stats` walks the call graph from
the entry computation and multiplies what a loop body does by its trip count, so the figures are
per executed step, not per line of text. Bytes are the larger side of each collective (the whole
gathered array for an all-gather, the whole input of a reduce-scatter, every operand of an
all-reduce), i.e. the data volume the op spans, not wire bytes of a particular algorithm.
"""

from __future__ import annotations

import dataclasses
import functools
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEE = re.compile(r"\b(?:body|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_S32_CONSTANT = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")


@dataclasses.dataclass
class CollectiveStats:
    """Per executed step: how many of each collective run and the bytes they span."""

    counts: dict[str, int]
    bytes: dict[str, int]
    in_loops: dict[str, int]  # of `counts`, those run inside a while loop (e.g. the layer scan)
    unknown_trip_counts: int  # while loops without a known trip count (counted once)

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def rows(self) -> list[tuple[str, int, int]]:
        """(op, count per step, bytes per step) for every collective kind that occurs."""
        return [(op, self.counts[op], self.bytes[op]) for op in COLLECTIVES if self.counts.get(op)]


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * _DTYPE_BYTES[dtype])
    return out


def _split_instruction(line: str) -> tuple[str, str, str] | None:
    """(result type, opcode, rest) of an HLO instruction line, or None."""
    _, eq, rhs = line.partition("=")
    if not eq:
        return None
    rhs = rhs.strip()
    if rhs.startswith("("):  # tuple type: find its closing parenthesis
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_text, rest = rhs[: i + 1], rhs[i + 1 :].strip()
    else:
        type_text, _, rest = rhs.partition(" ")
    opcode, paren, args = rest.partition("(")
    if not paren:
        return None
    return type_text, opcode.strip(), args


def _collective_kind(opcode: str) -> str | None:
    if opcode.endswith("-done"):
        return None
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES else None


def collective_stats(hlo_text: str) -> CollectiveStats:
    """Collectives per executed step of a compiled module's HLO text (`compiled.as_text()`)."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line.strip())
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    unknown = [0]

    @functools.cache
    def totals(name: str) -> tuple[tuple[str, int, int, int], ...]:
        counts: dict[str, list[int]] = {}  # kind -> [count, bytes, count inside loops]
        for line in computations.get(name, ()):
            parsed = _split_instruction(line)
            if parsed is None:
                continue
            type_text, opcode, args = parsed
            kind = _collective_kind(opcode)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # TPU: a reduce-scatter is an all-reduce + slice fused under this name
            if kind is not None:
                sizes = _array_bytes(type_text)
                if kind in ("all-reduce", "reduce-scatter") and type_text.startswith("("):
                    size = sum(sizes)
                else:
                    size = max(sizes + _array_bytes(args.split("),")[0]) or [0])
                c = counts.setdefault(kind, [0, 0, 0])
                c[0] += 1
                c[1] += size
            callees = _CALLEE.findall(line)
            for group in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            factor = 1
            if opcode == "while":
                trip = _TRIP_COUNT.search(line)
                factor = int(trip.group(1)) if trip else _trip_count_from_condition(line)
                if factor is None:
                    unknown[0] += 1
                    factor = 1
            for callee in callees:
                for kind, n, size, looped in totals(callee):
                    c = counts.setdefault(kind, [0, 0, 0])
                    c[0] += factor * n
                    c[1] += factor * size
                    c[2] += factor * (n if opcode == "while" else looped)
        return tuple((k, v[0], v[1], v[2]) for k, v in counts.items())

    def _trip_count_from_condition(line: str) -> int | None:
        # The TPU compiler drops known_trip_count; a scan's condition is `i < N` with i counting from 0.
        cond = _CONDITION.search(line)
        body = computations.get(cond.group(1), ()) if cond else ()
        bounds = [int(m) for text in body for m in _S32_CONSTANT.findall(text)]
        if len(bounds) == 1 and any("direction=LT" in text for text in body):
            return bounds[0]
        return None

    result = totals(entry)
    counts = {op: 0 for op in COLLECTIVES}
    sizes = {op: 0 for op in COLLECTIVES}
    in_loops = {op: 0 for op in COLLECTIVES}
    for kind, n, size, looped in result:
        counts[kind] += n
        sizes[kind] += size
        in_loops[kind] += looped
    return CollectiveStats(counts=counts, bytes=sizes, in_loops=in_loops, unknown_trip_counts=unknown[0])


def count_sharding_annotations(lowered_text: str) -> int:
    """Sharding constraints in a lowered (StableHLO) module: one per `with_sharding_constraint` that applied."""
    return lowered_text.count("sdy.sharding_constraint") + lowered_text.count("@Sharding")
