"""transpose_matmul_weights: a constant fp16 matmul weight stored [K, N] -> stored [N, K] (CUDA builds).

Matches `matmul(x, W)` in main with W a constant 2-D float16 [K, N] (fp16_matmuls' narrowed float projections
and patch embedding, after fold_constants) where M (x's rows), K and N all exceed 64, DLight's threshold for its
tensor-core rule; the matmuls on CUDA cores keep their weights (the classifier head's, at M = 1, would stay a
transpose kernel of its own: matmul_fold merges the final layer norm into the head instead). Produces
`matmul(x, permute_dims(Wt))` with Wt the transposed constant [N, K'] (contiguous), its rows padded with zeros to
K' = K rounded up to a multiple of 4 and x padded with zero columns to match (when K is not: the paper's patch
embedding, K = 147): the same product. FuseOps fuses the permute_dims (and pad) into the matmul's kernel and
DLight's tensor-core rule, which brings B into an [N, K] shared tile, inlines it into that load, which then reads
Wt contiguously along k in 8-byte vectors from 8-byte aligned rows, its padding condition (k < K') the same for a
vector's lanes: a plain copy that schedules/async_operand_copies.py moves to cp.async (stored [K, N], its vector
lanes were strided in global memory).
Runs after the last FoldConstant, which would fold the permute_dims back; externalize_weights then makes Wt a
parameter. bmvcc's kernels (call_tir, such as norm_matmul, which reads W [K, N] itself) are not matmul calls.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .relax_match import Bindings, const_name, is_const, named_const, rewrite_main, static_shape

TENSORIZE_THRESHOLD = 64  # DLight's minimal_tensorize_threshold (tvm/s_tir/dlight/gpu/matmul.py)
VECTOR = 4  # fp16 elements per vectorized copy in DLight's tensor-core rule (its vector_size): Wt's rows padded to it


def transpose_matmul_weights(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans = {}
    for var in b.order:
        matmul = b.call(var, "relax.matmul")
        if (matmul is not None and matmul.same_as(b.values[var])  # the call's own var, not an alias (a second matmul)
                and _on_tensor_cores(matmul.args[0], weight := b.value(matmul.args[1]))):
            plans[var] = (matmul, weight)
    return rewrite_main(mod, plans, _rewrite) if plans else mod


def _on_tensor_cores(x, weight) -> bool:
    """x is fp16 (DLight's rule decides by it), weight a constant fp16 [K, N], and M, K, N all exceed DLight's
    threshold."""
    x_shape = static_shape(x)
    if not (is_const(weight) and str(weight.ty.dtype) == "float16" and len(static_shape(weight) or ()) == 2
            and x_shape and str(x.ty.dtype) == "float16"):
        return False
    rows = int(np.prod(x_shape[:-1]))  # a 2-D weight has no batch axis: DLight counts x's leading axes as rows
    return min(rows, *static_shape(weight)) > TENSORIZE_THRESHOLD


def _rewrite(rw, _binding, plan):
    matmul, weight = plan
    (k, n), x = static_shape(weight), rw.visit_expr(matmul.args[0])
    padded = -(-k // VECTOR) * VECTOR
    transposed = np.zeros((n, padded), "float16")
    transposed[:, :k] = weight.value.numpy().T
    if padded != k:  # x's extra columns meet Wt's zero columns: they add exactly 0
        x = rw.builder_.emit(relax.op.nn.pad(x, [0, 0] * (len(static_shape(x)) - 1) + [0, padded - k]))
    wt = rw.builder_.emit(relax.op.permute_dims(named_const(transposed, const_name(weight)), [1, 0]))
    return relax.Call(matmul.op, [x, wt], matmul.attrs)
