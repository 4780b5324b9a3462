"""fuse_norm_matmul: a LayerNorm read only by a float matmul -> one LayerNorm + matmul kernel (CUDA builds).

Matches `layer_norm(x, gamma, beta)` over the last axis (constant gamma, beta) -> astype float16 (passes/
fp16_matmuls.py's cast) -> reshapes -> `matmul(., W)` with a constant fp16 W [K, N] and a float32 output -> add of
a constant bias [N] (either operand order) -> optionally astype float16 (the projection's cast for its fp16
readers), each step read by the next only (the LayerNorm's input x, the residual stream, stays as it is), and
only where schedules/kernels.py's registered CUDA scheduler `supported` the configuration. The match is by
structure, so any float Linear with a bias that alone reads a LayerNorm qualifies: in BitMedViT the pre-attention
norm and Wqkv projection of multi-query float attention (not multi-head attention's, read by three projections,
nor a BitLinear's, read by its quantizer); in a model with float Linear layers also a timm-style norm1 -> qkv and
the MLP's norm2 -> fc1 (tests/test_fp16_matmuls.py); not a classifier head with N not a multiple of 8, whose norm
schedules/matmul_fold.py folds at batch 1.
Produces `reshape(call_tir(norm_matmul, [reshape(x, (M, K)), gamma, beta, W, bias]), shape of the last step)`,
schedules/norm_matmul.py's compute definition with its output in the last step's dtype; the GPU build schedules
it (bmvcc/gpu_build.py:schedule_kernels). Report (module attr REPORT_KEY, JSON): {"fused": n}.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from ..schedules.kernels import scheduler_of
from ..schedules.norm_matmul import KIND, NormMatmulConfig, norm_matmul_compute
from .relax_match import REPORT_PREFIX, Bindings, is_const, rewrite_main, static_shape, with_report

REPORT_KEY = REPORT_PREFIX + "fuse_norm_matmul"


def fuse_norm_matmul(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans = {}
    for var in b.order:
        if (plan := _match(var, b)) is not None:
            plans[plan[0]] = plan[1:]
    mod = rewrite_main(mod, plans, _rewrite) if plans else mod
    return with_report(mod, REPORT_KEY, {"fused": len(plans)})


def _match(var, b: Bindings):
    """(var to rebind, x, gamma, beta, w, bias, cfg) when `var` is the LayerNorm of a chain the module docstring
    describes, else None."""
    ln = b.call(var, "relax.nn.layer_norm")
    if ln is None or [int(a) for a in ln.attrs.axes] not in ([-1], [len(static_shape(var) or ()) - 1]):
        return None
    x, gamma, beta = (b.value(a) if is_const(b.value(a)) else b.root(a) for a in ln.args)
    shape = static_shape(var)
    if shape is None or not (is_const(gamma) and is_const(beta)) or str(var.ty.dtype) != "float32":
        return None
    step = b.sole_user(var, "relax.astype")
    if step is None or str(step[1].attrs.dtype) != "float16":
        return None
    while (nxt := b.sole_user(step[0], "relax.reshape", "relax.matmul")) is not None and \
            nxt[1].op.name == "relax.reshape":
        step = nxt
    if nxt is None or not b.root(nxt[1].args[0]).same_as(step[0]):
        return None
    w = b.value(nxt[1].args[1])
    k, m = shape[-1], math.prod(shape[:-1])
    if not is_const(w) or str(w.value.dtype) != "float16" or len(w.value.shape) != 2 or int(w.value.shape[0]) != k \
            or str(nxt[0].ty.dtype) != "float32" or static_shape(nxt[0]) is None:
        return None
    n = int(w.value.shape[1])
    added = b.sole_user(nxt[0], "relax.add")
    bias = None if added is None else next(
        (b.value(a) for a in added[1].args if not b.root(a).same_as(nxt[0]) and is_const(b.value(a))), None)
    if bias is None or tuple(int(d) for d in bias.value.shape) != (n,) or str(bias.value.dtype) != "float32":
        return None
    end = added[0]
    cast = b.sole_user(end, "relax.astype")
    if cast is not None and str(cast[1].attrs.dtype) == "float16":
        end = cast[0]
    if (end_shape := static_shape(end)) is None or math.prod(end_shape) != m * n:
        return None
    cfg = NormMatmulConfig(m, k, n, float(ln.attrs.epsilon), str(end.ty.dtype))
    if not (ln.attrs.center and ln.attrs.scale) or not scheduler_of(KIND, "cuda").supported(cfg):
        return None
    return end, x, gamma, beta, w, bias, cfg


def _rewrite(rw, binding, plan):
    x, gamma, beta, w, bias, cfg = plan
    bb = rw.builder_
    rows = bb.emit(relax.op.reshape(rw.visit_expr(x), (cfg.m, cfg.k)))
    kernel = rw.kernel(cfg, norm_matmul_compute, f"norm_matmul_m{cfg.m}_k{cfg.k}_n{cfg.n}")
    out = bb.emit(relax.call_tir(kernel, [rows, gamma, beta, w, bias], relax.TensorType((cfg.m, cfg.n), cfg.out_dtype)))
    return relax.op.reshape(out, static_shape(binding.var))
