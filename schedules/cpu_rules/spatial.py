"""spatial: any function no other rule took: each block's leading spatial loops fused and parallel, and for
injective blocks the innermost loop vectorized."""

from __future__ import annotations

from tvm import s_tir

from .common import CpuFacts, has_root, is_reduction, schedule_spatial_block, try_primitive


def apply(func, target) -> s_tir.Schedule | None:
    return _spatial_rule(func, CpuFacts.of(target))


def _spatial_rule(func, facts: CpuFacts):
    sch = s_tir.Schedule(func)
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks:
        return None
    for b in blocks[:-1]:  # intermediate injective blocks fold into their consumers
        if not is_reduction(sch.get(b)):
            try_primitive(sch.compute_inline, b)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        schedule_spatial_block(sch, b, facts)
    return sch
