"""`bmvcc report OUTDIR` for a GPU build: per kernel, work, global-memory traffic, resources, SASS mix
and a roofline ESTIMATE of its time on the target; then the model total (also an estimate).

Per kernel and call:
- W2A8 (int8 tensor cores): MACs = M x N x K of the padded GEMM, traffic and time from
  `w2a8_roofline` (int8 dense peak vs DRAM bandwidth);
- every other kernel: MACs = TVM's static op count / 2 (tvm.s_tir.analysis.estimate_tir_flops at
  build time), traffic = each tensor argument read or written once at its dtype's size (fp16 operands
  of passes/fp16_matmuls.py: 2 bytes), time = max(2 x MACs / peak, bytes / DRAM bandwidth); the peak
  is the fp16 tensor-core one for a kernel whose SASS has HMMA (DLight's wmma schedule), else the
  fp32 CUDA-core one (also for fp16 loads: DLight's other schedules compute in fp32).
Registers and shared memory are ptxas's; the mix counts SASS instructions in the code (static, not
executed). Launch overheads, L2 reuse and occupancy are not modeled: real times are longer.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import artifact
from .artifact import DEVICE_INFO
from .errors import BmvccError

MIX_SHOWN = ("IMMA", "HMMA", "LDSM", "LDGSTS", "LDG", "STG", "SHFL")
ROOFS = {"int8 tensor cores": "peak_int8_tops", "fp16 tensor cores": "peak_fp16_tflops",
         "fp32 CUDA cores": "peak_fp32_tflops"}  # a kernel's "unit" -> its compute roof's fact (in T ops/s)


def _roofline(ops: float, nbytes: int, peak_ops: float, facts: dict) -> dict:
    compute, memory = ops / peak_ops, nbytes / (facts["dram_bandwidth_gbs"] * 1e9)
    return {"compute_s": compute, "memory_s": memory, "seconds": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}


def w2a8_roofline(cfg, facts: dict) -> dict:
    """Roofline time of one W2A8 GEMM (schedules/w2a8.py's W2A8Config) on a GPU with `facts` (targets/): the
    larger of int8 tensor-core time at dense peak and DRAM time for compulsory traffic (q, packed weights,
    x_scale, fp32 out, and the fp32 residual or bias its epilogue reads). The GELU epilogue's ~25 fp32
    instructions per output are not counted (on Orin they take less time than that output's 4 bytes of DRAM
    traffic)."""
    from .schedules.w2a8 import epilogue_operand

    ops = 2 * cfg.m * cfg.n * cfg.k
    mn_tensors = 2 if cfg.epilogue == "residual" else 1  # out (and the residual)
    bias = 4 * cfg.n if epilogue_operand(cfg.epilogue) == "bias" else 0
    nbytes = cfg.m * cfg.k + cfg.n * cfg.k_packed + 4 * cfg.m + 4 * cfg.m * cfg.n * mn_tensors + bias
    return {"ops": ops, "bytes": nbytes, **_roofline(ops, nbytes, facts["peak_int8_tops"] * 1e12, facts)}


def report(outdir: Path) -> dict:
    from . import device_summary
    from .targets import get

    outdir = Path(outdir)
    summary = device_summary.summary(outdir)  # checks that OUTDIR is a GPU artifact, its files as compiled
    from .schedules.w2a8 import W2A8Config  # imports TVM: after the check

    info = json.loads((outdir / DEVICE_INFO).read_text())
    meta = artifact.read_metadata(outdir)
    spec = get(meta["target"]["name"])
    facts = spec.facts
    if "dram_bandwidth_gbs" not in facts:
        raise BmvccError(f"target '{spec.name}' has no performance facts for a roofline; "
                         "report a build for a board target such as jetson-orin-nano")
    rows = []
    for name, call in info["calls"].items():
        kernel = summary["kernels"].get(f"{name}_kernel", {})
        bmvcc = info["bmvcc_kernels"].get(name, {})
        if bmvcc.get("kernel") == "w2a8":
            cfg = W2A8Config(**bmvcc["padded"])  # the work the kernel does
            m = w2a8_roofline(cfg, facts)
            macs, nbytes, read, written = cfg.m * cfg.n * cfg.k, m["bytes"], None, None
            model = {k: m[k] for k in ("compute_s", "memory_s", "seconds", "bound")}
            unit = "int8 tensor cores"
        else:
            macs = None if call["ops"] is None else int(call["ops"] // 2)
            read, written = call["bytes_read"], call["bytes_written"]
            nbytes = read + written
            tensor_cores = kernel.get("sass_mix", {}).get("HMMA", 0) > 0
            peak = facts["peak_fp16_tflops" if tensor_cores else "peak_fp32_tflops"]
            model = _roofline(2 * (macs or 0), nbytes, peak * 1e12, facts)
            unit = "fp16 tensor cores" if tensor_cores else "fp32 CUDA cores"
        rows.append({"kernel": name, "calls": call["calls"], "unit": unit, "macs": macs,
                     "bytes": nbytes, "bytes_read": read if read is not None else call["bytes_read"],
                     "bytes_written": written if written is not None else call["bytes_written"],
                     "registers": (kernel.get("resources") or {}).get("registers"),
                     "shared_bytes": (kernel.get("resources") or {}).get("shared_bytes"),
                     "sass_mix": kernel.get("sass_mix", {}),
                     "estimate": {**model, "total_s": model["seconds"] * call["calls"]}})
    rows.sort(key=lambda r: -r["estimate"]["total_s"])
    total = sum(r["estimate"]["total_s"] for r in rows)
    return {"source": meta["source"]["name"], "batch": meta["input"]["shape"][0],
            "target": spec.name, "facts": {k: facts[k] for k in ("sms", "gpu_clock_mhz", "dram_bandwidth_gbs",
                                                                    "peak_int8_tops", "peak_fp16_tflops",
                                                                    "peak_fp32_tflops")},
            "kernels": rows, "total_macs": sum((r["macs"] or 0) * r["calls"] for r in rows),
            "estimated_total_s": total,
            "note": "roofline estimate: max of compute at peak and compulsory DRAM traffic; no launch "
                    "overhead, L2 reuse or occupancy; instruction mix is static SASS counts"}


def format_text(r: dict) -> str:
    f = r["facts"]
    lines = [f"{r['target']}: {f['sms']} SMs at {f['gpu_clock_mhz']} MHz, {f['dram_bandwidth_gbs']} GB/s, "
             f"{f['peak_int8_tops']:.1f} int8 TOPS dense, {f['peak_fp16_tflops']:.1f} fp16 TFLOPS dense, "
             f"{f['peak_fp32_tflops']:.2f} fp32 TFLOPS",
             f"{'kernel':<44} {'calls':>5} {'MACs/call':>13} {'bytes/call':>11} {'regs':>4} {'smem':>6} "
             f"{'est. us/call':>12} {'bound':>7}  SASS mix (static)"]
    for k in r["kernels"]:
        mix = " ".join(f"{n}:{c}" for n, c in k["sass_mix"].items() if n in MIX_SHOWN)
        macs = f"{k['macs']:,}" if k["macs"] is not None else "?"
        lines.append(f"{k['kernel'][:44]:<44} {k['calls']:>5} {macs:>13} {k['bytes']:>11,} "
                     f"{k['registers'] if k['registers'] is not None else '?':>4} "
                     f"{k['shared_bytes'] if k['shared_bytes'] is not None else '?':>6} "
                     f"{k['estimate']['seconds'] * 1e6:>12.2f} {k['estimate']['bound']:>7}  {mix}")
    lines.append(f"model total: {r['total_macs'] / 1e6:,.1f} MMAC, estimated {r['estimated_total_s'] * 1e3:.3f} ms "
                 f"({r['note']})")
    return "\n".join(lines)


def plot(r: dict, path: Path):
    """Writes report `r` as a roofline chart beside a bar of where the time goes (bmvcc/roofline_plot.py);
    returns the matplotlib Figure."""
    from .roofline_plot import plot_roofline

    f = r["facts"]
    kernels = [{"name": k["kernel"], "calls": k["calls"], "ops": 2 * k["macs"] if k["macs"] is not None else None,
                "bytes": k["bytes"], "seconds": k["estimate"]["seconds"], "unit": k["unit"]} for k in r["kernels"]]
    roofs = {"compute": {unit: f[fact] * 1e12 for unit, fact in ROOFS.items()},
             "memory": {"DRAM": f["dram_bandwidth_gbs"] * 1e9}}
    title = (f"{r['source']} (batch {r['batch']}) on {r['target']}: estimated times (roofline model, "
             "no launch overhead or cache reuse)")
    return plot_roofline(kernels, roofs, title, path)
