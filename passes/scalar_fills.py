"""scalar_fills: a `where` branch that is one value repeated -> that value as a scalar.

Matches `where(c, a, b)` in main where a branch is a constant whose elements are all equal (after
fold_constants: torch SDPA's guard as TVM imports it, `where(row all -inf, full_like(P, 0), P)`, a
[B, H, N, N] tensor of zeros) and the condition and the other branch alone broadcast to the where's shape.
Produces the where with a scalar constant of that value and dtype: the same elements, and no tensor of
repeated values for externalize_weights to store in weights.bin.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .relax_match import Bindings, is_const, rewrite_main, static_shape


def scalar_fills(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans = {}
    for var in b.order:
        where = b.call(var, "relax.where")
        if where is not None and (args := _with_scalar_fills(where, b, static_shape(var))) is not None:
            plans[var] = args
    return rewrite_main(mod, plans, _rewrite) if plans else mod


def _rewrite(rw, _binding, args):
    return relax.op.where(*(rw.visit_expr(a) for a in args))


def _with_scalar_fills(where, b: Bindings, shape) -> list | None:
    """where's operands with each repeated-value branch a scalar, when that keeps `shape`; None if none is."""
    args, changed = list(where.args), False
    for i in (1, 2):
        fill = b.value(args[i])
        others = [static_shape(args[j]) for j in (0, 1, 2) if j != i]
        if not is_const(fill) or shape is None or None in others or np.broadcast_shapes(*others) != shape:
            continue
        values = fill.value.numpy()
        if values.size > 1 and values.tobytes() == np.full_like(values, values.flat[0]).tobytes():  # -0.0 is not 0.0
            args[i], changed = relax.const(values.flat[0], str(values.dtype)), True
    return args if changed else None
