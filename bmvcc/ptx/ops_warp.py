"""Barriers and warp-level instructions (PTX ISA 8.5 §9.7.12.3 shfl.sync, §9.7.12.4 vote, §9.7.12.8 activemask,
§9.7.13.1 bar.sync). Memory fences are no-ops: the batch executes in lockstep and memory is coherent."""

from __future__ import annotations

import numpy as np

from .machine import active, write
from .ops import dest, op, src


def lanes_mask(st, m) -> np.ndarray:
    """Per thread: the bit mask of its warp's active lanes."""
    act = (st.alive if m is None else m).reshape(-1, 32)
    bits = (act.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32)
    return np.repeat(bits, 32)


@op("bar.sync", "barrier.sync", "bar.cta.sync", "barrier.cta.sync")
def _bar(ctx, ins, parts):
    if len(ins.operands) > 1:
        raise ValueError("bar.sync with a thread count is not emulated")

    def bar(st, m):
        if m is None:
            st.races.barrier(None)
            st.epoch += 1
            return
        ctas = np.unique(st.cta_of[m])
        missing = st.launched & np.isin(st.cta_of, ctas) & ~m  # elsewhere, or exited
        if missing.any():
            st.fail(ins.line, int(np.argmax(missing)), "bar.sync not reached by every thread of the CTA "
                                                      "(divergent barrier)")
        st.races.barrier(ctas)
        st.epoch[ctas] += 1
    return bar


@op("membar", "fence", "bar.warp.sync")
def _nop(ctx, ins, parts):
    return lambda st, m: None


@op("activemask")
def _activemask(ctx, ins, parts):
    d = dest(ctx, ins.operands[0])
    return lambda st, m: write(st, d, lanes_mask(st, m), m)


@op("shfl.sync")
def _shfl(ctx, ins, parts):
    """shfl.sync.mode.b32 d[|p], a, b, c, membermask, with the ISA's pseudo code: segmask = c[12:8],
    maxLane = (lane & segmask) | (c[4:0] & ~segmask), minLane = lane & segmask; the source lane j by mode;
    out of range -> own value, p = false."""
    mode = parts[2]
    dp = ins.operands[0].split("|")
    d, p = dest(ctx, dp[0]), dest(ctx, dp[1]) if len(dp) > 1 else None
    a, b, c = (src(ctx, t, "u32") for t in ins.operands[1:4])

    def shfl(st, m):
        lane = st.lane.astype(np.int64)
        bval = np.asarray(b(st)).astype(np.int64) & 31
        cval = np.asarray(c(st)).astype(np.int64)
        seg = (cval >> 8) & 31
        max_lane = (lane & seg) | (cval & 31 & ~seg)
        min_lane = lane & seg
        if mode == "idx":
            j = min_lane | (bval & ~seg)
            ok = j <= max_lane
        elif mode == "up":
            j = lane - bval
            ok = j >= max_lane
        elif mode == "down":
            j = lane + bval
            ok = j <= max_lane
        else:  # bfly
            j = lane ^ bval
            ok = j <= max_lane
        j = np.where(ok, j, lane)
        source = (np.arange(st.n) - lane) + j
        act = st.alive if m is None else m
        rows = active(st, m)
        if not act[source[rows]].all():
            i = rows[np.argmax(~act[source[rows]])]
            st.fail(ins.line, int(i), "shfl.sync reads an inactive lane")
        write(st, d, np.broadcast_to(a(st), (st.n,))[source], m)
        if p is not None:
            write(st, p, np.broadcast_to(ok, (st.n,)), m)
    return shfl


@op("vote.sync", "vote")
def _vote(ctx, ins, parts):
    mode = next(x for x in parts[1:] if x in ("all", "any", "uni", "ballot"))
    d = dest(ctx, ins.operands[0])
    a = src(ctx, ins.operands[1], "pred")

    def vote(st, m):
        act = (st.alive if m is None else m).reshape(-1, 32)
        v = np.broadcast_to(a(st), (st.n,)).reshape(-1, 32) & act
        if mode == "ballot":
            r = np.repeat((v.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32), 32)
        elif mode == "all":
            r = np.repeat((v | ~act).all(axis=1), 32)
        elif mode == "any":
            r = np.repeat(v.any(axis=1), 32)
        else:
            r = np.repeat((v | ~act).all(axis=1) | ~v.any(axis=1), 32)
        write(st, d, r, m)
    return vote
