"""Default CPU schedules for the float part of a compiled model (everything but bmvcc kernels).

`schedule_cpu_module(mod, target)` runs TVM's FastMathTransform and the Relax legalization and fusion
of TVM's CPU backend (tvm/relax/backend/cpu_generic: library dispatch, LegalizeOps,
AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR), then gives every PrimFunc that is neither
marked `tirx.is_scheduled` nor a bmvcc kernel (attr "bmvcc.kernel", scheduled by its own module)
the first rule that applies, and marks it scheduled:

  gemv       DLight's CPU GEMV (inner-reduction matrix x vector);
  matmul     C[b.., i, j] = sum_k A * B, with fused spatial prologue/epilogue (Linear layers, the
             batched attention matmuls): register tile MR x (NV vectors) accumulated in a local
             buffer, k directly outside the tile, row blocks sized for L2 and small enough
             that (batch, row block, column strip), the parallel loop, has a task for every core
             (where M allows), B packed per call into contiguous column strips;
  rows       row-wise reductions over the innermost axis (softmax, layer/RMS norm: reductions,
             per-row values and injective blocks that share the leading spatial axes): parallel
             over rows, each reduction split into `lanes` vector partial results (rfactor) and a
             short final reduction, injective blocks vectorized (one core: softmax 8x1024x1024
             18.9 -> 11.8 ms, LayerNorm 1024x512 1.38 -> 0.24 ms; DLight's Reduction below
             reduces one scalar at a time);
  reduction  DLight's CPU Reduction for the other reductions (same shape family, any axis),
             after inlining injective blocks read by one block only (softmax's x - max: one
             full-size buffer less, 25 -> 16 ms at 8x1024x1024);
  spatial    any other function: each block's leading spatial loops fused and parallel, and for
             injective blocks the innermost loop vectorized.

tvm.compile's default CPU pipeline does not fuse again, so the fused, scheduled functions are what
gets built. Library calls without loops (topk -> tvm.contrib.sort) are reported as "extern". A
function no rule takes keeps TVM's naive loop nest (correct, slow), is reported as None and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.target import codegen

from .w2a8 import KERNEL_ATTR

log = logging.getLogger(__name__)

A_BLOCK_BYTES = 128 * 1024  # budget for the A row block (MC x K) reused across column strips: half a small L2
MIN_PARALLEL_WORK = 4096  # fewer elements than this are not worth waking the thread pool
MAX_ROW_BLOCK = 256
DEFAULT_CORES = 8  # a target without num-cores (a cross target): enough parallel tasks for an 8-core device


@dataclass(frozen=True)
class CpuFacts:
    """What the rules need to know about the CPU, read from the TVM target."""

    vector_bits: int  # SIMD register width
    vector_registers: int  # architectural SIMD registers (register-tile budget)
    cores: int  # threads the parallel loops should keep busy (the target's num-cores)

    @staticmethod
    def of(target) -> "CpuFacts":
        # llvm_get_vector_width answers 512 for every x86 CPU in TVM 0.27 (AVX2-only znver3 included),
        # so x86 widths come from the CPU features instead.
        if target.kind.name != "llvm":
            raise ValueError(f"CPU schedules need an llvm target, got {target.kind.name}")
        cores = int(target.attrs.get("num-cores") or DEFAULT_CORES)
        if codegen.target_has_features("avx512f", target):
            return CpuFacts(512, 32, cores)
        if codegen.target_has_features("avx", target):
            return CpuFacts(256, 16, cores)
        if codegen.target_has_features("sse2", target):
            return CpuFacts(128, 16, cores)
        # aarch64 NEON (and others): LLVM's answer is right there; NEON has 32 registers.
        width = codegen.llvm_get_vector_width(target)
        registers = 32 if "aarch64" in str(target.attrs.get("mtriple", "")) else 16
        return CpuFacts(width if width > 0 else 128, registers, cores)

    def lanes(self, dtype: str) -> int:
        return max(self.vector_bits // tvm.DataType(dtype).bits, 1)


def legalize_and_fuse(mod: tvm.IRModule, target) -> tvm.IRModule:
    """TVM's CPU library dispatch, legalization and fusion (as relax.backend.cpu_generic runs them),
    after swapping transcendental functions for TVM's vectorizable fast-math versions; then the W2A8
    kernels' staging (w2a8_cpu.py), so tuning tasks and compiled kernels are the same functions."""
    from tvm.relax.backend import cpu_generic

    with target:
        # FastMathTransform: softmax/exp/erf/tanh as polynomials that vectorize (libm's expf and
        # erff do not: LLVM scalarizes them). Measured error vs float64: exp <= 1.1e-6 relative,
        # erf <= 4.2e-7 absolute, i.e. a few float32 ulps; exp clamps its input to [-88.4, 88.4],
        # so a -inf attention mask still gives a (denormal, ~1e-38) zero weight.
        seq = [relax.transform.FastMathTransform()]
        seq += cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
        mod = tvm.transform.Sequential(seq)(mod)
    from .w2a8_cpu import stage_w2a8_kernels

    return stage_w2a8_kernels(mod, target)  # W2A8 kernels in their explicit stages: the tuning tasks


def schedule_cpu_module(mod: tvm.IRModule, target, report: dict | None = None) -> tvm.IRModule:
    """Legalize, fuse and schedule `mod` for a CPU `target`; `report` (if given) gets {function: rule}."""
    return schedule_fused(legalize_and_fuse(mod, target), target, report)


def schedule_fused(mod: tvm.IRModule, target, report: dict | None = None) -> tvm.IRModule:
    """Schedule a `legalize_and_fuse`d module for a CPU `target`: bmvcc kernels by their own schedules, every
    other PrimFunc not marked tirx.is_scheduled by the first rule that applies; `report` gets {function: rule}."""
    facts = CpuFacts.of(target)
    report = {} if report is None else report
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and KERNEL_ATTR in func.attrs and not _is_scheduled(func):
            schedule = _kernel_schedule(str(func.attrs[KERNEL_ATTR]))
            if schedule is not None:
                updates[gv] = schedule(func, target)
                report[gv.name_hint] = "kernel:" + str(func.attrs[KERNEL_ATTR])
            continue
        if not isinstance(func, tirx.PrimFunc) or KERNEL_ATTR in func.attrs or _is_scheduled(func):
            continue
        name = gv.name_hint
        if _is_extern_call(func):  # e.g. topk -> tvm.contrib.sort.topk: a library call, no loops
            report[name] = "extern"
            continue
        rule, sch = _apply_first_rule(name, func, target, facts)
        report[name] = rule
        if sch is not None:
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    mod = mod.clone()  # the fused module stays as it was (bmvcc tune's tasks)
    for gv, func in updates.items():
        mod[gv] = func
    unscheduled = sorted(n for n, r in report.items() if r is None)
    if unscheduled:
        log.info("no CPU schedule rule applies to %d functions (left as naive loops): %s",
                 len(unscheduled), ", ".join(unscheduled))
    return mod


def _is_extern_call(func) -> bool:
    """No block of `func` sits in a loop: nothing to schedule (a packed library call)."""
    body = func.body
    if not isinstance(body, s_tir.SBlockRealize):
        return False
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock(body.block.name_hint))
    return not isinstance(body.block.body, tirx.For) and all(not sch.get_loops(b) for b in blocks)


def _kernel_schedule(kind: str):
    """The CPU schedule of a bmvcc kernel, by its kind (schedules/kernels.py; None: left to its owner)."""
    from .kernels import schedule_of

    return schedule_of(kind, "cpu")


def _is_scheduled(func) -> bool:
    return "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


def _apply_first_rule(name: str, func, target, facts: CpuFacts):
    from tvm.s_tir import dlight

    rules = [
        ("gemv", lambda: dlight.cpu.GEMV().apply(func, target, False)),
        ("matmul", lambda: _matmul_rule(func, facts)),
        ("rows", lambda: _row_reduction_rule(func, facts)),
        ("reduction", lambda: dlight.cpu.Reduction().apply(_inline_single_use(func), target, False)),
        ("spatial", lambda: _spatial_rule(func, facts)),
    ]
    for rule, apply in rules:
        try:
            sch = apply()
        except Exception as e:  # noqa: BLE001  (a rule bug must not fail the build; it is logged)
            # A rule that matched but could not finish is a bug in the rule: say so, then try the next.
            lines = str(e).strip().splitlines() or [type(e).__name__]
            log.warning("CPU rule %s failed on %s (%s: %s); trying the next rule", rule, name,
                        type(e).__name__, lines[-1][:200])
            continue
        if sch is not None:
            return rule, sch
    return None, None


def _inline_single_use(func):
    """`func` with every spatial block that feeds exactly one block computed inside that block
    (no recomputation; a block with several readers, such as softmax's exp, stays)."""
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock(func.body.block.name_hint)):
        spatial = all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)
        if spatial and len(sch.get_consumers(block)) == 1:
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:  # not inlinable (e.g. writes an output or is not elementwise): keep it
                pass
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------------
# rows


def _row_reduction_rule(func, facts: CpuFacts):
    """Blocks over the same leading "row" axes (all but the output's last) and the last axis or not
    (per-row values such as a mean); each reduction reduces the last axis only, whose extent is a
    multiple of the vector lanes; the last block is injective."""
    sch = s_tir.Schedule(_inline_single_use(func))
    if not _has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    stmts = [sch.get(b) for b in blocks]
    if len(blocks) < 2 or _is_reduction(stmts[-1]) or not any(_is_reduction(st) for st in stmts):
        return None
    rows = len(stmts[-1].iter_vars) - 1
    extents = _static_extents(stmts[-1])
    lanes = facts.lanes(stmts[-1].writes[0].source.dtype)
    if rows < 1 or extents is None or extents[-1] % lanes:
        return None
    for b, st in zip(blocks, stmts):  # row x last axis (reduced or not), or one value per row (a mean)
        kinds = [iv.iter_type for iv in st.iter_vars]
        tails = ([tirx.IterVar.CommReduce] if _is_reduction(st) else [tirx.IterVar.DataPar]), []
        if not any(kinds == [tirx.IterVar.DataPar] * rows + t for t in tails) or not _trivially_bound(sch, b):
            return None
        if _static_extents(st) != extents[: len(kinds)]:
            return None
    partials = []  # per reduction: lanes partial results over a strided share of the row, vectorized
    for b, st in zip(blocks, stmts):
        if _is_reduction(st):
            _, lane = sch.split(sch.get_loops(b)[-1], [None, lanes])
            try:
                partials.append(sch.rfactor(lane, rows))
            except s_tir.ScheduleError:  # a reducer rfactor does not know (e.g. argmax's tuple): not ours
                return None
    row_loops = sch.get_loops(blocks[-1])
    row = sch.fuse(*row_loops[:rows]) if rows > 1 else row_loops[0]
    if _product(extents[:-1]) >= 2 and _product(extents) >= MIN_PARALLEL_WORK:
        sch.parallel(row)
    for b in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
        sch.compute_at(b, row, preserve_unit_loops=True)
    for b in sch.get_child_blocks(row):
        if any(_same_block(sch, b, p) for p in partials):
            st = sch.get(b)  # rfactor's block: partial[rows.., lane] over iters (lane, rows.., k // lanes)
            lane_var = st.writes[0].region[rows].min
            lane = _loop_of_iter(sch, b, next(i for i, iv in enumerate(st.iter_vars) if iv.var.same_as(lane_var)))
            red = _loop_of_iter(sch, b, next(i for i, iv in enumerate(st.iter_vars) if _is_reduce(iv)))
            sch.reorder(red, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(b, red)
        elif _is_reduction(sch.get(b)):  # the final reduction of `lanes` partial results
            sch.unroll(_loop_of_iter(sch, b, next(i for i, iv in enumerate(sch.get(b).iter_vars) if _is_reduce(iv))))
        elif len(sch.get(b).iter_vars) > rows:
            _, vec = sch.split(sch.get_loops(b)[-1], [None, lanes])
            sch.vectorize(vec)
    return sch


def _static_extents(block) -> list[int] | None:
    extents = [iv.dom.extent for iv in block.iter_vars]
    return [int(e) for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


def _trivially_bound(sch, block) -> bool:
    """Each block iter var is bound to its own loop, in order."""
    loops, values = sch.get_loops(block), _realize(sch, block).iter_values
    return len(loops) == len(values) and all(sch.get(lp).loop_var.same_as(v) for lp, v in zip(loops, values))


def _same_block(sch, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


def _loop_of_iter(sch, block, index: int):
    """The loop that block iter var `index` is bound to (a plain loop variable binding)."""
    value = _realize(sch, block).iter_values[index]
    return next(lp for lp in sch.get_loops(block) if sch.get(lp).loop_var.same_as(value))


# ---------------------------------------------------------------------------------------------
# matmul


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


def _matmul_rule(func, facts: CpuFacts):
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    reductions = [b for b in blocks if _is_reduction(sch.get(b))]
    if len(reductions) != 1:
        return None
    mm = _analyze_matmul(sch, reductions[0])
    if mm is None:
        return None
    at = blocks.index(reductions[0])
    for b in blocks[:at]:  # spatial prologue (e.g. a fused reshape of A)
        _try(sch.compute_inline, b)
    for b in blocks[at + 1 : -1]:  # epilogue DAG (gelu reads x twice) folds into its last block
        _try(sch.compute_inline, b)
    _tile_matmul(sch, mm, facts)
    return sch


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except s_tir.schedule.ScheduleError:
        return False


def _is_reduction(block) -> bool:
    return any(_is_reduce(iv) for iv in block.iter_vars)


def _is_reduce(iv) -> bool:
    return iv.iter_type == tirx.IterVar.CommReduce


def _analyze_matmul(sch, block) -> _Matmul | None:
    """A _Matmul if `block` is C[s_0..s_n] += X * Y over one reduction axis with a trivial loop binding."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not _trivially_bound(sch, block):
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
                   b.source if packable else None)


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


def _tile_matmul(sch, mm: _Matmul, facts: CpuFacts) -> None:
    lanes = facts.lanes(mm.dtype)
    mr, nv, nr = _register_tile(mm.m, mm.n, lanes, facts.vector_registers, mm.contiguous_j)
    strips = _product(sch.get(lp).extent for lp in mm.batch) * (mm.n // nr)
    mc = _row_block(mm.m, mm.k_extent, mr, mm.a_bytes, strips, facts.cores)
    if nv and mm.b_buffer is not None and mm.n > nr:
        _pack_columns(sch, mm, nr)
    i0, i1, i2 = sch.split(mm.i, [None, mc // mr, mr])
    if nv:
        j1, j2, j3 = sch.split(mm.j, [None, nv, lanes])
        inner_j = [j2, j3]
    else:
        j1, j3 = sch.split(mm.j, [None, nr])
        inner_j = [j3]
    # loop nest: (batch, row block, column strip) parallel | row tile | k | MR x NV x lanes register tile
    sch.reorder(*mm.batch, i0, j1, i1, mm.k, i2, *inner_j)
    outer = sch.fuse(*mm.batch, i0, j1)
    if mm.m * mm.n >= MIN_PARALLEL_WORK:
        sch.parallel(outer)
    acc = sch.cache_write(mm.block, 0, "local")
    sch.reverse_compute_at(acc, i1, preserve_unit_loops=True)
    _inline_epilogue(sch, acc, facts)
    sch.unroll(i2)
    if nv:
        sch.unroll(j2)
        sch.vectorize(j3)
    else:
        sch.unroll(j3)
    # after the loop kinds: vectorizing the update of a decomposed reduction is rejected
    init = sch.decompose_reduction(mm.block, mm.k)
    _tile_inner(sch, sch.get_loops(init)[-2:], lanes if nv else 0)
    _tile_inner(sch, sch.get_loops(acc)[-2:], lanes if nv else 0)


def _pack_columns(sch, mm: _Matmul, nr: int) -> None:
    """Copy B[..., k, j] once per call into Bp[..., j // NR, k, j % NR]: each NR-column strip the
    register tile streams becomes contiguous (no TLB-hostile row stride, one prefetch stream)."""
    reads = sch.get(mm.block).reads
    index = next(i for i, r in enumerate(reads) if r.source.same_as(mm.b_buffer))
    sch.cache_read(mm.block, index, "global")
    ndim = len(mm.b_buffer.shape)
    pack = tirx.IndexMap.from_func(lambda *idx: (*idx[:-2], idx[-1] // nr, idx[-2], idx[-1] % nr), ndim=ndim)
    sch.transform_layout(mm.block, ("read", index), pack)


def _inline_epilogue(sch, write_back, facts: CpuFacts) -> None:
    """Fold elementwise consumers (bias add, residual, gelu, ...) into the accumulator write-back;
    consumers that do not inline are scheduled as spatial blocks of their own."""
    while True:
        consumers = sch.get_consumers(write_back)
        if len(consumers) != 1 or not _try(sch.reverse_compute_inline, consumers[0]):
            break
    root = sch.get_sblock("root")
    for b in sch.get_child_blocks(root):
        if sch.get_loops(b) and not _is_parallel_anywhere(sch, b):
            _schedule_spatial_block(sch, b, facts)


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


# ---------------------------------------------------------------------------------------------
# spatial (injective, and reductions no other rule took)


def _spatial_rule(func, facts: CpuFacts):
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks:
        return None
    for b in blocks[:-1]:  # intermediate injective blocks fold into their consumers
        if not _is_reduction(sch.get(b)):
            _try(sch.compute_inline, b)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        _schedule_spatial_block(sch, b, facts)
    return sch


def _schedule_spatial_block(sch, block, facts: CpuFacts) -> None:
    """Fuse the leading spatial loops of `block` and run them in parallel; vectorize an injective
    block's innermost loop when its extent is a multiple of the vector lanes."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if not loops or not _trivially_bound(sch, block):
        return
    extents = [iv.dom.extent for iv in stmt.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return
    lead = 0
    while lead < len(loops) and stmt.iter_vars[lead].iter_type == tirx.IterVar.DataPar:
        lead += 1
    if lead == 0:
        return
    total = _product(extents)  # work of the whole block
    lanes = facts.lanes(stmt.writes[0].source.dtype) if stmt.writes else 1
    parallel_loops, vec = loops[:lead], None
    if lead == len(loops) and lanes > 1:
        if int(extents[-1]) % lanes == 0:  # split only the innermost axis: plain index arithmetic
            outer, vec = sch.split(loops[-1], [None, lanes])
            parallel_loops = loops[:-1] + [outer]
        elif total % lanes == 0 and total >= 2 * lanes:
            outer, vec = sch.split(sch.fuse(*loops), [None, lanes])
            parallel_loops = [outer]
    if vec is not None:
        sch.vectorize(vec)
    spatial = sch.fuse(*parallel_loops) if len(parallel_loops) > 1 else parallel_loops[0]
    if _product_of(sch, spatial) >= 2 and total >= MIN_PARALLEL_WORK:
        sch.parallel(spatial)


# ---------------------------------------------------------------------------------------------
# helpers


_get_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def _realize(sch, block):
    return _get_realize(sch, block)


def _try(primitive, *args) -> bool:
    try:
        primitive(*args)
        return True
    except s_tir.schedule.ScheduleError:
        return False


def _product(extents) -> int:
    n = 1
    for e in extents:
        n *= int(e)
    return n


def _product_of(sch, loop) -> int:
    return int(sch.get(loop).extent)


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
