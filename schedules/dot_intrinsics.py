"""Int8 dot-product tensor intrinsics for the W2A8 CPU schedules (x86 VNNI / AVX2, aarch64 sdot).

Each intrinsic computes, for one activation row and a tile of `lanes` output features:
    C[j] += sum_{k<4} int32(A[k]) * int32(B[j, k])        j < lanes
A: 4 int8 activations (broadcast to every lane), B: lanes x 4 decoded weights (row-major, contiguous),
C: lanes int32 accumulators. On x86 B holds unsigned codes u = T + 1 in {0, 1, 2} (the instructions
are u8 x s8; the schedule subtracts rowsum(q)); on aarch64 B holds the signed ternary T (sdot is s8 x s8).

Only these few intrinsics are registered (cheap, about 0.1 s), instead of importing
tvm.s_tir.tensor_intrin.x86, which parses every intrinsic at import. TVM 0.27's own "dot_16x4_vnni"
does not pass LLVM 22 verification (vpdpbusd takes <64 x i8> operands there), hence `vnni` below.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@dataclass(frozen=True)
class DotIntrin:
    name: str
    lanes: int  # int32 accumulators per call (output features)
    weight_dtype: str  # dtype of the decoded weight tile B


def _desc(lanes: int, wdt: str):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((lanes, 4), wdt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    return desc


def _impl(lanes: int, wdt: str, dot):
    """dot(acc int32xL, weights (4L bytes), activations broadcast (4L bytes)) -> int32xL."""

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((lanes, 4), wdt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), lanes),
                              dtype=f"int8x{4 * lanes}")
            C[T.ramp(T.int32(0), 1, lanes)] = dot(C.vload([0], f"int32x{lanes}"),
                                                  B.vload([0, 0], f"{wdt}x{4 * lanes}"), a)

    return impl


def _vpdpbusd(c, b, a):  # AVX-512 VNNI: one instruction, u8 (weights) x s8 (activations)
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c, b, a,
                                   dtype="int32x16")


def _avx2_maddubs(c, b, a):  # AVX2: u8 x s8 -> pairwise i16 (exact: |2 * 2 * 128| < 2^15) -> i32
    pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), b, a,
                                    dtype="int16x16")
    return c + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs,
                                       T.broadcast(T.int16(1), 16), dtype="int32x8")


def _sdot(c, b, a):  # Armv8.2 dot product: s8 x s8
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), c, b, a,
                                   dtype="int32x4")


VNNI = DotIntrin("bmvcc_dot_16x4_vnni", 16, "uint8")
AVX2 = DotIntrin("bmvcc_dot_8x4_avx2", 8, "uint8")
SDOT = DotIntrin("bmvcc_dot_4x4_sdot", 4, "int8")

for _intrin, _dot in ((VNNI, _vpdpbusd), (AVX2, _avx2_maddubs), (SDOT, _sdot)):
    TensorIntrin.register(_intrin.name, _desc(_intrin.lanes, _intrin.weight_dtype),
                          _impl(_intrin.lanes, _intrin.weight_dtype, _dot), override=True)
