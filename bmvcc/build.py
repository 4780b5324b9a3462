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
    if db is not None:  # tuned PrimFuncs are marked tirx.is_scheduled: the default schedules skip them
        from .tunedb import apply_database

        progress(f"applying tuning database {db}")
        mod, from_db = apply_database(mod, spec, db)
    if spec.device == "cpu":
        progress("scheduling (legalize, fuse, default CPU schedules)")
        mod = schedule_cpu_module(mod, target)
    else:  # the W2A8 CUDA kernel exists (schedules/w2a8_cuda.py); GPU scheduling of the whole model does not yet
        from .errors import BmvccError

        raise BmvccError(f"target '{spec.name}' runs on {spec.device}, and whole-model {spec.device} builds are "
                         "not available yet; compile for 'host' or 'aarch64'")
    progress("tvm.compile")
    executable = tvm.compile(mod, target=target)
    progress(f"exporting {path.name}")
    executable.export_library(str(path))
    return from_db
