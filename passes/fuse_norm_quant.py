"""fuse_norm_quant: BitLinear's RMSNorm or LayerNorm + int8 activation quantization -> one norm_quant kernel.

Matches the activation side of every W2A8 call_tir (as quantize_bitlinear leaves it):
    q  = int8(clip(round(xn * s), -128, 127)),   s = 127 / clip(absmax(xn), eps_s, inf)  (or 127 / absmax(xn))
    xn = x * rsqrt(mean(x^2, -1) + eps) * g      (or x / sqrt(.); g a constant [K], optional)
    xn = layer_norm(x, g, beta, axis -1, eps)    (constant g and beta: the kernel's LayerNorm variant)
where absmax is max(|xn|, -1) or topk(|xn|, k=1)[0] (how torch.export spells .max(dim).values) and
every product may be spelled in any order (x / s or x * (1 / s)).
Produces `(q, s) = call_tir(norm_quant, [x[M, K], g])` (schedules/norm_quant.py) feeding the W2A8 call;
the float RMSNorm and quantization ops become dead. Calls whose activations do not match keep the
unfused float quantization (still correct) and are counted in the report.
Report (module attr REPORT_KEY, JSON): {"fused": n, "unfused": n}.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..schedules.norm_quant import NormQuantConfig, norm_quant_compute
from .relax_match import (REPORT_PREFIX, Bindings, Product, is_const, kernel_of, named_const, prim, product,
                          rewrite_main, scalar, static_shape, with_report)

REPORT_KEY = REPORT_PREFIX + "fuse_norm_quant"


def fuse_norm_quant(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans, unfused = {}, 0
    for var in b.order:
        call = b.values[var]
        if kernel_of(mod, call) != "w2a8":
            continue
        plan = _match(call.args[1].fields, b)
        if plan is None:
            unfused += 1
        else:
            plans[var] = (call, *plan)
    report = {"fused": len(plans), "unfused": unfused}
    if not plans:
        return with_report(mod, REPORT_KEY, report)
    return with_report(rewrite_main(mod, plans, _rewrite), REPORT_KEY, report)


def _match(args, b: Bindings):
    """(x, gain, norm_eps, scale_eps) when the W2A8 call's (q, x_scale) are norm_quant's math."""
    q = b.strip(args[0], "relax.astype", "relax.reshape")
    clip = b.call(q, "relax.clip")
    rnd = None if clip is None else b.call(clip.args[0], "relax.round")
    if rnd is None or (prim(clip.args[1]), prim(clip.args[2])) != (-128.0, 127.0):
        return None
    scale = product(b.strip(args[2], "relax.reshape"), b)
    if len(scale.factors) != 1 or abs(scale.coef - 127.0) > 1e-4:
        return None
    (denom, power), = scale.factors.items()
    scale_eps, clamp = 0.0, b.call(denom, "relax.clip")  # absmax with or without an epsilon clamp
    if clamp is not None:
        if prim(clamp.args[2]) != float("inf"):
            return None
        denom, scale_eps = clamp.args[0], prim(clamp.args[1])
    y = None if power != -1 else _abs_max_input(denom, b)
    if y is None:
        return None
    xn = product(y, b)
    if not product(rnd.args[0], b).same(xn.times(scale)):
        return None
    norm = _rms_norm(xn, b) or _layer_norm(xn, b)
    return None if norm is None else (*norm, scale_eps)


def _abs_max_input(e, b: Bindings):
    """y when e = max(|y|, axis=-1, keepdims) or topk(|y|, k=1, axis=-1)[0]."""
    red = b.call(e, "relax.max")
    if red is not None:
        ok = red.attrs.axis is not None and [int(a) for a in red.attrs.axis] == [-1] and red.attrs.keepdims
        src = red.args[0] if ok else None
    else:
        item = b.item(e)
        topk = item[0] if item is not None and item[1] == 0 else None
        ok = (topk is not None and isinstance(topk, relax.Call) and topk.op.name == "relax.topk" and int(topk.attrs.k) == 1
              and int(topk.attrs.axis) == -1 and bool(topk.attrs.largest))
        src = topk.args[0] if ok else None
    absv = None if src is None else b.call(src, "relax.abs")
    return None if absv is None else absv.args[0]


def _rms_norm(xn: Product, b: Bindings):
    """(x, gain numpy [K], eps) when xn = x * rsqrt(mean(x^2, -1, keepdims) + eps) * gain."""
    consts = [a for a in xn.factors if is_const(a)]
    rest = [a for a in xn.factors if not is_const(a)]
    if len(rest) != 2 or len(consts) > 1 or any(xn.factors[a] != 1 for a in consts):
        return None
    for x, r in (rest, rest[::-1]):
        eps = _rsqrt_mean_square(x, r, xn.factors[r], b)
        if eps is not None and xn.factors[x] == 1:
            shape = static_shape(x)
            k = shape[-1]
            gain = np.full((k,), xn.coef, np.float32)
            if consts:
                g = consts[0].value.numpy().astype(np.float32)
                if g.size != k:
                    return None
                gain = g.reshape(k) * np.float32(xn.coef)
            return x, gain, eps
    return None


def _layer_norm(xn: Product, b: Bindings):
    """(x, gain [K], eps, beta [K]) when xn = c * layer_norm(x, gamma, beta) over the last axis (c folded in)."""
    if len(xn.factors) != 1 or next(iter(xn.factors.values())) != 1:
        return None
    ln = b.call(next(iter(xn.factors)), "relax.nn.layer_norm")
    if ln is None or [int(a) for a in ln.attrs.axes] not in ([-1], [len(static_shape(ln.args[0])) - 1]):
        return None
    x, gamma, beta = ln.args
    k = static_shape(x)[-1]
    if not (is_const(gamma) or not ln.attrs.scale) or not (is_const(beta) or not ln.attrs.center):
        return None
    gain = gamma.value.numpy().astype(np.float32).reshape(k) if ln.attrs.scale else np.ones(k, np.float32)
    shift = beta.value.numpy().astype(np.float32).reshape(k) if ln.attrs.center else np.zeros(k, np.float32)
    c = np.float32(xn.coef)
    return x, gain * c, float(ln.attrs.epsilon), shift * c


def _rsqrt_mean_square(x, r, power: int, b: Bindings):
    """eps when r ** power == 1 / sqrt(mean(x^2, -1) + eps), else None."""
    root = b.call(r, "relax.rsqrt") if power == 1 else b.call(r, "relax.sqrt") if power == -1 else None
    add = None if root is None else b.call(root.args[0], "relax.add")
    if add is None:
        return None
    for m, e in (add.args, add.args[::-1]):
        mean, eps = b.call(m, "relax.mean"), scalar(e, b)
        if mean is None or eps is None or mean.attrs.axis is None:
            continue
        if [int(a) for a in mean.attrs.axis] != [-1] or not mean.attrs.keepdims:
            continue
        sq = b.call(mean.args[0], "relax.power")
        if sq is not None and scalar(sq.args[1], b) == 2.0 and b.root(sq.args[0]).same_as(x):
            return eps
        sq = b.call(mean.args[0], "relax.multiply")
        if sq is not None and b.root(sq.args[0]).same_as(x) and b.root(sq.args[1]).same_as(x):
            return eps
    return None


def _rewrite(rw, binding, plan):
    """The W2A8 call now reads int8 codes and scales from one norm_quant kernel call."""
    call, x, gain, norm_eps, *beta, scale_eps = plan
    gv, args = call.args[0], [rw.visit_expr(a) for a in call.args[1].fields]
    m, k = static_shape(args[0])
    cfg = NormQuantConfig(m, k, float(np.float32(norm_eps)), float(np.float32(scale_eps)), layer_norm=bool(beta))
    kernel = rw.kernel(cfg, norm_quant_compute, f"{'layer_' if beta else ''}norm_quant_m{m}_k{k}")
    x2d = rw.builder_.emit(relax.op.reshape(rw.visit_expr(x), (m, k)))
    nq = rw.builder_.emit(relax.call_tir(kernel, [x2d, *(named_const(v) for v in (gain, *beta))],
                                         [relax.TensorType((m, k), "int8"), relax.TensorType((m, 1), "float32")]))
    q = rw.builder_.emit(relax.TupleGetItem(nq, 0))
    xs = rw.builder_.emit(relax.TupleGetItem(nq, 1))
    return relax.call_tir(gv, [q, args[1], xs, *args[3:]], binding.var.ty)
