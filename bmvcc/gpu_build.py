"""Whole-model CUDA build: bmvcc kernels scheduled for the GPU, the rest through DLight, and an
exported .so that carries compiled device code (a cubin), not CUDA source. bmvcc/lowering.py runs these
stages in order.

1. `fuse`: tvm.compile's CUDA legalization and fusion (LegalizeOps, FuseOps, FuseTIR) of a module whose
   W2A8 calls passes/pad_w2a8_to_tiles.py put on the tensor-core kernel's tiles. The result's PrimFuncs
   are the tuning tasks (bmvcc/tune.py); `compile --db` applies a database to them (bmvcc/tunedb.py).
   `schedule_kernels`: the W2A8 kernels not from the database get schedules/w2a8_cuda.py's tensor-core
   schedule, norm_quant schedules/norm_quant_cuda.py, the attention compute definitions
   (passes/fuse_causal_attention.py) TVM's flash-style prefill kernel (schedules/attention_cuda.py); all are
   marked tirx.is_scheduled. Everything else (softmax, layer norms, patch embedding, head; matmuls on fp16 operands,
   passes/fp16_matmuls.py) is left to DLight (Matmul/GEMV/Reduction/GeneralReduction/Fallback) in `schedule_rest`.
2. `tvm.compile` with cp.async enabled; the device code is compiled here to a cubin for the target's arch
   (targets/cuda_export.py).
3. Export with the cubin embedded in place of the source (targets/cuda_export.py), linked by targets/cross.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifact import DEVICE_BINARY, DEVICE_DEFINITIONS, DEVICE_INFO, DEVICE_PTX
from .schedules import attention_cuda
from .schedules.w2a8 import CONFIG_ATTR, attr_value, config_of, kernel_of

PASS_CONFIG = {"tirx.use_async_copy": True}  # cp.async (LDGSTS) in the W2A8 pipeline
ATTENTION = attention_cuda.KIND


def fuse(mod, spec):
    """bmvcc's Relax module (W2A8 calls already on their kernel's padded compute definition,
    passes/pad_w2a8_to_tiles.py) -> (fused module, kernel table {PrimFunc name: entry}, read from the kernels'
    attributes): tvm.compile's CUDA library dispatch, legalization and fusion (relax.backend.cuda's legalize
    passes but the last, DLight). Nothing is scheduled yet: these PrimFuncs are `bmvcc tune`'s tasks and what
    `compile --db` applies a tuning database to, before `schedule_kernels` and DLight."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    table = {gv.name_hint: _entry(f) for gv, f in mod.functions_items()
             if kernel_of(f) in ("w2a8", "norm_quant", ATTENTION)}
    target = spec.target()
    with target:
        mod = tvm.transform.Sequential(cuda.library_dispatch_passes(target) + cuda.legalize_passes(target)[:-1])(mod)
    return mod, table


def _entry(func) -> dict:
    """A bmvcc kernel's entry in the kernel table (device.json's bmvcc_kernels): its kind, and for W2A8 the
    model's config, the padded one it computes and the knobs it is scheduled with."""
    from .passes.pad_w2a8_to_tiles import PADDED_FROM_ATTR

    if kernel_of(func) == "norm_quant":
        return {"kernel": "norm_quant"}
    if kernel_of(func) == ATTENTION:
        return {"kernel": ATTENTION, "config": attr_value(func.attrs[CONFIG_ATTR])}
    padded_from = attr_value(func.attrs[PADDED_FROM_ATTR])
    return {"kernel": "w2a8", "config": padded_from["config"], "padded": vars(config_of(func)),
            "knobs": padded_from["knobs"]}


def schedule_kernels(mod, table, spec):
    """The bmvcc kernels of a `fuse`d module that are not scheduled yet get their hand schedules: W2A8 with
    its table knobs (schedules/w2a8_cuda.py), norm_quant (schedules/norm_quant_cuda.py), attention (TVM's
    prefill kernel for spec's target, schedules/attention_cuda.py); all marked
    tirx.is_scheduled so that DLight leaves them alone. A kernel already scheduled came from a tuning
    database: its entry says so instead of naming knobs. Returns (mod, table)."""
    from tvm import s_tir

    from .schedules import w2a8_cuda
    from .schedules.kernels import schedule_of
    from .schedules.norm_quant_cuda import schedule_norm_quant_cuda
    from .schedules.w2a8 import W2A8Config

    mod, table = mod.clone(), dict(table)
    for gv, func in list(mod.functions_items()):
        entry = table.get(gv.name_hint)
        if entry is None:
            continue
        if func.attrs.get("tirx.is_scheduled", False):
            table[gv.name_hint] = {**{k: v for k, v in entry.items() if k != "knobs"}, "from_db": True}
        elif entry["kernel"] == "norm_quant":
            mod[gv] = schedule_norm_quant_cuda(func)
        elif entry["kernel"] == ATTENTION:
            mod[gv] = schedule_of(ATTENTION, "cuda")(func, spec.target())
        else:
            sch = s_tir.Schedule(func)
            w2a8_cuda.apply(sch, W2A8Config(**entry["padded"]), w2a8_cuda.W2A8CudaKnobs(**entry["knobs"]))
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod, table


def schedule_rest(mod, spec):
    """DLight's default GPU schedules (relax.backend.cuda's last legalize pass) for every PrimFunc not
    scheduled yet, its fp16 tensor-core rule without TVM's minute-long intrinsic import."""
    from tvm.relax.backend.cuda import pipeline as cuda

    from .schedules.wmma_intrinsics import dlight_wmma

    target = spec.target()
    with target, dlight_wmma():
        return cuda.legalize_passes(target)[-1](mod)


def lower(mod, spec, calls: dict):
    """The rest of tvm.compile's CUDA Relax pipeline (relax.backend.cuda) for a module whose PrimFuncs are
    all scheduled (bmvcc/lowering.py's `schedule`): dataflow lowering, finalization. Returns (module for
    tvm.compile(relax_pipeline=None), the entries of `calls` (kernel_calls before DLight) of the kernels the
    lowered main launches). Call under PASS_CONFIG."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    target = spec.target()
    with target:
        mod = tvm.transform.Sequential(cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)
    launched = _launched(mod)  # reshape kernels became views (vm.builtin.reshape) in between: no launch
    return mod, {name: stats for name, stats in calls.items() if name in launched}


def _launched(mod) -> set:
    """Names of the PrimFuncs the lowered main calls."""
    import tvm
    from tvm import relax, tirx

    names = set()

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.GlobalVar) and isinstance(mod[call.op], tirx.PrimFunc):
                names.add(call.op.name_hint)
            for arg in call.args:
                self.visit_expr(arg)

    _Calls().visit_expr(mod["main"])
    return names


def kernel_calls(mod) -> dict:
    """Per PrimFunc that main calls with call_tir: calls, bytes of its inputs and outputs (each tensor
    argument once: compulsory global-memory traffic), and TVM's static op count (None if unknown; attention:
    its config's, TVM's count of the prefill kernel's loops is meaningless)."""
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
                    n_in = len(call.args[1].fields)
                    if kernel_of(func) == ATTENTION:
                        ops = attention_cuda.attention_ops(attention_cuda.config_of(func))
                    else:
                        try:
                            ops = float(estimate_tir_flops(tvm.IRModule({"main": func})))
                        except Exception:  # noqa: BLE001  (tensorized bodies: the W2A8 MACs come from its config)
                            ops = None
                    entry = stats[gv.name_hint] = {
                        "calls": 0, "ops": ops, "bytes_read": sum(nbytes(p) for p in func.params[:n_in]),
                        "bytes_written": sum(nbytes(p) for p in func.params[n_in:])}
                entry["calls"] += 1
            for arg in call.args:
                self.visit_expr(arg)

    _Calls().visit_expr(mod["main"])
    return stats


def write_device_files(outdir: Path, cubin, kernels: dict, calls: dict, launches: dict, definitions) -> None:
    """DEVICE_BINARY, DEVICE_PTX, DEVICE_DEFINITIONS (an IRModule) and DEVICE_INFO; `kernels` is schedule_kernels'
    table, `calls` lower's and `launches` device_launches' (by PrimFunc name)."""
    import tvm

    (outdir / DEVICE_BINARY).write_bytes(cubin.data)
    (outdir / DEVICE_PTX).write_text(cubin.ptx)
    (outdir / DEVICE_DEFINITIONS).write_text(tvm.ir.save_json(definitions))
    info = {"arch": cubin.arch, "bmvcc_kernels": kernels, "calls": calls, "launches": launches,
            "resources": {r.name: vars(r) for r in cubin.resources}}
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
