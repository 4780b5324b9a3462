"""The stages after bmvcc's Relax passes, per device kind: the one definition that `bmvcc compile`
(bmvcc/build.py), `bmvcc tune` (bmvcc/tune.py) and `compile --db` (bmvcc/tunedb.py) all run, each stage once.

  fuse      legalization and fusion; the PrimFuncs of its output are the tuning tasks, and a tuning
            database applies to them (tunedb.apply_database), marking them tirx.is_scheduled
  schedule  bmvcc kernels by their own schedules, every other PrimFunc by the default rules; both skip
            what is already scheduled
  package   the rest of tvm.compile and the export of the .so (GPU: with its cubin and device files)

            CPU (schedules/cpu_default.py)          GPU (bmvcc/gpu_build.py)
  fuse      legalize_and_fuse                       fuse (W2A8 on its padded tiles, CUDA legalization)
  schedule  schedule_fused                          schedule_kernels, kernel_calls, schedule_rest (DLight)
  package   tvm.compile, export_library             lower, tvm.compile, compile_device, export_library,
                                                    pack_imports (targets/cuda_export.py), write_device_files
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Stage:
    """A module between stages. GPU only: `kernels`, the bmvcc kernel table (gpu_build.fuse's, then
    schedule_kernels'); `definitions`, the fused module before scheduling (the compute definitions bmvcc
    verify checks against); `calls`, gpu_build.kernel_calls before DLight."""

    mod: object
    kernels: dict = field(default_factory=dict)
    definitions: object = None
    calls: dict = field(default_factory=dict)


def pass_context(spec):
    """The PassContext every stage runs in (GPU: gpu_build.PASS_CONFIG, cp.async)."""
    import tvm

    from .gpu_build import PASS_CONFIG

    return tvm.transform.PassContext(config=PASS_CONFIG if spec.device == "cuda" else {})


def fuse(mod, spec) -> Stage:
    """bmvcc's Relax module, legalized and fused for spec: the tuning tasks."""
    if spec.device == "cuda":
        from . import gpu_build

        fused, kernels = gpu_build.fuse(mod, spec)
        return Stage(fused, kernels, definitions=fused)
    from .schedules.cpu_default import legalize_and_fuse

    return Stage(legalize_and_fuse(mod, spec.target()))


def schedule(stage: Stage, spec) -> Stage:
    """Every PrimFunc not yet scheduled gets bmvcc's hand schedule or the target's default one."""
    if spec.device == "cuda":
        from . import gpu_build

        mod, kernels = gpu_build.schedule_kernels(stage.mod, stage.kernels, spec)
        calls = gpu_build.kernel_calls(mod)  # before DLight, which keeps the names
        return replace(stage, mod=gpu_build.schedule_rest(mod, spec), kernels=kernels, calls=calls)
    from .schedules.cpu_default import schedule_fused

    return replace(stage, mod=schedule_fused(stage.mod, spec.target()))


def package(stage: Stage, spec, path: Path, progress: Callable[[str], None] = lambda msg: None) -> None:
    """A `schedule`d stage compiled and exported to `path` (GPU: with the device files beside it). Run
    inside pass_context(spec)."""
    import tvm

    if spec.device == "cpu":
        progress("tvm.compile")
        executable = tvm.compile(stage.mod, target=spec.target())
        progress(f"exporting {path.name}")
        executable.export_library(str(path), **link(spec))
        return
    from . import gpu_build
    from .targets import cuda_export

    progress("tvm.compile")
    mod, calls = gpu_build.lower(stage.mod, spec, stage.calls)
    launches, definitions = gpu_build.device_launches(mod, stage.definitions, calls, spec)
    executable = tvm.compile(mod, target=spec.target(), relax_pipeline=None)
    progress(f"compiling device code for {spec.facts['arch']} (NVRTC, ptxas)")
    source, cubin = cuda_export.compile_device(executable, spec.facts["arch"])
    progress(f"exporting {path.name}")
    executable.export_library(str(path), fpack_imports=cuda_export.pack_imports(source, cubin.data), **link(spec))
    gpu_build.write_device_files(path.parent, cubin, stage.kernels, calls, launches, definitions)


def link(spec) -> dict:
    """export_library arguments linking for spec's CPU (targets/cross.py when cross-compiling)."""
    if spec.cross_compiler is None:
        return {}
    from .targets import cross

    return {"fcompile": cross.fcompile(spec.cross_compiler)}
