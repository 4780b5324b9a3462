"""cp.async pipelines for the operand copies of the fp16 matmuls DLight's tensor-core rule schedules.

Matches the reduction loop k0 that DLight's MatmulTensorization (tvm/s_tir/dlight/gpu/matmul.py) software-
pipelines (order [0, 3, 1, 4, 5, 2, 6], stage [0, 0, 0, 0, 0, 1, 1]) over its children: the global -> shared.dyn
copy of each operand, each annotated "tirx.manifest_shared_memory_local_stage" (a load into registers, then a
shared store: two pipeline statements), and the inner k1 pipeline (prologue, body, epilogue once expanded).
Changes, where at least one copy is plain: that copy loses its register stage and so lowers to cp.async
(LDGSTS), and k0 gets TVM's own async arrangement (MetaSchedule's tensor-core rule): the plain copies in async
stage 0, the k1 prologue in stage 1, its body and epilogue in stage 2, so two tiles are in flight while one is
computed (three shared buffers per plain copy); order: the copies' global reads, the k1 body, the register copies'
shared stores, the k1 prologue, the k1 epilogue.
A plain copy stores a global element of its own dtype (or that element where a lane-invariant padding
condition holds, else 0: cp.async's zero fill) and reads global memory contiguously along its vectorized lanes:
cp.async moves 4, 8 or 16 contiguous bytes, and TVM's InjectPTXAsyncCopy takes a strided vector load's base
address as if it were contiguous. A copy that computes (the patch embedding's im2col + cast) or reads strided (a
weight stored [K, N], which the rule transposes into [N, K] in shared memory; passes/transpose_matmul_weights.py
stores constant ones [N, K]) keeps its register stage, both its
statements in stage 1 (in async stage 0 TVM commits a cp.async group for its shared store as well, and the k1
prologue's wait then leaves the plain copy's tile in flight: a race).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

from .matmul_fold import zero_padding

DLIGHT_ORDER, DLIGHT_STAGE = [0, 3, 1, 4, 5, 2, 6], [0, 0, 0, 0, 0, 1, 1]
REGISTER_STAGE = "tirx.manifest_shared_memory_local_stage"
K1_STATEMENTS = 3  # the inner pipeline's prologue, body, epilogue


def async_operand_copies(func: tirx.PrimFunc, max_shared_bytes: int) -> tirx.PrimFunc:
    """func with its plain operand copies on cp.async (module docstring); func itself where nothing matches.
    A plain copy keeps its register stage where its third shared buffer would take the kernel's dynamic shared
    memory above `max_shared_bytes` (the target's per-block limit: sm_86's 99 KB holds one, not two)."""
    sch = s_tir.Schedule(func)
    changed = False
    for k0, copies in _dlight_pipelines(sch):
        plain = [_is_plain_copy(sch, c) for c in copies]
        tiles = [_tile_bytes(sch, c, k0) for c in copies]
        while any(plain) and sum((3 if p else 2) * t for p, t in zip(plain, tiles)) > max_shared_bytes:
            plain[max(i for i, p in enumerate(plain) if p)] = False
        if not any(plain):
            continue
        for copy, async_ in zip(copies, plain):
            if async_:
                sch.unannotate(copy, REGISTER_STAGE)
                sch.unannotate(copy, "double_buffer_scope")
        stage, order = _async_pipeline(plain)
        for key, value in (("software_pipeline_stage", stage), ("software_pipeline_order", order)):
            sch.unannotate(k0, key)  # annotate keeps a key's first value
            sch.annotate(k0, key, value)
        sch.annotate(k0, "software_pipeline_async_stages", [0])
        changed = True
    return sch.mod["main"] if changed else func


def _async_pipeline(plain: list[bool]) -> tuple[list[int], list[int]]:
    """(stage, order) of k0's statements: per copy one (plain) or two (register load, shared store), then k1's."""
    stage, reads, stores = [], [], []  # statement indices
    for async_ in plain:
        reads.append(len(stage))
        stage.append(0 if async_ else 1)
        if not async_:
            stores.append(len(stage))
            stage.append(1)
    n = len(stage)
    prologue, body, epilogue = range(n, n + K1_STATEMENTS)
    sequence = reads + [body] + stores + [prologue, epilogue]
    return stage + [1, 2, 2], [sequence.index(i) for i in range(n + K1_STATEMENTS)]


def _dlight_pipelines(sch) -> list:
    """[(k0 loop, [its copy blocks in order])] of the loops DLight's tensor-core rule pipelined."""
    found = []
    for block in _blocks(sch, sch.get_sblock("root")):
        if REGISTER_STAGE not in sch.get(block).annotations:
            continue
        k0 = next((loop for loop in sch.get_loops(block) if _is_dlight_k0(sch.get(loop))), None)
        if k0 is None:
            continue
        entry = next((e for e in found if sch.get(e[0]).same_as(sch.get(k0))), None)
        if entry is None:
            found.append((k0, [block]))
        else:
            entry[1].append(block)
    return [e for e in found if len(e[1]) == 2]  # A and B: DLight's seven statements


def _blocks(sch, parent) -> list:
    children = sch.get_child_blocks(parent)
    return [b for c in children for b in [c, *_blocks(sch, c)]]


def _is_dlight_k0(loop) -> bool:
    ann = loop.annotations
    return ([int(x) for x in ann.get("software_pipeline_order", [])] == DLIGHT_ORDER
            and [int(x) for x in ann.get("software_pipeline_stage", [])] == DLIGHT_STAGE)


def _tile_bytes(sch, block_rv, k0) -> int:
    """Bytes of one shared buffer of the copy: the tile its loops below k0 fill, [rows, L] with L = the reindexed
    buffer's last axis (K) / k0's extent, each row padded as the block's storage_align (buffer_dim_align) asks."""
    block, loops = sch.get(block_rv), sch.get_loops(block_rv)
    below = [sch.get(lp) for lp in loops[[sch.get(lp).same_as(sch.get(k0)) for lp in loops].index(True) + 1:]]
    elements = 1
    for loop in below:
        elements *= int(loop.extent)
    buffer = block.writes[0].source
    row = int(buffer.shape[-1]) // int(sch.get(k0).extent)
    padded = row
    for _, axis, factor, offset in block.annotations.get("buffer_dim_align", ()):
        if int(axis) == len(buffer.shape) - 2:  # the stride of the rows
            while padded % int(factor) != int(offset):
                padded += 1
    return elements // row * padded * tvm.DataType(str(buffer.dtype)).bits // 8


def _is_plain_copy(sch, block_rv) -> bool:
    """The copy stores a global element of its dtype, optionally padded with 0 under a lane-invariant condition,
    and its load and store are contiguous along its vectorized loop (the block's innermost)."""
    block, realize = sch.get(block_rv), get_sblockrealize(sch, block_rv)
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        return False
    condition, value = zero_padding(store.value) or (None, store.value)
    if not isinstance(value, tvm.ir.TensorLoad):
        return False
    source, target = value.source.ty, store.buffer.ty
    if source.storage_scope != "global" or str(source.dtype) != str(target.dtype):
        return False
    loops = [sch.get(loop) for loop in sch.get_loops(block_rv)]
    lanes = loops[-1]
    if lanes.kind != tirx.ForKind.VECTORIZED or not isinstance(lanes.extent, tirx.IntImm) or len(value.source.strides):
        return False  # cp.async copies from a dense buffer (strides empty) only
    if int(lanes.extent) * tvm.DataType(str(target.dtype)).bits // 8 not in (4, 8, 16):
        return False
    lane, this, next_lane = lanes.loop_var, tirx.Var("this", lanes.loop_var.ty), tirx.Var("next", lanes.loop_var.ty)

    def at(var, lo: int, hi: int):  # analyzer: block vars -> their value at lane var in [min + lo, min + extent + hi)
        a = sym.Analyzer()
        for loop in loops[:-1]:
            a.bind(loop.loop_var, tvm.ir.Range.from_min_extent(loop.min, loop.extent))
        a.bind(var, tvm.ir.Range(lanes.min + lo, lanes.min + lanes.extent + hi))
        a.bind(lane, var)
        for iv, v in zip(block.iter_vars, realize.iter_values):
            a.bind(iv.var, v)
        return a

    here, there = at(this, 0, -1), at(next_lane, 1, 0)  # a lane but the last; the next one
    here.bind(next_lane, this + 1)

    def contiguous(indices) -> bool:  # the next lane: the next element of the last axis
        steps = [here.simplify(there.simplify(i) - here.simplify(i)) for i in indices]
        return all(_is(s, 0) for s in steps[:-1]) and _is(steps[-1], 1)

    invariant = condition is None or tvm_ffi.structural_equal(here.simplify(condition), there.simplify(condition))
    return invariant and contiguous(value.indices) and contiguous(store.indices)


def _is(expr, n: int) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == n
