"""Int8 dot-product tensor intrinsics for the W2A8 CPU schedules (x86 VNNI / AVX2, aarch64 sdot), and the
widening of AVX2_I16's int16 partial sums.

Each intrinsic computes, for one activation row and a tile of `lanes` output features:
    C[j] += sum_{k<4} int32(A[k]) * int32(B[j, k])        j < lanes
A: 4 int8 activations (broadcast to every lane), B: lanes x 4 decoded weights (row-major, contiguous),
C: lanes int32 accumulators. On x86 B holds unsigned codes u = T + 1 in {0, 1, 2} (the instructions
are u8 x s8; the schedule subtracts rowsum(q)); elsewhere B holds the signed ternary T (sdot is s8 x s8;
the generic one is plain widening vector multiply-adds that LLVM lowers for any CPU).

Only these few intrinsics are registered (cheap, about 0.1 s; by schedules/intrinsics.py, on first use),
instead of importing tvm.s_tir.tensor_intrin.x86, which parses every intrinsic at import. TVM 0.27's own
"dot_16x4_vnni" does not pass LLVM 22 verification (vpdpbusd takes <64 x i8> operands there), hence `vnni`
below.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T


@dataclass(frozen=True)
class DotIntrin:
    name: str
    lanes: int  # int32 accumulators per call (output features)
    weight_dtype: str  # dtype of the decoded weight tile B
    k_major: bool = False  # B is [4, lanes] (generic vector code) instead of [lanes, 4] (dot instructions)

    @property
    def weight_shape(self):
        return (4, self.lanes) if self.k_major else (self.lanes, 4)


def _desc(intrin: DotIntrin):
    lanes, wdt, shape, k_major = intrin.lanes, intrin.weight_dtype, intrin.weight_shape, intrin.k_major

    def b_at(B, j, k):
        return B[k, j] if k_major else B[j, k]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer(shape, wdt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:shape[0], 0:shape[1]])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", b_at(B, vi, vk))

    return desc


def _impl(intrin: DotIntrin, dot):
    """dot(A, B, C, lanes) -> the new int32 x lanes value of C."""
    lanes, wdt, shape = intrin.lanes, intrin.weight_dtype, intrin.weight_shape

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer(shape, wdt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:shape[0], 0:shape[1]])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = dot(A, B, C, lanes)

    return impl


def _bcast4(A, lanes):  # the 4 activation bytes repeated in every 32-bit lane
    return T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), lanes),
                         dtype=f"int8x{4 * lanes}")


def _vpdpbusd(A, B, C, lanes):  # AVX-512 VNNI: one instruction, u8 (weights) x s8 (activations)
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                   C.vload([0], "int32x16"), B.vload([0, 0], "uint8x64"), _bcast4(A, 16),
                                   dtype="int32x16")


def _avx2_maddubs(A, B, C, lanes):  # AVX2: u8 x s8 -> pairwise i16 (exact: |2 * 2 * 128| < 2^15) -> i32
    pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                    B.vload([0, 0], "uint8x32"), _bcast4(A, 8), dtype="int16x16")
    return _add_pair_sums(C, pairs)


def _add_pair_sums(C, pairs):  # C (int32x8) + the sums of adjacent int16 pairs: vpmaddwd by ones, vpaddd
    return C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")


def _sdot(A, B, C, lanes):  # Armv8.2 dot product: s8 x s8
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                                   C.vload([0], "int32x4"), B.vload([0, 0], "int8x16"), _bcast4(A, 4),
                                   dtype="int32x4")


def _widening_mac(A, B, C, lanes):  # any LLVM target: 4 widening vector multiply-adds over k-major B
    acc = C.vload([0], f"int32x{lanes}")
    for k in range(4):
        acc = acc + T.Cast(f"int32x{lanes}", T.broadcast(A[k], lanes)) * T.Cast(
            f"int32x{lanes}", B.vload([k, 0], f"int8x{lanes}"))
    return acc


VNNI = DotIntrin("bmvcc_dot_16x4_vnni", 16, "uint8")
AVX2 = DotIntrin("bmvcc_dot_8x4_avx2", 8, "uint8")
SDOT = DotIntrin("bmvcc_dot_4x4_sdot", 4, "int8")
GENERIC = DotIntrin("bmvcc_dot_8x4_generic", 8, "int8", k_major=True)


# AVX2 with int16 accumulation: vpmaddubsw's pairwise int16 sums are added in int16 (vpaddw), with no
# vpmaddwd per step. C holds lanes x 2 int16 partial sums, C[j, p] over k = 2p, 2p + 1 of each
# 4-group. Each 4-group adds at most 2 * 2 * 128 = 512 in magnitude, so 64 groups (256 k) per chunk
# stay in [-32768, 32512] (the schedule widens to int32 after each chunk).
AVX2_I16 = DotIntrin("bmvcc_dot_8x4_avx2_i16", 8, "uint8")
I16_CHUNK_K = 256


@T.prim_func(s_tir=True)
def _avx2_i16_desc(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((8, 4), "uint8", offset_factor=1),
                   C: T.Buffer((8, 2), "int16", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8, 0:2], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8, 0:2])
        for j, p, k in T.grid(8, 2, 2):
            with T.sblock("update"):
                vj, vp, vk = T.axis.remap("SSR", [j, p, k])
                C[vj, vp] = C[vj, vp] + T.Cast("int16", A[vp * 2 + vk]) * T.Cast("int16", B[vj, vp * 2 + vk])


@T.prim_func(s_tir=True)
def _avx2_i16_impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((8, 4), "uint8", offset_factor=1),
                   C: T.Buffer((8, 2), "int16", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8, 0:2], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8, 0:2])
        C.vstore([0, 0], C.vload([0, 0], "int16x16") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), B.vload([0, 0], "uint8x32"), _bcast4(A, 8),
            dtype="int16x16"))


# The int16 chunk widened into int32: C[j] += A[j, 0] + A[j, 1], one vpmaddwd by ones (exact: the pair's sum
# fits int32) and one vpaddd, instead of deinterleaving the pairs (about 12 shuffles and adds a vector).
AVX2_I16_WIDEN = "bmvcc_widen_8x2_avx2_i16"


@T.prim_func(s_tir=True)
def _widen_desc(A: T.Buffer((8, 2), "int16", offset_factor=1), C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8, 0:2])
        T.writes(C[0:8])
        for j, p in T.grid(8, 2):
            with T.sblock("update"):
                vj, vp = T.axis.remap("SR", [j, p])
                C[vj] = C[vj] + T.Cast("int32", A[vj, vp])


@T.prim_func(s_tir=True)
def _widen_impl(A: T.Buffer((8, 2), "int16", offset_factor=1), C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = _add_pair_sums(C, A.vload([0, 0], "int16x16"))


_DOTS = {VNNI.name: (VNNI, _vpdpbusd), AVX2.name: (AVX2, _avx2_maddubs), SDOT.name: (SDOT, _sdot),
         GENERIC.name: (GENERIC, _widening_mac)}
_FIXED = {AVX2_I16.name: (_avx2_i16_desc, _avx2_i16_impl), AVX2_I16_WIDEN: (_widen_desc, _widen_impl)}  # (desc, impl)
NAMES = (*_DOTS, *_FIXED)


def definition(name: str):
    """(desc, impl) of the intrinsic `name` (one of NAMES)."""
    if name in _FIXED:
        return _FIXED[name]
    intrin, dot = _DOTS[name]
    return _desc(intrin), _impl(intrin, dot)
