"""Fold the elementwise work behind a float matmul into it (run by cpu_default.legalize_and_fuse).

TVM's FuseOps fuses a matmul with the elementwise consumers it sees directly, but not with one behind
a reshape: the residual add after each output projection and the position embedding after the patch
embedding stay kernels of their own, one more pass over the activations each. `fold_into_matmuls(mod)`
groups each matmul call whose only reader is a spatial (loop nest without reduction) function with
that reader into one primitive function and lets FuseTIR make one PrimFunc of it; the matmul rule
(cpu_rules/matmul.py) inlines the consumer into the accumulator write-back. bmvcc's kernels (attr
"bmvcc.kernel") are never folded: their schedules expect their own definitions.

The other direction, a layout copy folded into the matmul's A loads (the head transpose before the
output projection), is not done: its index arithmetic in the micro kernel measured slower than the
copy, which runs at memory speed.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx

from .cpu_rules.common import has_root, is_reduction
from .cpu_rules.matmul import _analyze_matmul
from .w2a8 import KERNEL_ATTR


def fold_into_matmuls(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` (after FuseTIR) with every matmul's only, spatial, reader folded into it."""
    folded = False
    while (pair := _next_pair(mod)) is not None:
        mod, folded = _fuse_pair(mod, *pair), True
    return relax.transform.DeadCodeElimination()(mod) if folded else mod  # the PrimFuncs folded into others


def _next_pair(mod):
    """(matmul binding, its reader's binding) of main's first foldable pair, or None."""
    if not any(gv.name_hint == "main" for gv in mod.get_global_vars()):
        return None
    main = mod["main"]
    blocks = main.body.blocks
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        return None
    bindings = blocks[0].bindings
    readers: dict = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            readers[v] = readers.get(v, 0) + 1
    for v in relax.analysis.free_vars(main.body.body):
        readers[v] = readers.get(v, 0) + 1
    producers = {b.var: b for b in bindings if _callee(mod, b) is not None}
    for consumer in bindings:
        func = _callee(mod, consumer)
        if func is None or _kind(func) != "spatial":
            continue
        for arg in consumer.value.args[1].fields:
            producer = producers.get(arg)
            if producer is not None and readers[arg] == 1 and _kind(_callee(mod, producer)) == "matmul":
                return producer, consumer
    return None


def _callee(mod, binding):
    """The PrimFunc a binding's call_tir calls, or None (not a call_tir, or a bmvcc kernel)."""
    call = binding.value
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


def _fuse_pair(mod, producer, consumer) -> tvm.IRModule:
    """Replace the two bindings by one call of a primitive function holding both calls, then FuseTIR."""
    first, second = producer.value, consumer.value
    outside = [a for a in first.args[1].fields] + [a for a in second.args[1].fields if not a.same_as(producer.var)]
    name = f"{first.args[0].name_hint}_{second.args[0].name_hint.removeprefix('fused_')}"
    fused = next((gv for gv in mod.get_global_vars() if gv.name_hint == name), None)
    if fused is not None:  # the same pair in another layer: call the PrimFunc folded there
        return _rebind(mod, producer, consumer, relax.call_tir(fused, outside, second.ty))
    params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(outside)]
    inner = dict(zip(outside, params))
    bb = relax.BlockBuilder(mod)
    with bb.function(name, params, {"Primitive": True}, private=True):
        with bb.dataflow():
            mid = bb.emit(relax.call_tir(first.args[0], [inner[a] for a in first.args[1].fields], first.ty))
            args = [mid if a.same_as(producer.var) else inner[a] for a in second.args[1].fields]
            out = bb.emit_output(relax.call_tir(second.args[0], args, second.ty))
        gv = bb.emit_func_output(out)
    return relax.transform.FuseTIR()(_rebind(bb.get(), producer, consumer, relax.Call(gv, outside)))


def _rebind(mod, producer, consumer, call) -> tvm.IRModule:
    """main without the producer's binding and with the consumer's var bound to `call`."""
    main = mod["main"]
    bindings = [relax.VarBinding(b.var, call) if b.var.same_as(consumer.var) else b
                for b in main.body.blocks[0].bindings if not b.var.same_as(producer.var)]
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], main.body.body)
    mod = mod.clone()
    mod["main"] = relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)
    return mod
