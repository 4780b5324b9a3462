"""Whole-model CPU benchmark: the paper-size BitMedViT compiled by bmvcc vs PyTorch eager float32.

    python benchmarks/bench_model_cpu.py [--threads 2] [--repeat 5] [--variants bitlinear,float,bf16] [--mcpu NAME] [--json]

The model is the paper's configuration (benchmarks/common.py PAPER) with random weights (seed 0),
batch 1, saved as a state dict in a temporary directory; ONNX Runtime runs it as exported by
`bmvcc export-onnx`, with the same thread count. Each variant is compiled for target `host` through
bmvcc.driver.compile_model (`bitlinear`: the BitLinear rewrite; `float`: --no-bitlinear, every layer a
float matmul with TVM's default CPU schedules; `bf16`: the BitLinear rewrite with --float-precision bf16,
by default only on a CPU with AVX-512 BF16, its median also as a ratio to `bitlinear`'s, the float32
build), its compile stages timed from the driver's progress
messages, then loaded with bmvcc.load and timed in this process with the same thread count as
PyTorch (best and median of --repeat calls after one warm-up). Every output is compared with the
PyTorch logits before it is timed. A variant that fails to compile is reported, not fatal.

The machine's bound is printed beside the figures: the model's int8 and float32 MACs
(common.model_macs) at this CPU's int8 and fp32 peaks (targets/cpu_peak.py: MACs per cycle per
core of its vector units, times the cores and the clock, measured on one busy core), one after the other; each median's
ratio to it and to ONNX Runtime's median are in the table. The load average is printed too:
the figures of a shared machine are only comparable within one run.

--mcpu NAME compiles bmvcc's variants for LLVM CPU NAME on this machine's cores (targets.cpu.host(mcpu)), e.g.
`--mcpu znver3` runs the AVX2 code path of an AVX2-only CPU on an AVX-512 one; the bound is then NAME's MACs per cycle
(targets/cpu_peak.py) at this machine's measured clock. NAME's features must be ones this CPU has (else the benchmark
stops at once, naming them). PyTorch and ONNX Runtime still pick their kernels for this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import PAPER, model_macs, onnxruntime_session, paper_checkpoint, time_call

VARIANTS = {"bitlinear": {}, "float": {"bitlinear": False}, "bf16": {"float_precision": "bf16"}}  # CompileOptions


def _compile(path: Path, outdir: Path, target, options: dict, log) -> dict:
    """Compile one variant; returns seconds per driver stage and in total."""
    from bmvcc.driver import CompileOptions, compile_model

    marks: list[tuple[str, float]] = []

    def progress(msg: str) -> None:
        marks.append((msg, time.perf_counter()))
        log(f"  {msg}")

    start = time.perf_counter()
    compile_model(path, outdir, CompileOptions(target=target, **options), progress=progress)
    end = time.perf_counter()
    stages = {}
    for (msg, t0), (_, t1) in zip(marks, marks[1:] + [("end", end)]):
        if not msg.startswith("wrote"):
            stages[_stage_name(msg)] = t1 - t0
    return {"compile_s": end - start, "stages_s": stages}


STAGES = [("loading", "load checkpoint"), ("importing into Relax", "torch.export + Relax import"),
          ("exporting with", "torch.export + Relax import"),
          ("running bmvcc passes", "bmvcc passes"), ("building for", "build setup"),
          ("scheduling", "scheduling"), ("tvm.compile", "tvm.compile"), ("exporting", "export library + weights")]


def _stage_name(msg: str) -> str:
    return next((name for prefix, name in STAGES if msg.startswith(prefix)), msg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--variants", default=None, help="comma list of: " + ", ".join(VARIANTS)
                    + " (default: all, bf16 only on a CPU with AVX-512 BF16)")
    ap.add_argument("--mcpu", help="compile bmvcc for this LLVM CPU (one of targets/cpu_peak.py's families) on this "
                    "machine's cores, e.g. znver3 for the AVX2 code path; default: this machine's CPU")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    from bmvcc.errors import BmvccError
    from bmvcc.targets.cpu import host
    from bmvcc.targets.cpu_peak import FAMILIES

    if args.mcpu is not None and args.mcpu not in FAMILIES:
        ap.error(f"unknown --mcpu {args.mcpu}; choose one of targets/cpu_peak.py's families: {', '.join(FAMILIES)}")
    try:
        target = host(args.mcpu)
    except BmvccError as e:  # an --mcpu this machine cannot run
        ap.error(str(e))
    variants = [v for v in (args.variants or _default_variants(target)).split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))

    import torch

    import bmvcc

    torch.set_num_threads(args.threads)
    # TVM's pool: TVM_NUM_THREADS, else one thread per core. Never runtime.config_threadpool here:
    # it pins this (main) thread to one core, which would also halve PyTorch and the host target.
    if args.threads != len(os.sched_getaffinity(0)) and os.environ.get("TVM_NUM_THREADS") != str(args.threads):
        log(f"note: TVM uses {os.environ.get('TVM_NUM_THREADS', len(os.sched_getaffinity(0)))} threads; "
            f"set TVM_NUM_THREADS={args.threads} to match --threads")
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model, path = paper_checkpoint(tmp)
        with torch.no_grad():
            x = torch.from_numpy(image)
            ref = model(x).numpy()
            log("timing PyTorch eager float32")
            rows.append({"name": "pytorch eager fp32", **time_call(lambda: model(x), args.repeat)})
        log("exporting to ONNX and timing ONNX Runtime")
        ort_run = onnxruntime_session(path, tmp, args.threads)
        rows.append({"name": "onnxruntime (bmvcc export-onnx)", "max_abs_err_vs_torch": float(np.abs(ort_run(image) - ref).max()),
                     **time_call(lambda: ort_run(image), args.repeat)})
        for name in variants:
            log(f"compiling variant '{name}'")
            try:
                info = _compile(path, tmp / name, target, VARIANTS[name], log)
            except Exception as e:  # noqa: BLE001  (report a variant that cannot compile yet, go on)
                rows.append({"name": f"bmvcc {name}", "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            compiled = bmvcc.load(tmp / name)
            out = compiled(image)
            err = float(np.abs(out - ref).max())
            log(f"timing variant '{name}'")
            rows.append({"name": f"bmvcc {name}", **info, "max_abs_err_vs_torch": err,
                         "argmax_matches": bool((out.argmax(-1) == ref.argmax(-1)).all()),
                         **time_call(lambda: compiled(image), args.repeat)})
    eager, ort = rows[0]["best_ms"], rows[1]["median_ms"]
    by_name = {r["name"]: r for r in rows}
    bf16, float32 = (by_name.get(f"bmvcc {v}", {}) for v in ("bf16", "bitlinear"))
    if "median_ms" in bf16 and "median_ms" in float32:
        bf16["median_vs_float32_build"] = bf16["median_ms"] / float32["median_ms"]
    bound = _bound(args.threads, target)
    for r in rows:
        if "best_ms" in r:
            r["speedup_vs_eager"] = eager / r["best_ms"]
            r["median_vs_onnxruntime"] = r["median_ms"] / ort
            if bound["ms"]:
                r["median_vs_bound"] = r["median_ms"] / bound["ms"]
    result = {"model": PAPER, "batch": 1, "threads": args.threads, "repeat": args.repeat,
              "cpu": target.description, "bound": bound, "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0


def _default_variants(target) -> str:
    from bmvcc.targets.cpu import has_bf16_dot

    return ",".join(v for v in VARIANTS if v != "bf16" or has_bf16_dot(target.target()))


def _bound(threads: int, target) -> dict:
    """The model's MACs at the peaks of `target`'s CPU on `threads` cores (ms None for a CPU family not in
    targets/cpu_peak.py)."""
    from bmvcc.targets.cpu_peak import target_peak

    int8, fp32 = model_macs(PAPER)
    peak = target_peak(threads, target.target())
    return {"int8_macs": int8, "fp32_macs": fp32, "peak": peak.describe() if peak else None,
            "ms": peak.bound_ms(int8, fp32) if peak else None}


def _table(result: dict) -> str:
    b = result["bound"]
    bound = (f"{b['ms']:.1f} ms: {b['int8_macs'] / 1e9:.2f} G int8 + {b['fp32_macs'] / 1e9:.2f} G fp32 MACs at {b['peak']}"
             if b["ms"] else "unknown (CPU not in targets/cpu_peak.py, or clock not measurable)")
    lines = [f"paper-size BitMedViT, batch 1, {result['threads']} threads, {result['cpu']}",
             f"machine bound: {bound}", "load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in result["load_average"]), "",
             "| implementation | best ms | median ms | speedup vs eager | median / ORT | median / bound | max abs err | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        err = f"{r['max_abs_err_vs_torch']:.2e}" if "max_abs_err_vs_torch" in r else ""
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        vs_bound = f"{r['median_vs_bound']:.2f}x" if "median_vs_bound" in r else ""
        lines.append(f"| {r['name']} | {r['best_ms']:.1f} | {r['median_ms']:.1f} | {r['speedup_vs_eager']:.2f}x | "
                     f"{r['median_vs_onnxruntime']:.2f} | {vs_bound} | {err} | {comp} |")
    for r in result["rows"]:
        if "median_vs_float32_build" in r:
            lines += ["", f"{r['name']}: median {r['median_vs_float32_build']:.2f}x the float32 build's (bmvcc bitlinear), "
                          f"{r['median_vs_onnxruntime']:.2f}x ONNX Runtime's; max abs logit err vs PyTorch float32 "
                          f"{r['max_abs_err_vs_torch']:.2e}, argmax {'matches' if r['argmax_matches'] else 'differs'}"]
    for r in result["rows"]:
        if "stages_s" in r:
            lines += ["", f"compile stages, {r['name']}:", "", "| stage | s |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in r["stages_s"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
