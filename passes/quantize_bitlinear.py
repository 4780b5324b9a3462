"""quantize_bitlinear: BitLinear matmuls -> the W2A8 kernel (int8 codes x 2-bit packed ternary weights).

Matches every `y = matmul(A, W)` in main where
- W is computed from constants only: the latent weight with its absmean ternarization still spelled
  out, or that math already folded. It is evaluated at compile time (FoldConstant) and must be
  exactly codes * a, codes in {-1, 0, 1}, one float a per tensor (binary sign weights included), or
  within float rounding of it where an exporter folded a straight-through estimator w + (q - w);
  anything else is refused. A straight-through estimator x + (q - x) still in the graph (torch.export
  drops the detach) stands for q;
- A (optionally reshaped, merging leading dimensions) is Q times a per-row factor, where
  Q = clip(round(.), lo, hi) with [lo, hi] inside [-128, 127] (int8 codes), however spelled:
  Q / s, Q * (1 / s), ...
Produces `y = reshape(call_tir(w2a8, [int8(Q[M, K]), packed uint8[N, K/4], x_scale[M, 1], [a]]))`
with x_scale = 1 / the per-row factor. The latent weight becomes dead (dead_code_elimination drops it,
so no float copy of a rewritten layer's weight reaches the artifact).

A matmul that looks like a BitLinear (round/absmax on its activations, or round in its weight math,
or ternary-looking weights) but fails a check stays float and is reported by its PyTorch name
(the weight constant's span, set by bmvcc.frontend) with the reason.
Report (module attr REPORT_KEY, JSON): {"rewritten": [{name, in, out}], "not_rewritten": [{name, reason}]}.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..schedules.w2a8 import W2A8Config, pack_ternary, w2a8_compute
from .relax_match import (REPORT_PREFIX, Bindings, const_name, evaluate, is_const, named_const, prim, product,
                          rewrite_main, static_shape, with_report)

REPORT_KEY = REPORT_PREFIX + "quantize_bitlinear"
_SIGNATURE_DEPTH = 3  # producer steps above the activation's factors searched for round / abs-max
_WEIGHT_DEPTH = 12  # producer steps of the weight math searched for round
_STE_ROUNDING = 1e-6  # relative deviation from codes * scale of a weight folded from w + (q - w)


def quantize_bitlinear(mod: tvm.IRModule) -> tvm.IRModule:
    main = mod["main"]
    b = Bindings(main)
    plans, report = {}, {"rewritten": [], "not_rewritten": []}
    for var in b.order:
        call = b.call(var, "relax.matmul")
        if call is None:
            continue
        lhs, rhs = call.args[0], _unbatched(call.args[1], b)
        leaves = b.leaves(rhs)
        if not leaves or not all(is_const(x) for x in leaves):
            continue  # activation x activation (attention scores): not a Linear
        name = _layer_name(leaves, var)
        w = evaluate(rhs, b)
        weight = _ternary(w) if isinstance(w, np.ndarray) else w
        act = _activation(lhs, b)
        if isinstance(weight, tuple) and isinstance(act, tuple):
            plans[var] = (act, weight, name)
            k, n = weight[0].shape
            report["rewritten"].append({"name": name, "in": int(k), "out": int(n)})
            continue
        if _looks_like_bitlinear(lhs, rhs, weight, b):
            reasons = [r for r in (act, weight) if isinstance(r, str)]
            report["not_rewritten"].append({"name": name, "reason": "; ".join(reasons)})
    if not plans:
        return with_report(mod, REPORT_KEY, report)
    return with_report(rewrite_main(mod, plans, _rewrite), REPORT_KEY, report)


def _looks_like_bitlinear(lhs, rhs, weight, b: Bindings) -> bool:
    """Round/abs-max next to the activation's factors, round in the weight math, or ternary weights."""
    atoms = product(_codes_side(lhs, b), b).factors
    near = set().union(*(b.ancestors_ops(a, _SIGNATURE_DEPTH) for a in atoms)) if atoms else set()
    return bool(near & {"relax.round", "relax.topk", "relax.max"}) or isinstance(weight, tuple) or (
        "relax.round" in b.ancestors_ops(rhs, _WEIGHT_DEPTH))


def _unbatched(rhs, b: Bindings):
    """The 2-D weight itself when a batched matmul broadcasts it over leading dimensions."""
    bc = b.call(rhs, "relax.broadcast_to")
    return b.root(bc.args[0]) if bc is not None and len(static_shape(bc.args[0]) or ()) == 2 else rhs


def _layer_name(leaves, var) -> str:
    """The weight matrix's PyTorch name without ".weight", else the module of any named leaf (a
    scale beside codes the frontend left unnamed), else the matmul's variable."""
    named = [(leaf, name) for leaf in leaves if (name := const_name(leaf)) is not None]
    for leaf, name in named:
        if len(leaf.value.shape) == 2:
            return name.removesuffix(".weight")
    return named[0][1].rpartition(".")[0] or named[0][1] if named else f"matmul '{var.name}'"


def _ternary(w: np.ndarray):
    """(codes int8[K, N], a) when w == codes * a exactly, else the reason as a string."""
    if w.ndim != 2 or w.dtype != np.float32:
        return f"the weight is {w.dtype}{list(w.shape)}, not a float32 matrix"
    a = np.float32(np.abs(w).max(initial=0.0))
    codes = np.rint(w / a) if a > 0 else np.zeros_like(w)  # |w / a| <= 1: codes in {-1, 0, 1}
    if not np.array_equal(codes.astype(np.float32) * a, w):
        # an exporter that folded the straight-through estimator w + (q - w) leaves q within float rounding
        # (a few ulp of max |w|): the codes times their mean magnitude are the q it meant
        a = np.float32(np.abs(w[codes != 0]).mean())
        if np.abs(codes * a - w).max() > _STE_ROUNDING * np.abs(w).max():
            return "the weight constant is not ternary codes times one scale (not folded BitLinear weight quantization)"
    return codes.astype(np.int8), a


def _activation(lhs, b: Bindings):
    """(Q, per-row Product f, A's shape) with A = Q * f, else the reason as a string."""
    inner = _codes_side(lhs, b)
    shape, outer = static_shape(inner), static_shape(lhs)
    if shape is None or outer is None:
        return "the activation shape is not static"
    if shape[-1] != outer[-1] or int(np.prod(shape)) != int(np.prod(outer)):
        return "the activation reshape mixes the feature axis"
    p = product(inner, b)
    codes = [a for a, pw in p.factors.items() if pw == 1 and _int8_codes(a, b)]
    if not codes:
        return "the activations are not int8 codes (no clip(round(.)) within [-128, 127] feeding the matmul)"
    f = p.without(codes[0])
    row = (*shape[:-1], 1)
    if any(static_shape(a) not in (row, (1,) * len(row)) for a in f.factors):
        return "the activation scale is not one value per token"
    return codes[0], f, shape


def _codes_side(lhs, b: Bindings):
    """The matmul's activation operand without its reshapes and batch broadcast, and the quantized
    value itself where a straight-through estimator wraps it."""
    return b.through_ste(b.strip(lhs, "relax.reshape", "relax.broadcast_to"))


def _int8_codes(e, b: Bindings) -> bool:
    clip = b.call(e, "relax.clip")
    if clip is None or b.call(clip.args[0], "relax.round") is None:
        return False
    lo, hi = prim(clip.args[1]), prim(clip.args[2])
    return lo is not None and hi is not None and -128 <= lo and hi <= 127


def _rewrite(rw, binding, plan):
    """A W2A8 call on the int8 codes and the packed 2-bit weight replaces the float matmul."""
    (q, f, shape), (codes, a), name = plan
    k, n = codes.shape
    m = int(np.prod(shape[:-1]))
    emit = rw.builder_.emit
    q8 = emit(relax.op.astype(relax.op.reshape(rw.visit_expr(q), (m, k)), "int8"))
    xs = emit(relax.op.reshape(_reciprocal(rw, f), (m, 1)))
    packed = named_const(pack_ternary(codes.T), f"{name}.packed")
    scale = named_const(np.array([a], np.float32), f"{name}.scale")
    kernel = rw.kernel(W2A8Config(m, n, k), w2a8_compute, f"w2a8_m{m}_n{n}_k{k}")
    value = relax.call_tir(kernel, [q8, packed, xs, scale], relax.TensorType((m, n), "float32"))
    out_shape = static_shape(binding.var)
    return value if out_shape == (m, n) else relax.op.reshape(emit(value), out_shape)


def _reciprocal(rw, f):
    """1 / f as a Relax expression (x_scale from the dequantization factor)."""
    expr = relax.const(np.float32(1.0 / f.coef))
    for atom, power in f.factors.items():
        atom = rw.visit_expr(atom)
        for _ in range(abs(power)):
            expr = relax.op.divide(expr, atom) if power > 0 else relax.op.multiply(expr, atom)
    return expr
