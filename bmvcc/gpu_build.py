"""Whole-model CUDA build: bmvcc kernels scheduled for the GPU, the rest through DLight, and an
exported .so that carries compiled device code (a cubin), not CUDA source. bmvcc/lowering.py runs these
stages in order.

1. `fuse`: tvm.compile's CUDA legalization and fusion (LegalizeOps, FuseOps, FuseTIR) of a module whose
   W2A8 calls passes/pad_w2a8_to_tiles.py put on the tensor-core kernel's tiles. The result's PrimFuncs
   are the tuning tasks (bmvcc/tune.py); `compile --db` applies a database to them (bmvcc/tunedb.py).
   `schedule_kernels`: the W2A8 kernels not from the database get schedules/w2a8_cuda.py's tensor-core
   schedule, norm_quant schedules/norm_quant_cuda.py's, the attention compute definitions
   (passes/fuse_causal_attention.py) bmvcc's fp16 tensor-core flash kernel (schedules/attention_cuda_tc.py; TVM's
   flash-style prefill kernel, schedules/attention_cuda.py, for shapes it does not take), the LayerNorm + float
   projection calls (passes/fuse_norm_matmul.py) schedules/norm_matmul_cuda.py's tensor-core kernel, all through
   schedules/kernels.py and marked tirx.is_scheduled. Everything else (softmax, layer norms, patch embedding, head;
   matmuls on fp16 operands, passes/fp16_matmuls.py) is left to DLight (Matmul/GEMV/Reduction/GeneralReduction/Fallback) in `schedule_rest`,
   which then moves the plain operand copies of DLight's tensor-core matmuls to cp.async (schedules/async_operand_copies.py).
2. `tvm.compile` with cp.async enabled and TVM's CUDA graph rewrite (PASS_CONFIG); the device code is compiled
   here to a cubin for the target's arch (targets/cuda_export.py).
3. Export with the cubin embedded in place of the source (targets/cuda_export.py), linked by targets/cross.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifact import DEVICE_BINARY, DEVICE_DEFINITIONS, DEVICE_INFO, DEVICE_PTX
from .portable_ir import portable_json
from .schedules.kernels import KERNELS, scheduler_of
from .schedules.w2a8 import CONFIG_ATTR, attr_value, config_of, kernel_of

# cp.async (LDGSTS) in the W2A8 pipeline; TVM's RewriteCUDAGraph (in relax.backend.cuda's finalize passes) lifts
# the kernels whose arguments all live in statically planned memory or are weights into one CUDA graph the Relax VM
# captures on the first call and replays after: one graph launch instead of a launch per kernel
PASS_CONFIG = {"tirx.use_async_copy": True, "relax.backend.use_cuda_graph": True}
RUN_OR_CAPTURE = "vm.builtin.cuda_graph.run_or_capture"


def fuse(mod, spec):
    """bmvcc's Relax module (W2A8 calls already on their kernel's padded compute definition,
    passes/pad_w2a8_to_tiles.py) -> (fused module, kernel table {PrimFunc name: entry}, read from the kernels'
    attributes): tvm.compile's CUDA library dispatch, legalization and fusion (relax.backend.cuda's legalize
    passes but the last, DLight), then each float matmul's elementwise reader behind a reshape folded into it
    where it reads each axis of the matmul's output by a loop of its own, and each copy that only the matmul reads
    (and a one-row matmul's layer norm; schedules/matmul_fold.py: DLight's rules take them in). Nothing is
    scheduled yet: these PrimFuncs are `bmvcc tune`'s tasks and what `compile --db` applies a tuning database to,
    before `schedule_kernels` and DLight."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    from .schedules.matmul_fold import fold_into_matmuls

    table = {gv.name_hint: _entry(f) for gv, f in mod.functions_items()
             if (kernel_of(f), "cuda") in KERNELS}
    target = spec.target()
    with target:
        mod = tvm.transform.Sequential(cuda.library_dispatch_passes(target) + cuda.legalize_passes(target)[:-1])(mod)
    return fold_into_matmuls(mod, dlight=True), table


def _entry(func) -> dict:
    """A bmvcc kernel's entry in the kernel table (device.json's bmvcc_kernels): its kind and config (where it has
    one), and for one padded to its tiles (W2A8: passes/pad_w2a8_to_tiles.py) the model's config, the padded one it
    computes and the knobs it is scheduled with."""
    from .passes.pad_w2a8_to_tiles import PADDED_FROM_ATTR

    entry = {"kernel": kernel_of(func)}
    if PADDED_FROM_ATTR in func.attrs:
        padded_from = attr_value(func.attrs[PADDED_FROM_ATTR])
        return {**entry, "config": padded_from["config"], "padded": vars(config_of(func)),
                "knobs": padded_from["knobs"]}
    return {**entry, "config": attr_value(func.attrs[CONFIG_ATTR])} if CONFIG_ATTR in func.attrs else entry


def schedule_kernels(mod, table, spec):
    """The bmvcc kernels of a `fuse`d module that are not scheduled yet get their kind's CUDA hand schedule
    (schedules/kernels.py; W2A8's with its table knobs), marked tirx.is_scheduled so that DLight leaves them alone.
    A kernel already scheduled came from a tuning database: its entry says so instead of naming knobs. Returns
    (mod, table)."""
    from .schedules.kernels import schedule_of
    from .schedules.w2a8_cuda import W2A8CudaKnobs

    mod, table, target = mod.clone(), dict(table), spec.target()
    for gv, func in list(mod.functions_items()):
        entry = table.get(gv.name_hint)
        if entry is None:
            continue
        if func.attrs.get("tirx.is_scheduled", False):
            table[gv.name_hint] = {**{k: v for k, v in entry.items() if k != "knobs"}, "from_db": True}
        else:
            knobs = W2A8CudaKnobs(**entry["knobs"]) if "knobs" in entry else None
            mod[gv] = schedule_of(entry["kernel"], "cuda")(func, target, knobs)
    return mod, table


def schedule_rest(mod, spec):
    """DLight's default GPU schedules (relax.backend.cuda's last legalize pass) for every PrimFunc not
    scheduled yet, its fp16 tensor-core rule without TVM's minute-long intrinsic import; then the plain operand
    copies of the matmuls that rule scheduled on cp.async (schedules/async_operand_copies.py)."""
    from tvm import tirx
    from tvm.relax.backend.cuda import pipeline as cuda

    from .schedules.async_operand_copies import async_operand_copies
    from .schedules.wmma_intrinsics import dlight_wmma

    target = spec.target()
    with target, dlight_wmma():
        mod = cuda.legalize_passes(target)[-1](mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = async_operand_copies(func, spec.facts["max_shared_bytes_per_block"])
    return mod


def lower(mod, spec, calls: dict):
    """The rest of tvm.compile's CUDA Relax pipeline (relax.backend.cuda) for a module whose PrimFuncs are
    all scheduled (bmvcc/lowering.py's `schedule`): dataflow lowering, finalization (with RewriteCUDAGraph).
    Returns (module for tvm.compile(relax_pipeline=None), the entries of `calls` (kernel_calls before DLight) of
    the kernels the lowered main launches, each with "captured": its calls inside the CUDA graph, the CUDA graph
    launches per run). Call under PASS_CONFIG."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    target = spec.target()
    # main(image, w0, w1, ...) (bmvcc/runtime.py passes the same weight tensors on every call): the parameters after
    # the first are static for RewriteCUDAGraph, so kernels that read weights can be captured too
    mod = mod.clone()
    mod["main"] = mod["main"].with_attr("num_input", 1)
    with target:
        mod = tvm.transform.Sequential(cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)
    direct, captured, graphs = _launched(mod)  # reshape kernels became views (vm.builtin.reshape): no launch
    return mod, {name: {**stats, "captured": captured.get(name, 0)} for name, stats in calls.items()
                 if name in direct or name in captured}, graphs


def _launched(mod) -> tuple[dict, dict, int]:
    """({PrimFunc name: calls from the lowered main}, {PrimFunc name: calls inside CUDA graphs}, CUDA graph launches),
    per run of main."""
    import tvm
    from tvm import relax, tirx

    def calls(func, counts: dict, graphs: list) -> dict:
        @relax.expr_functor.visitor
        class _Calls(relax.PyExprVisitor):
            def visit_call_(self, call):
                if isinstance(call.op, tvm.ir.GlobalVar) and isinstance(mod[call.op], tirx.PrimFunc):
                    counts[call.op.name_hint] = counts.get(call.op.name_hint, 0) + 1
                extern = call.args[0] if call.args and isinstance(call.args[0], relax.ExternFunc) else None
                if extern is not None and extern.global_symbol == RUN_OR_CAPTURE:
                    graphs.append(call.args[1].fields[0])  # (the capture function, its arguments, ...)
                for arg in call.args:
                    self.visit_expr(arg)

        _Calls().visit_expr(func)
        return counts

    graphs: list = []
    direct = calls(mod["main"], {}, graphs)
    captured: dict = {}
    for capture in graphs:
        calls(mod[capture], captured, [])
    return direct, captured, len(graphs)


def kernel_calls(mod) -> dict:
    """Per PrimFunc that main calls with call_tir: calls, bytes of its inputs and outputs (each tensor
    argument once, also one passed twice: compulsory global-memory traffic), and TVM's static op count (None if
    unknown; a bmvcc kernel whose scheduler offers `kernel_ops` (schedules/kernels.py): that count, where TVM's of
    the loops is meaningless or counts the wrong work)."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.s_tir.analysis import estimate_tir_flops

    call_tir = tvm.ir.Op.get("relax.call_tir")
    stats: dict = {}

    def nbytes(param) -> int:
        return int(np.prod([int(d) for d in param.shape])) * tvm.DataType(param.dtype).bits // 8

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            if call.op.same_as(call_tir):
                gv = call.args[0]
                entry = stats.get(gv.name_hint)
                if entry is None:
                    func = mod[gv]
                    inputs = call.args[1].fields
                    n_in = len(inputs)
                    distinct = [p for i, p in enumerate(func.params[:n_in])
                                if not any(inputs[i].same_as(x) for x in inputs[:i])]
                    if (kernel_ops := getattr(scheduler_of(kernel_of(func), "cuda"), "kernel_ops", None)) is not None:
                        ops = kernel_ops(func)
                    else:
                        try:
                            ops = float(estimate_tir_flops(tvm.IRModule({"main": func})))
                        except Exception:  # noqa: BLE001  (tensorized bodies: the W2A8 MACs come from its config)
                            ops = None
                    entry = stats[gv.name_hint] = {
                        "calls": 0, "ops": ops, "bytes_read": sum(nbytes(p) for p in distinct),
                        "bytes_written": sum(nbytes(p) for p in func.params[n_in:])}
                entry["calls"] += 1
            for arg in call.args:
                self.visit_expr(arg)

    _Calls().visit_expr(mod["main"])
    return stats


def write_device_files(outdir: Path, cubin, kernels: dict, calls: dict, launches: dict, definitions,
                       graphs: int) -> None:
    """DEVICE_BINARY, DEVICE_PTX, DEVICE_DEFINITIONS (an IRModule) and DEVICE_INFO; `kernels` is schedule_kernels'
    table, `calls` and `graphs` (CUDA graph launches per run) lower's and `launches` device_launches' (by PrimFunc
    name)."""
    import tvm

    (outdir / DEVICE_BINARY).write_bytes(cubin.data)
    (outdir / DEVICE_PTX).write_text(cubin.ptx)
    (outdir / DEVICE_DEFINITIONS).write_text(portable_json(tvm.ir.save_json(definitions)))
    info = {"arch": cubin.arch, "bmvcc_kernels": kernels, "calls": calls, "launches": launches,
            "resources": {r.name: vars(r) for r in cubin.resources}, "cuda_graph_launches": graphs}
    (outdir / DEVICE_INFO).write_text(json.dumps(info, indent=1, sort_keys=True))


def device_launches(lowered, definitions, calls: dict, spec):
    """({PrimFunc name: its kernel launches as JSON}, IRModule of their compute definitions) for the PrimFuncs
    `lower` reports launched: `lowered` holds them scheduled, `definitions` (fuse's output) unscheduled."""
    import tvm

    from .ptx.launches import kernel_launches

    scheduled = tvm.IRModule({name: lowered[name].with_attr("global_symbol", name) for name in calls})
    launches = {name: [launch.to_json() for launch in found]
                for name, found in kernel_launches(scheduled, spec.target()).items()}
    from .passes.pad_w2a8_to_tiles import PADDED_FROM_ATTR

    def compute(func):  # the definition only: a kernel's configuration is device.json's
        return func.without_attr(CONFIG_ATTR).without_attr(PADDED_FROM_ATTR) if kernel_of(func) == "w2a8" else func

    return launches, tvm.IRModule({name: compute(definitions[name]) for name in calls})
