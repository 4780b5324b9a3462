"""Peak arithmetic rates of CPU families from their vector units: what `bmvcc bench --profile` and
benchmarks/bench_model_cpu.py compare achieved speeds against.

Per core and cycle: int8 multiply-accumulates of the widest int8 dot-product instruction
(vpdpbusd with AVX-512 VNNI, vpmaddubsw on AVX2, sdot on Arm) and float32 FMAs, each at
the sustained issue rate of the core's vector pipes; on a host whose W2A8 kernels run on AMX tiles
(schedules/w2a8_amx.py), the int8 rate is tdpbssd's (AMX_INT8_MACS).
The clock is measured (measured_ghz), not read from /proc/cpuinfo, which under a hypervisor reports the
nominal clock while a busy core runs at its boost clock (kernels then ran above the "peak").
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

# LLVM CPU name -> (int8 MACs, fp32 FMAs) per cycle per core.
FAMILIES = {
    # Zen 4: AVX-512 on two 256-bit FMA pipes, one 512-bit vpdpbusd (64 MACs) per cycle.
    "znver4": (64, 16),
    # Zen 5, Ice Lake .. Granite Rapids servers: two 512-bit FMA pipes, two 512-bit vpdpbusd per cycle.
    "znver5": (128, 32), "icelake-server": (128, 32), "cascadelake": (128, 32), "cooperlake": (128, 32),
    "sapphirerapids": (128, 32), "emeraldrapids": (128, 32), "graniterapids": (128, 32),
    # Skylake-SP: two 512-bit FMA pipes, no VNNI: the AVX2 kernel (two 256-bit vpmaddubsw a cycle).
    "skylake-avx512": (64, 32),
    # AVX2: two 256-bit FMA pipes; int8 on vpmaddubsw (32 MACs, int16 sums: bmvcc's avx2_i16 kernel), two a cycle:
    # measured on Zen 4 running AVX2 code (1.99 a cycle), ports 0 and 1 on Skylake and Golden Cove; assumed for Zen 2
    # and 3 (an upper bound: their bound is then no looser). Haswell: one a cycle (port 0 only).
    "znver2": (64, 16), "znver3": (64, 16), "skylake": (64, 16), "alderlake": (64, 16), "haswell": (32, 16),
    # Armv8.2 cores with two 128-bit NEON pipes: two sdot (16 MACs each) or two 4-lane FMAs a cycle.
    "cortex-a78": (32, 8), "cortex-a76": (32, 8), "neoverse-n1": (32, 8),
}


# AMX (Sapphire, Emerald, Granite Rapids): one tdpbssd, 16 x 16 x 64 int8 MACs, per 16 cycles per core. Intel's
# documented throughput (Optimization Reference Manual), not measured here: no machine of this project has AMX.
AMX_INT8_MACS = 1024


@dataclass(frozen=True)
class CpuPeak:
    family: str
    int8_macs_per_cycle: int  # per core
    fp32_fmas_per_cycle: int  # per core
    ghz: float
    cores: int
    clock_measured: bool = False  # ghz from measured_ghz (else given)
    amx: bool = False  # int8_macs_per_cycle is AMX's (else the vector unit's)

    def int8_ops_per_s(self) -> float:  # one MAC = two operations
        return 2 * self.int8_macs_per_cycle * self.cores * self.ghz * 1e9

    def fp32_ops_per_s(self) -> float:
        return 2 * self.fp32_fmas_per_cycle * self.cores * self.ghz * 1e9

    def bf16_ops_per_s(self) -> float:
        """vdpbf16ps (AVX-512 BF16): two bf16 products per fp32 lane at the 512-bit FMA's issue rate. Measured on
        Zen 4 (a throughput loop of each: the same rate); assumed, not verified, for Zen 5 and the Xeons with it
        (Cooper Lake, Sapphire, Emerald and Granite Rapids). The families without it run no bf16 build."""
        return 2 * self.fp32_ops_per_s()

    def bound_ms(self, int8_macs: float, fp32_macs: float) -> float:
        """Time for these MACs at the int8 and fp32 peaks, one after the other (they share the vector pipes)."""
        return 1e3 * (2 * int8_macs / self.int8_ops_per_s() + 2 * fp32_macs / self.fp32_ops_per_s())

    def describe(self) -> str:
        clock = " (measured)" if self.clock_measured else ""
        return (f"{self.family}, {self.cores} cores at {self.ghz:.2f} GHz{clock}: int8 {self.int8_ops_per_s() / 1e9:.0f} GOP/s "
                f"({self.int8_macs_per_cycle} MAC/cycle/core{', AMX' if self.amx else ''}), "
                f"fp32 {self.fp32_ops_per_s() / 1e9:.0f} GFLOP/s "
                f"({self.fp32_fmas_per_cycle} FMA/cycle/core)")


def host_peak(cores: int, mcpu: str | None = None, amx: bool = False) -> CpuPeak | None:
    """The peak of this machine on `cores` cores (`mcpu`: LLVM's CPU name, this machine's by default; `amx`:
    whether the W2A8 kernels run on AMX, the caller's to know from its target; clock measured); None for a CPU
    not in FAMILIES or a clock that could not be measured."""
    if mcpu is None:
        from tvm.target import codegen

        mcpu = str(codegen.llvm_get_system_cpu())
    if mcpu not in FAMILIES:
        return None
    ghz = measured_ghz()
    int8, fp32 = FAMILIES[mcpu]
    return None if ghz is None else CpuPeak(mcpu, AMX_INT8_MACS if amx else int8, fp32, ghz=ghz, cores=cores,
                                            clock_measured=True, amx=amx)


def target_peak(cores: int, target) -> CpuPeak | None:
    """The peak on `cores` cores of this machine for code built for the TVM llvm `target`: the rates of the CPU it
    was built for (its mcpu; this machine's where it has none), int8 on AMX where its W2A8 kernels use it, at this
    machine's measured clock; None as host_peak."""
    from ..schedules.w2a8_cpu import uses_amx

    mcpu = target.attrs.get("mcpu")
    return host_peak(cores, str(mcpu) if mcpu else None, amx=uses_amx(target))


CHAIN_STEPS = 1 << 21  # iterations of the short run (2 ops each, ~1 ms at 4 GHz); the long run does twice as many
CHAIN_REPEATS = 7
PLAUSIBLE_GHZ = (0.3, 7.0)  # outside: the runs were disturbed (a descheduled short run), not the clock


@functools.cache
def measured_ghz() -> float | None:
    """The clock one busy core sustains, in GHz: a chain of dependent integer adds and xors (one
    cycle each on every x86 and Arm core, and no closed form or reassociation for LLVM to find) run
    for 2 x CHAIN_STEPS and CHAIN_STEPS iterations; the difference of the two times (the call's
    overhead cancels) is 2 x CHAIN_STEPS cycles. Each time is the fastest of CHAIN_REPEATS runs: on a
    shared machine other processes only ever add time. A few ms in all. Tried twice; None if neither
    try gives a plausible clock."""
    import numpy as np
    import tvm

    run = tvm.compile(tvm.IRModule({"main": _dependent_chain()}), target="llvm")["main"]
    state = tvm.runtime.tensor(np.zeros(1, "int32"))

    def seconds(steps: int) -> float:
        start = time.perf_counter()
        run(state, steps)
        return time.perf_counter() - start

    run(state, CHAIN_STEPS)  # warm-up: first touch, the core leaves its idle clock
    for _ in range(2):
        short, long = (min(seconds(steps) for _ in range(CHAIN_REPEATS)) for steps in (CHAIN_STEPS, 2 * CHAIN_STEPS))
        ghz = 2 * CHAIN_STEPS / (long - short) / 1e9 if long > short else 0.0
        if PLAUSIBLE_GHZ[0] < ghz < PLAUSIBLE_GHZ[1]:
            return ghz
    return None


def _dependent_chain():
    from tvm.script import tirx as T

    @T.prim_func
    def chain(state: T.Buffer((1,), "int32"), steps: T.int32):
        x = T.alloc_buffer((1,), "int32", scope="local")
        x[0] = state[0]
        for _ in range(steps):
            x[0] = T.bitwise_xor(x[0] + 0x1E3779B1, 0x5851F42D)  # constants: no add/xor identity folds the pair
        state[0] = x[0]

    return chain
