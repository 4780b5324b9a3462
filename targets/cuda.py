"""Generic NVIDIA Ampere targets (sm_80, sm_86, sm_87) and the per-architecture limits schedules use.

Limits are from the CUDA C++ Programming Guide, "Features and Technical Specifications", table
"Technical Specifications per Compute Capability" (compute capabilities 8.0, 8.6, 8.7). Shared memory
above 48 KB per block must be requested at launch (dynamic shared memory, opt-in); static
`__shared__` arrays are capped at 48 KB by ptxas. The allocation units (registers per warp in units of 256,
shared memory in units of 128 bytes plus 1 KB the system reserves per block on 8.x) are the Guide's
"Compute Capability 8.x" section and the CUDA Occupancy Calculator's; 4 warp schedulers per SM, each issuing
one warp instruction per clock, are the Ampere whitepapers' (GA100, GA10x).
"""

from __future__ import annotations

from .base import TargetSpec
from .cpu import AARCH64, host

SM_LIMITS = {
    # arch: (opt-in shared bytes per block, shared bytes per SM, max threads per SM, max resident blocks per SM)
    "sm_80": (163 * 1024, 164 * 1024, 2048, 32),
    "sm_86": (99 * 1024, 100 * 1024, 1536, 16),
    "sm_87": (163 * 1024, 164 * 1024, 1536, 16),
}
STATIC_SHARED_BYTES = 48 * 1024  # per block without opt-in (all three archs)
REGISTERS_PER_SM = 64 * 1024  # 32-bit registers per SM and per block (all three archs)
MAX_REGISTERS_PER_THREAD = 255
REGISTER_UNIT_PER_WARP = 256  # registers are allocated per warp in units of 256 (all three archs)
SHARED_UNIT_BYTES = 128  # shared memory is allocated per block in units of 128 bytes,
SHARED_RESERVED_PER_BLOCK = 1024  # plus 1 KB the system reserves per block (all three archs)
WARP_SCHEDULERS_PER_SM = 4  # each issues one warp instruction per clock (all three archs)


def limits(arch: str) -> dict:
    """The facts of SM_LIMITS and the common limits for `arch`, as a TargetSpec.facts fragment."""
    smem_block, smem_sm, threads_sm, blocks_sm = SM_LIMITS[arch]
    return {"arch": arch, "max_shared_bytes_per_block": smem_block, "shared_bytes_per_sm": smem_sm,
            "static_shared_bytes": STATIC_SHARED_BYTES, "max_threads_per_sm": threads_sm,
            "max_blocks_per_sm": blocks_sm, "registers_per_sm": REGISTERS_PER_SM,
            "max_registers_per_thread": MAX_REGISTERS_PER_THREAD, "register_unit_per_warp": REGISTER_UNIT_PER_WARP,
            "shared_unit_bytes": SHARED_UNIT_BYTES, "shared_reserved_per_block": SHARED_RESERVED_PER_BLOCK,
            "warp_schedulers_per_sm": WARP_SCHEDULERS_PER_SM, "warp_size": 32}


def cuda_tvm_target(arch: str, host_target: dict) -> dict:
    """TVM cuda Target (dict form) with the real shared-memory limit; TVM's tags cap it at 48 KB."""
    smem_block = SM_LIMITS[arch][0]
    return {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": smem_block, "max_threads_per_block": 1024,
            "max_num_threads": 1024, "thread_warp_size": 32, "registers_per_block": REGISTERS_PER_SM,
            "host": host_target}


def generic(arch: str, aarch64_host: bool = False) -> TargetSpec:
    """Any GPU of `arch`; the host is this machine, or generic aarch64 Linux for embedded boards."""
    host_spec = AARCH64 if aarch64_host else host()
    return TargetSpec(
        name=f"cuda-{arch.replace('_', '')}",
        description=f"NVIDIA GPU {arch} (CUDA 12), host {host_spec.name}",
        make_tvm_target=lambda: cuda_tvm_target(arch, host_spec.tvm_target),
        arch=host_spec.arch,
        device="cuda",
        cross_compiler=host_spec.cross_compiler,
        facts=limits(arch),
    )


def cuda_sm80() -> TargetSpec:
    return generic("sm_80")


def cuda_sm86() -> TargetSpec:
    return generic("sm_86")


def cuda_sm87() -> TargetSpec:
    # sm_87 exists only in Jetson Orin modules, whose host is aarch64
    return generic("sm_87", aarch64_host=True)
