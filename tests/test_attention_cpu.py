"""schedules/attention_cpu.py and passes/fuse_causal_attention.py: the causal attention kernel built for
the host and compared with a float64 numpy softmax(scale * q k^T + mask) v.

Tolerance: the kernel sums D products per score and N weighted values per output in float32 (other
order than numpy) and uses TVM's fast exp (<= 1.1e-6 relative), so outputs (convex combinations of
rows of v) are off by a few float32 ulps times the sum lengths: rtol 1e-5 plus 1e-5 x the output's
scale. A wrong row block, a key on the wrong side of the diagonal or a lost tile is off by O(0.1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from bmvcc.passes.fuse_causal_attention import REPORT_KEY, fuse_causal_attention
from bmvcc.passes.relax_match import read_report
from bmvcc.schedules.attention_cpu import AttentionConfig, attention_cpu
from bmvcc.targets import get as get_target

RTOL = 1e-5


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


# (G, Gk, N, D): the paper model's layer (8 query heads on one K/V head, 32 blocks of 32 rows, 32-column
# output tiles), a small multi-head model's (one block of 16 tokens, head_dim 8), and 3 blocks of 8
# rows with 8-wide tiles, 3 query groups per K/V group (N = 24, D = 24)
@pytest.mark.parametrize("g, gk, n, d", [(8, 1, 1024, 64), (4, 4, 16, 8), (6, 2, 24, 24)])
def test_kernel_matches_numpy(target, g, gk, n, d):
    rng = np.random.default_rng(n + d)
    q = rng.standard_normal((g, n, d)).astype("float32")
    k, v = (rng.standard_normal((gk, n, d)).astype("float32") for _ in range(2))
    scale = 3.0 / math.sqrt(d)  # peaky rows: the max subtraction matters
    cfg = AttentionConfig(g, gk, n, d, scale)
    lib = tvm.compile(tvm.IRModule({"main": attention_cpu(cfg).with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(a) for a in (q, np.ascontiguousarray(np.swapaxes(k, 1, 2)), v)]
    out = tvm.runtime.empty((g, n, d), "float32", tvm.cpu())
    lib(*args, out)
    k, v = (np.repeat(t, g // gk, axis=0) for t in (k, v))  # query group i reads K/V group i // (G / Gk)
    _close(out.numpy(), _reference(q, k, v, scale, _causal(n)))


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
    heads, n, d = 4, 32, 16
    mod = fuse_causal_attention(_attention_module(heads, n, d, _causal(n), scale_op, explicit))
    assert _fused(mod) == 1
    mod = relax.transform.DeadCodeElimination(["main"])(mod.without_attr(REPORT_KEY))
    text = mod["main"].script()
    # one kernel reading the single K/V head (not its broadcast copies); scores and softmax are gone
    assert "causal_attention_g4_kv1_n32_d16" in text and "softmax" not in text and "R.matmul" not in text, text
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, heads, n, d)).astype("float32")
    k, v = (rng.standard_normal((1, 1, n, d)).astype("float32") for _ in range(2))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in (q, k, v)]).numpy()
    _close(out, _reference(q, k, v, 0.25, _causal(n)))


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
