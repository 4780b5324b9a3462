"""`bmvcc report OUTDIR` for a GPU build: per kernel launched, its work, global-memory traffic, resources,
occupancy, SASS mix and an ESTIMATE of its time on the target; then the model total (an estimate too).

A PrimFunc call's estimate is the largest of three times, plus its kernel launches' overhead:
- tensor cores: 2 x MACs at the dense int8 peak (W2A8: M x N x K of the padded GEMM) or the fp16 one (a kernel
  whose SASS has HMMA, DLight's wmma schedule); none for the others, whose arithmetic is in their issue time;
- issue: per kernel launch, the SASS instructions each warp executes, at one per clock per warp scheduler of an
  SM, the busiest scheduler holding ceil(resident warps / schedulers) warps; the CTAs resident per SM are those
  its registers, shared memory, threads and the block limit allow (ptxas's registers and static shared memory,
  the launch's dynamic shared memory; allocation units and limits from targets/cuda.py), and the grid runs in
  rounds of them on the SM with the most CTAs. The SASS each warp executes comes from the PTX it executes
  (counted by running the kernel's PTX in the emulator: the trip counts are exact there, not readable from the
  SASS), loop by loop x the loop's SASS / PTX size (bmvcc/ptx/issue.py);
- DRAM: compulsory traffic (W2A8: `w2a8_roofline`'s bytes; others: each tensor argument read or written once at
  its dtype's size) at the target's achievable bandwidth, a stated fraction of its peak;
- launch: the target's stated host overhead per kernel launch, or for a kernel in the CUDA graph (bmvcc/gpu_build.py)
  its stated cost inside the graph, the graph's own launch added to the total once per run (targets/jetson.py).
The lower bound is the peak roofline: max(2 x MACs at the peak of the kernel's unit (fp32 CUDA cores without
tensor cores), traffic at the full DRAM bandwidth), no launch cost. Not modeled: dependency and memory-latency
stalls (issue at the peak rate), L2 reuse, launches overlapping kernels: real times can be longer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import artifact
from .artifact import DEVICE_INFO
from .errors import BmvccError

MIX_SHOWN = ("IMMA", "HMMA", "LDSM", "LDGSTS", "LDG", "STG", "SHFL")
ROOFS = {"int8 tensor cores": "peak_int8_tops", "fp16 tensor cores": "peak_fp16_tflops",
         "fp32 CUDA cores": "peak_fp32_tflops"}  # a kernel's "unit" -> its compute roof's fact (in T ops/s)
SAMPLE_CTAS = 8  # CTAs per kernel launch run to count executed instructions (bmvcc/ptx/issue.py)
FACTS_SHOWN = ("sms", "gpu_clock_mhz", "dram_bandwidth_gbs", "peak_int8_tops", "peak_fp16_tflops", "peak_fp32_tflops",
               "warp_schedulers_per_sm", "dram_efficiency", "launch_us", "graph_kernel_us")


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


def occupancy(threads: int, registers: int, shared_bytes: int, facts: dict) -> dict:
    """CTAs of `threads` threads using `registers` per thread and `shared_bytes` (static + dynamic) resident per SM,
    and the resource that limits them (targets/cuda.py's limits and allocation units)."""
    warps = -(-threads // facts["warp_size"])
    unit = facts["register_unit_per_warp"]
    warp_registers = -(-registers * facts["warp_size"] // unit) * unit
    shared_unit = facts["shared_unit_bytes"]
    shared = -(-shared_bytes // shared_unit) * shared_unit + facts["shared_reserved_per_block"]
    limits = {"threads": facts["max_threads_per_sm"] // (warps * facts["warp_size"]),
              "registers": facts["registers_per_sm"] // (warps * warp_registers) if registers else math.inf,
              "shared memory": facts["shared_bytes_per_sm"] // shared, "blocks": facts["max_blocks_per_sm"]}
    limit = min(limits, key=limits.get)
    return {"ctas_per_sm": int(limits[limit]), "warps_per_cta": warps, "limit": limit}


def issue_seconds(sass_per_warp: float, ctas: int, occ: dict, facts: dict) -> float:
    """Time to issue `sass_per_warp` instructions in every warp of `ctas` CTAs (module docstring: issue)."""
    busiest = -(-ctas // facts["sms"])  # CTAs on the SM with the most
    full, rest = divmod(busiest, occ["ctas_per_sm"])
    rounds = [occ["ctas_per_sm"]] * full + [rest] * (rest > 0)  # CTAs resident at once, round by round
    cycles = sum(-(-n * occ["warps_per_cta"] // facts["warp_schedulers_per_sm"]) * sass_per_warp for n in rounds)
    return cycles / (facts["gpu_clock_mhz"] * 1e6)


def _issue(found: list[dict], counted, summary: dict, ptx: dict, sass: dict, facts: dict) -> list[dict]:
    """Per kernel launch of a PrimFunc: occupancy, instructions per warp and issue time; `counted` is
    issue.executed's entry (a string: the emulator could not run it, the issue time is unknown), `ptx` the parsed
    PTX kernels and `sass` device_summary.kernel_code's."""
    from .ptx.issue import sass_per_warp

    rows = []
    for i, launch in enumerate(found):
        res = summary["kernels"].get(launch["kernel"], {}).get("resources") or {}
        threads, ctas = math.prod(launch["block"]), math.prod(launch["grid"])
        occ = occupancy(threads, res.get("registers", 0), res.get("shared_bytes", 0) + launch["dynamic_shared"], facts)
        row = {"kernel": launch["kernel"], "grid": launch["grid"], "block": launch["block"], **occ,
               "ptx_per_warp": None, "sass_per_warp": None, "sass_count": None, "issue_s": None}
        if not isinstance(counted, str):
            per_instruction = counted[i]["per_instruction"]
            row["ptx_per_warp"] = float(per_instruction.sum()) / occ["warps_per_cta"]
            row["sass_per_warp"], row["sass_count"] = sass_per_warp(ptx[launch["kernel"]], per_instruction,
                                                                    occ["warps_per_cta"], sass[launch["kernel"]])
            row["issue_s"] = issue_seconds(row["sass_per_warp"], ctas, occ, facts)
        rows.append(row)
    return rows


def estimate(tensor_core_s: float, issue_s: float | None, dram_s: float, launch_s: float) -> dict:
    """A PrimFunc call's estimate (module docstring) from its three times and its launch overhead."""
    times = {"tensor cores": tensor_core_s, "issue": issue_s or 0.0, "DRAM": dram_s}
    bound = max(times, key=times.get)
    return {"tensor_core_s": tensor_core_s, "issue_s": issue_s, "dram_s": dram_s, "bound": bound,
            "kernel_s": times[bound], "launch_s": launch_s, "seconds": times[bound] + launch_s}


def launch_seconds(call: dict, kernels: int, facts: dict) -> float:
    """Launch overhead of a PrimFunc's `call["calls"]` calls of `kernels` kernel launches each, `call["captured"]` of
    them in the CUDA graph (older artifacts: none)."""
    captured = call.get("captured", 0)
    return kernels * ((call["calls"] - captured) * facts["launch_us"] + captured * facts["graph_kernel_us"]) * 1e-6


def report(outdir: Path) -> dict:
    from . import device_summary
    from .ptx.issue import executed
    from .ptx.parse import parse_ptx
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
    counts = executed(outdir, SAMPLE_CTAS)
    ptx = parse_ptx((outdir / artifact.DEVICE_PTX).read_text())
    sass = device_summary.kernel_code(device_summary.sass(outdir))
    achievable = facts["dram_bandwidth_gbs"] * 1e9 * facts["dram_efficiency"]
    rows = []
    for name, call in info["calls"].items():
        found = info["launches"][name]
        kernel = summary["kernels"].get(found[-1]["kernel"], {}) if found else {}  # the PrimFunc's (last) kernel
        mix, res = kernel.get("sass_mix", {}), kernel.get("resources") or {}
        bmvcc = info["bmvcc_kernels"].get(name, {})
        if bmvcc.get("kernel") == "w2a8":
            cfg = W2A8Config(**bmvcc["padded"])  # the work the kernel does
            lower = w2a8_roofline(cfg, facts)
            macs, nbytes, read, written = cfg.m * cfg.n * cfg.k, lower["bytes"], None, None
            unit = "int8 tensor cores"
        else:
            macs = None if call["ops"] is None else int(call["ops"] // 2)
            read, written = call["bytes_read"], call["bytes_written"]
            nbytes = read + written
            unit = "fp16 tensor cores" if mix.get("HMMA", 0) > 0 else "fp32 CUDA cores"
            lower = _roofline(2 * (macs or 0), nbytes, facts[ROOFS[unit]] * 1e12, facts)
        lower = {k: lower[k] for k in ("compute_s", "memory_s", "seconds", "bound")}
        kernels = _issue(found, counts.get(name, "no kernel launch recorded"), summary, ptx, sass, facts)
        issue_s = None if any(k["issue_s"] is None for k in kernels) else sum(k["issue_s"] for k in kernels)
        tensor_core_s = lower["compute_s"] if unit != "fp32 CUDA cores" else 0.0
        launch_s = launch_seconds(call, len(found), facts) / call["calls"]
        model = estimate(tensor_core_s, issue_s, nbytes / achievable, launch_s)
        rows.append({"kernel": name, "calls": call["calls"], "launches": call["calls"] * len(found),
                     "in_cuda_graph": call.get("captured", 0) * len(found), "unit": unit,
                     "macs": macs, "bytes": nbytes,
                     "bytes_read": read if read is not None else call["bytes_read"],
                     "bytes_written": written if written is not None else call["bytes_written"],
                     "registers": res.get("registers"), "shared_bytes": res.get("shared_bytes"), "sass_mix": mix,
                     "launched": kernels,
                     "estimate": {**model, "total_s": model["seconds"] * call["calls"]},
                     "lower_bound": {**lower, "total_s": lower["seconds"] * call["calls"]}})
    rows.sort(key=lambda r: -r["estimate"]["total_s"])
    graphs = info.get("cuda_graph_launches", 0)  # older artifacts: none
    graphs_s = graphs * facts["launch_us"] * 1e-6
    return {"source": meta["source"]["name"], "batch": meta["input"]["shape"][0], "target": spec.name,
            "facts": {k: facts[k] for k in FACTS_SHOWN}, "kernels": rows,
            "total_macs": sum((r["macs"] or 0) * r["calls"] for r in rows),
            "launches": sum(r["launches"] for r in rows), "cuda_graph_launches": graphs,
            "cuda_graph_launch_s": graphs_s,
            "estimated_total_s": sum(r["estimate"]["total_s"] for r in rows) + graphs_s,
            "lower_bound_total_s": sum(r["lower_bound"]["total_s"] for r in rows),
            "unknown_issue": [r["kernel"] for r in rows if r["estimate"]["issue_s"] is None],
            "assumptions": assumptions(facts)}


def assumptions(facts: dict) -> list[str]:
    """The stated figures of the estimate, one line each (printed with the total)."""
    return [f"issue: {facts['warp_schedulers_per_sm']} warp schedulers per SM, 1 instruction per clock each, at "
            f"{facts['gpu_clock_mhz']} MHz, no stalls; SASS per warp = PTX executed (emulator, up to {SAMPLE_CTAS} "
            "CTAs per launch) x SASS/PTX size, loop by loop (whole kernel where ptxas changed the loops)",
            f"DRAM: {facts['dram_efficiency']:.0%} of {facts['dram_bandwidth_gbs']} GB/s achievable "
            f"({facts['dram_bandwidth_gbs'] * facts['dram_efficiency']:.1f} GB/s), every byte once (no L2 reuse)",
            f"launch: {facts['launch_us']} us per kernel or CUDA graph launch (host: Relax VM + driver), "
            f"{facts['graph_kernel_us']} us per kernel in a CUDA graph; not overlapped with the kernels",
            "tensor cores: dense peak; lower bound: the peak roofline (compute at peak, DRAM at 100%), no launches"]


def format_text(r: dict) -> str:
    f = r["facts"]

    def us(seconds):
        return "?" if seconds is None else f"{seconds * 1e6:.2f}"

    lines = [f"{r['target']}: {f['sms']} SMs at {f['gpu_clock_mhz']} MHz, {f['dram_bandwidth_gbs']} GB/s, "
             f"{f['peak_int8_tops']:.1f} int8 TOPS dense, {f['peak_fp16_tflops']:.1f} fp16 TFLOPS dense, "
             f"{f['peak_fp32_tflops']:.2f} fp32 TFLOPS",
             f"{'kernel':<40} {'calls':>5} {'launch':>6} {'MACs/call':>11} {'bytes/call':>10} {'regs':>4} "
             f"{'smem':>6} {'warps/SM':>8} {'TC us':>7} {'issue us':>8} {'DRAM us':>8} {'est. us':>8} "
             f"{'bound':>12} {'lower us':>8}  SASS mix (static)"]
    for k in r["kernels"]:
        e, mix = k["estimate"], " ".join(f"{n}:{c}" for n, c in k["sass_mix"].items() if n in MIX_SHOWN)
        warps = "/".join(str(x["ctas_per_sm"] * x["warps_per_cta"]) for x in k["launched"])
        macs = f"{k['macs']:,}" if k["macs"] is not None else "?"
        lines.append(f"{k['kernel'][:40]:<40} {k['calls']:>5} {k['launches']:>6} "
                     f"{macs:>11} {k['bytes']:>10,} "
                     f"{k['registers'] if k['registers'] is not None else '?':>4} "
                     f"{k['shared_bytes'] if k['shared_bytes'] is not None else '?':>6} {warps:>8} "
                     f"{us(e['tensor_core_s']) if e['tensor_core_s'] else '-':>7} {us(e['issue_s']):>8} "
                     f"{us(e['dram_s']):>8} {us(e['seconds']):>8} {e['bound']:>12} "
                     f"{us(k['lower_bound']['seconds']):>8}  {mix}")
    kernels_s = sum(k["estimate"]["kernel_s"] * k["calls"] for k in r["kernels"])
    graphed = sum(k["in_cuda_graph"] for k in r["kernels"])
    lines.append(f"model total: {r['total_macs'] / 1e6:,.1f} MMAC, {r['launches']} kernels ({graphed} in "
                 f"{r['cuda_graph_launches']} CUDA graph launch{'es' * (r['cuda_graph_launches'] != 1)}), estimated "
                 f"{r['estimated_total_s'] * 1e3:.3f} ms (kernels {kernels_s * 1e3:.3f} ms + launches "
                 f"{(r['estimated_total_s'] - kernels_s) * 1e3:.3f} ms); lower bound "
                 f"{r['lower_bound_total_s'] * 1e3:.3f} ms")
    if r["unknown_issue"]:
        lines.append(f"issue time unknown (the emulator cannot run them), left out: {', '.join(r['unknown_issue'])}")
    lines += [f"  assumed: {a}" for a in r["assumptions"]]
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
    title = (f"{r['source']} (batch {r['batch']}) on {r['target']}: estimated times (tensor cores, issue, "
             f"achievable DRAM, launches; CUDA graph launches: {r['cuda_graph_launch_s'] * 1e6:.0f} µs more)")
    return plot_roofline(kernels, roofs, title, path)
