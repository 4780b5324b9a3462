"""Tuning design spaces for bmvcc's own kernels (PrimFuncs with attr "bmvcc.kernel").

MetaSchedule's default space would drop what makes these kernels fast (tensorization with VNNI or mma,
the packed 2-bit decode placement), so each kernel's schedule owner registers a *space function*:
    @tuning_space("w2a8", device="cpu")
    def space(sch: s_tir.Schedule, target) -> None
It applies the kernel's hand schedule to the unscheduled PrimFunc in `sch`, drawing every knob (tiles,
pipeline stages, vector width, unroll) from `sch.sample_perfect_tile` / `sch.sample_categorical`
instead of fixed numbers, and keeps the tensorize calls. The decisions land in the trace, so the
evolutionary search can mutate them (MutateTileSize, MutateUnroll, MutateParallel) and the database
replays them at compile time. A kernel with no registered space keeps its hand schedule (not tuned).

A space must be made of schedule primitives only, applied to the kernel's PrimFunc as the passes
emit it: the database stores the trace and replays it on that PrimFunc. A schedule that first rewrites
the function (as schedules/w2a8_cpu.py's `_restage` does) cannot be recorded; its knobs (CpuKnobs mr,
nt) become tunable once the restaging is expressed with primitives (pad_einsum / cache_read /
transform_layout / blockize), or once the knob choice is stored beside MetaSchedule's database.
Spaces register when their module is imported: list the module in `_SPACE_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Callable

_SPACES: dict[tuple[str, str], Callable] = {}
_SPACE_MODULES: tuple[str, ...] = ("w2a8_cuda",)  # modules of this package that register spaces


def tuning_space(kernel: str, device: str = "cpu"):
    """Register `fn(sch, target)` as the design space of bmvcc kernel `kernel` on `device` ("cpu"/"cuda")."""

    def register(fn: Callable) -> Callable:
        _SPACES[(kernel, device)] = fn
        return fn

    return register


def has_space(kernel: str, target) -> bool:
    for name in _SPACE_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    return (kernel, _device(target)) in _SPACES


def space_for(kernel: str, target):
    """A MetaSchedule ScheduleFn over the registered space, with the target's postprocessors and mutators."""
    from tvm.s_tir import meta_schedule as ms

    fn = _SPACES[(kernel, _device(target))]
    return ms.space_generator.ScheduleFn(lambda sch: fn(sch, target), sch_rules=[])


def _device(target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"
