"""Control flow (PTX ISA 8.5 §9.7.12): branches and thread exit; machine.run_batch handles divergence."""

from __future__ import annotations

from .machine import EXIT
from .ops import op


@op("bra")
def _bra(ctx, ins, parts):
    target = ctx.kernel.labels[ins.operands[0]]
    return lambda st, m: (target, m)


@op("ret", "exit")
def _exit(ctx, ins, parts):
    return lambda st, m: (EXIT, m)
