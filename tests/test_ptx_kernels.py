"""bmvcc's GPU kernels (W2A8 tensor-core, norm_quant): their PTX (NVRTC, as shipped to the Orin) executed by
bmvcc's PTX emulator against their TIR compute definitions built for llvm. W2A8: every epilogue, the small-M
variant and tuning-space knob sets (one with > 48 KB of dynamic shared memory), at shapes with a partial tile
(padding) and at least 4 k tiles through the cp.async pipeline's steady state. Negative controls: mutated PTX
that a GPU would run silently wrong must be caught (wrong ldmatrix layout, a misread packed weight word, a
missing bar.sync, a cp.async.wait_group that waits too little)."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import tvm

from bmvcc import targets
from bmvcc.ptx import parse_ptx
from bmvcc.ptx.launches import kernel_launches
from bmvcc.ptx.verify import emulate
from bmvcc.schedules import w2a8_cuda as wc
from bmvcc.schedules.w2a8 import W2A8Config, pack_ternary
from bmvcc.targets import cuda_toolchain as tc

ORIN = targets.get("jetson-orin-nano")


@functools.cache
def _build(cfg: W2A8Config, knobs: wc.W2A8CudaKnobs):
    """(PTX text, launches) of the scheduled kernel, as the GPU build makes them."""
    func = wc.schedule(wc.tc_compute(wc.padded(cfg, knobs)), ORIN.target(), knobs).with_attr("global_symbol", "w2a8")
    ptx = tc.cuda_to_ptx(wc.cuda_source(func, ORIN), "sm_87")
    return ptx, kernel_launches(tvm.IRModule({"w2a8": func}), ORIN.target())["w2a8"]


def _operands(p: W2A8Config, seed=0):
    """Random operands of the padded instance in tc_compute's parameter order, output last (zeros)."""
    rng = np.random.default_rng(seed)
    packed = wc.tc_pack(pack_ternary(rng.integers(-1, 2, (p.n, p.k))))
    arrays = [rng.integers(-128, 128, (p.m, p.k), dtype=np.int8), packed,
              rng.uniform(0.5, 40.0, (p.m, 1)).astype(np.float32), np.array([0.0123], np.float32)]
    if p.epilogue == "residual":
        arrays.append(rng.normal(0.0, 4.0, (p.m, p.n)).astype(np.float32))
    return arrays + [np.zeros((p.m, p.n), np.float32)]


@functools.cache
def _reference(p: W2A8Config):
    lib = tvm.compile(tvm.IRModule({"main": wc.tc_compute(p).with_attr("global_symbol", "main")}), target="llvm")
    args = [tvm.runtime.tensor(a) for a in _operands(p)]
    lib["main"](*args)
    return args[-1].numpy()


def _emulate(cfg, knobs, ptx=None):
    p = wc.padded(cfg, knobs)
    text, launches = _build(cfg, knobs)
    arrays = _operands(p)
    res = emulate(parse_ptx(ptx or text), launches, arrays)
    return res, arrays[-1], _reference(p)


def _check(cfg, knobs):
    res, out, ref = _emulate(cfg, knobs)
    assert res.races == 0, res.race_reports
    assert res.ctas_run == res.ctas_total and res.written[-1].all()
    # int32 accumulation exact; the kernel's acc * (w_scale / x_scale) is within 2 fp32 ulp of the definition's
    # (acc * w_scale) / x_scale; GELU's 25 fp32 operations a few more (the same bounds as the GPU test)
    np.testing.assert_allclose(out, ref, rtol=1e-6 if cfg.epilogue == "gelu" else 5e-7, atol=1e-6)


@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_w2a8_default_knobs(epilogue):
    """DEFAULT (128x128 tiles, block_k 64, 3 stages): 150x200x470 pads to 2x2 CTAs and 8 k tiles."""
    cfg = W2A8Config(150, 200, 470, epilogue)
    assert wc.default_knobs(cfg) == wc.DEFAULT and wc.padded(cfg, wc.DEFAULT).k // wc.DEFAULT.block_k == 8
    _check(cfg, wc.DEFAULT)


def test_w2a8_small_m():
    """SMALL_M (16 rows, block_k 128, 4 stages): 8x200x1000 pads to 2 CTAs and 8 k tiles."""
    cfg = W2A8Config(8, 200, 1000, "residual")
    assert wc.default_knobs(cfg) == wc.SMALL_M
    _check(cfg, wc.SMALL_M)


@pytest.mark.parametrize("knobs", [wc.W2A8CudaKnobs(256, 128, 64, 4, 2, 3), wc.W2A8CudaKnobs(64, 32, 128, 2, 1, 2),
                                   wc.W2A8CudaKnobs(32, 64, 32, 1, 2, 4)],
                         ids=["dynamic-smem-66KB-8-warps", "2-stages-block-k-128", "4-stages-block-k-32"])
def test_w2a8_tuning_knobs(knobs):
    cfg = W2A8Config(knobs.block_m, 2 * knobs.block_n, 5 * knobs.block_k)
    _check(cfg, knobs)


NEG_CFG, NEG_KNOBS = W2A8Config(32, 64, 256), wc.W2A8CudaKnobs(32, 64, 32, 1, 2, 3)


def _mutate(pattern: str, replacement: str, occurrence: int) -> str:
    """The negative-control kernel's PTX with the `occurrence`-th match of `pattern` replaced."""
    text, _ = _build(NEG_CFG, NEG_KNOBS)
    matches = list(re.finditer(pattern, text))
    m = matches[occurrence]
    return text[:m.start()] + replacement + text[m.end():]


def test_negative_control_baseline():
    res, out, ref = _emulate(NEG_CFG, NEG_KNOBS)
    assert res.races == 0 and np.allclose(out, ref, rtol=5e-7, atol=1e-6)


def test_wrong_ldmatrix_layout_is_caught():
    """.trans on one ldmatrix (A fragments transposed): the result disagrees with the definition."""
    res, out, ref = _emulate(NEG_CFG, NEG_KNOBS, _mutate(r"\.x4\.shared\.b16", ".x4.trans.shared.b16", 3))
    assert np.abs(out - ref).max() > 1.0


@pytest.mark.parametrize("pattern,replacement", [(r"(shr\.u32\s+%r\d+, {word}), 2;", r"\1, 4;"),
                                                 (r"(ld\.shared\.u32\s+%r\d+, \[%rd\d+)\];", r"\1+4];")],
                         ids=["selector-of-the-wrong-2-bit-field", "word-of-the-next-lane"])
def test_wrong_weight_decode_is_caught(pattern, replacement):
    """The TC_LAYOUT decode of one k step misread: its second selector word shifted by 4 bits instead of 2 (B fragment
    registers 1 and 3 get other weights' codes), or a lane loading its neighbour's word. {word}: the register the
    first packed word is loaded into, so the shift mutated is the decode's."""
    text, _ = _build(NEG_CFG, NEG_KNOBS)
    word = re.search(r"ld\.shared\.u32\s+(%r\d+),", text).group(1)
    m = re.search(pattern.format(word=word), text)
    res, out, ref = _emulate(NEG_CFG, NEG_KNOBS, text[:m.start()] + m.expand(replacement) + text[m.end():])
    assert res.races == 0 and np.abs(out - ref).max() > 1.0


@pytest.mark.parametrize("occurrence", [4, 5], ids=["before-refill", "after-wait"])
def test_missing_bar_sync_is_a_race(occurrence):
    """A bar.sync of the third k tile (steady state: every stage in flight) removed: the refill overwrites a stage other warps still read
    (before-refill), or warps read a stage other threads' cp.async filled without a barrier (after-wait)."""
    res, _, _ = _emulate(NEG_CFG, NEG_KNOBS, _mutate(r"bar\.sync\s+0;", "", occurrence))
    assert res.races > 0
    assert any("race:" in r and "PTX line" in r for r in res.race_reports)


def test_short_wait_group_is_caught():
    """cp.async.wait_group 3 instead of 2 in the steady state: the stage is read before its copy landed."""
    res, out, ref = _emulate(NEG_CFG, NEG_KNOBS, _mutate(r"cp\.async\.wait_group 2;", "cp.async.wait_group 3;", 2))
    assert any("still pending" in r for r in res.race_reports), res.race_reports
    assert not np.allclose(out, ref, rtol=5e-7, atol=1e-6)  # the stale stage's bytes were used


@pytest.mark.parametrize("m,k", [(16, 64), (16, 128), (5, 200)])
def test_norm_quant_kernel(m, k):
    """norm_quant's GPU kernel (one CTA per row, warp-shuffle and shared-memory reductions) against its definition:
    q exactly, x_scale within the reductions' reordering. Before x_scale went through shared memory, threads
    other than 0 read it from global memory before thread 0 stored it, and q was wrong."""
    from bmvcc.ptx.verify import build_scheduled, random_arguments, run_definition
    from bmvcc.schedules.norm_quant import NormQuantConfig, norm_quant_compute
    from bmvcc.schedules import norm_quant_cuda

    definition = norm_quant_compute(NormQuantConfig(m, k))
    kernels, launches = build_scheduled(tvm.IRModule({"nq": norm_quant_cuda.schedule(definition, ORIN.target())}), ORIN)
    arrays = random_arguments(definition, np.random.default_rng(0))
    reference = run_definition(definition, arrays)
    res = emulate(kernels, launches["nq"], arrays)
    assert res.races == 0 and res.ctas_run == m
    np.testing.assert_array_equal(arrays[2], reference[2])  # q, int8
    np.testing.assert_allclose(arrays[3], reference[3], rtol=1e-5)  # x_scale: sum of squares reordered
