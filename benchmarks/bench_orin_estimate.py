"""The per-kernel time estimate of a checkpoint's Jetson Orin Nano build (`bmvcc report`'s model) and its compile time.

    python benchmarks/bench_orin_estimate.py [CHECKPOINT] [--paper] [--tvm-attention] [--target jetson-orin-nano]
                                             [--json]

CHECKPOINT defaults to the bundled example (examples/bitmedvit_digits.pth); --paper compiles the paper-size model
(random weights, benchmarks/common.py) instead. The build goes to a temporary directory. Per kernel: calls and
kernel launches per run, tensor-core, issue and DRAM time, the estimate (the largest of the three plus launch
overhead) and the peak-roofline lower bound, all per call in microseconds; then the totals per run and the
assumptions (bmvcc/report.py). --tvm-attention: the baseline build, attention as TVM's prefill kernel
(schedules/attention_cuda.py) instead of bmvcc's tensor-core kernel (schedules/attention_cuda_tc.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import paper_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bitmedvit_digits.pth"


def estimate(checkpoint: Path, target: str) -> dict:
    from bmvcc.driver import CompileOptions, compile_model
    from bmvcc.report import report

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outdir = compile_model(checkpoint, Path(tmp) / "orin", CompileOptions(target=target)).outdir
        compile_s = time.perf_counter() - t0
        return {"compile_s": compile_s, "report": report(outdir)}


def table(r: dict) -> str:
    def us(seconds):
        return "-" if not seconds else f"{seconds * 1e6:.2f}"

    lines = [f"{'kernel':<44} {'calls':>5} {'launches':>8} {'TC us':>8} {'issue us':>9} {'DRAM us':>8} "
             f"{'est. us':>8} {'lower us':>8}"]
    for k in r["kernels"]:
        e = k["estimate"]
        lines.append(f"{k['kernel'][:44]:<44} {k['calls']:>5} {k['launches']:>8} {us(e['tensor_core_s']):>8} "
                     f"{'?' if e['issue_s'] is None else us(e['issue_s']):>9} {us(e['dram_s']):>8} "
                     f"{us(e['seconds']):>8} {us(k['lower_bound']['seconds']):>8}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", type=Path, default=EXAMPLE)
    ap.add_argument("--paper", action="store_true", help="the paper-size model instead (random weights)")
    ap.add_argument("--tvm-attention", action="store_true", help="attention as TVM's prefill kernel (the baseline)")
    ap.add_argument("--target", default="jetson-orin-nano")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tvm_attention:
        from bmvcc.schedules import kernels

        kernels.KERNELS[("attention_prefill", "cuda")] = ("attention_cuda:schedule", None)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if args.paper:
            checkpoint = paper_checkpoint(Path(tmp))[1]
        result = estimate(checkpoint, args.target)
    r = result["report"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(table(r))
    print(f"{'paper-size model' if args.paper else checkpoint} on {r['target']}: {r['launches']} kernel launches, "
          f"{r['cuda_graph_launches']} CUDA graph launch(es); estimated {r['estimated_total_s'] * 1e3:.3f} ms, lower "
          f"bound {r['lower_bound_total_s'] * 1e3:.3f} ms; compiled in {result['compile_s']:.1f} s")
    for line in r["assumptions"]:
        print(f"  assumed: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
