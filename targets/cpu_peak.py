"""Peak arithmetic rates of CPU families from their vector units: what `bmvcc bench --profile` and
benchmarks/bench_model_cpu.py compare achieved speeds against.

Per core and cycle: int8 multiply-accumulates of the widest int8 dot-product instruction
(vpdpbusd with AVX-512 VNNI, vpmaddubsw+vpmaddwd on AVX2, sdot on Arm) and float32 FMAs, each at
the sustained issue rate of the core's vector pipes. AMX tiles are not counted: bmvcc does not use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# LLVM CPU name -> (int8 MACs, fp32 FMAs) per cycle per core.
FAMILIES = {
    # Zen 4: AVX-512 on two 256-bit FMA pipes, one 512-bit vpdpbusd (64 MACs) per cycle.
    "znver4": (64, 16),
    # Zen 5, Ice Lake .. Granite Rapids servers: two 512-bit FMA pipes, two 512-bit vpdpbusd per cycle.
    "znver5": (128, 32), "icelake-server": (128, 32), "cascadelake": (128, 32), "cooperlake": (128, 32),
    "sapphirerapids": (128, 32), "emeraldrapids": (128, 32), "graniterapids": (128, 32),
    # Skylake-SP: two 512-bit pipes, no VNNI (vpmaddubsw + vpmaddwd + vpaddd per 64 MACs, two a cycle).
    "skylake-avx512": (64, 32),
    # AVX2: two 256-bit FMA pipes; int8 through vpmaddubsw + vpmaddwd + vpaddd, about 32 MACs a cycle.
    "znver2": (32, 16), "znver3": (32, 16), "haswell": (32, 16), "skylake": (32, 16), "alderlake": (32, 16),
    # Armv8.2 cores with two 128-bit NEON pipes: two sdot (16 MACs each) or two 4-lane FMAs a cycle.
    "cortex-a78": (32, 8), "cortex-a76": (32, 8), "neoverse-n1": (32, 8),
}


@dataclass(frozen=True)
class CpuPeak:
    family: str
    int8_macs_per_cycle: int  # per core
    fp32_fmas_per_cycle: int  # per core
    ghz: float
    cores: int

    def int8_ops_per_s(self) -> float:  # one MAC = two operations
        return 2 * self.int8_macs_per_cycle * self.cores * self.ghz * 1e9

    def fp32_ops_per_s(self) -> float:
        return 2 * self.fp32_fmas_per_cycle * self.cores * self.ghz * 1e9

    def bound_ms(self, int8_macs: float, fp32_macs: float) -> float:
        """Time for these MACs at the int8 and fp32 peaks, one after the other (they share the vector pipes)."""
        return 1e3 * (2 * int8_macs / self.int8_ops_per_s() + 2 * fp32_macs / self.fp32_ops_per_s())

    def describe(self) -> str:
        return (f"{self.family}, {self.cores} cores at {self.ghz:.2f} GHz: int8 {self.int8_ops_per_s() / 1e9:.0f} GOP/s "
                f"({self.int8_macs_per_cycle} MAC/cycle/core), fp32 {self.fp32_ops_per_s() / 1e9:.0f} GFLOP/s "
                f"({self.fp32_fmas_per_cycle} FMA/cycle/core)")


def host_peak(mcpu: str, cores: int) -> CpuPeak | None:
    """The peak of this machine (LLVM's CPU name, clock from /proc/cpuinfo); None for a CPU not in FAMILIES."""
    if mcpu not in FAMILIES:
        return None
    return CpuPeak(mcpu, *FAMILIES[mcpu], ghz=_host_ghz(), cores=cores)


def _host_ghz() -> float:
    """The highest 'cpu MHz' in /proc/cpuinfo (the clock the kernel reports; under a hypervisor, the nominal one)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    return max(mhz) / 1e3 if mhz else 0.0
