"""TVM build of a Relax module for a TargetSpec, and export of the runtime module."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def build(mod, spec, path: Path, progress: Callable[[str], None] = lambda msg: None,
          db: Path | None = None) -> int:
    """Returns how many kernels came from the tuning database `db` (bmvcc tune), 0 without one."""
    import tvm

    from .schedules.cpu_default import schedule_cpu_module

    target = spec.target()
    from_db = 0
    if db is not None and spec.device == "cpu":  # tuned PrimFuncs are marked tirx.is_scheduled: the default schedules skip them
        from .tunedb import apply_database

        progress(f"applying tuning database {db}")
        mod, from_db = apply_database(mod, spec, db, progress=progress)
    if spec.device == "cpu":
        progress("scheduling (legalize, fuse, default CPU schedules)")
        mod = schedule_cpu_module(mod, target)
        progress("tvm.compile")
        executable = tvm.compile(mod, target=target)
        progress(f"exporting {path.name}")
        executable.export_library(str(path), **_link(spec))
    else:
        from_db = _build_cuda(mod, spec, path, progress, db)
    return from_db


def _link(spec) -> dict:
    """export_library arguments linking for spec's CPU (targets/cross.py when cross-compiling)."""
    if spec.cross_compiler is None:
        return {}
    from .targets import cross

    return {"fcompile": cross.fcompile(spec.cross_compiler)}


def _build_cuda(mod, spec, path: Path, progress, db: Path | None) -> int:
    """GPU build (bmvcc/gpu_build.py): writes the .so with the cubin embedded, and next to it
    gpu_build.DEVICE_BINARY (the same cubin bytes), DEVICE_INFO (kernels, ptxas resources, launches), DEVICE_PTX
    and DEVICE_DEFINITIONS (what bmvcc verify emulates and checks against).
    Returns how many kernels came from the tuning database `db`."""
    import tvm

    from . import gpu_build

    from_db = 0
    with tvm.transform.PassContext(config=gpu_build.PASS_CONFIG):
        progress("legalizing and fusing (W2A8 calls on the tensor-core kernel's tiles)")
        mod, kernels = gpu_build.fuse(mod, spec)
        definitions = mod  # unscheduled: the compute definitions bmvcc verify checks the kernels against
        if db is not None:  # tuned PrimFuncs are marked tirx.is_scheduled: the hand schedules and DLight skip them
            from .tunedb import apply_to_fused

            progress(f"applying tuning database {db}")
            mod, from_db = apply_to_fused(mod, spec, db, progress=progress)
        progress("scheduling (W2A8 tensor-core and norm_quant kernels; DLight for the rest)")
        mod, kernels = gpu_build.schedule_kernels(mod, kernels)
        progress("tvm.compile")
        mod, calls = gpu_build.lower(mod, spec)
        launches, definitions = gpu_build.device_launches(mod, definitions, calls, spec)
        executable = tvm.compile(mod, target=spec.target(), relax_pipeline=None)
    progress(f"compiling device code for {spec.facts['arch']} (NVRTC, ptxas)")
    source, cubin = gpu_build.compile_device(executable, spec.facts["arch"])
    progress(f"exporting {path.name}")
    executable.export_library(str(path), fpack_imports=gpu_build.pack_imports(source, cubin.data), **_link(spec))
    gpu_build.write_device_files(path.parent, cubin, kernels, calls, launches, definitions)
    return from_db
