"""Whole-model CUDA build: bmvcc kernels scheduled for the GPU, the rest through DLight, and an
exported .so that carries compiled device code (a cubin), not CUDA source. bmvcc/lowering.py runs these
stages in order.

1. `fuse`: each W2A8 call_tir is rewritten to call schedules/w2a8.py's compute definition on a shape that
   is a multiple of the tensor-core kernel's tiles: when the GEMM is not, its operands are padded
   (q with 0, packed weights with 0x55 = four zero weights, x_scale with 1, residual with 0) and the
   output sliced back: the padding contributes exactly 0. The kernel's epilogue applies GELU / adds the
   residual before its single store. Then tvm.compile's CUDA legalization and fusion (LegalizeOps,
   FuseOps, FuseTIR). The result's PrimFuncs are the tuning tasks (bmvcc/tune.py); `compile --db`
   applies a database to them here (bmvcc/tunedb.py).
   `schedule_kernels`: the W2A8 kernels not from the database get schedules/w2a8_cuda.py's tensor-core
   schedule, norm_quant schedules/norm_quant_cuda.py; both are marked tirx.is_scheduled. Everything
   else (attention, softmax, layer norms, patch embedding, head; matmuls on fp16 operands,
   passes/fp16_matmuls.py) is left to DLight (Matmul/GEMV/Reduction/GeneralReduction/Fallback) in `schedule_rest`.
2. `tvm.compile` with cp.async enabled. TVM 0.27 keeps the device module as CUDA source, compiled
   at load time by a Python callback a device running only the TVM runtime does not have; so the
   source is compiled here with the pip CUDA 12.6 toolchain (targets/cuda_toolchain.py) to a cubin
   for the target's arch.
3. Export: the serialized import tree (the blob export_library embeds) has the CUDA module's record
   rewritten from (fmt "cuda", function table, source) to (fmt "cubin", same table, cubin), which is
   exactly what TVM's CUDA runtime loads with cuModuleLoadData. The blob goes into an LLVM object
   linked with the host object by targets/cross.py.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from .artifact import DEVICE_BINARY, DEVICE_DEFINITIONS, DEVICE_INFO, DEVICE_PTX  # noqa: F401 (OUTDIR's files)
from .errors import BmvccError

PASS_CONFIG = {"tirx.use_async_copy": True}  # cp.async (LDGSTS) in the W2A8 pipeline


def _kind(func):
    """A PrimFunc's bmvcc kernel kind (attr "bmvcc.kernel"), else None."""
    from tvm import tirx

    from .schedules.w2a8 import KERNEL_ATTR

    attrs = func.attrs if isinstance(func, tirx.PrimFunc) else None
    return str(attrs[KERNEL_ATTR]) if attrs is not None and KERNEL_ATTR in attrs else None


def fuse(mod, spec):
    """bmvcc's Relax module -> (fused module, kernel table {PrimFunc name: entry}): every W2A8 call on the
    compute definition of its kernel, padded to the default knobs' tiles (w2a8_cuda.padded) and
    unscheduled, then tvm.compile's CUDA library dispatch, legalization and fusion (relax.backend.cuda's
    legalize passes but the last, DLight). Nothing is scheduled yet: these PrimFuncs are `bmvcc tune`'s
    tasks and what `compile --db` applies a tuning database to, before `schedule_kernels` and DLight."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    from .schedules import w2a8_cuda
    from .schedules.w2a8 import w2a8_compute

    def definition(cfg):
        knobs = w2a8_cuda.default_knobs(cfg)
        p = w2a8_cuda.padded(cfg, knobs)
        return p, w2a8_compute(p), {"kernel": "w2a8", "config": vars(cfg), "padded": vars(p), "knobs": vars(knobs)}

    mod, table = rewrite_w2a8_calls(mod, definition)
    table.update({gv.name_hint: {"kernel": "norm_quant"} for gv, f in mod.functions_items() if _kind(f) == "norm_quant"})
    target = spec.target()
    with target:
        mod = tvm.transform.Sequential(cuda.library_dispatch_passes(target) + cuda.legalize_passes(target)[:-1])(mod)
    return mod, table


def schedule_kernels(mod, table):
    """The bmvcc kernels of a `fuse`d module that are not scheduled yet get their hand schedules: W2A8 with
    its table knobs (schedules/w2a8_cuda.py), norm_quant (schedules/norm_quant_cuda.py); all marked
    tirx.is_scheduled so that DLight leaves them alone. A kernel already scheduled came from a tuning
    database: its entry says so instead of naming knobs. Returns (mod, table)."""
    from tvm import s_tir

    from .schedules import w2a8_cuda
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


def rewrite_w2a8_calls(mod, kernel_for):
    """Every call of a W2A8 PrimFunc -> a call of kernel_for(cfg) = (padded cfg, PrimFunc of it, table
    entry), with operands padded and the output sliced when the padded shape differs. The kernel applies
    the epilogue (GELU, + residual) itself. Returns (mod, {new PrimFunc: entry})."""
    import tvm
    from tvm import relax

    from .schedules.w2a8 import config_of
    from .schedules.w2a8_cuda import PACKED_ZERO

    call_tir = tvm.ir.Op.get("relax.call_tir")
    added: dict = {}
    table: dict = {}

    @relax.expr_functor.mutator
    class _W2A8(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or _kind(mod[call.args[0]]) != "w2a8":
                return call
            cfg = config_of(mod[call.args[0]])
            if cfg not in added:
                p, func, entry = kernel_for(cfg)
                suffix = "" if cfg.epilogue == "none" else f"_{cfg.epilogue}"
                gv = self.builder_.add_func(func, f"w2a8_tc_m{p.m}_n{p.n}_k{p.k}{suffix}")
                added[cfg], table[gv.name_hint] = (p, gv), entry
            p, gv = added[cfg]
            # (rows, cols, value) of padding per operand: q, packed, x_scale, w_scale (none), residual
            pads = [(p.m - cfg.m, p.k - cfg.k, 0), (p.n - cfg.n, p.k_packed - cfg.k_packed, PACKED_ZERO),
                    (p.m - cfg.m, 0, 1.0), (0, 0, None), (p.m - cfg.m, p.n - cfg.n, 0.0)]
            kernel_args = [self.builder_.emit(relax.op.nn.pad(a, [0, rows, 0, cols], pad_value=value))
                           if rows or cols else a for a, (rows, cols, value) in zip(call.args[1].fields, pads)]
            out = relax.call_tir(gv, kernel_args, relax.TensorType((p.m, p.n), "float32"))
            if p == cfg:
                return out
            return relax.op.strided_slice(self.builder_.emit(out), axes=[0, 1], begin=[0, 0], end=[cfg.m, cfg.n],
                                          assume_inbound=True)

    mutator = _W2A8(mod)
    main = mutator.visit_expr(mod["main"])
    out = mutator.builder_.get()
    out["main"] = main
    out = relax.transform.DeadCodeElimination(["main"])(out)  # the replaced W2A8 PrimFuncs
    return out, table


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
    argument once: compulsory global-memory traffic), and TVM's static op count (None if unknown)."""
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


def compile_device(executable, arch: str):
    """The CUDA module of `executable` compiled to a cubin (and its source); exactly one is expected."""
    from .targets import cuda_toolchain

    cuda = executable.mod._collect_from_import_tree(lambda m: m.kind == "cuda")
    if len(cuda) != 1:
        raise BmvccError(f"expected one CUDA device module in the build, found {len(cuda)}; this is a bmvcc bug")
    source = cuda[0].inspect_source("cuda")
    return source, cuda_toolchain.compile_cuda(source, arch)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def embed_cubin(blob: bytes, source: str, cubin: bytes) -> bytes:
    """The serialized import tree `blob` with its CUDA record turned from source into `cubin`.

    Layout (TVM's ModuleSerializer; strings are u64 length + bytes): u64 size of the rest | ... |
    "cuda" | u64 record size | record = fmt "cuda" | function table | data (the CUDA source)."""
    src = source.encode()
    head = _u64(4) + b"cuda"
    starts = [m.start() for m in re.finditer(re.escape(head), blob)
              if blob[m.end() + 8: m.end() + 20] == head]  # kind "cuda", record size, fmt "cuda"
    if len(starts) != 1 or struct.unpack_from("<Q", blob)[0] != len(blob) - 8:
        raise BmvccError("unexpected layout of TVM's serialized CUDA module; this is a bmvcc bug")
    size_at = starts[0] + len(head)
    record = size_at + 8
    end = record + struct.unpack_from("<Q", blob, size_at)[0]
    data_at = end - len(src) - 8
    if struct.unpack_from("<Q", blob, data_at)[0] != len(src) or blob[data_at + 8: end] != src:
        raise BmvccError("the serialized CUDA module does not end with its source; this is a bmvcc bug")
    fmap = blob[record + len(head): data_at]
    new_record = _u64(5) + b"cubin" + fmap + _u64(len(cubin)) + cubin
    rest = blob[8:size_at] + _u64(len(new_record)) + new_record + blob[end:]
    return _u64(len(rest)) + rest


def pack_imports(source: str, cubin: bytes):
    """An export_library `fpack_imports`: TVM's LLVM packing of the import tree (the object export_library
    makes without one), with the cubin embedded. An object, not C: a C compiler would record the build's
    directories (debug info names the source file and the cwd) in the .so."""
    import tvm_ffi

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        host = next(m for m in mod._collect_dso_modules() if m.kind == "llvm")
        obj = tvm_ffi.get_global_func("codegen.codegen_blob")(
            embed_cubin(blob, source, cubin), is_system_lib, host.get_function("_get_target_string")(), prefix)
        path = Path(workspace_dir) / f"{prefix}devc.o"
        obj.write_to_file(str(path))
        return str(path)

    return fpack


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
    return launches, tvm.IRModule({name: definitions[name] for name in calls})
