"""fuse_causal_attention: softmax(c * Q K^T [+ causal mask]) V -> one attention kernel.

Matches `matmul(P, V)` where P is, through reshape/broadcast_to (and on CUDA the fp16 cast
passes/fp16_matmuls.py put there), `softmax(X + M, axis=-1)` (or M + X), M a constant [.., N, N] that is
0 on and below the diagonal and -inf above it (BitMedViT's causal mask, lifted by torch.export or
exported to ONNX), X = c * S for a constant c (any multiply/divide chain: S / sqrt(d) or
S * (1 / sqrt(d))) and S, through reshape, `matmul(Q, Kt)`; Q [.., N, D], Kt [.., D, N] and V [.., N, D]
(float32 on CPUs, float16 on CUDA), and nothing but P V reads the softmax (else it would be computed
twice). On CUDA, `softmax(X)` without a mask matches too (non-causal attention), and so does torch's
scaled_dot_product_attention as TVM imports it (`where(row all -inf, 0, softmax(X))`: no mask, so no such row).
K and V may broadcast over the query heads (explicit broadcast_to, or matmul's own broadcast as the
ONNX import leaves it) when that repeats trailing leading dims only (a multi-query head: [B, 1, ..] ->
[B, H, ..]); they enter the kernel before it (Gk = B groups).
Produces, reshaped to the matmul's shape (scores, softmax and mask become dead):
- CPU (`fuse_causal_attention`): `call_tir(attention, [Q, Kt, V] as [G, N, D], [Gk, D, N], [Gk, N, D])`
  (schedules/attention_cpu.py, which skips the masked half; causal only; any N and D; built without a
  target, the CPU schedule stage rebuilds it for the target's vectors; `bf16` (--float-precision bf16):
  its Q K^T and P V on bf16 operands, AttentionConfig.bf16, the kernel named ..._bf16);
- CUDA (`fuse_attention_cuda`): `call_tir(attention, [Q, K, V] as [Gk, N, G / Gk, D], [Gk, N, 1, D] x 2)`,
  schedules/attention_cuda.py's compute definition (causal condition from indices, no mask), its fp16
  output cast to float32; the GPU build schedules it (bmvcc/gpu_build.py:schedule_kernels). Where
  schedules/attention_cuda_tc.py's kernel takes it, layout copies fold into the kernel: when Q, K and V are,
  through views (strided_slice, reshape, permute_dims, expand_dims, broadcast_to; checked by tracing element
  numbers through them), column ranges of [Gk, N, W] tensors (the QKV projection's output), the kernel reads
  those tensors (its `width` and offsets); when P V's single-use chain of reshapes, permute_dims and float
  casts reaches a tensor holding the kernel's [Gk, N, G / Gk, D] output in order (the out-projection's
  input), the kernel writes that tensor in its dtype and the chain becomes dead.
Other attention (another mask, shapes the kernel does not take) is left as it is.
Report (module attr REPORT_KEY, JSON): {"fused": n}; the CPU pass's also "bf16": those of them on bf16 products.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import numpy as np
import tvm
from tvm import relax

from ..schedules.attention_cpu import AttentionConfig, attention_cpu
from ..schedules.attention_cuda import KIND, PrefillConfig, attention_compute
from ..schedules.kernels import scheduler_of
from .relax_match import (REPORT_PREFIX, Bindings, is_const, product, read_report, rewrite_main, scalar, static_shape,
                          with_report)

REPORT_KEY = REPORT_PREFIX + "fuse_causal_attention"
_VIEWS = ("relax.reshape", "relax.broadcast_to")  # same elements, other shape
_LAYOUT = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.broadcast_to", "relax.strided_slice")
_FLOATS = ("float16", "float32")  # casts between them of an fp16 value are exact


def fuse_causal_attention(mod: tvm.IRModule, bf16: bool = False) -> tvm.IRModule:
    """CPU builds: causal attention -> schedules/attention_cpu.py's kernel (`bf16`: its products on bf16 operands)."""
    mod = _fuse(mod, partial(_cpu_plan, bf16=bf16), _rewrite, "float32", masks_only=True)
    fused = read_report(mod, REPORT_KEY)["fused"]
    return with_report(mod, REPORT_KEY, {"fused": fused, "bf16": fused if bf16 else 0})


def fuse_attention_cuda(mod: tvm.IRModule) -> tvm.IRModule:
    """CUDA builds: causal and unmasked attention -> schedules/attention_cuda.py's compute definition."""
    return _fuse(mod, _cuda_plan, _rewrite_cuda, "float16", masks_only=False)


def _fuse(mod, plan_of, rewrite, dtype: str, masks_only: bool) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans = {}
    for var in b.order:
        pv = b.call(var, "relax.matmul")
        if pv is not None and (found := _match(pv, b, dtype, masks_only)) is not None:
            if (planned := plan_of(b, var, *found)) is not None:
                plans[planned[0]] = planned[1]
    report = {"fused": len(plans)}
    if not plans:
        return with_report(mod, REPORT_KEY, report)
    return with_report(rewrite_main(mod, plans, rewrite), REPORT_KEY, report)


def _match(pv, b: Bindings, dtype: str, masks_only: bool):
    """(q, kt, v, groups, K/V groups, tokens, head_dim, scale, causal) when `pv` is P V of an attention with
    `dtype` operands (causal only if `masks_only`), else None."""
    p, v = pv.args
    probs = _unguarded(b.strip(p, *_VIEWS, "relax.astype"), b)
    softmax = b.call(probs, "relax.nn.softmax")
    if softmax is None or b.uses.get(probs, 0) != 1:  # attention weights read elsewhere: keep them
        return None
    if int(softmax.attrs.axis) not in (-1, len(static_shape(probs)) - 1):
        return None
    masked = b.call(softmax.args[0], "relax.add")
    forms = [] if masked is None else [(x, b.value(m)) for x, m in (masked.args, masked.args[::-1])]
    forms += [] if masks_only else [(softmax.args[0], None)]
    for x, mask in forms:
        scaled = product(x, b)
        causal = mask is not None
        if (causal and not (is_const(mask) and _is_causal(mask.value.numpy()))) or list(scaled.factors.values()) != [1]:
            continue
        (scores,) = scaled.factors
        qk = b.call(b.strip(scores, "relax.reshape"), "relax.matmul")
        if qk is None:
            continue
        q, kt = qk.args
        shapes = [static_shape(t) for t in (q, kt, v)]
        if any(s is None or len(s) < 3 for s in shapes) or any(str(t.ty.dtype) != dtype for t in (q, kt, v)):
            continue
        *lead, n, d = shapes[0]
        (kt_src, gk), (v_src, gv) = _kv_source(kt, lead, b), _kv_source(v, lead, b)
        g = math.prod(lead)
        if (gk is not None and gk == gv and static_shape(kt_src)[-2:] == (d, n) and static_shape(v_src)[-2:] == (n, d)
                and (not causal or mask.value.shape[-1] == n) and math.prod(static_shape(probs)) == g * n * n):
            return q, kt_src, v_src, g, gk, n, d, scaled.coef, causal
    return None


def _unguarded(probs, b: Bindings):
    """softmax(S) for `where(not any(S != -inf, axis=-1), 0, softmax(S))` read only by P V (torch's
    scaled_dot_product_attention as TVM imports it: a row whose every score is -inf gets zero weights, which only a
    mask makes happen), else probs."""
    guard = b.call(probs, "relax.where")
    if guard is None:
        return probs
    cond, zero, sm = guard.args
    zero, softmax = b.value(zero), b.call(sm, "relax.nn.softmax")
    eq = b.call(b.strip(cond, "relax.logical_not", "relax.astype", "relax.max"), "relax.equal")
    if (b.uses.get(probs, 0) == 1 and is_const(zero) and not zero.value.numpy().any() and softmax is not None
            and eq is not None and scalar(eq.args[1], b) == -math.inf
            and b.root(eq.args[0]).same_as(b.root(softmax.args[0]))):
        return b.root(sm)
    return probs


def _cpu_plan(b, var, q, kt, v, g, gk, n, d, scale, causal, bf16: bool):
    cfg = AttentionConfig(g, gk, n, d, scale, bf16)
    return (var, (q, kt, v, cfg)) if causal and cfg.supported() else None


def _cuda_plan(b, var, q, kt, v, g, gk, n, d, scale, causal):
    """(var to rebind, plan): K/V group -> the kernel's batch entry with one K/V head and its G / Gk query heads;
    the copies folded (module docstring) where the tensor-core kernel takes the folded configuration."""
    cfg = PrefillConfig(gk, g // gk, 1, n, d, scale, causal)
    if g % gk or not cfg.supported():
        return None
    takes = scheduler_of(KIND, "cuda").supported  # the registered kernel (TVM's prefill kernel: the copies stay)
    key = var if (end := _output_end(var, b, cfg)) is None else end
    folded = cfg if key is var else replace(cfg, out_dtype=str(key.ty.dtype))
    if not takes(folded):
        return var, (q, kt, v, cfg, False)
    sources = [_columns(t, view, b, h, cfg) for t, view, h in zip((q, kt, v), _kernel_views(cfg), (cfg.heads, 1, 1))]
    if None not in sources and len({static_shape(x) for x, _ in sources}) == 1:
        offsets = dict(zip(("q_offset", "k_offset", "v_offset"), (c for _, c in sources)))
        read = replace(folded, width=static_shape(sources[0][0])[-1], **offsets)
        if takes(read):  # the tensor-core kernel: 16-byte aligned rows
            return key, (*(x for x, _ in sources), read, key is not var)
    return key, (q, kt, v, folded, key is not var)


def _kernel_views(cfg: PrefillConfig) -> list:
    """(op, argument) chains taking the matched Q, Kt, V to the definition's q, k, v layouts."""
    gk, h, n, d = cfg.batch, cfg.heads, cfg.tokens, cfg.head_dim
    return [[("reshape", (gk, h, n, d)), ("permute", (0, 2, 1, 3))],
            [("reshape", (gk, d, n)), ("permute", (0, 2, 1)), ("reshape", (gk, n, 1, d))],
            [("reshape", (gk, n, 1, d))]]


def _numpy_view(idx: np.ndarray, view) -> np.ndarray:
    for op, arg in view:
        idx = idx.reshape(arg) if op == "reshape" else idx.transpose(arg)
    return idx


def _traced(call, idx: np.ndarray, shape) -> np.ndarray:
    """idx, an array of element numbers shaped as `call`'s operand, as `call` (a layout op or cast) leaves it."""
    name, args = call.op.name, call.args
    if name == "relax.reshape" or name == "relax.broadcast_to":
        return idx.reshape(shape) if name == "relax.reshape" else np.broadcast_to(idx, shape)
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return idx.transpose(None if axes is None else [int(a) for a in axes])
    if name == "relax.expand_dims":
        return np.expand_dims(idx, tuple(int(a) for a in call.attrs.axis))
    if name == "relax.strided_slice":
        index = [slice(None)] * idx.ndim
        axes, begins, ends, *strides = ([int(v) for v in a] for a in args[1:5])  # strides are optional
        for axis, begin, end, stride in zip(axes, begins, ends, strides[0] if strides else [1] * len(axes)):
            index[axis] = slice(begin, end, stride)
        return idx[tuple(index)]
    return idx  # astype


def _columns(e, view, b: Bindings, heads: int, cfg: PrefillConfig):
    """(x, c) when `e` viewed by `view` is, through layout ops, x[:, :, c : c + heads D] of an fp16 [Gk, N, W]
    tensor x as [Gk, N, heads, D], else None."""
    chain, source = [], None
    while (call := b.call(e, *_LAYOUT)) is not None and static_shape(e) is not None:
        chain.append((e, call))
        e = b.root(call.args[0])
        shape = static_shape(e)
        if shape is not None and shape[:2] == (cfg.batch, cfg.tokens) and len(shape) == 3 \
                and str(e.ty.dtype) == "float16":
            source = e, len(chain)  # the deepest such tensor: the fewest copies left
    if source is None:
        return None
    e, chain, shape = source[0], chain[:source[1]], static_shape(source[0])
    idx = np.arange(math.prod(shape)).reshape(shape)
    for var, call in reversed(chain):
        idx = _traced(call, idx, static_shape(var))
    idx = _numpy_view(idx, view)
    width, d = shape[-1], cfg.head_dim
    columns = np.arange(heads)[:, None] * d + np.arange(d)
    rows = np.arange(cfg.batch * cfg.tokens).reshape(cfg.batch, cfg.tokens, 1, 1) * width
    first = int(idx.flat[0])
    if idx.shape != (cfg.batch, cfg.tokens, heads, d) or first + heads * d > width:
        return None
    return (e, first) if np.array_equal(idx, rows + columns + first) else None


def _output_end(var, b: Bindings, cfg: PrefillConfig):
    """The last var of P V's single-use chain of reshapes, permute_dims and fp16/fp32 casts that holds the kernel's
    [Gk, N, heads, D] output in order (the consumer's layout: its copy folds into the kernel), else None."""
    shape = (cfg.batch, cfg.tokens, cfg.heads, cfg.head_dim)
    order = np.arange(math.prod(shape))
    idx = order.reshape(shape).transpose(0, 2, 1, 3).reshape(static_shape(var))  # P V from the kernel's output
    end = None
    while (user := b.sole_user(var, "relax.reshape", "relax.permute_dims", "relax.astype")) is not None:
        var, call = user
        if static_shape(var) is None or str(var.ty.dtype) not in _FLOATS:
            break
        idx = _traced(call, idx, static_shape(var))
        end = var if np.array_equal(idx.ravel(), order) else end
    return end


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
    kernel = rw.kernel(cfg, attention_cpu, cfg.name)
    out = rw.builder_.emit(relax.call_tir(kernel, args, relax.TensorType((g, n, d), "float32")))
    return relax.op.reshape(out, static_shape(binding.var))


def _rewrite_cuda(rw, binding, plan):
    q, kt, v, cfg, output_folded = plan
    bb = rw.builder_
    gk, h, n, d = cfg.batch, cfg.heads, cfg.tokens, cfg.head_dim
    ops = {"reshape": relax.op.reshape, "permute": relax.op.permute_dims, "astype": relax.op.astype}

    def emit(e, view):
        for op, arg in view:
            e = bb.emit(ops[op](e, arg))
        return e

    operands = [rw.visit_expr(t) for t in (q, kt, v)]
    args = operands if cfg.width else [emit(t, view) for t, view in zip(operands, _kernel_views(cfg))]
    kind = "causal" if cfg.causal else "full"
    folded = f"_w{cfg.width}" if cfg.width else ""
    kernel = rw.kernel(cfg, attention_compute, f"attention_{kind}_b{gk}_h{h}_n{n}_d{d}{folded}")
    out = bb.emit(relax.call_tir(kernel, args, [relax.TensorType((gk, n, h, d), cfg.out_dtype),
                                                relax.TensorType((gk, n, h), "float16")]))
    o = bb.emit(relax.TupleGetItem(out, 0))
    if not output_folded:  # P V's layout, float32
        o = emit(o, [("permute", (0, 2, 1, 3)), ("astype", "float32")])
    return relax.op.reshape(o, static_shape(binding.var))
