"""fuse_causal_attention: softmax(c * Q K^T + causal mask) V -> one causal attention kernel (CPU builds).

Matches `matmul(P, V)` where P is, through reshape/broadcast_to, `softmax(X + M, axis=-1)` (or M + X),
M a constant [.., N, N] that is 0 on and below the diagonal and -inf above it (BitMedViT's causal
mask, lifted by torch.export or exported to ONNX), X = c * S for a constant c (any multiply/divide
chain: S / sqrt(d) or S * (1 / sqrt(d))) and S, through reshape, `matmul(Q, Kt)`; Q [.., N, D],
Kt [.., D, N] and V [.., N, D] all float32, and nothing but P V reads the softmax (else it would be
computed twice).
Produces `call_tir(attention, [Q, Kt, V] as [G, N, D], [Gk, D, N], [Gk, N, D])` (schedules/attention_cpu.py,
which skips the masked half; built without a target, the CPU schedule stage rebuilds it for the target's
vectors), reshaped to the matmul's shape; scores, softmax and mask become dead. Any N and D.
K and V may broadcast over the query heads (explicit broadcast_to, or matmul's own broadcast as the
ONNX import leaves it) when that repeats trailing leading dims only (a multi-query head: [B, 1, ..] ->
[B, H, ..]); they enter the kernel before it (Gk = B groups).
Other attention (no mask, another mask, shapes the kernel does not take) is left as it is.
Report (module attr REPORT_KEY, JSON): {"fused": n}.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from ..schedules.attention_cpu import AttentionConfig, attention_cpu
from .relax_match import REPORT_PREFIX, Bindings, is_const, product, rewrite_main, static_shape, with_report

REPORT_KEY = REPORT_PREFIX + "fuse_causal_attention"
_VIEWS = ("relax.reshape", "relax.broadcast_to")  # same elements, other shape


def fuse_causal_attention(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans = {}
    for var in b.order:
        pv = b.call(var, "relax.matmul")
        if pv is not None and (plan := _match(pv, b)) is not None:
            plans[var] = plan
    report = {"fused": len(plans)}
    if not plans:
        return with_report(mod, REPORT_KEY, report)
    return with_report(rewrite_main(mod, plans, _rewrite), REPORT_KEY, report)


def _match(pv, b: Bindings):
    """(q, kt, v, AttentionConfig) when `pv` is P V of a causal attention, else None."""
    p, v = pv.args
    probs = b.strip(p, *_VIEWS)
    softmax = b.call(probs, "relax.nn.softmax")
    if softmax is None or b.uses.get(probs, 0) != 1:  # attention weights read elsewhere: keep them
        return None
    masked = b.call(softmax.args[0], "relax.add")
    if masked is None or int(softmax.attrs.axis) not in (-1, len(static_shape(probs)) - 1):
        return None
    for x, m in (masked.args, masked.args[::-1]):
        mask = b.value(m)
        scaled = product(x, b)
        if not (is_const(mask) and _is_causal(mask.value.numpy())) or list(scaled.factors.values()) != [1]:
            continue
        (scores,) = scaled.factors
        qk = b.call(b.strip(scores, "relax.reshape"), "relax.matmul")
        if qk is None:
            continue
        q, kt = qk.args
        shapes = [static_shape(t) for t in (q, kt, v)]
        if any(s is None or len(s) < 3 for s in shapes) or any(str(t.ty.dtype) != "float32" for t in (q, kt, v)):
            continue
        *lead, n, d = shapes[0]
        (kt_src, gk), (v_src, gv) = _kv_source(kt, lead, b), _kv_source(v, lead, b)
        cfg = AttentionConfig(math.prod(lead), gk, n, d, scaled.coef)
        if (gk is not None and gk == gv and static_shape(kt_src)[-2:] == (d, n) and static_shape(v_src)[-2:] == (n, d)
                and mask.value.shape[-1] == n and math.prod(static_shape(probs)) == cfg.groups * n * n
                and cfg.supported()):
            return q, kt_src, v_src, cfg
    return None


def _kv_source(e, lead, b: Bindings):
    """(x, K/V groups) for a K or V operand of queries with leading dims `lead`: x = e, or the tensor
    before e's reshape(broadcast_to(.)); groups = x's leading elements when x repeats per query group
    only over trailing leading dims (matmul's own broadcast or the explicit one); else (e, None)."""
    flat = b.call(e, "relax.reshape")
    bcast = b.call(flat.args[0] if flat is not None else e, "relax.broadcast_to")
    if bcast is not None:
        src, dst = static_shape(bcast.args[0]), static_shape(bcast)
        if (src is not None and dst is not None and src[-2:] == dst[-2:] and math.prod(dst[:-2]) == math.prod(lead)
                and (groups := _groups(src[:-2], dst[:-2])) is not None):
            return b.root(bcast.args[0]), groups
    return e, _groups(static_shape(e)[:-2], tuple(lead))


def _groups(src: tuple, dst: tuple) -> int | None:
    """Elements of `src` when it broadcasts to `dst` by repeating trailing dims only ([*a, 1, .., 1]
    -> [*a, *h]: query group g reads K/V group g // prod(h)), else None."""
    if len(src) != len(dst):
        return None
    t = next((i for i, (x, y) in enumerate(zip(src, dst)) if x != y), len(src))
    return math.prod(src) if all(x == 1 for x in src[t:]) else None


def _is_causal(mask: np.ndarray) -> bool:
    """[.., N, N] with 0 on and below the diagonal and -inf above (every leading slice the same)."""
    if mask.ndim < 2 or mask.shape[-1] != mask.shape[-2] or mask.dtype != np.float32:
        return False
    n = mask.shape[-1]
    above = np.triu(np.ones((n, n), dtype=bool), 1)
    return bool(np.all(mask[..., ~above] == 0) and np.all(np.isneginf(mask[..., above])))


def _rewrite(rw, binding, plan):
    q, kt, v, cfg = plan
    g, gk, n, d = cfg.groups, cfg.kv_groups, cfg.tokens, cfg.head_dim
    args = [rw.builder_.emit(relax.op.reshape(rw.visit_expr(t), shape))
            for t, shape in ((q, (g, n, d)), (kt, (gk, d, n)), (v, (gk, n, d)))]
    kernel = rw.kernel(cfg, attention_cpu, f"causal_attention_g{g}_kv{gk}_n{n}_d{d}")
    out = rw.builder_.emit(relax.call_tir(kernel, args, relax.TensorType((g, n, d), "float32")))
    return relax.op.reshape(out, static_shape(binding.var))
