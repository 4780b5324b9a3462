"""Tuned vs default: the paper-size BitMedViT on this machine, in one run.

    python benchmarks/bench_tune_host.py [--trials 32] [--task NAME ...] [--db DIR] [--repeat 5] [--json]

The model is the paper's configuration (benchmarks/common.py PAPER) with random weights (seed 0), batch 1. Steps:
compile for `host` without a database (bmvcc's default schedules), `bmvcc tune` its tasks locally
(the kernels worth tuning; --trials on average per task; --task to tune exactly some; --db to keep or resume the database, else a temporary
one), compile again with the database, then load both artifacts and time them in this process (best
and median of --repeat calls after one warm-up). Both outputs are compared with the PyTorch logits
before timing, and so is ONNX Runtime on the same model (bmvcc export-onnx). Prints the per-task
table of bmvcc tune and the whole-model latencies.

Cost on a 2-core machine: about 1 minute of fixed start-up per tuning run plus 15-30 s per trial
round of 8, for --trials x tasks trials.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import onnxruntime_session, paper_checkpoint, time_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--task", action="append", default=[])
    ap.add_argument("--db", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from bmvcc import load
    from bmvcc.driver import CompileOptions, compile_model
    from bmvcc.tune import TaskResult, TuneReport

    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bmvcc-bench-tune-") as tmp:
        tmp = Path(tmp)
        model, ckpt = paper_checkpoint(tmp)
        db = args.db or tmp / "db"
        x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 224, 224)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()

        log("compiling with the default schedules")
        compile_model(ckpt, tmp / "default", CompileOptions(target="host"), progress=log)
        log(f"tuning ({args.trials} trials per task on average) with bmvcc tune")
        # a process of its own, as users run it (a compile in the process that tuned has crashed in TVM)
        cmd = [sys.executable, "-m", "bmvcc.cli", "tune", str(ckpt), "--target", "host", "--db", str(db),
               "--trials", str(args.trials), "--json", *[a for t in args.task for a in ("--task", t)]]
        report = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        log("compiling with the tuning database")
        tuned = compile_model(ckpt, tmp / "tuned", CompileOptions(target="host", db=db), progress=log)

        result = {"tune": report, "kernels_from_db": tuned.metadata["tuning"]["kernels_from_db"]}
        scale = float(np.abs(ref).max())
        for name in ("default", "tuned"):
            m = load(tmp / name)
            err = float(np.abs(m(x) - ref).max())
            result[name] = {**time_call(lambda: m(x), args.repeat), "max_abs_err_vs_torch": err, "ref_scale": scale}
        log("exporting to ONNX and timing ONNX Runtime (2 threads)")
        ort_run = onnxruntime_session(ckpt, tmp, threads=2)
        result["onnxruntime"] = {**time_call(lambda: ort_run(x), args.repeat),
                                 "max_abs_err_vs_torch": float(np.abs(ort_run(x) - ref).max()), "ref_scale": scale}
        result["speedup"] = result["default"]["best_ms"] / result["tuned"]["best_ms"]

    if args.json:
        print(json.dumps(result, indent=2))
        return
    rows = [TaskResult(**{k: v for k, v in t.items() if k != "speedup"}) for t in report["tasks"]]
    before, after = report["model_us_before"], report["model_us_after"]
    print(TuneReport(report["db"], report["target"], report["devices"], rows, report["skipped"],
                     (before, after) if before else None).table())
    print(f"\nwhole model, batch 1, {result['kernels_from_db']} kernels from the database:")
    for name in ("default", "tuned", "onnxruntime"):
        r = result[name]
        print(f"  {name:<8} best {r['best_ms']:8.2f} ms  median {r['median_ms']:8.2f} ms  "
              f"max |logit - torch| {r['max_abs_err_vs_torch']:.2e} (|logits| <= {r['ref_scale']:.2f})")
    print(f"  speedup {result['speedup']:.2f}x; tuned vs ONNX Runtime "
          f"{result['onnxruntime']['best_ms'] / result['tuned']['best_ms']:.2f}x")


if __name__ == "__main__":
    main()
