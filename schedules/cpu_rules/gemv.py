"""gemv: DLight's CPU GEMV (inner-reduction matrix x vector)."""

from __future__ import annotations

from tvm import s_tir


def apply(func, target) -> s_tir.Schedule | None:
    from tvm.s_tir import dlight

    return dlight.cpu.GEMV().apply(func, target, False)
