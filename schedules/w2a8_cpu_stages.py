"""The explicit stages of the W2A8 CPU kernel: its "acc" nest rewritten for tensorization.

`restage(func, Mp, Np, unsigned, chunk)` matches a W2A8 PrimFunc (schedules/w2a8.py: block "acc", the
dot product with the 2-bit decode inline, then epilogue block(s) reading `acc`) and produces the same
function with the "acc" nest replaced by these stages (the epilogue nests are kept as they are):

    qpad   qp[Mp, K4]  int8   = q zero-padded (inlined away when nothing is padded)
    rowsum rs[Mp]      int32  = sum_k qp                    (u8 backends only)
    decode wd[Np, K4]  u8/i8  = u = T + 1 (x86: u8 x s8 instructions) or T (sdot, generic)
    dot    accp[Mp,Np] int32  = (u8: -rs) + sum_k qp * wd   (exact int32 = sum_k q * T)
           avx2_i16: dot sums int16 acc16[Mp, C, Np, 2] per `chunk` k (bound in dot_intrinsics.py),
           and "widen" adds the chunks into accp
    unpad  acc = accp[:M, :N]

K4 = 4 * ceil(K / 4) covers the packed bytes (their padding codes are T = 0), rounded up to whole
chunks for avx2_i16; Mp >= M and Np >= N are the padded extents the schedule tiles (w2a8_cpu.py).
The decode expression cannot be tensorized, hence a rewrite and not schedule primitives; the
result is what MetaSchedule tunes and what every CPU schedule of the kernel starts from.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .w2a8 import packed_code


def _guarded(buf, idx, extents, padded):
    """buf[idx], or 0 where an index lies in the padding (extent < padded extent)."""
    conds = [i < e for i, e, p in zip(idx, extents, padded) if int(p) != int(e)]
    val = buf[tuple(idx)]
    if not conds:
        return val
    cond = conds[0]
    for c in conds[1:]:
        cond = T.And(cond, c)
    return T.if_then_else(cond, val, T.Cast(buf.dtype, 0))


def decoded_weight(wp, vj, vk, padded, unsigned):
    """Decoded code of wp at (vj, vk), 0 in the padding beyond wp's N x 4 KP codes."""
    n, kp = wp.shape
    code = packed_code(wp[vj, vk // 4], (vk % 4) * 2)
    dtype = "uint8" if unsigned else "int8"
    val = T.Cast(dtype, code if unsigned else code - 1)
    conds = [c for c, e, p in ((vj < n, n, padded[0]), (vk < kp * 4, kp * 4, padded[1])) if int(e) != int(p)]
    if not conds:
        return val
    return T.if_then_else(conds[0] if len(conds) == 1 else T.And(*conds), val, T.Cast(dtype, 0))


def qpad_macro():
    """A T.macro qpad(q, qp) writing the "qpad" nest, qp = q zero-padded to qp's extents; a new one for each
    function parsed (TVMScript suffixes the block names of a macro's later uses: "qpad_1")."""

    @T.macro
    def qpad(q, qp):
        for i, k in T.grid(*qp.shape):
            with T.sblock("qpad"):
                vi, vk = T.axis.remap("SS", [i, k])
                T.reads(q[vi, vk])
                T.writes(qp[vi, vk])
                qp[vi, vk] = _guarded(q, (vi, vk), q.shape, qp.shape)

    return qpad


def _acc_init(rs, vi, unsigned):
    return 0 - rs[vi] if unsigned else T.int32(0)


def _stages(q, wp, mp: int, np_: int, unsigned: bool, chunk: int | None):
    """The replacement of the "acc" nest: (alloc buffers, loop nests, accp: the padded int32 accumulators they
    write; see module doc)."""
    KP = wp.shape[1]
    n_chunks = -(-int(KP) * 4 // chunk) if chunk else 1
    kc = round_up(-(-int(KP) * 4 // n_chunks), 4)  # k per int16 chunk, multiple of 4
    Mp, Np, K4, C, KC = T.int64(mp), T.int64(np_), T.int64(n_chunks * kc if chunk else int(KP) * 4), \
        T.int64(n_chunks), T.int64(kc)
    wdt = "uint8" if unsigned else "int8"
    int16 = chunk is not None  # TVMScript's static if needs a bool
    TWO = T.int64(2)
    qpad = qpad_macro()

    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def stages():
        qp = T.sblock_alloc_buffer((Mp, K4), "int8")
        rs = T.sblock_alloc_buffer((Mp,), "int32")
        wd = T.sblock_alloc_buffer((Np, K4), wdt)
        acc16 = T.sblock_alloc_buffer((Mp, C, Np, TWO), "int16")
        accp = T.sblock_alloc_buffer((Mp, Np), "int32")
        qpad(q, qp)
        for j, k in T.grid(Np, K4):
            with T.sblock("decode"):
                vj, vk = T.axis.remap("SS", [j, k])
                T.reads(wp[vj, vk // 4])
                T.writes(wd[vj, vk])
                wd[vj, vk] = decoded_weight(wp, vj, vk, (Np, K4), unsigned)
        if unsigned:
            for i, k in T.grid(Mp, K4):
                with T.sblock("rowsum"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    T.reads(qp[vi, vk])
                    T.writes(rs[vi])
                    with T.init():
                        rs[vi] = 0
                    rs[vi] = rs[vi] + T.Cast("int32", qp[vi, vk])
        if int16:  # int16 partial sums per (chunk c, pair p), widened to int32 per chunk
            for i, j, c, p, kb, k2 in T.grid(Mp, Np, C, TWO, KC // 4, TWO):
                with T.sblock("dot"):
                    vi, vj, vc, vp, vkb, vk2 = T.axis.remap("SSSSRR", [i, j, c, p, kb, k2])
                    T.reads(qp[vi, vc * KC + vkb * 4 + vp * 2 + vk2], wd[vj, vc * KC + vkb * 4 + vp * 2 + vk2])
                    T.writes(acc16[vi, vc, vj, vp])
                    with T.init():
                        acc16[vi, vc, vj, vp] = T.int16(0)
                    acc16[vi, vc, vj, vp] = acc16[vi, vc, vj, vp] + T.Cast(
                        "int16", qp[vi, vc * KC + vkb * 4 + vp * 2 + vk2]) * T.Cast(
                        "int16", wd[vj, vc * KC + vkb * 4 + vp * 2 + vk2])
            for i, j, c, p in T.grid(Mp, Np, C, TWO):
                with T.sblock("widen"):
                    vi, vj, vc, vp = T.axis.remap("SSRR", [i, j, c, p])
                    T.reads(acc16[vi, vc, vj, vp], rs[vi])
                    T.writes(accp[vi, vj])
                    with T.init():
                        accp[vi, vj] = _acc_init(rs, vi, unsigned)
                    accp[vi, vj] = accp[vi, vj] + T.Cast("int32", acc16[vi, vc, vj, vp])
        else:
            for i, j, k in T.grid(Mp, Np, K4):
                with T.sblock("dot"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    T.reads(qp[vi, vk], wd[vj, vk], rs[vi])
                    T.writes(accp[vi, vj])
                    with T.init():
                        accp[vi, vj] = _acc_init(rs, vi, unsigned)
                    accp[vi, vj] = accp[vi, vj] + T.Cast("int32", qp[vi, vk]) * T.Cast("int32", wd[vj, vk])
    root = stages.body.block
    used = ("qp", "rs", "wd", "accp") + (("acc16",) if chunk else ())
    allocs = [b for b in root.alloc_buffers if b.name in used]
    return allocs, list(root.body.seq), next(b for b in allocs if b.name == "accp")


def restage(func, mp: int, np_: int, unsigned: bool, chunk: int | None):
    """func with its "acc" loop nest replaced by the explicit stages (epilogue nests untouched)."""
    return replace_acc_nest(func, lambda q, wp: _stages(q, wp, mp, np_, unsigned, chunk))


def replace_acc_nest(func, make_stages):
    """func with its "acc" loop nest replaced by make_stages(q, wp) -> (alloc buffers, loop nests, accp) and
    the "unpad" nest copying accp[:M, :N] (padded accumulators) to acc."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    acc_block = sch.get(sch.get_sblock("acc"))
    q, wp = (r.source for r in acc_block.reads)
    acc = acc_block.writes[0].source
    acc_nest = sch.get(sch.get_loops(sch.get_sblock("acc"))[0])
    root = func.body.block
    nests = list(root.body.seq)
    pos = next(i for i, s in enumerate(nests) if s.same_as(acc_nest))
    allocs, stages, accp = make_stages(q, wp)
    body = tirx.SeqStmt(nests[:pos] + stages + [_unpad(accp, acc)] + nests[pos + 1:])
    new_root = s_tir.SBlock([], [], [], "root", body, alloc_buffers=list(root.alloc_buffers) + allocs)
    return func.with_body(s_tir.SBlockRealize([], True, new_root))


def _unpad(accp, acc):
    M, N = acc.shape

    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def nest():
        for i, j in T.grid(M, N):
            with T.sblock("unpad"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.reads(accp[vi, vj])
                T.writes(acc[vi, vj])
                acc[vi, vj] = accp[vi, vj]

    return nest.body.block.body


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m
