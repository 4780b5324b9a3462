"""fuse_w2a8_epilogue: the elementwise op after a W2A8 kernel -> the kernel's epilogue.

Matches `gelu(y)` and `r + y` / `y + r` (r of y's shape, no broadcast) where y is, possibly through
a reshape, the only use of a W2A8 call_tir without an epilogue: the FFN's first BitLinear + GELU,
and the residual adds after the FFN and the attention output projection.
Produces the same call with epilogue "gelu" or "residual" (schedules/w2a8.py; the residual enters as
an extra [M, N] input), reshaped back. The fused Wqkv output feeds three slices, so it keeps its
plain kernel and the slices stay after it (slicing is a view-sized copy; fusing it would need a
three-output kernel).
Report (module attr REPORT_KEY, JSON): {"gelu": n, "residual": n}.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.w2a8 import W2A8Config, w2a8_compute
from .relax_match import REPORT_PREFIX, Bindings, kernel_of, rewrite_main, static_shape, with_report

REPORT_KEY = REPORT_PREFIX + "fuse_w2a8_epilogue"


def fuse_w2a8_epilogue(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans = {}
    for var in b.order:
        if isinstance(b.values[var], relax.Var):
            continue  # an alias: its target is matched itself
        gelu = b.call(var, "relax.nn.gelu")
        if gelu is not None and (y := _sole_w2a8(gelu.args[0], mod, b)) is not None:
            plans[var] = ("gelu", y, None)
            continue
        add = b.call(var, "relax.add")
        if add is None:
            continue
        for out, res in (add.args, add.args[::-1]):
            y = _sole_w2a8(out, mod, b)
            if y is not None and static_shape(res) == static_shape(out):
                plans[var] = ("residual", y, res)
                break
    report = {"gelu": 0, "residual": 0}
    for kind, _, _ in plans.values():
        report[kind] += 1
    if not plans:
        return with_report(mod, REPORT_KEY, report)
    return with_report(rewrite_main(mod, plans, _rewrite), REPORT_KEY, report)


def _sole_w2a8(e, mod, b: Bindings):
    """The W2A8 call (no epilogue yet) that `e` is, through one reshape, when nothing else uses it."""
    chain = [b.root(e)]
    if b.call(chain[0], "relax.reshape") is not None:
        chain.append(b.root(b.call(chain[0], "relax.reshape").args[0]))
    call = b.value(chain[-1])
    if kernel_of(mod, call) != "w2a8" or len(call.args[1].fields) != 4:
        return None
    if any(not isinstance(v, relax.Var) or b.uses.get(v, 0) != 1 for v in chain):
        return None
    return call


def _rewrite(rw, binding, plan):
    """One W2A8 call with the epilogue (and its residual operand) replaces the call + elementwise op."""
    epilogue, call, res = plan
    args = [rw.visit_expr(a) for a in call.args[1].fields]
    (m, k), (n, _) = static_shape(args[0]), static_shape(args[1])
    if res is not None:
        args.append(rw.builder_.emit(relax.op.reshape(rw.visit_expr(res), (m, n))))
    cfg = W2A8Config(m, n, k, epilogue)
    kernel = rw.kernel(cfg, w2a8_compute, f"w2a8_m{m}_n{n}_k{k}_{epilogue}")
    y = rw.builder_.emit(relax.call_tir(kernel, args, relax.TensorType((m, n), "float32")))
    shape = static_shape(binding.var)
    return y if shape == (m, n) else relax.op.reshape(y, shape)
