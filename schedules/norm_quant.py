"""norm_quant: BitLinear's RMSNorm and per-token int8 activation quantization in one kernel.

For x float32[M, K] and gain g float32[K], per row m (the math of docs/bitmedvit.md):
    xn       = x * rsqrt(sum_k(x^2) / K + norm_eps) * g                                  (RMSNorm)
    xn       = (x - mu) * rsqrt(sum_k((x - mu)^2) / K + norm_eps) * g + beta,  mu = sum_k(x) / K
                                                       (the LayerNorm variant, with a shift beta[K])
    x_scale  = (1 / max(max_k |xn|, scale_eps)) * 127     (reciprocal then multiply, as PyTorch's
                                                            127 / t does, so scales agree bit for bit)
    q        = int8(clip(round_half_even(xn * x_scale), -128, 127))
Outputs (q int8[M, K], x_scale float32[M, 1]) feed the W2A8 kernel (schedules/w2a8.py).
Rounding is T.nearbyint (half to even, like torch.round), not T.round (half away from zero).
Its CPU schedule and tuning space are listed in schedules/kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .w2a8 import KERNEL_ATTR

MAX_VECTOR = 64  # widest quant-loop vector the space samples (LLVM splits it into register-wide parts)
ROW_GROUPS = (4, 2, 1)  # rows whose reductions interleave (the largest that divides M)
MIN_PARALLEL_ELEMENTS = 1 << 16  # about 10 us on one core: less is not worth waking the thread pool


@dataclass(frozen=True)
class NormQuantConfig:
    m: int  # rows (tokens x batch)
    k: int  # features
    norm_eps: float = 1e-5
    scale_eps: float = 1e-5  # 0: absmax without an epsilon (max(|xn|, 0) is |xn|'s max)
    layer_norm: bool = False  # LayerNorm (mean removed, shift beta) instead of RMSNorm


def norm_quant_compute(cfg: NormQuantConfig):
    """Unscheduled TIR PrimFunc (x, gain[, beta]) -> (q, x_scale); int64 indices, opaque (op_pattern 8).

    One loop over rows holds the blocks ("sum" for LayerNorm) "sumsq" (row sum of squares),
    "rstd", "absmax" (row max |xn|), "scale" (x_scale) and "quant".
    """
    from tvm.script import tirx as T

    vectorizable_nearbyint()
    M, K = T.int64(cfg.m), T.int64(cfg.k)
    norm_eps, scale_eps, kf = T.float32(cfg.norm_eps), T.float32(cfg.scale_eps), T.float32(cfg.k)

    def centered(x, total, vi, vk):
        return x[vi, vk] - total[vi] / kf if cfg.layer_norm else x[vi, vk]

    def normed(x, total, rstd, g, beta, vi, vk):
        xn = centered(x, total, vi, vk) * rstd[vi] * g[vk]
        return xn + beta[vk] if cfg.layer_norm else xn

    @T.macro
    def body(x, g, beta, total, q, xs):
        ssq = T.sblock_alloc_buffer((M,), "float32")
        rstd = T.sblock_alloc_buffer((M,), "float32")
        amax = T.sblock_alloc_buffer((M,), "float32")
        for i in range(M):  # one row at a time: every block below is per row
            if cfg.layer_norm:
                for k in range(K):
                    with T.sblock("sum"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        with T.init():
                            total[vi] = T.float32(0)
                        total[vi] = total[vi] + x[vi, vk]
            for k in range(K):
                with T.sblock("sumsq"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    with T.init():
                        ssq[vi] = T.float32(0)
                    ssq[vi] = ssq[vi] + centered(x, total, vi, vk) * centered(x, total, vi, vk)
            with T.sblock("rstd"):
                vi = T.axis.remap("S", [i])
                rstd[vi] = T.rsqrt(ssq[vi] / kf + norm_eps)
            for k in range(K):
                with T.sblock("absmax"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    with T.init():
                        amax[vi] = T.min_value("float32")  # max identity (|xn| >= 0: same result as 0)
                    amax[vi] = T.max(amax[vi], T.fabs(normed(x, total, rstd, g, beta, vi, vk)))
            with T.sblock("scale"):
                vi = T.axis.remap("S", [i])
                xs[vi, T.int64(0)] = T.float32(1) / T.max(amax[vi], scale_eps) * T.float32(127)
            for k in range(K):
                with T.sblock("quant"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    q[vi, vk] = T.Cast("int8", T.max(T.min(T.nearbyint(
                        normed(x, total, rstd, g, beta, vi, vk) * xs[vi, T.int64(0)]), T.float32(127)), T.float32(-128)))

    if not cfg.layer_norm:

        @T.prim_func(private=True, s_tir=True)
        def norm_quant(x: T.Buffer((M, K), "float32"), g: T.Buffer((K,), "float32"),
                       q: T.Buffer((M, K), "int8"), xs: T.Buffer((M, T.int64(1)), "float32")):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: "norm_quant"})
            body(x, g, None, None, q, xs)

        return norm_quant

    @T.prim_func(private=True, s_tir=True)
    def layer_norm_quant(x: T.Buffer((M, K), "float32"), g: T.Buffer((K,), "float32"), beta: T.Buffer((K,), "float32"),
                         q: T.Buffer((M, K), "int8"), xs: T.Buffer((M, T.int64(1)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: "norm_quant"})
        total = T.sblock_alloc_buffer((M,), "float32")  # row sum (the mean is total / K)
        body(x, g, beta, total, q, xs)

    return layer_norm_quant


def schedule_norm_quant_cpu(func, target):
    """One loop over rows (parallel from MIN_PARALLEL_ELEMENTS on); per row the reductions vectorized
    (_vector_reductions) and the quant loop by 16, 8 or 4 lanes: each row read from memory once (then
    from L1), q written once."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)

    def lanes(loop):
        k = int(sch.get(loop).extent)
        return [None, next((v for v in (16, 8, 4) if k % v == 0), 1)]

    _schedule(sch, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def norm_quant_space(sch, target) -> None:
    """MetaSchedule design space (schedules/tuning_spaces.py): the quant loop's vector width sampled.
    The reductions' lanes and unrolling are no knobs (unrolled row sums moved x_scale by an ulp: LLVM
    contracts them differently): a tuned kernel must give the default one's results bit for bit."""
    _schedule(sch, lambda loop: sch.sample_perfect_tile(loop, n=2, max_innermost_factor=MAX_VECTOR))


def reduction_lanes(k: int) -> int:
    """Partial results per row reduction: lane l reduces k = l, l + lanes, ... in order, then the
    lanes are combined in order (1: one sequential reduction, for K with no such divisor)."""
    return next((v for v in (16, 8, 4) if k % v == 0 and k > v), 1)


def _schedule(sch, tile) -> None:
    """Schedule primitives only; tile(loop) gives the [outer, vector] split of the quant loop."""
    vectorizable_nearbyint()
    m, k = (int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("quant")))
    lanes = reduction_lanes(k)
    partials = _vector_reductions(sch, lanes, next(g for g in ROW_GROUPS if m % g == 0)) if lanes > 1 else []
    row, *_, col = sch.get_loops(sch.get_sblock("quant"))
    if m * k >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(row)
    _, inner = sch.split(col, tile(col))
    sch.vectorize(inner)
    for block, loop in partials:  # last: the update blocks it leaves fail the checks of parallel
        sch.decompose_reduction(block, loop)


def _vector_reductions(sch, lanes: int, group: int) -> list:
    """The row reductions (sum, sumsq, absmax) as `lanes` vector partial reductions (rfactor) combined
    in order, all blocks back in one loop over groups of `group` rows, each block interleaving its
    group's rows (independent dependency chains). rfactor wants a reduction alone in its loop nest, so
    first every block after the row loop's first gets a row loop of its own (a cache_write copy, the
    block moved into it, the copy inlined; a reduction cannot absorb its copy, which is moved on once more).
    Returns each partial reduction block with its reduction loop."""
    row = sch.get_loops(sch.get_sblock("quant"))[0]
    order = [sch.get(b).name_hint for b in sch.get_child_blocks(row)]
    reductions = [name for name in order if name in ("sum", "sumsq", "absmax")]
    copies = []
    for name in order[:0:-1]:
        copy = _peel(sch, sch.get_sblock(name))
        if name in reductions:
            copies.append(sch.get(copy).name_hint)
            copy = _peel(sch, copy)
        sch.reverse_compute_inline(copy)
    for name in reductions:
        sch.rfactor(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, lanes])[1], factor_axis=1)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    groups, _ = sch.split(sch.get_loops(blocks[0])[0], [None, group])
    for block in blocks[1:]:  # every nest back into the first one's loop over row groups, in order
        sch.reverse_compute_at(block, groups, preserve_unit_loops=True)
    for name in copies:
        sch.compute_inline(sch.get_sblock(name))
    partials = []
    for name in reductions:
        rf = sch.get_sblock(name + "_rf")
        loops = sch.get_loops(rf)[1:]
        rows, kout, lane = loops if name == order[0] else (loops[1], loops[2], loops[0])  # as moved: lane, row, k
        sch.reorder(kout, rows, lane)
        sch.vectorize(lane)
        partials.append((rf, kout))
    return partials


def _peel(sch, block):
    """Move `block` out of its row loop into the row loop of a new copy of its output; returns the copy."""
    copy = sch.cache_write(block, 0, "global")
    sch.compute_at(block, sch.get_loops(copy)[0])
    return copy


def vectorizable_nearbyint() -> None:
    """TVM 0.27 marks round, floor, ... TVectorizable but not nearbyint, so its vectorizer scalarized
    the quant loop (16 scalar roundings and byte stores per vector, which LLVM then re-vectorized
    across vectors with gathers: the kernel 3x slower). nearbyint is elementwise: llvm.nearbyint takes
    vectors. Needed wherever the kernel is compiled: the compute (each compile), the schedule, tune's builder."""
    import tvm

    op = tvm.ir.Op.get("tirx.nearbyint")
    if op.get_attr("TVectorizable") is None:
        op.set_attr("TVectorizable", True)


def norm_quant_numpy(x: np.ndarray, g: np.ndarray, norm_eps: float = 1e-5, scale_eps: float = 1e-5,
                     beta: np.ndarray | None = None):
    """Independent float32 reference of the kernel's math: (q int8[M, K], x_scale float32[M, 1]);
    with `beta` the LayerNorm variant."""
    x = x.astype(np.float32)
    if beta is not None:
        x = x - x.mean(-1, keepdims=True, dtype=np.float32)
    rstd = (1.0 / np.sqrt((x * x).sum(-1, keepdims=True, dtype=np.float32) / np.float32(x.shape[-1])
                          + np.float32(norm_eps))).astype(np.float32)
    xn = x * rstd * g.astype(np.float32) + (0 if beta is None else beta.astype(np.float32))
    xs = (np.float32(1) / np.maximum(np.abs(xn).max(-1, keepdims=True), np.float32(scale_eps))) * np.float32(127)
    q = np.clip(np.rint(xn * xs), -128, 127).astype(np.int8)
    return q, xs.astype(np.float32)
