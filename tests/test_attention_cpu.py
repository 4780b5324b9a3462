"""schedules/attention_cpu.py and passes/fuse_causal_attention.py: the causal attention kernel built for
the host and compared with a float64 numpy softmax(scale * q k^T + mask) v.

Tolerance: the kernel sums D products per score and N weighted values per output in float32 (other
order than numpy), rescales its running sums once per key block (online softmax) and uses TVM's fast
exp (<= 3.1e-7 relative, test_fast_exp_error), so outputs (convex combinations of rows of v) are off
by a few float32 ulps times the sum lengths: rtol 1e-5 plus 1e-5 x the output's scale. A wrong row
block, a key on the wrong side of the diagonal, a lost tile or key block is off by O(0.1).
The bf16 kernel (--float-precision bf16) is held to its error bound (the kernel's docstring) against float64 of
its bf16-rounded operands, and to bf16's worst case against float32.
"""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import tirx as T

from bmvcc.passes.fuse_causal_attention import REPORT_KEY, fuse_causal_attention
from bmvcc.passes.pipeline import run_pipeline
from bmvcc.passes.relax_match import read_report
from bmvcc.schedules.attention_cpu import AttentionConfig, Tiles, _fast_exp, attention_cpu, vector_shape
from bmvcc.schedules.cpu_default import schedule_cpu_module
from bmvcc.schedules.cpu_rules.common import CpuFacts
from bmvcc.schedules.w2a8 import CONFIG_ATTR, attr_value
from bmvcc.targets import get as get_target

from test_bf16_cpu import needs_bf16

RTOL = 1e-5
U, U32 = 2.0**-8, 2.0**-24  # unit roundoffs of bf16 (round to nearest even) and float32
# CPUs of the CI machines (built, not run, here): AVX2 only, AVX-512, Armv8.2 NEON: (target, float32 lanes)
CPUS = [({"kind": "llvm", "mcpu": "znver2", "num-cores": 2}, 8),
        ({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}, 16),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+dotprod"]}, 4)]




@pytest.fixture(scope="module")
def target():
    return get_target("host").target()


def _reference(q, k, v, scale, mask):
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) * scale + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _causal(n):
    return np.triu(np.full((n, n), -np.inf, np.float32), 1)


def _close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def _kernel(cfg, target):
    return tvm.IRModule({"main": attention_cpu(cfg, target).with_attr("global_symbol", "main")})


# (G, Gk, N, D): a small multi-head model's (16 tokens: one block, mostly rows past N); batch 2 x 3 query heads on
# their own K/V heads (N = 24, D = 24: an output tile of 1.5 AVX-512 vectors); batch 3 x 2 heads with N = 100 (a full
# and a partial row block) and D = 20; multi-head with an odd head_dim (D = 7), the last row block 2 rows; batch 2 x 2
# heads, N = 600: a full and a partial key block
ATTENTION_CASES = [(4, 4, 16, 8), (6, 2, 24, 24), (6, 3, 100, 20), (2, 2, 130, 7), (4, 2, 600, 16)]


# ATTENTION_CASES and the paper model's layer (8 query heads on one K/V head; on AVX-512: 16 row blocks of 64, 2 key
# blocks of 512)
@pytest.mark.parametrize("g, gk, n, d", [(8, 1, 1024, 64), *ATTENTION_CASES])
def test_kernel_matches_numpy(target, g, gk, n, d):
    _check_kernel(target, target, g, gk, n, d)


def test_portable_kernel_matches_numpy(target):
    """The kernel as the pass emits it, before the schedule stage rebuilds it (PORTABLE vectors)."""
    _check_kernel(None, target, 6, 3, 100, 20)


def _operands(g, gk, n, d):
    """Seeded q [G, N, D], k, v [Gk, N, D] and scale 3 / sqrt(D) (in float32: peaky rows, the max subtraction
    matters)."""
    rng = np.random.default_rng(n + d)
    q = rng.standard_normal((g, n, d)).astype("float32")
    k, v = (rng.standard_normal((gk, n, d)).astype("float32") for _ in range(2))
    return q, k, v, np.float32(3.0 / math.sqrt(d))


def _attention_case(g, gk, n, d):
    """(args, operands) on _operands: the kernel's inputs (q, k transposed [Gk, D, N], v) and the references' (q, k,
    v, scale), k and v repeated per query group (group i reads K/V group i // (G / Gk))."""
    q, k, v, scale = _operands(g, gk, n, d)
    return (q, np.ascontiguousarray(np.swapaxes(k, 1, 2)), v), (q, *(np.repeat(t, g // gk, axis=0) for t in (k, v)),
                                                                 scale)


def _run_kernel(kernel_target, target, g, gk, n, d, bf16=False):
    """(q, k, v, out, scale): the kernel built for `kernel_target` run on _attention_case's inputs; q, k, v, scale
    the references' operands."""
    args, (q, k, v, scale) = _attention_case(g, gk, n, d)
    lib = tvm.compile(_kernel(AttentionConfig(g, gk, n, d, float(scale), bf16), kernel_target), target=target)
    out = tvm.runtime.empty((g, n, d), "float32", tvm.cpu())
    lib(*(tvm.runtime.tensor(a) for a in args), out)
    return q, k, v, out.numpy(), scale


def _check_kernel(kernel_target, target, g, gk, n, d):
    q, k, v, out, scale = _run_kernel(kernel_target, target, g, gk, n, d)
    _close(out, _reference(q, k, v, scale, _causal(n)))


def _bf16(x):
    """x rounded to nearest even at bf16 precision through float32 (as the kernel rounds float32 values), float64."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _truncated(x):
    """x's float32 values cut to bf16 (low 16 bits dropped): what a kernel that truncated would multiply."""
    return (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)


def _swap_pairs(x, axis):
    """x with its elements 2i and 2i + 1 along `axis` swapped (an odd last one stays): a pair layout off by one."""
    idx = np.arange(x.shape[axis])
    idx[: len(idx) // 2 * 2] = idx[: len(idx) // 2 * 2].reshape(-1, 2)[:, ::-1].ravel()
    return np.take(x, idx, axis)


def _bf16_attention(q, k, v, keys, rounding=_bf16):
    """(out, p, s, block_max): float64 attention of the bf16 kernel's operands (q scaled, k, v [G, N, D], rounded
    by the caller), each block of `keys` keys' probabilities exp(s - m) rounded by `rounding` with m the row max up
    to the block's end (the kernel's running max), then scaled to the row's final max (the kernel's rescales)."""
    n = q.shape[1]
    s = q @ np.swapaxes(k, 1, 2) + _causal(n)
    final, p, block_max = s.max(-1, keepdims=True), np.zeros_like(s), np.zeros_like(s)
    for k0 in range(0, n, keys):
        block_max[..., k0:k0 + keys] = s[..., :k0 + keys].max(-1, keepdims=True)
        p[..., k0:k0 + keys] = rounding(np.exp(s[..., k0:k0 + keys] - block_max[..., k0:k0 + keys]))
    p *= np.exp(block_max - final)
    return (p @ v) / p.sum(-1, keepdims=True), p, s, block_max


def _bf16_reference(qs, k, v, keys):
    """(reference, tolerance) of the bf16 kernel for the float32 scaled q, k and v (per query group)."""
    q16, k16, v16 = (_bf16(t) for t in (qs, k, v))
    ref, p, s, block_max = _bf16_attention(q16, k16, v16, keys)
    return ref, _bf16_bound(q16, k16, v16, ref, p, s, block_max, keys)


def _bf16_bound(q, k, v, out, p, s, block_max, keys):
    """The bf16 kernel's error bound (schedules/attention_cpu.py) against _bf16_attention of the same rounded
    operands: the fp32 sums of the scores (Δs), which with the fast exp (3.1e-7) move each probability before its
    rounding by η and so may round it to the neighbouring bf16 where it lies within η of a tie (A: that ulp, scaled
    as p), and the blocks' weights against each other by β (rescales); fp32 sums of N terms in o and the row sums.
    Rows' |v - out| bounded by |v| + |out|, so that it takes matrix products (about 2x loose)."""
    n, d = q.shape[1:]
    ds = 1.01 * d * U32 * (np.abs(q) @ np.abs(np.swapaxes(k, 1, 2)))  # |Δs|: the scores' fp32 sums
    kept = np.isfinite(s)  # keys not masked
    worst = np.where(kept, ds, 0).max(-1, keepdims=True)
    x = s - block_max  # exp's argument
    eta = 1.01 * (ds + worst + U32 * np.where(kept, np.abs(x), 0)) + 3.1e-7 + 2 * U32
    lo, hi = (_bf16(np.exp(x) * f) for f in (1 - eta, 1 + eta))
    final = s.max(-1, keepdims=True)
    amb = (hi - lo) * np.exp(block_max - final)  # 0 where both round alike
    blocks = np.ceil((np.arange(n) + 1) / keys)[:, None]  # key blocks a row's keys span
    beta = (blocks - 1) * (2 * worst + 3.1e-7 + U32 * np.abs(final - block_max[..., :1]))
    w, a = p.sum(-1, keepdims=True), amb.sum(-1, keepdims=True)
    gamma = 1.01 * (n + 2 * blocks + 3) * U32
    moved = ((amb + beta * p) @ np.abs(v) + np.abs(out) * (a + beta * w)) / (w - a) * (1 + beta)
    return moved + gamma * (p @ np.abs(v) + np.abs(out) * w) / w


@needs_bf16
@pytest.mark.parametrize("g, gk, n, d", [(2, 1, 1024, 64), (6, 3, 100, 20), (2, 2, 130, 7), (4, 2, 600, 16)])
def test_bf16_kernel_is_exact_bf16_products_with_fp32_sums(target, g, gk, n, d):
    """Against float64 of the operands rounded to nearest even (ml_dtypes), the kernel is within its bound
    (_bf16_bound); operands truncated instead, or K's pairs along d or V's pairs of keys swapped, are not
    (negative controls: the kernel's output would be theirs). Against float32 (_reference), within bf16's own
    worst case: scores moved by (2u + u^2) sum_d |q k| each, P and V by u, so weights by a factor within
    F = exp(2 max δ) (1 + u) / (1 - u) of each other and the output by (F (1 + u) - 1) sum_j w |v| (w: float32's
    weights), plus the kernel's own bound.
    Cases: 2 of the paper layer's 8 heads (2 key blocks), D padded to 32 output columns, odd D and N, 600 keys
    (a full and a partial key block)."""
    q, k, v, out, scale = _run_kernel(target, target, g, gk, n, d, bf16=True)
    keys = Tiles.of(AttentionConfig(g, gk, n, d, float(scale), True), *vector_shape(CpuFacts.of(target)),
                    whole_vectors=True).keys
    qs = q * scale  # float32, as the kernel scales q before rounding it
    ref, tolerance = _bf16_reference(qs, k, v, keys)
    assert (np.abs(out - ref) <= tolerance).all()
    q16, k16, v16 = (_bf16(t) for t in (qs, k, v))
    for wrong in (_bf16_attention(*(_truncated(t) for t in (qs, k, v)), keys, _truncated),
                  _bf16_attention(q16, _swap_pairs(k16, 2), v16, keys),
                  _bf16_attention(q16, k16, _swap_pairs(v16, 1), keys)):
        assert (np.abs(wrong[0] - ref) > tolerance).mean() > 0.9
    s = qs.astype(np.float64) @ np.swapaxes(k, 1, 2) + _causal(n)
    weights = np.exp(s - s.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)  # float32's: _reference(qs, k, v, 1, mask) = weights @ v
    delta = (2 * U + U * U) * (np.abs(qs.astype(np.float64)) @ np.abs(np.swapaxes(k, 1, 2))).max(-1, keepdims=True)
    spread = np.exp(2 * delta) * (1 + U) / (1 - U)
    loose = (spread * (1 + U) - 1) * weights @ np.abs(v) + tolerance
    assert (np.abs(out - weights @ v) <= loose).all()


@pytest.mark.parametrize("mcpu", ["sapphirerapids", "znver4"])
def test_bf16_products_on_vdpbf16ps(mcpu):
    """Built (not run) for CPUs with AVX-512 BF16: a bf16 config's register tiles on zmm vdpbf16ps (8 x 2 vectors of
    scores, 4 x 4 of output per step, unrolled)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    asm = tvm.compile(_kernel(AttentionConfig(8, 1, 1024, 64, 0.125, True), target), target=target).mod
    assert len(re.findall(r"vdpbf16ps\s+\S+, %zmm\d+, %zmm\d+", asm.inspect_source("asm"))) >= 32


def test_bf16_kernel_refused_without_vdpbf16ps():
    """A bf16 config for an AVX-512 CPU without BF16 (Skylake-SP) is an internal error, not a float32 kernel under
    a bf16 name (precision.check refuses such a build first); without a target, the portable float32 kernel."""
    bf16, fp32 = AttentionConfig(8, 1, 1024, 64, 0.125, True), AttentionConfig(8, 1, 1024, 64, 0.125)
    with pytest.raises(ValueError, match="needs a CPU with vdpbf16ps"):
        attention_cpu(bf16, tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    tvm.ir.assert_structural_equal(*(attention_cpu(cfg).without_attr(CONFIG_ATTR) for cfg in (bf16, fp32)))


@pytest.mark.parametrize("spec, lanes", CPUS, ids=[c[0]["mcpu"] for c in CPUS])
def test_tiles_follow_the_target(spec, lanes):
    """Vectors and register tiles from the target's SIMD registers (built, not run): zmm code for AVX-512
    only, 4-lane FMAs on Arm; the accumulators of both micro kernels fit the registers beside one row of
    operands."""
    target = tvm.target.Target(spec)
    cfg = AttentionConfig(8, 1, 1024, 64, 0.125)
    shape = vector_shape(CpuFacts.of(target))
    tiles, registers = Tiles.of(cfg, *shape), shape[1]
    assert tiles.lanes == lanes and tiles.nr == 2 * lanes and tiles.nc % lanes == 0
    assert (tiles.mr + 1) * 2 < registers and (tiles.mr2 + 1) * tiles.nc // lanes < registers
    assert tiles.rows % tiles.nr == 0 and tiles.rows % tiles.mr == 0 and tiles.rows % tiles.mr2 == 0
    asm = tvm.compile(_kernel(cfg, target), target=target).mod.inspect_source("asm")
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        assert re.search(r"fmla\tv\d+\.4s", asm)
    else:
        assert ("%zmm" in asm) == (lanes == 16) and "%ymm" in asm


def test_fast_exp_error(target):
    """The kernel's exp against float64: <= 3.1e-7 relative (2.6 float32 ulps) where float32 is normal
    (x >= -87.3); below, 0 <= exp(x) < 1.2e-38 absolute (a weight no row sum can notice)."""
    n = 1 << 16

    @T.prim_func
    def exp(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in range(n // 8):
            for l in T.vectorized(8):
                y[i * 8 + l] = _fast_exp(x[i * 8 + l])

    lib = tvm.compile(tvm.IRModule({"main": exp}), target=target)
    x = np.concatenate([np.linspace(-87.3, 0, n // 2), np.linspace(-3e38, -87.3, n // 2)]).astype("float32")
    y = tvm.runtime.empty((n,), "float32")
    lib(tvm.runtime.tensor(x), y)
    y, ref = y.numpy().astype(np.float64), np.exp(x.astype(np.float64))
    normal = x >= -87.3
    assert np.max(np.abs(y - ref)[normal] / ref[normal]) <= 3.1e-7
    assert np.all(y[~normal] >= 0) and np.all(y[~normal] < 1.2e-38)


def _attention_module(heads, n, d, mask, scale_op, explicit=True):
    """softmax(scale(q k^T) + mask) v with one k/v head for `heads` query heads, broadcast as the torch
    frontend emits it (explicit: broadcast_to, then 3-D matmuls) or as the ONNX import does (4-D
    matmuls broadcasting k and v themselves)."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, heads, n, d), "float32"))
    k = relax.Var("k", relax.TensorType((1, 1, n, d), "float32"))
    v = relax.Var("v", relax.TensorType((1, 1, n, d), "float32"))
    op = relax.op
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            kt = op.permute_dims(k, [0, 1, 3, 2])
            if explicit:
                s = op.matmul(op.reshape(q, (heads, n, d)), op.reshape(op.broadcast_to(kt, (1, heads, d, n)), (heads, d, n)))
                s = op.reshape(bb.emit(s), (1, heads, n, n))
            else:
                s = op.matmul(q, kt)
            s = scale_op(s)
            if mask is not None:
                s = op.add(s, relax.const(mask))
            p = op.nn.softmax(s, axis=-1)
            if explicit:
                out = op.matmul(op.reshape(p, (heads, n, n)), op.reshape(op.broadcast_to(v, (1, heads, n, d)), (heads, n, d)))
                out = op.reshape(out, (1, heads, n, d))
            else:
                out = op.matmul(p, v)
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()


def _fused(mod) -> int:
    return read_report(mod, REPORT_KEY)["fused"]


@pytest.mark.parametrize("target, bf16_kernels", [("host", 1), ("jetson-orin-nano", 0)])
def test_pipeline_counts_bf16_attention_from_the_pass(target, bf16_kernels):
    """bf16_attention counts the kernels fuse_causal_attention built on bf16 products: a CUDA pipeline asked for bf16
    (which precision.check refuses before) fuses its attention for the GPU, none of it bf16."""
    mod = _attention_module(4, 32, 16, _causal(32), lambda s: relax.op.divide(s, relax.const(4.0, "float32")))
    _, _, report = run_pipeline(mod, get_target(target), bitlinear=False, float_precision="bf16")
    assert report["causal_attention_fused"] == 1 and report["bf16_attention"] == bf16_kernels


@pytest.mark.parametrize("explicit", [True, False], ids=["broadcast_to", "matmul-broadcast"])
@pytest.mark.parametrize("scale_op", [
    lambda s: relax.op.divide(s, relax.const(4.0, "float32")),
    lambda s: relax.op.multiply(relax.const(0.25, "float32"), s),
], ids=["divide", "multiply"])
def test_pass_fuses_causal_attention(target, scale_op, explicit):
    _fuse_build_run(target, 4, 32, 16, scale_op, explicit)


def test_pass_fuses_any_token_count(target):
    """25 tokens of head_dim 12 (a 35 x 35 image in patches of 7): no multiple of any vector or tile."""
    _fuse_build_run(target, 2, 25, 12, lambda s: relax.op.divide(s, relax.const(math.sqrt(12), "float32")))


@needs_bf16
def test_pass_asks_for_bf16_products(target):
    """fuse_causal_attention(bf16=True) (--float-precision bf16 builds): the kernel, named ..._bf16, carries bf16 in
    its config, from which the schedule stage rebuilds it on vdpbf16ps: within the bf16 bound, not float32's."""
    _fuse_build_run(target, 4, 32, 16, lambda s: relax.op.divide(s, relax.const(4.0, "float32")), bf16=True)


def _fuse_build_run(target, heads, n, d, scale_op, explicit=True, bf16=False):
    """The pass fuses the attention into one kernel reading the single K/V head (not its broadcast
    copies), scores and softmax gone; the CPU schedule stage rebuilds it for the target; it matches numpy
    (bf16: within the bf16 kernel's bound, one key block)."""
    mod = fuse_causal_attention(_attention_module(heads, n, d, _causal(n), scale_op, explicit), bf16=bf16)
    assert read_report(mod, REPORT_KEY) == {"fused": 1, "bf16": int(bf16)}
    mod = relax.transform.DeadCodeElimination(["main"])(mod.without_attr(REPORT_KEY))
    text = mod["main"].script()
    scale = float(np.float32(1 / 4.0)) if n == 32 else 1 / math.sqrt(d)
    kernel = AttentionConfig(heads, 1, n, d, scale, bf16).name
    assert kernel in text and "softmax" not in text and "R.matmul" not in text, text
    report: dict = {}
    mod = schedule_cpu_module(mod, target, report)
    assert report[kernel] == "kernel:attention" and mod[kernel].attrs["tirx.is_scheduled"]
    assert attr_value(mod[kernel].attrs[CONFIG_ATTR])["bf16"] == bf16
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, heads, n, d)).astype("float32")
    k, v = (rng.standard_normal((1, 1, n, d)).astype("float32") for _ in range(2))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in (q, k, v)]).numpy()
    if bf16:  # batch 1: q's heads on the one K/V head
        k1, v1 = (np.repeat(t[0], heads, 0) for t in (k, v))
        ref, tolerance = _bf16_reference(q[0] * np.float32(scale), k1, v1, n)
        assert (np.abs(out[0] - ref) <= tolerance).all()
        assert np.abs(out[0] - _reference(q[0], k1, v1, scale, _causal(n))).max() > 100 * RTOL  # bf16 shows
    else:
        _close(out, _reference(q, k, v, scale, _causal(n)))


@pytest.mark.parametrize("mask", [
    None,  # multi-head BitMedViT: no mask
    np.zeros((32, 32), np.float32),
    np.triu(np.full((32, 32), -np.inf, np.float32), 2),  # one more key than causal
    np.triu(np.full((32, 32), -1e9, np.float32), 1),  # finite mask: not the kernel's exact zeros
], ids=["none", "zeros", "offset", "finite"])
def test_pass_leaves_other_attention(mask):
    mod = _attention_module(4, 32, 16, mask, lambda s: relax.op.divide(s, relax.const(4.0, "float32")))
    out = fuse_causal_attention(mod)
    assert _fused(out) == 0
    tvm.ir.assert_structural_equal(out["main"], mod["main"])
