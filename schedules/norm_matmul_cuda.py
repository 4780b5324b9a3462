"""bmvcc's LayerNorm + matmul kernel on fp16 tensor cores for schedules/norm_matmul.py's compute definition.

One CTA of 4 warps per BM = 32 rows (grid: the row tiles), every output column:

    prologue: warp w normalizes rows 8 w .. 8 w + 7 once; per row each lane holds K / 32 elements in registers
        (float4 loads where K is a multiple of 128), the mean and then the sum of squared deviations by warp
        shuffles (two passes over the registers), y = (x - mean) * rsqrt(var + eps) * gamma + beta rounded to
        fp16 into a shared A panel of BM x (K + 8) halves, resident for the whole GEMM (rows past M: row M - 1's)
    GEMM: column blocks of BN = 64 one after the other, each over W tiles of BK = 32 x BN: global --cp.async
        (16 bytes, zero-filled past column N)--> shared, double buffered across the whole sequence of tiles (tile
        t + 1 in flight while tile t is computed; the first one during the prologue); warp (wm, wn) = (w % 2,
        w / 2) computes rows 16 wm and columns 32 wn of the block: A --ldmatrix.x4--> from the panel, W
        --ldmatrix.x4.trans--> B fragments, mma.sync.m16n8k16 f16 x f16 + f32 (registers); after the block's
        last tile out = out_dtype(acc + bias) for rows < M and columns < N
The 8 halves of padding per shared row put ldmatrix's 8 row addresses in distinct banks. One CTA per row tile
normalizes each row once (a grid over column blocks too would repeat the prologue per block: for the paper's
1024 x 512 x 640 QKV projection 10 times, twice the instructions of the GEMM).
Shapes (`supported`): K a multiple of 32 whose panel fits static shared memory with the W stages (K <= 608),
N a multiple of 8 (16-byte rows of W), M any.

Error versus the definition (tests/test_norm_matmul_cuda.py): the kernel's float32 row sums run in another order
(lanes, then a shuffle tree), so the mean moves by at most 2 K 2^-24 max|x| and rsqrt(var + eps) by a relative
(2 K + 8) 2^-24, hence y_k by delta_k = rstd |gamma_k| 2 K 2^-24 max|x| + |y_k - beta_k| (2 K + 8) 2^-24, and its
fp16 value a_k may round to the neighbouring fp16 of the definition's a*_k: |a_k - a*_k| <= delta_k + ulp16(a*_k)
(ulp16(v) <= 2u |v|, u = 2^-11: the flip dominates unless a row's spread is tiny against its mean). Through the
fp32-accumulated dot product: |out - out*| <= sum_k (delta_k + ulp16(a*_k)) |w_kn| + 2 (K + 1) 2^-24
(sum_k |a_k w_kn| + |bias_n|) (both accumulation orders), plus one ulp16(out*) for an fp16 output.
The bound is first-order: it leaves out the mean's error's effect on the variance and the rounding of + beta
relative to |y|, both absorbed by taking ulp16(v) as 2u |v|. It is checked in bmvcc's PTX emulator, which rounds
rsqrt.approx correctly and each mma's sum once (bmvcc/ptx); no GPU has run the kernel.
"""

from __future__ import annotations

from ..targets.cuda import STATIC_SHARED_BYTES
from .norm_matmul import DTYPE, NormMatmulConfig, config_of
from .w2a8 import with_kernel_attrs

BM, BN, BK = 32, 64, 32  # rows and columns per CTA, k per W tile
WARPS = 4
PAD = 8  # halves of padding per shared row
VEC = 8  # halves per 16-byte cp.async


def shared_bytes(cfg: NormMatmulConfig) -> int:
    """The fp16 A panel and two stages of W tiles, rows padded."""
    return (BM * (cfg.k + PAD) + 2 * BK * (BN + PAD)) * 2


def supported(cfg: NormMatmulConfig) -> bool:
    return cfg.k % BK == 0 and cfg.n % VEC == 0 and shared_bytes(cfg) <= STATIC_SHARED_BYTES


def kernel_ops(func) -> float:
    """The GEMM's arithmetic on the kernel's tiles (partial ones padded) for `func`'s configuration, a multiply-add
    counted as 2 (the norm costs issue time, not tensor-core time)."""
    cfg = config_of(func)
    return 2.0 * -(-cfg.m // BM) * BM * -(-cfg.n // BN) * BN * cfg.k


def norm_matmul_tc(cfg: NormMatmulConfig):
    """The scheduled kernel (x, gamma, beta, w, bias, out) for `cfg` (see the module docstring)."""
    from tvm.script import tirx as T

    M, K, N = cfg.m, cfg.k, cfg.n
    XV = 4 if K % 128 == 0 else 1  # floats per lane per load
    XL = K // (32 * XV)  # loads per lane per row
    ROWS = BM // WARPS  # rows each warp normalizes
    KP, WP = K + PAD, BN + PAD
    NT, KT = -(-N // BN), K // BK  # column blocks, k tiles per column block
    COPIES = BK * BN // VEC // (32 * WARPS)  # 16-byte copies per thread per W tile
    kf, eps = T.float32(K), T.float32(cfg.eps)

    @T.macro
    def load_w(ws, w, tid, t):
        """W tile t (column block t / KT, k tile t % KT) into stage t % 2."""
        for c in T.unroll(COPIES):
            r = T.meta_var((c * 32 * WARPS + tid) // (BN // VEC))
            col = T.meta_var(t // KT * BN + (c * 32 * WARPS + tid) % (BN // VEC) * VEC)
            size = T.meta_var(T.Cast("uint32", T.if_then_else(col < N, 16, 0)))  # zero fill past column N
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                T.address_of(ws[t % 2, r, (c * 32 * WARPS + tid) % (BN // VEC) * VEC]),
                T.address_of(w[t % KT * BK + r, T.min(col, N - VEC)]), 16, size))
        T.evaluate(T.ptx["cp.async.commit_group"]())

    @T.prim_func(private=True, s_tir=True)
    def norm_matmul(x: T.Buffer((M, K), "float32"), gamma: T.Buffer((K,), "float32"),
                    beta: T.Buffer((K,), "float32"), w: T.Buffer((K, N), DTYPE), bias: T.Buffer((N,), "float32"),
                    out: T.Buffer((M, N), cfg.out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(-(-M // BM), thread="blockIdx.x"):
            for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("norm_matmul"):
                        vbx, warp, lane = T.axis.remap("SSS", [bx, ty, tx])
                        T.reads()
                        T.writes()
                        a_s = T.sblock_alloc_buffer((BM, KP), DTYPE, scope="shared")
                        ws = T.sblock_alloc_buffer((2, BK, WP), DTYPE, scope="shared")
                        xr = T.sblock_alloc_buffer((XL * XV,), "float32", scope="local")
                        gr = T.sblock_alloc_buffer((XL * XV,), "float32", scope="local")
                        br = T.sblock_alloc_buffer((XL * XV,), "float32", scope="local")
                        stat = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        af = T.sblock_alloc_buffer((8,), DTYPE, scope="local")
                        bf = T.sblock_alloc_buffer((8,), DTYPE, scope="local")
                        acc = T.sblock_alloc_buffer((16,), "float32", scope="local")
                        m0: T.let[T.int32] = vbx * BM
                        tid: T.let[T.int32] = warp * 32 + lane
                        load_w(ws, w, tid, 0)
                        for i in T.unroll(XL):  # lane's columns (i 32 + lane) XV + e
                            for e in T.vectorized(XV):
                                gr[i * XV + e] = gamma[(i * 32 + lane) * XV + e]
                            for e in T.vectorized(XV):
                                br[i * XV + e] = beta[(i * 32 + lane) * XV + e]
                        for rr in T.serial(ROWS):
                            row = T.meta_var(warp * ROWS + rr)
                            for i in T.unroll(XL):
                                for e in T.vectorized(XV):
                                    xr[i * XV + e] = x[T.min(m0 + row, M - 1), (i * 32 + lane) * XV + e]
                            stat[0] = T.float32(0)
                            for i in T.unroll(XL * XV):
                                stat[0] = stat[0] + xr[i]
                            for s in T.unroll(5):
                                stat[0] = stat[0] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), stat[0],
                                                                           16 >> s, 32, 32)
                            stat[0] = stat[0] / kf  # the mean
                            stat[1] = T.float32(0)
                            for i in T.unroll(XL * XV):
                                stat[1] = stat[1] + (xr[i] - stat[0]) * (xr[i] - stat[0])
                            for s in T.unroll(5):
                                stat[1] = stat[1] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), stat[1],
                                                                           16 >> s, 32, 32)
                            stat[1] = T.rsqrt(stat[1] / kf + eps)
                            for i in T.unroll(XL):
                                for e in T.vectorized(XV):
                                    a_s[row, (i * 32 + lane) * XV + e] = T.Cast(
                                        DTYPE, (xr[i * XV + e] - stat[0]) * stat[1] * gr[i * XV + e] + br[i * XV + e])
                        for t in T.serial(NT * KT):  # column block t / KT, k tile t % KT
                            if t + 1 < NT * KT:
                                load_w(ws, w, tid, t + 1)
                            else:
                                T.evaluate(T.ptx["cp.async.commit_group"]())  # an empty group: wait_group 1 below
                            T.evaluate(T.ptx["cp.async.wait_group"](1))
                            T.tvm_storage_sync("shared")  # tile t (and at t = 0 the panel) visible to all warps
                            if t % KT == 0:
                                for i in T.unroll(16):
                                    acc[i] = T.float32(0)
                            for kk in T.unroll(BK // 16):
                                # lanes address rows lane % 16, columns 8 (lane / 16) of the warp's 16 x 16 A tile
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", af.data, 0, a_s.access_ptr("r"),
                                    (warp % 2 * 16 + lane % 16) * KP + t % KT * BK + kk * 16 + lane // 16 * 8,
                                    dtype=DTYPE))
                                for n2 in T.unroll(2):
                                    # matrices (k 0-7 | 8-15) x (n 0-7 | 8-15), transposed: B of n8 tiles 2 n2, +1
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        True, 4, ".b16", bf.data, 0, ws.access_ptr("r"),
                                        t % 2 * BK * WP + (kk * 16 + lane // 8 % 2 * 8 + lane % 8) * WP
                                        + warp // 2 * 32 + n2 * 16 + lane // 16 * 8, dtype=DTYPE))
                                    for half in T.unroll(2):
                                        T.evaluate(T.ptx_legacy.mma(
                                            "m16n8k16", "row", "col", "fp16", "fp16", "fp32", af.data, 0,
                                            bf.data, half * 4, acc.data, (n2 * 2 + half) * 4, False,
                                            dtype="float32"))
                            T.tvm_storage_sync("shared")  # every warp done with stage t % 2 before it is refilled
                            if t % KT == KT - 1:
                                for nt in T.unroll(4):
                                    for h in T.unroll(2):  # accumulator rows lane / 4 + 8 h, columns 2 (lane % 4) + c
                                        for c in T.unroll(2):
                                            r = T.meta_var(m0 + warp % 2 * 16 + lane // 4 + 8 * h)
                                            col = T.meta_var(t // KT * BN + warp // 2 * 32 + nt * 8 + lane % 4 * 2 + c)
                                            if r < M and col < N:
                                                out[r, col] = T.Cast(cfg.out_dtype,
                                                                     acc[nt * 4 + h * 2 + c] + bias[col])

    return norm_matmul


def schedule(func, target, knobs=None):
    """norm_matmul_tc for `func`'s configuration, with `func`'s kernel attributes. No knobs."""
    return with_kernel_attrs(norm_matmul_tc(config_of(func)), func)
