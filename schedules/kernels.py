"""bmvcc's kernels and their schedule entry points per device: the one explicit table.

KERNELS[(kind, device)] = (schedule, space), each "module:function" in this package (imported when used:
the modules import TVM), or None. Each kernel's compute definition has a module of its own
(w2a8.py, norm_quant.py, norm_matmul.py) and each backend's schedules a module beside it (<kernel>_<device>.py), with
the same two entry points:
  schedule(func, target[, knobs])  the hand schedule of the kernel's unscheduled PrimFunc, returned
                                   marked tirx.is_scheduled (CPU: run by cpu_default.schedule_fused; GPU:
                                   by bmvcc/gpu_build.py:schedule_kernels, with the knobs of its kernel table)
  space(sch, target)               its MetaSchedule design space (schedules/tuning_spaces.py); None: the
                                   kernel keeps its hand schedule when tuning
A CUDA schedule's module may also offer
  kernel_ops(func)                 the arithmetic of the scheduled kernel (a multiply-add counted as 2), which
                                   bmvcc/gpu_build.py:kernel_calls reports instead of TVM's static count
`kind` is the PrimFunc's kernel kind (schedules/w2a8.py:kernel_of); the CPU attention kernel's
`schedule` rebuilds it for the target's vector width (schedules/attention_cpu.py).
STAGING[device]: "module:function"s (IRModule, target) -> IRModule run after legalization and fusion
(cpu_default.legalize_and_fuse), before the tuning tasks are taken: a kernel whose schedule needs its
function rewritten first (the W2A8 CPU kernels' explicit stages) does that there.
"""

from __future__ import annotations

import importlib
from typing import Callable

KERNELS: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("w2a8", "cpu"): ("w2a8_cpu:schedule", "w2a8_cpu:space"),
    ("norm_quant", "cpu"): ("norm_quant_cpu:schedule", "norm_quant_cpu:space"),
    ("attention", "cpu"): ("attention_cpu:schedule", None),
    ("w2a8", "cuda"): ("w2a8_cuda:schedule", "w2a8_cuda:space"),
    ("norm_quant", "cuda"): ("norm_quant_cuda:schedule", None),
    ("attention_prefill", "cuda"): ("attention_cuda_tc:schedule", None),
    ("norm_matmul", "cuda"): ("norm_matmul_cuda:schedule", None),
}
STAGING: dict[str, tuple[str, ...]] = {"cpu": ("w2a8_cpu:stage_w2a8_kernels",)}


def schedule_of(kind: str, device: str) -> Callable | None:
    return _load(KERNELS.get((kind, device), (None, None))[0])


def space_of(kind: str, device: str) -> Callable | None:
    return _load(KERNELS.get((kind, device), (None, None))[1])


def stage(mod, target, device: str):
    """`mod` after the staging rewrites of `device`'s kernels (STAGING)."""
    for entry in STAGING.get(device, ()):
        mod = _load(entry)(mod, target)
    return mod


def scheduler_of(kind: str | None, device: str):
    """The module of the kind's schedule on `device` (None for a kind without one), for what else the kernel's
    users ask it: the passes that make the calls `supported(cfg)` (attention, norm_matmul), the GPU build
    `kernel_ops(func)` where TVM cannot count the kernel's arithmetic (module docstring)."""
    entry = KERNELS.get((kind, device), (None, None))[0]
    return None if entry is None else importlib.import_module(f"{__package__}.{entry.split(':')[0]}")


def _load(entry: str | None) -> Callable | None:
    if entry is None:
        return None
    module, function = entry.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)
