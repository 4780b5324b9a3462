"""Benchmark the W2A8 CPU kernel at the paper's FFN shapes against float32 and int8 GEMMs, and norm_quant.

    python benchmarks/bench_w2a8_cpu.py [--m 1024] [--shapes 512x2048,2048x512] [--threads 2] [--json]

Shapes are KxN (FFN up: K=512 -> N=2048, down: K=2048 -> N=512), M rows. Every implementation runs in
this process with the same thread count and is timed the same way (best and median of --repeat calls
after one warm-up). Peers:
  torch_fp32  torch.matmul float32 (torch.set_num_threads); torch_fp32_1t the same on one thread, since
              torch's OpenMP threads can be slower than one thread when the cores are shared
  ort_int8    onnxruntime MatMulInteger, u8 activations (zero point 128) x s8 weights: MLAS's int8 GEMM,
              weights as int8 in memory (4x the 2-bit bytes) and no decode
The W2A8 kernel reads 2-bit packed weights and decodes them per tile inside the kernel.
Each result is checked against a float64 numpy matmul (exact at these magnitudes) before it is timed.
Every GEMM's GOP/s is also given as a % of this CPU's int8 peak on --threads cores (targets/cpu_peak.py;
none for a CPU family it does not list).

norm_quant (the RMSNorm + int8 quantization kernel feeding each W2A8 layer, schedules/norm_quant.py)
runs at M x K for each K of the shapes, checked against norm_quant_numpy (codes within one, as its
summation order differs); its GB/s counts x read and q, x_scale written once, beside a numpy copy
of x (one thread) as this machine's memory speed in the same run.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from common import gemm_args, print_gemm_table, time_call


def _w2a8(m, n, k, q, codes):
    import tvm

    from bmvcc.schedules.w2a8 import W2A8Config, pack_ternary, w2a8_compute
    from bmvcc.schedules import w2a8_cpu
    from bmvcc.targets import get

    target = get("host").target()
    func = w2a8_cpu.schedule(w2a8_compute(W2A8Config(m, n, k)), target)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    packed = pack_ternary(codes)
    ones = np.ones((m, 1), np.float32)  # x_scale = w_scale = 1: out = float(acc), checkable exactly
    args = [tvm.runtime.tensor(a) for a in (q, packed, ones, np.ones(1, np.float32))]
    out = tvm.runtime.empty((m, n), "float32", tvm.cpu())
    fn = lambda: lib["main"](*args, out)  # noqa: E731
    fn()
    return fn, out.numpy(), w2a8_cpu.select_backend(target), packed.nbytes


def _torch_fp32(q, codes, threads):
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(q.astype(np.float32))
    w = torch.from_numpy(codes.T.astype(np.float32).copy())
    fn = lambda: torch.matmul(x, w)  # noqa: E731
    return fn, fn().numpy(), w.numel() * 4


def _ort_int8(q, codes, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k = q.shape
    n = codes.shape[0]
    w = codes.T.astype(np.int8).copy()
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(128, np.uint8), "a_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"a": (q.astype(np.int16) + 128).astype(np.uint8)}
    fn = lambda: sess.run(None, feed)  # noqa: E731
    return fn, fn()[0], w.nbytes


def _norm_quant(m, k):
    import tvm

    from bmvcc.schedules.norm_quant import NormQuantConfig, norm_quant_compute
    from bmvcc.schedules.norm_quant_cpu import schedule as schedule_norm_quant_cpu
    from bmvcc.targets import get

    target = get("host").target()
    func = schedule_norm_quant_cpu(norm_quant_compute(NormQuantConfig(m, k)), target)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((m, k), dtype=np.float32), rng.uniform(0.5, 1.5, k).astype(np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, g)]
    q, xs = tvm.runtime.empty((m, k), "int8", tvm.cpu()), tvm.runtime.empty((m, 1), "float32", tvm.cpu())
    fn = lambda: lib["main"](*args, q, xs)  # noqa: E731
    fn()
    return fn, x, g, q.numpy(), xs.numpy()


def bench_norm_quant(m: int, k: int, repeat: int) -> dict:
    from bmvcc.schedules.norm_quant import norm_quant_numpy

    print(f"  norm_quant M={m} K={k}: build/check...", file=sys.stderr, flush=True)
    fn, x, g, q, xs = _norm_quant(m, k)
    q_ref, xs_ref = norm_quant_numpy(x, g)
    if np.abs(q.astype(int) - q_ref).max() > 1 or not np.allclose(xs, xs_ref, rtol=1e-5, atol=0):
        raise SystemExit(f"norm_quant gives a wrong result at M={m} K={k}")
    nbytes = x.nbytes + g.nbytes + q.nbytes + xs.nbytes
    row = {"m": m, "k": k, "bytes": nbytes, "impls": {}}
    copy = np.empty_like(x)
    for name, f, moved in (("norm_quant", fn, nbytes), ("numpy_copy", lambda: np.copyto(copy, x), 2 * x.nbytes)):
        stats = time_call(f, repeat)
        stats["gb_per_s"] = moved / (stats["best_ms"] / 1e3) / 1e9
        row["impls"][name] = stats
    return row


def bench_shape(m: int, k: int, n: int, threads: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (m, k), dtype=np.int8)
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    ref = q.astype(np.float64) @ codes.T.astype(np.float64)  # exact: |acc| < 2^53
    gop = 2 * m * n * k / 1e9
    row = {"m": m, "k": k, "n": n, "gop": gop, "impls": {}}
    builders = {
        "w2a8_tvm": lambda: _w2a8(m, n, k, q, codes),
        "torch_fp32": lambda: _torch_fp32(q, codes, threads),
        "torch_fp32_1t": lambda: _torch_fp32(q, codes, 1),  # MKL/OpenMP can lose from threading on busy cores
        "ort_int8": lambda: _ort_int8(q, codes, threads),
    }
    for name, build in builders.items():
        print(f"  {name} M={m} K={k} N={n}: build/check...", file=sys.stderr, flush=True)
        fn, out, *extra = build()
        if not np.array_equal(np.asarray(out, np.float64), ref):
            raise SystemExit(f"{name} gives a wrong result at M={m} K={k} N={n}")
        stats = time_call(fn, repeat)
        stats["gops"] = gop / (stats["best_ms"] / 1e3)
        stats["weight_bytes"] = extra[-1]
        if name == "w2a8_tvm":
            row["backend"] = extra[0]
        row["impls"][name] = stats
    base = row["impls"]["w2a8_tvm"]["best_ms"]
    row["speedup_vs"] = {name: s["best_ms"] / base for name, s in row["impls"].items() if name != "w2a8_tvm"}
    return row


def _weights_and_speedup(r, name, s) -> str:
    """The last cells of an implementation's line: its weight bytes and the W2A8 kernel's speedup over it (on the
    kernel's own line: its backend)."""
    speedup = f"{r['speedup_vs'][name]:.2f}x" if name in r["speedup_vs"] else f"[{r['backend']}]"
    return f"{s['weight_bytes'] / 1024:>6.0f}KB  {speedup}"


def main(argv=None) -> int:
    a = gemm_args(__doc__, "512x2048,2048x512", threads=2, repeat=10).parse_args(argv)
    # TVM's pool size, read when its first parallel kernel runs (runtime.config_threadpool instead
    # would pin this thread, PyTorch's and ONNX Runtime's main thread too, to one core)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from bmvcc.targets import get
    from bmvcc.targets.cpu_peak import target_peak

    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rows = [bench_shape(a.m, k, n, a.threads, a.repeat) for k, n in shapes]
    norm_rows = [bench_norm_quant(a.m, k, a.repeat) for k in dict.fromkeys(k for k, _ in shapes)]
    peak = target_peak(a.threads, get("host").target())
    for r in rows:
        for s in r["impls"].values():
            s["percent_of_int8_peak"] = 100 * s["gops"] * 1e9 / peak.int8_ops_per_s() if peak else None
    if a.json:
        print(json.dumps({"threads": a.threads, "repeat": a.repeat, "peak": peak.describe() if peak else None,
                          "results": rows, "norm_quant": norm_rows}, indent=2))
        return 0
    print_gemm_table("W2A8 CPU kernel", a, peak, rows, ("gops", "GOPS"), ("percent_of_int8_peak", "% int8"),
                     f"{'weights':>8}  W2A8 speedup", _weights_and_speedup)
    print(f"{'M':>5} {'K':>5}  {'impl':<13} {'ms':>16} {'GB/s':>7}  (norm_quant: {a.threads} threads; copy: 1)")
    for r in norm_rows:
        for name, s in r["impls"].items():
            print(f"{r['m']:>5} {r['k']:>5}  {name:<13} {s['best_ms']:>7.3f} ({s['median_ms']:>6.3f}) {s['gb_per_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
