"""Integer, logic, comparison/select, move and conversion instructions (PTX ISA 8.5 §9.7.1, §9.7.6-9.7.9).

Integer arithmetic wraps modulo 2^n (numpy's fixed-width arithmetic); shifts by >= the width give 0 (or the
sign for shr.s); cvt float->int rounds as its .rni/.rzi/.rmi/.rpi modifier says and saturates (NaN -> 0),
float->float .rn is numpy's round-to-nearest-even cast.
"""

from __future__ import annotations

import numpy as np

from .machine import DTYPES, _cast, write
from .ops import constant, dest, op, src, type_of, vector

SHARED_GENERIC = 0x0001_0000_0000_0000  # generic address of shared offset 0 (cvta.shared)
LOCAL_GENERIC = 0x0002_0000_0000_0000


def _wide(typ: str) -> str:
    return {"u16": "u32", "s16": "s32", "u32": "u64", "s32": "s64"}[typ]


def _elementwise(n_src: int, fn):
    """Decoder of `opcode d, a[, b[, c]]` computing fn(*sources) in the instruction's type."""
    def decoder(ctx, ins, parts):
        typ = type_of(parts)
        d = dest(ctx, ins.operands[0])
        srcs = [src(ctx, t, typ) for t in ins.operands[1:1 + n_src]]
        if len(ins.operands) != n_src + 1:
            raise ValueError(f"expected {n_src + 1} operands")
        f = fn(parts, typ)
        if n_src == 1:
            a, = srcs
            return lambda st, m: write(st, d, f(a(st)), m)
        if n_src == 2:
            a, b = srcs
            return lambda st, m: write(st, d, f(a(st), b(st)), m)
        a, b, c = srcs
        return lambda st, m: write(st, d, f(a(st), b(st), c(st)), m)
    return decoder


def _int_mul(parts, typ):
    dt = DTYPES[typ]
    if "wide" in parts:
        wt = DTYPES[_wide(typ)]
        return lambda a, b: np.asarray(a).astype(wt) * np.asarray(b).astype(wt)
    if "hi" in parts:
        if np.dtype(dt).itemsize != 4:
            raise ValueError("mul.hi is emulated for 32-bit types only")
        wt = np.int64 if typ.startswith("s") else np.uint64
        return lambda a, b: ((np.asarray(a).astype(wt) * np.asarray(b).astype(wt)) >> 32).astype(dt)
    return lambda a, b: (a * b).astype(dt)


def _int_or_float(int_fn):
    """Decoder factory choosing ops_float's implementation for f16/f32/f64 types."""
    def factory(parts, typ):
        if typ.startswith(("f", "bf")):
            from .ops_float import float_binary
            return float_binary(parts, typ)
        return int_fn(parts, typ)
    return factory


def _div(parts, typ):
    dt = DTYPES[typ]

    wide = np.int64 if typ[0] == "s" else np.uint64

    def div(a, b):
        """Truncating division; by zero (undefined, and computed on inactive lanes too) gives all ones."""
        a64, b64 = np.asarray(a).astype(wide), np.asarray(b).astype(wide)
        zero = b64 == 0
        b64 = np.where(zero, wide(1), b64)
        q = a64 // b64
        if typ[0] == "s":
            q = q + ((q < 0) & (q * b64 != a64))  # truncate toward zero
        return np.where(zero, np.array(-1).astype(dt), q.astype(dt))
    return div


def _rem(parts, typ):
    d = _div(parts, typ)
    return lambda a, b: (a - d(a, b) * b).astype(DTYPES[typ])


for _name, _fn in {"add": lambda p, t: lambda a, b: a + b, "sub": lambda p, t: lambda a, b: a - b,
                   "mul": _int_mul, "div": _div, "rem": _rem,
                   "min": lambda p, t: np.minimum, "max": lambda p, t: np.maximum}.items():
    op(_name)(_elementwise(2, _int_or_float(_fn)))
op("neg")(_elementwise(1, _int_or_float(lambda p, t: lambda a: -a)))
op("abs")(_elementwise(1, _int_or_float(lambda p, t: np.abs)))
op("and")(_elementwise(2, lambda p, t: lambda a, b: a & b))
op("or")(_elementwise(2, lambda p, t: lambda a, b: a | b))
op("xor")(_elementwise(2, lambda p, t: lambda a, b: a ^ b))
op("not")(_elementwise(1, lambda p, t: lambda a: ~a))
op("popc")(_elementwise(1, lambda p, t: lambda a: np.bitwise_count(a).astype(np.uint32)))


def _mad(parts, typ):
    if typ.startswith("f"):
        from .ops_float import fma
        return fma(parts, typ)
    mul = _int_mul(parts, typ)
    return lambda a, b, c: mul(a, b) + np.asarray(c).astype(DTYPES[_wide(typ)] if "wide" in parts else DTYPES[typ])


@op("mad")
def _mad_decoder(ctx, ins, parts):
    typ = type_of(parts)
    d = dest(ctx, ins.operands[0])
    a, b = (src(ctx, t, typ) for t in ins.operands[1:3])
    c = src(ctx, ins.operands[3], _wide(typ) if "wide" in parts else typ)
    f = _mad(parts, typ)
    return lambda st, m: write(st, d, f(a(st), b(st), c(st)), m)


def _shift(left: bool):
    def fn(parts, typ):
        dt = np.dtype(DTYPES[typ])
        bits = dt.itemsize * 8

        def shift(a, b):
            b = np.asarray(b).astype(np.uint32)
            n = np.minimum(b, bits - 1).astype(dt)
            if left:
                return np.where(b >= bits, dt.type(0), a << n)
            r = a >> n  # arithmetic for signed dtypes
            return r if typ.startswith("s") else np.where(b >= bits, dt.type(0), r)
        return shift
    return fn


for _name, _left in (("shl", True), ("shr", False)):
    @op(_name)
    def _shift_decoder(ctx, ins, parts, _left=_left):
        typ = type_of(parts)
        d = dest(ctx, ins.operands[0])
        a, b = src(ctx, ins.operands[1], typ), src(ctx, ins.operands[2], "u32")
        f = _shift(_left)(parts, typ)
        return lambda st, m: write(st, d, f(a(st), b(st)), m)


@op("lop3")
def _lop3(ctx, ins, parts):
    """lop3.b32 d, a, b, c, immLut: bit i of d is bit (4 a_i + 2 b_i + c_i) of immLut (§9.7.7.6)."""
    d = dest(ctx, ins.operands[0])
    a, b, c = (src(ctx, t, "b32") for t in ins.operands[1:4])
    lut = int(constant(ins.operands[4], "u32"))
    terms = [i for i in range(8) if lut >> i & 1]

    def f(st, m):
        x, y, z = a(st), b(st), c(st)
        r = np.zeros(st.n, np.uint32)
        for i in terms:
            r |= (x if i & 4 else ~x) & (y if i & 2 else ~y) & (z if i & 1 else ~z)
        write(st, d, r, m)
    return f


@op("prmt")
def _prmt(ctx, ins, parts):
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte (c >> 4i) & 7 of {b, a}, or that byte's sign
    replicated when bit 3 of the selector is set (§9.7.7.7)."""
    if type_of(parts) != "b32" or len(parts) != 2:
        raise ValueError("only prmt.b32 in the default mode is emulated")
    d = dest(ctx, ins.operands[0])
    a, b, c = (src(ctx, t, "b32") for t in ins.operands[1:4])

    def f(st, m):
        x, y, sel = a(st), b(st), c(st)
        bytes8 = np.stack([np.broadcast_to(x, (st.n,)), np.broadcast_to(y, (st.n,))], axis=1).view(np.uint8)
        sel = np.broadcast_to(sel, (st.n,))
        out = np.zeros(st.n, np.uint32)
        for i in range(4):
            s = (sel >> np.uint32(4 * i)) & np.uint32(15)
            byte = np.take_along_axis(bytes8, (s & 7).astype(np.int64)[:, None], axis=1)[:, 0].astype(np.uint32)
            byte = np.where(s & 8, np.where(byte & 0x80, np.uint32(0xFF), np.uint32(0)), byte)
            out |= byte << np.uint32(8 * i)
        write(st, d, out, m)
    return f


@op("dp2a")
def _dp2a(ctx, ins, parts):
    """dp2a.mode.atype.btype d, a, b, c: d = c + a.h0 * b.byte(s) + a.h1 * b.byte(s + 1), s = 0 (.lo) or 2 (.hi),
    halves and bytes sign- or zero-extended as their type says, modulo 2^32 (§9.7.1.23)."""
    mode, atype, btype = parts[1:]
    d = dest(ctx, ins.operands[0])
    a, b = src(ctx, ins.operands[1], atype), src(ctx, ins.operands[2], btype)
    c = src(ctx, ins.operands[3], "u32" if atype == btype == "u32" else "s32")
    halves, bytes4 = (np.int16 if atype == "s32" else np.uint16), (np.int8 if btype == "s32" else np.uint8)
    first = {"lo": 0, "hi": 2}[mode]

    def f(st, m):
        x = np.broadcast_to(a(st), (st.n,)).astype(np.uint32).view(halves).reshape(st.n, 2).astype(np.int64)
        y = np.broadcast_to(b(st), (st.n,)).astype(np.uint32).view(bytes4).reshape(st.n, 4).astype(np.int64)
        dot = x[:, 0] * y[:, first] + x[:, 1] * y[:, first + 1]
        write(st, d, (np.asarray(c(st)).astype(np.int64) + dot).astype(np.uint32), m)
    return f


def _bitfield_operands(ctx, ins, parts, values: int):
    """bfi/bfe operands: (type, dtype, bits, destination, [`values` value operands of the type], pos, len)."""
    typ = type_of(parts)
    dt = np.dtype(DTYPES[typ])
    ops = ins.operands
    return (typ, dt, dt.itemsize * 8, dest(ctx, ops[0]), [src(ctx, o, typ) for o in ops[1:1 + values]],
            src(ctx, ops[1 + values], "u32"), src(ctx, ops[2 + values], "u32"))


@op("bfi")
def _bfi(ctx, ins, parts):
    """bfi.b32 d, f, b, pos, len: d = b with bits [pos, pos+len) from f's low bits (§9.7.7.5)."""
    _typ, dt, bits, d, (f_, b), pos, ln = _bitfield_operands(ctx, ins, parts, 2)

    def f(st, m):
        p = np.asarray(pos(st)).astype(np.uint64) & 0xFF
        n = np.minimum(np.asarray(ln(st)).astype(np.uint64) & 0xFF, bits)
        mask = ((np.uint64(1) << n) - np.uint64(1)) if bits < 64 else np.where(n >= 64, ~np.uint64(0),
                                                                                (np.uint64(1) << n) - np.uint64(1))
        mask = np.where(p >= bits, np.uint64(0), mask << np.minimum(p, bits - 1))
        fv = np.asarray(f_(st)).astype(f"u{dt.itemsize}").astype(np.uint64)
        bv = np.asarray(b(st)).astype(f"u{dt.itemsize}").astype(np.uint64)
        r = (bv & ~mask) | ((fv << np.minimum(p, bits - 1)) & mask)
        write(st, d, r.astype(f"u{dt.itemsize}").view(dt), m)
    return f


@op("bfe")
def _bfe(ctx, ins, parts):
    """bfe.{u,s}{32,64} d, a, pos, len: bits [pos, pos+len) of a, zero- or sign-extended (§9.7.7.4)."""
    typ, dt, bits, d, (a,), pos, ln = _bitfield_operands(ctx, ins, parts, 1)

    def f(st, m):
        v = np.asarray(a(st)).astype(np.int64 if typ[0] == "s" else np.uint64)
        p = np.minimum(np.asarray(pos(st)).astype(np.int64) & 0xFF, bits - 1)
        n = np.asarray(ln(st)).astype(np.int64) & 0xFF
        p_u = p.astype(np.uint64)
        ones = np.where(n >= 64, ~np.uint64(0), (np.uint64(1) << n.astype(np.uint64)) - 1)
        field = (v.astype(np.uint64) >> p_u) & ones
        if typ[0] == "s":
            top = np.minimum(p + n, bits) - 1  # the sign bit: the field's last bit inside the operand
            sign = (v.astype(np.uint64) >> top.astype(np.uint64)) & np.uint64(1)
            width = np.minimum(n, bits - p)
            ext = np.where((sign == 1) & (width < 64), ~((np.uint64(1) << width.astype(np.uint64)) - 1), np.uint64(0))
            field = np.where(n == 0, np.uint64(0), field | ext)
        write(st, d, field.astype(f"u{dt.itemsize}").view(dt), m)
    return f


_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
        "ge": np.greater_equal, "lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal}
_BOOL = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}


def compare(cmp: str, typ: str):
    """PTX comparison (§9.7.8.1): for floats the plain ops are ordered (false on NaN), the ...u ops unordered."""
    if typ.startswith("f"):
        if cmp in ("num", "nan"):
            return (lambda a, b: ~(np.isnan(a) | np.isnan(b))) if cmp == "num" else \
                (lambda a, b: np.isnan(a) | np.isnan(b))
        base = _CMP[cmp.rstrip("u") if cmp.endswith("u") and cmp != "u" else cmp]
        if cmp.endswith("u"):
            return lambda a, b: base(a, b) | np.isnan(a) | np.isnan(b)
        return lambda a, b: base(a, b) & ~(np.isnan(a) | np.isnan(b))
    return _CMP[cmp]


@op("setp")
def _setp(ctx, ins, parts):
    """setp.CmpOp[.BoolOp].type p[|q], a, b[, {!}c]: p = cmp(a, b) BoolOp c, q = !cmp(a, b) BoolOp c."""
    typ = type_of(parts)
    cmp = compare(parts[1], typ)
    boolop = _BOOL[parts[2]] if parts[2] in _BOOL else None
    pq = ins.operands[0].split("|")
    p, q = dest(ctx, pq[0]), dest(ctx, pq[1]) if len(pq) > 1 else None
    a, b = src(ctx, ins.operands[1], typ), src(ctx, ins.operands[2], typ)
    c = src(ctx, ins.operands[3], "pred") if boolop else None

    def f(st, m):
        t = np.broadcast_to(cmp(a(st), b(st)), (st.n,))
        if boolop:
            cv = c(st)
            write(st, p, boolop(t, cv), m)
            if q is not None:
                write(st, q, boolop(~t, cv), m)
        else:
            write(st, p, t, m)
            if q is not None:
                write(st, q, ~t, m)
    return f


@op("selp")
def _selp(ctx, ins, parts):
    typ = type_of(parts)
    d = dest(ctx, ins.operands[0])
    a, b = src(ctx, ins.operands[1], typ), src(ctx, ins.operands[2], typ)
    c = src(ctx, ins.operands[3], "pred")
    return lambda st, m: write(st, d, np.where(c(st), a(st), b(st)), m)


@op("mov")
def _mov(ctx, ins, parts):
    """mov.type d, a; and the packing forms mov.b64 d, {lo, hi} / mov.b64 {lo, hi}, a (also b32 from b16s)."""
    typ = type_of(parts)
    dst, s = ins.operands
    if dst.startswith("{") or s.startswith("{"):
        size = np.dtype(DTYPES[typ]).itemsize
        if s.startswith("{"):
            pieces = vector(s)
            half = f"b{size * 8 // len(pieces)}"
            getters = [src(ctx, t, half) for t in pieces]
            d = dest(ctx, dst)

            def pack(st, m):
                parts_ = [np.broadcast_to(g(st), (st.n,)) for g in getters]
                write(st, d, np.stack(parts_, axis=1).copy().view(DTYPES[typ])[:, 0], m)
            return pack
        outs = [dest(ctx, t) for t in vector(dst)]
        half = np.dtype(DTYPES[f"b{size * 8 // len(outs)}"])
        a = src(ctx, s, typ)

        def unpack(st, m):
            pieces = np.broadcast_to(a(st), (st.n,)).copy().view(half).reshape(st.n, len(outs))
            for i, o in enumerate(outs):
                if o is not None:
                    write(st, o, pieces[:, i].copy(), m)
        return unpack
    d = dest(ctx, dst)
    a = src(ctx, s, typ)
    return lambda st, m: write(st, d, a(st), m)


@op("cvta")
def _cvta(ctx, ins, parts):
    """cvta.{to.}space.size: global addresses are generic ones; shared/local map to windows above 2^48."""
    space = parts[2] if parts[1] == "to" else parts[1]
    base = {"global": 0, "shared": SHARED_GENERIC, "local": LOCAL_GENERIC}[space]
    d = dest(ctx, ins.operands[0])
    a = src(ctx, ins.operands[1], "u64" if parts[-1] == "u64" else "u32")
    off = np.uint64(base) if parts[-1] == "u64" else np.uint32(base)
    sign = -1 if parts[1] == "to" else 1
    if base == 0:
        return lambda st, m: write(st, d, a(st), m)
    return lambda st, m: write(st, d, a(st) - off if sign < 0 else a(st) + off, m)


_INT_RANGES = {t: (np.iinfo(DTYPES[t]).min, np.iinfo(DTYPES[t]).max)
               for t in ("u8", "s8", "u16", "s16", "u32", "s32", "u64", "s64")}
_ROUND = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil,
          "rn": np.rint, "rz": np.trunc, "rm": np.floor, "rp": np.ceil}


@op("cvt")
def _cvt(ctx, ins, parts):
    """cvt[.rnd][.ftz][.sat].dtype.atype d, a (§9.7.9.21)."""
    dtyp, atyp = parts[-2], parts[-1]
    mods = set(parts[1:-2])
    d = dest(ctx, ins.operands[0])
    a = src(ctx, ins.operands[1], atyp)
    ddt = np.dtype(DTYPES[dtyp])
    rnd = next((r for r in mods if r in _ROUND), None)
    if atyp.startswith("f") and dtyp.startswith(("u", "s")):  # float -> int: round, saturate, NaN -> 0
        lo, hi = _INT_RANGES[dtyp]
        rf = _ROUND[rnd or "rzi"]

        def f2i(st, m):
            v = rf(np.asarray(a(st)).astype(np.float64))
            v = np.where(np.isnan(v), 0.0, np.clip(v, lo, hi))
            write(st, d, v.astype(ddt), m)
        return f2i
    if atyp.startswith("f") and dtyp.startswith("f"):
        sat = "sat" in mods
        if rnd in ("rni", "rzi", "rmi", "rpi"):  # round to an integral value, same type
            rf = _ROUND[rnd]
            return lambda st, m: write(st, d, _sat(rf(np.asarray(a(st))).astype(ddt), sat), m)
        if rnd in ("rn", None) or ddt.itemsize > np.dtype(DTYPES[atyp]).itemsize:
            return lambda st, m: write(st, d, _sat(np.asarray(a(st)).astype(ddt), sat), m)
        raise ValueError(f"cvt rounding .{rnd} between floats is not emulated")
    if dtyp.startswith("f"):  # int -> float, round to nearest even
        if rnd not in ("rn", None):
            raise ValueError(f"cvt rounding .{rnd} to float is not emulated")
        return lambda st, m: write(st, d, np.asarray(a(st)).astype(ddt), m)
    if "sat" in mods:  # int -> int with saturation
        lo, hi = _INT_RANGES[dtyp]
        return lambda st, m: write(st, d, np.clip(np.asarray(a(st)).astype(np.float64), lo, hi).astype(ddt), m)
    return lambda st, m: write(st, d, _cast(np.asarray(a(st)), ddt), m)


def _sat(v, sat: bool):
    return np.where(np.isnan(v), v.dtype.type(0), np.clip(v, 0, 1)).astype(v.dtype) if sat else v
