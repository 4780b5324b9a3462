"""The bf16 dot-product tensor intrinsic of the CPU matmul rule (AVX-512 BF16, cpu_rules/matmul.py).

For one row of A and a tile of 16 output columns:
    C[j] += float32(A[0]) * float32(B[j, 0]) + float32(A[1]) * float32(B[j, 1])        j < 16
A: 2 bf16 (one pair of k, broadcast to every lane), B: 16 x 2 bf16 (pairs of k interleaved per column,
contiguous), C: 16 fp32 accumulators (the rule's local register tile). One vdpbf16ps: bf16 products are
exact in fp32 (8 x 8 significand bits), so C's rounding is the fp32 accumulation's.

TVM 0.27 legalizes bf16 arithmetic to fp32 before LLVM (BF16ComputeLegalize: bf16 values, and buffers
the function allocates, such as the packed B, become fp32), and LLVM 22's intrinsic takes <32 x bfloat>,
which TIR cannot spell. So A and B are loaded in TIR as integer vectors of their bits (reinterpret keeps
bf16 bits; TVM's loads carry its alias information, so the accumulators stay in registers) and passed to
`bmvcc_dpbf16ps`, an LLVM IR function (import_dpbf16ps: linked, always inlined) that bitcasts them to
bfloat and calls llvm.x86.avx512bf16.dpbf16ps.512. It also takes A's and B's data pointers, unused: a
buffer whose pointer is used keeps its bf16 storage (TVM's legalization leaves it alone). `dot_pairs` builds
that call for TIR written by hand too (schedules/attention_cpu.py: its bf16 buffers, written with TVM's cast).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

NAME = "bmvcc_dot_16x2_bf16"
LANES = 16  # fp32 lanes of a 512-bit register (targets/cpu.py has_bf16_dot: the CPUs that have it)
PAIR = 2  # k values per lane and instruction
_IMPORT_LLVM = "pragma_import_llvm"

DPBF16PS_LLVM = """
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define <16 x float> @bmvcc_dpbf16ps(<16 x float> %c, <16 x i32> %a, <32 x i16> %b, ptr %a.data, ptr %b.data) {
  %a.bf16 = bitcast <16 x i32> %a to <32 x bfloat>
  %b.bf16 = bitcast <32 x i16> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %a.bf16, <32 x bfloat> %b.bf16)
  ret <16 x float> %r
}
"""


def dot_pairs(c, a_pair, b, a_data, b_data):
    """c + the pair products of a_pair (32 bits: two bf16, put in every lane) and b (16 lanes of two bf16, 32 x 16
    bits), one vdpbf16ps inside `import_dpbf16ps`; a_data, b_data: the operands' buffers' data."""
    return T.call_extern("float32x16", "bmvcc_dpbf16ps", c, T.broadcast(a_pair, LANES),
                         T.reinterpret("int16x32", b), a_data, b_data)


def import_dpbf16ps(func=None):
    """DPBF16PS_LLVM imported (`pragma_import_llvm`: linked into the module) where dot_pairs is called: around
    `func`'s body; without `func`, as a TVMScript frame (`with import_dpbf16ps():`, inside a tensor intrinsic's
    block, whose body tensorize inlines)."""
    if func is None:
        return T.attr(T.int32(0), _IMPORT_LLVM, DPBF16PS_LLVM)
    return func.with_body(tirx.AttrStmt(tirx.IntImm("int32", 0), _IMPORT_LLVM, tvm.ir.StringImm(DPBF16PS_LLVM),
                                        func.body))


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
        with import_dpbf16ps():
            pair = T.reinterpret("int32", A.vload([0], "bfloat16x2"))
            C[T.ramp(T.int32(0), 1, 16)] = dot_pairs(C.vload([0], "float32x16"), pair, B.vload([0, 0], "bfloat16x32"),
                                                     A.data, B.data)


def definition():
    """(desc, impl) of NAME."""
    return _desc, _impl
