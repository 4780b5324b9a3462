"""CPU schedule of norm_quant (schedules/norm_quant.py): one loop over rows, the row reductions as vector
partial sums, the quant loop vectorized.

`schedule` is the hand schedule (fixed vector width), `space` the MetaSchedule design space (the width
sampled); both apply `_schedule`'s primitives.
"""

from __future__ import annotations

from .norm_quant import vectorizable_nearbyint

MAX_VECTOR = 64  # widest quant-loop vector the space samples (LLVM splits it into register-wide parts)
ROW_GROUPS = (4, 2, 1)  # rows whose reductions interleave (the largest that divides M)
MIN_PARALLEL_ELEMENTS = 1 << 16  # about 10 us on one core: less is not worth waking the thread pool


def schedule(func, target):
    """One loop over rows (parallel from MIN_PARALLEL_ELEMENTS on); per row the reductions vectorized
    (_vector_reductions) and the quant loop by 16, 8 or 4 lanes: each row read from memory once (then
    from L1), q written once."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)

    def lanes(loop):
        k = int(sch.get(loop).extent)
        return [None, next((v for v in (16, 8, 4) if k % v == 0), 1)]

    _schedule(sch, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def space(sch, target) -> None:
    """MetaSchedule design space (schedules/tuning_spaces.py): the quant loop's vector width sampled.
    The reductions' lanes and unrolling are no knobs (unrolled row sums moved x_scale by an ulp: LLVM
    contracts them differently): a tuned kernel must give the default one's results bit for bit."""
    _schedule(sch, lambda loop: sch.sample_perfect_tile(loop, n=2, max_innermost_factor=MAX_VECTOR))


def reduction_lanes(k: int) -> int:
    """Partial results per row reduction: lane l reduces k = l, l + lanes, ... in order, then the
    lanes are combined in order (1: one sequential reduction, for K with no such divisor)."""
    return next((v for v in (16, 8, 4) if k % v == 0 and k > v), 1)


def _schedule(sch, tile) -> None:
    """Schedule primitives only; tile(loop) gives the [outer, vector] split of the quant loop."""
    vectorizable_nearbyint()
    m, k = (int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("quant")))
    lanes = reduction_lanes(k)
    partials = _vector_reductions(sch, lanes, next(g for g in ROW_GROUPS if m % g == 0)) if lanes > 1 else []
    row, *_, col = sch.get_loops(sch.get_sblock("quant"))
    if m * k >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(row)
    _, inner = sch.split(col, tile(col))
    sch.vectorize(inner)
    for block, loop in partials:  # last: the update blocks it leaves fail the checks of parallel
        sch.decompose_reduction(block, loop)


def _vector_reductions(sch, lanes: int, group: int) -> list:
    """The row reductions (sum, sumsq, absmax) as `lanes` vector partial reductions (rfactor) combined
    in order, all blocks back in one loop over groups of `group` rows, each block interleaving its
    group's rows (independent dependency chains). rfactor wants a reduction alone in its loop nest, so
    first every block after the row loop's first gets a row loop of its own (a cache_write copy, the
    block moved into it, the copy inlined; a reduction cannot absorb its copy, which is moved on once more).
    Returns each partial reduction block with its reduction loop."""
    row = sch.get_loops(sch.get_sblock("quant"))[0]
    order = [sch.get(b).name_hint for b in sch.get_child_blocks(row)]
    reductions = [name for name in order if name in ("sum", "sumsq", "absmax")]
    copies = []
    for name in order[:0:-1]:
        copy = _peel(sch, sch.get_sblock(name))
        if name in reductions:
            copies.append(sch.get(copy).name_hint)
            copy = _peel(sch, copy)
        sch.reverse_compute_inline(copy)
    for name in reductions:
        sch.rfactor(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, lanes])[1], factor_axis=1)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    groups, _ = sch.split(sch.get_loops(blocks[0])[0], [None, group])
    for block in blocks[1:]:  # every nest back into the first one's loop over row groups, in order
        sch.reverse_compute_at(block, groups, preserve_unit_loops=True)
    for name in copies:
        sch.compute_inline(sch.get_sblock(name))
    partials = []
    for name in reductions:
        rf = sch.get_sblock(name + "_rf")
        loops = sch.get_loops(rf)[1:]
        rows, kout, lane = loops if name == order[0] else (loops[1], loops[2], loops[0])  # as moved: lane, row, k
        sch.reorder(kout, rows, lane)
        sch.vectorize(lane)
        partials.append((rf, kout))
    return partials


def _peel(sch, block):
    """Move `block` out of its row loop into the row loop of a new copy of its output; returns the copy."""
    copy = sch.cache_write(block, 0, "global")
    sch.compute_at(block, sch.get_loops(copy)[0])
    return copy
