"""Loads, stores and cp.async (PTX ISA 8.5 §9.7.9.8-9.7.9.9, §9.7.9.25).

Every access is checked: it must lie inside one global buffer / the CTA's shared memory / the thread's local
memory and be aligned to its size; otherwise EmulationError names kernel, PTX line, CTA and thread.
Shared and global accesses feed the race detectors (races.py); the active lanes of one generic access must
all address one state space. cp.async reads its source at issue (the operands are
not written during a kernel) and writes shared memory only when a `cp.async.wait_group N` / `wait_all`
completes its commit group, so a kernel that waits too little reads the old bytes.
"""

from __future__ import annotations

import numpy as np

from .machine import DTYPES, EmulationError, active, write
from .ops import address, dest, op, src, vector
from .ops_int import LOCAL_GENERIC, SHARED_GENERIC

_SPACES = ("param", "global", "shared", "local", "const")


def _parse(parts):
    space = next((p for p in parts[1:] if p in _SPACES), "generic")
    nvec = next((int(p[1:]) for p in parts[1:] if p in ("v2", "v4", "v8")), 1)
    return space, nvec, parts[-1]


def _byte_index(st, line, space, addr, rows, nbytes):
    """(memory array, flat byte indices [n, nbytes]) of an access by thread indices `rows` at addresses `addr`."""
    width = np.arange(nbytes, dtype=np.int64)
    if space == "generic":
        a0 = int(addr.min()) if addr.size else 0
        space = "shared" if SHARED_GENERIC <= a0 < LOCAL_GENERIC else "local" if a0 >= LOCAL_GENERIC else "global"
        if space != "global":
            addr = addr - np.uint64(SHARED_GENERIC if space == "shared" else LOCAL_GENERIC)
    if space == "global":
        hit = st.memory.locate(addr, nbytes)
        if hit is None:
            for i, a in enumerate(addr):
                if st.memory.locate(a[None], nbytes) is None:
                    st.fail(line, rows[i], f"out-of-bounds global access of {nbytes} bytes at {int(a):#x}")
            raise EmulationError(f"one access of several global buffers (PTX line {line}) is not emulated; "
                                 "add it to bmvcc/ptx")
        buf, off = hit
        _aligned(st, line, rows, off, nbytes)
        st.last_buffer = buf  # the global buffer of this access
        return buf.data, off[:, None] + width
    if space in ("shared", "local"):
        size = st.shared_size if space == "shared" else st.ctx.local_bytes
        off = addr.astype(np.int64)
        bad = (off < 0) | (off + nbytes > size)
        if bad.any():
            i = int(np.argmax(bad))
            st.fail(line, rows[i], f"out-of-bounds {space} access of {nbytes} bytes at offset {int(off[i])} "
                                   f"(the {space} window has {size} bytes)")
        _aligned(st, line, rows, off, nbytes)
        base = st.cta_of[rows] * size if space == "shared" else rows * size
        return (st.shared if space == "shared" else st.local), (base + off)[:, None] + width
    if space == "param":
        off = addr.astype(np.int64)
        if ((off < 0) | (off + nbytes > st.params.size)).any():
            st.fail(line, rows[0], f"out-of-bounds .param access of {nbytes} bytes at offset {int(off.max())}")
        return st.params, off[:, None] + width
    raise EmulationError(f"the emulator has no .{space} state space (PTX line {line}); add it to bmvcc/ptx")


def _aligned(st, line, rows, off, nbytes):
    bad = off % min(nbytes & -nbytes, 16) != 0  # natural alignment (vectors: their whole size)
    if bad.any():
        i = int(np.argmax(bad))
        st.fail(line, rows[i], f"misaligned access of {nbytes} bytes at offset {int(off[i])}")


def _addr_getter(ctx, text, space):
    g, sym, off = address(ctx, text)
    if g is not None:
        o = np.uint64(off % (1 << 64))
        return lambda st: np.broadcast_to(g(st), (st.n,)) + o
    if space == "param":
        base = ctx.param_offsets[sym] + off
    elif sym in ctx.shared_offsets:
        base = ctx.shared_offsets[sym] + off
    elif sym in ctx.local_offsets:
        base = ctx.local_offsets[sym] + off
    else:
        raise ValueError(f"unknown symbol {sym}")
    c = np.uint64(base)
    return lambda st: np.full(st.n, c, np.uint64)


def access(st, line, space, addr_all, m, nbytes, new=None):
    """(memory, flat byte indices, thread indices) of the active threads' load, or store of the bytes `new`
    ([threads, nbytes]: a function of the thread indices); shared and global accesses are race-checked."""
    rows = active(st, m)
    addr = addr_all if m is None else addr_all[rows]
    mem, idx = _byte_index(st, line, space, addr, rows, nbytes)
    data = None if new is None else new(rows)
    if mem is st.shared:
        st.races.access(idx, st.warp_bit[rows], new is not None, lambda r: st.where(line, rows[r]))
    elif st.last_buffer is not None and mem is st.last_buffer.data:
        st.global_races.access(mem, idx, st.thread_id[rows], st.epoch[st.cta_of[rows]], data,
                               lambda r: st.where(line, rows[r]))
        if data is not None:
            st.last_buffer.written[idx] = True
    if data is not None:
        mem[idx] = data
    return mem, idx, rows


@op("ld")
def _ld(ctx, ins, parts):
    space, nvec, typ = _parse(parts)
    dt = np.dtype(DTYPES[typ])
    outs = [dest(ctx, t) for t in vector(ins.operands[0])]
    addr = _addr_getter(ctx, ins.operands[1], space)
    nbytes = dt.itemsize * nvec

    def ld(st, m):
        mem, idx, rows = access(st, ins.line, space, addr(st), m, nbytes)
        vals = mem[idx].view(dt)  # [n, nvec]
        for i, o in enumerate(outs):
            if o is None:
                continue
            if m is None:
                write(st, o, vals[:, i], None)
            else:
                full = np.zeros(st.n, dt)
                full[rows] = vals[:, i]
                write(st, o, full, m)
    return ld


@op("st")
def _st(ctx, ins, parts):
    space, nvec, typ = _parse(parts)
    dt = np.dtype(DTYPES[typ])
    addr = _addr_getter(ctx, ins.operands[0], space)
    vals = [src(ctx, t, typ) for t in vector(ins.operands[1])]
    nbytes = dt.itemsize * nvec

    def st_(st, m):
        def data(rows):
            words = np.stack([np.broadcast_to(v(st), (st.n,))[rows] for v in vals], axis=1).astype(dt)
            return words.view(np.uint8).reshape(rows.size, nbytes)
        access(st, ins.line, space, addr(st), m, nbytes, new=data)
    return st_


@op("cp.async.ca", "cp.async.cg")
def _cp_async(ctx, ins, parts):
    """cp.async.{ca,cg}.shared.global [dst], [src], cp-size[, src-size | ignore-src][, cache-policy]: bytes past
    src-size are zero; a true ignore-src predicate copies zeros."""
    dst = _addr_getter(ctx, ins.operands[0], "shared")
    srca = _addr_getter(ctx, ins.operands[1], "global")
    size = int(ins.operands[2])
    extra = ins.operands[3:len(ins.operands) - ("L2::cache_hint" in ins.opcode)]
    src_size = None
    if extra and ctx.kernel.registers.get(extra[0].lstrip("!")) == "pred":
        ignore = src(ctx, extra[0], "pred")
        src_size = lambda st: np.where(ignore(st), np.uint32(0), np.uint32(size))  # noqa: E731
    elif extra:
        src_size = src(ctx, extra[0], "u32")
    if size not in (4, 8, 16):
        raise ValueError(f"cp.async size {size}")

    def cp(st, m):
        rows = active(st, m)
        d = dst(st) if m is None else dst(st)[rows]
        _, didx = _byte_index(st, ins.line, "shared", d, rows, size)
        n_src = np.full(rows.size, size) if src_size is None else \
            np.broadcast_to(src_size(st), (st.n,))[rows].astype(np.int64)
        data = np.zeros((rows.size, size), np.uint8)
        s = srca(st) if m is None else srca(st)[rows]
        for nb in np.unique(n_src):  # reads of src-size bytes (none for 0)
            sel = np.nonzero(n_src == nb)[0]
            if nb > 0:
                mem, sidx = _byte_index(st, ins.line, "global", s[sel], rows[sel], int(nb))
                data[sel, :nb] = mem[sidx]
        bits = st.warp_bit[rows]
        st.races.issue_async(didx, bits, lambda r: st.where(ins.line, rows[r]))
        st.async_open.append((didx, data, bits))
    return cp


@op("cp.async.commit_group")
def _commit(ctx, ins, parts):
    def commit(st, m):
        st.async_groups.append(st.async_open)
        st.async_open = []
    return commit


def _land(st, groups):
    for group in groups:
        for didx, data, bits in group:
            st.shared[didx] = data
            st.races.land_async(didx, bits)


@op("cp.async.wait_group", "cp.async.wait_all")
def _wait(ctx, ins, parts):
    """wait_group N: every commit group but the N most recent has landed; wait_all: all, uncommitted too."""
    keep = int(ins.operands[0]) if parts[2] == "wait_group" else 0

    def wait(st, m):
        if parts[2] == "wait_all":
            st.async_groups.append(st.async_open)
            st.async_open = []
        n_done = max(len(st.async_groups) - keep, 0)
        _land(st, st.async_groups[:n_done])
        del st.async_groups[:n_done]
    return wait
