"""Structural matching helpers shared by bmvcc's passes and schedules/matmul_fold.py (not a pass).

The passes match BitLinear by its math, not by one spelling: `Bindings` resolves dataflow variables
to the expressions bound to them, and `product` reads a chain of multiply/divide as a coefficient
times powers of atoms, so `x / s`, `x * (1 / s)` and `(1 / a) * 127` compare equal to what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..schedules.w2a8 import kernel_of as kernel_kind

REPORT_PREFIX = "bmvcc.report."  # + pass name: module attr (JSON) a pass leaves for run_pipeline


class Bindings:
    """var -> bound expression for every VarBinding of a function, plus use counts and, per var, the bound calls
    that read it (through aliases)."""

    def __init__(self, func: relax.Function):
        self.values: dict = {}
        self.order: list = []
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.values[b.var] = b.value
                    self.order.append(b.var)
        self.uses: dict = {}
        _UseCounter(self.uses).visit_expr(func)
        self.reads: dict = {}  # var -> its uses and its aliases' (an alias binding's own read of it not counted)
        for v, n in self.uses.items():
            self.reads[self.root(v)] = self.reads.get(self.root(v), 0) + n
        for v in self.order:
            if isinstance(self.values[v], relax.Var):
                self.reads[self.root(v)] -= 1
        self.readers: dict = {}  # var -> the vars bound to calls with it (or an alias of it) as an argument
        for u in self.order:
            if isinstance(call := self.values[u], relax.Call):
                for var in {self.root(a) for a in call.args if isinstance(a, relax.Var)}:
                    self.readers.setdefault(var, []).append(u)

    def sole_user(self, var, *ops: str):
        """(user var, its call) when `var` is read once (an alias's reads counted as its own), by a call of one of
        `ops`, else None."""
        if self.reads.get(var, 0) != 1 or len(users := self.readers.get(var, ())) != 1:
            return None
        call = self.call(users[0], *ops)
        return None if call is None else (users[0], call)

    def root(self, e):
        """Follow var-to-var aliases."""
        while isinstance(e, relax.Var) and isinstance(self.values.get(e), relax.Var):
            e = self.values[e]
        return e

    def value(self, e):
        """The expression bound to `e` (through aliases), or `e` itself when unbound."""
        e = self.root(e)
        return self.values.get(e, e) if isinstance(e, relax.Var) else e

    def call(self, e, *ops: str):
        """The call bound to `e` if its operator is one of `ops` (e.g. "relax.round")."""
        v = self.value(e)
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in ops:
            return v
        return None

    def strip(self, e, *ops: str):
        """Skip calls of `ops` (e.g. reshape) and return what they consume."""
        while (c := self.call(e, *ops)) is not None:
            e = c.args[0]
        return self.root(e)

    def through_ste(self, e):
        """q when `e` is a straight-through estimator x + (q - x) (torch.export drops the detach of
        x + (q - x).detach(); the sum is q up to float rounding, so q itself is what the layer means), else e."""
        add = self.call(e, "relax.add")
        for x, diff in ((add.args, add.args[::-1]) if add is not None else ()):
            sub = self.call(diff, "relax.subtract")
            if sub is not None and self.root(sub.args[1]).same_as(self.root(x)):
                return self.root(sub.args[0])
        return self.root(e)

    def item(self, e):
        """(tuple producer, index) when `e` is t[i], looking through a repacked tuple (a, b)[0]."""
        v = self.value(e)
        if not isinstance(v, relax.TupleGetItem):
            return None
        tup = self.value(v.tuple_value)
        if isinstance(tup, relax.Tuple):
            return self.item(tup.fields[v.index])
        return tup, v.index

    def leaves(self, e) -> list:
        """Unbound leaves (constants, parameters) that `e` is computed from."""
        out, seen, stack = [], set(), [e]
        while stack:
            x = self.root(stack.pop())
            if isinstance(x, relax.Var) and x in self.values:
                x = self.values[x]
            if x in seen:  # TVM objects hash and compare by node identity
                continue
            seen.add(x)
            if isinstance(x, relax.Call):
                stack.extend(x.args)
            elif isinstance(x, relax.Tuple):
                stack.extend(x.fields)
            elif isinstance(x, relax.TupleGetItem):
                stack.append(x.tuple_value)
            elif isinstance(x, relax.Var) or is_const(x):
                out.append(x)
        return out

    def ancestors_ops(self, e, depth: int) -> set[str]:
        """Names of the operators within `depth` producer steps of `e`."""
        ops, frontier = set(), [e]
        for _ in range(depth):
            nxt = []
            for x in frontier:
                v = self.value(x)
                if isinstance(v, relax.TupleGetItem):
                    nxt.append(v.tuple_value)
                elif isinstance(v, relax.Tuple):
                    nxt.extend(v.fields)
                elif isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                    ops.add(v.op.name)
                    nxt.extend(v.args)
            frontier = nxt
        return ops


@relax.expr_functor.visitor
class _UseCounter(relax.PyExprVisitor):
    def __init__(self, uses: dict):
        super().__init__()
        self.uses = uses

    def visit_var_(self, var):
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var):
        self.uses[var] = self.uses.get(var, 0) + 1


def is_const(e) -> bool:
    return isinstance(e, tvm.ir.GenericConst) and hasattr(e.value, "shape")


def scalar(e, b: Bindings) -> float | None:
    """The value of a one-element float/int constant, else None."""
    e = b.value(e)
    if is_const(e) and int(np.prod([int(d) for d in e.value.shape])) == 1:
        return float(e.value.numpy().reshape(()))
    return prim(e)


def prim(e) -> float | None:
    """A literal PrimExpr argument (a clip bound) as a float."""
    return float(e.value) if isinstance(e, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) else None


@dataclass
class Product:
    """coef * prod(atom ** power) for a multiply/divide chain; atoms are keyed by identity."""

    coef: float = 1.0
    factors: dict = field(default_factory=dict)  # atom -> int power

    def times(self, other: Product, sign: int = 1) -> Product:
        f = dict(self.factors)
        for a, p in other.factors.items():
            f[a] = f.get(a, 0) + sign * p
            if f[a] == 0:
                del f[a]
        coef = self.coef * other.coef if sign > 0 else self.coef / other.coef
        return Product(coef, f)

    def without(self, atom) -> Product:
        return Product(self.coef, {a: p for a, p in self.factors.items() if not a.same_as(atom)})

    def same(self, other: Product, rtol: float = 1e-6) -> bool:
        return (set(self.factors.items()) == set(other.factors.items())
                and abs(self.coef - other.coef) <= rtol * max(abs(self.coef), abs(other.coef)))


def product(e, b: Bindings) -> Product:
    c = b.call(e, "relax.multiply", "relax.divide")
    if c is not None:
        lhs, rhs = product(c.args[0], b), product(c.args[1], b)
        return lhs.times(rhs, 1 if c.op.name == "relax.multiply" else -1)
    s = scalar(e, b)
    if s is not None and s != 0.0:
        return Product(s, {})
    return Product(1.0, {b.root(e): 1})


def static_shape(e) -> tuple[int, ...] | None:
    ty = e.ty if hasattr(e, "ty") else None
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except TypeError:
        return None


def kernel_of(mod: tvm.IRModule, call) -> str | None:
    """The kernel kind (schedules/w2a8.py's kernel_of) of the PrimFunc a call_tir calls, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
        return None
    gv = call.args[0]
    if not isinstance(gv, tvm.ir.GlobalVar) or gv not in mod.functions:
        return None
    return kernel_kind(mod[gv])


def const_name(e) -> str | None:
    """The PyTorch name the frontend put in a constant's span, if any."""
    span = getattr(e, "span", None)
    return span.source_name.name if span is not None and span.source_name is not None else None


def named_const(value: np.ndarray, name: str | None = None):
    span = None if name is None else tvm.ir.Span(tvm.ir.SourceName(name), 0, 0, 0, 0)
    return relax._ffi_api.MakeTensorConst(tvm.runtime.tensor(value), None, span)


@relax.expr_functor.mutator
class PlanRewriter(relax.PyExprMutator):
    """Rebinds every var of main that has a plan (found by a pass's matching phase) to
    `rewrite(self, binding, plan)`, which may emit helper bindings into `self.builder_` first, or drops
    its binding when that returns None (the var must be read no more); other bindings are copied.
    `kernel` adds each TIR kernel once per config."""

    def __init__(self, mod, plans: dict, rewrite):
        super().__init__(mod)
        self.plans, self.rewrite = plans, rewrite
        self.kernels: dict = {}

    def visit_var_binding_(self, binding):
        if binding.var not in self.plans:
            return super().visit_var_binding_(binding)
        value = self.rewrite(self, binding, self.plans[binding.var])
        if value is not None:
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

    def kernel(self, cfg, make, name: str):
        if cfg not in self.kernels:
            self.kernels[cfg] = self.builder_.add_func(make(cfg), name)
        return self.kernels[cfg]


def rewrite_main(mod: tvm.IRModule, plans: dict, rewrite) -> tvm.IRModule:
    """main with each planned binding replaced by `rewrite` (see PlanRewriter); the new module."""
    mutator = PlanRewriter(mod.clone(), plans, rewrite)  # out is its builder's module: `mod` unless it added a kernel
    new_main = mutator.visit_expr(mod["main"])
    out = mutator.builder_.get()
    out["main"] = new_main
    return out


def with_report(mod: tvm.IRModule, attr_key: str, report: dict) -> tvm.IRModule:
    import json

    return mod.with_attr(attr_key, json.dumps(report))


def read_report(mod: tvm.IRModule, attr_key: str) -> dict | None:
    import json

    attrs = mod.attrs
    return json.loads(str(attrs[attr_key])) if attrs is not None and attr_key in attrs else None


_UNARY = {"relax.abs": np.abs, "relax.round": np.rint, "relax.negative": np.negative, "relax.sign": np.sign}
_BINARY = {"relax.multiply": np.multiply, "relax.divide": np.divide, "relax.add": np.add, "relax.subtract": np.subtract}
_REDUCE = {"relax.mean": np.mean, "relax.sum": np.sum, "relax.max": np.max, "relax.min": np.min}


def evaluate(e, b: Bindings):
    """Value of a constant-only expression as a numpy array (float32 math, round half to even, as
    TVM's legalized ops compute it), or a string naming the operator it cannot evaluate."""
    e = b.value(b.through_ste(e))
    if is_const(e):
        return e.value.numpy()
    if not (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)):
        return f"a {type(e).__name__} is not a constant"
    name = e.op.name
    args = [evaluate(a, b) for a in e.args if isinstance(a, relax.Expr) and not isinstance(a, relax.ShapeExpr)
            and not isinstance(a, (tvm.tirx.IntImm, tvm.tirx.FloatImm))]
    bad = next((a for a in args if isinstance(a, str)), None)
    if bad is not None:
        return bad
    with np.errstate(divide="ignore", invalid="ignore"):
        if name in _UNARY:
            return _UNARY[name](args[0])
        if name in _BINARY:
            x, y = args
            return _BINARY[name](x, y).astype(np.result_type(x.dtype, y.dtype))
        if name in _REDUCE:
            axis = None if e.attrs.axis is None else tuple(int(a) for a in e.attrs.axis)
            return _REDUCE[name](args[0], axis=axis, keepdims=bool(e.attrs.keepdims)).astype(args[0].dtype)
        if name == "relax.clip":
            return np.clip(args[0], prim(e.args[1]), prim(e.args[2])).astype(args[0].dtype)
        if name == "relax.permute_dims":
            axes = None if e.attrs.axes is None else tuple(int(a) for a in e.attrs.axes)
            return np.transpose(args[0], axes)
        if name == "relax.reshape":
            return args[0].reshape([int(d) for d in e.args[1].values])
        if name == "relax.astype":
            return args[0].astype(str(e.attrs.dtype))
        if name == "relax.broadcast_to":
            return np.broadcast_to(args[0], [int(d) for d in e.args[1].values])
    return f"{name} in the weight math is not evaluated at compile time"
