"""bmvcc's fused attention kernel on fp16 tensor cores for schedules/attention_cuda.py's compute definition.

One CTA of 4 warps takes BM = 64 query rows of one batch entry and K/V head: row r is token t0 + r // G of
query head kvh * G + r % G (G = H / Hkv query heads per K/V head; multi-query: every head of the model), so
each K/V tile is loaded once for all the query heads it serves. Per warp 16 rows, flash-style (FlashAttention-2):

    Q tile --ldmatrix.x4--> A fragments, kept in registers for the whole kernel
    K/V tiles of BN = 64 keys: global --cp.async (16 bytes, zero-filled past the last key)--> shared,
        double buffered (tile kt + 1 in flight while tile kt is computed)
    S = Q K^T: K --ldmatrix.x4--> B fragments, mma.sync.m16n8k16 f16 x f16 + f32 (registers)
    online softmax on S's accumulator fragments (a row lives in the 4 lanes of a quad: max and sum by
        shfl.bfly): causal and key-count condition from the indices, m = running max of s,
        p = 2^(coef s - coef m) rounded to fp16 (coef = scale * log2 e folded into the exponent: one FFMA),
        l = running sum of those rounded p, O and l rescaled by 2^(coef (m_old - m))
    O += P V: P's accumulator layout *is* the A fragment layout of m16n8k16 (no shared memory),
        V --ldmatrix.x4.trans--> B fragments
    out = O * (1 / l) (fp16; 1 ulp from the definition's O / l), lse = coef m + log2(l)

Causal: a CTA visits key tiles 0 .. (its last token) // BN only; the fully masked ones are never loaded.
Shapes (`supported`): head_dim a multiple of 16 whose tiles fit static shared memory, 64 x (D + 8) x 2 bytes
for Q and 2 x 2 x 64 x (D + 8) x 2 for K/V (D = 64: 45 KB of the 48 KB; the 8 halves of padding per row put
ldmatrix's 8 row addresses in distinct banks), and G dividing 64.

Error versus float32 attention of the unrounded inputs: attention_cuda's bound (the fp16 q k products are exact
in the fp32 mma accumulators) with one more rounding: p is rounded to fp16 before P V (relative u per weight;
l sums the rounded weights, so they still sum to one, and the normalized weights move by a factor within
e^(+-2u)): |out - out32| <= (e^(2 Delta_i) - 1 + 4u) * max_j |v_j| (tests/test_attention_cuda.py).
"""

from __future__ import annotations

import math

from ..targets.cuda import STATIC_SHARED_BYTES
from . import attention_cuda
from .attention_cuda import DTYPE, PrefillConfig, config_of, element, operand_shapes, output_value
from .w2a8 import with_kernel_attrs

BM = 64  # query rows per CTA (4 warps x 16)
BN = 64  # keys per K/V tile
WARPS = 4
PAD = 8  # halves of padding per shared row
VEC = 8  # halves per 16-byte cp.async / vector load


def shared_bytes(cfg: PrefillConfig) -> int:
    """The Q tile and two stages of K and V tiles, fp16, rows padded."""
    return (BM + 2 * 2 * BN) * (cfg.head_dim + PAD) * 2


def supported(cfg: PrefillConfig) -> bool:
    """Also: q, k, v read straight from a QKV tensor only in 16-byte aligned rows (width and offsets multiples of 8)."""
    aligned = all(x % VEC == 0 for x in (cfg.width, cfg.q_offset, cfg.k_offset, cfg.v_offset))
    return (cfg.head_dim % 16 == 0 and shared_bytes(cfg) <= STATIC_SHARED_BYTES and cfg.heads % cfg.kv_heads == 0
            and BM % (cfg.heads // cfg.kv_heads) == 0 and aligned)


def visible(cfg: PrefillConfig, token, j):
    """Whether the query at `token` attends to key j (j < N: the zero-filled keys of a last partial tile are not)."""
    from tvm.script import tirx as T

    return T.And(j <= token, j < cfg.tokens) if cfg.causal else j < cfg.tokens


def tokens_per_cta(cfg: PrefillConfig) -> int:
    return BM // (cfg.heads // cfg.kv_heads)


def key_tiles(cfg: PrefillConfig, t0, minimum=min):
    """Key tiles the CTA whose first token is t0 visits (t0 an int or a TIR expression, `minimum` min or T.min):
    causal, only those up to its last token's."""
    all_tiles = -(-cfg.tokens // BN)
    return minimum(all_tiles, (minimum(t0 + tokens_per_cta(cfg), cfg.tokens) - 1) // BN + 1) if cfg.causal \
        else all_tiles


def attention_tc(cfg: PrefillConfig):
    """The scheduled kernel (q, k, v, out, lse) for `cfg` (see the module docstring)."""
    from tvm.script import tirx as T

    B, H, HKV, N, D = cfg.batch, cfg.heads, cfg.kv_heads, cfg.tokens, cfg.head_dim
    G = H // HKV
    QS, KVS = operand_shapes(cfg)
    TQ = tokens_per_cta(cfg)
    TILES = (N + TQ - 1) // TQ
    DP = D + PAD
    RV = D // VEC  # 16-byte vectors per row
    NS, ND, KD, KB = BN // 8, D // 8, D // 16, BN // 16  # S n8 tiles, O n8 tiles, k16 steps of QK^T and PV
    COPIES = BN * RV // (32 * WARPS)  # 16-byte copies per thread per K (or V) tile
    coef = T.float32(cfg.scale * math.log2(math.e))
    lowest = T.min_value("float32")

    @T.macro
    def load_kv(ks, vs, k, v, b, kvh, tid, stage, kt):
        for c in T.unroll(COPIES):
            r = T.meta_var((c * 32 * WARPS + tid) // RV)
            col = T.meta_var((c * 32 * WARPS + tid) % RV * VEC)
            j = T.meta_var(kt * BN + r)
            size = T.meta_var(T.Cast("uint32", T.if_then_else(j < N, 16, 0)))  # zero fill past the last key
            key = T.meta_var(T.min(j, N - 1))
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                T.address_of(ks[stage, r, col]), T.address_of(element(cfg, k, cfg.k_offset, b, key, kvh, col)), 16,
                size))
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                T.address_of(vs[stage, r, col]), T.address_of(element(cfg, v, cfg.v_offset, b, key, kvh, col)), 16,
                size))
        T.evaluate(T.ptx["cp.async.commit_group"]())

    @T.prim_func(private=True, s_tir=True)
    def attention(q: T.Buffer(QS, DTYPE), k: T.Buffer(KVS, DTYPE), v: T.Buffer(KVS, DTYPE),
                  out: T.Buffer((B, N, H, D), cfg.out_dtype), lse: T.Buffer((B, N, H), DTYPE)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(B * HKV * TILES, thread="blockIdx.x"):
            for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("attention"):
                        vbx, warp, lane = T.axis.remap("SSS", [bx, ty, tx])
                        T.reads()
                        T.writes()
                        qs = T.sblock_alloc_buffer((BM, DP), DTYPE, scope="shared")
                        ks = T.sblock_alloc_buffer((2, BN, DP), DTYPE, scope="shared")
                        vs = T.sblock_alloc_buffer((2, BN, DP), DTYPE, scope="shared")
                        qf = T.sblock_alloc_buffer((KD * 8,), DTYPE, scope="local")
                        kf = T.sblock_alloc_buffer((8,), DTYPE, scope="local")
                        vf = T.sblock_alloc_buffer((8,), DTYPE, scope="local")
                        s = T.sblock_alloc_buffer((NS * 4,), "float32", scope="local")
                        p = T.sblock_alloc_buffer((NS * 4,), DTYPE, scope="local")
                        o = T.sblock_alloc_buffer((ND * 4,), "float32", scope="local")
                        m = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        m_new = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        l = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        inv_l = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        m_scaled = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        b: T.let[T.int32] = vbx // (HKV * TILES)
                        kvh: T.let[T.int32] = vbx // TILES % HKV
                        t0: T.let[T.int32] = vbx % TILES * TQ
                        tid: T.let[T.int32] = warp * 32 + lane
                        n_kt: T.let[T.int32] = key_tiles(cfg, t0, T.min)
                        load_kv(ks, vs, k, v, b, kvh, tid, 0, 0)
                        for c in T.unroll(BM * RV // (32 * WARPS)):  # Q tile, zeros past the last token
                            r = T.meta_var((c * 32 * WARPS + tid) // RV)
                            col = T.meta_var((c * 32 * WARPS + tid) % RV * VEC)
                            token = T.meta_var(t0 + r // G)
                            if token < N:
                                for e in T.vectorized(VEC):
                                    qs[r, col + e] = element(cfg, q, cfg.q_offset, b, token, kvh * G + r % G, col + e)
                            else:
                                for e in T.vectorized(VEC):
                                    qs[r, col + e] = T.float16(0)
                        for i in T.unroll(ND * 4):
                            o[i] = T.float32(0)
                        for h in T.unroll(2):
                            m[h] = lowest
                            l[h] = T.float32(0)
                        T.tvm_storage_sync("shared")
                        for kd in T.unroll(KD):  # lanes address rows lane % 16, columns 8 (lane / 16)
                            T.evaluate(T.ptx_legacy.ldmatrix(
                                False, 4, ".b16", qf.data, kd * 8, qs.access_ptr("r"),
                                (warp * 16 + lane % 16) * DP + kd * 16 + lane // 16 * 8, dtype=DTYPE))
                        for kt in T.serial(n_kt):
                            if kt + 1 < n_kt:
                                load_kv(ks, vs, k, v, b, kvh, tid, (kt + 1) % 2, kt + 1)
                            else:
                                T.evaluate(T.ptx["cp.async.commit_group"]())  # an empty group: wait_group 1 below
                            T.evaluate(T.ptx["cp.async.wait_group"](1))
                            T.tvm_storage_sync("shared")
                            stage = T.meta_var(kt % 2)
                            for i in T.unroll(NS * 4):
                                s[i] = T.float32(0)
                            for kd in T.unroll(KD):
                                for n2 in T.unroll(NS // 2):
                                    # matrices (keys 0-7 | 8-15) x (d 0-7 | 8-15): B of n8 tiles 2 n2, 2 n2 + 1
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        False, 4, ".b16", kf.data, 0, ks.access_ptr("r"),
                                        stage * BN * DP + (n2 * 16 + lane // 16 * 8 + lane % 8) * DP + kd * 16
                                        + lane // 8 % 2 * 8, dtype=DTYPE))
                                    for half in T.unroll(2):
                                        T.evaluate(T.ptx_legacy.mma(
                                            "m16n8k16", "row", "col", "fp16", "fp16", "fp32", qf.data, kd * 8,
                                            kf.data, half * 4, s.data, (n2 * 2 + half) * 4, False, dtype="float32"))
                            for h in T.unroll(2):  # rows warp * 16 + lane / 4 + 8 h
                                token = T.meta_var(t0 + (warp * 16 + lane // 4 + 8 * h) // G)
                                m_new[h] = m[h]
                                for nt in T.unroll(NS):
                                    for c in T.unroll(2):
                                        j = T.meta_var(kt * BN + nt * 8 + lane % 4 * 2 + c)
                                        s[nt * 4 + h * 2 + c] = T.Select(visible(cfg, token, j), s[nt * 4 + h * 2 + c],
                                                                         lowest)
                                        m_new[h] = T.max(m_new[h], s[nt * 4 + h * 2 + c])
                                for x in T.unroll(2):  # the quad's lanes 1, 2 apart
                                    m_new[h] = T.max(m_new[h], T.tvm_warp_shuffle_xor(
                                        T.tvm_warp_activemask(), m_new[h], 1 << x, 32, 32))
                                alpha = T.meta_var(T.exp2((m[h] - m_new[h]) * coef))
                                m_scaled[0] = m_new[h] * coef
                                l[h] = l[h] * alpha
                                for dt in T.unroll(ND):
                                    for c in T.unroll(2):
                                        o[dt * 4 + h * 2 + c] = o[dt * 4 + h * 2 + c] * alpha
                                for nt in T.unroll(NS):
                                    for c in T.unroll(2):
                                        p[nt * 4 + h * 2 + c] = T.Cast(
                                            DTYPE, T.exp2(s[nt * 4 + h * 2 + c] * coef - m_scaled[0]))
                                        l[h] = l[h] + T.Cast("float32", p[nt * 4 + h * 2 + c])
                                m[h] = m_new[h]
                            for kb in T.unroll(KB):
                                for d2 in T.unroll(ND // 2):
                                    # matrices (keys 0-7 | 8-15) x (d 0-7 | 8-15), transposed: B of d tiles 2 d2, +1
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        True, 4, ".b16", vf.data, 0, vs.access_ptr("r"),
                                        stage * BN * DP + (kb * 16 + lane // 8 % 2 * 8 + lane % 8) * DP + d2 * 16
                                        + lane // 16 * 8, dtype=DTYPE))
                                    for half in T.unroll(2):
                                        T.evaluate(T.ptx_legacy.mma(
                                            "m16n8k16", "row", "col", "fp16", "fp16", "fp32", p.data, kb * 8,
                                            vf.data, half * 4, o.data, (d2 * 2 + half) * 4, False, dtype="float32"))
                            T.tvm_storage_sync("shared")
                        for h in T.unroll(2):
                            for x in T.unroll(2):
                                l[h] = l[h] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), l[h], 1 << x, 32, 32)
                            row = T.meta_var(warp * 16 + lane // 4 + 8 * h)
                            token = T.meta_var(t0 + row // G)
                            inv_l[0] = T.float32(1) / l[h]  # one division per row (IEEE: a slow path in SASS)
                            if token < N:
                                for dt in T.unroll(ND):
                                    for c in T.unroll(2):
                                        out[b, token, kvh * G + row % G, dt * 8 + lane % 4 * 2 + c] = output_value(
                                            cfg, o[dt * 4 + h * 2 + c] * inv_l[0])
                                if lane % 4 == 0:
                                    lse[b, token, kvh * G + row % G] = T.Cast(DTYPE, m[h] * coef + T.log2(l[h]))

    return attention


def kernel_ops(func) -> float:
    """Arithmetic of the kernel serving `func`'s configuration: Q K^T and P V over the (BM x BN) tiles it visits
    (causal: the tiles up to each CTA's last token's), a multiply-add counted as 2; TVM's kernel's count where it
    serves."""
    cfg = config_of(func)
    if not supported(cfg):
        return attention_cuda.kernel_ops(func)
    visited = sum(key_tiles(cfg, t0) for t0 in range(0, cfg.tokens, tokens_per_cta(cfg)))
    return 4.0 * cfg.batch * cfg.kv_heads * visited * BM * BN * cfg.head_dim


def schedule(func, target, knobs=None):
    """attention_tc for `func`'s configuration, with `func`'s kernel attributes; TVM's prefill kernel
    (attention_cuda.schedule, also the benchmark baseline) for shapes it does not take. No knobs."""
    cfg = config_of(func)
    if not supported(cfg):
        return attention_cuda.schedule(func, target)
    kernel = attention_tc(cfg)
    return with_kernel_attrs(kernel, func)
