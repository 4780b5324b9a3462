"""CPU schedules of the W2A8 kernel (schedules/w2a8.py): int8 activations x 2-bit packed ternary weights.

Entry point: `schedule_w2a8_cpu(func, target)` for every PrimFunc with attr bmvcc.kernel == "w2a8".
The backend follows the target's features (select_backend): AVX-512 VNNI (vpdpbusd), AVX2
(vpmaddubsw), aarch64 dot product (sdot), else generic LLVM vector code; dot_intrinsics.py has them.

The reference compute has one block "acc" (dot product with the 2-bit decode inline) followed by
epilogue block(s) that read `acc` ("dequant", with the gelu/residual variants). The decode expression
cannot be tensorized, so the "acc" loop nest is replaced by explicit stages; the epilogue blocks are
kept as they are:

    qpad   qp[Mp, K4]  int8   = q zero-padded (inlined away when nothing is padded)
    rowsum rs[Mp]      int32  = sum_k qp                    (u8 backends only)
    decode wd[Np, K4]  u8/i8  = u = T + 1 (x86: u8 x s8 instructions) or T (sdot, generic)
    dot    accp[Mp,Np] int32  = (u8: -rs) + sum_k qp * wd   (exact int32 = sum_k q * T)
           avx2_i16: dot sums int16 acc16[Mp, C, Np, 2] per 256-k chunk (bound in dot_intrinsics.py),
           and "widen" adds the chunks into accp
    unpad  acc = accp[:M, :N], inlined into the epilogue

K4 = 4 * ceil(K / 4) covers the packed bytes (their padding codes are T = 0), rounded up to whole
chunks for avx2_i16; Mp, Np round M, N up to the micro tile so every tile is full and tensorizes.

Loop structure: parallel over strips of lanes * nt output features; per strip, `decode` fills a small
buffer (lanes * nt x K4 bytes, laid out [n // L, k // 4, n % L, k % 4], L = instruction lanes) that
all M rows reuse, so weights stay 2-bit in memory and only one strip per thread is ever decoded; then
per mr-row micro tile the k loop runs the intrinsic on mr x nt register accumulators, and the epilogue
runs on that tile right away.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from .w2a8 import KERNEL_ATTR


@dataclass(frozen=True)
class CpuKnobs:
    backend: str  # code variant: "vnni" | "avx2_i16" | "avx2_i32" | "sdot" | "generic"
    mr: int  # activation rows per micro tile
    nt: int  # instruction-wide lane groups per micro tile (tile width = lanes * nt)


# Per select_backend() answer. Micro tiles sized to the register files: accumulators mr * nt plus
# weight/broadcast registers. On AVX2 the int16 variant (vpmaddubsw + vpaddw, widened every 256 k)
# beat the int32 one (vpmaddubsw + vpmaddwd + vpaddd per step) by 1.3-1.7x at the FFN shapes.
DEFAULT_KNOBS = {
    "vnni": CpuKnobs("vnni", mr=4, nt=4),  # 16 of 32 zmm accumulate
    "avx2": CpuKnobs("avx2_i16", mr=4, nt=2),  # 8 of 16 ymm accumulate (int16, widened per chunk)
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


def intrin_of(backend: str):
    from . import dot_intrinsics as di

    return {"vnni": di.VNNI, "avx2_i32": di.AVX2, "avx2_i16": di.AVX2_I16, "sdot": di.SDOT,
            "generic": di.GENERIC}[backend]


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


def _decode(wp, vj, vk, padded, unsigned):
    """Decoded code of wp at (vj, vk), 0 in the padding beyond wp's N x 4 KP codes."""
    n, kp = wp.shape
    code = T.Cast("int32", T.bitwise_and(T.shift_right(wp[vj, vk // 4], T.Cast("uint8", (vk % 4) * 2)), T.uint8(3)))
    dtype = "uint8" if unsigned else "int8"
    val = T.Cast(dtype, code if unsigned else code - 1)
    conds = [c for c, e, p in ((vj < n, n, padded[0]), (vk < kp * 4, kp * 4, padded[1])) if int(e) != int(p)]
    if not conds:
        return val
    return T.if_then_else(conds[0] if len(conds) == 1 else T.And(*conds), val, T.Cast(dtype, 0))


def _acc_init(rs, vi, unsigned):
    return 0 - rs[vi] if unsigned else T.int32(0)


def _stages(q, wp, acc, mp: int, np_: int, unsigned: bool, chunk: int | None):
    """The replacement of the "acc" nest: (alloc buffers, loop nests) writing `acc` (see module doc)."""
    M, K = q.shape
    N, KP = wp.shape
    n_chunks = -(-int(KP) * 4 // chunk) if chunk else 1
    kc = _round_up(-(-int(KP) * 4 // n_chunks), 4)  # k per int16 chunk, multiple of 4
    Mp, Np, K4, C, KC = T.int64(mp), T.int64(np_), T.int64(n_chunks * kc if chunk else int(KP) * 4), \
        T.int64(n_chunks), T.int64(kc)
    wdt = "uint8" if unsigned else "int8"
    int16 = chunk is not None  # TVMScript's static if needs a bool
    TWO = T.int64(2)

    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def stages():
        qp = T.sblock_alloc_buffer((Mp, K4), "int8")
        rs = T.sblock_alloc_buffer((Mp,), "int32")
        wd = T.sblock_alloc_buffer((Np, K4), wdt)
        acc16 = T.sblock_alloc_buffer((Mp, C, Np, TWO), "int16")
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
                wd[vj, vk] = _decode(wp, vj, vk, (Np, K4), unsigned)
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
        for i, j in T.grid(M, N):
            with T.sblock("unpad"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.reads(accp[vi, vj])
                T.writes(acc[vi, vj])
                acc[vi, vj] = accp[vi, vj]

    root = stages.body.block
    used = ("qp", "rs", "wd", "accp") + (("acc16",) if chunk else ())
    return [b for b in root.alloc_buffers if b.name in used], list(root.body.seq)


def _restage(func, mp: int, np_: int, unsigned: bool, chunk: int | None):
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
    allocs, stages = _stages(q, wp, acc, mp, np_, unsigned, chunk)
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
    intrin = intrin_of(knobs.backend)
    lanes, unsigned = intrin.lanes, intrin.weight_dtype == "uint8"
    ref = s_tir.Schedule(func)
    acc_blk = ref.get(ref.get_sblock("acc"))
    m, k = (int(v) for v in acc_blk.reads[0].source.shape)
    n = int(acc_blk.reads[1].source.shape[0])
    mr = min(knobs.mr, m)
    mp, np_ = _round_up(m, mr), _round_up(n, lanes * knobs.nt)

    from .dot_intrinsics import I16_CHUNK_K  # registers the intrinsics (about 1 s), on first use only

    chunk = I16_CHUNK_K if knobs.backend == "avx2_i16" else None
    sch = s_tir.Schedule(_restage(func, mp, np_, unsigned, chunk))
    epilogue = _blocks_after(sch, "unpad")
    sch.compute_inline(sch.get_sblock("unpad"))
    if mp == m and 4 * -(-k // 4) == k and sch.get(sch.get_sblock("qpad")).writes[0].region[1].extent == k:
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
    # outer structure on the int32 accumulation (dot, or widen over int16 chunks):
    # parallel n strips (j0) > row micro tiles (i0) > k
    outer = sch.get_sblock("widen") if chunk else dot
    i, j, kk = sch.get_loops(outer)[:3]
    j0, j1, j2 = sch.split(j, [None, knobs.nt, lanes])
    i0, i1 = sch.split(i, [None, mr])
    if chunk:
        c, p = sch.get_loops(outer)[-2:]
        sch.reorder(j0, i0, c, i1, j1, j2, p)
    else:
        k0, k1 = sch.split(kk, [None, 4])
        sch.reorder(j0, i0, k0, i1, j1, j2, k1)
    sch.parallel(j0)
    # epilogue per micro tile, right after its accumulation: accp shrinks to one tile in L1
    for blk in epilogue:
        sch.reverse_compute_at(sch.get_sblock(blk), i0)
        if mp == m and np_ == n:
            sch.vectorize(sch.get_loops(sch.get_sblock(blk))[-1])
    if chunk:  # the int16 dot of one chunk for one micro tile, then widened into accp
        sch.compute_at(dot, c, preserve_unit_loops=True)
        di, dj, dc, dp, dkb, dk2 = sch.get_loops(dot)[-6:]  # dc: unit loop of the chunk
        dj0, dj1 = sch.split(dj, [None, lanes])
        sch.reorder(dc, dkb, di, dj0, dj1, dp, dk2)
        k0, i1, j1, j2 = dkb, di, dj0, dj1
        widen_init = sch.decompose_reduction(outer, c)
        sch.vectorize(sch.get_loops(widen_init)[-1])
        sch.unroll(sch.get_loops(outer)[-1])
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
