"""What the benchmark scripts share: the paper-size model, a timer and the ONNX Runtime peer."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


# The paper's BitMedViT: its 6,291,456 ternary weights are the FFN's (attention is float, fp_attn=1).
PAPER = dict(image_size=224, patch_size=7, channels=3, num_classes=9, dim=512, depth=3, heads=8,
             mlp_dim=2048, multi_query=True, fp_attn=True)


def model_macs(cfg: dict) -> tuple[int, int]:
    """(int8, float) multiply-accumulates of one image through the multi-query, float-attention BitMedViT
    (PAPER): the ternary FFN is int8; the patch embedding, Q/K/V/out projections, head and the causal
    attention (Q K^T and P V over the unmasked half, the diagonal included) are float."""
    assert cfg["multi_query"] and cfg["fp_attn"], "counts written for the paper's multi-query float attention"
    n = (cfg["image_size"] // cfg["patch_size"]) ** 2
    dim, head_dim = cfg["dim"], cfg["dim"] // cfg["heads"]
    ffn = 2 * n * dim * cfg["mlp_dim"]
    projections = n * (2 * dim * dim + 2 * dim * head_dim)  # Q and out dim x dim, K and V one head each
    attention = 2 * cfg["heads"] * head_dim * n * (n + 1) // 2
    embed = n * cfg["channels"] * cfg["patch_size"] ** 2 * dim
    return cfg["depth"] * ffn, embed + cfg["depth"] * (projections + attention) + dim * cfg["num_classes"]


def gemm_args(doc: str, shapes: str, threads: int, repeat: int) -> argparse.ArgumentParser:
    """The options of the M x K x N kernel benchmarks (bench_w2a8_cpu.py, bench_matmul_cpu.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--m", type=int, default=1024, help="rows (tokens x batch)")
    ap.add_argument("--shapes", default=shapes, help="comma-separated KxN")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    return ap


def peak_line(peak) -> str:
    """A report's "peak:" line: this CPU's peak on the cores used (targets/cpu_peak.CpuPeak) or why it is unknown."""
    return f"peak: {peak.describe() if peak else 'unknown (CPU not in targets/cpu_peak.py, or clock not measurable)'}"


def print_gemm_table(what: str, args, peak, rows: list[dict], rate: tuple[str, str], percent: tuple[str, str],
                     tail: str, tail_cell) -> None:
    """The text report of an M x K x N kernel benchmark (gemm_args): `what`, the peak line, then a line per shape
    and implementation (rows: {"m", "k", "n", "impls": {name: stats}}): its best (median) ms, the stats of
    `rate` and `percent` ((stats key, column header); the percent None where the peak is unknown) and last the
    column `tail`, tail_cell(row, name, stats)."""
    print(f"{what}, {args.threads} threads, best of {args.repeat} (median in parentheses)")
    print(peak_line(peak))
    width = max(len(name) for r in rows for name in r["impls"])
    print(f"{'M':>5} {'K':>5} {'N':>5}  {'impl':<{width}} {'ms':>16} {rate[1]:>8} {percent[1]:>7}  {tail}")
    for r in rows:
        for name, s in r["impls"].items():
            pct = f"{'-':>7}" if s[percent[0]] is None else f"{s[percent[0]]:>6.0f}%"
            print(f"{r['m']:>5} {r['k']:>5} {r['n']:>5}  {name:<{width}} {s['best_ms']:>7.2f} ({s['median_ms']:>6.2f})"
                  f" {s[rate[0]]:>8.1f} {pct}  {tail_cell(r, name, s)}")


def time_call(fn, repeat: int) -> dict:
    """Best and median wall time of `repeat` calls after one warm-up (first touch, thread pools)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times)}


def paper_checkpoint(directory: Path, seed: int = 0):
    """(eval model, path of its state dict) for the paper-size configuration, random weights."""
    import torch

    from bmvcc.model import BitMedViT, ViTConfig

    torch.manual_seed(seed)
    model = BitMedViT(ViTConfig(**PAPER)).eval()
    path = Path(directory) / "paper.pth"
    torch.save(model.state_dict(), path)
    return model, path


def onnxruntime_session(checkpoint: Path, directory: Path, threads: int):
    """The checkpoint exported by `bmvcc export-onnx` in an ONNX Runtime CPU session (default graph
    optimizations); a callable."""
    import onnxruntime as ort

    from bmvcc.onnx_export import export_checkpoint

    path = Path(directory) / "model.onnx"
    export_checkpoint(checkpoint, path, batch=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]
