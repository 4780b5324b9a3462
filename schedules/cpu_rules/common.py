"""What the CPU rules share: the CPU's facts read from the target, block queries and the spatial block schedule."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.target import codegen

from ...targets.cpu import has_bf16_dot

MIN_PARALLEL_WORK = 4096  # fewer elements than this are not worth waking the thread pool
DEFAULT_CORES = 8  # a target without num-cores (a cross target): enough parallel tasks for an 8-core device


@dataclass(frozen=True)
class CpuFacts:
    """What the rules need to know about the CPU, read from the TVM target."""

    vector_bits: int  # SIMD register width
    vector_registers: int  # architectural SIMD registers (register-tile budget)
    cores: int  # threads the parallel loops should keep busy (the target's num-cores)
    bf16_dot: bool = False  # vdpbf16ps (targets/cpu.py has_bf16_dot): bf16 matmuls on it

    @staticmethod
    def of(target) -> "CpuFacts":
        # llvm_get_vector_width answers 512 for every x86 CPU in TVM 0.27 (AVX2-only znver3 included),
        # so x86 widths come from the CPU features instead.
        if target.kind.name != "llvm":
            raise ValueError(f"CPU schedules need an llvm target, got {target.kind.name}")
        cores = int(target.attrs.get("num-cores") or DEFAULT_CORES)
        if codegen.target_has_features("avx512f", target):
            return CpuFacts(512, 32, cores, has_bf16_dot(target))
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


def inline_single_use(func):
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


def static_extents(block) -> list[int] | None:
    extents = [iv.dom.extent for iv in block.iter_vars]
    return [int(e) for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


def trivially_bound(sch, block) -> bool:
    """Each block iter var is bound to its own loop, in order."""
    loops, values = sch.get_loops(block), realize(sch, block).iter_values
    return len(loops) == len(values) and all(sch.get(lp).loop_var.same_as(v) for lp, v in zip(loops, values))


def has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except s_tir.schedule.ScheduleError:
        return False


def is_reduction(block) -> bool:
    return any(is_reduce(iv) for iv in block.iter_vars)


def is_reduce(iv) -> bool:
    return iv.iter_type == tirx.IterVar.CommReduce


def schedule_spatial_block(sch, block, facts: CpuFacts) -> None:
    """Fuse the leading spatial loops of `block` and run them in parallel; vectorize an injective
    block's innermost loop when its extent is a multiple of the vector lanes."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if not loops or not trivially_bound(sch, block):
        return
    extents = [iv.dom.extent for iv in stmt.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return
    lead = 0
    while lead < len(loops) and stmt.iter_vars[lead].iter_type == tirx.IterVar.DataPar:
        lead += 1
    if lead == 0:
        return
    total = product(extents)  # work of the whole block
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
    if product_of(sch, spatial) >= 2 and total >= MIN_PARALLEL_WORK:
        sch.parallel(spatial)


_get_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def realize(sch, block):
    return _get_realize(sch, block)


def try_primitive(primitive, *args) -> bool:
    """Apply a schedule primitive where TVM finds it legal (e.g. an inlining); False where it refuses."""
    try:
        primitive(*args)
        return True
    except s_tir.schedule.ScheduleError:
        return False


def product(extents) -> int:
    n = 1
    for e in extents:
        n *= int(e)
    return n


def product_of(sch, loop) -> int:
    return int(sch.get(loop).extent)
