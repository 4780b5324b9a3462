"""TVM build of a Relax module for a TargetSpec, and export of the runtime module."""

from __future__ import annotations

from pathlib import Path


def build(mod, spec, path: Path) -> None:
    import tvm

    from .schedules.cpu_default import schedule_cpu_module

    target = spec.target()
    if spec.device == "cpu":
        mod = schedule_cpu_module(mod, target)
    executable = tvm.compile(mod, target=target)
    executable.export_library(str(path))
