"""ExternalizeWeights: move main's large constants out of the module into parameters.

Matches: every constant tensor in `main` with at least `min_elements` elements (weights, packed
2-bit weights, position embeddings, masks). Produces: `main(img, w0, w1, ...)` where each w_i is a new
parameter in order of first use, plus the arrays in that order, so that the compiled `.so` holds code
only and the weights travel in a separate file the TVM runtime reads. Identical constants (same dtype,
shape and bytes, content_key: each block's copy of a folded constant, such as equal norm gains) share one
parameter, so weights.bin holds no tensor twice. Small constants (scalars, scales) stay inline.
"""

from __future__ import annotations

import hashlib

import tvm
from tvm import relax


def content_key(array) -> tuple:
    """What makes two constants the same weight: dtype, shape and bytes."""
    return array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).digest()


@relax.expr_functor.mutator
class _Lifter(relax.PyExprMutator):
    def __init__(self, mod, min_elements: int):
        super().__init__(mod)
        self.min_elements = min_elements
        self.params: list[relax.Var] = []
        self.values: list[tvm.runtime.Tensor] = []
        self.by_content: dict[tuple, relax.Var] = {}  # (dtype, shape, sha256 of the bytes) -> its parameter

    def visit_generic_const_(self, const):
        value = const.value
        if not hasattr(value, "shape") or _numel(value.shape) < self.min_elements:
            return const
        key = content_key(value.numpy())
        if key not in self.by_content:
            self.by_content[key] = relax.Var(f"w{len(self.params)}", const.ty)
            self.params.append(self.by_content[key])
            self.values.append(value)
        return self.by_content[key]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def externalize_weights(mod: tvm.IRModule, min_elements: int = 64):
    """Returns (module, [weights]) with main taking the weights after its inputs."""
    main = mod["main"]
    lifter = _Lifter(mod, min_elements)
    body = lifter.visit_expr(main.body)
    func = relax.Function(list(main.params) + lifter.params, body, main.ret_ty, main.is_pure, main.attrs)
    out = mod.clone()
    out["main"] = func
    return out, lifter.values
