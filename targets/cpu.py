"""CPU targets: this machine (features detected by LLVM) and generic aarch64 with dot products."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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


CPUINFO_BF16_FLAG = "avx512_bf16"  # Linux's name of the feature in /proc/cpuinfo


def has_bf16_dot(target) -> bool:
    """Whether the TVM llvm `target`'s CPU has vdpbf16ps (from its features, as LLVM knows them)."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features(BF16_DOT_FEATURE, target))


def host_runs_bf16_dot(target, cpu_flags: frozenset[str] | None = None) -> bool:
    """Whether this machine runs vdpbf16ps for the host `target`. That target carries only LLVM's CPU name,
    whose features a virtual machine may hide (a Zen 4 or Sapphire Rapids model without AVX-512 BF16 would
    SIGILL), so the running CPU must report the flag too: `cpu_flags`, by default /proc/cpuinfo's (where
    there is none, not Linux, the name decides)."""
    if cpu_flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return has_bf16_dot(target)
        cpu_flags = frozenset(w for line in text.splitlines() if line.startswith("flags") for w in line.split())
    return CPUINFO_BF16_FLAG in cpu_flags and has_bf16_dot(target)
