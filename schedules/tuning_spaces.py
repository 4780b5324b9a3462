"""Tuning design spaces for bmvcc's own kernels (PrimFuncs with attr "bmvcc.kernel").

MetaSchedule's default space would drop what makes these kernels fast (tensorization with VNNI or mma,
the packed 2-bit decode placement), so each kernel's schedule owner provides a *space function*,
listed in schedules/kernels.py's table:
    def space(sch: s_tir.Schedule, target) -> None
It applies the kernel's hand schedule to the PrimFunc in `sch` (the tuning task), drawing its knobs
from `sch.sample_perfect_tile` (tiles: mutated by MutateTileSize) and `sample_unroll` below (the
auto-unroll step: MutateUnroll), and keeps the tensorize calls.

A space is made of schedule primitives only, applied to the task's PrimFunc: MetaSchedule runs the
function once for the design-space trace, then samples and mutates by *replaying* that trace with new
decisions, and the database replays the best trace at compile time. So no Python branch may depend on
a sampled value, and a kernel whose schedule rewrites the function first must do that rewrite before
task extraction (schedules/w2a8_cpu.py stages its kernels in cpu_default.legalize_and_fuse, which
tuning and compile both run). A kernel with no registered space keeps its hand schedule (not tuned).
The target's default postprocessors run on the sampled traces; on the llvm W2A8 space they add only
the unroll pragmas and a decomposition of the rowsum reduction (RewriteReductionBlock), and leave the
tensorized blocks alone (RewriteLayout finds no layout-free buffer).
"""

from __future__ import annotations

from .kernels import space_of

UNROLL_STEPS = (0, 16, 64, 512)  # auto-unroll step candidates (0: loops as scheduled)


def sample_unroll(sch) -> None:
    """Draw the auto-unroll step of every loop nest from UNROLL_STEPS (the RewriteParallelVectorizeUnroll
    postprocessor turns it into pragma_auto_unroll_max_step; MutateUnroll mutates it)."""
    step = sch.sample_categorical(list(UNROLL_STEPS), [1 / len(UNROLL_STEPS)] * len(UNROLL_STEPS))
    sch.annotate(sch.get_sblock("root"), "meta_schedule.unroll_explicit", step)


def has_space(kernel: str, target) -> bool:
    return space_of(kernel, _device(target)) is not None


def space_for(kernel: str, target):
    """A MetaSchedule ScheduleFn over the registered space, with the target's postprocessors and mutators."""
    from tvm.s_tir import meta_schedule as ms

    fn = space_of(kernel, _device(target))
    return ms.space_generator.ScheduleFn(lambda sch: fn(sch, target), sch_rules=[])


def _device(target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"
