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

The w2a8 space here is for CPUs without VNNI (the AVX2 path): the reference compute of schedules/w2a8.py
tiled over (m, n, k), the decode and multiply-accumulate vectorized over n, the dequant epilogue fused
into each (m, n) tile. Replace it with the owner's knob-driven schedule once schedules/w2a8_cpu.py
exposes one.
"""

from __future__ import annotations

from typing import Callable

_SPACES: dict[tuple[str, str], Callable] = {}


def tuning_space(kernel: str, device: str = "cpu"):
    """Register `fn(sch, target)` as the design space of bmvcc kernel `kernel` on `device` ("cpu"/"cuda")."""

    def register(fn: Callable) -> Callable:
        _SPACES[(kernel, device)] = fn
        return fn

    return register


def has_space(kernel: str, target) -> bool:
    return (kernel, _device(target)) in _SPACES


def space_for(kernel: str, target):
    """A MetaSchedule ScheduleFn over the registered space, with the target's postprocessors and mutators."""
    from tvm.s_tir import meta_schedule as ms

    fn = _SPACES[(kernel, _device(target))]
    return ms.space_generator.ScheduleFn(lambda sch: fn(sch, target), sch_rules=[])


def _device(target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"


@tuning_space("w2a8", device="cpu")
def w2a8_cpu_avx2(sch, target) -> None:
    acc, dequant = sch.get_sblock("acc"), sch.get_sblock("dequant")
    i, j, k = sch.get_loops(acc)
    io, ii = sch.split(i, sch.sample_perfect_tile(i, n=2, max_innermost_factor=16))
    jo, jm, ji = sch.split(j, sch.sample_perfect_tile(j, n=3, max_innermost_factor=32))  # ji: vector lanes
    ko, ki = sch.split(k, sch.sample_perfect_tile(k, n=2, max_innermost_factor=64))
    sch.reorder(io, jo, ko, ii, jm, ki, ji)
    sch.reverse_compute_at(dequant, jo)  # dequantize each (m, n) tile while its accumulators are in cache
    root = sch.get_sblock("root")
    cores = int(target.attrs.get("num-cores", 1))
    sch.annotate(root, "meta_schedule.parallel", 16 * cores)
    sch.annotate(root, "meta_schedule.vectorize", 64)
    sch.annotate(root, "meta_schedule.unroll_explicit",
                 sch.sample_categorical([0, 16, 64, 512], probs=[0.25, 0.25, 0.25, 0.25]))
