"""matmul: C[b.., i, j] = sum_k A * B, with fused spatial prologue/epilogue (Linear layers, the batched
attention matmuls): register tile MR x (NV vectors) accumulated in a local buffer, k directly outside the tile,
row blocks sized for L2 and small enough that (batch, row block, column strip), the parallel loop, has a task
for every core (where M allows), B packed per call into contiguous column strips. bf16 operands with an fp32
accumulator (passes/bf16_matmuls.py) on a CPU with vdpbf16ps: B packed with pairs of k interleaved per column,
the register tile's columns tensorized with schedules/bf16_intrinsics.py."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

from .. import bf16_intrinsics
from ..intrinsics import ensure
from .common import (MIN_PARALLEL_WORK, CpuFacts, has_root, is_reduction, product, schedule_spatial_block,
                     trivially_bound, try_primitive)

A_BLOCK_BYTES = 128 * 1024  # budget for the A row block (MC x K) reused across column strips: half a small L2
MAX_ROW_BLOCK = 256


def apply(func, target) -> s_tir.Schedule | None:
    return _matmul_rule(func, CpuFacts.of(target))


@dataclass(frozen=True)
class _Matmul:
    block: object  # SBlockRV of the reduction block
    batch: list  # LoopRVs of the leading spatial axes
    i: object
    j: object
    k: object
    m: int
    n: int
    k_extent: int
    dtype: str  # accumulator dtype
    a_bytes: int  # element size of the operand indexed by (i, k)
    contiguous_j: bool  # one operand is read at [..., j] (stride 1), so j vectorizes
    b_buffer: object  # the column operand's buffer when it is read at [..., k, j] (packable), else None
    bf16: bool  # both operands bfloat16 (the accumulator is then float32)


def _matmul_rule(func, facts: CpuFacts):
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if has_root(sch) else []
    reductions = [b for b in blocks if is_reduction(sch.get(b))]
    if len(reductions) != 1:
        return None
    mm = _analyze_matmul(sch, reductions[0])
    if mm is None:
        return None
    at = blocks.index(reductions[0])
    pair = bf16_intrinsics.PAIR if _dot_bf16(mm, facts) else 1  # k values per vdpbf16ps lane, or plain FMAs
    if pair == 1:  # vdpbf16ps reads A's pairs from a bf16 buffer: a prologue stays a block of its own
        for b in blocks[:at]:  # spatial prologue (e.g. a fused reshape of A)
            try_primitive(sch.compute_inline, b)
    for b in blocks[at + 1 : -1]:  # epilogue DAG (gelu reads x twice) folds into its last block
        try_primitive(sch.compute_inline, b)
    _tile_matmul(sch, mm, facts, pair)
    return sch


def _analyze_matmul(sch, block) -> _Matmul | None:
    """A _Matmul if `block` is C[s_0..s_n] += X * Y over one reduction axis with a trivial loop binding."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not trivially_bound(sch, block):
        return None
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds[-1] != tirx.IterVar.CommReduce or kinds[:-1] != [tirx.IterVar.DataPar] * (len(kinds) - 1) or len(kinds) < 3:
        return None
    extents = [iv.dom.extent for iv in stmt.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    spatial = [iv.var for iv in stmt.iter_vars[:-1]]
    k_var = stmt.iter_vars[-1].var
    store = stmt.body
    if not isinstance(store, tirx.BufferStore) or len(store.indices) != len(spatial):
        return None
    if not all(idx.same_as(v) for idx, v in zip(store.indices, spatial)):
        return None
    value = store.value
    if not isinstance(value, tirx.Add) or not _is_load_of(value.a, store):
        return None
    if not isinstance(value.b, tirx.Mul):
        return None
    x, y = _strip_cast(value.b.a), _strip_cast(value.b.b)
    if not isinstance(x, tvm.ir.TensorLoad) or not isinstance(y, tvm.ir.TensorLoad):
        return None
    j_var, i_var = spatial[-1], spatial[-2]
    if not (_uses(x, k_var) and _uses(y, k_var)):
        return None
    # the row operand (A) depends on i and not on j; the column operand on j and not on i
    a, b = (x, y) if (_uses(x, i_var) and not _uses(x, j_var)) else (y, x)
    if _uses(a, j_var) or _uses(b, i_var) or not _uses(b, j_var):
        return None
    contiguous_j = b.indices[-1].same_as(j_var)
    packable = contiguous_j and len(b.indices) >= 2 and b.indices[-2].same_as(k_var)
    return _Matmul(block, loops[:-3], loops[-3], loops[-2], loops[-1], int(extents[-3]), int(extents[-2]),
                   int(extents[-1]), store.buffer.dtype, tvm.DataType(a.source.dtype).bits // 8, contiguous_j,
                   b.source if packable else None, a.source.dtype == b.source.dtype == "bfloat16")


def _register_tile(m: int, n: int, lanes: int, registers: int, contiguous_j: bool) -> tuple[int, int, int]:
    """(MR, NV, NR): MR rows x NV vectors of `lanes` accumulators, NR = NV * lanes columns.

    MR * NV accumulators + NV column vectors + 1 broadcast must fit the vector registers; the tile
    must divide the matrix (no partial tiles: predicates would block unrolling and vectorization).
    Among fitting tiles: most accumulators first (hides FMA latency), then fewest loads per FMA.
    """
    rows = [r for r in (8, 6, 4, 3, 2, 1) if m % r == 0]
    if contiguous_j and n % lanes == 0:
        fits = [(r, v) for r in rows for v in (4, 3, 2, 1)
                if n % (v * lanes) == 0 and r * v + v + 1 <= registers]
        r, v = min(fits, key=lambda t: (-t[0] * t[1], t[0] + t[1], -t[1]))
        return r, v, v * lanes
    # scalar columns: a small unrolled tile (strided or narrow B, e.g. the 9-class head)
    cols = max(c for c in range(1, min(n, lanes) + 1) if n % c == 0)
    return max(r for r in rows if r <= 4), 0, cols


def _row_block(m: int, k: int, mr: int, a_bytes: int, strips: int, cores: int) -> int:
    """MC: rows of A kept in L2 while the column strips stream past (a multiple of MR dividing M),
    the largest that still gives each of `cores` threads a task: strips x M / MC >= cores (`strips`:
    batch x column strips), or MR where even that gives fewer (e.g. one register tile covers N)."""
    fits = [mc for mc in range(mr, min(m, MAX_ROW_BLOCK) + 1, mr) if m % mc == 0 and mc * k * a_bytes <= A_BLOCK_BYTES]
    busy = [mc for mc in fits if strips * (m // mc) >= cores]
    return max(busy) if busy else mr


def _dot_bf16(mm: _Matmul, facts: CpuFacts) -> bool:
    """Whether the register tile runs on vdpbf16ps: bf16 operands, packable B, whole vectors and pairs of k
    (a CPU with it has 512-bit registers: bf16_intrinsics.LANES float32 lanes)."""
    return (facts.bf16_dot and mm.bf16 and mm.dtype == "float32" and mm.b_buffer is not None
            and mm.n % bf16_intrinsics.LANES == 0 and mm.k_extent % bf16_intrinsics.PAIR == 0)


def _tile_matmul(sch, mm: _Matmul, facts: CpuFacts, pair: int) -> None:
    """`pair`: k values per lane of the register tile's instruction (bf16_intrinsics.PAIR on vdpbf16ps, else 1)."""
    lanes = facts.lanes(mm.dtype)
    mr, nv, nr = _register_tile(mm.m, mm.n, lanes, facts.vector_registers, mm.contiguous_j)
    strips = product(sch.get(lp).extent for lp in mm.batch) * (mm.n // nr)
    mc = _row_block(mm.m, mm.k_extent, mr, mm.a_bytes, strips, facts.cores)
    if nv and mm.b_buffer is not None and (mm.n > nr or pair > 1):  # vdpbf16ps needs the pairs interleaved
        _pack_columns(sch, mm, nr, pair)
    i0, i1, i2 = sch.split(mm.i, [None, mc // mr, mr])
    if nv:
        j1, j2, j3 = sch.split(mm.j, [None, nv, lanes])
        inner_j = [j2, j3]
    else:
        j1, j3 = sch.split(mm.j, [None, nr])
        inner_j = [j3]
    k, k_pair = sch.split(mm.k, [None, pair]) if pair > 1 else (mm.k, None)
    # loop nest: (batch, row block, column strip) parallel | row tile | k (/ pair) | MR x NV x lanes register tile
    # (x pair: the intrinsic's)
    sch.reorder(*mm.batch, i0, j1, i1, k, i2, *inner_j, *([k_pair] if k_pair else []))
    outer = sch.fuse(*mm.batch, i0, j1)
    if mm.m * mm.n >= MIN_PARALLEL_WORK:
        sch.parallel(outer)
    acc = sch.cache_write(mm.block, 0, "local")
    sch.reverse_compute_at(acc, i1, preserve_unit_loops=True)
    _inline_epilogue(sch, acc, facts)
    sch.unroll(i2)
    if nv:
        sch.unroll(j2)
        if pair == 1:
            sch.vectorize(j3)
    else:
        sch.unroll(j3)
    # after the loop kinds: vectorizing the update of a decomposed reduction is rejected
    init = sch.decompose_reduction(mm.block, k)
    if pair > 1:
        sch.tensorize(j3, ensure(bf16_intrinsics.NAME))
    _tile_inner(sch, sch.get_loops(init)[-2:], lanes if nv else 0)
    _tile_inner(sch, sch.get_loops(acc)[-2:], lanes if nv else 0)


def _pack_columns(sch, mm: _Matmul, nr: int, pair: int) -> None:
    """Copy B[..., k, j] once per call into Bp[..., j // NR, k, j % NR]: each NR-column strip the
    register tile streams becomes contiguous (no TLB-hostile row stride, one prefetch stream). pair > 1
    (vdpbf16ps): Bp[..., j // NR, k // pair, j % NR, k % pair], each column's pair of k adjacent."""
    reads = sch.get(mm.block).reads
    index = next(i for i, r in enumerate(reads) if r.source.same_as(mm.b_buffer))
    sch.cache_read(mm.block, index, "global")
    ndim, index_dtype = len(mm.b_buffer.shape), str(mm.b_buffer.shape[0].ty)
    if pair > 1:
        pack = tirx.IndexMap.from_func(lambda *idx: (*idx[:-2], idx[-1] // nr, idx[-2] // pair, idx[-1] % nr,
                                                     idx[-2] % pair), ndim=ndim, index_dtype=index_dtype)
    else:
        pack = tirx.IndexMap.from_func(lambda *idx: (*idx[:-2], idx[-1] // nr, idx[-2], idx[-1] % nr), ndim=ndim)
    sch.transform_layout(mm.block, ("read", index), pack)


def _inline_epilogue(sch, write_back, facts: CpuFacts) -> None:
    """Fold elementwise consumers (bias add, residual, gelu, ...) into the accumulator write-back;
    consumers that do not inline are scheduled as spatial blocks of their own."""
    while True:
        consumers = sch.get_consumers(write_back)
        if len(consumers) != 1 or not try_primitive(sch.reverse_compute_inline, consumers[0]):
            break
    root = sch.get_sblock("root")
    for b in sch.get_child_blocks(root):
        if sch.get_loops(b) and not _is_parallel_anywhere(sch, b):
            schedule_spatial_block(sch, b, facts)


def _is_parallel_anywhere(sch, block) -> bool:
    return any(sch.get(lp).kind == tirx.ForKind.PARALLEL for lp in sch.get_loops(block))


def _tile_inner(sch, loops, lanes: int) -> None:
    """Unroll the row loop and vectorize the column loop of an MR x NR tile (init or write-back)."""
    rows, cols = loops
    sch.unroll(rows)
    if lanes:
        cols_outer, cols_inner = sch.split(cols, [None, lanes])
        sch.unroll(cols_outer)
        sch.vectorize(cols_inner)
    else:
        sch.unroll(cols)


def _strip_cast(e):
    while isinstance(e, tirx.Cast):
        e = e.value
    return e


def _is_load_of(e, store) -> bool:
    return (isinstance(e, tvm.ir.TensorLoad) and e.source.same_as(store.buffer)
            and len(e.indices) == len(store.indices)
            and all(a.same_as(b) for a, b in zip(e.indices, store.indices)))


def _uses(e, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(e))
