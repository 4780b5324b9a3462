"""CPU schedules of the W2A8 kernel (schedules/w2a8.py): int8 activations x 2-bit packed ternary weights.

Two steps, both keyed on PrimFuncs with attr bmvcc.kernel == "w2a8":
- `stage_w2a8_kernels(mod, target)` (run by cpu_default.legalize_and_fuse, so by compile and by tune
  alike) rewrites each kernel into its explicit stages (w2a8_cpu_stages.py), padded to knob-independent
  extents, and marks it STAGED_ATTR = backend. That staged function is the tuning task.
- `schedule(func, target, knobs)` schedules a staged kernel with schedule primitives only
  (`_schedule`): with fixed knobs (DEFAULT_KNOBS, the compile default) or, as the MetaSchedule design
  space `space(sch, target)`, with sampled ones, so a tuned trace replays on the task from the database.
The backend follows the target's features (select_backend): AMX tiles (tdpbssd: w2a8_amx.py, its own
stages and fixed micro tile), AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw), aarch64 dot product (sdot),
else generic LLVM vector code; dot_intrinsics.py has the vector ones (registered by schedules/intrinsics.py).

Padding (amx: to its 32 x 32 x 64 tiles, w2a8_amx.py): Mp = M for M <= 4 (GEMV and small batches: no
padded rows), else M rounded up to 4 * R (R row blocks, below); Np = N rounded up to lanes * the backend's default nt. The row tile mr divides
Mp / R and the lane groups nt divide Np / lanes, so every micro tile is full and tensorizes.

Loop structure: parallel (from MIN_PARALLEL_MACS on) over strips of lanes * nt output features x R
row blocks; per task, `decode` fills a small buffer (lanes * nt x K4 bytes, laid out [n // L, k // 4,
n % L, k % 4], L = instruction lanes) that all its rows reuse, so weights stay 2-bit in memory and
each task decodes one panel; then per mr-row micro tile the k loop runs the intrinsic on mr x nt
register accumulators, and the epilogue runs on that tile right away. R (row_blocks: 1 unless the
default strips would leave the target's cores unevenly busy, as a 64-wide layer on 2 cores) is fixed
by the staging (ROWS_ATTR), so the tuning space does not sample it.

Tuned knobs: mr (sample_perfect_tile, up to MAX_MR), nt (up to MAX_NT) and the auto-unroll step of
each nest (tuning_spaces.sample_unroll); on amx the unroll step only.
The backend is fixed by the staging (the staged function
differs per backend). Unit loops are kept throughout: loop counts must not depend on sampled tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import dot_intrinsics, w2a8_amx
from .intrinsics import ensure
from .tuning_spaces import sample_unroll
from .w2a8 import KERNEL_ATTR
from .w2a8_cpu_stages import restage, round_up

STAGED_ATTR = "bmvcc.w2a8_backend"  # on a staged kernel: the backend its stages were built for
ROWS_ATTR = "bmvcc.w2a8_row_blocks"  # on a staged kernel: R, the row blocks run as parallel tasks
MAX_MR, MAX_NT = 8, 4  # tuning range of the micro tile (rows, lane groups)
MIN_PARALLEL_MACS = 1 << 20  # about 5 us on one core: less is not worth waking the thread pool


@dataclass(frozen=True)
class CpuKnobs:
    backend: str  # code variant: "amx" | "vnni" | "avx2_i16" | "avx2_i32" | "sdot" | "generic"
    mr: int  # activation rows per micro tile (the largest divisor of Mp up to this)
    nt: int  # instruction-wide lane groups per micro tile (tile width = lanes * nt); Np pads to it


# Per select_backend() answer. Micro tiles sized to the register files: accumulators mr * nt plus
# weight/broadcast registers. On AVX2 the int16 variant (vpmaddubsw + vpaddw, widened every 256 k)
# beat the int32 one (vpmaddubsw + vpmaddwd + vpaddd per step) by 1.3-1.7x at the FFN shapes. znver3 code on
# Zen 4, 2 cores, M = 1024, (K, N) = (512, 2048) / (2048, 512), MACs/cycle/core: avx2_i16 4 x 2 46 / 46 (72% of
# 64), 2 x 4 46 / 46, 8 x 1 41 / 43, 4 x 3 36 / 42, 4 x 4 38 / 40; avx2_i32 4 x 2 29 / 30. The k loop alone, from L1,
# runs at 1.6 vpmaddubsw a cycle there (51 MACs), as does a loop of vpmaddubsw each feeding a vpaddw in registers
# (vpmaddubsw alone, or beside as many independent vpaddw: 2 a cycle).
DEFAULT_KNOBS = {
    "amx": CpuKnobs("amx", mr=w2a8_amx.MICRO, nt=2),  # fixed, schedule() refuses others: 2 x 2 tiles of 16 x 16
    "vnni": CpuKnobs("vnni", mr=4, nt=4),  # 16 of 32 zmm accumulate
    "avx2": CpuKnobs("avx2_i16", mr=4, nt=2),  # 8 of 16 ymm accumulate (int16, widened per chunk)
    "sdot": CpuKnobs("sdot", mr=4, nt=4),  # 16 of 32 q registers accumulate
    "generic": CpuKnobs("generic", mr=4, nt=2),
}


def select_backend(target) -> str:
    """The dot-product instruction the target has: amx (tdpbssd; AVX-512 for the decode and epilogue), vnni,
    avx2, sdot, or generic LLVM code."""
    from tvm.target import codegen

    with target:
        has = codegen.target_has_features
        if has("amx-tile") and has("amx-int8") and has("avx512bw"):
            return "amx"
        if has("avx512vnni") and has("avx512bw"):
            return "vnni"
        if has("avx2"):
            return "avx2"
        if has("dotprod"):
            return "sdot"
    return "generic"


def strip_width(knobs: CpuKnobs) -> int:
    """Output features per parallel strip (and micro tile): N pads to a multiple of it."""
    return w2a8_amx.MICRO if knobs.backend == "amx" else intrin_of(knobs.backend).lanes * knobs.nt


def uses_amx(target) -> bool:
    """Whether the W2A8 kernels built for the TVM llvm `target` run on AMX tiles."""
    return select_backend(target) == "amx"


def intrin_of(backend: str):
    return {"vnni": dot_intrinsics.VNNI, "avx2_i32": dot_intrinsics.AVX2, "avx2_i16": dot_intrinsics.AVX2_I16,
            "sdot": dot_intrinsics.SDOT, "generic": dot_intrinsics.GENERIC}[backend]


def stage_w2a8_kernels(mod, target):
    """IRModule -> IRModule: every unscheduled, unstaged W2A8 PrimFunc replaced by its staged form
    for `target`'s default backend (idempotent)."""
    from tvm import tirx

    knobs = DEFAULT_KNOBS[select_backend(target)]
    updates = {gv: stage_w2a8(func, knobs, cores_of(target)) for gv, func in mod.functions_items()
               if isinstance(func, tirx.PrimFunc) and func.attrs is not None
               and func.attrs.get(KERNEL_ATTR) == "w2a8" and STAGED_ATTR not in func.attrs
               and not func.attrs.get("tirx.is_scheduled", False)}
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def cores_of(target) -> int:
    """Threads the kernel's parallel loop should keep busy: the target's num-cores (1 if unknown)."""
    return int(target.attrs.get("num-cores") or 1)


def row_blocks(m: int, strips: int, cores: int, granule: int = 4) -> int:
    """R: 1, or for M > `granule` rows (what a row block pads to: 4, amx 32) and fewer than 4 strips per core
    that do not divide evenly among the cores, the row blocks that make strips * R a multiple of the cores
    (each such task decodes its panel: R decodes of it, in parallel, instead of idle cores), at most
    ceil(M / granule) (no block all padding)."""
    if m <= granule or strips % cores == 0 or strips >= 4 * cores:
        return 1
    return min(cores // math.gcd(strips, cores), -(-m // granule))


def stage_w2a8(func, knobs: CpuKnobs, cores: int = 1):
    """A W2A8 PrimFunc rewritten into the stages of `knobs.backend` for `cores` threads, padded as
    the module doc says."""
    from tvm import s_tir

    ref = s_tir.Schedule(func)
    acc = ref.get(ref.get_sblock("acc"))
    (m, k), n = _shape(acc.reads[0].source), int(acc.reads[1].source.shape[0])
    width = strip_width(knobs)
    np_ = round_up(n, width)
    parallel = m * np_ * k >= MIN_PARALLEL_MACS  # then also _schedule's test on the padded extents
    amx = knobs.backend == "amx"
    rows = row_blocks(m, np_ // width, cores if parallel else 1, w2a8_amx.MICRO if amx else 4)
    if amx:
        staged = w2a8_amx.stage(func, round_up(m, w2a8_amx.MICRO * rows), np_, round_up(k, w2a8_amx.K_STEP), rows)
    else:
        mp = m if m <= 4 else round_up(m, 4 * rows)
        chunk = dot_intrinsics.I16_CHUNK_K if knobs.backend == "avx2_i16" else None
        staged = restage(func, mp, np_, intrin_of(knobs.backend).weight_dtype == "uint8", chunk)
    return staged.with_attr(STAGED_ATTR, knobs.backend).with_attr(ROWS_ATTR, rows)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def schedule(func, target, knobs: CpuKnobs | None = None):
    """Schedule one W2A8 PrimFunc (staged here first if it is not yet) with fixed knobs (default:
    DEFAULT_KNOBS of the target); returns it marked tirx.is_scheduled."""
    from tvm import s_tir

    if func.attrs is None or func.attrs.get(KERNEL_ATTR) != "w2a8":
        raise ValueError(f"w2a8_cpu.schedule expects a PrimFunc with attr {KERNEL_ATTR}='w2a8'")
    knobs = knobs or DEFAULT_KNOBS[select_backend(target)]
    if knobs.backend == "amx" and knobs != DEFAULT_KNOBS["amx"]:
        raise ValueError(f"the amx tile kernel is fixed (w2a8_amx.py): its knobs are {DEFAULT_KNOBS['amx']}, "
                         f"not {knobs}")
    if STAGED_ATTR not in func.attrs:
        func = stage_w2a8(func, knobs, cores_of(target))
    elif func.attrs[STAGED_ATTR] != knobs.backend:
        raise ValueError(f"this W2A8 kernel is staged for {func.attrs[STAGED_ATTR]}, not {knobs.backend}")
    sch = s_tir.Schedule(func)
    wants = {"mr": knobs.mr, "nt": knobs.nt}
    _schedule(sch, lambda loop, knob: [None, _largest_divisor(int(sch.get(loop).extent), wants[knob])])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def space(sch, target) -> None:
    """MetaSchedule design space: `_schedule` with mr, nt and the unroll step sampled (no Python
    branch depends on a sampled value: MetaSchedule replays this trace with new decisions)."""
    if STAGED_ATTR not in sch.mod["main"].attrs:
        raise ValueError("the W2A8 tuning space expects a staged kernel (stage_w2a8_kernels)")
    caps = {"mr": MAX_MR, "nt": MAX_NT}
    _schedule(sch, lambda loop, knob: sch.sample_perfect_tile(loop, n=2, max_innermost_factor=caps[knob]))
    sample_unroll(sch)


def _schedule(sch, tile) -> None:
    """Schedule the staged kernel in `sch` (primitives only). tile(loop, "mr" | "nt") gives the
    [outer, inner] split factors of the row loop / of the lane-group loop (ints or sampled)."""
    func = sch.mod["main"]
    backend = str(func.attrs[STAGED_ATTR])
    unpad = sch.get(sch.get_sblock("unpad"))
    padded = _shape(unpad.reads[0].source) != _shape(unpad.writes[0].source)  # (Mp, Np) vs (M, N)
    epilogue = _blocks_after(sch, "unpad")
    sch.compute_inline(sch.get_sblock("unpad"))
    if backend == "amx":
        _epilogue_at(sch, epilogue, w2a8_amx.schedule(sch, MIN_PARALLEL_MACS), padded)
        return
    qpad = sch.get(sch.get_sblock("qpad"))
    mp, np_ = _shape(unpad.reads[0].source)
    parallel = mp * np_ * _shape(qpad.writes[0].source)[1] >= MIN_PARALLEL_MACS  # Mp x Np x K4
    if _shape(qpad.reads[0].source) == _shape(qpad.writes[0].source):  # q needs no padding
        sch.compute_inline(sch.get_sblock("qpad"))
    elif parallel:
        sch.parallel(sch.get_loops(sch.get_sblock("qpad"))[0])
    intrin = intrin_of(backend)
    lanes, unsigned, chunk = intrin.lanes, intrin.weight_dtype == "uint8", backend == "avx2_i16"
    if unsigned and parallel:
        sch.parallel(sch.get_loops(sch.get_sblock("rowsum"))[0])

    dot, decode = sch.get_sblock("dot"), sch.get_sblock("decode")
    # wd tile order: one instruction's weight operand (lanes x 4, or 4 x lanes when k-major) is contiguous
    if intrin.k_major:
        sch.transform_layout(dot, "wd", lambda j, kk: (j // lanes, kk // 4, kk % 4, j % lanes))
    else:
        sch.transform_layout(dot, "wd", lambda j, kk: (j // lanes, kk // 4, j % lanes, kk % 4))
    # outer structure on the int32 accumulation (dot, or widen over int16 chunks):
    # parallel tasks of n strips (j0) x row blocks (ir) > row micro tiles (i0) > k
    outer = sch.get_sblock("widen") if chunk else dot
    i, j, kk = sch.get_loops(outer)[:3]
    jg, j2 = sch.split(j, [None, lanes])
    j0, j1 = sch.split(jg, tile(jg, "nt"))
    ir, i = sch.split(i, [int(func.attrs[ROWS_ATTR]), None])
    i0, i1 = sch.split(i, tile(i, "mr"))
    if chunk:
        c, p = sch.get_loops(outer)[-2:]
        sch.reorder(j0, ir, i0, c, i1, j1, j2, p)
    else:
        k0, k1 = sch.split(kk, [None, 4])
        sch.reorder(j0, ir, i0, k0, i1, j1, j2, k1)
    task = sch.fuse(j0, ir)  # parallel tasks: strips x row blocks
    if parallel:
        sch.parallel(task)
    _epilogue_at(sch, epilogue, i0, padded)
    if chunk:  # the int16 dot of one chunk for one micro tile, then widened into accp
        sch.compute_at(dot, c, preserve_unit_loops=True)
        di, dj, dc, dp, dkb, dk2 = sch.get_loops(dot)[-6:]  # dc: unit loop of the chunk
        dj0, dj1 = sch.split(dj, [None, lanes])
        sch.reorder(dc, dkb, di, dj0, dj1, dp, dk2)
        k0, i1, j1, j2 = dkb, di, dj0, dj1
        _split_init(sch, outer, c)
        sch.tensorize(sch.get_loops(outer)[-2], ensure(dot_intrinsics.AVX2_I16_WIDEN))
    sch.compute_at(decode, task, preserve_unit_loops=True)  # one decoded tile (lanes * nt features x K4) per parallel task
    dj, dk = sch.get_loops(decode)[-2:]
    dk0, dk1 = sch.split(dk, [None, 4])
    dj0, dj1 = sch.split(dj, [None, lanes])
    sch.reorder(dj0, dk0, *((dk1, dj1) if intrin.k_major else (dj1, dk1)))
    _split_init(sch, dot, k0)
    sch.tensorize(j2, ensure(intrin.name))
    sch.unroll(i1)
    sch.unroll(j1)


def _epilogue_at(sch, epilogue: list[str], loop, padded: bool) -> None:
    """The epilogue blocks per micro tile under `loop`, right after its accumulation: accp shrinks to one tile
    in L1 (vectorized where no padding guards it)."""
    for blk in epilogue:
        sch.reverse_compute_at(sch.get_sblock(blk), loop, preserve_unit_loops=True)
        if not padded:
            sch.vectorize(sch.get_loops(sch.get_sblock(blk))[-1])


def _split_init(sch, block, loop) -> None:
    """`block`'s init decomposed above `loop` and vectorized. rs is read by the init only (u8: acc starts at
    -rowsum), so it is hidden from the update, which must match the intrinsic it is tensorized with."""
    init = sch.decompose_reduction(block, loop)
    sch.vectorize(sch.get_loops(init)[-1])
    reads = [r.source.name for r in sch.get(block).reads]
    if "rs" in reads:
        sch.unsafe_hide_buffer_access(block, "read", [reads.index("rs")])


def _shape(buf) -> tuple[int, ...]:
    return tuple(int(d) for d in buf.shape)


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
