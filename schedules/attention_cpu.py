"""Causal attention as one CPU kernel: O = softmax(scale * Q K^T + causal mask) V, flash style.

For q [G, N, D], kt [Gk, D, N] (K transposed) and v [Gk, N, D] float32, G = batch x heads, out
[G, N, D]: query group g reads K/V group g // (G / Gk) (multi-query: Gk = batch, one K/V head for
all query heads, read once instead of broadcast), and query i attends to keys j <= i (the mask the
BitMedViT attention adds: 0 on and below the diagonal, -inf above).

Per (g, block of R query rows from i0), in parallel (row blocks ordered light, heavy, light, .. so
that every thread's share of tasks costs the same), over key blocks of BK keys from k0 up to the
block's last row (the masked half is never touched), with an online softmax (row max m, sum l):
  pack    Kp[gk, j // NR, d, j % NR] = kt[gk, d, j] once per call, 0 past N (key strips contiguous;
          kt's rows are N floats apart, which maps a whole strip onto one L1 set); qs = scale * q's
          R rows once per task
  scores  s[r, j] = qs[r] . K[k0 + j] in MR x NR register tiles over d (the D x NR strip stays in L1
          across the row tiles; tiles wholly above the diagonal skipped)
  softmax per row, over its keys only, in L-lane vectors (only the one holding the diagonal masked
          past the row): m' = max(m, max_j s) (the lanes by a tree of halvings), a = exp(m - m'), m = m'
          for every row, then s = exp(s - m) (0 past the row), l = a l + sum_j s per lane
  output  o[r, :] = a o[r, :] + sum_j s[r, j] v[k0 + j, :] in MR2 x NC register tiles, each tile's
          keys stopping at its last row
then out = o / (l's lanes added). qs, s and o (R x (D + BK + D) floats) and the K/V block stay in L1/L2;
the N x N scores never reach memory (unfused: 4 passes over G x N x N floats); the per-row bookkeeping
(a max across lanes, a rescale) comes once per BK keys. The register tiles accumulate in s and o
themselves (LLVM keeps them in registers across the d and key loops): a tile buffer of its own, 1 KiB
on AVX-512, would be a TVM heap workspace, zeroed, stored and reloaded around every tile. Rows past N
(the last block when R does not divide N) read q's row N - 1 and are not stored; keys past N are
masked like any later key. Vector width L and register tiles come from the target (CpuFacts: L float32
lanes per SIMD register, accumulators within its registers). passes/fuse_causal_attention.py emits the
kernel before a target is chosen (PORTABLE vectors: correct anywhere); `schedule` (schedules/kernels.py)
rebuilds it for the target at the CPU schedule stage.
exp (_fast_exp) is TVM's fast_exp polynomial (topi fast_exp_float32, the one FastMathTransform uses
elsewhere) in 13 instructions instead of 18: relative error <= 3.1e-7 (2.6 float32 ulps; 2.98e-7 measured,
3.01e-7 before) vs float64 where float32 is normal (x >= -87.3), and 0 <= exp(x) < 1.2e-38 below
(test_attention_cpu.py measures both).

bf16 (AttentionConfig.bf16: --float-precision bf16, for a target with vdpbf16ps, L = 16; for one without, a
ValueError, as precision.check refuses such a build first; without a target, the float32 kernel): the two products on
bf16 operands, everything else as above in fp32. qs (Q scaled in fp32), K, V and the probabilities P = exp(s - m) in
[0, 1] (m: the row max up to this key block) are rounded to nearest even at 8 significand bits (TVM's cast) into
bf16 buffers: Kp[gk, j // NR, d // 2, (j % NR) * 2 + d % 2] (d padded to pairs with 0) holds each key's pair of d
that a row's pair of qs, one 32-bit broadcast, meets in one vdpbf16ps (16 keys, two terms each);
vp[gk, j // 2, c * 2 + j % 2] (0 past N and D, D padded to whole vectors) pairs V's keys per column, which a row's
pair of consecutive probabilities (ps, written in place of s's exps, 0 past the row) meets the same way (16 columns,
two keys each; an odd last key pairs with a 0). The row sums add the rounded P, so a row's output is a convex
combination of its bf16 V rows.
Error: each rounding moves its operand by at most u = 2^-8 relative; vdpbf16ps forms the products of bf16
operands exactly in fp32 (8 x 8 significand bits) and adds them in fp32. Against float64 of the same rounded
operands a score is off by at most D 2^-24 sum_d |qs_d k_d| (fp32 sums), which with exp's 3.1e-7 can move a
probability across a rounding tie of bf16 (then off by one bf16 ulp), and an output by fp32 sums of N terms; against
float32 each score moves by at most (2u + u^2) sum_d |qs_d k_d|, each probability and V by a further u
(test_attention_cpu.py bounds the kernel both ways).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from .bf16_intrinsics import LANES, PAIR, dot_pairs, import_dpbf16ps
from .cpu_rules.common import CpuFacts
from .w2a8 import CONFIG_ATTR, KERNEL_ATTR, attr_value

MASKED = -3.0e38  # score of a masked key: below any real score, finite so that s - max stays finite
PORTABLE = (8, 16)  # (lanes, registers) without a target: one AVX2 register; LLVM splits it on narrower SIMD
MAX_ROWS = 64  # R: query rows per task
MAX_KEYS = 512  # BK: keys per key block (a 64-row task's scores: 128 KiB, in L2)
MAGIC = 1.5 * 2**23  # x + MAGIC rounds x to an integer held in the low mantissa bits (|x| < 2^22)


@dataclass(frozen=True)
class AttentionConfig:
    groups: int  # G = batch x heads
    kv_groups: int  # Gk: K/V groups, dividing G (query group g reads K/V group g // (G / Gk))
    tokens: int  # N
    head_dim: int  # D
    scale: float  # 1 / sqrt(D) for BitMedViT
    bf16: bool = False  # --float-precision bf16: Q K^T and P V on bf16 operands where the target has vdpbf16ps

    def supported(self) -> bool:
        return self.groups % self.kv_groups == 0

    @property
    def name(self) -> str:
        """The kernel's name (bmvcc/bench.py's _ATTENTION parses it: its shape, and _bf16 for vdpbf16ps)."""
        return (f"causal_attention_g{self.groups}_kv{self.kv_groups}_n{self.tokens}_d{self.head_dim}"
                + ("_bf16" if self.bf16 else ""))


@dataclass(frozen=True)
class Tiles:
    lanes: int  # L: float32 lanes of one vector register
    rows: int  # R: query rows per parallel task (a multiple of every tile below)
    keys: int  # BK: keys per key block, a multiple of R
    mr: int  # scores register tile: mr rows x nr keys (two vectors)
    nr: int
    mr2: int  # output register tile: mr2 rows x nc head-dim columns (nc divides width)
    nc: int
    width: int  # output columns: D, or D padded to whole vectors (vdpbf16ps: a lane per column)

    @staticmethod
    def of(cfg: AttentionConfig, lanes: int, registers: int, whole_vectors: bool = False) -> "Tiles":
        """Accumulator tiles as tall as `registers` allow (besides one row of operand vectors and a
        broadcast); R the smallest multiple of the tiles covering N, at most MAX_ROWS; BK the smallest
        multiple of R covering N, at most MAX_KEYS. `whole_vectors` (vdpbf16ps): output tiles of whole vectors."""
        nr = 2 * lanes
        column_step = lanes if whole_vectors else 1
        width = -(-cfg.head_dim // column_step) * column_step
        nc = max(c for c in range(column_step, min(width, 4 * lanes) + 1, column_step) if width % c == 0)
        mr, mr2 = _tile_rows(registers, 2), _tile_rows(registers, -(-nc // lanes))
        row_step = max(nr, mr, mr2)  # powers of two: their least common multiple
        rows = max(row_step, min(MAX_ROWS, -(-cfg.tokens // row_step) * row_step))
        keys = rows * max(1, min(MAX_KEYS // rows, -(-cfg.tokens // rows)))
        return Tiles(lanes, rows, keys, mr, nr, mr2, nc, width)


def _tile_rows(registers: int, vectors: int) -> int:
    """Rows (1, 2, 4 or 8) of a register tile `vectors` wide: accumulators + one row of operands + a broadcast fit."""
    return max(r for r in (1, 2, 4, 8) if (r + 1) * vectors + 1 <= registers)


def vector_shape(facts) -> tuple[int, int]:
    """(float32 lanes per vector register, vector registers) of a CPU's CpuFacts; PORTABLE for None."""
    return PORTABLE if facts is None else (facts.lanes("float32"), facts.vector_registers)


def _runs_bf16(cfg: AttentionConfig, facts) -> bool:
    """Whether the kernel for a CPU (its CpuFacts; None: no target, the portable float32 kernel) takes its products
    on vdpbf16ps: a bf16 config's. A bf16 config for a CPU without vdpbf16ps is an internal error (ValueError):
    precision.check refuses such a build first."""
    if not cfg.bf16 or facts is None:
        return False
    if not facts.bf16_dot:
        raise ValueError("a bf16 attention kernel needs a CPU with vdpbf16ps (AVX-512 BF16), which this target lacks")
    return True


def _fast_exp(x):
    """exp(x) for x <= 0 (every exp here: a score or an old row max minus the new row max) in 13 vector
    instructions: TVM's fast_exp_float32 polynomial (topi/elemwise.h), 2^n * p(f) with x = n ln2 + f, x
    clamped below at ln(FLT_MIN) (2^n stays normal: exp <= 1.2e-38 there); n rounded by the 1.5 * 2^23
    trick (t's low mantissa bits are n + 127, shifted into 2^n's exponent), p evaluated by Horner."""
    c = T.max(x, T.float32(-87.33654))
    t = tirx.Var("t", "float32")  # bound, or TVM's simplifier folds (t - MAGIC - 127) back to c log2(e)
    f = c - (t - T.float32(MAGIC + 127)) * T.float32(0.6931471805599453)
    p = T.float32(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1, 1.0, 1.0):
        p = p * f + T.float32(coef)
    two_n = T.reinterpret("float32", T.shift_left(T.reinterpret("int32", t), 23))
    return tirx.Let(t, c * T.float32(1.44269504088896341) + T.float32(MAGIC + 127), two_n * p)


def _last_vector(key, lanes: int, keys: int):
    """The vector of `lanes` keys that holds `key` (a row's diagonal key within its key block), at most the
    block's last of `keys` keys: the row's last vector there, the only one that can hold keys past the row."""
    return T.min(keys // lanes, key // lanes + 1) - 1


def _across_lanes(op, x, lanes: int):
    """op (max, +) over the lanes of the vector x (a power of two of them), as log2(lanes) halvings, not a
    chain of lanes - 1 steps."""
    while lanes > 1:
        lanes //= 2
        x = op(*(tirx.Shuffle([x], [tirx.IntImm("int32", i) for i in range(h, h + lanes)]) for h in (0, lanes)))
    return x


def schedule(func, target):
    """The attention kernel `func` (built for any target) rebuilt for `target`'s vectors."""
    return attention_cpu(AttentionConfig(**attr_value(func.attrs[CONFIG_ATTR])), target)


def attention_cpu(cfg: AttentionConfig, target=None):
    """The PrimFunc (q, kt, v, out) for a CPU `target` (None: PORTABLE vectors), bmvcc.kernel "attention"
    (bmvcc tune measures it as a hand-scheduled kernel, no search) with its AttentionConfig (CONFIG_ATTR);
    marked tirx.is_scheduled when built for a target."""
    G, GK, N, D = cfg.groups, cfg.kv_groups, cfg.tokens, cfg.head_dim
    H = G // GK  # query groups per K/V group
    facts = None if target is None else CpuFacts.of(target)
    bf16 = _runs_bf16(cfg, facts)
    P = PAIR if bf16 else 1  # products' terms per lane and instruction: vdpbf16ps's pairs, or one FMA
    t = Tiles.of(cfg, *vector_shape(facts), whole_vectors=bf16)
    L, R, BK, MR, NR, MR2, NC, DO = t.lanes, t.rows, t.keys, t.mr, t.nr, t.mr2, t.nc, t.width
    assert not bf16 or L == LANES, "dot_pairs takes vectors of LANES float32 lanes (vdpbf16ps on zmm)"
    W = L if NC % L == 0 else NC  # output tile vectors: whole registers where D allows
    NB = -(-N // R)  # row blocks (the last may be partial)
    NK = -(-N // BK) * BK  # keys, padded to whole key blocks
    DE = -(-D // P) * P  # Q's and K's head dims in whole pairs (0 past D)
    NV = -(-N // P)  # V's pairs of keys (vdpbf16ps)
    scale = T.float32(cfg.scale)
    operand_dtype = "bfloat16" if bf16 else "float32"  # a product's operands: TVM's cast rounds to nearest even
    zero = tirx.const(0, operand_dtype)
    operand = (lambda x: T.Cast("bfloat16", x)) if bf16 else (lambda x: x)  # what the products read of a float32 x
    # P's zeros past a row: TVM 0.27 cannot store a vector of bf16 constants (BF16StorageLegalize); LLVM makes the
    # serial loop one 32-byte store
    zero_loop = T.serial if bf16 else T.vectorized

    @T.prim_func(private=True)
    def attention(q: T.Buffer((G, N, D), "float32"), kt: T.Buffer((GK, D, N), "float32"),
                  v: T.Buffer((GK, N, D), "float32"), out: T.Buffer((G, N, D), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: "attention"})
        kp = T.alloc_buffer((GK, NK // NR, DE // P, NR * P), operand_dtype)
        for gd in T.parallel(GK * DE):
            for j in range(NK):
                kp[gd // DE, j // NR, gd % DE // P, j % NR * P + gd % P] = T.if_then_else(
                    j < N and gd % DE < D, operand(kt[gd // DE, gd % DE, j]), zero)
        if bf16:  # V in pairs of keys per column: vp[gk, j // 2, c * 2 + j % 2] (0 past N and D)
            vp = T.alloc_buffer((GK, NV, DO * P), "bfloat16")
            for gj in T.parallel(GK * NV):
                for c in range(DO * P):
                    key = T.bind(gj % NV * P + c % P)
                    vp[gj // NV, gj % NV, c] = T.if_then_else(key < N and c // P < D,
                                                              operand(v[gj // NV, key, c // P]), zero)
        for task in T.parallel(G * NB):
            g = T.bind(task // NB)
            gk = T.bind(g // H)
            u = T.bind(task % NB)  # row blocks in the order 0, NB - 1, 1, NB - 2, ..: any run mixes light and heavy
            i0 = T.bind(T.Select(u % 2 == 0, u // 2, NB - 1 - u // 2) * R)
            qs = T.alloc_buffer((R, DE), operand_dtype)
            s = T.alloc_buffer((R, BK), "float32")
            o = T.alloc_buffer((R, DO), "float32")
            m = T.alloc_buffer((R,), "float32")  # row max so far
            rsum = T.alloc_buffer((R, L), "float32")  # sum of exp(s - m) so far, per lane (added up at the end)
            a = T.alloc_buffer((R,), "float32")  # this key block's rescale of o and rsum
            vec = T.alloc_buffer((L,), "float32")
            if bf16:
                ps = T.alloc_buffer((R, BK), "bfloat16")  # the probabilities exp(s - m), the pairs P V reads
            else:
                ps = T.meta_var(s)  # float32: in s itself
            for r in range(R):
                m[r] = T.float32(MASKED)
                for l in T.vectorized(L):
                    rsum[r, l] = T.float32(0)
                for c in T.vectorized(DE):
                    qs[r, c] = T.if_then_else(c < D, operand(q[g, T.min(i0 + r, N - 1), c] * scale), zero)
                for c in T.vectorized(DO):
                    o[r, c] = T.float32(0)
            for kb in range(i0 // BK + 1):
                k0 = T.bind(kb * BK)
                kn = T.bind(T.min(BK, i0 + R - k0))  # keys of this block up to the row block's last row
                for jt in range(kn // NR):  # scores: key strip outside, row tiles inside, none above the diagonal
                    for it in range(T.max(k0 + jt * NR - i0, 0) // MR, R // MR):
                        for r in T.unroll(MR):
                            for c in T.vectorized(NR):
                                s[it * MR + r, jt * NR + c] = T.float32(0)
                        if bf16:
                            for d in range(DE // P):
                                for r in T.unroll(MR):
                                    for cv in T.unroll(NR // L):
                                        s[it * MR + r, T.ramp(jt * NR + cv * L, 1, L)] = dot_pairs(
                                            s[it * MR + r, T.ramp(jt * NR + cv * L, 1, L)],
                                            T.reinterpret("int32", qs[it * MR + r, T.ramp(d * P, 1, P)]),
                                            kp[gk, k0 // NR + jt, d, T.ramp(cv * L * P, 1, L * P)], qs.data, kp.data)
                        else:
                            for d in range(D):
                                for r in T.unroll(MR):
                                    for cv in T.unroll(NR // L):
                                        for c in T.vectorized(L):
                                            s[it * MR + r, jt * NR + cv * L + c] = (
                                                s[it * MR + r, jt * NR + cv * L + c]
                                                + qs[it * MR + r, d] * kp[gk, k0 // NR + jt, d, cv * L + c])
                for r in range(R):  # online softmax over the row's vectors of keys (the last one masked), 0 after
                    last = T.bind(_last_vector(i0 + r - k0, L, BK))
                    for l in T.vectorized(L):
                        vec[l] = T.Select(k0 + last * L + l <= i0 + r, s[r, last * L + l], T.float32(MASKED))
                    for j in range(last):
                        for l in T.vectorized(L):
                            vec[l] = T.max(vec[l], s[r, j * L + l])
                    mr = T.bind(T.max(_across_lanes(T.max, vec[T.ramp(0, 1, L)], L), m[r]))  # the new row max
                    a[r] = _fast_exp(m[r] - mr)
                    m[r] = mr
                for r in range(R):  # a second pass: no row's exps wait for its max (a chain of max instructions)
                    last = T.bind(_last_vector(i0 + r - k0, L, BK))
                    for l in T.vectorized(L):
                        rsum[r, l] = rsum[r, l] * a[r]
                    for j in range(last):
                        for l in T.vectorized(L):
                            e = T.bind(_fast_exp(s[r, j * L + l] - m[r]))  # bound: TVM's bf16 cast reads it twice
                            ps[r, j * L + l] = operand(e)
                            rsum[r, l] = rsum[r, l] + ps[r, j * L + l].astype("float32")
                    for l in T.vectorized(L):
                        e = T.bind(_fast_exp(s[r, last * L + l] - m[r]))
                        ps[r, last * L + l] = T.Select(k0 + last * L + l <= i0 + r, operand(e), zero)
                        rsum[r, l] = rsum[r, l] + ps[r, last * L + l].astype("float32")
                    for j in range(last + 1, kn // L):
                        for l in zero_loop(L):
                            ps[r, j * L + l] = zero
                for it in range(R // MR2):  # output: o = a o + P V_block
                    for ct in range(DO // NC):
                        for r in T.unroll(MR2):
                            for c in T.vectorized(NC):
                                o[it * MR2 + r, ct * NC + c] = o[it * MR2 + r, ct * NC + c] * a[it * MR2 + r]
                        if bf16:  # key pairs (an odd last key pairs with a 0 probability)
                            for j in range(-(-T.min(BK, T.min(i0 + it * MR2 + MR2, N) - k0) // P)):
                                for r in T.unroll(MR2):
                                    for cv in T.unroll(NC // L):
                                        o[it * MR2 + r, T.ramp(ct * NC + cv * L, 1, L)] = dot_pairs(
                                            o[it * MR2 + r, T.ramp(ct * NC + cv * L, 1, L)],
                                            T.reinterpret("int32", ps[it * MR2 + r, T.ramp(j * P, 1, P)]),
                                            vp[gk, k0 // P + j, T.ramp((ct * NC + cv * L) * P, 1, L * P)],
                                            ps.data, vp.data)
                        else:
                            for j in range(T.min(BK, T.min(i0 + it * MR2 + MR2, N) - k0)):
                                for r in T.unroll(MR2):
                                    for cv in T.unroll(NC // W):
                                        for c in T.vectorized(W):
                                            o[it * MR2 + r, ct * NC + cv * W + c] = (
                                                o[it * MR2 + r, ct * NC + cv * W + c]
                                                + s[it * MR2 + r, j] * v[gk, k0 + j, ct * NC + cv * W + c])
            for r in range(T.min(R, N - i0)):
                total = T.bind(_across_lanes(T.Add, rsum[r, T.ramp(0, 1, L)], L))
                for c in T.vectorized(D):
                    out[g, i0 + r, c] = o[r, c] / total

    attention = attention.with_attr(CONFIG_ATTR, vars(cfg))
    if bf16:  # dot_pairs' LLVM function, linked into the module
        attention = import_dpbf16ps(attention)
    return attention if target is None else attention.with_attr("tirx.is_scheduled", True)
