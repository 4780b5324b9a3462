"""schedules/attention_cpu.py and passes/fuse_causal_attention.py: the causal attention kernel built for
the host and compared with a float64 numpy softmax(scale * q k^T + mask) v.

Tolerance: the kernel sums D products per score and N weighted values per output in float32 (other
order than numpy), rescales its running sums once per key block (online softmax) and uses TVM's fast
exp (<= 3.1e-7 relative, test_fast_exp_error), so outputs (convex combinations of rows of v) are off
by a few float32 ulps times the sum lengths: rtol 1e-5 plus 1e-5 x the output's scale. A wrong row
block, a key on the wrong side of the diagonal, a lost tile or key block is off by O(0.1).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import tirx as T

from bmvcc.passes.fuse_causal_attention import REPORT_KEY, fuse_causal_attention
from bmvcc.passes.relax_match import read_report
from bmvcc.schedules.attention_cpu import AttentionConfig, Tiles, _fast_exp, attention_cpu, vector_shape
from bmvcc.schedules.cpu_default import schedule_cpu_module
from bmvcc.targets import get as get_target

RTOL = 1e-5
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


# (G, Gk, N, D): the paper model's layer (8 query heads on one K/V head; on AVX-512: 16 row blocks of 64,
# 2 key blocks of 512); a small multi-head model's (16 tokens: one block, mostly rows past N); batch 2 x 3
# query heads on their own K/V heads (N = 24, D = 24: an output tile of 1.5 AVX-512 vectors); batch 3 x 2
# heads with N = 100 (a full and a partial row block) and D = 20; multi-head with an odd head_dim (D = 7),
# the last row block 2 rows; batch 2 x 2 heads, N = 600: a full and a partial key block
@pytest.mark.parametrize("g, gk, n, d", [(8, 1, 1024, 64), (4, 4, 16, 8), (6, 2, 24, 24), (6, 3, 100, 20),
                                         (2, 2, 130, 7), (4, 2, 600, 16)])
def test_kernel_matches_numpy(target, g, gk, n, d):
    _check_kernel(target, target, g, gk, n, d)


def test_portable_kernel_matches_numpy(target):
    """The kernel as the pass emits it, before the schedule stage rebuilds it (PORTABLE vectors)."""
    _check_kernel(None, target, 6, 3, 100, 20)


def _check_kernel(kernel_target, target, g, gk, n, d):
    rng = np.random.default_rng(n + d)
    q = rng.standard_normal((g, n, d)).astype("float32")
    k, v = (rng.standard_normal((gk, n, d)).astype("float32") for _ in range(2))
    scale = 3.0 / math.sqrt(d)  # peaky rows: the max subtraction matters
    lib = tvm.compile(_kernel(AttentionConfig(g, gk, n, d, scale), kernel_target), target=target)
    args = [tvm.runtime.tensor(a) for a in (q, np.ascontiguousarray(np.swapaxes(k, 1, 2)), v)]
    out = tvm.runtime.empty((g, n, d), "float32", tvm.cpu())
    lib(*args, out)
    k, v = (np.repeat(t, g // gk, axis=0) for t in (k, v))  # query group i reads K/V group i // (G / Gk)
    _close(out.numpy(), _reference(q, k, v, scale, _causal(n)))


@pytest.mark.parametrize("spec, lanes", CPUS, ids=[c[0]["mcpu"] for c in CPUS])
def test_tiles_follow_the_target(spec, lanes):
    """Vectors and register tiles from the target's SIMD registers (built, not run): zmm code for AVX-512
    only, 4-lane FMAs on Arm; the accumulators of both micro kernels fit the registers beside one row of
    operands."""
    target = tvm.target.Target(spec)
    cfg = AttentionConfig(8, 1, 1024, 64, 0.125)
    tiles = Tiles.of(cfg, *vector_shape(target))
    registers = vector_shape(target)[1]
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


def _fuse_build_run(target, heads, n, d, scale_op, explicit=True):
    """The pass fuses the attention into one kernel reading the single K/V head (not its broadcast
    copies), scores and softmax gone; the CPU schedule stage rebuilds it for the target; it matches numpy."""
    mod = fuse_causal_attention(_attention_module(heads, n, d, _causal(n), scale_op, explicit))
    assert _fused(mod) == 1
    mod = relax.transform.DeadCodeElimination(["main"])(mod.without_attr(REPORT_KEY))
    text = mod["main"].script()
    kernel = f"causal_attention_g{heads}_kv1_n{n}_d{d}"
    assert kernel in text and "softmax" not in text and "R.matmul" not in text, text
    report: dict = {}
    mod = schedule_cpu_module(mod, target, report)
    assert report[kernel] == "kernel:attention" and mod[kernel].attrs["tirx.is_scheduled"]
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, heads, n, d)).astype("float32")
    k, v = (rng.standard_normal((1, 1, n, d)).astype("float32") for _ in range(2))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in (q, k, v)]).numpy()
    scale = float(np.float32(1 / 4.0)) if n == 32 else 1 / math.sqrt(d)
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
