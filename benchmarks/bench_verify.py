"""Benchmark `bmvcc verify` (the PTX emulator, bmvcc/ptx) on the bundled example and the paper's W2A8 kernels.

    python benchmarks/bench_verify.py [--outdir DIR] [--paper] [--max-ctas 64] [--json]

1. The bundled example's Jetson Orin Nano build (examples/bitmedvit_digits.pth, compiled into a temporary
   directory), or the existing GPU build --outdir names (e.g. the paper-size model's): wall time of
   verify_artifact over every launched kernel.
2. --paper: the paper-size model's W2A8 kernels (FFN up 1024x2048x512 with GELU, FFN down 1024x512x2048 with
   the residual; default knobs, 128 CTAs each), --max-ctas of them run (first, last, edge tiles, spread):
   build (TVM + NVRTC), reference (the definition on llvm) and emulation timed separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bitmedvit_digits.pth"


def _example(outdir: Path | None, max_ctas: int) -> dict:
    from bmvcc.driver import CompileOptions, compile_model
    from bmvcc.ptx.verify import verify_artifact

    with tempfile.TemporaryDirectory() as tmp:
        if outdir is None:
            outdir = Path(tmp) / "orin"
            compile_model(EXAMPLE, outdir, CompileOptions(target="jetson-orin-nano"))
        t0 = time.perf_counter()
        rows = verify_artifact(outdir, max_ctas=max_ctas)
        seconds = time.perf_counter() - t0
    return {"kernels": len(rows), "ctas_run": sum(r["ctas_run"] for r in rows), "verify_s": seconds,
            "all_ok": all(r["verdict"] == "ok" for r in rows)}


def _paper_w2a8(max_ctas: int) -> list[dict]:
    import tvm

    from bmvcc import targets
    from bmvcc.ptx.verify import build_scheduled, compare, emulate, random_arguments, run_definition
    from bmvcc.schedules import w2a8_cuda as wc
    from bmvcc.schedules.w2a8 import W2A8Config

    spec = targets.get("jetson-orin-nano")
    results = []
    for cfg in (W2A8Config(1024, 2048, 512, "gelu"), W2A8Config(1024, 512, 2048, "residual")):
        t0 = time.perf_counter()
        definition = wc.tc_compute(cfg)
        kernels, launches = build_scheduled(tvm.IRModule({"w2a8": wc.schedule(definition, spec.target())}), spec)
        t1 = time.perf_counter()
        arrays = random_arguments(definition, np.random.default_rng(0))
        reference = run_definition(definition, arrays)
        t2 = time.perf_counter()
        res = emulate(kernels, launches["w2a8"], arrays, max_ctas=max_ctas)
        t3 = time.perf_counter()
        err, agree = compare(arrays, reference, res.written, res.ctas_run == res.ctas_total)
        results.append({"config": f"{cfg.m}x{cfg.n}x{cfg.k} {cfg.epilogue}", "ctas_run": res.ctas_run,
                        "ctas_total": res.ctas_total, "build_s": t1 - t0, "reference_s": t2 - t1,
                        "emulate_s": t3 - t2, "max_error": err, "races": res.races, "agree": agree})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outdir", type=Path, help="an existing GPU build (default: compile the example)")
    ap.add_argument("--paper", action="store_true", help="also the paper-size model's W2A8 kernels")
    ap.add_argument("--max-ctas", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = {"example": _example(args.outdir, args.max_ctas)}
    if args.paper:
        result["paper_w2a8"] = _paper_w2a8(args.max_ctas)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        e = result["example"]
        print(f"{args.outdir or 'example'} Orin build: {e['kernels']} kernels, {e['ctas_run']} CTAs, verify {e['verify_s']:.1f} s, "
              f"{'all agree' if e['all_ok'] else 'DISAGREE'}")
        for r in result.get("paper_w2a8", []):
            print(f"paper W2A8 {r['config']}: {r['ctas_run']}/{r['ctas_total']} CTAs, build {r['build_s']:.1f} s, "
                  f"reference {r['reference_s']:.1f} s, emulate {r['emulate_s']:.1f} s, max error "
                  f"{r['max_error']:.3g}, races {r['races']}, {'agree' if r['agree'] else 'DISAGREE'}")
    ok = result["example"]["all_ok"] and all(r["agree"] and not r["races"] for r in result.get("paper_w2a8", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
