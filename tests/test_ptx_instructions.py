"""bmvcc's PTX emulator, one instruction family at a time, against numpy references written from the PTX ISA 8.5
tables (fragment layouts of §9.7.14.5, shfl.sync's pseudo code, lop3/prmt/bfi definitions), and its checks:
bounds, unknown instructions, divergence, cp.async zero fill and completion at wait_group."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from bmvcc.ptx import EmulationError, Launch, parse_ptx, run_kernel

HEAD = """.version 8.5
.target sm_87
.address_size 64
.visible .entry k(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd)
{
 .reg .pred %p<8>; .reg .b16 %rs<8>; .reg .b32 %r<64>; .reg .f32 %f<32>; .reg .b64 %rd<32>;
 .shared .align 16 .b8 sm[4096];
 ld.param.u64 %rd1, [pa]; ld.param.u64 %rd2, [pb]; ld.param.u64 %rd3, [pc]; ld.param.u64 %rd8, [pd];
 mov.u32 %r1, %tid.x;
 mul.wide.u32 %rd4, %r1, 4;
 add.s64 %rd5, %rd1, %rd4; add.s64 %rd6, %rd2, %rd4; add.s64 %rd7, %rd3, %rd4; add.s64 %rd9, %rd8, %rd4;
 ld.global.u32 %r2, [%rd5]; ld.global.u32 %r3, [%rd6]; ld.global.u32 %r5, [%rd9];
"""


def run(body: str, a, b, d=None, threads=32, out_words=1):
    """Runs HEAD + body (which leaves its result in %r4 unless it stores itself) on `threads` threads: %r2 = a[tid],
    %r3 = b[tid], %r5 = d[tid] as 32-bit words; returns c (uint32 words, `out_words` per thread)."""
    text = HEAD + body + "\n st.global.u32 [%rd7], %r4;\n ret;\n}\n"
    a, b = np.asarray(a).astype(np.uint32, copy=False), np.asarray(b).astype(np.uint32, copy=False)
    d = np.zeros(threads, np.uint32) if d is None else np.asarray(d).astype(np.uint32)
    c = np.zeros(threads * out_words, np.uint32)
    run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (threads, 1, 1), [a, b, c, d]))
    return c


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


RNG = np.random.default_rng(0)
A32, B32, C32 = (RNG.integers(0, 2**32, 32, dtype=np.uint64).astype(np.uint32) for _ in range(3))


def test_lop3_all_luts():
    """lop3: bit i of d = bit (4a_i + 2b_i + c_i) of immLut (§9.7.7.6): every lut of a set of functions."""
    for lut in (0x96, 0xE8, 0x80, 0xFE, 0x1B, 0x00, 0xFF):
        got = run(f"lop3.b32 %r4, %r2, %r3, %r5, {lut};", A32, B32, C32)
        want = np.zeros(32, np.uint32)
        for i in range(8):
            if lut >> i & 1:
                want |= (A32 if i & 4 else ~A32) & (B32 if i & 2 else ~B32) & (C32 if i & 1 else ~C32)
        np.testing.assert_array_equal(got, want)


def test_prmt_default_mode():
    """prmt: byte i of d = byte sel_i & 7 of {b, a} (a = bytes 0-3), or its sign replicated if sel_i & 8."""
    sel = RNG.integers(0, 2**16, 32).astype(np.uint32)
    got = run("prmt.b32 %r4, %r2, %r3, %r5;", A32, B32, sel)
    for t in range(32):
        src = list(int(A32[t]).to_bytes(4, "little") + int(B32[t]).to_bytes(4, "little"))
        out = 0
        for i in range(4):
            s = int(sel[t]) >> (4 * i) & 15
            byte = src[s & 7]
            out |= ((0xFF if byte & 0x80 else 0) if s & 8 else byte) << (8 * i)
        assert got[t] == out


@pytest.mark.parametrize("mode", ["lo", "hi"])
@pytest.mark.parametrize("atype,btype", [("u32", "u32"), ("s32", "u32"), ("u32", "s32"), ("s32", "s32")])
def test_dp2a(mode, atype, btype):
    """dp2a: d = c + sum over i < 2 of a's 16-bit half i times b's byte (i, or i + 2 for .hi), each extended as its
    type says, modulo 2^32 (the PTX ISA's pseudo code, in Python integers)."""
    got = run(f"dp2a.{mode}.{atype}.{btype} %r4, %r2, %r3, %r5;", A32, B32, C32)
    for t in range(32):
        halves = int(A32[t]).to_bytes(4, "little")
        va = [int.from_bytes(halves[2 * i:2 * i + 2], "little", signed=atype == "s32") for i in range(2)]
        vb = list(int(B32[t]).to_bytes(4, "little"))
        vb = [v - 256 if btype == "s32" and v >= 128 else v for v in vb]
        first = 0 if mode == "lo" else 2
        assert got[t] == (int(C32[t]) + va[0] * vb[first] + va[1] * vb[first + 1]) % 2**32


def test_bfi_bfe_shifts():
    pos, ln = RNG.integers(0, 40, 32), RNG.integers(0, 40, 32)
    body = "shr.u32 %r7, %r5, 8; and.b32 %r6, %r5, 255; bfi.b32 %r4, %r2, %r3, %r6, %r7;"
    got = run(body, A32, B32, pos + (ln << 8))
    for t in range(32):
        p, n = int(pos[t]), int(ln[t])
        mask = 0 if p >= 32 else ((1 << min(n, 32)) - 1) << p & 0xFFFFFFFF
        assert got[t] == (int(B32[t]) & ~mask | (int(A32[t]) << p if p < 32 else 0) & mask) & 0xFFFFFFFF
    sh = RNG.integers(0, 40, 32).astype(np.uint32)
    np.testing.assert_array_equal(run("shl.b32 %r4, %r2, %r3;", A32, sh),
                                  np.where(sh >= 32, 0, (A32.astype(np.uint64) << np.minimum(sh, 31)) & 0xFFFFFFFF))
    np.testing.assert_array_equal(run("shr.s32 %r4, %r2, %r3;", A32, sh),
                                  (A32.view(np.int32) >> np.minimum(sh, 31).astype(np.int32)).view(np.uint32))
    got = run("bfe.s32 %r4, %r2, %r3, 5;", A32, RNG.integers(0, 27, 32))
    assert set(got.view(np.int32)) <= set(range(-16, 16))


def test_integer_arithmetic_wraps():
    np.testing.assert_array_equal(run("mad.lo.s32 %r4, %r2, %r3, %r5;", A32, B32, C32),
                                  (A32.astype(np.uint64) * B32 + C32).astype(np.uint32))
    got = run("mul.hi.u32 %r4, %r2, %r3;", A32, B32)
    np.testing.assert_array_equal(got, ((A32.astype(np.uint64) * B32) >> 32).astype(np.uint32))
    x = np.array([7, -7, 7, -7] * 8, np.int32)
    y = np.array([2, 2, -2, -2] * 8, np.int32)
    np.testing.assert_array_equal(run("div.s32 %r4, %r2, %r3;", x.view(np.uint32), y.view(np.uint32)).view(np.int32),
                                  np.array([3, -3, -3, 3] * 8))
    np.testing.assert_array_equal(run("rem.s32 %r4, %r2, %r3;", x.view(np.uint32), y.view(np.uint32)).view(np.int32),
                                  np.array([1, -1, 1, -1] * 8))


def test_fma_rn_f32_is_single_rounded():
    """fma.rn.f32 against exact rational arithmetic rounded once (Python's Fraction -> nearest float32)."""
    a = RNG.normal(0, 1, 32).astype(np.float32)
    b = RNG.normal(0, 1, 32).astype(np.float32)
    c = (-(a.astype(np.float64) * b) * (1 + RNG.normal(0, 1e-7, 32))).astype(np.float32)  # cancellation
    got = run("fma.rn.f32 %f3, %f1, %f2, %f4; mov.b32 %r4, %f3;".replace(
        "fma", "mov.b32 %f1, %r2; mov.b32 %f2, %r3; mov.b32 %f4, %r5; fma"), bits(a), bits(b), bits(c)).view(np.float32)
    for t in range(32):
        exact = Fraction(float(a[t])) * Fraction(float(b[t])) + Fraction(float(c[t]))
        assert got[t] == _round_f32(exact), t


def _round_f32(x: Fraction) -> np.float32:
    """Nearest float32 (ties to even) to a rational, by bisection on neighbouring float32 values."""
    f = np.float32(float(x))  # within 1 ulp
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(np.float32(c).view(np.uint32)) & 1))


def test_float_ops_and_conversions():
    a = RNG.normal(0, 3, 32).astype(np.float32)
    b = RNG.normal(0, 3, 32).astype(np.float32)
    pre = "mov.b32 %f1, %r2; mov.b32 %f2, %r3; "
    for instr, want in [("div.rn.f32", a / b), ("mul.rn.f32", a * b), ("sub.f32", a - b),
                        ("max.f32", np.fmax(a, b)), ("min.f32", np.fmin(a, b))]:
        got = run(pre + f"{instr} %f3, %f1, %f2; mov.b32 %r4, %f3;", bits(a), bits(b)).view(np.float32)
        np.testing.assert_array_equal(got, want)
    big = a * np.float32(1e9)
    got = run(pre + "cvt.rni.s32.f32 %r4, %f1;", bits(big), bits(b)).view(np.int32)  # saturates
    np.testing.assert_array_equal(got, np.clip(np.rint(big.astype(np.float64)), -2**31, 2**31 - 1))
    got = run("cvt.rn.f32.s32 %f3, %r2; mov.b32 %r4, %f3;", A32, B32).view(np.float32)
    np.testing.assert_array_equal(got, A32.view(np.int32).astype(np.float32))
    got = run(pre + "cvt.rn.f16.f32 %rs1, %f1; cvt.f32.f16 %f3, %rs1; mov.b32 %r4, %f3;", bits(a), bits(b))
    np.testing.assert_array_equal(got.view(np.float32), a.astype(np.float16).astype(np.float32))
    got = run(pre + "ex2.approx.f32 %f3, %f1; mov.b32 %r4, %f3;", bits(a), bits(b)).view(np.float32)
    np.testing.assert_allclose(got, np.exp2(a.astype(np.float64)), rtol=2 * 2**-23)  # ISA: 2 ulp


def test_setp_nan_and_selp():
    a = np.array([1.0, np.nan, 2.0, np.nan] * 8, np.float32)
    b = np.array([1.0, 1.0, np.nan, np.nan] * 8, np.float32)
    pre = "mov.b32 %f1, %r2; mov.b32 %f2, %r3; "
    for cmp, want in [("eq", [1, 0, 0, 0]), ("ne", [0, 0, 0, 0]), ("equ", [1, 1, 1, 1]), ("neu", [0, 1, 1, 1]),
                      ("nan", [0, 1, 1, 1]), ("num", [1, 0, 0, 0])]:
        got = run(pre + f"setp.{cmp}.f32 %p1, %f1, %f2; selp.u32 %r4, 1, 0, %p1;", bits(a), bits(b))
        np.testing.assert_array_equal(got, want * 8, err_msg=cmp)


@pytest.mark.parametrize("mode,b,c", [("idx", 5, 31), ("bfly", 3, 31), ("down", 4, 31), ("up", 2, 0),
                                      ("idx", 1, 0x1C1F)])
def test_shfl_sync(mode, b, c):
    """shfl.sync per the ISA's pseudo code (segmask = c[12:8], maxLane/minLane), including out-of-range lanes."""
    got = run(f"shfl.sync.{mode}.b32 %r4|%p1, %r2, {b}, {c}, -1;", A32, B32)
    for lane in range(32):
        seg = (c >> 8) & 31
        max_lane, min_lane = (lane & seg) | (c & 31 & ~seg), lane & seg
        j, ok = {"idx": (min_lane | (b & ~seg), None), "up": (lane - b, None), "down": (lane + b, None),
                 "bfly": (lane ^ b, None)}[mode]
        ok = j >= max_lane if mode == "up" else j <= max_lane
        assert got[lane] == A32[j if ok else lane]


def test_vote_and_activemask_under_divergence():
    body = """setp.lt.u32 %p1, %r1, 10;
 @%p1 bra SKIP;
 activemask.b32 %r4;
 bra DONE;
SKIP:
 vote.sync.ballot.b32 %r4, %p1, -1;
DONE:
"""
    got = run(body, A32, B32)
    np.testing.assert_array_equal(got, [0x3FF] * 10 + [0xFFFFFC00] * 22)


def test_divergent_loop_reconverges():
    """Each thread loops tid times (a backward branch), then all reconverge and store."""
    body = """mov.u32 %r4, 0;
 mov.u32 %r6, 0;
LOOP:
 setp.ge.u32 %p1, %r6, %r1;
 @%p1 bra END;
 add.s32 %r4, %r4, %r2;
 add.s32 %r6, %r6, 1;
 bra LOOP;
END:
 add.s32 %r4, %r4, 1;
"""
    np.testing.assert_array_equal(run(body, np.full(32, 3), B32), 3 * np.arange(32) + 1)


def _fragments_m16n8k32(a, b, c):
    """Per-lane registers of mma.m16n8k32 .s8 from the ISA's fragment tables (§9.7.14.5.14, Figures for
    m16n8k32): a_i / b_i / c_i of each lane, loops written straight from the tables."""
    fa, fb, fc = np.zeros((32, 16), np.int8), np.zeros((32, 8), np.int8), np.zeros((32, 4), np.int32)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(16):
            row = g if (i < 4 or 8 <= i < 12) else g + 8
            col = t * 4 + (i & 3) + (16 if i >= 8 else 0)
            fa[lane, i] = a[row, col]
        for i in range(8):
            fb[lane, i] = b[t * 4 + (i & 3) + (16 if i >= 4 else 0), g]
        for i in range(4):
            fc[lane, i] = c[g + (8 if i >= 2 else 0), t * 2 + (i & 1)]
    return fa.view(np.uint32), fb.view(np.uint32), fc.view(np.uint32)


def test_mma_m16n8k32_s8():
    a = RNG.integers(-128, 128, (16, 32), dtype=np.int8)
    b = RNG.integers(-128, 128, (32, 8), dtype=np.int8)
    c = RNG.integers(-2**31, 2**31, (16, 8)).astype(np.int32)
    fa, fb, fc = _fragments_m16n8k32(a, b, c)
    words = np.concatenate([fa, fb, fc], axis=1)  # [lane, 10]
    body = "".join(f"ld.global.u32 %r{10 + i}, [%rd5+{4 * i}];\n" for i in range(10)).replace(
        "%rd5", "%rd10") + """mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%r20, %r21, %r22, %r23}, {%r10, %r11, %r12, %r13}, {%r14, %r15}, {%r16, %r17, %r18, %r19};
 st.global.v4.u32 [%rd11], {%r20, %r21, %r22, %r23};
 mov.u32 %r4, %r20;
"""
    body = "mul.wide.u32 %rd12, %r1, 40; add.s64 %rd10, %rd1, %rd12; mul.wide.u32 %rd12, %r1, 16; " \
           "add.s64 %rd11, %rd8, %rd12;\n" + body
    d = np.zeros(32 * 4, np.uint32)
    text = HEAD.replace(" ld.global.u32 %r2, [%rd5]; ld.global.u32 %r3, [%rd6]; ld.global.u32 %r5, [%rd9];\n", "") \
        + body + "\n ret;\n}\n"
    run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (32, 1, 1),
                                            [words.reshape(-1).copy(), np.zeros(1, np.uint32), np.zeros(32, np.uint32), d]))
    want = (a.astype(np.int64) @ b.astype(np.int64) + c).astype(np.uint64).astype(np.uint32).view(np.int32)  # wraps
    _, _, want_frag = _fragments_m16n8k32(a, b, want)
    np.testing.assert_array_equal(d.reshape(32, 4), want_frag)


def _fragments_m16n8k16_f16(a, b, c):
    """Per-lane registers of mma.m16n8k16 .f16 x .f16 + .f32 from the ISA's tables: a_i at row g + 8 for
    i in {2, 3, 6, 7}, col 2t + (i & 1) + 8 for i >= 4; b_i at row 2t + (i & 1) + 8 for i >= 2, col g; c as m16n8k32."""
    fa, fb, fc = np.zeros((32, 8), np.float16), np.zeros((32, 4), np.float16), np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            fa[lane, i] = a[g + (8 if i in (2, 3, 6, 7) else 0), 2 * t + (i & 1) + (8 if i >= 4 else 0)]
        for i in range(4):
            fb[lane, i] = b[2 * t + (i & 1) + (8 if i >= 2 else 0), g]
            fc[lane, i] = c[g + (8 if i >= 2 else 0), t * 2 + (i & 1)]
    return fa.view(np.uint32), fb.view(np.uint32), fc.view(np.uint32)


def test_mma_m16n8k16_f16_f32():
    a = RNG.normal(0, 1, (16, 16)).astype(np.float16)
    b = RNG.normal(0, 1, (16, 8)).astype(np.float16)
    c = RNG.normal(0, 1, (16, 8)).astype(np.float32)
    words = np.concatenate(_fragments_m16n8k16_f16(a, b, c), axis=1)  # [lane, 4 + 2 + 4]
    body = "mul.wide.u32 %rd12, %r1, 40; add.s64 %rd10, %rd1, %rd12; mul.wide.u32 %rd12, %r1, 16; " \
           "add.s64 %rd11, %rd8, %rd12;\n" + "".join(f"ld.global.u32 %r{10 + i}, [%rd10+{4 * i}];\n" for i in range(10)) \
        + """mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%r20, %r21, %r22, %r23}, {%r10, %r11, %r12, %r13}, {%r14, %r15}, {%r16, %r17, %r18, %r19};
 st.global.v4.u32 [%rd11], {%r20, %r21, %r22, %r23};
"""
    text = HEAD.replace(" ld.global.u32 %r2, [%rd5]; ld.global.u32 %r3, [%rd6]; ld.global.u32 %r5, [%rd9];\n", "") \
        + body + " ret;\n}\n"
    d = np.zeros(32 * 4, np.uint32)
    run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (32, 1, 1),
                                            [words.reshape(-1).copy(), np.zeros(1, np.uint32), np.zeros(32, np.uint32), d]))
    want = (a.astype(np.float64) @ b.astype(np.float64) + c).astype(np.float32)  # exact products, one rounding
    np.testing.assert_array_equal(d.reshape(32, 4), _fragments_m16n8k16_f16(a, b, want)[2])


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4(trans):
    """ldmatrix.x4 (§9.7.14.5.15): lanes 8i..8i+7 address the rows of matrix i; lane l gets row l/4, elements
    2(l%4), 2(l%4)+1 (of the transpose with .trans). Rows live in random 16-byte slots of shared memory."""
    mats = RNG.integers(0, 2**16, (4, 8, 8)).astype(np.uint16)
    slots = RNG.permutation(64)[:32].astype(np.uint32)  # row r of matrix i (lane 8i + r) is in slot slots[8i + r]
    image = np.zeros((64, 8), np.uint16)
    image[slots] = mats.reshape(32, 8)
    body = f"""mul.wide.u32 %rd12, %r1, 16; add.s64 %rd20, %rd1, %rd12; add.s64 %rd11, %rd2, %rd12;
 shl.b32 %r30, %r1, 4; shl.b32 %r32, %r5, 4;
 ld.global.v4.u32 {{%r10, %r11, %r12, %r13}}, [%rd20];
 st.shared.v4.u32 [%r30], {{%r10, %r11, %r12, %r13}};
 ld.global.v4.u32 {{%r10, %r11, %r12, %r13}}, [%rd20+512];
 st.shared.v4.u32 [%r30+512], {{%r10, %r11, %r12, %r13}};
 bar.sync 0;
 ldmatrix.sync.aligned.m8n8.x4{'.trans' if trans else ''}.shared.b16 {{%r20, %r21, %r22, %r23}}, [%r32];
 st.global.v4.u32 [%rd11], {{%r20, %r21, %r22, %r23}};
 mov.u32 %r4, %r20;
"""
    out = np.zeros(32 * 4, np.uint32)
    run_kernel(parse_ptx(HEAD + body + "\n ret;\n}\n")["k"],
               Launch("k", (1, 1, 1), (32, 1, 1), [image.reshape(-1).view(np.uint32).copy(), out,
                                                   np.zeros(32, np.uint32), slots]))
    for lane in range(32):
        row, pair = lane // 4, lane % 4
        for i in range(4):
            m = mats[i].T if trans else mats[i]
            assert out[4 * lane + i] == int(m[row, 2 * pair]) | int(m[row, 2 * pair + 1]) << 16


def test_out_of_bounds_names_line_cta_thread():
    with pytest.raises(EmulationError, match=r"out-of-bounds global access of 4 bytes .* PTX line 13, CTA \(0, 0, 0\), "
                                             r"thread \(31, 0, 0\)"):
        run("ld.global.u32 %r4, [%rd5+4];", A32[:32], B32)  # thread 31 reads a[32]
    with pytest.raises(EmulationError, match="out-of-bounds shared access"):
        run("mul.lo.u32 %r6, %r1, 256; ld.shared.u32 %r4, [%r6];", A32, B32)


def test_unknown_instruction_is_named():
    with pytest.raises(EmulationError, match="does not know PTX instruction 'tex.2d.v4.f32.f32'"):
        run("tex.2d.v4.f32.f32 {%f1, %f2, %f3, %f4}, [%rd1, {%f5, %f6}];", A32, B32)


def test_cp_async_lands_at_wait_with_zero_fill():
    """cp.async 16 bytes with src-size 4 * (tid % 4): bytes past src-size are 0, and nothing lands before wait_group."""
    body = """shl.b32 %r6, %r1, 4; and.b32 %r7, %r1, 3; mul.lo.u32 %r7, %r7, 4;
 mul.wide.u32 %rd12, %r1, 16; add.s64 %rd13, %rd1, %rd12;
 cp.async.cg.shared.global [%r6], [%rd13], 16, %r7;
 cp.async.commit_group;
 ld.shared.u32 %r8, [%r6+2048];
 cp.async.wait_group 0;
 ld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r6];
 mul.wide.u32 %rd14, %r1, 16; add.s64 %rd15, %rd8, %rd14;
 st.global.v4.u32 [%rd15], {%r10, %r11, %r12, %r13};
 mov.u32 %r4, 0;
"""
    src = RNG.integers(1, 2**32, 32 * 4, dtype=np.uint64).astype(np.uint32)
    text = HEAD.replace(" ld.global.u32 %r2, [%rd5]; ld.global.u32 %r3, [%rd6]; ld.global.u32 %r5, [%rd9];\n", "") \
        + body + "\n st.global.u32 [%rd7], %r4;\n ret;\n}\n"
    out = np.zeros(32 * 4, np.uint32)
    run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (32, 1, 1), [src, src, np.zeros(32, np.uint32), out]))
    want = src.reshape(32, 4).copy()
    for t in range(32):
        want[t, t % 4:] = 0
    np.testing.assert_array_equal(out.reshape(32, 4), want)


def test_wmma_m16n16k16_f16_f32():
    """wmma.load (row A, column-major B, row C) / mma / store round trip: D = A B + C rounded once to f32. The
    ISA leaves the fragments' lane layout unspecified, so only the stored matrix is checked."""
    a = RNG.normal(0, 1, (16, 16)).astype(np.float16)
    b = RNG.normal(0, 1, (16, 16)).astype(np.float16)
    c = RNG.normal(0, 1, (16, 16)).astype(np.float32)
    regs = lambda n, base: "{" + ", ".join(f"%r{base + i}" for i in range(n)) + "}"  # noqa: E731
    fregs = lambda n, base: "{" + ", ".join(f"%f{base + i}" for i in range(n)) + "}"  # noqa: E731
    body = f"""wmma.load.a.sync.aligned.row.m16n16k16.global.f16 {regs(8, 10)}, [%rd1], 16;
 wmma.load.b.sync.aligned.col.m16n16k16.global.f16 {regs(8, 20)}, [%rd2], 16;
 wmma.load.c.sync.aligned.row.m16n16k16.global.f32 {fregs(8, 0)}, [%rd3], 16;
 wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {fregs(8, 8)}, {regs(8, 10)}, {regs(8, 20)}, {fregs(8, 0)};
 wmma.store.d.sync.aligned.row.m16n16k16.global.f32 [%rd8], {fregs(8, 8)}, 16;
"""
    text = HEAD.replace(" ld.global.u32 %r2, [%rd5]; ld.global.u32 %r3, [%rd6]; ld.global.u32 %r5, [%rd9];\n", "") \
        + body + " ret;\n}\n"
    d = np.zeros((16, 16), np.float32)
    run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (32, 1, 1), [a, np.ascontiguousarray(b.T), c, d]))
    want = (a.astype(np.float64) @ b.astype(np.float64) + c).astype(np.float32)
    np.testing.assert_array_equal(d, want)


def test_barrier_waits_for_a_group_behind_it():
    """A rotated loop (its latch placed before the body, as NVRTC lays out the DLight reduction loops): thread 0
    stores the next value to shared memory while the others branch straight back to the latch. They reach the
    body's bar.sync first and wait there for thread 0; every thread then reads what it stored."""
    body = """mov.u32 %r4, 0;
 mov.u32 %r6, 0;
 mov.u32 %r9, sm;
 setp.ne.u32 %p2, %r1, 0;
 @!%p2 st.shared.u32 [%r9], %r6;
 bra.uni BODY;
LATCH:
 add.s32 %r6, %r6, 1;
BODY:
 bar.sync 0;
 ld.shared.u32 %r7, [%r9];
 add.s32 %r4, %r4, %r7;
 setp.eq.u32 %p1, %r6, 3;
 @%p1 bra DONE;
 bar.sync 0;
 @%p2 bra LATCH;
 add.s32 %r8, %r6, %r2;
 st.shared.u32 [%r9], %r8;
 bra.uni LATCH;
DONE:
"""
    np.testing.assert_array_equal(run(body, A32, B32), [(3 * int(A32[0]) + 3) % 2**32] * 32)


def test_warp_shuffle_waits_for_a_group_behind_it():
    """The same rotated loop with a warp shuffle from lane 0 (under activemask, as TVM's reductions issue it):
    lane 0 adds its a to a register on the way to the latch; every lane reads the sum at the top of the body."""
    body = """mov.u32 %r4, 0;
 mov.u32 %r6, 0;
 mov.u32 %r8, 0;
 setp.ne.u32 %p2, %r1, 0;
 bra.uni BODY;
LATCH:
 add.s32 %r6, %r6, 1;
BODY:
 activemask.b32 %r10;
 shfl.sync.idx.b32 %r11, %r8, 0, 31, %r10;
 add.s32 %r4, %r4, %r11;
 setp.eq.u32 %p1, %r6, 3;
 @%p1 bra DONE;
 @%p2 bra LATCH;
 add.s32 %r8, %r8, %r2;
 bra.uni LATCH;
DONE:
"""
    np.testing.assert_array_equal(run(body, A32, B32), [6 * int(A32[0]) % 2**32] * 32)


def test_divergent_barrier_is_an_error():
    body = """setp.lt.u32 %p1, %r1, 40;
 @%p1 bra SKIP;
 bar.sync 0;
SKIP:
 mov.u32 %r4, 0;
"""
    with pytest.raises(EmulationError, match=r"bar.sync not reached by every thread .* thread \(0, 0, 0\)"):
        run(body, np.zeros(64), np.zeros(64), threads=64)


@pytest.mark.parametrize("body, divergent", [
    ("setp.lt.u32 %p1, %r1, 40;\n @%p1 ret;\n bar.sync 0;\n mov.u32 %r4, 0;\n", True),
    ("setp.lt.u32 %p1, %r1, 40;\n @%p1 bra EXIT;\n bar.sync 0;\n mov.u32 %r4, 0;\n bra.uni DONE;\n"
     "EXIT:\n ret;\nDONE:\n", True),
    ("mov.u32 %r4, 0;\n bar.sync 0;\n setp.lt.u32 %p1, %r1, 40;\n @%p1 ret;\n", False)],
    ids=["exit-before-barrier", "exit-while-barrier-waits", "exit-after-barrier"])
def test_thread_exiting_before_its_ctas_barrier_is_an_error(body, divergent):
    """Threads 0-39 of 64 exit: first in program order (the others reach bar.sync after them), or after the
    others wait at bar.sync; either way they never arrive, which the hardware does not define. Exiting after the
    barrier is fine."""
    a = np.zeros(64)
    if not divergent:
        run(body, a, a, threads=64)
        return
    line = HEAD.count("\n") + 1 + body.split("\n").index(" bar.sync 0;")  # parse_ptx numbers lines from 1
    with pytest.raises(EmulationError, match=rf"bar.sync not reached by every thread .* PTX line {line}, .*"
                                             r"thread \(0, 0, 0\)"):
        run(body, a, a, threads=64)


def test_local_array_through_generic_addresses():
    """A per-thread .local array (NVRTC's __local_depot) written and read back through cvta.local generic
    addresses with a per-thread index: each thread sees only its own array."""
    text = HEAD.replace(".shared .align 16 .b8 sm[4096];", ".local .align 8 .b8 depot[32]; .reg .b64 %SP, %SPL;")
    body = """mov.u64 %SPL, depot;
 cvta.local.u64 %SP, %SPL;
 st.u32 [%SP], %r2;
 st.u32 [%SP+4], %r3;
 and.b32 %r6, %r1, 1;
 mul.wide.u32 %rd12, %r6, 4;
 add.s64 %rd13, %SP, %rd12;
 ld.u32 %r4, [%rd13];
"""
    text = text + body + " st.global.u32 [%rd7], %r4;\n ret;\n}\n"
    c = np.zeros(32, np.uint32)
    run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (32, 1, 1), [A32, B32, c, np.zeros(32, np.uint32)]))
    np.testing.assert_array_equal(c, np.where(np.arange(32) % 2, B32, A32))


@pytest.mark.parametrize("between,store,races", [("", "%r2", 1), ("bar.sync 0;", "%r2", 0), ("", "same", 0)],
                         ids=["no-barrier", "barrier", "replicated-value"])
def test_global_race_detector(between, store, races):
    """norm_quant's old bug: thread 0 stores a value to global memory that the other threads load with no
    barrier between (a race, and the loads read stale bytes); with bar.sync it is ordered; every thread storing
    the same value first (a replicated result) is not a race."""
    if store == "same":
        body = "mov.u32 %r6, 7; st.global.u32 [%rd3], %r6; ld.global.u32 %r4, [%rd3];"
    else:
        body = f"""setp.ne.u32 %p1, %r1, 0;
 @%p1 bra READ;
 st.global.u32 [%rd3], {store};
READ:
 {between}
 ld.global.u32 %r4, [%rd3];"""
    text = HEAD + body + "\n st.global.u32 [%rd9], %r4;\n ret;\n}\n"
    d = np.zeros(64, np.uint32)
    res = run_kernel(parse_ptx(text)["k"], Launch("k", (1, 1, 1), (64, 1, 1), [A32.repeat(2), B32.repeat(2),
                                                                              np.zeros(1, np.uint32), d]))
    assert res.races == races, res.race_reports
    if races:
        assert "race: global read" in res.race_reports[0] and "PTX line 16" in res.race_reports[0]


def test_global_race_across_ctas():
    """Thread 0 of CTA 0 stores, CTA 1 loads the same word in one launch: no barrier orders CTAs."""
    body = """mov.u32 %r6, %ctaid.x;
 setp.ne.u32 %p1, %r6, 0;
 @%p1 bra READ;
 setp.ne.u32 %p2, %r1, 0;
 @%p2 bra DONE;
 st.global.u32 [%rd3], %r2;
 bra DONE;
READ:
 ld.global.u32 %r4, [%rd3];
DONE:
 mov.u32 %r4, 0;"""
    text = HEAD + body + "\n ret;\n}\n"
    res = run_kernel(parse_ptx(text)["k"], Launch("k", (2, 1, 1), (32, 1, 1), [A32, B32, np.zeros(1, np.uint32),
                                                                             np.zeros(32, np.uint32)]))
    assert res.races > 0 and "CTA (1, 0, 0)" in " ".join(res.race_reports)
