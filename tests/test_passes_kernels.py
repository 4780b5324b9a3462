"""The kernels the BitLinear passes emit, built alone on llvm, against numpy references.

norm_quant: float32 arithmetic in the same order as the kernel, so codes and scales are
compared exactly; exact .5 ties must round half to even as torch.round does.
W2A8 epilogues: w2a8_numpy (float64 math.erf for GELU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from bmvcc.schedules import norm_quant_cpu
from bmvcc.schedules.norm_quant import NormQuantConfig, norm_quant_compute, norm_quant_numpy
from bmvcc.schedules.w2a8 import EPILOGUES, W2A8Config, epilogue_operand, pack_ternary, w2a8_compute, w2a8_numpy

TARGET = tvm.target.Target({"kind": "llvm"})


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)


def _norm_quant(cfg: NormQuantConfig, x, g, scheduled: bool, beta=None):
    func = norm_quant_compute(cfg)
    lib = _build(norm_quant_cpu.schedule(func, TARGET) if scheduled else func)
    q = tvm.runtime.empty((cfg.m, cfg.k), "int8", tvm.cpu())
    xs = tvm.runtime.empty((cfg.m, 1), "float32", tvm.cpu())
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, g) + ((beta,) if cfg.layer_norm else ())), q, xs)
    return q.numpy(), xs.numpy()


def _kernel_order_reference(x, g, norm_eps=1e-5, lanes=1, beta=None):
    """norm_quant_numpy (the LayerNorm variant with `beta`) with each row sum taken in float32 as the
    kernel takes it: `lanes` partial sums (lane l over k = l, l + lanes, ... left to right), then
    those added left to right."""
    m, k = x.shape

    def row_sum(v):
        parts = np.cumsum(v.reshape(m, k // lanes, lanes), axis=1, dtype=np.float32)[:, -1]
        return np.cumsum(parts, axis=-1, dtype=np.float32)[:, -1:]

    if beta is not None:
        x = x - row_sum(x) / np.float32(k)
    rstd = (np.float32(1) / np.sqrt(row_sum(x * x) / np.float32(k) + np.float32(norm_eps))).astype(np.float32)
    xn = x * rstd * g + (0 if beta is None else beta)
    xs = (np.float32(1) / np.maximum(np.abs(xn).max(-1, keepdims=True), np.float32(1e-5))) * np.float32(127)
    return np.clip(np.rint(xn * xs), -128, 127).astype(np.int8), xs.astype(np.float32)


def _norm_quant_rows(m, layer_norm, k=96):
    """Seeded (x [m, k], gain, beta: None unless layer_norm); x off zero (LayerNorm's mean matters)."""
    rng = np.random.RandomState(0)
    x = (rng.randn(m, k) * 3 + 0.5).astype(np.float32)
    g = (1 + 0.3 * rng.randn(k)).astype(np.float32)
    return x, g, (0.2 * rng.randn(k)).astype(np.float32) if layer_norm else None


@pytest.mark.parametrize("m", [12, 7])  # rows in groups of 4, or one by one
@pytest.mark.parametrize("layer_norm", [False, True], ids=["rms", "layer"])
@pytest.mark.parametrize("scheduled", [False, True])
def test_norm_quant_matches_numpy(scheduled, layer_norm, m):
    x, g, beta = _norm_quant_rows(m, layer_norm)
    k = x.shape[1]
    q, xs = _norm_quant(NormQuantConfig(m, k, layer_norm=layer_norm), x, g, scheduled, beta)
    lanes = norm_quant_cpu.reduction_lanes(k) if scheduled else 1
    q_ref, xs_ref = _kernel_order_reference(x, g, lanes=lanes, beta=beta)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(xs, xs_ref)
    other_order = _kernel_order_reference(x, g, lanes=1 if scheduled else 4, beta=beta)[1]
    assert not np.array_equal(xs, other_order)  # these rows tell the summation orders apart
    # the pairwise-summed reference may differ by an ulp in rstd: at most a 1-code flip
    assert np.abs(q.astype(int) - norm_quant_numpy(x, g, beta=beta)[0]).max() <= 1


# Rows of 2.0 with norm_eps 0 give rstd = 0.5 exactly, so xn = gain; max |gain| = 127 makes
# x_scale = fl(1/127) * 127 = 1 exactly and xn * x_scale = gain: exact .5 ties.
TIES_GAIN = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -126.5, 126.5, 4.5, -4.5, 0, 1, -1, 5.5], np.float32)


@pytest.mark.parametrize("scheduled", [False, True])
def test_norm_quant_rounds_ties_half_to_even_like_torch(scheduled):
    """TIES_GAIN's rows: exact .5 ties."""
    gain = TIES_GAIN
    k = len(gain)
    x = np.full((2, k), 2.0, np.float32)
    q, xs = _norm_quant(NormQuantConfig(2, k, norm_eps=0.0), x, gain, scheduled)
    assert np.all(xs == 1.0)
    expected = torch.round(torch.from_numpy(gain)).to(torch.int8).numpy()  # half to even
    np.testing.assert_array_equal(q[0], expected)
    assert q[0, 1] == 0 and q[0, 3] == 2 and q[0, 6] == -2  # not half away from zero (1, 3, -3)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_w2a8_epilogues_match_numpy(epilogue):
    rng = np.random.RandomState(1)
    m, n, k = 8, 24, 36  # k not a multiple of 16: the packed row has a partial last group
    q = rng.randint(-128, 128, (m, k)).astype(np.int8)
    codes = rng.randint(-1, 2, (n, k))
    packed = pack_ternary(codes)
    xs = (127 / rng.uniform(0.5, 4, (m, 1))).astype(np.float32)
    ws = np.array([0.03], np.float32)
    res = rng.randn(m, n).astype(np.float32)
    lib = _build(w2a8_compute(W2A8Config(m, n, k, epilogue)))
    out = tvm.runtime.empty((m, n), "float32", tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in (q, packed, xs, ws)]
    operand = epilogue_operand(epilogue)
    if operand is not None:
        res = res[:1] if operand == "bias" else res  # a bias is one row [1, N]
        args.append(tvm.runtime.tensor(res))
    lib["main"](*args, out)
    ref = w2a8_numpy(q, packed, xs, float(ws[0]), k, epilogue, res)
    # exact int32 accumulation; the float epilogue differs by rounding only (TVM's float32 erf vs
    # float64 math.erf for GELU): 1e-5 on outputs of magnitude <= ~5
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_norm_quant_wakes_the_thread_pool_only_for_enough_work():
    from bmvcc.schedules.norm_quant_cpu import MIN_PARALLEL_ELEMENTS

    for m, k in ((12, 96), (MIN_PARALLEL_ELEMENTS // 256, 256)):
        script = norm_quant_cpu.schedule(norm_quant_compute(NormQuantConfig(m, k)), TARGET).script()
        assert ("T.parallel" in script) == (m * k >= MIN_PARALLEL_ELEMENTS), (m, k)
