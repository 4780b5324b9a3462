"""LayerNorm + matmul on CUDA targets: schedules/norm_matmul.py's compute definition against numpy, bmvcc's tensor-core
kernel (schedules/norm_matmul_cuda.py) built for sm_87 and emulated from its PTX against the definition within the
stated bound, negative controls (kernels with a mistake in the norm prologue) that must disagree, its SASS, and
passes/fuse_norm_matmul.py. A mistake in the GEMM or the epilogue (a W tile, a fragment's row or column, the guards)
moves outputs by far more than the bound (under 1% of their scale): the positive tests catch it, their partial
column blocks (N = 72, 136) and row tiles (M = 33, 40) covering the guards."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm

from bmvcc import targets
from bmvcc.schedules.norm_matmul import NormMatmulConfig, norm_matmul_compute
from bmvcc.schedules.norm_matmul_cuda import schedule, supported

U = 2.0**-11  # fp16 unit roundoff
E = 2.0**-24  # float32's
ORIN = targets.get("jetson-orin-nano")
CONFIGS = {  # partial row tiles (M not a multiple of 32), a partial column tile (N = 72), float4 and scalar loads
    "m40-k128-n72-f32": (NormMatmulConfig(40, 128, 72), 1.0),
    "m33-k512-n136-f16": (NormMatmulConfig(33, 512, 136, out_dtype="float16"), 1.0),  # the paper's K, 3 column blocks
    "m33-k64-n48-f16": (NormMatmulConfig(33, 64, 48, out_dtype="float16"), 1.0),
    "m40-k128-n64-small-var": (NormMatmulConfig(40, 128, 64, out_dtype="float16"), 3e-3),  # variance ~ eps
}


def _inputs(cfg: NormMatmulConfig, sigma: float, seed: int = 0) -> list[np.ndarray]:
    """x (rows of spread sigma around a mean of a few sigma), gamma, beta, w, bias, out (zeros)."""
    rng = np.random.default_rng(seed)
    x = sigma * (rng.standard_normal((cfg.m, cfg.k)) + rng.uniform(-3, 3, (cfg.m, 1)))
    gamma, beta = 1.0 + 0.3 * rng.standard_normal(cfg.k), 0.2 * rng.standard_normal(cfg.k)
    w = rng.standard_normal((cfg.k, cfg.n)) / np.sqrt(cfg.k)
    return [x.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32), w.astype(np.float16),
            rng.standard_normal(cfg.n).astype(np.float32), np.zeros((cfg.m, cfg.n), cfg.out_dtype)]


def _numpy(cfg: NormMatmulConfig, x, gamma, beta, w, bias, _out) -> tuple[np.ndarray, np.ndarray]:
    """(the fp16 normalized rows, out): the LayerNorm in float32 numpy (its own summation order), the fp16 products
    summed in float64."""
    mean = x.sum(1, keepdims=True, dtype=np.float32) / np.float32(cfg.k)
    var = ((x - mean) ** 2).sum(1, keepdims=True, dtype=np.float32) / np.float32(cfg.k)
    a = ((x - mean) / np.sqrt(var + np.float32(cfg.eps)) * gamma + beta).astype(np.float16)
    return a, (a.astype(np.float64) @ w.astype(np.float64) + bias).astype(cfg.out_dtype)


def _ulp16(v):
    return np.maximum(2.0 * U * np.abs(v), 2.0**-24)  # fp16's spacing at |v| (at most; subnormals: 2^-24)


def _bound(cfg: NormMatmulConfig, x, gamma, beta, w, bias, a, out):
    """schedules/norm_matmul_cuda.py's bound on |out' - out| for two computations of `out` whose row statistics are
    summed in different float32 orders: a normalized value differs by delta_k (the statistics' float32 error) plus one
    fp16 ulp (the neighbouring fp16), each weighted by |w_kn| in the dot product; both float32 accumulations
    (K + 1 terms with the bias) within (K + 1) 2^-24 sum |a_k w_kn|; an fp16 output one ulp more.
    delta_k = rstd |gamma_k| 2 K 2^-24 max|x| (the means) + (|a_k - beta_k| + ulp) (2 K + 8) 2^-24 (rstd, relative)."""
    x64 = x.astype(np.float64)
    rstd = 1.0 / np.sqrt(x64.var(1, keepdims=True) + cfg.eps)
    a64 = a.astype(np.float64)
    delta = (rstd * np.abs(gamma) * 2 * cfg.k * E * np.abs(x64).max(1, keepdims=True)
             + (np.abs(a64 - beta) + _ulp16(a64)) * (2 * cfg.k + 8) * E)
    a_max = np.abs(a64) + delta + 2 * _ulp16(a64)  # |a| of either computation
    w64 = np.abs(w.astype(np.float64))
    terms = a_max @ w64 + np.abs(bias)
    err = (delta + _ulp16(a_max)) @ w64 + 2 * (cfg.k + 1) * E * terms
    return err + (_ulp16(np.abs(out.astype(np.float64)) + err) if cfg.out_dtype == "float16" else 0.0)


def _within_bound(cfg, arrays, a, out, reference) -> np.ndarray:
    """Asserts |out - reference| within the bound; returns the bound."""
    err = np.abs(out.astype(np.float64) - reference.astype(np.float64))
    bound = _bound(cfg, *arrays[:5], a, reference)
    assert (err <= bound).all(), (err - bound).max()
    return bound


@pytest.mark.parametrize("name", CONFIGS)
def test_definition_matches_numpy_within_the_bound(name):
    """The definition (built for llvm) against the LayerNorm and fp16 matmul in numpy, whose float32 row sums run in
    another order: within the stated bound."""
    from bmvcc.ptx.verify import run_definition

    cfg, sigma = CONFIGS[name]
    arrays = _inputs(cfg, sigma)
    a, ref = _numpy(cfg, *arrays)
    out = run_definition(norm_matmul_compute(cfg), arrays)[-1]
    bound = _within_bound(cfg, arrays, a, out, ref)
    # not a vacuous bound: about 2u sum_k |a_k w_kn| (one fp16 ulp per normalized value), 0.2-0.5% of max|ref| here
    assert bound.max() < 0.01 * np.abs(ref).max()


def _scheduled(cfg: NormMatmulConfig):
    """(IRModule of the scheduled kernel, its CUDA source) for the Orin as the GPU build makes them (cp.async)."""
    mod = tvm.IRModule({"norm_matmul": schedule(norm_matmul_compute(cfg), ORIN.target()).with_attr(
        "global_symbol", "norm_matmul")})
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        return mod, tvm.compile(mod, target=ORIN.target()).mod.imports[0].inspect_source("cuda")


@functools.cache
def _kernel_ptx(cfg: NormMatmulConfig, mutation: tuple[str, str] | None = None):
    """(PTX kernels, launches) of the scheduled kernel for sm_87 (NVRTC); `mutation`: (text, its replacement) in the
    CUDA source first (a negative control)."""
    from bmvcc.ptx.launches import kernel_launches
    from bmvcc.ptx.parse import parse_ptx
    from bmvcc.targets.cuda_toolchain import cuda_to_ptx

    mod, source = _scheduled(cfg)
    if mutation is not None:
        assert source.count(mutation[0]) == 1, mutation[0]
        source = source.replace(*mutation)
    return parse_ptx(cuda_to_ptx(source, "sm_87")), kernel_launches(mod, ORIN.target())


def _emulated(cfg: NormMatmulConfig, sigma: float, mutation=None):
    """(inputs, the emulated kernel's output, the definition's): every CTA run and every output written, no race."""
    from bmvcc.ptx.verify import emulate, run_definition

    arrays = _inputs(cfg, sigma)
    reference = run_definition(norm_matmul_compute(cfg), arrays)[-1]
    kernels, launches = _kernel_ptx(cfg, mutation)
    emulated = [x.copy() for x in arrays]
    res = emulate(kernels, launches["norm_matmul"], emulated)
    assert res.ctas_run == res.ctas_total > 1 and res.races == 0 and res.written[-1].all()
    return arrays, emulated[-1], reference


def _agree(cfg: NormMatmulConfig, out, reference) -> bool:
    """As `bmvcc verify` compares (the definition's PRECISION_ATTR: fp16)."""
    from bmvcc.ptx.verify import PRECISION_ATTR, compare

    precision = str(norm_matmul_compute(cfg).attrs[PRECISION_ATTR])
    return compare([out], [reference], [np.ones(out.shape, bool)], complete=True, precision=precision)[1]


@pytest.mark.parametrize("name", CONFIGS)
def test_kernel_emulated_from_sm87_ptx_matches_the_definition(name):
    """Every CTA of the kernel run by bmvcc's PTX emulator: within the stated bound of the definition, and agreeing
    as `bmvcc verify` compares."""
    cfg, sigma = CONFIGS[name]
    arrays, out, reference = _emulated(cfg, sigma)
    _within_bound(cfg, arrays, _numpy(cfg, *arrays)[0], out, reference)
    assert _agree(cfg, out, reference)


MUTATIONS = {  # the kernel's CUDA source for CONFIGS' small-variance case (K = 128) -> a wrong kernel
    "variance-without-eps": (" + 0x1.4f8b588e368f1p-17f/*1.000000e-05*/)", ")"),
    "gamma-index-shifted": ("(gamma_ptr + (((int)threadIdx.x) * 4))",
                            "(gamma_ptr + ((((int)threadIdx.x) * 4 + 4) & 127))"),
    "variance-of-half-a-row": ("stat_ptr[1] = (stat_ptr[1] + __shfl_xor_sync(__activemask(), stat_ptr[1], 16, 32));",
                               ""),
    "panel-row-off-by-one": ("(rr * 136)", "(((rr + 1) & 7) * 136)"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutated_kernel_disagrees(name):
    """Negative controls, each a mistake in the norm prologue (GEMM and epilogue mistakes: the module docstring): a
    kernel that drops the eps from the variance (rows whose variance is about eps), reads gamma 4 columns off, sums
    the squared deviations over half of the row's lanes, or writes a normalized row into its neighbour's panel row
    runs without a race but breaks the stated bound and `bmvcc verify`'s comparison."""
    cfg, sigma = CONFIGS["m40-k128-n64-small-var"]
    arrays, out, reference = _emulated(cfg, sigma, MUTATIONS[name])
    err = np.abs(out.astype(np.float64) - reference.astype(np.float64))
    assert (err > _bound(cfg, *arrays[:5], _numpy(cfg, *arrays)[0], reference)).any()
    assert not _agree(cfg, out, reference)


def test_paper_size_kernel_on_tensor_cores_without_spills():
    """The paper model's pre-attention LayerNorm + QKV projection (1024 tokens, K = 512, N = 640 = Q, K, V of a
    multi-query layer) for sm_87: HMMA (fp16 in, fp32 accumulation), ldmatrix (plain for the panel, transposed for
    W), cp.async in the SASS; no spills, static shared memory within 48 KB (the 32 x 520 fp16 panel and two 32 x 72
    W stages: 42,496 B); 32 CTAs of 128 threads (one per 32-row tile, each looping over the 10 column blocks)."""
    from bmvcc.ptx.launches import kernel_launches
    from bmvcc.schedules.norm_matmul_cuda import kernel_ops, shared_bytes
    from bmvcc.targets.cuda_toolchain import cuda_to_ptx, ptx_to_cubin

    cfg = NormMatmulConfig(1024, 512, 640, out_dtype="float16")
    mod, source = _scheduled(cfg)
    cubin = ptx_to_cubin(cuda_to_ptx(source, "sm_87"), "sm_87")
    (res,) = cubin.resources
    assert res.spill_stores == res.spill_loads == 0 and res.shared_bytes == shared_bytes(cfg) == 42496, res
    sass = cubin.sass()
    for op in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS", "SHFL.BFLY", "MUFU.RSQ"):
        assert op in sass, op
    (launch,) = kernel_launches(mod, ORIN.target())["norm_matmul"]
    assert launch.grid == (32, 1, 1) and launch.block == (32, 4, 1)
    assert kernel_ops(norm_matmul_compute(cfg)) == 2.0 * 1024 * 640 * 512


def test_shapes_the_kernel_takes():
    """K a multiple of 32 up to 608 (panel and W stages within 48 KB), N a multiple of 8, any M."""
    paper = NormMatmulConfig(1024, 512, 640)
    assert supported(paper) and supported(NormMatmulConfig(1, 608, 8)) and supported(NormMatmulConfig(33, 32, 48))
    assert not any(supported(NormMatmulConfig(16, k, n)) for k, n in ((48, 64), (640, 64), (512, 10)))


def _norm_projection(rows: int, n: int, second_reader: bool = False):
    """layer_norm(x) -> fp16 -> matmul(., W) + bias -> fp16, as the GPU pipeline leaves a float-attention model's
    pre-attention norm and QKV projection (constants from make_model's ranges); `second_reader`: the normalized rows
    are also returned."""
    from tvm import relax

    rng = np.random.default_rng(0)
    consts = [relax.const(v) for v in (1 + 0.3 * rng.standard_normal(64).astype(np.float32),
                                       0.2 * rng.standard_normal(64).astype(np.float32),
                                       (rng.standard_normal((64, n)) / 8).astype(np.float16),
                                       0.2 * rng.standard_normal(n).astype(np.float32))]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, rows, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            normed = bb.emit(relax.op.nn.layer_norm(x, consts[0], consts[1], [-1]))
            half = bb.emit(relax.op.reshape(bb.emit(relax.op.astype(normed, "float16")), (rows, 64)))
            projected = relax.op.add(consts[3], relax.op.matmul(half, consts[2], out_dtype="float32"))
            out = bb.emit(relax.op.astype(projected, "float16"))
            out = bb.emit_output(relax.Tuple([out, normed]) if second_reader else out)
        bb.emit_func_output(out)
    return bb.get(), consts


def test_pass_makes_one_kernel_call_that_computes_the_chain():
    """passes/fuse_norm_matmul.py: the chain becomes one norm_matmul call (no layer_norm, matmul or cast left),
    and the module built for the host computes what the unfused one computes: the same float32 operations in the
    same order (TVM's layer_norm legalization), up to one fp16 rounding of the output (llvm may contract an FMA)."""
    from tvm import relax

    from bmvcc.passes.fuse_norm_matmul import REPORT_KEY, fuse_norm_matmul
    from bmvcc.passes.relax_match import read_report

    mod, _ = _norm_projection(40, 48)
    fused = fuse_norm_matmul(mod)
    assert read_report(fused, REPORT_KEY) == {"fused": 1}
    fused = relax.transform.DeadCodeElimination(["main"])(fused.without_attr(REPORT_KEY))  # as the pipeline does
    script = fused["main"].script()
    assert "norm_matmul_m40_k64_n48" in script and not any(op in script for op in ("layer_norm", "matmul(", "astype"))
    x = np.random.default_rng(1).standard_normal((1, 40, 64)).astype(np.float32)
    host = targets.get("host").target()
    outs = []
    for m in (mod, fused):
        m = relax.transform.LegalizeOps()(m)
        outs.append(relax.VirtualMachine(tvm.compile(m, target=host), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    assert outs[1].shape == (40, 48) and outs[1].dtype == np.float16
    np.testing.assert_allclose(outs[1].astype(np.float32), outs[0].astype(np.float32), rtol=2 * U, atol=2 * U)


@pytest.mark.parametrize("rows, n, second_reader", [(40, 48, True), (1, 10, False)])
def test_pass_leaves_what_it_must_not_fuse(rows, n, second_reader):
    """Normalized rows read elsewhere too (fusing would compute the norm twice) and a one-row classifier head with
    10 classes (N not a multiple of 8: schedules/matmul_fold.py folds its norm instead) stay as they are."""
    from bmvcc.passes.fuse_norm_matmul import REPORT_KEY, fuse_norm_matmul
    from bmvcc.passes.relax_match import read_report

    mod, _ = _norm_projection(rows, n, second_reader)
    assert read_report(fuse_norm_matmul(mod), REPORT_KEY) == {"fused": 0}
