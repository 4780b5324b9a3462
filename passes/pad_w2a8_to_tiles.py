"""pad_w2a8_to_tiles (GPU targets): every W2A8 call -> a call of the tensor-core kernel's compute definition
(schedules/w2a8_cuda.py's tc_compute) on a shape that is a multiple of its tiles (default_knobs and padded).

Matches: call_tir of a PrimFunc with kernel kind "w2a8" (schedules/w2a8.py's kernel_of; its W2A8Config
from config_of). Produces: when the GEMM is not a multiple of the tiles, its operands padded (q with 0,
packed weights with 0x55 = four zero weights, x_scale with 1, residual or bias with 0) and the output
sliced back: the padding contributes exactly 0. The packed weights are then relaid out in the kernel's
TC_LAYOUT (w2a8_cuda.tc_relayout: tc_pack's steps as Relax ops, which the pipeline's next step folds at compile
time for constant weights). The kernel applies the epilogue (bias, GELU, + residual) itself.
The kernel (w2a8_tc_m{M}_n{N}_k{K}[_{epilogue}]) carries its padded W2A8Config (CONFIG_ATTR) and in
PADDED_FROM_ATTR the model's config and the knobs it is scheduled with (bmvcc/gpu_build.py reads both).
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.w2a8 import config_of, epilogue_operand
from .relax_match import Bindings, kernel_of, rewrite_main

PADDED_FROM_ATTR = "bmvcc.padded_from"  # {"config": the model's W2A8Config, "knobs": W2A8CudaKnobs}


def default_tiles(cfg):
    """(padded config, PrimFunc of it, PADDED_FROM_ATTR value) for the default knobs of cfg."""
    from ..schedules import w2a8_cuda

    knobs = w2a8_cuda.default_knobs(cfg)
    p = w2a8_cuda.padded(cfg, knobs)
    return p, w2a8_cuda.tc_compute(p), {"config": vars(cfg), "knobs": vars(knobs)}


def pad_w2a8_to_tiles(mod: tvm.IRModule) -> tvm.IRModule:
    """The module with each W2A8 call not yet on the tensor-core kernel's tiles moved onto them (module docstring)."""
    b = Bindings(mod["main"])
    plans = {var: config_of(mod[call.args[0]]) for var in b.order
             if kernel_of(mod, call := b.values[var]) == "w2a8"
             and PADDED_FROM_ATTR not in mod[call.args[0]].attrs}  # on the tiles already: its weights relaid out
    return rewrite_main(mod, plans, _rewrite)


def _rewrite(rw, binding, cfg):
    from ..schedules.w2a8_cuda import PACKED_ZERO, tc_relayout

    p, func, padded_from = default_tiles(cfg)
    suffix = "" if cfg.epilogue == "none" else f"_{cfg.epilogue}"
    gv = rw.kernel(cfg, lambda _: func.with_attr(PADDED_FROM_ATTR, padded_from), f"w2a8_tc_m{p.m}_n{p.n}_k{p.k}{suffix}")
    # (rows, cols, value) of padding per operand: q, packed, x_scale, w_scale (none), residual or bias
    extra_rows = 0 if epilogue_operand(cfg.epilogue) == "bias" else p.m - cfg.m  # a bias is one row
    pads = [(p.m - cfg.m, p.k - cfg.k, 0), (p.n - cfg.n, p.k_packed - cfg.k_packed, PACKED_ZERO),
            (p.m - cfg.m, 0, 1.0), (0, 0, None), (extra_rows, p.n - cfg.n, 0.0)]
    kernel_args = [rw.builder_.emit(relax.op.nn.pad(a, [0, rows, 0, cols], pad_value=value))
                   if rows or cols else a for a, (rows, cols, value) in zip(binding.value.args[1].fields, pads)]
    kernel_args[1] = rw.builder_.emit(tc_relayout(kernel_args[1], p.n, p.k))
    out = relax.call_tir(gv, kernel_args, relax.TensorType((p.m, p.n), "float32"))
    if p == cfg:
        return out
    return relax.op.strided_slice(rw.builder_.emit(out), axes=[0, 1], begin=[0, 0], end=[cfg.m, cfg.n],
                                  assume_inbound=True)
