"""bmvcc's kernels and their schedule entry points per device: the one explicit table.

KERNELS[(kind, device)] = (schedule, space), each "module:function" in this package (imported when used:
the modules import TVM), or None:
  schedule(func, target)  the kernel's hand schedule of its unscheduled PrimFunc (CPU: run by
                          cpu_default.schedule_fused; the GPU build's hand schedules take the knobs of
                          the kernel table: bmvcc/gpu_build.py:schedule_kernels)
  space(sch, target)      its MetaSchedule design space (schedules/tuning_spaces.py); None: the kernel
                          keeps its hand schedule when tuning
`kind` is the PrimFunc's kernel kind (schedules/w2a8.py:kernel_of); the CPU attention kernel's "schedule"
rebuilds it for the target's vector width (schedules/attention_cpu.py).
"""

from __future__ import annotations

import importlib
from typing import Callable

KERNELS: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("w2a8", "cpu"): ("w2a8_cpu:schedule_w2a8_cpu", "w2a8_cpu:w2a8_space"),
    ("norm_quant", "cpu"): ("norm_quant:schedule_norm_quant_cpu", "norm_quant:norm_quant_space"),
    ("attention", "cpu"): ("attention_cpu:schedule_attention_cpu", None),
    ("w2a8", "cuda"): (None, "w2a8_cuda:design_spaces"),
    ("norm_quant", "cuda"): (None, None),
}


def schedule_of(kind: str, device: str) -> Callable | None:
    return _load(KERNELS.get((kind, device), (None, None))[0])


def space_of(kind: str, device: str) -> Callable | None:
    return _load(KERNELS.get((kind, device), (None, None))[1])


def _load(entry: str | None) -> Callable | None:
    if entry is None:
        return None
    module, function = entry.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)
