"""TVM build of a Relax module for a TargetSpec, and export of the runtime module."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def build(mod, spec, path: Path, progress: Callable[[str], None] = lambda msg: None) -> None:
    import tvm

    from .schedules.cpu_default import schedule_cpu_module

    target = spec.target()
    if spec.device == "cpu":
        progress("scheduling (legalize, fuse, default CPU schedules)")
        mod = schedule_cpu_module(mod, target)
    progress("tvm.compile")
    executable = tvm.compile(mod, target=target)
    progress(f"exporting {path.name}")
    executable.export_library(str(path))
