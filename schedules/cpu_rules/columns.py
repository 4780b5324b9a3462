"""columns: reductions over an outer axis with the innermost output axis contiguous in every read (the
token mean of a ViT's head, x[b, n, c] -> mean over n): parallel over strips of `lanes` output columns,
each summed in a vector register while the reduction walks the rows, the epilogue (e.g. the division
of a mean) folded into the write-back (one core, 1024x512: 1.3 -> 0.09 ms; DLight's Reduction walks each
column alone, 16 times the cache lines)."""

from __future__ import annotations

from tvm import s_tir

from .common import (MIN_PARALLEL_WORK, CpuFacts, has_root, inline_single_use, is_reduce, is_reduction, product,
                     static_extents, trivially_bound, try_primitive)


def apply(func, target) -> s_tir.Schedule | None:
    return _column_rule(func, CpuFacts.of(target))


def _column_rule(func, facts: CpuFacts):
    sch = s_tir.Schedule(inline_single_use(func))
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    block, stmt = blocks[0], sch.get(blocks[0])  # the reduction first (prologues inlined), then its epilogue
    if sum(is_reduction(sch.get(b)) for b in blocks) != 1 or not is_reduction(stmt):
        return None
    extents = static_extents(stmt)
    kinds = [is_reduce(iv) for iv in stmt.iter_vars]
    spatial = kinds.index(True) if True in kinds else 0
    if extents is None or spatial == 0 or not all(kinds[spatial:]) or not trivially_bound(sch, block):
        return None
    lanes = facts.lanes(stmt.writes[0].source.dtype)
    if extents[spatial - 1] % lanes or not _contiguous_in_every_read(stmt, stmt.iter_vars[spatial - 1].var):
        return None
    loops = sch.get_loops(block)
    strip, lane = sch.split(loops[spatial - 1], [None, lanes])
    sch.reorder(*loops[: spatial - 1], strip, *loops[spatial:], lane)
    outer = sch.fuse(*loops[: spatial - 1], strip) if spatial > 1 else strip
    if product(extents[:spatial]) // lanes >= 2 and product(extents) >= MIN_PARALLEL_WORK:
        sch.parallel(outer)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
    for consumer in sch.get_consumers(acc):
        try_primitive(sch.reverse_compute_inline, consumer)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, loops[spatial])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch


def _contiguous_in_every_read(stmt, column) -> bool:
    """Every read of an input indexes its last axis by `column` alone (a vector load per row)."""
    return all(r.region[-1].min.same_as(column) for r in stmt.reads if not r.source.same_as(stmt.writes[0].source))
