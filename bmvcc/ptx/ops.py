"""The instruction registry and operand decoding shared by the ops_*.py families.

`@op("add", "sub")` registers a decoder `decoder(ctx, ins, parts) -> fn(state, mask)`; the machine picks the
longest registered prefix of the dotted opcode ("cp.async.wait_group" before "cp"). Operand getters return
numpy arrays over the batch's threads (or 0-d constants) viewed as the instruction's type.
"""

from __future__ import annotations

import re

import numpy as np

from .machine import DTYPES, _cast

OPS: dict = {}
_INT = re.compile(r"^(-?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)U?$")
_ADDR = re.compile(r"^\[\s*([%\w$.]+)\s*(?:\+\s*(-?(?:0x[0-9a-fA-F]+|\d+)))?\s*\]$")


def op(*names):
    def register(decoder):
        for n in names:
            OPS[n] = decoder
        return decoder
    return register


def type_of(parts: list[str]) -> str:
    return parts[-1]


def reg(ctx, name: str) -> int:
    if name not in ctx.reg_index:
        raise KeyError(f"undeclared register {name}")
    return ctx.reg_index[name]


def dest(ctx, text: str) -> int | None:
    """A destination register's index; None for the sink `_`."""
    return None if text == "_" else reg(ctx, text)


def vector(text: str) -> list[str]:
    """'{%r1, %r2}' -> ['%r1', '%r2']; a plain operand -> [operand]."""
    text = text.strip()
    return [t.strip() for t in text[1:-1].split(",")] if text.startswith("{") else [text]


def constant(text: str, typ: str):
    """An immediate as a 0-d value of type typ: integers wrap to the type's width; 0fXXXXXXXX / 0dXXXX...
    are the bits of an f32 / f64."""
    dt = np.dtype(DTYPES[typ])
    if text.startswith(("0f", "0F")):
        v = np.array(int(text[2:], 16), np.uint32).view(np.float32)
        return v.astype(dt) if dt.kind == "f" else v.view(dt)
    if text.startswith(("0d", "0D")):
        v = np.array(int(text[2:], 16), np.uint64).view(np.float64)
        return v.astype(dt) if dt.kind == "f" else v.view(dt)
    m = _INT.match(text)
    if m is None:
        return np.array(float(text), dt) if dt.kind == "f" else None
    v = int(m.group(2), 0) * (-1 if m.group(1) else 1)
    if dt.kind == "f":
        return np.array(v, dt)
    if dt == np.bool_:
        return np.array(bool(v))
    bits = dt.itemsize * 8
    return np.array(v % (1 << bits), f"u{dt.itemsize}").view(dt)


def src(ctx, text: str, typ: str):
    """Getter of a source operand (register, special register, immediate, or a variable's address)."""
    dt = np.dtype(DTYPES[typ])
    text = text.strip()
    if text.startswith("!%"):  # negated predicate
        i = reg(ctx, text[1:])
        return lambda st: ~st.R[i]
    if text in ctx.reg_index:
        i = ctx.reg_index[text]
        have = np.dtype(ctx.reg_dtype[i])
        if have == dt:
            return lambda st: st.R[i]
        if have.itemsize == dt.itemsize and dt != np.bool_:
            return lambda st: st.R[i].view(dt)
        return lambda st: _cast(st.R[i], _as_int(dt)).view(dt)
    if text.startswith("%"):
        name = text
        return lambda st: _cast(st.special[name], _as_int(dt)).view(dt)
    c = constant(text, typ)
    if c is not None:
        return lambda st: c
    offsets = ctx.shared_offsets if text in ctx.shared_offsets else ctx.local_offsets
    if text in offsets:  # a variable's address in its state space's window
        c = np.array(offsets[text], dt)
        return lambda st: c
    raise ValueError(f"unsupported operand {text!r}")


def _as_int(dt):
    return np.dtype(f"u{dt.itemsize}") if dt.kind == "f" or dt == np.bool_ else dt


def address(ctx, text: str):
    """'[%rd1+8]' / '[sym]' / '[sym+4]' -> (getter of the uint64 base per thread or None, symbol, offset)."""
    m = _ADDR.match(text.strip())
    if m is None:
        raise ValueError(f"unsupported address {text!r}")
    base, off = m.group(1), int(m.group(2) or "0", 0)
    if base in ctx.reg_index:
        g = src(ctx, base, "u64")
        return g, None, off
    return None, base, off
