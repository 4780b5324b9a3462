"""NVIDIA Jetson Orin Nano targets: sm_87 GPU and 6-core Cortex-A78AE host (Armv8.2-A with dot product).

TVM's built-in tag `nvidia/jetson-orin-nano` names the wrong host CPU (carmel, the Xavier core) and caps
shared memory at 48 KB per block; these specs fix both.

Sources of the facts below:
[DS]  NVIDIA Jetson Orin Nano Series Data Sheet: GPU cores, tensor cores, max GPU clock, memory bus and
      bandwidth, CPU cores and clock, "AI performance" in sparse INT8 TOPS.
[SUP] NVIDIA Jetson Orin Nano Super Developer Kit (JetPack 6.2 "Super" power modes, Dec 2024): GPU
      1020 MHz, memory 102 GB/s (8 GB) / 51 GB/s (4 GB), CPU 1.7 GHz, 67 TOPS sparse INT8 (8 GB).
[AMP] NVIDIA Ampere GA10x architecture whitepaper: 128 CUDA cores and 4 third-generation tensor cores
      per SM. Orin's tensor cores run 512 dense INT8 and 256 dense FP16 FMA per clock each: with 4 per
      SM at 625 MHz that is 8 SM x 4 x 512 x 2 ops x 625 MHz = 20.5 dense INT8 TOPS, half of [DS]'s
      40 sparse TOPS (2:4 sparsity doubles it), which cross-checks the per-clock rate.
[CG]  CUDA C++ Programming Guide, compute capability 8.7 limits (targets/cuda.py).
[L2]  2 MB GPU L2: the project's hardware facts (issue 7), not in [DS]'s tables; check on a device with
      cudaDeviceProp.l2CacheSize.
[BW]  Achievable DRAM bandwidth, an assumption of bmvcc report's estimate: 75% of [DS]'s peak, the middle of the
      70-80% that streaming copy kernels reach on GPUs with (LP)DDR memory (refresh, read/write turnaround and
      bank conflicts cost the rest); replace with a copy kernel's bandwidth measured on the device.
[LCH] Host overhead per kernel launch, an assumption of bmvcc report's estimate: 8 us, inside the 5-10 us
      that kernel launches without CUDA graphs take on Jetson modules (the CUDA driver's launch path on a
      1.5 GHz Cortex-A78AE plus the Relax VM's call of the kernel's packed function). In the CUDA graph
      (bmvcc/gpu_build.py): a graph launch costs what a kernel launch does (the VM's run_or_capture, one
      cudaGraphLaunch), each kernel in it 1 us, the GPU launching the graph's kernels back to back without the host
      (the saving NVIDIA's "Getting Started with CUDA Graphs" blog, 2019, shows). Replace all three with an nsys
      trace of the model on the device (the gaps between back-to-back kernels).
"""

from __future__ import annotations

from .base import TargetSpec
from .cuda import cuda_tvm_target, limits

ORIN_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae", "mattr": ["+dotprod"],
             "num-cores": 6}
INT8_DENSE_OPS_PER_SM_CLOCK = 4 * 512 * 2  # [AMP]: 4 tensor cores x 512 INT8 FMA x 2 ops
FP16_DENSE_FLOPS_PER_SM_CLOCK = 4 * 256 * 2  # [AMP]
FP32_FLOPS_PER_SM_CLOCK = 128 * 2  # [AMP]: 128 CUDA cores x 1 FP32 FMA x 2 ops
DRAM_EFFICIENCY = 0.75  # [BW]
LAUNCH_US = 8.0  # [LCH] per kernel launch from the host, and per CUDA graph launch
GRAPH_KERNEL_US = 1.0  # [LCH] per kernel inside a CUDA graph


def _orin_nano(name: str, description: str, sms: int, gpu_mhz: int, bandwidth_gbs: float, cpu_mhz: int,
               memory_gb: int) -> TargetSpec:
    facts = limits("sm_87")
    facts.update(
        sms=sms,  # [DS]: 1024 CUDA cores (8 GB) / 512 (4 GB), 128 per SM [AMP]
        gpu_clock_mhz=gpu_mhz,  # [DS] 625 MHz; [SUP] 1020 MHz
        dram_bandwidth_gbs=bandwidth_gbs,  # [DS] LPDDR5 128-bit 68 GB/s, 64-bit 34 GB/s; [SUP] 102 / 51
        l2_bytes=2 * 1024 * 1024,  # [L2]
        peak_int8_tops=sms * INT8_DENSE_OPS_PER_SM_CLOCK * gpu_mhz * 1e6 / 1e12,  # dense, [AMP] x clock
        peak_fp16_tflops=sms * FP16_DENSE_FLOPS_PER_SM_CLOCK * gpu_mhz * 1e6 / 1e12,  # dense
        peak_fp32_tflops=sms * FP32_FLOPS_PER_SM_CLOCK * gpu_mhz * 1e6 / 1e12,  # CUDA cores
        dram_efficiency=DRAM_EFFICIENCY,
        launch_us=LAUNCH_US,
        graph_kernel_us=GRAPH_KERNEL_US,
        cpu="6x Cortex-A78AE (Armv8.2-A, dotprod)",  # [DS]
        cpu_clock_mhz=cpu_mhz,  # [DS] 1.5 GHz; [SUP] 1.7 GHz
        memory_gb=memory_gb,
    )
    return TargetSpec(name=name, description=description, make_tvm_target=lambda: cuda_tvm_target("sm_87", ORIN_HOST),
                      arch="aarch64", device="cuda", cross_compiler="aarch64", facts=facts)


def jetson_orin_nano() -> TargetSpec:
    return _orin_nano("jetson-orin-nano", "Jetson Orin Nano 8GB: sm_87, 8 SMs at 625 MHz, 68 GB/s",
                      sms=8, gpu_mhz=625, bandwidth_gbs=68.0, cpu_mhz=1500, memory_gb=8)


def jetson_orin_nano_4gb() -> TargetSpec:
    return _orin_nano("jetson-orin-nano-4gb", "Jetson Orin Nano 4GB: sm_87, 4 SMs at 625 MHz, 34 GB/s",
                      sms=4, gpu_mhz=625, bandwidth_gbs=34.0, cpu_mhz=1500, memory_gb=4)


def jetson_orin_nano_super() -> TargetSpec:
    return _orin_nano("jetson-orin-nano-super", "Jetson Orin Nano 8GB Super mode: sm_87, 8 SMs at 1020 MHz, 102 GB/s",
                      sms=8, gpu_mhz=1020, bandwidth_gbs=102.0, cpu_mhz=1700, memory_gb=8)
