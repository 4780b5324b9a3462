"""Causal attention as one CPU kernel: O = softmax(scale * Q K^T + causal mask) V, row block by row block.

For q [G, N, D], kt [Gk, D, N] (K transposed) and v [Gk, N, D] float32, G = batch x heads, out
[G, N, D]: query group g reads K/V group g // (G / Gk) (multi-query: Gk = batch, one K/V head for
all query heads, read once instead of broadcast), and query i attends to keys j <= i (the mask the
BitMedViT attention adds: 0 on and below the diagonal, -inf above).

Per (g, block of R query rows starting at i0), in parallel, only the keys j < i0 + R are touched:
  pack   Kp[gk, j // NR, d, j % NR] = kt[gk, d, j] once per call (column strips contiguous; kt's rows
         are N floats apart, which maps a whole strip onto one L1 set)
  scores s[r, j] = scale * q[i0 + r] . K[j] for j < i0 + R (MR x NR register tiles); j > i0 + r -> -big
  softmax per row: max, e = exp(s - max) (0 where j > i0 + r), sum; e stays in s (R x N floats, L2)
  output out[g, i0 + r, :] = (sum_j e[r, j] v[j, :]) / sum, key block by key block of R (that block
         of V and of e stays in L1 across all MR2 x NC register tiles, whose sums carry over in
         o[R, D]; the diagonal block stops at each tile's last row)
so the masked half of Q K^T, softmax and P V is never computed and the N x N scores never reach
memory (unfused: 4 passes over G x N x N floats). exp is TVM's fast_exp polynomial (topi
fast_exp_float32, the one FastMathTransform uses elsewhere; <= 1.1e-6 relative), in 8-lane vectors.
Vectors are 8 floats whatever the CPU (one AVX2 register, half an AVX-512 one; LLVM splits them on
narrower SIMD): passes/fuse_causal_attention.py emits the kernel before a target is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from .w2a8 import KERNEL_ATTR

LANES = 8
MASKED = -3.0e38  # score of a masked key: below any real score, finite so that s - max stays finite


@dataclass(frozen=True)
class AttentionConfig:
    groups: int  # G = batch x heads
    kv_groups: int  # Gk: K/V groups, dividing G (query group g reads K/V group g // (G / Gk))
    tokens: int  # N
    head_dim: int  # D
    scale: float  # 1 / sqrt(D) for BitMedViT

    def supported(self) -> bool:
        return self.tokens % LANES == 0 and self.head_dim % LANES == 0 and self.groups % self.kv_groups == 0


@dataclass(frozen=True)
class Tiles:
    rows: int  # R: query rows per parallel task
    mr: int  # scores register tile: mr rows x nr keys
    nr: int
    mr2: int  # output register tile: mr2 rows x nc head-dim columns
    nc: int

    @staticmethod
    def of(cfg: AttentionConfig) -> "Tiles":
        """Largest tiles that divide the shapes (no partial tiles); accumulators fit 16 vector registers."""
        rows = max(r for r in (32, 16, 8) if cfg.tokens % r == 0)
        nr = 16 if rows % 16 == 0 else 8
        nc = max(c for c in (32, 16, 8) if cfg.head_dim % c == 0)
        return Tiles(rows, 4, nr, 2 if nc == 32 else 4, nc)


def _fast_exp(x):
    """TVM's fast_exp_float32 (topi/elemwise.h): 2^n * p(f), x = n ln2 + f, clamped to +-88.38."""
    c = T.max(T.min(x, T.float32(88.3762626647950)), T.float32(-88.3762626647949))
    n = T.floor(c * T.float32(1.44269504088896341) + T.float32(0.5))
    f = c - n * T.float32(0.6931471805599453)
    p = T.float32(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * f + T.float32(coef)
    y = p * f * f + f + T.float32(1.0)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n + T.float32(127.0)), 23))
    return T.max(two_n * y, x)


def attention_cpu(cfg: AttentionConfig):
    """The scheduled PrimFunc (q, kt, v, out): tirx.is_scheduled (the default CPU rules skip it) and
    bmvcc.kernel "attention" (bmvcc tune measures it as a hand-scheduled kernel, no search)."""
    G, GK, N, D = cfg.groups, cfg.kv_groups, cfg.tokens, cfg.head_dim
    H = G // GK  # query groups per K/V group
    t = Tiles.of(cfg)
    R, MR, NR, MR2, NC = t.rows, t.mr, t.nr, t.mr2, t.nc
    NB = N // R
    scale = T.float32(cfg.scale)

    @T.prim_func(private=True)
    def attention(q: T.Buffer((G, N, D), "float32"), kt: T.Buffer((GK, D, N), "float32"),
                  v: T.Buffer((GK, N, D), "float32"), out: T.Buffer((G, N, D), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, KERNEL_ATTR: "attention"})
        kp = T.alloc_buffer((GK, N // NR, D, NR), "float32")
        for gd in T.parallel(GK * D):
            for jt in range(N // NR):
                for c in T.vectorized(NR):
                    kp[gd // D, jt, gd % D, c] = kt[gd // D, gd % D, jt * NR + c]
        for task in T.parallel(G * NB):
            g = task // NB
            gk = g // H
            i0 = task % NB * R
            s = T.alloc_buffer((R, N), "float32")
            rmax = T.alloc_buffer((LANES,), "float32", scope="local")
            rvec = T.alloc_buffer((LANES,), "float32", scope="local")
            rsum = T.alloc_buffer((R,), "float32")
            acc = T.alloc_buffer((MR, NR), "float32", scope="local")
            acc2 = T.alloc_buffer((MR2, NC), "float32", scope="local")
            o = T.alloc_buffer((R, D), "float32")
            # scores of keys [0, i0 + R): column strip outside, row tiles inside (strip stays in L1)
            for jt in range((i0 + R) // NR):
                for it in range(R // MR):
                    for r in T.unroll(MR):
                        for c in T.vectorized(NR):
                            acc[r, c] = T.float32(0)
                    for d in range(D):
                        for r in T.unroll(MR):
                            for c in T.vectorized(NR):
                                acc[r, c] = acc[r, c] + q[g, i0 + it * MR + r, d] * kp[gk, jt, d, c]
                    for r in T.unroll(MR):
                        for c in T.vectorized(NR):
                            s[it * MR + r, jt * NR + c] = T.Select(jt * NR + c <= i0 + it * MR + r,
                                                                   acc[r, c] * scale, T.float32(MASKED))
            for r in range(R):
                for l in T.vectorized(LANES):
                    rmax[l] = T.float32(MASKED)
                for j in range((i0 + R) // LANES):
                    for l in T.vectorized(LANES):
                        rmax[l] = T.max(rmax[l], s[r, j * LANES + l])
                for l in range(1, LANES):
                    rmax[0] = T.max(rmax[0], rmax[l])
                for l in T.vectorized(LANES):
                    rvec[l] = T.float32(0)
                for j in range((i0 + R) // LANES):
                    for l in T.vectorized(LANES):
                        s[r, j * LANES + l] = T.Select(j * LANES + l <= i0 + r,
                                                       _fast_exp(s[r, j * LANES + l] - rmax[0]), T.float32(0))
                        rvec[l] = rvec[l] + s[r, j * LANES + l]
                rsum[r] = rvec[0]
                for l in range(1, LANES):
                    rsum[r] = rsum[r] + rvec[l]
            for i in range(R):
                for c in T.vectorized(D):
                    o[i, c] = T.float32(0)
            for jb in range((i0 + R) // R):  # key blocks
                for it in range(R // MR2):
                    for ct in range(D // NC):
                        for r in T.unroll(MR2):
                            for c in T.vectorized(NC):
                                acc2[r, c] = o[it * MR2 + r, ct * NC + c]
                        for j in range(T.min(R, i0 + it * MR2 + MR2 - jb * R)):
                            for r in T.unroll(MR2):
                                for c in T.vectorized(NC):
                                    acc2[r, c] = acc2[r, c] + s[it * MR2 + r, jb * R + j] * v[gk, jb * R + j, ct * NC + c]
                        for r in T.unroll(MR2):
                            for c in T.vectorized(NC):
                                o[it * MR2 + r, ct * NC + c] = acc2[r, c]
            for i in range(R):
                for c in T.vectorized(D):
                    out[g, i0 + i, c] = o[i, c] / rsum[i]

    return attention
