"""fuse_w2a8_epilogue: the elementwise ops after a W2A8 kernel -> the kernel's epilogue.

Matches, where y is (through one reshape) the only use of a W2A8 call_tir without an epilogue, and
yb = y + bias or bias + y (a constant [N]: F.linear's bias), itself used once:
- `gelu(y)`, `gelu_tanh(y)`, `gelu(yb)`, `gelu_tanh(yb)`: the FFN's first BitLinear + GELU;
- `r + y`, `r + yb` (either order; r of y's shape, no broadcast): the residual adds after the FFN and
  the attention output projection. A bias folds into the residual operand (r + bias, one float add
  beside the kernel: (r + bias) + y differs from r + (y + bias) by float rounding only);
- `yb` otherwise (the qkv projection's bias).
Produces the same call with epilogue "gelu", "gelu_tanh", "residual", "bias", "bias_gelu" or
"bias_gelu_tanh" (schedules/w2a8.py; the residual enters as an extra [M, N] input, a bias as
[1, N]), reshaped back. The fused Wqkv output feeds three slices, so it keeps its plain (or bias)
kernel and the slices stay after it (slicing is a view-sized copy; fusing it would need a
three-output kernel).
Report (module attr REPORT_KEY, JSON): {"gelu": n, "gelu_tanh": n, "residual": n, "bias": n}
(bias: the layers whose bias the kernel adds, alone or folded into the residual).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..schedules.w2a8 import W2A8Config, w2a8_compute
from .relax_match import (REPORT_PREFIX, Bindings, is_const, kernel_of, named_const, rewrite_main, static_shape,
                          with_report)

REPORT_KEY = REPORT_PREFIX + "fuse_w2a8_epilogue"
_GELUS = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh"}


def fuse_w2a8_epilogue(mod: tvm.IRModule) -> tvm.IRModule:
    b = Bindings(mod["main"])
    plans, biased = {}, {}  # biased: the bias adds a GELU or residual plan consumes
    for var in b.order:
        if isinstance(b.values[var], relax.Var):
            continue  # an alias: its target is matched itself
        gelu = b.call(var, *_GELUS)
        if gelu is not None:
            plan = _plan(_GELUS[gelu.op.name], gelu.args[0], None, mod, b)
            if plan is not None:
                plans[var] = plan
            continue
        add = b.call(var, "relax.add")
        for out, res in ((add.args, add.args[::-1]) if add is not None else ()):
            if static_shape(res) == static_shape(out) and (plan := _plan("residual", out, res, mod, b)) is not None:
                plans[var] = plan
                break
    consumed = {p[1] for p in plans.values()}  # TVM objects hash by node identity
    for var in b.order:  # a bias add that no GELU or residual took: the bias epilogue alone
        found = _biased(var, mod, b) if b.call(var, "relax.add") is not None else None  # the add, not a reshape of it
        if found is not None and found[0] not in consumed:
            plans[var] = ("bias", *found, None)
    report = {"gelu": 0, "gelu_tanh": 0, "residual": 0, "bias": 0}
    for kind, _, bias, _ in plans.values():
        if kind != "bias":
            report[kind.removeprefix("bias_")] += 1
        report["bias"] += bias is not None
    if not plans:
        return with_report(mod, REPORT_KEY, report)
    return with_report(rewrite_main(mod, plans, _rewrite), REPORT_KEY, report)


def _plan(epilogue: str, e, res, mod, b: Bindings):
    """(epilogue, W2A8 call, bias [1, N] or None, residual or None) when `e` is the call or its bias add."""
    call = _sole_w2a8(e, mod, b)
    if call is not None:
        return epilogue, call, None, res
    found = _biased(e, mod, b, used_once=True)
    if found is None:
        return None
    return (epilogue if res is not None else f"bias_{epilogue}"), *found, res


def _biased(e, mod, b: Bindings, used_once: bool = False):
    """(W2A8 call, bias float32[1, N]) when `e` is, through one reshape, y + bias or bias + y with y
    a sole W2A8 call and bias a constant of N values; with used_once, each var on the way used once."""
    chain = [b.root(e)]
    if (reshape := b.call(chain[0], "relax.reshape")) is not None:
        chain.append(b.root(reshape.args[0]))
    add = b.call(chain[-1], "relax.add")
    if add is None or (used_once and any(not isinstance(v, relax.Var) or b.uses.get(v, 0) != 1 for v in chain)):
        return None
    for y, c in (add.args, add.args[::-1]):
        call, c = _sole_w2a8(y, mod, b), b.value(c)
        if call is not None and is_const(c):
            n = static_shape(call.args[1].fields[1])[0]  # packed weight [N, K/4]
            bias = c.value.numpy()
            if bias.size == n and bias.shape[-1] == n:
                return call, bias.astype(np.float32).reshape(1, n)
    return None


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
    """One W2A8 call with the epilogue (and its residual or bias operand) replaces the call + elementwise ops."""
    epilogue, call, bias, res = plan
    args = [rw.visit_expr(a) for a in call.args[1].fields]
    (m, k), (n, _) = static_shape(args[0]), static_shape(args[1])
    if res is not None:
        res = rw.builder_.emit(relax.op.reshape(rw.visit_expr(res), (m, n)))
        args.append(res if bias is None else rw.builder_.emit(relax.op.add(res, relax.const(bias))))
    elif bias is not None:
        args.append(named_const(bias))
    cfg = W2A8Config(m, n, k, epilogue)
    kernel = rw.kernel(cfg, w2a8_compute, f"w2a8_m{m}_n{n}_k{k}_{epilogue}")
    y = rw.builder_.emit(relax.call_tir(kernel, args, relax.TensorType((m, n), "float32")))
    shape = static_shape(binding.var)
    return y if shape == (m, n) else relax.op.reshape(y, shape)
