"""rows: row-wise reductions over the innermost axis (softmax, layer/RMS norm: reductions, per-row values and
injective blocks that share the leading spatial axes): parallel over rows, each reduction split into `lanes`
vector partial results (rfactor) and a short final reduction, injective blocks vectorized (one core: softmax
8x1024x1024 18.9 -> 11.8 ms, LayerNorm 1024x512 1.38 -> 0.24 ms; DLight's Reduction reduces one scalar at a
time)."""

from __future__ import annotations

from tvm import s_tir, tirx

from .common import (MIN_PARALLEL_WORK, CpuFacts, has_root, inline_single_use, is_reduce, is_reduction, product,
                     realize, static_extents, trivially_bound)


def apply(func, target) -> s_tir.Schedule | None:
    return _row_reduction_rule(func, CpuFacts.of(target))


def _row_reduction_rule(func, facts: CpuFacts):
    """Blocks over the same leading "row" axes (all but the output's last) and the last axis or not
    (per-row values such as a mean); each reduction reduces the last axis only, whose extent is a
    multiple of the vector lanes; the last block is injective."""
    sch = s_tir.Schedule(inline_single_use(func))
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    stmts = [sch.get(b) for b in blocks]
    if len(blocks) < 2 or is_reduction(stmts[-1]) or not any(is_reduction(st) for st in stmts):
        return None
    rows = len(stmts[-1].iter_vars) - 1
    extents = static_extents(stmts[-1])
    lanes = facts.lanes(stmts[-1].writes[0].source.dtype)
    if rows < 1 or extents is None or extents[-1] % lanes:
        return None
    for b, st in zip(blocks, stmts):  # row x last axis (reduced or not), or one value per row (a mean)
        kinds = [iv.iter_type for iv in st.iter_vars]
        tails = ([tirx.IterVar.CommReduce] if is_reduction(st) else [tirx.IterVar.DataPar]), []
        if not any(kinds == [tirx.IterVar.DataPar] * rows + t for t in tails) or not trivially_bound(sch, b):
            return None
        if static_extents(st) != extents[: len(kinds)]:
            return None
    partials = []  # per reduction: lanes partial results over a strided share of the row, vectorized
    for b, st in zip(blocks, stmts):
        if is_reduction(st):
            _, lane = sch.split(sch.get_loops(b)[-1], [None, lanes])
            try:
                partials.append(sch.rfactor(lane, rows))
            except s_tir.ScheduleError:  # a reducer rfactor does not know (e.g. argmax's tuple): not ours
                return None
    row_loops = sch.get_loops(blocks[-1])
    row = sch.fuse(*row_loops[:rows]) if rows > 1 else row_loops[0]
    if product(extents[:-1]) >= 2 and product(extents) >= MIN_PARALLEL_WORK:
        sch.parallel(row)
    for b in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
        sch.compute_at(b, row, preserve_unit_loops=True)
    for b in sch.get_child_blocks(row):
        if any(_same_block(sch, b, p) for p in partials):
            st = sch.get(b)  # rfactor's block: partial[rows.., lane] over iters (lane, rows.., k // lanes)
            lane_var = st.writes[0].region[rows].min
            lane = _loop_of_iter(sch, b, next(i for i, iv in enumerate(st.iter_vars) if iv.var.same_as(lane_var)))
            red = _loop_of_iter(sch, b, next(i for i, iv in enumerate(st.iter_vars) if is_reduce(iv)))
            sch.reorder(red, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(b, red)
        elif is_reduction(sch.get(b)):  # the final reduction of `lanes` partial results
            sch.unroll(_loop_of_iter(sch, b, next(i for i, iv in enumerate(sch.get(b).iter_vars) if is_reduce(iv))))
        elif len(sch.get(b).iter_vars) > rows:
            _, vec = sch.split(sch.get_loops(b)[-1], [None, lanes])
            sch.vectorize(vec)
    return sch


def _same_block(sch, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


def _loop_of_iter(sch, block, index: int):
    """The loop that block iter var `index` is bound to (a plain loop variable binding)."""
    value = realize(sch, block).iter_values[index]
    return next(lp for lp in sch.get_loops(block) if sch.get(lp).loop_var.same_as(value))
