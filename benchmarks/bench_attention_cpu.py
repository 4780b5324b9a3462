"""Benchmark causal attention at the paper's layer shape: bmvcc's fused kernel against the unfused graph and PyTorch.

    python benchmarks/bench_attention_cpu.py [--heads 8] [--tokens 1024] [--head-dim 64] [--threads 2] [--repeat 10] [--json]

softmax(q k^T / sqrt(d) + causal mask) v with one K/V head for all query heads (multi-query, as in
BitMedViT), batch 1. Every implementation runs in this process with the same thread count and is
timed the same way (best and median of --repeat calls after one warm-up):
  bmvcc fused    schedules/attention_cpu.py, as passes/fuse_causal_attention.py emits it (CPU builds)
  bmvcc unfused  the same graph without that pass: Q K^T and P V matmuls, scale + mask, softmax under
                 schedules/cpu_default.py's rules (what bmvcc built before the fused kernel)
  torch eager    the model's float32 expression; torch sdpa: F.scaled_dot_product_attention(is_causal=True)
Each output is checked against a float64 numpy reference before it is timed; the timed call returns the
output tensor, not a numpy copy (TVM's .numpy() copies 2 MiB at the default shape, torch's shares memory).
Beside the times: GFLOP/s of the causal half's work (Q K^T and P V over keys j <= i, 2 h d n (n + 1)
operations, whatever an implementation computes) at the median, its % of this CPU's fp32 FMA peak for
--threads cores (targets/cpu_peak.py), and the median's ratio to torch sdpa's in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
from common import peak_line, time_call


def _graph(h, n, d):
    """The Relax graph of the attention as the torch frontend imports the model (K/V broadcast)."""
    from tvm import relax

    op, bb = relax.op, relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, "float32"))
              for name, shape in (("q", (1, h, n, d)), ("k", (1, 1, n, d)), ("v", (1, 1, n, d)))]
    q, k, v = params
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    with bb.function("main", params):
        with bb.dataflow():
            kt = op.reshape(op.broadcast_to(op.permute_dims(k, [0, 1, 3, 2]), (1, h, d, n)), (h, d, n))
            s = op.reshape(op.matmul(op.reshape(q, (h, n, d)), kt), (1, h, n, n))
            p = op.nn.softmax(op.add(op.divide(s, relax.const(math.sqrt(d), "float32")), relax.const(mask)), axis=-1)
            out = op.matmul(op.reshape(p, (h, n, n)), op.reshape(op.broadcast_to(v, (1, h, n, d)), (h, n, d)))
            out = bb.emit_output(op.reshape(out, (1, h, n, d)))
        bb.emit_func_output(out)
    return bb.get()


def _bmvcc(h, n, d, arrays, fused: bool):
    import tvm
    from tvm import relax

    from bmvcc.passes.fuse_causal_attention import REPORT_KEY, fuse_causal_attention
    from bmvcc.schedules.cpu_default import schedule_cpu_module
    from bmvcc.targets import get

    target = get("host").target()
    mod = _graph(h, n, d)
    if fused:
        mod = relax.transform.DeadCodeElimination(["main"])(fuse_causal_attention(mod).without_attr(REPORT_KEY))
    vm = relax.VirtualMachine(tvm.compile(schedule_cpu_module(mod, target), target=target), tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in arrays]
    return lambda: vm["main"](*args)


def _torch(arrays, sdpa: bool):
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.from_numpy(a) for a in arrays)
    n, d = q.shape[-2], q.shape[-1]
    if sdpa:
        k, v = k.expand_as(q), v.expand_as(q)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.triu(torch.full((n, n), float("-inf")), 1)
    return lambda: (q @ k.transpose(-1, -2) / math.sqrt(d) + mask).softmax(-1) @ v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch
    import tvm

    from bmvcc.targets.cpu_peak import host_peak

    torch.set_num_threads(args.threads)
    tvm.get_global_func("runtime.config_threadpool")(0, args.threads)
    h, n, d = args.heads, args.tokens, args.head_dim
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((1, h, n, d), (1, 1, n, d), (1, 1, n, d))]
    q, k, v = (a.astype(np.float64) for a in arrays)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(d) + np.triu(np.full((n, n), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    peers = {"bmvcc fused": lambda: _bmvcc(h, n, d, arrays, True),
             "bmvcc unfused": lambda: _bmvcc(h, n, d, arrays, False),
             "torch eager": lambda: _torch(arrays, False), "torch sdpa": lambda: _torch(arrays, True)}
    rows = []
    for name, make in peers.items():
        fn = make()
        err = float(np.abs(fn().numpy() - ref).max())
        rows.append({"name": name, "max_abs_err": err, **time_call(fn, args.repeat)})
    flop = 2.0 * h * d * n * (n + 1)
    peak = host_peak(args.threads)
    sdpa_ms = next(r["median_ms"] for r in rows if r["name"] == "torch sdpa")
    for r in rows:
        r["gflop_per_s"] = flop / r["median_ms"] / 1e6
        r["percent_of_peak"] = None if peak is None else 100 * r["gflop_per_s"] * 1e9 / peak.fp32_ops_per_s()
        r["vs_torch_sdpa"] = r["median_ms"] / sdpa_ms
    result = {"heads": h, "tokens": n, "head_dim": d, "threads": args.threads, "gflop": flop / 1e9,
              "peak": None if peak is None else peak.describe(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"causal multi-query attention, {h} heads x {n} tokens x {d}, {args.threads} threads, {flop / 1e9:.2f} GFLOP")
    print(peak_line(peak) + "\n")
    print("| implementation | best ms | median ms | GFLOP/s | % of fp32 peak | x torch sdpa "
          "| max abs err vs float64 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        pct = "-" if r["percent_of_peak"] is None else f"{r['percent_of_peak']:.0f}%"
        print(f"| {r['name']} | {r['best_ms']:.2f} | {r['median_ms']:.2f} | {r['gflop_per_s']:.1f} | {pct} "
              f"| {r['vs_torch_sdpa']:.2f} | {r['max_abs_err']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
