"""Each BitLinear pass alone on small Relax modules imported from PyTorch, before/after.

Numerical references: the PyTorch modules themselves (torch.export -> Relax is the input) and the
numpy references in schedules/ (w2a8_numpy, norm_quant_numpy, unpack_ternary).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from torch.nn import functional as F
from tvm import relax

from bmvcc.frontend import Source, to_relax
from bmvcc.model import BitLinear
from bmvcc.passes.drop_training_outputs import drop_training_outputs
from bmvcc.passes.fuse_norm_quant import fuse_norm_quant
from bmvcc.passes.fuse_w2a8_epilogue import fuse_w2a8_epilogue
from bmvcc.passes.quantize_bitlinear import quantize_bitlinear
from bmvcc.passes.relax_match import REPORT_PREFIX, read_report
from bmvcc.schedules.w2a8 import W2A8Config, unpack_ternary, w2a8_compute

T, K, F_ = 16, 64, 128  # tokens, features, hidden features


class Ffn(nn.Module):
    """x + down(gelu(up(x))): two BitLinears, a GELU and a residual add."""

    def __init__(self, up: nn.Module | None = None):
        super().__init__()
        self.up = up if up is not None else BitLinear(K, F_)
        self.act = nn.GELU()
        self.down = BitLinear(F_, K)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class NoRoundBitLinear(BitLinear):
    """Activation quantization without round: not int8 codes, must stay float."""

    def forward(self, x):
        xn = self.norm(x)
        s_x = 127.0 / xn.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        xq = (xn * s_x).clamp(-128, 127) / s_x
        s_w = 1.0 / self.weight.abs().mean().clamp(min=1e-5)
        return F.linear(xq, (self.weight * s_w).round().clamp(-1, 1) / s_w)


class FloatWeightBitLinear(BitLinear):
    """Activations quantized, weight used as is (not ternary): must stay float."""

    def forward(self, x):
        xn = self.norm(x)
        s_x = 127.0 / xn.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        return F.linear((xn * s_x).round().clamp(-128, 127) / s_x, self.weight)


class ReciprocalBitLinear(BitLinear):
    """Equivalent spelling: q * (1 / s) and x / sqrt(.) instead of q / s and x * rsqrt(.)."""

    def forward(self, x):
        xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm.weight
        s_x = 127.0 / xn.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        xq = (xn * s_x).round().clamp(-128, 127) * (1.0 / s_x)
        s_w = 1.0 / self.weight.abs().mean().clamp(min=1e-5)
        return F.linear(xq, (self.weight * s_w).round().clamp(-1, 1) / s_w)


def _realistic(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / math.sqrt(p.shape[1]) if p.dim() == 2 else 1.0 + 0.3 * noise)
    return module.eval()


def _import(module: nn.Module):
    return relax.transform.CanonicalizeBindings()(to_relax(Source(module, (T, K), K, Path("test")), 1))


def _x(seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randn(1, T, K).astype(np.float32)


def _run(mod, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(relax.transform.DeadCodeElimination(["main"])(mod), target="llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()  # the importer may return a 1-tuple


def _ops(mod) -> list[str]:
    names = []

    @relax.expr_functor.visitor
    class V(relax.PyExprVisitor):
        def visit_call_(self, call):
            if call.op.same_as(tvm.ir.Op.get("relax.call_tir")):
                names.append(call.args[0].name_hint)  # the kernel's name
            elif isinstance(call.op, tvm.ir.Op):
                names.append(call.op.name)
            super().visit_call_(call)

    V().visit_expr(mod["main"])
    return names


def _consts(mod) -> dict:
    """Constants of main by span name (unnamed ones under their index)."""
    out = {}

    @relax.expr_functor.visitor
    class V(relax.PyExprVisitor):
        def visit_generic_const_(self, c):
            name = c.span.source_name.name if c.span is not None else f"#{len(out)}"
            out[name] = c.value.numpy()

    V().visit_expr(relax.transform.DeadCodeElimination(["main"])(mod)["main"])
    return out


def _report(mod, name):
    return read_report(mod, REPORT_PREFIX + name)


def _ternary(w: torch.Tensor) -> np.ndarray:
    """PyTorch's own ternarization of a latent weight [O, K] (the model's math)."""
    s_w = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s_w).round().clamp(-1, 1).to(torch.int8).numpy()


@pytest.fixture(scope="module")
def ffn():
    return _realistic(Ffn())


@pytest.fixture(scope="module")
def ffn_mod(ffn):
    return _import(ffn)


def test_quantize_bitlinear_replaces_float_matmuls_with_packed_w2a8(ffn, ffn_mod):
    assert _ops(ffn_mod).count("relax.matmul") == 2
    out = quantize_bitlinear(ffn_mod)
    ops = _ops(out)
    assert "relax.matmul" not in ops  # no float matmul left on a BitLinear path
    assert sum(op.startswith("w2a8_") for op in ops) == 2
    report = _report(out, "quantize_bitlinear")
    assert [r["name"] for r in report["rewritten"]] == ["up", "down"] and report["not_rewritten"] == []
    consts = _consts(out)
    for name, lin in (("up", ffn.up), ("down", ffn.down)):
        o, k = lin.weight.shape
        packed = consts[f"{name}.packed"]
        assert packed.dtype == np.uint8 and packed.shape == (o, k // 4) and packed.nbytes == o * k // 4
        np.testing.assert_array_equal(unpack_ternary(packed, k), _ternary(lin.weight))  # codes exact
        assert consts[f"{name}.scale"].shape == (1,)
        # no float copy of the latent (or dequantized) weight survives
        assert not any(v.dtype == np.float32 and v.size == o * k for v in consts.values())
    # float32 reference: identical int codes, so only the fp32 summation order differs (|err| ~ 1e-6
    # of outputs ~ 1); a near-tie code flip would move an output by w_scale / x_scale < 5e-3 (see
    # test_passes_model.py), far above that noise, so 1e-4 catches any wrong code or scale.
    with torch.no_grad():
        ref = ffn(torch.from_numpy(_x())).numpy()
    np.testing.assert_allclose(_run(out, _x()), ref, atol=1e-4)


def test_quantize_bitlinear_accepts_a_folded_weight_and_other_spellings():
    module = _realistic(Ffn(up=ReciprocalBitLinear(K, F_)))
    folded = relax.transform.FoldConstant()(_import(module))  # weight quantization already folded
    out = quantize_bitlinear(folded)
    report = _report(out, "quantize_bitlinear")
    assert len(report["rewritten"]) == 2 and report["not_rewritten"] == []
    with torch.no_grad():
        ref = module(torch.from_numpy(_x())).numpy()
    np.testing.assert_allclose(_run(out, _x()), ref, atol=1e-4)  # as above
    fused = fuse_norm_quant(out)
    assert _report(fused, "fuse_norm_quant") == {"fused": 2, "unfused": 0}
    np.testing.assert_allclose(_run(fused, _x()), ref, atol=1e-4)


@pytest.mark.parametrize("layer, reason", [(NoRoundBitLinear, "not int8 codes"),
                                           (FloatWeightBitLinear, "not ternary")])
def test_quantize_bitlinear_leaves_non_matching_layers_float_and_reports_them(layer, reason):
    module = _realistic(Ffn(up=layer(K, F_)))
    out = quantize_bitlinear(_import(module))
    report = _report(out, "quantize_bitlinear")
    assert [r["name"] for r in report["rewritten"]] == ["down"]
    assert [r["name"] for r in report["not_rewritten"]] == ["up"]
    assert reason in report["not_rewritten"][0]["reason"]
    assert _ops(out).count("relax.matmul") == 1  # "up" untouched, still float
    with torch.no_grad():
        ref = module(torch.from_numpy(_x())).numpy()
    np.testing.assert_allclose(_run(out, _x()), ref, atol=1e-4)


def test_w2a8_int32_accumulators_equal_numpy_bit_for_bit(ffn, ffn_mod):
    """One layer's packed weights from the pass, full-range int8 codes: with x_scale = w_scale = 1
    the kernel's output is its int32 accumulator, exact in float32 (|acc| <= 128 * K < 2**24)."""
    packed = _consts(quantize_bitlinear(ffn_mod))["up.packed"]
    n, k = ffn.up.weight.shape
    q = np.random.RandomState(2).randint(-128, 128, (T, k)).astype(np.int8)
    q[0] = -128  # extremes of the int8 range
    q[1] = 127
    func = w2a8_compute(W2A8Config(T, n, k)).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.empty((T, n), "float32", tvm.cpu())
    ones = tvm.runtime.tensor(np.ones((T, 1), np.float32))
    lib["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(packed), ones,
                tvm.runtime.tensor(np.ones(1, np.float32)), out)
    acc = q.astype(np.int64) @ _ternary(ffn.up.weight).astype(np.int64).T
    np.testing.assert_array_equal(out.numpy().astype(np.int64), acc)


def test_fuse_norm_quant_replaces_rmsnorm_and_quantization(ffn, ffn_mod):
    quantized = quantize_bitlinear(ffn_mod)
    out = fuse_norm_quant(quantized)
    assert _report(out, "fuse_norm_quant") == {"fused": 2, "unfused": 0}
    ops = _ops(relax.transform.DeadCodeElimination(["main"])(out))
    assert sum(op.startswith("norm_quant_") for op in ops) == 2
    for gone in ("relax.round", "relax.topk", "relax.rsqrt", "relax.power"):
        assert gone not in ops
    with torch.no_grad():
        ref = ffn(torch.from_numpy(_x())).numpy()
    np.testing.assert_allclose(_run(out, _x()), ref, atol=1e-4)  # as in the first test


def test_fuse_norm_quant_leaves_an_unrecognized_norm_unfused():
    class NoNorm(BitLinear):  # quantized activations, but no RMSNorm in front
        def forward(self, x):
            s_x = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
            s_w = 1.0 / self.weight.abs().mean().clamp(min=1e-5)
            return F.linear((x * s_x).round().clamp(-128, 127) / s_x, (self.weight * s_w).round().clamp(-1, 1) / s_w)

    module = _realistic(Ffn(up=NoNorm(K, F_)))
    out = fuse_norm_quant(quantize_bitlinear(_import(module)))
    assert _report(out, "fuse_norm_quant") == {"fused": 1, "unfused": 1}
    with torch.no_grad():
        ref = module(torch.from_numpy(_x())).numpy()
    np.testing.assert_allclose(_run(out, _x()), ref, atol=1e-4)


def test_fuse_w2a8_epilogue_takes_gelu_and_residual(ffn, ffn_mod):
    before = fuse_norm_quant(quantize_bitlinear(ffn_mod))
    out = fuse_w2a8_epilogue(before)
    assert _report(out, "fuse_w2a8_epilogue") == {"gelu": 1, "gelu_tanh": 0, "residual": 1, "bias": 0}
    ops = _ops(relax.transform.DeadCodeElimination(["main"])(out))
    assert "relax.nn.gelu" not in ops and "relax.add" not in ops
    assert any(op.endswith("_gelu") for op in ops) and any(op.endswith("_residual") for op in ops)
    with torch.no_grad():
        ref = ffn(torch.from_numpy(_x())).numpy()
    # TVM's erf (the same one Relax's legalized nn.gelu uses) differs from torch's by ~1e-7
    np.testing.assert_allclose(_run(out, _x()), ref, atol=1e-4)


def test_fuse_w2a8_epilogue_keeps_a_shared_output_unfused(ffn_mod):
    class Shared(nn.Module):  # the W2A8 output is used twice: no single consumer to fuse
        def __init__(self):
            super().__init__()
            self.lin = BitLinear(K, K)

        def forward(self, x):
            y = self.lin(x)
            return F.gelu(y) + y

    out = fuse_w2a8_epilogue(fuse_norm_quant(quantize_bitlinear(_import(_realistic(Shared())))))
    assert _report(out, "fuse_w2a8_epilogue") == {"gelu": 0, "gelu_tanh": 0, "residual": 0, "bias": 0}


def test_drop_training_outputs_keeps_element_zero():
    class Two(nn.Module):
        def forward(self, x):
            return x * 2.0, x.sum(-1)

    mod = drop_training_outputs(_import(Two()))
    assert isinstance(mod["main"].ret_ty, relax.TensorType)
    np.testing.assert_allclose(_run(relax.transform.CanonicalizeBindings()(mod), _x()), _x() * 2.0)
    assert drop_training_outputs(mod).same_as(mod)  # a tensor result is left alone
