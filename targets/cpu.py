"""CPU targets: this machine (features detected by LLVM) and generic aarch64 with dot products."""

from __future__ import annotations

import os
import platform

from .base import TargetSpec


def host() -> TargetSpec:
    """The CPU bmvcc runs on, with every feature LLVM detects (AVX2, AVX-512 VNNI, ...)."""
    cores = len(os.sched_getaffinity(0))
    return TargetSpec(
        name="host",
        description=f"this machine: {cores} cores, the CPU and its features as LLVM detects them",
        make_tvm_target=lambda: {"kind": "llvm", "mcpu": _llvm_cpu(), "num-cores": cores},
        arch=platform.machine(),
        facts={"cores": cores},
    )


def _llvm_cpu() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


AARCH64 = TargetSpec(
    name="aarch64",
    description="generic Armv8.2-A Linux CPU with the dot-product extension (sdot)",
    make_tvm_target=lambda: {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+dotprod"]},
    arch="aarch64",
    cross_compiler="aarch64",
)
