"""The bf16 dot-product tensor intrinsic of the CPU matmul rule (AVX-512 BF16, cpu_rules/matmul.py).

For one row of A and a tile of 16 output columns:
    C[j] += float32(A[0]) * float32(B[j, 0]) + float32(A[1]) * float32(B[j, 1])        j < 16
A: 2 bf16 (one pair of k, broadcast to every lane), B: 16 x 2 bf16 (pairs of k interleaved per column,
contiguous), C: 16 fp32 accumulators (the rule's local register tile). One vdpbf16ps: bf16 products are exact in fp32 (8 x 8 significand
bits), so C's rounding is the fp32 accumulation's.

TVM 0.27 legalizes bf16 arithmetic to fp32 before LLVM (BF16ComputeLegalize: bf16 values, and buffers the
function allocates, such as the packed B, become fp32), and LLVM 22's intrinsic takes <32 x bfloat>, which
TIR cannot spell. So A and B go by address, data pointer and element offset (a buffer whose pointer is used
keeps its bf16 storage, 2 bytes an element; int32 offsets, as TVM narrows them: operands under 2^31
elements), to `bmvcc_dpbf16ps`, an LLVM IR function (pragma_import_llvm: linked, always inlined) that loads
them as bfloat and calls llvm.x86.avx512bf16.dpbf16ps.512.
"""

from __future__ import annotations

from tvm.script import tirx as T

NAME = "bmvcc_dot_16x2_bf16"
LANES = 16  # targets/cpu.py BF16_DOT_LANES: fp32 lanes of a 512-bit register
PAIR = 2  # k values per lane and instruction

_DPBF16PS = """
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define <16 x float> @bmvcc_dpbf16ps(<16 x float> %c, ptr %a.data, i32 %a.offset, ptr %b.data, i32 %b.offset) {
  %a = getelementptr bfloat, ptr %a.data, i32 %a.offset
  %b = getelementptr bfloat, ptr %b.data, i32 %b.offset
  %pair = load <2 x bfloat>, ptr %a, align 2
  %a.lanes = shufflevector <2 x bfloat> %pair, <2 x bfloat> poison, <32 x i32> <PAIR_IN_EVERY_LANE>
  %b.tile = load <32 x bfloat>, ptr %b, align 2
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %a.lanes, <32 x bfloat> %b.tile)
  ret <16 x float> %r
}
""".replace("PAIR_IN_EVERY_LANE", ", ".join(f"i32 {i % 2}" for i in range(32)))


@T.prim_func(s_tir=True)
def _desc(A: T.Buffer((2,), "bfloat16", offset_factor=1), B: T.Buffer((16, 2), "bfloat16", offset_factor=1),
          C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        for j, k in T.grid(16, 2):
            with T.sblock("update"):
                vj, vk = T.axis.remap("SR", [j, k])
                C[vj] = C[vj] + T.Cast("float32", A[vk]) * T.Cast("float32", B[vj, vk])


@T.prim_func(s_tir=True)
def _impl(A: T.Buffer((2,), "bfloat16", offset_factor=1), B: T.Buffer((16, 2), "bfloat16", offset_factor=1),
          C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        with T.attr(T.int32(0), "pragma_import_llvm", _DPBF16PS):
            C[T.ramp(T.int32(0), 1, 16)] = T.call_extern(
                "float32x16", "bmvcc_dpbf16ps", C.vload([0], "float32x16"),
                A.data, T.Cast("int32", A.elem_offset), B.data, T.Cast("int32", B.elem_offset))


def definition():
    """(desc, impl) of NAME."""
    return _desc, _impl
