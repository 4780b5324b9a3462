"""Attention on CUDA targets: schedules/attention_cuda.py's compute definition against float32 attention in
numpy within its stated fp16 bound, TVM's prefill kernel built for sm_87 and emulated from its PTX against the
definition, and passes/fuse_causal_attention.py rewriting the attention forms of torch's SDPA and of ONNX
imports (the four BitMedViT families: tests/test_fp16_matmuls.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import tvm

from bmvcc import targets
from bmvcc.schedules.attention_cuda import PrefillConfig, attention_compute, schedule

U = 2.0**-11  # fp16 unit roundoff
ORIN = "jetson-orin-nano"
CONFIGS = {  # (batch, heads, kv_heads, tokens, head_dim): multi-query as the pass emits it, grouped K/V, multi-head
    "mq-causal": PrefillConfig(1, 4, 1, 40, 16, 0.25, True),
    "gqa-causal": PrefillConfig(2, 4, 2, 17, 8, 8**-0.5, True),
    "mh-full": PrefillConfig(3, 1, 1, 40, 8, 1.0, False),
}


def _attention64(q, k, v, cfg: PrefillConfig):
    """(out, lse in base 2) in float64: softmax(scale * q k^T [+ causal mask]) v, [B, N, H, D] layout."""
    g = cfg.heads // cfg.kv_heads
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) * cfg.scale
    if cfg.causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v)
    return out, ((m[..., 0] + np.log(p.sum(-1))) / math.log(2)).transpose(0, 2, 1)


def _inputs(cfg: PrefillConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(cfg.batch, cfg.tokens, h, cfg.head_dim) for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads)]
    return [(2.0 * rng.standard_normal(s)).astype(np.float32) for s in shapes]  # scores of a few units


def _run_definition(cfg: PrefillConfig, q, k, v):
    from bmvcc.ptx.verify import run_definition

    b, n, h, d = q.shape
    out, lse = np.zeros((b, n, h, d), np.float16), np.zeros((b, n, h), np.float16)
    return run_definition(attention_compute(cfg), [q.astype(np.float16), k.astype(np.float16),
                                                   v.astype(np.float16), out, lse])[3:]


@pytest.mark.parametrize("name", CONFIGS)
def test_definition_within_the_stated_bound_of_float32_attention(name):
    """The docstring's bound: |out - out32| <= (e^(2 Delta_i) - 1 + 2u) max_j |v_jd| with
    Delta_i = (2u + u^2) scale max_j sum_d |q_id k_jd| over the keys row i sees, plus float32 arithmetic
    (sums of N terms, exp2: 8 N 2^-24 max|v|). lse (no consumer) within fp16 rounding of float64's."""
    cfg = CONFIGS[name]
    q, k, v = _inputs(cfg)
    out, lse = _run_definition(cfg, q, k, v)
    ref_lse = _within_stated_bound(out, q, k, v, cfg, 2 * U)
    np.testing.assert_allclose(lse.astype(np.float64), ref_lse, rtol=2 * U, atol=1e-3)


def _within_stated_bound(out, q, k, v, cfg: PrefillConfig, rounding: float):
    """Asserts |out - float64 attention of (q, k, v)| <= (e^(2 Delta_i) - 1 + rounding) max_j |v_jd|
    + 8 N 2^-24 max_j |v_jd| (attention_cuda's docstring; `rounding`: the relative roundings of v, the weights
    and the output) and that the error is not vacuous; returns the float64 lse (base 2)."""
    ref, ref_lse = _attention64(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), cfg)
    g = cfg.heads // cfg.kv_heads
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    dots = np.einsum("bihd,bjhd->bhij", np.abs(q), np.abs(kk)).astype(np.float64)
    if cfg.causal:
        dots = np.where(np.triu(np.ones(dots.shape[-2:], bool), 1), 0.0, dots)
    delta = (2 * U + U * U) * cfg.scale * dots.max(-1).transpose(0, 2, 1)[..., None]  # [B, N, H, 1]
    vmax = np.abs(vv).max(1, keepdims=True)  # every key (a superset of those a causal row sees)
    bound = (np.expm1(2 * delta) + rounding) * vmax + 8 * cfg.tokens * 2.0**-24 * vmax
    err = np.abs(out.astype(np.float64) - ref)
    assert (err <= bound).all(), (err - bound).max()
    assert err.max() > 1e-5 * np.abs(ref).max()  # fp16 rounding happened: the bound is not vacuous
    return ref_lse


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_kernel_emulated_from_sm87_ptx_matches_the_definition(name):
    """Every CTA of TVM's prefill kernel (40 tokens: a partial last tile; 17 with two K/V heads) run by
    bmvcc's PTX emulator on random inputs, compared as `bmvcc verify` compares: within a few fp16 roundings,
    no race."""
    from bmvcc.ptx.verify import build_scheduled, compare, emulate, random_arguments, run_definition

    cfg, spec = CONFIGS[name], targets.get(ORIN)
    definition = attention_compute(cfg)
    kernels, launches = build_scheduled(tvm.IRModule({"attention": schedule(definition, spec.target())}),
                                        spec)
    arrays = random_arguments(definition, np.random.default_rng(1))
    reference = run_definition(definition, arrays)
    res = emulate(kernels, launches["attention"], arrays)
    assert res.ctas_run == res.ctas_total > 1 and res.races == 0
    err, agree = compare(arrays, reference, res.written, complete=True)
    assert agree, err


def test_paper_size_kernel_fits_sm87_without_spills():
    """The paper model's layer (1024 tokens, 8 query heads sharing one K/V head, head size 64) compiled by ptxas
    for sm_87: no spills, static shared memory within the 48 KB cap, 256 CTAs of 128 threads."""
    from bmvcc.ptx.launches import kernel_launches
    from bmvcc.targets.cuda_toolchain import cuda_to_ptx, ptx_to_cubin

    spec = targets.get(ORIN)
    kernel = schedule(attention_compute(PrefillConfig(1, 8, 1, 1024, 64, 0.125, True)), spec.target())
    mod = tvm.IRModule({"attention": kernel.with_attr("global_symbol", "attention")})
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        source = tvm.compile(mod, target=spec.target()).mod.imports[0].inspect_source("cuda")
    (res,) = ptx_to_cubin(cuda_to_ptx(source, "sm_87"), "sm_87").resources
    assert res.spill_stores == res.spill_loads == 0 and 0 < res.shared_bytes <= 48 * 1024, res
    (launch,) = kernel_launches(mod, spec.target())["attention"]
    assert launch.grid == (256, 1, 1) and launch.block == (32, 4, 1)


def _gpu_pipeline(source, batch: int):
    from bmvcc.frontend import to_relax
    from bmvcc.passes.pipeline import run_pipeline

    return run_pipeline(to_relax(source, batch), targets.get(ORIN))


def _attention_kernels(mod) -> list[PrefillConfig]:
    from bmvcc.schedules.attention_cuda import KIND, config_of
    from bmvcc.schedules.w2a8 import kernel_of

    return [config_of(f) for _, f in mod.functions_items() if kernel_of(f) == KIND]


def _no_softmax_or_square_constant(mod, weights, n: int) -> bool:
    """No softmax left in main and no [.., n, n] float constant (a mask, SDPA's zeros) in the weights."""
    return "R.nn.softmax" not in mod["main"].script() and not any(
        tuple(w.shape[-2:]) == (n, n) and "float" in str(w.dtype) for w in weights)


def _same(found: list[PrefillConfig], expected: PrefillConfig) -> bool:
    """One kernel configuration, `expected` up to the float32 rounding of its scale."""
    return [replace(c, scale=expected.scale) for c in found] == [expected] and found[0].scale == pytest.approx(
        expected.scale, rel=1e-6)


def test_torch_sdpa_becomes_the_non_causal_kernel():
    """F.scaled_dot_product_attention (tests/bitnet_models.py's ViT: 17 tokens, 4 heads, batch 2) imports as
    where(row all -inf, 0, softmax(q k^T)) with q and k each pre-scaled: one non-causal kernel per block (no mask,
    so no row is all -inf and the guard is the identity), and neither softmax nor the guard's zeros remain.
    The llvm build of the rewritten pipeline against PyTorch: tests/test_fp16_matmuls.py (the four families)."""
    from bmvcc.frontend import Source

    from bitnet_models import SPELLINGS, ViT, randomized

    model = randomized(ViT(SPELLINGS["b158_ste"]))
    mod, weights, report = _gpu_pipeline(Source(model, (1, 28, 28), 10, None), 2)
    assert report["causal_attention_fused"] == len(model.blocks) == 2
    assert _same(_attention_kernels(mod), PrefillConfig(8, 1, 1, 17, 8, 1.0, False))  # (batch x heads), scale in q, k
    assert _no_softmax_or_square_constant(mod, weights, 17)


def test_onnx_import_attention_becomes_the_causal_kernel(tmp_path):
    """`bmvcc export-onnx`'s multi-query model (the causal mask an initializer, K/V broadcast by MatMul) imported
    through TVM's ONNX frontend: one causal kernel per block, K/V loaded once for the 4 query heads, no mask."""
    from bmvcc.frontend import load_source
    from bmvcc.onnx_export import export_onnx

    from conftest import make_model, small_config

    cfg = small_config(multi_query=True)
    export_onnx(make_model(cfg), tmp_path / "m.onnx", batch=1)
    mod, weights, report = _gpu_pipeline(load_source(tmp_path / "m.onnx"), 1)
    assert report["causal_attention_fused"] == cfg.depth
    assert _same(_attention_kernels(mod), PrefillConfig(1, 4, 1, 16, 8, 8**-0.5, True))
    assert _no_softmax_or_square_constant(mod, weights, 16)


TC_CONFIGS = {  # bmvcc's tensor-core kernel (head_dim a multiple of 16): partial query and key tiles throughout
    "mq-causal": PrefillConfig(1, 4, 1, 150, 16, 0.25, True),  # 10 CTAs of 16 tokens x 4 heads, 1-3 key tiles
    "gqa-causal": PrefillConfig(2, 4, 2, 17, 16, 0.35, True),
    "mh-full": PrefillConfig(2, 2, 2, 70, 32, 1.0, False),  # multi-head: 64 tokens per CTA, 2 key tiles each
    # Q, K, V read from one [B, N, 104] QKV tensor (8 unused columns first), the output written as float32
    "mq-folded": PrefillConfig(1, 4, 1, 70, 16, 0.25, True, width=104, q_offset=8, k_offset=72, v_offset=88,
                               out_dtype="float32"),
}


def _operands(cfg: PrefillConfig, q, k, v) -> list:
    """q, k, v ([B, N, heads, D]) as the kernel reads them: with `width`, packed into one [B, N, width] tensor
    (columns no head covers random), passed three times."""
    if not cfg.width:
        return [q, k, v]
    qkv = np.random.default_rng(3).normal(size=(cfg.batch, cfg.tokens, cfg.width)).astype(np.float32)
    for x, at in ((q, cfg.q_offset), (k, cfg.k_offset), (v, cfg.v_offset)):
        qkv[..., at:at + x.shape[2] * cfg.head_dim] = x.reshape(cfg.batch, cfg.tokens, -1)
    return [qkv] * 3


def _emulate_tc(cfg: PrefillConfig, q, k, v):
    """schedules/attention_cuda_tc.py's kernel for cfg built for sm_87 and every CTA of it run by the PTX emulator
    (no race); returns (arguments afterwards, the definition's arguments after running on the CPU)."""
    from bmvcc.ptx.verify import build_scheduled, emulate, run_definition
    from bmvcc.schedules import attention_cuda_tc

    spec = targets.get(ORIN)
    definition = attention_compute(cfg)
    kernels, launches = build_scheduled(
        tvm.IRModule({"attention": attention_cuda_tc.schedule(definition, spec.target())}), spec)
    b, n, h, d = q.shape
    rng = np.random.default_rng(2)
    arrays = [x.astype(np.float16) for x in _operands(cfg, q, k, v)] + [
        rng.normal(size=(b, n, h, d)).astype(cfg.out_dtype), rng.normal(size=(b, n, h)).astype(np.float16)]
    reference = run_definition(definition, [a.copy() for a in arrays])
    res = emulate(kernels, launches["attention"], arrays)
    assert res.ctas_run == res.ctas_total > 1 and res.races == 0
    return arrays, reference


def _precision(cfg: PrefillConfig) -> str:
    """The definition's PRECISION_ATTR, as `bmvcc verify` reads it (fp16 values, also when written as float32)."""
    from bmvcc.ptx.verify import PRECISION_ATTR

    return str(attention_compute(cfg).attrs[PRECISION_ATTR])


@pytest.mark.parametrize("name", TC_CONFIGS)
def test_tc_kernel_emulated_matches_the_definition_and_float32_attention(name):
    """The tensor-core kernel from its sm_87 PTX against the definition as `bmvcc verify` compares, and against
    float64 attention of the float32 inputs within the stated bound: attention_cuda's plus the fp16 rounding of
    the weights before P V (relative u each, normalized by their rounded sum: 2u), so 4u in all."""
    from bmvcc.ptx.verify import compare

    cfg = TC_CONFIGS[name]
    q, k, v = _inputs(cfg)
    arrays, reference = _emulate_tc(cfg, q, k, v)
    err, agree = compare(arrays, reference, [np.ones(a.shape, bool) for a in arrays], complete=True,
                         precision=_precision(cfg))
    assert agree, err
    _within_stated_bound(arrays[3], q, k, v, cfg, 4 * U)  # lse (no consumer): the definition's, compared above


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # token 0 sees no key: the broken kernel's 1 / 0
@pytest.mark.parametrize("name", ["gqa-causal", "mq-folded"])
def test_tc_kernel_with_the_causal_condition_off_by_one_is_caught(monkeypatch, name):
    """Negative control: the same kernel letting query i see keys j < i only (its own key hidden) disagrees
    with the definition."""
    from tvm.script import tirx as T

    from bmvcc.ptx.verify import compare
    from bmvcc.schedules import attention_cuda_tc

    monkeypatch.setattr(attention_cuda_tc, "visible", lambda cfg, token, j: T.And(j < token, j < cfg.tokens))
    cfg = TC_CONFIGS[name]
    arrays, reference = _emulate_tc(cfg, *_inputs(cfg))
    later = [np.broadcast_to(np.arange(a.shape[1]).reshape(1, -1, *[1] * (a.ndim - 2)) > 0, a.shape) for a in arrays]
    # not only token 0's empty row
    assert not compare(arrays, reference, later, complete=False, precision=_precision(cfg))[1]


def test_paper_size_tc_kernel_on_tensor_cores_without_spills():
    """The paper model's layer (1024 tokens, 8 query heads sharing one K/V head, head size 64) for sm_87: HMMA
    (fp16 in, fp32 accumulation), ldmatrix (plain and transposed), cp.async in the SASS; no spills, static
    shared memory within 48 KB; 128 CTAs of 8 tokens x 8 heads, CTA c visiting key tiles 0 .. c // 8, so
    8 x (1 + ... + 16) = 1088 tiles of 64 x 64 x 64 x 2 GEMMs (of 2 x 128 x 16 = 4096 unmasked)."""
    from bmvcc.ptx.launches import kernel_launches
    from bmvcc.schedules.attention_cuda_tc import kernel_ops, schedule as tc_schedule
    from bmvcc.targets.cuda_toolchain import cuda_to_ptx, ptx_to_cubin

    spec = targets.get(ORIN)
    cfg = PrefillConfig(1, 8, 1, 1024, 64, 0.125, True)
    kernel = tc_schedule(attention_compute(cfg), spec.target())
    mod = tvm.IRModule({"attention": kernel.with_attr("global_symbol", "attention")})
    source = tvm.compile(mod, target=spec.target()).mod.imports[0].inspect_source("cuda")
    cubin = ptx_to_cubin(cuda_to_ptx(source, "sm_87"), "sm_87")
    (res,) = cubin.resources
    assert res.spill_stores == res.spill_loads == 0 and 0 < res.shared_bytes <= 48 * 1024, res
    sass = cubin.sass()
    for op in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS"):
        assert op in sass, op
    (launch,) = kernel_launches(mod, spec.target())["attention"]
    assert launch.grid == (128, 1, 1) and launch.block == (32, 4, 1)
    assert kernel_ops(attention_compute(cfg)) == 4.0 * 1088 * 64**3


def test_shapes_the_tc_kernel_does_not_take_get_tvms_prefill_kernel():
    """Head size 8 (not a multiple of 16), 80 (tiles over 48 KB of static shared memory), 3 query heads per K/V
    head (not dividing 64 rows): TVM's prefill kernel, no mma; head size 64 with 8 heads: the tensor-core one."""
    from bmvcc.schedules import attention_cuda_tc

    paper = PrefillConfig(1, 8, 1, 64, 64, 1.0, True)
    assert attention_cuda_tc.supported(paper)
    assert not any(attention_cuda_tc.supported(replace(paper, **c))
                   for c in ({"head_dim": 8}, {"head_dim": 80}, {"heads": 3}))
    target = targets.get(ORIN).target()
    assert "mma" in attention_cuda_tc.schedule(attention_compute(paper), target).script()
    assert "mma" not in attention_cuda_tc.schedule(attention_compute(replace(paper, head_dim=8)), target).script()


@pytest.mark.parametrize("fp_attn,out_dtype", [(False, "float32"), (True, "float16")], ids=["bit", "fp"])
def test_layout_copies_fold_into_the_tc_kernel(fp_attn, out_dtype):
    """Multi-query at head size 16 (the tensor-core kernel's): each block's kernel reads Q, K and V from the QKV
    projection's [1, 16, 96] output (Q at column 0, K at 64, V at 80) and writes the out-projection's input in its
    dtype (the BitLinear norm+quantization kernel's float32, the fp16 matmul's float16), so no strided_slice,
    permute_dims or float32 cast is left between them (tests/test_fp16_matmuls.py runs these models against PyTorch)."""
    from bmvcc.frontend import Source

    from conftest import make_model, small_config

    cfg = small_config(multi_query=True, fp_attn=fp_attn, dim=64)
    source = Source(make_model(cfg), (1, 28, 28), 10, None, cfg)
    mod, _, report = _gpu_pipeline(source, 1)
    assert report["causal_attention_fused"] == cfg.depth
    expected = PrefillConfig(1, 4, 1, 16, 16, 0.25, True, 96, 0, 64, 80, out_dtype)
    assert _same(_attention_kernels(mod), expected)
    script = mod["main"].script()
    # left: the patch embedding's permute_dims and casts to fp16 (the QKV projection's output among them)
    assert "R.strided_slice" not in script and script.count("R.permute_dims") == 1
    assert 'dtype="float32") = R.astype' not in script
