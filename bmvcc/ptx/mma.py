"""Warp-level matrix instructions: ldmatrix and mma.sync with the fragment layouts of PTX ISA 8.5.

ldmatrix (§9.7.14.5.15): .x1/.x2/.x4 load 1/2/4 matrices of 8x8 b16; lanes 8i..8i+7 hold the row addresses
of matrix i (16 bytes per row); of matrix i, lane l receives register d_i = the two b16 elements at row l/4,
columns 2(l%4), 2(l%4)+1 (with .trans: of the transposed matrix).

mma.sync.aligned.m16n8kK (§9.7.14.5.14, "Matrix Fragments for mma.m16n8k*"): with groupID g = lane >> 2,
threadID_in_group t = lane % 4, e elements per 32-bit register (4 for .s8/.u8, 2 for .f16), element i of a
lane in register r = i / e:
    A (row-major, M=16):  row = g + 8 (r % 2),  col = t e + i % e + (r / 2) 4e
    B (column-major, N=8): row = t e + i % e + r 4e,  col = g
    C/D (16x8):           row = g + 8 (i / 2),  col = 2 t + i % 2   (f16 C/D: 2 per register, same order)
Integer products are exact and the int32 accumulation wraps (.satfinite clamps); f16 products are exact in
float64, summed there and rounded once to f32/f16 (the ISA leaves the accumulation order unspecified).
"""

from __future__ import annotations

import functools

import numpy as np

from .machine import active, write
from .ops import address, dest, op, src, vector
from .ops_mem import _byte_index

_ELEM = {"s8": (np.int8, 4), "u8": (np.uint8, 4), "f16": (np.float16, 2)}


@functools.cache
def fragment_index(kind: str, k: int, e: int):
    """(lanes, elements, rows, cols) arrays of one operand's fragment layout (see the module docstring)."""
    lanes, elems, rows, cols = [], [], [], []
    n_regs = {"a": 16 * k // (32 * e), "b": 8 * k // (32 * e), "c": 4 // 1}[kind]
    per_reg = 1 if kind == "c" else e
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(n_regs * per_reg):
            r = i // per_reg
            if kind == "a":
                row, col = g + 8 * (r % 2), t * e + i % e + (r // 2) * 4 * e
            elif kind == "b":
                row, col = t * e + i % e + r * 4 * e, g
            else:
                row, col = g + 8 * (i // 2), 2 * t + i % 2
            lanes.append(lane)
            elems.append(i)
            rows.append(row)
            cols.append(col)
    return tuple(np.array(v) for v in (lanes, elems, rows, cols))


def _warps(st, m, line):
    """Thread indices [warps, 32] of the executing warps; .aligned instructions need whole warps."""
    rows = active(st, m)
    if rows.size % 32 or (rows.reshape(-1, 32) % 32 != np.arange(32)).any():
        st.fail(line, int(rows[0]), "a .sync.aligned warp instruction executed by part of a warp")
    return rows.reshape(-1, 32)


def _write_lanes(st, m, warps, regs, words) -> None:
    """Register regs[i] of each lane of `warps` ([warps, 32] thread indices) = words[:, :, i] ([warps, 32, len(regs)]
    32-bit words)."""
    for i, d in enumerate(regs):
        full = np.zeros(st.n, np.uint32)
        full[warps.reshape(-1)] = words[:, :, i].reshape(-1)
        write(st, d, full, m)


@op("ldmatrix.sync")
def _ldmatrix(ctx, ins, parts):
    nmat = {"x1": 1, "x2": 2, "x4": 4}[next(p for p in parts if p in ("x1", "x2", "x4"))]
    trans = "trans" in parts
    if "b16" not in parts:
        raise ValueError("ldmatrix is emulated for .b16")
    outs = [dest(ctx, t) for t in vector(ins.operands[0])]
    g, sym, off = address(ctx, ins.operands[1])
    if g is None:
        raise ValueError("ldmatrix from a symbol address")
    o = np.uint64(off)

    def ldmatrix(st, m):
        warps = _warps(st, m, ins.line)
        thr = warps[:, :8 * nmat].reshape(-1)
        addr = np.broadcast_to(g(st), (st.n,))[thr] + o
        _, idx = _byte_index(st, ins.line, "shared", addr, thr, 16)
        st.races.access(idx, st.warp_bit[thr], False, lambda r: st.where(ins.line, thr[r]))
        mats = st.shared[idx].view(np.uint16).reshape(-1, nmat, 8, 8)
        if trans:
            mats = mats.transpose(0, 1, 3, 2)
        frag = np.ascontiguousarray(mats).view(np.uint32).reshape(-1, nmat, 32)  # lane = row * 4 + column pair
        _write_lanes(st, m, warps, outs, frag.transpose(0, 2, 1))
    return ldmatrix


@op("mma.sync")
def _mma(ctx, ins, parts):
    shape = next(p for p in parts if p.startswith("m16n8k"))
    k = int(shape[6:])
    types = [p for p in parts if p in ("s8", "u8", "f16", "f32", "s32")]
    dtype, atype, btype, ctype = types
    if parts[parts.index(shape) + 1:parts.index(shape) + 3] != ["row", "col"] or atype not in _ELEM:
        raise ValueError(f"mma layout/types {ins.opcode}")
    (a_dt, e), (b_dt, _) = _ELEM[atype], _ELEM[btype]
    lay_a, lay_b, lay_c = fragment_index("a", k, e), fragment_index("b", k, e), fragment_index("c", k, e)
    d_regs = [dest(ctx, t) for t in vector(ins.operands[0])]
    a_regs = [src(ctx, t, "b32") for t in vector(ins.operands[1])]
    b_regs = [src(ctx, t, "b32") for t in vector(ins.operands[2])]
    c_regs = [src(ctx, t, "b32") for t in vector(ins.operands[3])]
    sat = "satfinite" in parts

    def gather(st, regs, warps, dt):
        words = np.stack([np.broadcast_to(r(st), (st.n,))[warps] for r in regs], axis=-1).astype(np.uint32)
        return np.ascontiguousarray(words).view(dt).reshape(warps.shape[0], 32, -1)  # [warp, lane, element]

    def to_matrix(frag, lay, shape_):
        lanes, elems, rows, cols = lay
        out = np.zeros((frag.shape[0], *shape_), np.float64)
        out[:, rows, cols] = frag[:, lanes, elems]
        return out

    def mma(st, m):
        warps = _warps(st, m, ins.line)
        a = to_matrix(gather(st, a_regs, warps, a_dt), lay_a, (16, k))
        b = to_matrix(gather(st, b_regs, warps, b_dt), lay_b, (k, 8))
        c_dt = {"s32": np.int32, "f32": np.float32, "f16": np.float16}[ctype]
        c = to_matrix(gather(st, c_regs, warps, c_dt), lay_c, (16, 8))
        acc = a @ b  # exact: |products| and sums stay below 2^53
        if dtype == "s32":
            total = acc.astype(np.int64) + c.astype(np.int64)
            res = np.clip(total, -2**31, 2**31 - 1) if sat else total
            res = res.astype(np.int64).astype(np.uint64).astype(np.uint32).view(np.int32)
        else:
            res = (acc + c).astype(np.float32 if dtype == "f32" else np.float16)
        lanes, elems, rows, cols = lay_c
        frag = np.zeros((warps.shape[0], 32, 4), res.dtype)
        frag[:, lanes, elems] = res[:, rows, cols]
        _write_lanes(st, m, warps, d_regs, np.ascontiguousarray(frag).view(np.uint32).reshape(warps.shape[0], 32, -1))
    return mma


# wmma (§9.7.14.4): the ISA leaves the fragments' distribution over the lanes unspecified ("the layout of the
# fragments held by different threads is unspecified"); a program may only load, mma, store and fill them.
# The emulator's distribution: element e of lane l is element (l E + e) mod (rows x cols) of the row-major
# matrix, with E elements per lane (a matrix with fewer elements than the 32 E slots is held twice).
_WMMA_SHAPES = {"m16n16k16": (16, 16, 16), "m32n8k16": (32, 8, 16), "m8n32k16": (8, 32, 16)}
_WMMA_TYPES = {"f16": np.float16, "f32": np.float32, "s32": np.int32, "s8": np.int8, "u8": np.uint8}


def _wmma_dims(shape: str, operand: str):
    m, n, k = _WMMA_SHAPES[shape]
    return {"a": (m, k), "b": (k, n), "c": (m, n), "d": (m, n)}[operand]


def _wmma_slots(rows: int, cols: int, per_lane: int):
    """(rows, cols) of every (lane, element) slot of a fragment."""
    flat = (np.arange(32)[:, None] * per_lane + np.arange(per_lane)[None, :]) % (rows * cols)
    return flat // cols, flat % cols


@op("wmma.load", "wmma.store")
def _wmma_memory(ctx, ins, parts):
    load = parts[1] == "load"
    operand = parts[2]
    layout = next(p for p in parts if p in ("row", "col"))
    shape = next(p for p in parts if p in _WMMA_SHAPES)
    dt = np.dtype(_WMMA_TYPES[parts[-1]])
    space = next((p for p in parts if p in ("shared", "global")), "generic")
    regs, addr_text = (ins.operands[0], ins.operands[1]) if load else (ins.operands[1], ins.operands[0])
    regs = [dest(ctx, r) for r in vector(regs)] if load else [src(ctx, r, "b32") for r in vector(regs)]
    rows, cols = _wmma_dims(shape, operand)
    per_lane = len(regs) * 4 // dt.itemsize
    r_idx, c_idx = _wmma_slots(rows, cols, per_lane)
    stride_get = src(ctx, ins.operands[2], "u32") if len(ins.operands) > 2 else None
    g, _, off = address(ctx, addr_text)
    o = np.uint64(off)

    def wmma_mem(st, m):
        warps = _warps(st, m, ins.line)
        lead = np.broadcast_to(g(st), (st.n,))[warps[:, 0]] + o  # the warp's matrix address (uniform)
        stride = np.asarray(stride_get(st) if stride_get else (cols if layout == "row" else rows)).astype(np.int64)
        stride = np.broadcast_to(stride, (st.n,))[warps[:, 0]]
        elem = (r_idx * stride[:, None, None] + c_idx) if layout == "row" else (c_idx * stride[:, None, None] + r_idx)
        addr = (lead[:, None, None] + (elem * dt.itemsize).astype(np.uint64)).reshape(-1)
        thr = np.repeat(warps.reshape(-1), per_lane)
        mem, idx = _byte_index(st, ins.line, space, addr, thr, dt.itemsize)
        if mem is st.shared:
            st.races.access(idx, st.warp_bit[thr], not load, lambda r: st.where(ins.line, thr[r]))
        if load:
            words = mem[idx].reshape(warps.shape[0], 32, per_lane * dt.itemsize).view(np.uint32)
            _write_lanes(st, m, warps, regs, words)
        else:
            words = np.stack([np.broadcast_to(r(st), (st.n,))[warps] for r in regs], axis=-1).astype(np.uint32)
            mem[idx] = np.ascontiguousarray(words).view(np.uint8).reshape(idx.shape)
            if space in ("global", "generic") and st.last_buffer is not None and mem is st.last_buffer.data:
                st.last_buffer.written[idx] = True
    return wmma_mem


@op("wmma.mma")
def _wmma_mma(ctx, ins, parts):
    """wmma.mma.sync.aligned.alayout.blayout.shape.dtype.ctype d, a, b, c: D = A B + C, products exact, the
    sum in float64 rounded once (integers: exact, int32 wrap)."""
    shape = next(p for p in parts if p in _WMMA_SHAPES)
    m_, n_, k_ = _WMMA_SHAPES[shape]
    dtype, ctype = parts[-2], parts[-1]
    d_regs = [dest(ctx, t) for t in vector(ins.operands[0])]
    srcs = [[src(ctx, t, "b32") for t in vector(x)] for x in ins.operands[1:4]]
    atype = "f16" if dtype in ("f16", "f32") else "s8"
    specs = [(srcs[0], atype, m_, k_), (srcs[1], atype, k_, n_), (srcs[2], ctype, m_, n_)]

    def matrix(st, warps, regs, typ, rows, cols):
        dt = np.dtype(_WMMA_TYPES[typ])
        words = np.stack([np.broadcast_to(r(st), (st.n,))[warps] for r in regs], axis=-1).astype(np.uint32)
        vals = np.ascontiguousarray(words).view(dt).reshape(warps.shape[0], 32, -1)
        r_idx, c_idx = _wmma_slots(rows, cols, vals.shape[2])
        out = np.zeros((warps.shape[0], rows, cols), np.float64)
        out[:, r_idx, c_idx] = vals  # duplicated slots hold equal values
        return out

    def wmma_mma(st, m):
        warps = _warps(st, m, ins.line)
        a, b, c = (matrix(st, warps, *spec) for spec in specs)
        acc = a @ b + c
        dt = np.dtype(_WMMA_TYPES[dtype])
        res = acc.astype(np.int64).astype(np.uint64).astype(np.uint32).view(np.int32) if dt.kind == "i" \
            else acc.astype(dt)
        per_lane = len(d_regs) * 4 // dt.itemsize
        r_idx, c_idx = _wmma_slots(m_, n_, per_lane)
        _write_lanes(st, m, warps, d_regs,
                     np.ascontiguousarray(res[:, r_idx, c_idx]).view(np.uint32).reshape(warps.shape[0], 32, -1))
    return wmma_mma
