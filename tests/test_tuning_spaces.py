"""The W2A8 CPU tuning space (schedules/w2a8_cpu.py, registered in schedules/tuning_spaces.py).

MetaSchedule samples a design space by replaying its trace with new random decisions, and mutates
by replaying it with changed ones; the samples checked here are made that way. Exactness: as in tests/test_w2a8_cpu.py, int32 accumulators
and the same fp32 dequant and residual add as the numpy reference, so outputs match bit for bit.
The search itself, the database round trip and compile --db are in tests/test_tune.py.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from bmvcc.schedules.tuning_spaces import has_space  # noqa: E402
from bmvcc.schedules.w2a8 import W2A8Config, pack_ternary, w2a8_compute, w2a8_numpy  # noqa: E402
from bmvcc.schedules.w2a8_cpu import DEFAULT_KNOBS, STAGED_ATTR, intrin_of, select_backend, stage_w2a8  # noqa: E402
from bmvcc.targets import get  # noqa: E402

HOST = get("host").target()
SAMPLES = 32  # enough replays to see every mr (4 values) and unroll step (4) in some sample
BUILDS = 4  # distinct samples built and run per shape


def _task(cfg: W2A8Config):
    func = stage_w2a8(w2a8_compute(cfg), DEFAULT_KNOBS[select_backend(HOST)])
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _samples(mod, seed: int):
    """SAMPLES schedules of the space, made as MetaSchedule's ReplayTrace makes them: the design-space
    trace replayed on the task with fresh random decisions, then the postprocessor that applies the
    sampled unroll step. (A TuneContext would import every TVM tensor intrinsic first, ~1 min here.)"""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from bmvcc.schedules.w2a8_cpu import w2a8_space

    design = s_tir.Schedule(mod, seed=seed)
    w2a8_space(design, HOST)
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
    scheds = _samples(_task(cfg), seed=m)
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
