"""CPU targets: this machine (features detected by LLVM) and generic aarch64 with dot products."""

from __future__ import annotations

import os
import platform

from .base import TargetSpec


def host(mcpu: str | None = None) -> TargetSpec:
    """The CPU bmvcc runs on, with every feature LLVM detects (AVX2, AVX-512 VNNI, ...) that it runs; with `mcpu`
    (an LLVM CPU name, Python API only), this machine's cores with the code of that CPU, e.g. "znver3" for the AVX2
    kernels of an AVX2-only CPU on an AVX-512 one (its features must be ones this CPU has)."""
    cores = len(os.sched_getaffinity(0))
    cpu = "the CPU and its features as LLVM detects them" if mcpu is None else f"code for LLVM CPU {mcpu}"
    chosen = None if mcpu is None else _host_target(cores, mcpu)  # a CPU this machine cannot run: refused now
    return TargetSpec(
        name="host",
        description=f"this machine: {cores} cores, {cpu}",
        make_tvm_target=lambda: chosen or _host_target(cores, mcpu),
        arch=platform.machine(),
        facts={"cores": cores},
    )


def _host_target(cores: int, mcpu: str | None, cpu_flags: frozenset[str] | None = None) -> dict:
    """This machine's CPU with the features (targets/isa.py) its name claims but the CPU (`cpu_flags`, by default
    /proc/cpuinfo's) lacks turned off (a virtual machine may hide some behind a CPU model that has them), and AMX only
    where it runs; an explicit `mcpu` must be one this machine runs (else BmvccError)."""
    from ..errors import BmvccError
    from ..runtime import missing_cpu_features
    from .isa import record

    if mcpu is not None:
        _check_llvm_knows(mcpu)
    target = {"kind": "llvm", "mcpu": mcpu or _llvm_cpu(), "num-cores": cores}
    flags = _cpuinfo_flags() if cpu_flags is None else cpu_flags
    hidden = missing_cpu_features({"isa": record(target, platform.machine())}, flags)
    if mcpu is not None and hidden:
        raise BmvccError(f"LLVM CPU {mcpu} has {', '.join(hidden)}, which this CPU lacks; name a CPU this machine runs")
    mattr = [f"-{f}" for f in hidden] + (AMX_OFF if _has_amx(target) and not machine_runs_amx(flags) else [])
    return {**target, "mattr": mattr} if mattr else target


def _check_llvm_knows(mcpu: str) -> None:
    from tvm.target import codegen

    from ..errors import BmvccError

    triple = codegen.llvm_get_system_triple()
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise BmvccError(f"'{mcpu}' is not an LLVM CPU of this machine ({triple}); name one of its architecture")


def _llvm_cpu() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


# Intel AMX: LLVM's features -> Linux's /proc/cpuinfo flags. LLVM's CPU name (sapphirerapids) claims them
# even where a virtual machine hides them or Linux refuses this process the tile state (XTILEDATA): the host
# target then turns them off, so that the W2A8 kernels pick their next backend (schedules/w2a8_cpu.py).
AMX_FLAGS = {"amx-tile": "amx_tile", "amx-int8": "amx_int8"}
AMX_OFF = [f"-{feature}" for feature in AMX_FLAGS]


def _has_amx(target: dict) -> bool:
    import tvm
    from tvm.target import codegen

    return all(codegen.target_has_features(f, tvm.target.Target(target)) for f in AMX_FLAGS)


def machine_runs_amx(cpu_flags: frozenset[str] | None = None) -> bool:
    """Whether this process runs AMX: the CPU reports AMX_FLAGS (`cpu_flags`, by default /proc/cpuinfo's) and
    Linux grants the tile state (requested here as the AMX kernels request it)."""
    cpu_flags = _cpuinfo_flags() if cpu_flags is None else cpu_flags
    if cpu_flags is None or not set(AMX_FLAGS.values()) <= cpu_flags:
        return False
    return _xtiledata_granted()


def _cpuinfo_flags() -> frozenset[str] | None:
    """The CPU flags Linux reports in /proc/cpuinfo; None where there is no such file (not Linux)."""
    from ..runtime import cpuinfo_flags  # imported here: `bmvcc targets` does not need numpy

    return cpuinfo_flags()


def _xtiledata_granted() -> bool:
    """arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), the very request of the AMX kernels (schedules/amx.py): idempotent
    and process-wide, so a grant here is the kernels' grant. Refused by a kernel before 5.16 or without AMX, a
    seccomp filter, or a thread's signal stack too small for the tile state (ENOSPC)."""
    import ctypes

    from ..schedules import amx

    if platform.machine() != "x86_64":
        return False
    request = (amx.SYS_ARCH_PRCTL, amx.ARCH_REQ_XCOMP_PERM, amx.XFEATURE_XTILEDATA)
    return ctypes.CDLL(None).syscall(*(ctypes.c_long(v) for v in request)) == 0


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
