"""Benchmark the float projections (schedules/cpu_rules/matmul.py) at the paper's shapes against numpy and PyTorch.

    python benchmarks/bench_matmul_cpu.py [--m 1024] [--shapes 512x640,512x512] [--threads 1] [--json]

Shapes are KxN of x[M, K] @ W[K, N] + b, the Wqkv (K=512 -> N=640, multi-query: Q, K and V) and out
projections of the paper's model: a Relax module with W and b as parameters (as passes/externalize_weights.py
leaves them) compiled through schedules/cpu_default.py for target `host`, as `bmvcc compile` compiles it. numpy (its BLAS)
and torch.nn.functional.linear run in this process with the same thread count (TVM_NUM_THREADS and
the BLAS thread variables are set before any pool starts); each result is checked against a float64 numpy reference
(tolerance 1e-4 of the output's scale: float32 sums of K=512 terms) before it is timed. GFLOP/s are
given as a % of this CPU's fp32 FMA peak on --threads cores (targets/cpu_peak.py, measured clock).
"""

from __future__ import annotations

import json
import os
import sys

from common import gemm_args, print_gemm_table, time_call


def _tvm_linear(x, w, b):
    """x @ w + b compiled like a model's Linear: weights as parameters, bmvcc's default CPU schedules."""
    import tvm
    from tvm import relax

    from bmvcc.schedules.cpu_default import schedule_cpu_module
    from bmvcc.targets import get

    target = get("host").target()
    bb = relax.BlockBuilder()
    xv, wv, bv = (relax.Var(name, relax.TensorType(a.shape, "float32")) for name, a in (("x", x), ("w", w), ("b", b)))
    with bb.function("main", [xv, wv, bv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.matmul(xv, wv), bv))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(schedule_cpu_module(bb.get(), target), target=target), tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in (x, w, b)]
    return lambda: vm["main"](*args)


def bench_shape(m: int, k: int, n: int, threads: int, repeat: int) -> dict:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    ref = x.astype(np.float64) @ w + b
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w.T.copy()), torch.from_numpy(b)
    impls = {"bmvcc": _tvm_linear(x, w, b), "numpy": lambda: x @ w + b,
             "torch": lambda: torch.nn.functional.linear(xt, wt, bt)}
    gflop = 2 * m * n * k / 1e9
    row = {"m": m, "k": k, "n": n, "impls": {}}
    for name, fn in impls.items():
        out = fn()
        out = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        if not np.allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max()):
            raise SystemExit(f"{name} gives a wrong result at M={m} K={k} N={n}")
        stats = time_call(fn, repeat)
        stats["gflops"] = gflop / (stats["best_ms"] / 1e3)
        row["impls"][name] = stats
    return row


def main(argv=None) -> int:
    a = gemm_args(__doc__, "512x640,512x512", threads=1, repeat=20).parse_args(argv)
    # before any pool starts: TVM's, and numpy's BLAS (sized when numpy is imported, so only after this)
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(a.threads)
    import torch

    from bmvcc.targets.cpu_peak import host_peak

    torch.set_num_threads(a.threads)
    rows = [bench_shape(a.m, *(int(v) for v in s.split("x")), a.threads, a.repeat) for s in a.shapes.split(",")]
    peak = host_peak(a.threads)
    for r in rows:
        for s in r["impls"].values():
            s["percent_of_fp32_peak"] = 100 * s["gflops"] * 1e9 / peak.fp32_ops_per_s() if peak else None
        r["bmvcc_speedup_vs"] = {name: s["best_ms"] / r["impls"]["bmvcc"]["best_ms"]
                                 for name, s in r["impls"].items() if name != "bmvcc"}
    if a.json:
        print(json.dumps({"threads": a.threads, "peak": peak.describe() if peak else None, "results": rows}, indent=2))
        return 0
    print_gemm_table("float projections x @ W + b", a, peak, rows, ("gflops", "GFLOP/s"),
                     ("percent_of_fp32_peak", "% fp32"), "bmvcc speedup",
                     lambda r, name, s: "" if name == "bmvcc" else f"{r['bmvcc_speedup_vs'][name]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
