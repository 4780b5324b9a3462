"""Default CPU schedules for the float rest of the model (placeholder: TVM's defaults)."""

from __future__ import annotations


def schedule_cpu_module(mod, target):
    return mod
