"""Floating-point instructions (PTX ISA 8.5 §9.7.3-9.7.4): f32/f64, f16 and f16x2 (two halves of a b32).

Exact ones round to nearest even like IEEE 754: numpy's float32/float64 arithmetic is correctly rounded, and
its float16 arithmetic (through float32, 24 >= 2*11+2 bits) too. fma.f32 is rounded once, in every rounding
mode (.rn/.rz/.rm/.rp, also add/sub/mul.f32): the product is exact in float64, the sum is rounded to odd there
(TwoSum and one ulp step), then to float32 in the instruction's mode (correct since 53 >= 2*24+2).
A mul/add/sub without a rounding modifier is executed as .rn (ptxas may contract it into an fma on the GPU,
which the ISA allows; comparisons of float kernels therefore use a tolerance).
`.approx` instructions return the correctly rounded result, within every ISA bound (ex2.approx.f32:
2 ulp; rcp/sqrt/rsqrt.approx: 1 ulp; lg2: 2^-22; sin/cos: 2^-20.9; tanh: 2^-10.99 relative).
`.ftz` flushes subnormal f32 inputs and results to zero of the same sign; `.sat` clamps to [0, 1] (NaN -> 0).
"""

from __future__ import annotations

import numpy as np

from .machine import DTYPES, write
from .ops import dest, op, src, type_of

_ROUNDING = {"rz", "rm", "rp"}
_F32_TINY = np.float32(np.finfo(np.float32).tiny)


def _ftz(v):
    v = np.asarray(v)
    if v.dtype != np.float32:
        return v
    return np.where(np.abs(v) < _F32_TINY, np.copysign(np.float32(0), v), v).astype(np.float32)


def _halves(typ):
    """(view, unview) for f16x2 (a b32 of two f16 lanes); identity for scalar types."""
    if typ in ("f16x2", "bf16x2"):
        if typ == "bf16x2":
            raise ValueError("bf16x2 arithmetic is not emulated")
        return (lambda v: np.asarray(v).view(np.float16).reshape(-1, 2) if np.ndim(v) else
                np.asarray(v).reshape(1).view(np.float16)), (lambda v: v.reshape(-1).view(np.uint32))
    return (lambda v: v), (lambda v: v)


def _wrap(parts, typ, fn):
    view, unview = _halves(typ)
    ftz, sat = "ftz" in parts, "sat" in parts

    def run(*args):
        args = [view(a) for a in args]
        if ftz:
            args = [_ftz(a) for a in args]
        with np.errstate(all="ignore"):
            r = fn(*args)
        if ftz:
            r = _ftz(r)
        if sat:
            r = np.where(np.isnan(r), r.dtype.type(0), np.clip(r, 0, 1)).astype(r.dtype)
        return unview(r)
    return run


def float_binary(parts, typ):
    """The float form of add/sub/mul/div/min/max/neg/abs (ops_int registers the opcode for both)."""
    name = parts[0]
    mode = next((r for r in _ROUNDING if r in parts), None)
    if mode and (typ != "f32" or name not in ("add", "sub", "mul")):
        raise ValueError(f"{name}.{mode}.{typ} is not emulated")
    if mode:
        ops = {"add": lambda a, b: exact_f32(mode, a, b, op="add"), "mul": lambda a, b: exact_f32(mode, a, b, op="mul"),
               "sub": lambda a, b: exact_f32(mode, a, -np.asarray(b), op="add")}
        return _wrap(parts, typ, ops[name])
    fns = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _div(parts, typ),
           "min": np.fmin, "max": np.fmax, "neg": np.negative, "abs": np.abs}
    return _wrap(parts, typ, fns[name])


def _div(parts, typ):
    if "approx" in parts or "full" in parts:
        dt = DTYPES[typ]
        return lambda a, b: (np.asarray(a, np.float64) / np.asarray(b, np.float64)).astype(dt)
    return np.divide


def _sum_to_odd(p, c):
    """p + c (float64 arrays, p exact) rounded to odd in float64: exact, or with the last bit set (sticky)."""
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # TwoSum: p + c = s + err exactly
    bits = np.asarray(s).view(np.uint64)
    inexact = np.isfinite(s) & (err != 0) & ((bits & np.uint64(1)) == 0)
    return np.where(inexact, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)


def _to_f32(s, mode: str):
    """float64 rounded to odd -> float32 with rounding `mode` (rn, rz, rm, rp): correct since 53 >= 2*24+2."""
    f = s.astype(np.float32)
    if mode == "rn":
        return f
    f64 = f.astype(np.float64)
    down = np.nextafter(f, np.float32(-np.inf))
    up = np.nextafter(f, np.float32(np.inf))
    if mode == "rm":
        return np.where(f64 > s, down, f)
    if mode == "rp":
        return np.where(f64 < s, up, f)
    return np.where(np.abs(f64) > np.abs(s), np.where(s > 0, down, up), f)  # rz


def exact_f32(mode: str, a, b, c=None, op="fma"):
    """a * b + c, a * b or a + b of float32 arrays, rounded once with `mode`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if op == "add":
        return _to_f32(_sum_to_odd(a, b), mode)
    p = a * b  # exact: 48 significant bits
    return _to_f32(p if c is None else _sum_to_odd(p, np.asarray(c, np.float64)), mode)


def fma_rn(a, b, c):
    """Single-rounded a * b + c for float32 arrays (round to odd in float64, then to float32)."""
    return exact_f32("rn", a, b, c)


def fma(parts, typ):
    mode = next((r for r in _ROUNDING if r in parts), "rn")
    if typ == "f32":
        return _wrap(parts, typ, lambda a, b, c: exact_f32(mode, a, b, c))
    if mode != "rn":
        raise ValueError(f"fma.{mode}.{typ} is not emulated")
    if typ == "f64":
        raise ValueError("fma.f64 is not emulated")
    return _wrap(parts, typ, lambda a, b, c: (np.asarray(a, np.float64) * b + c).astype(np.float16))  # exact in f64


@op("fma")
def _fma(ctx, ins, parts):
    typ = type_of(parts)
    d = dest(ctx, ins.operands[0])
    a, b, c = (src(ctx, t, typ) for t in ins.operands[1:4])
    f = fma(parts, typ)
    return lambda st, m: write(st, d, f(a(st), b(st), c(st)), m)


def _unary_f64(fn):
    """A function evaluated in float64 and rounded once to the instruction's type."""
    def run(a):
        a = np.asarray(a)
        return fn(a.astype(np.float64)).astype(a.dtype)
    return run


_UNARY = {"ex2": np.exp2, "lg2": np.log2, "sin": np.sin, "cos": np.cos, "tanh": np.tanh,
          "rsqrt": lambda x: 1.0 / np.sqrt(x), "rcp": lambda x: 1.0 / x, "sqrt": np.sqrt}


@op(*_UNARY)
def _unary(ctx, ins, parts):
    typ = type_of(parts)
    if typ not in ("f32", "f64", "f16", "f16x2"):
        raise ValueError(f"{parts[0]}.{typ} is not emulated")
    d = dest(ctx, ins.operands[0])
    a = src(ctx, ins.operands[1], typ)
    f = _wrap(parts, typ, _unary_f64(_UNARY[parts[0]]))
    return lambda st, m: write(st, d, f(a(st)), m)


@op("testp")
def _testp(ctx, ins, parts):
    typ, what = type_of(parts), parts[1]
    tests = {"finite": np.isfinite, "infinite": np.isinf, "number": lambda v: ~np.isnan(v), "notanumber": np.isnan,
             "normal": lambda v: np.isfinite(v) & (np.abs(v) >= np.finfo(v.dtype).tiny),
             "subnormal": lambda v: (v != 0) & (np.abs(v) < np.finfo(v.dtype).tiny)}
    d = dest(ctx, ins.operands[0])
    a = src(ctx, ins.operands[1], typ)
    t = tests[what]
    return lambda st, m: write(st, d, t(a(st)), m)
