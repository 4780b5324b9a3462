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


# AVX-512 BF16 (Cooper Lake, Sapphire Rapids and later Xeons, Zen 4 and later): vdpbf16ps multiplies
# pairs of bf16 and adds both products to one fp32 lane, 16 lanes a 512-bit register.
BF16_DOT_FEATURE = "avx512bf16"


def has_bf16_dot(target) -> bool:
    """Whether the TVM llvm `target`'s CPU has vdpbf16ps (from its features, as LLVM knows them)."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features(BF16_DOT_FEATURE, target))
