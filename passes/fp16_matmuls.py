"""fp16_matmuls: the float matmuls on fp16 operands with fp32 accumulation (CUDA builds only).

Matches every `matmul(a, b)` in main whose operands are both float32: after quantize_bitlinear these
are the attention's Q.K^T and P.V (which fuse_causal_attention then turns into one attention kernel on
those fp16 operands), the float projections (fp_attn models), the patch embedding and the classifier head;
the W2A8 kernels are call_tir and untouched.
Produces `matmul(a16, b16, out_dtype="float32")`. Per op:
- operands: fp16 (relative rounding u = 2^-11). The cast sits after the op that computes the operand,
  before the layout ops between them (reshape, permute_dims, slices, broadcast_to: exact in any
  dtype), so it fuses into that op's kernel (projection bias, softmax, P.V, layer norm) and every
  layout copy moves 2-byte elements. Weights are constants: fold_constants stores them in fp16.
- accumulation and output: float32 (out_dtype): DLight's tensor-core rule then uses fp32 wmma
  accumulators; K up to 1024 (P.V) would lose ~K*u relative in an fp16 accumulator. A float32 output
  costs nothing where it feeds an fp16 operand (the next cast fuses into its epilogue) and keeps the
  residual stream, every layer norm, the BitLinear norm+absmax quantization input (P.V of the
  BitLinear-attention families) and the logits in float32.
- attention scores (Q.K^T, then scale, mask, softmax): float32 in memory, and softmax (max, exp, sum)
  in float32. Storing them in fp16 would halve the model's largest tensors (h x N x N), but FuseOps
  puts a cast back to float32 into the kernel that writes them, not into softmax, so it would only
  round.
"""

from __future__ import annotations

import tvm
from tvm import relax

_MATMUL = tvm.ir.Op.get("relax.matmul")
_LAYOUT = {"relax.reshape", "relax.permute_dims", "relax.strided_slice", "relax.expand_dims",
           "relax.squeeze", "relax.broadcast_to"}  # pure data movement: commutes with a cast


def fp16_matmuls(mod: tvm.IRModule) -> tvm.IRModule:
    return narrow_matmul_operands(mod, "float16")


def narrow_matmul_operands(mod: tvm.IRModule, dtype: str, selects=lambda mutator, call: True) -> tvm.IRModule:
    """Every float32 `matmul` that `selects(mutator, call)` on `dtype` operands, out_dtype float32."""
    mutator = _NarrowOperands(mod.clone(), dtype, selects)  # out is its builder's module, which would be `mod` itself
    main = mutator.visit_expr(mod["main"])
    out = mutator.builder_.get()
    out["main"] = main
    return out


def _dtype(e) -> str | None:
    return getattr(e.ty, "dtype", None)


@relax.expr_functor.mutator
class _NarrowOperands(relax.PyExprMutator):
    def __init__(self, mod, dtype: str, selects):
        super().__init__(mod)
        self.dtype, self.selects = dtype, selects
        self.half: dict = {}  # float32 var -> its `dtype` version (one cast per computed value)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if (not call.op.same_as(_MATMUL) or any(_dtype(a) != "float32" for a in call.args)
                or not self.selects(self, call)):
            return call
        return relax.op.matmul(*(self.to_half(a) for a in call.args), out_dtype="float32")

    def to_half(self, e):
        """e in self.dtype: its layout ops replayed on the cast of the value they move."""
        if e in self.half:
            return self.half[e]
        value = self.lookup_binding(e) if isinstance(e, relax.Var) else None
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in _LAYOUT:
            half = relax.Call(value.op, [self.to_half(value.args[0]), *value.args[1:]], value.attrs)
        else:
            half = relax.op.astype(e, self.dtype)
        self.half[e] = self.builder_.emit(half)
        return self.half[e]
