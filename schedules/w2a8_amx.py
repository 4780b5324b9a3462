"""The W2A8 CPU kernel on Intel AMX (schedules/amx.py's calls only): signed int8 activations x decoded int8
ternary weights on tdpbssd (s8 x s8: no rowsum correction, unlike vpdpbusd).

Staged form (`stage`, w2a8_cpu_stages.replace_acc_nest: the "acc" nest of schedules/w2a8.py replaced by)

    assert   request_permission() == 0   first, once a call (errors.AMX_REFUSED otherwise)
    qpad     qp[Mp, K4]                  q zero-padded (only where M or K is padded; else the tiles read q)
    decode   wd[Np / 16, K4 / 4, 16, 4]  int8 T, 0 in the padding: per 16 output features exactly AMX's
                                         B layout [k // 4, n, k % 4], so one B tile is 16 k-groups x 64 bytes
    for task < Np / 32 strips x R row blocks:
      tilecfg      ldtilecfg of CONFIG (tile state is per thread: every task configures its own)
      for row tile < Mp / R / 32:
        dot        accumulators tmm0-3 (2 x 2 tiles of 16 x 16 int32) zeroed by tilezero and kept in
                   tiles over the whole k loop (64 k a step: A tiles tmm4-5 of 16 rows of q, B tiles
                   tmm6-7 of one 16-column group each, four tdpbssd), then stored once, by tilestored,
                   to accp, the int32 scratch of this 32 x 32 tile
      tilerelease
    unpad    acc = accp[:M, :N]

Mp = M rounded up to 32 * R, Np = N rounded up to 32 and K4 = K rounded up to 64 (the padding codes are
T = 0). `schedule` then uses primitives only: each task decodes its panel (compute_at), the epilogue runs
on each tile's scratch right after its store (reverse_compute_at), the tasks run in parallel from
w2a8_cpu.MIN_PARALLEL_MACS on. Buffers reach the AMX calls through match_buffer, so their strides are
the compacted buffers' (accp shrinks to one 32 x 32 tile, wd to one task's panel).

The micro tile is fixed (it fills the eight tile registers): the MetaSchedule space samples only the
unroll step (tuning_spaces.sample_unroll), which reaches the decode and epilogue loops.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..errors import AMX_REFUSED
from . import amx
from .w2a8_cpu_stages import decoded_weight, qpad_macro, replace_acc_nest, round_up

TILE = 16  # rows of every tile; an accumulator tile holds 16 int32 columns, an A or B tile 64 bytes a row
MICRO = 2 * TILE  # the micro tile: 32 rows x 32 output features, 2 x 2 accumulator tiles
K_STEP = 64  # k per tdpbssd (one A tile row)
CONFIG = amx.config_bytes({t: (TILE, 4 * TILE) for t in range(amx.TILES)})  # every tile 16 rows x 64 bytes


def stage(func, mp: int, np_: int, k4: int, rows: int):
    """`func` (schedules/w2a8.py) with its "acc" nest replaced by the AMX stages (module doc)."""
    return replace_acc_nest(func, lambda q, wp: _stages(q, wp, mp, np_, k4, rows))


def _config_byte(b):
    """CONFIG[b] as a TIR expression of the byte index b (a select chain over its few nonzero bytes)."""
    value = T.uint8(0)
    for i, byte in enumerate(CONFIG):
        if byte:
            value = T.if_then_else(b == i, T.uint8(byte), value)
    return value


def _stages(q, wp, mp: int, np_: int, k4: int, rows: int):
    M, K = q.shape
    Mp, Np, K4, G, KG = (T.int64(v) for v in (mp, np_, k4, np_ // TILE, k4 // 4))
    strips, row_tiles, steps = np_ // MICRO, mp // rows // MICRO, k4 // K_STEP

    pad_q = (mp, k4) != (int(M), int(K))
    qp = tirx.decl_buffer((Mp, K4), "int8", name="qp")
    a = qp if pad_q else q  # the A tiles' rows
    qpad = qpad_macro()

    def row0(vr, vi0):  # first row of a micro tile
        return vr * (mp // rows) + vi0 * MICRO

    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def stages():
        wd = T.sblock_alloc_buffer((G, KG, T.int64(TILE), T.int64(4)), "int8")
        accp = T.sblock_alloc_buffer((Mp, Np), "int32")
        cfg = T.sblock_alloc_buffer((T.int64(amx.CONFIG_BYTES),), "uint8")
        with T.sblock("permission"):
            T.reads()
            T.writes()
            assert amx.request_permission() == T.int64(0), AMX_REFUSED
        if pad_q:
            qpad(q, qp)
        for g, kg, j, kk in T.grid(G, KG, T.int64(TILE), T.int64(4)):
            with T.sblock("decode"):
                vg, vkg, vj, vkk = T.axis.remap("SSSS", [g, kg, j, kk])
                T.reads(wp[vg * TILE + vj, vkg])
                T.writes(wd[vg, vkg, vj, vkk])
                wd[vg, vkg, vj, vkk] = decoded_weight(wp, vg * TILE + vj, vkg * 4 + vkk, (Np, K4), False)
        for s, r in T.grid(T.int64(strips), T.int64(rows)):
            with T.sblock("tilecfg"):
                vs, vr = T.axis.remap("SS", [s, r])
                T.reads()
                T.writes(cfg[0:amx.CONFIG_BYTES])
                for b in range(amx.CONFIG_BYTES):
                    cfg[b] = _config_byte(b)
                T.evaluate(amx.ldtilecfg(T.address_of(cfg[0])))
            for i0 in range(T.int64(row_tiles)):
                with T.sblock("dot"):
                    vs, vr, vi0 = T.axis.remap("SSS", [s, r, i0])
                    T.reads(a[row0(vr, vi0):row0(vr, vi0) + MICRO, 0:K4], wd[vs * 2:vs * 2 + 2, 0:KG, 0:TILE, 0:4],
                            cfg[0:amx.CONFIG_BYTES])
                    T.writes(accp[row0(vr, vi0):row0(vr, vi0) + MICRO, vs * MICRO:vs * MICRO + MICRO])
                    sa = T.int64()
                    sb = T.int64()
                    sc = T.int64()
                    A = T.match_buffer(a[row0(vr, vi0):row0(vr, vi0) + MICRO, 0:K4], (MICRO, K4), "int8",
                                       strides=[sa, 1], offset_factor=1)
                    B = T.match_buffer(wd[vs * 2:vs * 2 + 2, 0:KG, 0:TILE, 0:4], (2, KG, TILE, 4), "int8",
                                       strides=[T.int64(), sb, T.int64(), 1], offset_factor=1)
                    C = T.match_buffer(accp[row0(vr, vi0):row0(vr, vi0) + MICRO, vs * MICRO:vs * MICRO + MICRO],
                                       (MICRO, MICRO), "int32", strides=[sc, 1], offset_factor=1)
                    T.evaluate(amx.tilezero(0))
                    T.evaluate(amx.tilezero(1))
                    T.evaluate(amx.tilezero(2))
                    T.evaluate(amx.tilezero(3))
                    for ks in range(T.int64(steps)):  # tmm4-5: rows 0-15 and 16-31 of q; tmm6-7: column groups 0, 1
                        T.evaluate(amx.tileloadd(4, T.address_of(A[0, ks * K_STEP]), sa))
                        T.evaluate(amx.tileloadd(5, T.address_of(A[TILE, ks * K_STEP]), sa))
                        T.evaluate(amx.tileloadd(6, T.address_of(B[0, ks * TILE, 0, 0]), sb))
                        T.evaluate(amx.tileloadd(7, T.address_of(B[1, ks * TILE, 0, 0]), sb))
                        T.evaluate(amx.tdpbssd(0, 4, 6))
                        T.evaluate(amx.tdpbssd(1, 4, 7))
                        T.evaluate(amx.tdpbssd(2, 5, 6))
                        T.evaluate(amx.tdpbssd(3, 5, 7))
                    T.evaluate(amx.tilestored(0, T.address_of(C[0, 0]), sc * 4))
                    T.evaluate(amx.tilestored(1, T.address_of(C[0, TILE]), sc * 4))
                    T.evaluate(amx.tilestored(2, T.address_of(C[TILE, 0]), sc * 4))
                    T.evaluate(amx.tilestored(3, T.address_of(C[TILE, TILE]), sc * 4))
            with T.sblock("tilerelease"):
                vs, vr = T.axis.remap("SS", [s, r])
                T.reads()
                T.writes()
                T.evaluate(amx.tilerelease())

    root = stages.body.block
    allocs = list(root.alloc_buffers)
    return [qp] * pad_q + allocs, list(root.body.seq), next(b for b in allocs if b.name == "accp")


def schedule(sch, min_parallel_macs: int):
    """Schedule the staged kernel in `sch` (primitives only): the padding of q and one loop of strips x row
    blocks in parallel from `min_parallel_macs` (Mp x Np x K4) on, each task decoding its weight panel
    first; returns the row-tile loop, where the epilogue goes."""
    dot = sch.get(sch.get_sblock("dot"))
    mp, np_ = (int(d) for d in dot.writes[0].source.shape)  # accp
    k4 = 4 * int(dot.reads[1].source.shape[1])  # wd: [Np / 16, K4 / 4, 16, 4]
    parallel = mp * np_ * k4 >= min_parallel_macs
    task = sch.fuse(*sch.get_loops(sch.get_sblock("tilecfg")))
    if parallel:
        sch.parallel(task)
        if dot.reads[0].source.name == "qp":
            sch.parallel(sch.get_loops(sch.get_sblock("qpad"))[0])
    sch.compute_at(sch.get_sblock("decode"), task, preserve_unit_loops=True)
    return sch.get_loops(sch.get_sblock("dot"))[-1]
