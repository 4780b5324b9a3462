"""TVM build of a Relax module for a TargetSpec, and export of the runtime module: bmvcc/lowering.py's
stages (fuse, [tuning database], schedule, package), each run once."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def build(mod, spec, path: Path, progress: Callable[[str], None] = lambda msg: None,
          db: Path | None = None, dump=lambda name, mod: None) -> int:
    """Writes the .so to `path` (GPU: and the device files beside it, bmvcc/artifact.py's DEVICE_*).
    Returns how many kernels came from the tuning database `db` (bmvcc tune), 0 without one.
    `dump(name, mod)` (bmvcc/irdump.py) sees the module after each stage."""
    from dataclasses import replace

    from . import lowering

    from_db = 0
    with lowering.pass_context(spec):
        progress("legalizing and fusing" + (" (W2A8 calls on the tensor-core kernel's tiles)" if spec.device == "cuda" else ""))
        stage = lowering.fuse(mod, spec)
        dump("fuse", stage.mod)
        if db is not None:  # tuned PrimFuncs are marked tirx.is_scheduled: the default schedules skip them
            from .tunedb import apply_database

            progress(f"applying tuning database {db}")
            applied, from_db = apply_database(stage.mod, spec, db, progress=progress)
            stage = replace(stage, mod=applied)
            dump("apply_database", stage.mod)
        progress("scheduling (bmvcc kernels; DLight for the rest)" if spec.device == "cuda"
                 else "scheduling (bmvcc kernels; default CPU schedules for the rest)")
        stage = lowering.schedule(stage, spec)
        dump("schedule", stage.mod)
        lowering.package(stage, spec, path, progress)
    return from_db
