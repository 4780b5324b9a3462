"""Fold the elementwise work behind a float matmul into it (run by cpu_default.legalize_and_fuse and
bmvcc/gpu_build.py:fuse), and for DLight the layout copies before it.

TVM's FuseOps fuses a matmul with the elementwise consumers it sees directly, but not with one behind
a reshape: the residual add after each output projection and the position embedding after the patch
embedding stay kernels of their own, one more pass over the activations each. `fold_into_matmuls(mod)`
groups each matmul call whose only reader is a spatial (loop nest without reduction) function with
that reader into one primitive function and lets FuseTIR make one PrimFunc of it; the CPU matmul rule
(cpu_rules/matmul.py) inlines the consumer into the accumulator write-back, DLight's GPU matmul rule takes it
as the epilogue. bmvcc's kernels (attr "bmvcc.kernel") are never folded: their schedules expect their own
definitions.

For DLight (`dlight=True`) only a reader that indexes each axis of the matmul's output by a loop of its own
folds (a reshape adding or dropping unit axes, an elementwise op, a transpose). DLight pads the matmul to its
tiles and reverse-inlines the reader into the padded write-back; TVM bounds that write by the reader's loops
(reverse_compute_inline's predicate), which bounds each padded axis only when each has its own loop. A reader
that fuses two axes, as attention's head merge (heads, tokens, head_dim) -> (tokens, heads * head_dim) after
P V does, is refused by TVM when its index comes through reshapes ("consumers of the cache-write stage that
are not properly inlined") and, written plainly, would be inlined with only `head * head_dim + d < width`
as the bound: the padded columns d >= head_dim would overwrite the next head's.
The other direction folds too for DLight: a copy (or cast, or zero padding) whose output only the matmul reads,
such as the patch embedding's im2col and the layout copies of float attention (the head merge above included), joins the
matmul, whose rule inlines it into its operand loads (guarded by the padding's bounds). On CPUs it does not:
its index arithmetic in the micro kernel measured slower than the copy, which runs at memory speed. A matmul of
one row (the classifier head at batch 1) also takes the function that makes that row if it works only along it,
as the final layer norm does: DLight's GeneralReduction rule runs both in one CTA. Paper-size model on Orin:
33 -> 27 launches.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax, s_tir, sym, tirx

from ..passes.relax_match import Bindings, rewrite_main
from .cpu_rules.common import has_root, inline_single_use, is_reduction
from .cpu_rules.matmul import _analyze_matmul
from .w2a8 import KERNEL_ATTR


def fold_into_matmuls(mod: tvm.IRModule, dlight: bool = False) -> tvm.IRModule:
    """`mod` (after FuseTIR) with every matmul's only, spatial, reader folded into it; for DLight's matmul rule
    (`dlight`) only readers that give each axis of the matmul's output a loop of their own, and each copy (or cast)
    that produces an operand only the matmul reads folded too (module docstring)."""
    # each callee analysed once (PrimFuncs hash by identity; a folded one is a new callee)
    kind, copies, row_prologue, reads_per_axis = map(functools.cache, (_kind, _copies, _row_prologue, _reads_per_axis))

    def folds(before, func, param: int) -> bool:
        """Whether a call of `before` whose output only parameter `param` of a call of `func` reads folds into it."""
        if kind(func) == "spatial" and kind(before) == "matmul":
            return not dlight or reads_per_axis(func, param)
        return dlight and kind(func) == "matmul" and (copies(before) or kind(before) != "matmul"
                                                      and row_prologue(before, func))

    folded: dict = {}  # (producer's callee, consumer's callee) -> name of the PrimFunc folded from them
    while (pair := _next_pair(mod, folds)) is not None:
        mod = _fuse_pair(mod, *pair, folded)
    return relax.transform.DeadCodeElimination()(mod) if folded else mod  # the PrimFuncs folded into others


def _next_pair(mod, folds):
    """(producer var, its call, consumer var, its call) of main's first pair that `folds`, or None."""
    if not any(gv.name_hint == "main" for gv in mod.get_global_vars()):
        return None
    blocks = mod["main"].body.blocks
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        return None
    b = Bindings(mod["main"])
    for consumer in b.order:
        func = _callee(mod, b.values[consumer])
        for i, arg in enumerate(b.values[consumer].args[1].fields if func is not None else ()):
            before = _callee(mod, b.values.get(arg))
            if before is not None and b.uses[arg] == 1 and folds(before, func, i):
                return arg, b.values[arg], consumer, b.values[consumer]
    return None


def _callee(mod, call):
    """The PrimFunc a call_tir calls, or None (not a call_tir, or a bmvcc kernel)."""
    if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
        return None
    func = mod[call.args[0]]
    if not isinstance(func, tirx.PrimFunc) or KERNEL_ATTR in func.attrs or len(call.args) != 2:
        return None
    return func


def _kind(func) -> str | None:
    """"matmul" (one reduction block, cpu_rules/matmul.py's kind), "spatial" (no reduction), else None."""
    sch = s_tir.Schedule(func)
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if is_reduction(sch.get(b))]
    if not reductions:
        return "spatial"
    return "matmul" if len(reductions) == 1 and _analyze_matmul(sch, reductions[0]) is not None else None


def _copies(func) -> bool:
    """Whether every block of `func` (no reduction) stores an element it loads, at most cast, or 0 outside bounds:
    a layout copy (or a zero padding, as passes/transpose_matmul_weights.py's of the patch embedding's K)."""
    sch = s_tir.Schedule(func)
    if not has_root(sch):
        return False
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    values = [b.body.value if isinstance(b.body, tirx.BufferStore) else None for b in blocks]
    values = [padded[1] if (padded := zero_padding(v)) else v for v in values]
    values = [v.value if isinstance(v, tirx.Cast) else v for v in values]
    return all(isinstance(v, tvm.ir.TensorLoad) for v in values)


def zero_padding(value):
    """(in bounds, element) of a stored value if_then_else(in bounds, element, 0), else None."""
    if (isinstance(value, tvm.ir.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else"))
            and isinstance(value.args[2], (tirx.FloatImm, tirx.IntImm)) and value.args[2].value == 0):
        return value.args[0], value.args[1]
    return None


def _row_prologue(producer, matmul) -> bool:
    """Whether `matmul` multiplies one row by a matrix and `producer`, which makes that row, only works along it
    (every block's iterators span one element or the whole row, as a layer norm's): DLight's GeneralReduction rule
    schedules the two in one CTA, the row's statistics reduced across its threads, each output a reduction of them."""
    (*rows, _), (*lead, width) = matmul.params[-1].shape, producer.params[-1].shape
    sch = s_tir.Schedule(producer)
    if not (has_root(sch) and _constant(width) and all(_constant(d) == 1 for d in (*rows, *lead))):
        return False
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return all(_constant(iv.dom.extent) in (1, _constant(width)) for b in blocks for iv in b.iter_vars)


def _constant(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _reads_per_axis(func, param: int) -> bool:
    """Whether every read of `func`'s parameter `param` (its single-use blocks inlined) indexes each axis by an
    iterator of the reading block that spans it, a different one per axis (0 on a unit axis), and the block has
    no other iterator but unit ones: one element per iteration, no axis split, fused, offset or broadcast."""
    sch = s_tir.Schedule(inline_single_use(func))
    buffer = sch.mod["main"].params[param]
    for block in (sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))):
        analyzer = sym.Analyzer()
        for iv in block.iter_vars:
            analyzer.bind(iv.var, iv.dom)
        unit = [analyzer.can_prove_equal(iv.dom.extent, 1) for iv in block.iter_vars]
        for read in (r for r in block.reads if r.source.same_as(buffer)):
            used = set()
            for axis, extent in zip(read.region, buffer.shape):
                index = analyzer.simplify(axis.min)
                at = [i for i, iv in enumerate(block.iter_vars) if iv.var.same_as(index)]
                if not analyzer.can_prove_equal(axis.extent, 1):
                    return False
                if at and at[0] not in used and analyzer.can_prove_equal(block.iter_vars[at[0]].dom.extent, extent):
                    used.add(at[0])
                elif not (analyzer.can_prove_equal(extent, 1) and analyzer.can_prove_equal(index, 0)):
                    return False
            if not all(unit[i] or i in used for i in range(len(unit))):
                return False
    return True


def _fuse_pair(mod, producer, first, consumer, second, folded: dict) -> tvm.IRModule:
    """Replace the producer's and the consumer's bindings (vars and calls) by one call of a primitive function
    holding both calls, then FuseTIR; `folded` records the pair's callees, so the same pair in another layer calls
    the PrimFunc folded there."""
    outside = [a for a in first.args[1].fields] + [a for a in second.args[1].fields if not a.same_as(producer)]
    key = (first.args[0].name_hint, second.args[0].name_hint)
    fused = next((gv for gv in mod.get_global_vars() if gv.name_hint == folded.get(key)), None)
    if fused is not None:  # (gone once folded further and called no more: then folded again)
        return _rebind(mod, producer, consumer, relax.call_tir(fused, outside, second.ty))
    name = f"{first.args[0].name_hint}_{second.args[0].name_hint.removeprefix('fused_')}"
    params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(outside)]
    inner = dict(zip(outside, params))
    bb = relax.BlockBuilder(mod)
    with bb.function(name, params, {"Primitive": True}, private=True):
        with bb.dataflow():
            mid = bb.emit(relax.call_tir(first.args[0], [inner[a] for a in first.args[1].fields], first.ty))
            args = [mid if a.same_as(producer) else inner[a] for a in second.args[1].fields]
            out = bb.emit_output(relax.call_tir(second.args[0], args, second.ty))
        gv = bb.emit_func_output(out)
    folded[key] = gv.name_hint
    return relax.transform.FuseTIR()(_rebind(bb.get(), producer, consumer, relax.Call(gv, outside)))


def _rebind(mod, producer, consumer, call) -> tvm.IRModule:
    """main without the producer's binding (rewrite_main drops a binding rewritten to None) and with the consumer's
    var bound to `call`."""
    return rewrite_main(mod, {producer: None, consumer: call}, lambda _rewriter, _binding, plan: plan)
