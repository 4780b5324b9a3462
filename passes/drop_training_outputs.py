"""drop_training_outputs: keep only the logits when main returns a tuple.

Matches: `main` whose result is a tuple, e.g. BitMedViT's (logits, matcher output) where the matcher
head is training-only, or a .pt2 program returning extra entries. Produces: `main` returning element 0
only; the work that fed the other entries becomes dead (dead_code_elimination removes it).
"""

from __future__ import annotations

import tvm
from tvm import relax


def drop_training_outputs(mod: tvm.IRModule) -> tvm.IRModule:
    main = mod["main"]
    if not isinstance(main.ret_ty, relax.TupleType):
        return mod
    body = main.body
    logits = relax.Var("logits", main.ret_ty.fields[0])
    block = relax.BindingBlock([relax.VarBinding(logits, relax.TupleGetItem(body.body, 0))])
    func = relax.Function(main.params, relax.SeqExpr([*body.blocks, block], logits), logits.ty,
                          main.is_pure, main.attrs)
    out = mod.clone()
    out["main"] = func
    return out
