"""bf16_matmuls: the Linear layers' matmuls on bf16 operands with fp32 accumulation (CPU builds with
`--float-precision bf16`, on CPUs with AVX-512 BF16; cpu_rules/matmul.py runs them on vdpbf16ps).

Matches every float32 `matmul(x, w)` in main whose w is computed from constants only (a weight) and has a
shape vdpbf16ps takes whole (schedules/bf16_intrinsics.py: K in pairs, N in vectors of 16 columns): the
float projections (QKV and output, fp_attn models), the patch embedding and the classifier head where
their shapes allow, and float BitLinear weights under --no-bitlinear. A matmul of another shape (a
7 x 7 x 3 patch, a 9-class head) stays float32: it would round without running faster. Attention's
Q.K^T and P.V (both operands computed) stay float32 matmuls here, so fuse_causal_attention still finds them
(its kernel then takes them on bf16 operands, schedules/attention_cpu.py); the W2A8 kernels are call_tir and
untouched.
Produces `matmul(a16, b16, out_dtype="float32")` as fp16_matmuls does: the activation cast sits after the
op that computes it (fused into that kernel, which then writes 2-byte elements), weights are constants
that fold_constants stores in bf16 (half the bytes). bf16 keeps float32's exponent, so nothing overflows;
each operand is rounded to nearest even at 8 significand bits (relative u = 2^-8), the products
of the rounded operands are exact in fp32 and the sums fp32.
"""

from __future__ import annotations

import tvm

from ..schedules.bf16_intrinsics import LANES, PAIR
from .fp16_matmuls import narrow_matmul_operands
from .relax_match import REPORT_PREFIX, Bindings, is_const, static_shape, with_report

REPORT_KEY = REPORT_PREFIX + "bf16_matmuls"  # {"narrowed": matmuls on bf16 operands}


def bf16_matmuls(mod: tvm.IRModule) -> tvm.IRModule:
    bindings = Bindings(mod["main"])  # the weights' producers (the mutator leaves constant-only bindings as they are)
    narrowed = 0

    def selects(_mutator, call) -> bool:
        nonlocal narrowed
        if not _weight_on_vdpbf16ps(bindings, call.args[1]):
            return False
        narrowed += 1
        return True

    out = narrow_matmul_operands(mod, "bfloat16", selects)
    return with_report(out, REPORT_KEY, {"narrowed": narrowed})


def _weight_on_vdpbf16ps(bindings: Bindings, w) -> bool:
    """Whether w is computed from constants only (main's image is the one parameter it may not read) and has a
    shape vdpbf16ps takes whole."""
    shape = static_shape(w)
    return (shape is not None and len(shape) >= 2 and shape[-2] % PAIR == 0 and shape[-1] % LANES == 0
            and all(is_const(leaf) for leaf in bindings.leaves(w)))
