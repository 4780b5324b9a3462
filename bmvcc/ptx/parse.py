"""PTX text -> Kernel objects: parameters, register and shared/local declarations, instructions, labels.

Only the subset NVRTC emits for one translation unit is accepted: module directives (.version, .target,
.address_size, .global variables), `.entry` kernels whose bodies hold declarations, labels and
instructions (optionally predicated, `@%p` / `@!%p`). Operands stay strings; machine.py decodes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BmvccError


@dataclass(frozen=True)
class Instr:
    line: int  # 1-based line in the PTX text
    opcode: str  # e.g. "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"
    operands: tuple[str, ...]  # top-level operands: "%r1", "[%rd2+4]", "{%r1, %r2}", "0f3F800000", ...
    guard: tuple[str, bool] | None = None  # (predicate register, negated)

    def __str__(self):
        guard = f"@{'!' if self.guard[1] else ''}{self.guard[0]} " if self.guard else ""
        return f"{guard}{self.opcode} {', '.join(self.operands)}"


@dataclass
class Kernel:
    name: str
    params: list[tuple[str, str]] = field(default_factory=list)  # (name, type e.g. "u64")
    registers: dict[str, str] = field(default_factory=dict)  # register name -> type ("b32", "pred", ...)
    shared: list[tuple[str, int, int | None]] = field(default_factory=list)  # (name, align, bytes; None: extern)
    local: list[tuple[str, int, int]] = field(default_factory=list)  # (name, align, bytes)
    instrs: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> index of the next instruction


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_VAR = re.compile(r"\.(shared|local|global)\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([\w$]+)(?:\[(\d*)\])?")
_HEADER = re.compile(r"^(\s*\.(?:version|target|address_size)\b[^\n;]*)$", re.M)
_TOP_COMMA = re.compile(r",(?![^{\[]*[}\]])")
_LABEL = re.compile(r"([$\w]+):\s*")
_GUARD = re.compile(r"@(!?)(%?[\w$]+)\s+")
_OPCODE = re.compile(r"([a-z][\w.:]*)\s*(.*)", re.S)
_REG = re.compile(r"\.reg\s+\.(\w+)\s+(%?[\w$]+)(?:<(\d+)>)?")
_TYPE_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4, "s32": 4,
               "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def split_operands(text: str) -> tuple[str, ...]:
    """Top-level comma split (commas inside {} and [] belong to one operand)."""
    return tuple(t.strip() for t in _TOP_COMMA.split(text) if t.strip())


def _statements(text: str):
    """(line, statement) pairs: the text split at ';', '{' and '}', comments blanked (lines kept)."""
    text = _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    text = _HEADER.sub(r"\1;", text)  # module directives end at the line, without ';'
    line, start = 1, 0
    for sep in re.finditer(r"[;{}]", text):
        i, ch = sep.start(), sep.group()
        if ch in "{}" and not _inside_operand(text, start, i):
            yield from _emit(text, start, i, line)
            yield _line(text, start, i, line), ch
            line += text.count("\n", start, i + 1)
            start = i + 1
        elif ch == ";":
            yield from _emit(text, start, i, line)
            line += text.count("\n", start, i + 1)
            start = i + 1
    yield from _emit(text, start, len(text), line)


def _inside_operand(text: str, start: int, i: int) -> bool:
    """A '{' or '}' that belongs to a vector operand ({%r1, %r2}) rather than a block."""
    stmt = text[start:i].strip()
    if text[i] == "}":
        return stmt.count("{") > stmt.count("}")
    tail = stmt.split(":")[-1].strip()  # after a label
    return bool(tail) and not tail.startswith(".") and not tail.endswith(")")


def _line(text, start, end, line):
    seg = text[start:end]
    return line + seg[:len(seg) - len(seg.lstrip())].count("\n")


def _emit(text, start, end, line):
    seg = text[start:end]
    if seg.strip():
        yield _line(text, start, end, line), seg.strip()


def parse_ptx(text: str) -> dict[str, Kernel]:
    """All `.entry` kernels of a PTX module by name; a construct outside the subset raises BmvccError."""
    kernels: dict[str, Kernel] = {}
    module_shared = []  # module-scope .extern .shared arrays: dynamic shared memory of every kernel
    cur: Kernel | None = None
    depth = 0
    header = None
    for line, stmt in _statements(text):
        if stmt == "{":
            depth += 1
            if header is not None and depth == 1:
                cur, header = header, None
            continue
        if stmt == "}":
            depth -= 1
            if depth == 0 and cur is not None:
                kernels[cur.name] = cur
                cur = None
            continue
        if cur is None:
            m = re.match(r"(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\((.*)\)", stmt, re.S)
            if m:
                header = Kernel(m.group(1))
                for p in split_operands(m.group(2)):
                    pm = re.match(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+([\w$]+)(?:\[(\d+)\])?", p)
                    if pm is None:
                        raise BmvccError(f"PTX line {line}: unsupported kernel parameter {p!r}; this is a bmvcc bug")
                    header.params.append((pm.group(2), pm.group(1)))
            elif header is not None and stmt.startswith((".maxntid", ".reqntid", ".minnctapersm", ".maxnreg")):
                pass
            elif stmt.startswith(".extern .shared"):
                module = Kernel("")
                _body_statement(module, line, stmt)
                module_shared += module.shared
            elif re.match(r"(?:\.visible\s+|\.extern\s+)?\.func", stmt):
                raise BmvccError(f"PTX line {line}: device functions (.func) are not emulated; this is a bmvcc bug")
            continue  # .version/.target/.address_size/.global variables
        _body_statement(cur, line, stmt)
    for k in kernels.values():
        k.shared += module_shared
    return kernels


def _body_statement(k: Kernel, line: int, stmt: str) -> None:
    while True:  # leading labels
        m = _LABEL.match(stmt)
        if not m:
            break
        k.labels[m.group(1)] = len(k.instrs)
        stmt = stmt[m.end():]
    if not stmt:
        return
    if stmt.startswith(".reg"):
        m = _REG.match(stmt)
        names = [f"{m.group(2)}{i}" for i in range(int(m.group(3)))] if m.group(3) else \
            [n.strip() for n in stmt[m.start(2):].split(",")]
        for n in names:
            k.registers[n] = m.group(1)
        return
    if stmt.startswith((".shared", ".local", ".extern")):
        m = _VAR.search(stmt)
        if m is None:
            raise BmvccError(f"PTX line {line}: unsupported declaration {stmt!r}; this is a bmvcc bug")
        space, align, typ, name, count = m.groups()
        size = None if count == "" else _TYPE_BYTES[typ] * int(count or 1)
        if space == "shared":
            k.shared.append((name, int(align or _TYPE_BYTES[typ]), size))
        else:
            k.local.append((name, int(align or _TYPE_BYTES[typ]), size))
        return
    if stmt.startswith(".pragma"):
        return
    guard = None
    m = _GUARD.match(stmt)
    if m:
        guard = (m.group(2), m.group(1) == "!")
        stmt = stmt[m.end():]
    m = _OPCODE.match(stmt)
    if m is None:
        raise BmvccError(f"PTX line {line}: cannot parse {stmt!r}; this is a bmvcc bug")
    k.instrs.append(Instr(line, m.group(1), split_operands(" ".join(m.group(2).split())), guard))
