"""The tensor intrinsics the W2A8 CUDA schedule uses: their names and (desc, impl) definitions, registered on
first use by schedules/intrinsics.py.

`import tvm.s_tir.tensor_intrin.cuda` parses every CUDA intrinsic TVM has (about a minute); this
module defines only what schedules/w2a8_cuda.py tensorizes, with int64 indices like w2a8_compute:

- LDMATRIX_A (ldmatrix_a_name(scope)): int8 A tile 16x32 shared -> warp fragment (`ldmatrix.x4`), as TVM's
  mma_ldmatrix_i8_a, from static or dynamic shared memory.
- MMA_DECODE (mma_decode_name(F, scope)): C[16F,16] += A[16F,32] * T[16,32]^T where T is read as *packed 2-bit
  codes* from shared (one 128-byte block of schedules/w2a8_cuda.py's TC_LAYOUT), each lane's 16 weights decoded
  from one 32-bit word in registers straight into the mma.sync B fragment, then 2F
  `mma.sync.m16n8k32.row.col.s32.s8.s8.s32`. The description decodes as tc_compute (w2a8.ternary_weight).
- FILL: zero a 16x16 int32 accumulator fragment.
- STORE_DEQUANT (store_dequant_name(epilogue)): out[16,16] = epilogue(float(C) * w_scale / x_scale[row]), the
  dequantizing epilogue (none, GELU, + residual) written from the accumulator fragment to global memory.

Fragment layouts (PTX ISA, mma.m16n8k32 .s8): thread t of the warp holds A rows t/4 and t/4+8, bytes
4*(t%4).. of each 16-wide k half; B (k x n, "col") bytes k = 4*(t%4)+0..3 (+16 for the second
register) of column n = t/4; C elements (t/4 (+8), 2*(t%4)+0..1) per n8 half.
"""

from __future__ import annotations

from tvm.script import tirx as T

LDMATRIX_A = "bmvcc_ldmatrix_i8_a_16x32"  # prefix: one intrinsic per shared scope (ldmatrix_a_name)
MMA_DECODE = "bmvcc_mma_i8_ternary_16x16x32"  # prefix: one per row-fragment count and scope (mma_decode_name)
FILL = "bmvcc_mma_fill_i32_16x16"
STORE_DEQUANT = "bmvcc_mma_store_dequant_16x16"  # prefix: one intrinsic per epilogue (store_dequant_name)

_I = T.int64


def ldmatrix_16x32_layout(i, j):
    """(row, col) of a 16x32 int8 tile -> (thread, element) of its ldmatrix.x4 fragment."""
    return 4 * (i % 8) + (j % 16) // 4, 8 * (j // 16) + (i // 8) * 4 + j % 4


def accum_16x16_layout(i, j):
    """(row, col) of a 16x16 int32 accumulator -> (thread, element) of its two m16n8 fragments."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + j % 2


DECODE_LUT = 0x020100FF  # prmt table: byte u is the weight u - 1 (u = 3, never packed, gives 2 as w2a8_compute)


def _selectors(word):
    """A TC_LAYOUT word (schedules/w2a8_cuda.py) -> two prmt selector words, (w & 0x33333333, (w >> 2) & 0x33333333):
    B fragment registers 0 and 2, then 1 and 3, code i in nibble i of the low and high 16 bits, the nibbles'
    upper 2 bits 0."""
    mask = T.uint32(0x33333333)
    return T.bitwise_and(word, mask), T.bitwise_and(T.shift_right(word, T.uint32(2)), mask)


def _lookup(sel):
    """4 int8 weights in a uint32, code i in byte i: CUDA's __byte_perm (prmt) of DECODE_LUT, byte i of the result
    being byte (sel >> 4i) & 7 of the table (twice DECODE_LUT); prmt reads the low 16 bits of `sel` only."""
    return T.call_pure_extern("uint32", "__byte_perm", T.uint32(DECODE_LUT), T.uint32(DECODE_LUT), sel)


def ldmatrix_a_name(scope: str) -> str:
    return f"{LDMATRIX_A}_{scope}"


def ldmatrix_a(scope: str):
    """(desc, impl) of LDMATRIX_A reading from shared memory of `scope` ("shared" for static arrays,
    "shared.dyn" for dynamic shared memory, which may exceed 48 KB per block)."""

    @T.prim_func(s_tir=True)
    def desc(warp_h: T.handle, shared_h: T.handle) -> None:
        shared = T.match_buffer(shared_h, (_I(16), _I(32)), "int8", align=64, offset_factor=32, scope=scope)
        warp = T.match_buffer(warp_h, (_I(32), _I(16)), "int8", align=64, offset_factor=32, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:32])
            T.writes(warp[0:32, 0:16])
            for ax0, ax1 in T.grid(_I(16), _I(32)):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    t, e = T.meta_var(ldmatrix_16x32_layout(v0, v1))
                    T.reads(shared[v0, v1])
                    T.writes(warp[t, e])
                    warp[t, e] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def impl(warp_h: T.handle, shared_h: T.handle) -> None:
        s0 = T.int64()
        s1 = T.int64()
        shared = T.match_buffer(shared_h, (_I(16), _I(32)), "int8", align=64, offset_factor=32, scope=scope,
                                strides=[s0, s1])
        warp = T.match_buffer(warp_h, (_I(32), _I(16)), "int8", align=64, offset_factor=32, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:32])
            T.writes(warp[0:32, 0:16])
            for tx in T.thread_binding(_I(0), _I(32), "threadIdx.x"):
                # lanes 0-15 address rows 0-15 of the low k half, lanes 16-31 the high half
                T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", warp.data, warp.elem_offset + _I(16) * tx,
                                                 shared.access_ptr("r"), s0 * (tx % 16) + 16 * (tx // 16),
                                                 dtype="int8"))

    return desc, impl


def mma_decode_name(frags: int, scope: str) -> str:
    return f"{MMA_DECODE}_x{frags}_{scope}"


def mma_decode(frags: int, scope: str):
    """(desc, impl) of C[16F,16] += A[16F,32] * T[16,32]^T for F = `frags` row fragments: the packed B tile
    is decoded once and feeds 2F mma.sync (decode cost / F).

    A and C are a warp's fragments [F, 1, 32, elems] (row fragment, column fragment, thread, element),
    the layouts schedules/w2a8_cuda.py gives them."""
    from .w2a8 import ternary_weight
    from .w2a8_cuda import TC_LAYOUT

    F, M = _I(frags), _I(16 * frags)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (F, _I(1), _I(32), _I(16)), "int8", align=64, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (_I(1), _I(1), _I(128)), "uint8", offset_factor=128, scope=scope)
        C = T.match_buffer(c, (F, _I(1), _I(32), _I(8)), "int32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:F, 0:1, 0:32, 0:8], A[0:F, 0:1, 0:32, 0:16], B[0:1, 0:1, 0:128])
            T.writes(C[0:F, 0:1, 0:32, 0:8])
            for i, j, k in T.grid(M, _I(16), _I(32)):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, ec = T.meta_var(accum_16x16_layout(vi % 16, vj))
                    ta, ea = T.meta_var(ldmatrix_16x32_layout(vi % 16, vk))
                    byte, shift = T.meta_var(TC_LAYOUT.locate(B, vj, vk))  # tc_compute's decode of T[vj, vk]
                    T.reads(C[vi // 16, 0, tc, ec], A[vi // 16, 0, ta, ea], byte)
                    T.writes(C[vi // 16, 0, tc, ec])
                    C[vi // 16, 0, tc, ec] = (C[vi // 16, 0, tc, ec] + T.Cast("int32", A[vi // 16, 0, ta, ea])
                                              * ternary_weight(byte, shift))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a0, a1, a2, a3 = T.int64(), T.int64(), T.int64(), T.int64()
        b0, b1, b2 = T.int64(), T.int64(), T.int64()
        c0, c1, c2, c3 = T.int64(), T.int64(), T.int64(), T.int64()
        A = T.match_buffer(a, (F, _I(1), _I(32), _I(16)), "int8", align=64, offset_factor=16, scope="warp",
                           strides=[a0, a1, a2, a3])
        B = T.match_buffer(b, (_I(1), _I(1), _I(128)), "uint8", offset_factor=128, scope=scope, strides=[b0, b1, b2])
        C = T.match_buffer(c, (F, _I(1), _I(32), _I(8)), "int32", align=64, offset_factor=8, scope="warp",
                           strides=[c0, c1, c2, c3])
        with T.sblock("root"):
            T.reads(C[0:F, 0:1, 0:32, 0:8], A[0:F, 0:1, 0:32, 0:16], B[0:1, 0:1, 0:128])
            T.writes(C[0:F, 0:1, 0:32, 0:8])
            for tx in T.thread_binding(_I(0), _I(32), "threadIdx.x"):
                # the block's word tx: B fragment register 2h + r of n8 half h (TC_LAYOUT), one 32-bit shared load
                with T.sblock("decode"):  # a block, so that software pipelining sees the fragment buffer
                    T.reads(C[0:F, 0:1, 0:32, 0:8], A[0:F, 0:1, 0:32, 0:16], B[0:1, 0:1, 0:128])
                    T.writes(C[0:F, 0:1, 0:32, 0:8])
                    frag = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                    # a vector load of B itself (software pipelining rewrites B's loads to the stage's buffer)
                    word = T.meta_var(T.reinterpret("uint32", B[0, 0, T.ramp(tx * 4, 1, 4)]))
                    r0, r1 = T.meta_var(_selectors(word))
                    frag[0] = _lookup(r0)
                    frag[1] = _lookup(r1)
                    frag[2] = _lookup(T.shift_right(r0, T.uint32(16)))
                    frag[3] = _lookup(T.shift_right(r1, T.uint32(16)))
                    for f, h in T.grid(F, 2):
                        T.evaluate(T.ptx_legacy.mma("m16n8k32", "row", "col", "int8", "int8", "int32",
                                                    A.data, A.elem_offset + f * a0 + tx * _I(16),
                                                    frag.data, h * 2,
                                                    C.data, C.elem_offset + f * c0 + tx * _I(8) + h * 4,
                                                    False, dtype="int32"))

    return desc, impl


@T.prim_func(s_tir=True)
def _fill_desc(c: T.handle) -> None:
    C = T.match_buffer(c, (_I(32), _I(8)), "int32", scope="warp")
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:32, 0:8])
        for i0, i1 in T.grid(_I(16), _I(16)):
            with T.sblock("C_warp"):
                i, j = T.axis.remap("SS", [i0, i1])
                t, e = T.meta_var(accum_16x16_layout(i, j))
                T.reads()
                T.writes(C[t, e])
                C[t, e] = 0


@T.prim_func(s_tir=True)
def _fill_impl(c: T.handle) -> None:
    C = T.match_buffer(c, (_I(32), _I(8)), "int32", scope="warp", offset_factor=1)
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:32, 0:8])
        for tx in T.thread_binding(_I(0), _I(32), "threadIdx.x"):
            T.evaluate(T.cuda.mma_fill_legacy(8, C.data, C.elem_offset, dtype="int32"))


def _fast_divide(a, b):
    """a / b as CUDA's __fdividef: PTX div.approx.f32, MUFU.RCP and a multiply without the IEEE division's
    slow path (a call per element); within 2 ulp for 2^-126 <= |b| <= 2^126. The erf's denominator Q(x^2)
    lies in [-2.40, -0.0142], so the GELU's erf gains at most 2 ulp (about 1.2e-7; test_w2a8_cuda states the bound)."""
    return T.call_pure_extern("float32", "__fdividef", a, b)


def store_dequant_name(epilogue: str) -> str:
    return f"{STORE_DEQUANT}_{epilogue}"


def store_dequant(epilogue: str):
    """(desc, impl) of out[16,16] = epilogue(float(C) * w_scale / x_scale[row]), the dequantizing epilogue
    written from the accumulator fragment to global memory. The epilogue is schedules/w2a8.py's
    `apply_epilogue`: GELU in registers (its erf's division a fast one, _fast_divide), + residual[16,16] or
    + bias[1,16] read from global."""
    from .w2a8 import apply_epilogue, epilogue_operand

    operand = epilogue_operand(epilogue)
    rows = 1 if operand == "bias" else 16  # of the extra operand's tile

    def reads(C, xs, ws, res):  # in the order the epilogue expression loads them
        acc = [C[0:32, 0:8], ws[0:1], xs[0:16, 0:1]]
        return acc if res is None else [res[0:16, 0:16], *acc] if operand == "residual" else [*acc, res[0:1, 0:16]]

    @T.macro
    def desc_body(C, out, xs, ws, res):
        with T.sblock("root"):
            T.reads(reads(C, xs, ws, res))
            T.writes(out[0:16, 0:16])
            for i0, i1 in T.grid(_I(16), _I(16)):
                with T.sblock("store"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    t, e = T.meta_var(accum_16x16_layout(i, j))
                    out[i, j] = apply_epilogue(epilogue, T.Cast("float32", C[t, e]) * ws[_I(0)] / xs[i, _I(0)],
                                               res, i, j)

    @T.macro
    def impl_body(C, out, xs, ws, res):
        with T.sblock("root"):
            T.reads(reads(C, xs, ws, res))
            T.writes(out[0:16, 0:16])
            for tx in T.thread_binding(32, "threadIdx.x"):
                # elements 2h + c (+4 for the second n8 half) of this thread share row tx/4 + 8h: one
                # division per row, (acc * w_scale) / x_scale becomes acc * (w_scale / x_scale), 1 ulp apart
                for h in T.unroll(2):
                    scale = T.meta_var(ws[0] / xs[tx // 4 + 8 * h, 0])
                    for n8 in T.unroll(2):
                        for c in T.unroll(2):
                            row, col = T.meta_var((tx // 4 + 8 * h, 8 * n8 + 2 * (tx % 4) + c))
                            acc = T.meta_var(T.Cast("float32", C[tx, 4 * n8 + 2 * h + c]))
                            out[row, col] = apply_epilogue(epilogue, acc * scale, res, row, col, _fast_divide)

    if operand is None:

        @T.prim_func(s_tir=True)
        def desc(c: T.handle, o: T.handle, xs_h: T.handle, ws_h: T.handle) -> None:
            C = T.match_buffer(c, (_I(32), _I(8)), "int32", scope="warp")
            out = T.match_buffer(o, (_I(16), _I(16)), "float32")
            xs = T.match_buffer(xs_h, (_I(16), _I(1)), "float32")
            ws = T.match_buffer(ws_h, (_I(1),), "float32")
            desc_body(C, out, xs, ws, None)

        @T.prim_func(s_tir=True)
        def impl(c: T.handle, o: T.handle, xs_h: T.handle, ws_h: T.handle) -> None:
            so0, so1, sx0, sx1 = T.int64(), T.int64(), T.int64(), T.int64()
            C = T.match_buffer(c, (_I(32), _I(8)), "int32", scope="warp", offset_factor=1)
            out = T.match_buffer(o, (_I(16), _I(16)), "float32", offset_factor=1, strides=[so0, so1])
            xs = T.match_buffer(xs_h, (_I(16), _I(1)), "float32", offset_factor=1, strides=[sx0, sx1])
            ws = T.match_buffer(ws_h, (_I(1),), "float32", offset_factor=1)
            impl_body(C, out, xs, ws, None)

    else:

        @T.prim_func(s_tir=True)
        def desc(c: T.handle, o: T.handle, xs_h: T.handle, ws_h: T.handle, r: T.handle) -> None:
            C = T.match_buffer(c, (_I(32), _I(8)), "int32", scope="warp")
            out = T.match_buffer(o, (_I(16), _I(16)), "float32")
            xs = T.match_buffer(xs_h, (_I(16), _I(1)), "float32")
            ws = T.match_buffer(ws_h, (_I(1),), "float32")
            res = T.match_buffer(r, (_I(rows), _I(16)), "float32")
            desc_body(C, out, xs, ws, res)

        @T.prim_func(s_tir=True)
        def impl(c: T.handle, o: T.handle, xs_h: T.handle, ws_h: T.handle, r: T.handle) -> None:
            so0, so1, sx0, sx1, sr0, sr1 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            C = T.match_buffer(c, (_I(32), _I(8)), "int32", scope="warp", offset_factor=1)
            out = T.match_buffer(o, (_I(16), _I(16)), "float32", offset_factor=1, strides=[so0, so1])
            xs = T.match_buffer(xs_h, (_I(16), _I(1)), "float32", offset_factor=1, strides=[sx0, sx1])
            ws = T.match_buffer(ws_h, (_I(1),), "float32", offset_factor=1)
            res = T.match_buffer(r, (_I(rows), _I(16)), "float32", offset_factor=1, strides=[sr0, sr1])
            impl_body(C, out, xs, ws, res)

    return desc, impl


def fill():
    """(desc, impl) of FILL."""
    return _fill_desc, _fill_impl
