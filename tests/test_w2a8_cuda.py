"""W2A8 sm_87 tensor-core kernel: compute definition vs numpy on the CPU, the GPU schedule derived from that
same definition, and static checks of the SASS ptxas produces (no GPU needed; GPU runs are marked gpu)."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import tvm

from bmvcc import targets
from bmvcc.report import w2a8_roofline
from bmvcc.schedules import cuda_intrinsics as ci
from bmvcc.schedules import w2a8_cuda as wc
from bmvcc.schedules.w2a8 import W2A8Config, epilogue_operand, pack_ternary, w2a8_numpy
from bmvcc.targets import cuda_toolchain as tc

ORIN = targets.get("jetson-orin-nano")


def _operands(cfg, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (cfg.m, cfg.k), dtype=np.int8)
    packed = pack_ternary(rng.integers(-1, 2, (cfg.n, cfg.k)))
    x_scale = rng.uniform(0.5, 40.0, (cfg.m, 1)).astype(np.float32)
    return q, packed, x_scale, np.float32(0.0123)


def _run_cpu(func, *arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.empty(out_shape, "float32", tvm.cpu())]
    lib["main"](*args)
    return args[-1].numpy()


def _extra_operand(cfg: W2A8Config):
    """The epilogue's extra input: the residual [M, N], a bias [1, N] or None."""
    rows = {"residual": cfg.m, "bias": 1}.get(epilogue_operand(cfg.epilogue))
    return None if rows is None else np.random.default_rng(3).normal(0.0, 4.0, (rows, cfg.n)).astype(np.float32)


@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual", "bias_gelu_tanh"])
@pytest.mark.parametrize("m,n,k", [(16, 128, 64), (5, 24, 70)])
def test_padded_compute_matches_numpy(m, n, k, epilogue):
    """The definition the GPU kernel computes: tc_compute on the tile-padded operands (the residual padded
    with 0, the weights then in TC_LAYOUT), sliced back, equals numpy's W2A8 on the original ones (K = 70:
    neither a multiple of 32 nor of 4)."""
    cfg = W2A8Config(m, n, k, epilogue)
    knobs = wc.default_knobs(cfg)
    p = wc.padded(cfg, knobs)
    q, packed, xs, ws = _operands(cfg)
    res = _extra_operand(cfg)
    qp, wp, xp, *rp = wc.pad_operands(cfg, knobs, q, packed, xs, res)
    assert wp.shape == (p.n // 16, p.k // 32, 128)
    got = _run_cpu(wc.tc_compute(p), qp, wp, xp, np.array([ws], np.float32), *rp, out_shape=(p.m, p.n))[:m, :n]
    # acc is exact in both; the dequantization is the same two fp32 roundings (1e-6 relative); GELU's
    # rational erf is within 2e-7 of math.erf, i.e. 1e-7 * |x| on GELU(x), plus a few fp32 roundings
    np.testing.assert_allclose(got, w2a8_numpy(q, packed, xs, ws, k, epilogue, res), rtol=1e-6, atol=1e-6)


def _register_decode(words: np.ndarray) -> np.ndarray:
    """uint32 words -> int8 [word, register, byte]: the prmt selector words of cuda_intrinsics._selectors, run on the
    CPU as TIR, looked up in DECODE_LUT as prmt does (byte (sel >> 4i) & 7 of the table, twice DECODE_LUT, the low 16
    bits of the selector only: registers 0, 1 from the two selector words, 2, 3 from their upper halves); every
    nibble's bit 3 (prmt's sign mode) must be 0."""
    from tvm.script import tirx as T

    size = words.size

    @T.prim_func
    def selectors(w: T.Buffer((size,), "uint32"), s: T.Buffer((size, 2), "uint32")):
        for i, j in T.grid(size, 2):
            s[i, j] = T.if_then_else(j == 0, *ci._selectors(w[i]))

    lib = tvm.compile(tvm.IRModule({"main": selectors.with_attr("global_symbol", "main")}), target="llvm")
    sel = tvm.runtime.empty((size, 2), "uint32", tvm.cpu())
    lib["main"](tvm.runtime.tensor(words), sel)
    sel = sel.numpy()
    assert not (sel & 0x88888888).any()
    regs = np.stack([sel[:, 0], sel[:, 1], sel[:, 0] >> 16, sel[:, 1] >> 16], axis=1)  # prmt reads bits 0-15
    table = np.array([ci.DECODE_LUT, ci.DECODE_LUT], np.uint32).view(np.int8)
    return table[(regs[..., None] >> (4 * np.arange(4, dtype=np.uint32))) & 7]


def test_tc_layout_decodes_to_the_mma_b_fragments():
    """tc_pack's words of real ternary weights, decoded as the kernel does (_register_decode), are the mma.m16n8k32 B
    fragments the PTX ISA defines: lane L, register 2h + r, byte i holds T[n, k] of its 16 x 32 block with
    n = 8h + L/4 (the n8 half h) and k = 16r + 4(L%4) + i."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (32, 64))
    words = wc.tc_pack(pack_ternary(codes)).view("<u4")  # [N/16, K/32, 32 lanes]
    got = _register_decode(words.reshape(-1)).reshape(2, 2, 32, 2, 2, 4)  # [block n, block k, L, h, r, i]
    lane, h, r, i = np.meshgrid(np.arange(32), [0, 1], [0, 1], np.arange(4), indexing="ij")
    blocks = codes.reshape(2, 16, 2, 32).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(got, blocks[:, :, 8 * h + lane // 4, 16 * r + 4 * (lane % 4) + i])


def test_register_decode_matches_the_compute_definition():
    """Any word, the code 3 that packing never writes included: register 2h + r, byte i is u - 1 for the code u at
    bits 16h + 4i + 2r, as tc_compute decodes it (u - 1, 2 for u = 3)."""
    words = np.random.default_rng(1).integers(0, 2**32, 1 << 14, dtype=np.uint32)
    words[:4] = [0, 0x55555555, 0xAAAAAAAA, 0xFFFFFFFF]
    h, r, i = np.meshgrid([0, 1], [0, 1], np.arange(4), indexing="ij")
    codes = (words[:, None, None, None] >> (16 * h + 4 * i + 2 * r).astype(np.uint32)) & 3
    np.testing.assert_array_equal(_register_decode(words), (codes.astype(np.int8) - 1).reshape(-1, 4, 4))


@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_schedule_derives_from_contract(epilogue):
    """Replaying the schedule's trace on a fresh tc_compute gives the same scheduled function: every step
    is a schedule primitive on the contract's definition, and the interface is unchanged."""
    from tvm import s_tir

    cfg = W2A8Config(1024, 2048, 512, epilogue)
    sch = s_tir.Schedule(wc.tc_compute(cfg))
    wc._schedule(sch, cfg, wc.default_knobs(cfg))  # the primitives wc.schedule and wc.space apply
    fresh = s_tir.Schedule(tvm.IRModule({"main": wc.tc_compute(cfg)}))
    sch.trace.apply_to_schedule(fresh, remove_postproc=False)
    tvm.ir.assert_structural_equal(fresh.mod, sch.mod)
    scheduled, contract = sch.mod["main"], wc.tc_compute(cfg)
    assert [str(p.name) for p in scheduled.params] == [str(p.name) for p in contract.params]
    for p_s, p_c in zip(scheduled.params, contract.params):
        assert (p_s.ty.dtype, [int(x) for x in p_s.ty.shape]) == (p_c.ty.dtype, [int(x) for x in p_c.ty.shape])
    assert scheduled.attrs[wc.KERNEL_ATTR] == "w2a8"
    names = [inst.kind.name for inst in sch.trace.insts]
    assert names.count("Tensorize") == 4 and "Blockize" in names


@pytest.mark.parametrize("cfg,knobs", [(W2A8Config(1024, 2048, 512), wc.DEFAULT),
                                       (W2A8Config(1024, 2048, 512, "gelu"), wc.DEFAULT),
                                       (W2A8Config(1024, 512, 2048, "residual"), wc.DEFAULT),
                                       (W2A8Config(8, 512, 100), wc.SMALL_M),
                                       (W2A8Config(8, 512, 100, "residual"), wc.SMALL_M),
                                       (W2A8Config(16, 48, 64), wc.default_knobs(W2A8Config(16, 48, 64))),
                                       (W2A8Config(1024, 2048, 512, "residual"), wc.W2A8CudaKnobs(256, 128, 64, 4, 2, 3))],
                         ids=["ffn1-1024x2048x512", "ffn1-gelu", "ffn2-residual-1024x512x2048", "small-m-8x512x100",
                              "small-m-residual", "tiny-16x48x64-one-warp", "dynamic-smem-66KB-8-warps"])
def test_sass_static(cfg, knobs):
    """ptxas output for Jetson Orin Nano (sm_87): tensor-core IMMA, ldmatrix (LDSM), cp.async (LDGSTS),
    no spills and no local memory (the fused GELU / residual epilogue keeps the accumulators in registers),
    registers and shared memory within sm_87 limits."""
    report = wc.kernel_report(cfg, ORIN, knobs)
    res, ops, facts = report["resources"], report["sass"], ORIN.facts
    assert ops.get("IMMA.16832.S8.S8", 0) > 0, ops
    assert any(o.startswith("LDSM") for o in ops), ops
    assert any(o.startswith("LDGSTS") for o in ops), ops
    assert res.spill_stores == res.spill_loads == res.stack_bytes == 0, res
    assert not any(o.startswith(("STL", "LDL")) for o in ops), ops  # no local memory at all
    assert res.registers <= facts["max_registers_per_thread"]
    assert res.registers * knobs.threads <= facts["registers_per_sm"]
    assert knobs.shared_bytes() <= facts["max_shared_bytes_per_block"]
    # up to 48 KB static __shared__ arrays (ptxas counts them); above, dynamic shared memory (TVM's CUDA
    # runtime raises the kernel's limit at launch), which ptxas does not count
    static = knobs.shared_bytes() <= facts["static_shared_bytes"]
    assert res.shared_bytes == (knobs.shared_bytes() if static else 0)
    # B reaches registers as packed 32-bit words (16 weights), never as an int8 tile or byte by byte
    assert ops.get("LDS", 0) > 0 and "LDS.U8" not in ops
    # one store per output element, as in the plain kernel: the epilogue does not write and re-read out
    plain = wc.kernel_report(replace(cfg, epilogue="none"), ORIN, knobs)["sass"] if cfg.epilogue != "none" else ops
    assert ops["STG.E"] == plain["STG.E"]
    if cfg.epilogue == "gelu":  # the rational erf's fast division in registers, no IEEE division slow path
        assert ops.get("MUFU.RCP", 0) >= plain.get("MUFU.RCP", 0) + ops["STG.E"]
        assert ops.get("FCHK", 0) < ops["STG.E"] and ops.get("CALL.REL.NOINC", 0) < ops["STG.E"]
        # about 24 instructions per output element (with IEEE division's slow path inlined: 37)
        assert sum(ops.values()) - sum(plain.values()) <= 26 * ops["STG.E"]
    if cfg.epilogue == "residual":  # the residual is read from global memory (once per element)
        assert ops.get("LDG.E.CONSTANT", 0) >= plain.get("LDG.E.CONSTANT", 0) + ops["STG.E"]


def test_sass_main_loop_instructions_per_imma():
    """ptxas's main loop of the default 1024x2048x512 kernel for sm_87 (its SASS from the first shared load that is
    not an ldmatrix to the last IMMA): the packed weights' shared loads and every integer instruction (the decode,
    and addresses) number at most 1.5 per IMMA (1.84 with two packed bytes per prmt selector word, 4.2 with 2x2
    warps of 64x64 tiles and the byte-wise decode): each lane loads its 16 weights of a 16-column strip and k step
    as one 32-bit word (TC_LAYOUT), decoded once per CTA for the warp's 8 row fragments."""
    cfg = W2A8Config(1024, 2048, 512)
    func = wc.schedule(wc.tc_compute(cfg), ORIN.target()).with_attr("global_symbol", "w2a8")
    cubin = tc.compile_cuda(wc.cuda_source(func, ORIN), "sm_87")
    ops = cubin.opcodes()
    imma = [i for i, o in enumerate(ops) if o == "IMMA.16832.S8.S8"]
    loop = ops[ops.index("LDS"):imma[-1] + 1]
    assert len(imma) == 512  # every k step of the 128x32 warp tile (8 x 4 IMMA each), the k loop unrolled
    # one 32-bit load (ptxas's never-executed "@!PT LDS RZ, [RZ]" aside) and four prmt per 16 IMMA
    assert len(re.findall(r"\bLDS R\d+, \[R\d+", cubin.sass())) * 16 == len(imma) == loop.count("PRMT") * 4
    decode = [o for o in loop if o == "LDS" or o.split(".")[0] in ("PRMT", "LOP3", "IMAD", "SHF", "IADD3", "LEA")]
    assert len(decode) <= 1.5 * len(imma)


@pytest.mark.parametrize("factor", [1 - 2**-22, 1 + 2**-22], ids=["quotient-low", "quotient-high"])
def test_fast_division_gelu_error_vs_pytorch(factor):
    """The CUDA epilogue's erf divides with __fdividef (div.approx.f32: within 2 ulp, at most 2^-22 relative, for
    its denominators in [-2.4, -0.0142]). apply_epilogue's GELU with every quotient off by that much, compiled for
    the host, is within 4e-7 * |x| of PyTorch's erf GELU (float64) on [-12, 12], 0 and +-100; the IEEE
    division's is within 2.6e-7 * |x| (the rational erf and its clamp at +-4 alone)."""
    import torch
    from tvm.script import tirx as T

    from bmvcc.schedules.w2a8 import apply_epilogue

    x = np.concatenate([np.linspace(-12.0, 12.0, 1 << 14), [0.0, 100.0, -100.0]]).astype(np.float32)

    @T.prim_func(private=True, s_tir=True)
    def gelu(a: T.Buffer((x.size,), "float32"), out: T.Buffer((x.size,), "float32")):
        for i in range(x.size):
            with T.sblock("gelu"):
                vi = T.axis.spatial(x.size, i)
                out[vi] = apply_epilogue("gelu", a[vi], None, vi, 0, lambda p, q: p / q * T.float32(factor))

    got = _run_cpu(gelu, x, out_shape=x.shape)
    ref = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()
    relative = np.abs(got - ref)[x != 0] / np.abs(x[x != 0])
    assert got[x == 0] == 0 and relative.max() <= 4e-7
    assert relative.max() > 2.6e-7  # beyond the IEEE division's bound: the quotient's error shows


def test_toolchain_missing_package_is_a_bmvcc_error(monkeypatch):
    import importlib.util

    from bmvcc.errors import BmvccError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nvidia.cuda_nvcc" else real(name, *a))
    with pytest.raises(BmvccError, match="nvidia-cuda-nvcc-cu12.*pip install"):
        tc.ptxas()


def test_knobs_validated():
    with pytest.raises(ValueError, match="multiples of 16x16"):
        wc.W2A8CudaKnobs(block_m=48, warps_m=2)
    with pytest.raises(ValueError, match="block_k"):
        wc.W2A8CudaKnobs(block_k=48)
    with pytest.raises(ValueError, match="cp.async vector per thread"):
        wc.W2A8CudaKnobs(block_m=32, block_n=16, block_k=32, warps_m=2, warps_n=1)  # 128 B for 64 threads
    assert wc.DEFAULT.fits(ORIN.facts) and wc.SMALL_M.fits(ORIN.facts)
    big = wc.W2A8CudaKnobs(block_m=256, block_k=128, warps_m=4, stages=4)  # 160 KB: sm_87's opt-in is 163 KB
    assert big.fits(ORIN.facts) and not big.fits(targets.get("cuda-sm86").facts)  # sm_86: 99 KB
    assert not wc.W2A8CudaKnobs(block_m=256, block_n=256, block_k=128, warps_m=4, warps_n=2, stages=4).fits(ORIN.facts)


def test_modeled_time_orin_nano():
    facts = ORIN.facts
    t = w2a8_roofline(W2A8Config(1024, 2048, 512), facts)
    # 2.15 GOP at 20.48 dense TOPS = 105 us; 10 MB of traffic at 68 GB/s = 148 us: memory bound (fp32 out)
    assert t["bound"] == "memory" and t["seconds"] == pytest.approx(t["bytes"] / 68e9)
    assert t["compute_s"] == pytest.approx(2 * 1024 * 2048 * 512 / 20.48e12)
    # the residual epilogue reads one more fp32 [M, N] tensor
    r = w2a8_roofline(W2A8Config(1024, 2048, 512, "residual"), facts)
    assert r["bytes"] - t["bytes"] == 4 * 1024 * 2048


def _cuda_available():
    try:
        return tvm.cuda(0).exist
    except Exception:  # noqa: BLE001 - a runtime without CUDA support raises instead of returning False
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual", "bias_gelu", "bias_gelu_tanh"])
@pytest.mark.parametrize("m,n,k", [(256, 256, 128), (5, 40, 70)])
def test_gpu_matches_numpy(m, n, k, epilogue):
    """On a CUDA GPU (sm_80+): the scheduled kernel (each epilogue) on padded operands equals numpy (exact int32
    accumulation; the epilogue's acc * (w_scale / x_scale) is within 2 fp32 ulp of (acc * w_scale) / x_scale)."""
    cfg = W2A8Config(m, n, k, epilogue)
    knobs = wc.default_knobs(cfg)
    p = wc.padded(cfg, knobs)
    q, packed, xs, ws = _operands(cfg, seed=1)
    res = _extra_operand(cfg)
    operands = wc.pad_operands(cfg, knobs, q, packed, xs, res)
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    mod = tvm.IRModule({"main": wc.schedule(wc.tc_compute(p), target, knobs).with_attr("global_symbol", "main")})
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        lib = tvm.compile(mod, target=target)
    args = [tvm.runtime.tensor(a, dev) for a in (*operands[:3], np.array([ws], np.float32), *operands[3:])]
    out = tvm.runtime.empty((p.m, p.n), "float32", dev)
    lib["main"](*args, out)
    # GELU: the rational erf adds 1e-7 * |x| (see test_padded_compute_matches_numpy), the erf GELU's fast division
    # up to 4e-7 * |x| more, x the GELU's input (test_fast_division_gelu_error_vs_pytorch)
    got, ref = out.numpy()[:m, :n], w2a8_numpy(q, packed, xs, ws, k, epilogue, res)
    x = w2a8_numpy(q, packed, xs, ws, k, epilogue.removesuffix("gelu").rstrip("_") or "none", res)
    slack = 4e-7 * np.abs(x) if epilogue.endswith("gelu") else 0.0
    assert (np.abs(got - ref) <= (1e-6 if "gelu" in epilogue else 5e-7) * np.abs(ref) + 1e-6 + slack).all()


def test_tuning_knobs_fit_orin():
    """The tuning space for the paper model's FFN GEMM: every knob set divides the shape (no padding) and fits
    sm_87's shared memory (163 KB opt-in), registers and block size; the default schedule comes first."""
    cfg = W2A8Config(1024, 2048, 512, "gelu")
    knobs, facts = wc.tuning_knobs(cfg, ORIN.facts), ORIN.facts
    assert knobs[0] == wc.default_knobs(cfg) and len(set(knobs)) == len(knobs) > 100
    for k in knobs:
        assert wc.padded(cfg, k) == cfg and k.shared_bytes() <= facts["max_shared_bytes_per_block"] and k.threads <= 256
        assert wc.estimated_registers(k) * k.threads <= facts["registers_per_sm"]
    assert {k.stages for k in knobs} == {2, 3, 4} and {k.block_k for k in knobs} == {32, 64, 128}
    assert max(k.shared_bytes() for k in knobs) > facts["static_shared_bytes"]  # dynamic shared memory
    assert {k.block_m // k.warps_m for k in knobs} == {32, 64, 128} and {k.threads for k in knobs} == {32, 64, 128, 256}
    assert not wc.tuning_knobs(W2A8Config(25, 40, 70), facts)  # unaligned: the GPU build tunes the padded kernel


def test_intrinsics_table_holds_every_fragment_count_the_kernel_uses():
    """compile --db replays W2A8 traces after intrinsics.ensure_all("w2a8_cuda") (bmvcc/tunedb.py): the table must
    hold the mma intrinsic of every warp tile that default_knobs and the tuning space use, in both shared scopes."""
    from bmvcc.schedules.intrinsics import INTRINSICS

    cfgs = [W2A8Config(1024, 2048, 512), W2A8Config(16, 128, 64), W2A8Config(25, 40, 70), W2A8Config(32, 16, 32)]
    knobs = [k for cfg in cfgs for k in (wc.default_knobs(cfg), *wc.tuning_knobs(cfg, ORIN.facts))]
    names = {ci.mma_decode_name(k.block_m // k.warps_m // 16, scope) for k in knobs for scope in ("shared", "shared.dyn")}
    assert {k.block_m // k.warps_m for k in knobs} == {16, 32, 64, 128}
    assert names <= {name for name, (user, _, _) in INTRINSICS.items() if user == "w2a8_cuda"}


def test_tuning_space_builds_for_orin():
    """MetaSchedule's design spaces from the registered CUDA space (schedules/tuning_spaces.py): one schedule
    per knob set with no sampled decision (the search replays traces with fresh decisions), each replaying on
    the unscheduled kernel and passing the target's postprocessors; three of them built for sm_87 have
    the tensor-core path in their SASS, no spills and no local memory."""
    from tvm.s_tir import meta_schedule as ms

    from bmvcc.schedules.tuning_spaces import has_space, space_for
    from bmvcc.schedules.wmma_intrinsics import metaschedule_cuda

    cfg = W2A8Config(16, 128, 64, "gelu")  # the example model's FFN1
    target = ORIN.target()
    mod = tvm.IRModule({"main": wc.tc_compute(cfg)})
    assert has_space("w2a8", target)
    # as bmvcc tune creates it (tune._context_imports): TVM's own intrinsics, once registered by
    # metaschedule_cuda in this process (tests/test_tune_gpu.py), cannot be imported again
    with metaschedule_cuda():
        ctx = ms.TuneContext(mod=mod, target=target, space_generator=space_for("w2a8", target), task_name="w2a8")
    spaces = ctx.generate_design_space()
    knobs = wc.tuning_knobs(cfg, ORIN.facts)
    assert len(spaces) == len(knobs) > 10
    assert not [i for s in spaces for i in s.trace.insts if i.kind.name.startswith("Sample")]
    for index in (0, len(spaces) // 2, len(spaces) - 1):
        # as the search does: replay the trace on the task's module, then the postprocessors
        sch = tvm.s_tir.Schedule(mod)
        spaces[index].trace.apply_to_schedule(sch, remove_postproc=True)
        assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
        tvm.ir.assert_structural_equal(sch.mod["main"].with_attr("tirx.is_scheduled", True),
                                       wc.schedule(wc.tc_compute(cfg), target, knobs[index]))
        cubin = tc.compile_cuda(wc.cuda_source(sch.mod["main"], ORIN), "sm_87")
        (res,), ops = cubin.resources, cubin.opcode_counts()
        assert ops.get("IMMA.16832.S8.S8", 0) > 0 and any(o.startswith("LDSM") for o in ops), (knobs[index], ops)
        assert any(o.startswith("LDGSTS") for o in ops), (knobs[index], ops)
        assert res.spill_stores == res.spill_loads == res.stack_bytes == 0, (knobs[index], res)
        assert res.registers * knobs[index].threads <= 65536
