"""The CPU tuning spaces of bmvcc's kernels: W2A8 (schedules/w2a8_cpu.py) and norm_quant (norm_quant.py).

MetaSchedule samples a design space by replaying its trace with new random decisions, and mutates
by replaying it with changed ones; the samples checked here are made that way. Exactness: as in tests/test_w2a8_cpu.py, int32 accumulators
and the same fp32 dequant and residual add as the numpy reference, so outputs match bit for bit.
The search itself, the database round trip and compile --db are in tests/test_tune.py.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from bmvcc.schedules import norm_quant_cpu, w2a8_cpu  # noqa: E402
from bmvcc.schedules.tuning_spaces import has_space  # noqa: E402
from bmvcc.schedules.w2a8 import W2A8Config, pack_ternary, w2a8_compute, w2a8_numpy  # noqa: E402
from bmvcc.schedules.norm_quant import NormQuantConfig, norm_quant_compute  # noqa: E402
from bmvcc.schedules.w2a8_cpu import (  # noqa: E402
    DEFAULT_KNOBS,
    STAGED_ATTR,
    intrin_of,
    select_backend,
    stage_w2a8,
)
from bmvcc.targets import get  # noqa: E402
from bmvcc.targets.cpu import AMX_OFF  # noqa: E402

from conftest import with_mattr  # noqa: E402

# this machine's vector backend, also where it runs AMX (whose fixed micro tile: tests/test_w2a8_amx.py)
HOST = tvm.target.Target(with_mattr(get("host").tvm_target, *AMX_OFF))
SAMPLES = 32  # enough replays to see every mr (4 values) and unroll step (4) in some sample
BUILDS = 4  # distinct samples built and run per shape


def _task(cfg: W2A8Config):
    func = stage_w2a8(w2a8_compute(cfg), DEFAULT_KNOBS[select_backend(HOST)])
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _samples(mod, space, seed: int):
    """SAMPLES schedules of the space, made as MetaSchedule's ReplayTrace makes them: the design-space
    trace replayed on the task with fresh random decisions, then the postprocessor that applies the
    sampled unroll step. (A TuneContext would import every TVM tensor intrinsic first, ~1 min here.)"""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    design = s_tir.Schedule(mod, seed=seed)
    space(design, HOST)
    out = []
    for i in range(SAMPLES):
        sch = s_tir.Schedule(mod, seed=seed * SAMPLES + i + 1)
        s_tir.Trace(design.trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        assert ms.postproc.RewriteParallelVectorizeUnroll().apply(sch)
        out.append(sch)
    return out


def _decisions(sch) -> str:
    trace = sch.trace
    return str([trace.decisions[inst] for inst in trace.insts if inst in trace.decisions])


@pytest.mark.parametrize("m,n,k", [(13, 37, 300), (16, 48, 256), (1, 40, 70)], ids=["padded", "full-tiles", "gemv"])
def test_sampled_schedules_are_exact(m, n, k):
    """Replayed samples draw different tiles and unroll steps; each builds and matches numpy exactly."""
    assert has_space("w2a8", HOST)
    cfg = W2A8Config(m, n, k, epilogue="residual")
    scheds = _samples(_task(cfg), w2a8_cpu.space, seed=m)
    distinct = {_decisions(s): s for s in scheds}
    assert len(scheds) == SAMPLES and len(distinct) >= 3, list(distinct)  # every replay succeeded, and they differ
    rng = np.random.default_rng(k)
    q = rng.integers(-128, 128, (m, k), dtype=np.int8)
    packed = pack_ternary(rng.integers(-1, 2, (n, k)))
    xs = rng.uniform(0.5, 3.0, (m, 1)).astype(np.float32)
    ws = np.array([0.07], np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    ref = w2a8_numpy(q, packed, xs, float(ws[0]), k, "residual", res)
    for sch in list(distinct.values())[:BUILDS]:
        lib = tvm.compile(sch.mod, target=HOST)
        out = tvm.runtime.empty((m, n), "float32", tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a) for a in (q, packed, xs, ws, res)], out)
        np.testing.assert_array_equal(out.numpy(), ref, err_msg=_decisions(sch))


def test_staging_pads_rows_only_beyond_four():
    """GEMV and small batches keep their rows (M <= 4); larger M pads to a multiple of 4, N to the default tile."""
    knobs = DEFAULT_KNOBS[select_backend(HOST)]
    for m, mp in ((1, 1), (3, 3), (13, 16), (197, 200)):
        staged = _task(W2A8Config(m, 37, 64))["main"]
        assert staged.attrs[STAGED_ATTR] == knobs.backend
        shapes = {b.name: [int(d) for d in b.shape] for b in staged.body.block.alloc_buffers}
        width = intrin_of(knobs.backend).lanes * knobs.nt
        assert shapes["accp"] == [mp, -(-37 // width) * width], shapes


def test_norm_quant_samples_are_exact():
    """The norm_quant space's samples (quant vector widths) give the default schedule's codes and
    scales bit for bit (a vector width reorders no float operation), and the float32 reference's
    in the kernel's summation order within one code and a few float32 ulps of the scale: on this host LLVM contracts the row
    sums into FMAs, which the numpy reference does not (bit-exact on a target without FMA:
    tests/test_passes_kernels.py)."""
    from test_passes_kernels import _kernel_order_reference

    from bmvcc.schedules.norm_quant_cpu import reduction_lanes

    assert has_space("norm_quant", HOST)
    cfg = NormQuantConfig(12, 96)
    func = norm_quant_compute(cfg).with_attr("global_symbol", "main")
    distinct = {_decisions(s): s for s in _samples(tvm.IRModule({"main": func}), norm_quant_cpu.space, seed=5)}
    assert len(distinct) >= 3, list(distinct)
    rng = np.random.RandomState(2)
    x = (rng.randn(cfg.m, cfg.k) * 3).astype(np.float32)
    g = (1 + 0.3 * rng.randn(cfg.k)).astype(np.float32)

    def run(mod):
        q, xs = tvm.runtime.empty((cfg.m, cfg.k), "int8", tvm.cpu()), tvm.runtime.empty((cfg.m, 1), "float32", tvm.cpu())
        tvm.compile(mod, target=HOST)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(g), q, xs)
        return q.numpy(), xs.numpy()

    q_def, xs_def = run(tvm.IRModule({"main": norm_quant_cpu.schedule(func, HOST)}))
    q_ref, xs_ref = _kernel_order_reference(x, g, lanes=reduction_lanes(cfg.k))
    assert np.abs(q_def.astype(int) - q_ref).max() <= 1
    np.testing.assert_allclose(xs_def, xs_ref, rtol=2 ** -21, atol=0)  # an ulp of rstd: a few ulps of the scale
    for sch in list(distinct.values())[:BUILDS]:
        q, xs = run(sch.mod)
        np.testing.assert_array_equal(q, q_def, err_msg=_decisions(sch))
        np.testing.assert_array_equal(xs, xs_def, err_msg=_decisions(sch))
