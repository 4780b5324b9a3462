"""CPU schedule of norm_quant (schedules/norm_quant.py): rows in parallel, the quant loop vectorized.

`schedule` is the hand schedule (fixed vector width), `space` the MetaSchedule design space (the width
sampled); both apply `_schedule`'s primitives.
"""

from __future__ import annotations

from .norm_quant import vectorizable_nearbyint

MAX_VECTOR = 64  # widest quant-loop vector the space samples (LLVM splits it into register-wide parts)


def schedule(func, target):
    """Rows in parallel, the quant loop vectorized by 16, 8 or 4 lanes (the reductions stay scalar per row)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)

    def lanes(loop):
        k = int(sch.get(loop).extent)
        return [None, next((v for v in (16, 8, 4) if k % v == 0), 1)]

    _schedule(sch, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def space(sch, target) -> None:
    """MetaSchedule design space (schedules/tuning_spaces.py): the quant loop's vector width sampled.
    No unroll knob: unrolling the row reductions moved x_scale by an ulp (LLVM contracts the unrolled
    sums differently), and a tuned kernel must give the default one's results bit for bit."""
    _schedule(sch, lambda loop: sch.sample_perfect_tile(loop, n=2, max_innermost_factor=MAX_VECTOR))


def _schedule(sch, tile) -> None:
    """Schedule primitives only; tile(loop) gives the [outer, vector] split of the quant loop."""
    vectorizable_nearbyint()
    row, col = sch.get_loops(sch.get_sblock("quant"))
    sch.parallel(row)
    _, inner = sch.split(col, tile(col))
    sch.vectorize(inner)
