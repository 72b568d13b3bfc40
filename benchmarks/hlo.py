"""Reading compiled HLO text: collectives per step, on the main path or only inside a branch.

`compiled.as_text()` is split into computations; an instruction counts as *main*
when the entry computation reaches it without entering a `conditional` branch
(every step runs it; a loop body counts once), and as *conditional* when only a
branch reaches it (a rescue path that rarely runs). GPU splits async collectives
into `-start`/`-done` pairs, counted once by their `-start`.
"""

import dataclasses
import math
import re

COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_BRANCHES = re.compile(r"\b(?:true_computation|false_computation)=%?([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")

# Bytes per element of HLO primitive types (sub-byte types rounded up to one byte).
DTYPE_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


def _op_pattern(op: str) -> re.Pattern[str]:
    # The opcode follows the result shape: "%name = f32[8]{0} all-reduce(...)".
    return re.compile(rf"(?<![\w%.\-]){re.escape(op)}(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Paths:
    """A module's computations and which of them every step runs.

    Attributes:
      bodies: each computation's instruction lines, by name.
      main: computations the entry reaches without entering a conditional branch.
      conditional: computations reached only through a branch.
    """

    bodies: dict[str, list[str]]
    main: set[str]
    conditional: set[str]


def paths(hlo: str) -> Paths:
    bodies: dict[str, list[str]] = {}
    entry = None
    current: list[str] | None = None
    for line in hlo.splitlines():
        if current is None:
            match = _HEADER.match(line)
            if match and "->" in line:
                current = bodies.setdefault(match.group(1), [])
                if line.startswith("ENTRY"):
                    entry = match.group(1)
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    calls: dict[str, set[str]] = {}
    branches: dict[str, set[str]] = {}
    for name, lines in bodies.items():
        calls[name], branches[name] = set(), set()
        for line in lines:
            found = set(_CALLEE.findall(line))
            for group in _CALLEE_LIST.findall(line):
                found |= {c.strip().lstrip("%") for c in group.split(",") if c.strip()}
            if re.search(r"\bconditional\(", line):
                listed = set(_BRANCHES.findall(line))
                for group in re.findall(r"\bbranch_computations=\{([^}]*)\}", line):
                    listed |= {c.strip().lstrip("%") for c in group.split(",") if c.strip()}
                branches[name] |= listed
                found -= listed
            calls[name] |= found

    def reach(start: set[str], follow_branches: bool) -> set[str]:
        seen: set[str] = set()
        todo = list(start)
        while todo:
            name = todo.pop()
            if name in seen or name not in bodies:
                continue
            seen.add(name)
            todo += calls[name]
            if follow_branches:
                todo += branches[name]
        return seen

    main = reach({entry} if entry else set(bodies), follow_branches=False)
    conditional = reach({b for n in main for b in branches[n]}, follow_branches=True) - main
    return Paths(bodies, main, conditional)


def count_collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collective instructions by kind: {"all-reduce": {"main": n, "conditional": m}, ...}."""
    p = paths(hlo)
    counts = {}
    for op in COLLECTIVE_OPS:
        pattern = _op_pattern(op)
        counts[op] = {
            where: sum(len(pattern.findall(line)) for n in names for line in p.bodies[n])
            for where, names in (("main", p.main), ("conditional", p.conditional))
        }
    return counts


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: `f32[8,3]{1,0}` is 96, a tuple `(f32[], s32[2]{0})` is 12."""
    return sum(
        DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(shape)
        if dtype in DTYPE_BYTES
    )


def collective_bytes(hlo: str, op: str = "all-reduce") -> dict[str, int]:
    """Bytes that `op` instructions carry per step: {"main": b, "conditional": c}.

    An all-reduce's result has its operands' shapes, so the payload is read from the
    result shape (`%x = f32[4,4,1]{2,1,0} all-reduce(...)`: 64 bytes); for an all-gather
    that is the gathered size.
    """
    p = paths(hlo)
    pattern = re.compile(rf"=\s*(.+?)\s+{re.escape(op)}(?:-start)?\(")
    out = {}
    for where, names in (("main", p.main), ("conditional", p.conditional)):
        out[where] = sum(
            shape_bytes(match.group(1))
            for n in names
            for line in p.bodies[n]
            if (match := pattern.search(line))
        )
    return out
