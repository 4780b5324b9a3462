"""aarch64 kernels executed: W2A8 (on sdot), norm_quant and the causal attention kernel, each scheduled for the aarch64
target (Cortex-A78 + dotprod) as bmvcc schedules them, linked into one library by the product's cross toolchain
(lowering.link) and run in one emulated Python process (tests/aarch64_kernels_driver.py; QEMU's Cortex-A76, see
tests/test_aarch64_emulated.py, which also says how to build the sysroot these tests skip without). The outputs are
compared here with the x86 tests' references at their cases: W2A8 (tests/test_w2a8_cpu.py) bit for bit, gelu within
its erf's tolerance; norm_quant (tests/test_passes_kernels.py) codes within one, x_scale within XS_RTOL, ties exact;
attention (tests/test_attention_cpu.py) within its float32 tolerance. Every check fails with the last element (edge
tiles) of any one of its outputs moved, the kernels sized at a schedule's threshold are checked to be scheduled so,
and the library's sdot code dies on a CPU without it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import pytest
import tvm

from bmvcc.lowering import link
from bmvcc.schedules import norm_quant_cpu, w2a8_cpu
from bmvcc.schedules.attention_cpu import AttentionConfig, attention_cpu
from bmvcc.schedules.norm_quant import NormQuantConfig, norm_quant_compute, norm_quant_numpy
from bmvcc.schedules.w2a8 import W2A8Config, w2a8_compute, w2a8_numpy
from bmvcc.schedules.w2a8_cpu import DEFAULT_KNOBS, MAX_MR, MAX_NT, MIN_PARALLEL_MACS, ROWS_ATTR, CpuKnobs, strip_width
from bmvcc.targets import get

from test_aarch64_emulated import REPO, needs_emulation, run_emulated
from test_attention_cpu import ATTENTION_CASES, _attention_case, _causal, _close, _reference
from test_passes_kernels import TIES_GAIN, _kernel_order_reference, _norm_quant_rows
from test_w2a8_cpu import SHAPES, _check_gelu, _inputs


SPEC = get("aarch64")
AARCH64 = SPEC.target()
DRIVER = REPO / "tests" / "aarch64_kernels_driver.py"
# the ends of the sdot tuning space and a tile between (test_w2a8_cpu's HOST_VARIANTS on x86)
SDOT_VARIANTS = [CpuKnobs("sdot", 1, 1), CpuKnobs("sdot", 2, 3), CpuKnobs("sdot", MAX_MR, MAX_NT)]
# LLVM fuses norm_quant's multiply-adds (sum of squares, LayerNorm's xn * g + beta) into FMAs here, as on x86 CPUs with
# FMA (the kernel-order reference is exact on baseline x86-64 only). Fused or not, each K = 96 sum of squares is within
# 22 u (u = 2^-24; 16 lanes of 6 positive terms, then the lanes) of the exact one: the two within 44 u, rstd within
# 22 u and a few roundings, x_scale (through |xn|, one rounding fused) within ~30 u = 1.8e-6 of the reference's (3 ulps,
# 3.6e-7, measured); a wrong row or lane is off by far more
XS_RTOL = 2e-6
NORM_K = 96  # norm_quant's rows: K of XS_RTOL's bound
STRIP = strip_width(DEFAULT_KNOBS["sdot"])  # W2A8's output features per parallel task
# Sized at the schedules' thresholds (test_threshold_kernels_are_scheduled_so): 16 rows of 4 strips reaching
# MIN_PARALLEL_MACS; test_w2a8_cpu's one strip, run as 2 row blocks on 2 cores (M, N and K multiples of no tile);
# RMSNorm rows reaching MIN_PARALLEL_ELEMENTS
PARALLEL = W2A8Config(16, 4 * STRIP, -(-MIN_PARALLEL_MACS // (16 * 4 * STRIP)))
ROW_BLOCKS = W2A8Config(37, STRIP - 5, 3999)
NORM_PARALLEL_ROWS = -(-norm_quant_cpu.MIN_PARALLEL_ELEMENTS // NORM_K)


@dataclass(frozen=True)
class Kernel:
    func: object  # the PrimFunc scheduled for the aarch64 target
    args: tuple  # numpy arrays: its inputs, then its outputs (as the kernel finds them: NaN where it must write)
    check: Callable  # check(*outputs) asserts the outputs the kernel left
    outputs: int = 1  # how many of args are outputs


def _w2a8(cfg, q, packed, xs, ws, res, knobs=None, cores=None) -> Kernel:
    """The W2A8 kernel (`cores`: the aarch64 target on that many, its row blocks) against w2a8_numpy: bit for bit,
    gelu within test_w2a8_cpu's tolerance."""
    target = AARCH64 if cores is None else tvm.target.Target({**SPEC.tvm_target, "num-cores": cores})
    args = (q, packed, xs, ws) + ((res,) if cfg.epilogue == "residual" else ())
    ref = w2a8_numpy(q, packed, xs, float(ws[0]), cfg.k, cfg.epilogue, res)
    check = _check_gelu if cfg.epilogue == "gelu" else np.testing.assert_array_equal
    return Kernel(w2a8_cpu.schedule(w2a8_compute(cfg), target, knobs),
                  args + (np.full((cfg.m, cfg.n), np.nan, np.float32),), lambda out: check(out, ref))


def _accumulators(cfg, seed, knobs=None, cores=None) -> Kernel:
    """x_scale = w_scale = 1: the outputs are float32(acc), exact below 2^24 (test_w2a8_cpu's _acc_exact)."""
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(seed))
    return _w2a8(cfg, q, packed, np.ones((cfg.m, 1), np.float32), np.ones(1, np.float32), res, knobs, cores)


def _dequant(cfg, seed, extreme=False) -> Kernel:
    return _w2a8(cfg, *_inputs(cfg, np.random.default_rng(seed), extreme))


def _norm_quant(cfg, x, g, beta, check) -> Kernel:
    args = (x, g) + (() if beta is None else (beta,))
    outputs = (np.full((cfg.m, cfg.k), 99, np.int8), np.full((cfg.m, 1), np.nan, np.float32))
    return Kernel(norm_quant_cpu.schedule(norm_quant_compute(cfg), AARCH64), args + outputs, check, outputs=2)


def _norm_quant_seeded(m, layer_norm) -> Kernel:
    """test_norm_quant_matches_numpy's rows: codes within one of norm_quant_numpy's (pairwise sums: rstd an ulp
    off), x_scale within XS_RTOL of the kernel-order reference's."""
    x, g, beta = _norm_quant_rows(m, layer_norm, NORM_K)
    cfg = NormQuantConfig(m, x.shape[1], layer_norm=layer_norm)
    xs_ref = _kernel_order_reference(x, g, lanes=norm_quant_cpu.reduction_lanes(cfg.k), beta=beta)[1]
    q_ref = norm_quant_numpy(x, g, beta=beta)[0]

    def check(q, xs):
        assert np.abs(q.astype(int) - q_ref).max() <= 1
        np.testing.assert_allclose(xs, xs_ref, rtol=XS_RTOL)

    return _norm_quant(cfg, x, g, beta, check)


def _norm_quant_ties() -> Kernel:
    """TIES_GAIN's rows (exact .5 ties): rounded half to even, x_scale exactly 1."""
    x = np.full((2, len(TIES_GAIN)), 2.0, np.float32)

    def check(q, xs):
        np.testing.assert_array_equal(q, np.rint(np.stack([TIES_GAIN] * 2)))
        np.testing.assert_array_equal(xs, 1.0)

    return _norm_quant(NormQuantConfig(2, len(TIES_GAIN), norm_eps=0.0), x, TIES_GAIN, None, check)


def _attention(g, gk, n, d) -> Kernel:
    args, operands = _attention_case(g, gk, n, d)
    ref = _reference(*operands, _causal(n))
    func = attention_cpu(AttentionConfig(g, gk, n, d, float(operands[-1])), AARCH64)
    return Kernel(func, args + (np.full((g, n, d), np.nan, np.float32),), lambda out: _close(out, ref))


KERNELS = {  # name (the library's function) -> its Kernel, made when the module's tests run
    **{f"w2a8_acc_{m}x{n}x{k}": partial(_accumulators, W2A8Config(m, n, k), m * 1000 + k) for m, n, k in SHAPES},
    **{f"w2a8_sdot_{kn.mr}x{kn.nt}": partial(_accumulators, W2A8Config(11, 40, 290), 11, kn) for kn in SDOT_VARIANTS},
    "w2a8_parallel": partial(_accumulators, PARALLEL, 16),
    "w2a8_row_blocks": partial(_accumulators, ROW_BLOCKS, 1, cores=2),
    "w2a8_dequant": partial(_dequant, W2A8Config(9, 48, 1001), 7),
    "w2a8_dequant_extreme": partial(_dequant, W2A8Config(9, 48, 1001), 7, extreme=True),
    "w2a8_residual": partial(_dequant, W2A8Config(6, 40, 66, epilogue="residual"), 3),
    "w2a8_gelu": partial(_dequant, W2A8Config(3, 24, 64, epilogue="gelu"), 4),
    **{f"norm_quant_{'layer' if ln else 'rms'}_{m}": partial(_norm_quant_seeded, m, ln) for m in (12, 7)
       for ln in (False, True)},
    "norm_quant_parallel": partial(_norm_quant_seeded, NORM_PARALLEL_ROWS, False),
    "norm_quant_ties": _norm_quant_ties,
    **{f"attention_{g}_{gk}_{n}_{d}": partial(_attention, g, gk, n, d) for g, gk, n, d in ATTENTION_CASES},
}


@pytest.fixture(scope="module")
def kernels():
    """Every Kernel of KERNELS, made (built for aarch64) once."""
    return {name: make() for name, make in KERNELS.items()}


@pytest.fixture(scope="module")
def emulated(kernels, tmp_path_factory):
    """(directory, kernels, outputs): every Kernel of KERNELS built into DIR/kernels.so, its arguments in
    DIR/in/NAME.npz, run once under emulation; outputs[name] its output arrays as the kernel left them."""
    root = tmp_path_factory.mktemp("aarch64_kernels")
    mod = tvm.IRModule({name: k.func.with_attr("global_symbol", name) for name, k in kernels.items()})
    tvm.compile(mod, target=AARCH64).export_library(str(root / "kernels.so"), **link(SPEC))
    for sub in ("in", "out"):
        (root / sub).mkdir()
    for name, k in kernels.items():
        np.savez(root / "in" / name, *k.args)
    process = run_emulated(DRIVER, [root / "kernels.so", root / "in", root / "out"], root)
    assert process.returncode == 0, process.stderr
    outputs = {}
    for name, k in kernels.items():
        with np.load(root / "out" / f"{name}.npz") as data:
            outputs[name] = [data[f"arr_{i}"] for i in range(len(k.args) - k.outputs, len(k.args))]
    return root, kernels, outputs


@needs_emulation
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_reference(emulated, name):
    """The kernel's outputs pass its check; with the last element of any one of them moved by 3 (codes may be one
    off), they do not."""
    _, kernels, outputs = emulated
    kernels[name].check(*outputs[name])
    for moved in range(len(outputs[name])):
        wrong = [out.copy() for out in outputs[name]]
        wrong[moved].flat[-1] += 3
        with pytest.raises(AssertionError):
            kernels[name].check(*wrong)


def _outer_loop(func, block):
    sch = tvm.s_tir.Schedule(func)
    return sch.get(sch.get_loops(sch.get_sblock(block))[0])


def test_threshold_kernels_are_scheduled_so(kernels):
    """The kernels sized at a schedule's threshold run as they stand for: w2a8_parallel's and norm_quant_parallel's
    outer loops parallel, w2a8_row_blocks's one strip as 2 parallel row blocks (a moved threshold fails here; needs
    no emulation)."""
    for name, block in (("w2a8_parallel", "decode"), ("w2a8_row_blocks", "decode"), ("norm_quant_parallel", "quant")):
        assert _outer_loop(kernels[name].func, block).kind == tvm.tirx.ForKind.PARALLEL, name
    row_blocks = kernels["w2a8_row_blocks"].func
    assert int(row_blocks.attrs[ROWS_ATTR]) == 2 and int(_outer_loop(row_blocks, "decode").extent) == 2


@needs_emulation
def test_sdot_kernel_dies_on_a_cpu_without_dotprod(emulated, tmp_path):
    """A Cortex-A72 (Armv8.0-A) has no sdot: the library's W2A8 code dies there on SIGILL, under any QEMU (the driver
    loads the library itself, so bmvcc's instruction-set guard, which may refuse first from QEMU 8.1, never runs)."""
    root, _, _ = emulated
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "w2a8_gelu.npz").symlink_to(root / "in" / "w2a8_gelu.npz")
    process = run_emulated(DRIVER, [root / "kernels.so", tmp_path / "in", tmp_path], tmp_path, cpu="cortex-a72")
    assert process.returncode == -signal.SIGILL, process.stderr
