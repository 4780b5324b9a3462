"""The whole pipeline on small BitMedViTs of all four families (multi_query x fp_attn), compiled and
run on the host, against the PyTorch model; and the packed size of the paper-size model.

Tolerance of the logits (BitLinear path and float path alike): both compute the same int8 codes and
ternary weights as PyTorch, except that float32 reductions in another order (RMS sum, absmax scale
product, matmul sums) can put a value that lies within an ulp of a .5 tie on the other side: one
int8 activation code then moves by 1, which changes a BitLinear output by at most
|T| * w_scale / x_scale = mean|W| * max|xn| / 127 (~1e-3 here: mean|W| ~ 0.1, max|xn| ~ 3), and less
after the residual stream, LayerNorm and classifier. Without such a flip the difference is ~1e-6.
So logits must agree to 2e-3 and the predicted class must be the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bmvcc import runtime
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.frontend import Source, to_relax
from bmvcc.model import BitLinear, BitMedViT, ViTConfig
from bmvcc.passes.pipeline import run_pipeline

from conftest import FAMILIES, family_id, make_model, save_checkpoint, small_config

ATOL = 2e-3  # see the module docstring


def _config(multi_query: bool, fp_attn: bool) -> ViTConfig:
    return small_config(multi_query, fp_attn, dim=64, mlp_dim=128, matcher_dim=49)


def _bitlinear_weights(model: BitMedViT) -> dict[str, np.ndarray]:
    return {name: m.weight.detach().numpy() for name, m in model.named_modules() if isinstance(m, BitLinear)}


@pytest.mark.parametrize("multi_query, fp_attn", FAMILIES, ids=[family_id(*f) for f in FAMILIES])
def test_compiled_logits_match_pytorch(tmp_path, multi_query, fp_attn):
    cfg = _config(multi_query, fp_attn)
    model = save_checkpoint(tmp_path / "m.pth", cfg, seed=3)
    images = np.random.RandomState(4).randn(2, cfg.channels, cfg.image_size, cfg.image_size).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    report = compile_model(tmp_path / "m.pth", tmp_path / "out", CompileOptions(batch=2, heads=cfg.heads))
    logits = runtime.load(tmp_path / "out")(images)
    np.testing.assert_allclose(logits, ref, atol=ATOL)
    assert (logits.argmax(-1) == ref.argmax(-1)).all()

    bitlinear = _bitlinear_weights(model)
    passes = json.loads((tmp_path / "out" / "metadata.json").read_text())["passes"]
    assert passes == report.metadata["passes"]
    bl = passes["bitlinear"]
    assert sorted(bl["layers"]) == sorted(bitlinear) and bl["rewritten"] == len(bitlinear)
    assert bl["not_rewritten"] == [] and bl["norm_quant_fused"] == len(bitlinear)
    # FFN output + residual always; out_proj + residual when out_proj is a BitLinear
    assert bl["epilogues"] == {"gelu": cfg.depth, "gelu_tanh": 0, "residual": (1 if fp_attn else 2) * cfg.depth, "bias": 0}
    # multi-query attention is causal: one fused kernel per layer on the host (multi-head has no mask)
    assert passes["causal_attention_fused"] == (cfg.depth if multi_query else 0)
    ternary = sum(w.size for w in bitlinear.values())
    assert passes["weight_bytes"]["packed_2bit"] == ternary // 4


@pytest.mark.parametrize("multi_query, fp_attn", [(True, False)], ids=["mq-bit"])
def test_no_bitlinear_keeps_the_float_path(tmp_path, multi_query, fp_attn):
    cfg = _config(multi_query, fp_attn)
    model = save_checkpoint(tmp_path / "m.pth", cfg, seed=5)
    images = np.random.RandomState(6).randn(1, 1, 28, 28).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    report = compile_model(tmp_path / "m.pth", tmp_path / "out", CompileOptions(bitlinear=False))
    np.testing.assert_allclose(runtime.load(tmp_path / "out")(images), ref, atol=ATOL)
    bl = report.metadata["passes"]["bitlinear"]
    assert not bl["enabled"] and bl["rewritten"] == 0
    assert report.metadata["passes"]["weight_bytes"]["packed_2bit"] == 0


def test_no_latent_float_weight_reaches_the_artifact():
    """After the pipeline neither the latent weight of a rewritten layer nor its dequantized
    (codes * scale) float copy exists, transposed or not; the matcher head is gone too."""
    cfg = _config(True, False)
    model = make_model(cfg, seed=7)
    mod = to_relax(Source(model, (1, 28, 28), cfg.num_classes, None, cfg), 1)
    assert len(mod["main"].ret_ty.fields) == 2  # (logits, matcher) as exported
    mod, weights, _ = run_pipeline(mod, None)
    assert "Tuple" not in type(mod["main"].ret_ty).__name__
    arrays = [w.numpy() for w in weights]
    matcher = model.matcher[1].weight.detach().numpy()
    for w in _bitlinear_weights(model).values():
        s_w = 1.0 / max(np.abs(w).mean(), 1e-5)
        dequant = np.clip(np.rint(w * s_w), -1, 1) / np.float32(s_w)
        for a in arrays:
            for candidate in (w, w.T, dequant, dequant.T):
                assert not (a.shape == candidate.shape and a.dtype == np.float32 and np.allclose(a, candidate))
    assert not any(a.shape == m.shape and np.allclose(a, m) for a in arrays for m in (matcher, matcher.T))


@pytest.mark.parametrize("fp_attn, packed_bytes", [
    (True, 6_291_456 // 4),  # FFN only: 3 x 2 x 2048 x 512 ternary weights
    pytest.param(False, (6_291_456 + 3 * (640 + 512) * 512) // 4, marks=pytest.mark.slow),  # + Wqkv, out_proj
])
def test_paper_size_model_packs_to_two_bits_per_ternary_weight(fp_attn, packed_bytes):
    cfg = ViTConfig(224, 7, 3, 9, 512, 3, 8, 2048, True, fp_attn)
    mod = to_relax(Source(BitMedViT(cfg).eval(), (3, 224, 224), 9, None, cfg), 1)
    _, _, report = run_pipeline(mod, None)
    bl = report["bitlinear"]
    assert bl["rewritten"] == (2 if fp_attn else 4) * cfg.depth and bl["not_rewritten"] == []
    assert report["weight_bytes"]["packed_2bit"] == packed_bytes
    assert report["weight_bytes"]["scalar"] >= 4 * bl["rewritten"]  # one float32 scale per tensor
