"""CPU schedules of the W2A8 kernel (schedules/w2a8.py): int8 activations x 2-bit packed ternary weights.

Entry point: `schedule_w2a8_cpu(func, target)` for every PrimFunc with attr bmvcc.kernel == "w2a8".

The reference compute has one block "acc" (dot product with the 2-bit decode inline) followed by
epilogue block(s) that read `acc`. The decode expression cannot be tensorized, so the "acc" loop
nest is replaced by explicit stages; the epilogue blocks are kept as they are:

    qpad   qp[Mp, K4]  int8   = q zero-padded (inlined away when Mp == M and K4 == K)
    rowsum rs[Mp]      int32  = sum_k qp                    (u8 backends only)
    decode wd[Np, K4]  u8/i8  = u = T + 1 (x86, u8 x s8 instructions) or T (aarch64 sdot, generic)
    dot    accp[Mp,Np] int32  = (u8: -rs) + sum_k qp * wd   (exact int32 = sum_k q * T)
    unpad  acc = accp[:M, :N], inlined into the epilogue, which runs per micro tile

K4 = 4 * ceil(K / 4) covers the packed bytes (padding codes are T = 0); Mp, Np round M, N up to the
micro tile so every tile is full and tensorizes. `decode` is computed per n tile (lanes * nt output
features x K4) inside the parallel loop, into a small buffer laid out [n // L, k // 4, n % L, k % 4]
(L = instruction lanes), and reused for all M rows: weights stay 2-bit in memory, the decoded copy
is one tile per thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from .w2a8 import KERNEL_ATTR


@dataclass(frozen=True)
class CpuKnobs:
    backend: str  # "vnni" | "avx2" | "sdot" | "generic"
    mr: int  # activation rows per micro tile
    nt: int  # instruction-wide lane groups per micro tile (tile width = lanes * nt)


# Micro tiles sized to the register files: accumulators mr * nt plus weight/broadcast registers.
DEFAULT_KNOBS = {
    "vnni": CpuKnobs("vnni", mr=4, nt=4),  # 16 of 32 zmm accumulate
    "avx2": CpuKnobs("avx2", mr=4, nt=2),  # 8 of 16 ymm accumulate
    "sdot": CpuKnobs("sdot", mr=4, nt=4),  # 16 of 32 q registers accumulate
    "generic": CpuKnobs("generic", mr=4, nt=2),
}


def select_backend(target) -> str:
    """The dot-product instruction the target has: vnni, avx2, sdot, or generic LLVM code."""
    from tvm.target import codegen

    with target:
        has = codegen.target_has_features
        if has("avx512vnni") and has("avx512bw"):
            return "vnni"
        if has("avx2"):
            return "avx2"
        if has("dotprod"):
            return "sdot"
    return "generic"


def _intrin(backend: str):
    from . import dot_intrinsics as di

    return {"vnni": di.VNNI, "avx2": di.AVX2, "sdot": di.SDOT, "generic": di.GENERIC}[backend]


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


def _decode(wp, vj, vk, n, np_, unsigned):
    code = T.Cast("int32", T.bitwise_and(T.shift_right(wp[vj, vk // 4], T.Cast("uint8", (vk % 4) * 2)), T.uint8(3)))
    dtype = "uint8" if unsigned else "int8"
    val = T.Cast(dtype, code if unsigned else code - 1)
    return val if int(np_) == int(n) else T.if_then_else(vj < n, val, T.Cast(dtype, 0))


def _acc_init(rs, vi, unsigned):
    return 0 - rs[vi] if unsigned else T.int32(0)


def _stages(q, wp, acc, mp: int, np_: int, unsigned: bool):
    """The replacement of the "acc" nest: (alloc buffers, loop nests) writing `acc` (see module doc)."""
    M, K = q.shape
    N, KP = wp.shape
    Mp, Np, K4 = T.int64(mp), T.int64(np_), KP * 4
    wdt = "uint8" if unsigned else "int8"

    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def stages():
        qp = T.sblock_alloc_buffer((Mp, K4), "int8")
        rs = T.sblock_alloc_buffer((Mp,), "int32")
        wd = T.sblock_alloc_buffer((Np, K4), wdt)
        accp = T.sblock_alloc_buffer((Mp, Np), "int32")
        for i, k in T.grid(Mp, K4):
            with T.sblock("qpad"):
                vi, vk = T.axis.remap("SS", [i, k])
                T.reads(q[vi, vk])
                T.writes(qp[vi, vk])
                qp[vi, vk] = _guarded(q, (vi, vk), (M, K), (Mp, K4))
        for j, k in T.grid(Np, K4):
            with T.sblock("decode"):
                vj, vk = T.axis.remap("SS", [j, k])
                T.reads(wp[vj, vk // 4])
                T.writes(wd[vj, vk])
                wd[vj, vk] = _decode(wp, vj, vk, N, Np, unsigned)
        if unsigned:
            for i, k in T.grid(Mp, K4):
                with T.sblock("rowsum"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    T.reads(qp[vi, vk])
                    T.writes(rs[vi])
                    with T.init():
                        rs[vi] = 0
                    rs[vi] = rs[vi] + T.Cast("int32", qp[vi, vk])
        for i, j, k in T.grid(Mp, Np, K4):
            with T.sblock("dot"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                T.reads(qp[vi, vk], wd[vj, vk], rs[vi])
                T.writes(accp[vi, vj])
                with T.init():
                    accp[vi, vj] = _acc_init(rs, vi, unsigned)
                accp[vi, vj] = accp[vi, vj] + T.Cast("int32", qp[vi, vk]) * T.Cast("int32", wd[vj, vk])
        for i, j in T.grid(M, N):
            with T.sblock("unpad"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.reads(accp[vi, vj])
                T.writes(acc[vi, vj])
                acc[vi, vj] = accp[vi, vj]

    root = stages.body.block
    return list(root.alloc_buffers), list(root.body.seq)


def _restage(func, mp: int, np_: int, unsigned: bool):
    """func with its "acc" loop nest replaced by the explicit stages (epilogue nests untouched)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    acc_block = sch.get(sch.get_sblock("acc"))
    q, wp = (r.source for r in acc_block.reads)
    acc = acc_block.writes[0].source
    acc_nest = sch.get(sch.get_loops(sch.get_sblock("acc"))[0])
    root = func.body.block
    nests = list(root.body.seq)
    pos = next(i for i, s in enumerate(nests) if s.same_as(acc_nest))
    allocs, stages = _stages(q, wp, acc, mp, np_, unsigned)
    body = tirx.SeqStmt(nests[:pos] + stages + nests[pos + 1:])
    new_root = s_tir.SBlock([], [], [], "root", body, alloc_buffers=list(root.alloc_buffers) + allocs)
    return func.with_body(s_tir.SBlockRealize([], True, new_root))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def schedule_w2a8_cpu(func, target, knobs: CpuKnobs | None = None):
    """Schedule one W2A8 PrimFunc for a CPU target; returns it marked tirx.is_scheduled."""
    from tvm import s_tir

    if func.attrs is None or func.attrs.get(KERNEL_ATTR) != "w2a8":
        raise ValueError(f"schedule_w2a8_cpu expects a PrimFunc with attr {KERNEL_ATTR}='w2a8'")
    knobs = knobs or DEFAULT_KNOBS[select_backend(target)]
    intrin = _intrin(knobs.backend)
    lanes, unsigned = intrin.lanes, intrin.weight_dtype == "uint8"
    ref = s_tir.Schedule(func)
    acc_blk = ref.get(ref.get_sblock("acc"))
    m, k = (int(v) for v in acc_blk.reads[0].source.shape)
    n = int(acc_blk.reads[1].source.shape[0])
    mr = min(knobs.mr, m)
    mp, np_ = _round_up(m, mr), _round_up(n, lanes * knobs.nt)

    sch = s_tir.Schedule(_restage(func, mp, np_, unsigned))
    epilogue = _blocks_after(sch, "unpad")
    sch.compute_inline(sch.get_sblock("unpad"))
    if mp == m and 4 * -(-k // 4) == k:
        sch.compute_inline(sch.get_sblock("qpad"))
    else:
        sch.parallel(sch.get_loops(sch.get_sblock("qpad"))[0])
    if unsigned:
        sch.parallel(sch.get_loops(sch.get_sblock("rowsum"))[0])

    dot, decode = sch.get_sblock("dot"), sch.get_sblock("decode")
    # wd tile order: one instruction's weight operand (lanes x 4, or 4 x lanes when k-major) is contiguous
    if intrin.k_major:
        sch.transform_layout(dot, "wd", lambda j, kk: (j // lanes, kk // 4, kk % 4, j % lanes))
    else:
        sch.transform_layout(dot, "wd", lambda j, kk: (j // lanes, kk // 4, j % lanes, kk % 4))
    i, j, kk = sch.get_loops(dot)
    j0, j1, j2 = sch.split(j, [None, knobs.nt, lanes])
    i0, i1 = sch.split(i, [None, mr])
    k0, k1 = sch.split(kk, [None, 4])
    sch.reorder(j0, i0, k0, i1, j1, j2, k1)
    sch.parallel(j0)
    # epilogue per micro tile, right after its accumulation: accp shrinks to one tile in L1
    for blk in epilogue:
        sch.reverse_compute_at(sch.get_sblock(blk), i0)
        if mp == m and np_ == n:
            sch.vectorize(sch.get_loops(sch.get_sblock(blk))[-1])
    sch.compute_at(decode, j0)  # one decoded tile (lanes * nt features x K4) per parallel iteration
    dj, dk = sch.get_loops(decode)[-2:]
    dk0, dk1 = sch.split(dk, [None, 4])
    dj0, dj1 = sch.split(dj, [None, lanes])
    sch.reorder(dj0, dk0, *((dk1, dj1) if intrin.k_major else (dj1, dk1)))
    init = sch.decompose_reduction(dot, k0)
    # rs is read by the init only (u8: acc starts at -rowsum); the update must match the intrinsic
    reads = [r.source.name for r in sch.get(dot).reads]
    if "rs" in reads:
        sch.unsafe_hide_buffer_access(dot, "read", [reads.index("rs")])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j2, intrin.name)
    sch.unroll(i1)
    sch.unroll(j1)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _blocks_after(sch, name: str) -> list[str]:
    """Names of the root-level blocks whose nests follow the nest of block `name` (the epilogue)."""
    root = sch.mod["main"].body.block
    names, seen = [], False
    for nest in root.body.seq:
        blocks = []

        def visit(node, out=blocks):
            from tvm import s_tir

            if isinstance(node, s_tir.SBlock):
                out.append(node.name_hint)

        _post_order(nest, visit)
        if seen:
            names += blocks
        seen = seen or name in blocks
    return names


def _post_order(stmt, fvisit):
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        _post_order(stmt.body, fvisit)
    elif isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _post_order(s, fvisit)
    elif isinstance(stmt, s_tir.SBlockRealize):
        _post_order(stmt.block.body, fvisit)
        fvisit(stmt.block)
