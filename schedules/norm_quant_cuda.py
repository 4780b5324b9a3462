"""GPU schedule of norm_quant (schedules/norm_quant.py): one thread block per row, threads over K.

Per row (blockIdx.x): the row reductions (sum for LayerNorm, sum of squares, max |xn|) are cross-thread reductions
(each thread strides K by the block width, then a warp-shuffle/shared-memory all-reduce); the row
statistics live in shared memory; the quant loop writes q with the threads over K (coalesced).
The function stays opaque and is marked tirx.is_scheduled, so DLight leaves it alone.
"""

from __future__ import annotations

THREADS = 128  # threads per row block; rows of the ViT (K = dim) are 64..1024 wide


def schedule(func, target, knobs: int | None = None):
    """The scheduled PrimFunc; knobs: threads per row block (default THREADS; fewer for a row narrower than
    that: K rounded up to a power of two, at least a warp)."""
    from tvm import s_tir

    threads = knobs or THREADS
    sch = s_tir.Schedule(func)
    row = sch.get_loops(sch.get_sblock("quant"))[0]  # the one row loop holding every block
    row_sum = ("sum",) if "sum" in {sch.get(b).name_hint for b in sch.get_child_blocks(row)} else ()  # LayerNorm
    sch.bind(row, "blockIdx.x")
    k_extent = int(sch.get(sch.get_loops(sch.get_sblock("quant"))[1]).extent)
    tx = min(threads, max(32, 1 << (k_extent - 1).bit_length()))
    for name in (*row_sum, "sumsq", "absmax", "quant"):
        k = sch.get_loops(sch.get_sblock(name))[1]
        outer, inner = sch.split(k, [None, tx])
        sch.reorder(inner, outer)  # thread t reads k = t, t + tx, ...: coalesced
        sch.bind(inner, "threadIdx.x")
    for name in (*row_sum, "sumsq", "rstd", "absmax"):  # per-row statistics: shared by the row's threads
        sch.set_scope(sch.get_sblock(name), 0, "shared")
    # x_scale goes through shared memory (one thread computes it, a barrier, every thread stores the same value
    # to global and reads its own store). Written to global by one thread only, the other threads read it
    # before it was written: no barrier orders global memory (found by bmvcc verify's PTX emulator).
    sch.cache_write(sch.get_sblock("scale"), 0, "shared")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
