"""Default CPU schedules for the float part of a compiled model (everything but bmvcc kernels).

`legalize_and_fuse(mod, target)` runs TVM's FastMathTransform and the Relax legalization and fusion of TVM's
CPU backend (tvm/relax/backend/cpu_generic: library dispatch, LegalizeOps, AnnotateTIROpPattern,
FoldConstant, FuseOps, FuseTIR), folds what FuseOps leaves behind a matmul's reshape into it
(schedules/matmul_fold.py), then the kernels' staging rewrites (schedules/kernels.py).
`schedule_fused(mod, target)` gives each bmvcc kernel (attr "bmvcc.kernel") its own schedule
(schedules/kernels.py) and every other PrimFunc not marked `tirx.is_scheduled` the first of RULES that
applies, DLight style: each rule a module of schedules/cpu_rules/ with `apply(func, target)`, which returns
a schedule or None when the function is not its kind:

  gemv       cpu_rules/gemv.py       DLight's CPU GEMV (inner-reduction matrix x vector)
  matmul     cpu_rules/matmul.py     register-tiled matmul with fused prologue/epilogue (Linear layers,
                                     batched attention matmuls)
  rows       cpu_rules/rows.py       row-wise reductions over the innermost axis (softmax, norms), rfactored
                                     into vector partial results
  columns    cpu_rules/columns.py    reductions over an outer axis (a token mean): vector accumulators per
                                     strip of contiguous output columns
  reduction  cpu_rules/reduction.py  DLight's CPU Reduction for the other reductions
  spatial    cpu_rules/spatial.py    any other function: leading spatial loops parallel, innermost vectorized

tvm.compile's default CPU pipeline does not fuse again, so the fused, scheduled functions are what
gets built. Library calls without loops (topk -> tvm.contrib.sort) are reported as "extern". A
function no rule takes keeps TVM's naive loop nest (correct, slow), is reported as None and logged.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, tirx

from .cpu_rules import columns, gemv, matmul, reduction, rows, spatial
from .w2a8 import KERNEL_ATTR

log = logging.getLogger(__name__)

RULES = [("gemv", gemv.apply), ("matmul", matmul.apply), ("rows", rows.apply), ("columns", columns.apply),
         ("reduction", reduction.apply), ("spatial", spatial.apply)]


def legalize_and_fuse(mod: tvm.IRModule, target) -> tvm.IRModule:
    """TVM's CPU library dispatch, legalization and fusion (as relax.backend.cpu_generic runs them),
    after swapping transcendental functions for TVM's vectorizable fast-math versions; then the kernels'
    staging rewrites (schedules/kernels.py: STAGING), so tuning tasks and compiled kernels are the same functions."""
    from tvm.relax.backend import cpu_generic

    with target:
        # FastMathTransform: softmax/exp/erf/tanh as polynomials that vectorize (libm's expf and
        # erff do not: LLVM scalarizes them). Measured error vs float64: exp <= 1.1e-6 relative,
        # erf <= 4.2e-7 absolute, i.e. a few float32 ulps; exp clamps its input to [-88.4, 88.4],
        # so a -inf attention mask still gives a (denormal, ~1e-38) zero weight.
        seq = [relax.transform.FastMathTransform()]
        seq += cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
        mod = tvm.transform.Sequential(seq)(mod)
    from .matmul_fold import fold_into_matmuls
    from .kernels import stage

    return stage(fold_into_matmuls(mod), target, "cpu")


def schedule_cpu_module(mod: tvm.IRModule, target, report: dict | None = None) -> tvm.IRModule:
    """Legalize, fuse and schedule `mod` for a CPU `target`; `report` (if given) gets {function: rule}."""
    return schedule_fused(legalize_and_fuse(mod, target), target, report)


def schedule_fused(mod: tvm.IRModule, target, report: dict | None = None) -> tvm.IRModule:
    """Schedule a `legalize_and_fuse`d module for a CPU `target`: bmvcc kernels by their own schedules, every
    other PrimFunc not marked tirx.is_scheduled by the first rule that applies; `report` gets {function: rule}."""
    report = {} if report is None else report
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and KERNEL_ATTR in func.attrs and not _is_scheduled(func):
            schedule = _kernel_schedule(str(func.attrs[KERNEL_ATTR]))
            if schedule is not None:
                updates[gv] = schedule(func, target)
                report[gv.name_hint] = "kernel:" + str(func.attrs[KERNEL_ATTR])
            continue
        if not isinstance(func, tirx.PrimFunc) or KERNEL_ATTR in func.attrs or _is_scheduled(func):
            continue
        name = gv.name_hint
        if _is_extern_call(func):  # e.g. topk -> tvm.contrib.sort.topk: a library call, no loops
            report[name] = "extern"
            continue
        rule, sch = _apply_first_rule(func, target)
        report[name] = rule
        if sch is not None:
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    mod = mod.clone()  # the fused module stays as it was (bmvcc tune's tasks)
    for gv, func in updates.items():
        mod[gv] = func
    unscheduled = sorted(n for n, r in report.items() if r is None)
    if unscheduled:
        log.info("no CPU schedule rule applies to %d functions (left as naive loops): %s",
                 len(unscheduled), ", ".join(unscheduled))
    return mod


def _is_extern_call(func) -> bool:
    """No block of `func` sits in a loop: nothing to schedule (a packed library call)."""
    body = func.body
    if not isinstance(body, s_tir.SBlockRealize):
        return False
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock(body.block.name_hint))
    return not isinstance(body.block.body, tirx.For) and all(not sch.get_loops(b) for b in blocks)


def _kernel_schedule(kind: str):
    """The CPU schedule of a bmvcc kernel, by its kind (schedules/kernels.py; None: left to its owner)."""
    from .kernels import schedule_of

    return schedule_of(kind, "cpu")


def _is_scheduled(func) -> bool:
    return "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


def _apply_first_rule(func, target):
    for rule, apply in RULES:
        sch = apply(func, target)
        if sch is not None:
            return rule, sch
    return None, None
