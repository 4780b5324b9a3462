"""schedules/cpu_default.py: small Relax modules scheduled, built for the host and compared with numpy.

Tolerances: the schedules reorder fp32 sums (register tiles, k order) and use TVM's fast exp/erf
(<= 1.1e-6 relative, <= 4.2e-7 absolute vs float64), so results differ from a float64 numpy
reference by a few float32 ulps times the reduction length: rtol 1e-5 plus an absolute term of
1e-5 x the output's scale covers it; a wrong index or a lost tile is off by O(1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from bmvcc.schedules.cpu_default import KERNEL_ATTR, schedule_cpu_module
from bmvcc.schedules.cpu_rules.common import CpuFacts
from bmvcc.targets import get as get_target

RTOL = 1e-5
# CPUs of the CI machines (and this one's): (mcpu, cores, SIMD bits). Schedules for them are built here,
# not run: Zen 2 has AVX2 only, Skylake-SP AVX-512 (16 float lanes), Sapphire Rapids AVX-512 VNNI and AMX.
CPUS = [("znver2", 2, 256), ("skylake-avx512", 2, 512), ("sapphirerapids", 16, 512)]


@pytest.fixture(scope="module")
def target():
    return get_target("host").target()


def _module(inputs: dict[str, tuple], body) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(shape, "float32")) for n, shape in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, target, *arrays) -> tuple[np.ndarray, tvm.IRModule, dict]:
    report: dict = {}
    scheduled = schedule_cpu_module(mod, target, report)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    return out, scheduled, report


def _close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def _funcs_by_rule(mod, report, rule):
    return {gv.name_hint: f for gv, f in mod.functions_items() if report.get(gv.name_hint) == rule}


def _loop_extents(func, kind) -> list[int]:
    """Extents of `func`'s loops of `kind` (tvm.tirx.ForKind), in visiting order."""
    loops = []
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, loops.append)], order="pre")
    return [int(lp.extent) for lp in loops if lp.kind == kind]


def _two_linears(x, w, b, w2):
    """gelu(x w + b) w2: a matmul fused with bias and gelu, N = 48 (one AVX-512 register tile covers
    it: the row blocks must give the cores their tasks), then a plain one with N = 128 (wider than any
    register tile: B packed into column strips). M = 128: at least 16 register tiles of <= 8 rows."""
    def body(bb, x_, w_, b_, w2_):
        return bb.emit(relax.op.matmul(relax.op.nn.gelu(relax.op.add(relax.op.matmul(x_, w_), b_)), w2_))

    return _module({"x": x.shape, "w": w.shape, "b": b.shape, "w2": w2.shape}, body)


TWO_LINEARS = [(128, 96), (96, 48), (48,), (48, 128)]


def _assert_matmul_schedules(mod, report, lanes: int, cores: int):
    """Each matmul of _two_linears has the rule's signature (parallel outer loop, vectorized register
    tile, local accumulator, B packed where N spans several strips), vectors `lanes` wide and in
    every parallel loop a task for every core; bias add and gelu are folded into the accumulator write-back (no
    full-size intermediate buffer)."""
    matmuls = _funcs_by_rule(mod, report, "matmul")
    assert len(matmuls) == 2, report
    for name, func in matmuls.items():
        assert func.attrs["tirx.is_scheduled"]
        text = func.script()
        packed = "gelu" not in name  # the N = 128 matmul
        for marker in ("T.parallel(", "T.vectorized(", 'scope="local"') + (("_global",) if packed else ()):
            assert marker in text, f"{marker} missing from the scheduled matmul:\n{text}"
        allocs = [line for line in text.splitlines() if "sblock_alloc_buffer" in line]
        assert all('scope="local"' in a or "_global" in a for a in allocs), text
        parallel = _loop_extents(func, tvm.tirx.ForKind.PARALLEL)  # the tiles' loop, and B's packing
        assert parallel and min(parallel) >= cores, text
        assert set(_loop_extents(func, tvm.tirx.ForKind.VECTORIZED)) == {lanes}, text


def _assert_softmax_schedule(func, lanes: int):
    """max and sum as `lanes` vector partial results (rfactor buffers "..._rf"; init and update
    vectorized), exp and normalization vectorized, the final reductions of the partial results unrolled."""
    text = func.script()
    assert text.count("_rf = T.sblock_alloc_buffer") == 2, text
    assert _loop_extents(func, tvm.tirx.ForKind.VECTORIZED) == [lanes] * 6, text
    assert _loop_extents(func, tvm.tirx.ForKind.UNROLLED) == [lanes] * 2, text


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_matmuls_are_tiled_parallel_vectorized(target):
    rng = np.random.default_rng(0)
    x, w, b, w2 = (rng.standard_normal(s).astype("float32") for s in TWO_LINEARS)
    out, scheduled, report = _run(_two_linears(x, w, b, w2), target, x, w, b, w2)
    _close(out, _gelu(x.astype(np.float64) @ w + b) @ w2)
    facts = CpuFacts.of(target)
    _assert_matmul_schedules(scheduled, report, facts.lanes("float32"), facts.cores)


def test_multi_query_attention_broadcast_kv(target):
    """softmax(q k^T / sqrt(d) + causal mask) v with one k/v head broadcast over 4 query heads."""
    rng = np.random.default_rng(1)
    heads, n, d = 4, 64, 16
    q = rng.standard_normal((1, heads, n, d)).astype("float32")
    k = rng.standard_normal((1, 1, n, d)).astype("float32")
    v = rng.standard_normal((1, 1, n, d)).astype("float32")
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)

    def attention(bb, q_, k_, v_, m_):
        scores = relax.op.matmul(q_, relax.op.permute_dims(k_, [0, 1, 3, 2]))
        scores = relax.op.add(relax.op.multiply(scores, relax.const(1 / math.sqrt(d), "float32")), m_)
        return bb.emit(relax.op.matmul(relax.op.nn.softmax(scores, axis=-1), v_))

    mod = _module({"q": q.shape, "k": k.shape, "v": v.shape, "mask": mask.shape}, attention)
    out, scheduled, report = _run(mod, target, q, k, v, mask)
    s = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    _close(out, (p / p.sum(-1, keepdims=True)) @ v)
    assert len(_funcs_by_rule(scheduled, report, "matmul")) == 2, report  # q k^T and p v
    assert "rows" in report.values(), report  # the softmax
    assert None not in report.values(), report


def test_softmax(target):
    x = np.random.default_rng(2).standard_normal((4, 8, 256)).astype("float32") * 4
    out, scheduled, report = _run(_module({"x": x.shape}, lambda bb, x_: bb.emit(relax.op.nn.softmax(x_, axis=-1))), target, x)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    _close(out, e / e.sum(-1, keepdims=True))
    assert list(report.values()) == ["rows"], report
    (func,) = _funcs_by_rule(scheduled, report, "rows").values()
    _assert_softmax_schedule(func, CpuFacts.of(target).lanes("float32"))


@pytest.mark.parametrize("mcpu, cores, bits", CPUS, ids=[c[0] for c in CPUS])
def test_schedules_follow_the_target_cpu(mcpu, cores, bits):
    """Scheduled and built (not run) for the CI machines' CPUs: vectors as wide as the target's SIMD
    registers (zmm code for AVX-512, ymm for AVX2), a parallel task per core, whatever this machine is."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": cores})
    lanes = bits // 32
    assert CpuFacts.of(target).lanes("float32") == lanes and CpuFacts.of(target).cores == cores
    report: dict = {}
    matmuls = schedule_cpu_module(_two_linears(*(np.zeros(s, "float32") for s in TWO_LINEARS)), target, report)
    _assert_matmul_schedules(matmuls, report, lanes, cores)
    report = {}
    softmax = schedule_cpu_module(_module({"x": (4, 8, 256)}, lambda bb, x_: bb.emit(relax.op.nn.softmax(x_, axis=-1))),
                                  target, report)
    (func,) = _funcs_by_rule(softmax, report, "rows").values()
    _assert_softmax_schedule(func, lanes)
    (llvm,) = [m for m in tvm.compile(matmuls, target=target).mod.imports if m.kind == "llvm"]
    asm = llvm.inspect_source("asm")
    assert ("%zmm" in asm) == (bits == 512) and "%ymm" in asm


def test_layer_norm(target):
    rng = np.random.default_rng(3)
    x, g, b = (rng.standard_normal(s).astype("float32") for s in [(2, 64, 192), (192,), (192,)])
    mod = _module({"x": x.shape, "g": g.shape, "b": b.shape},
                  lambda bb, x_, g_, b_: bb.emit(relax.op.nn.layer_norm(x_, g_, b_, axes=[-1], epsilon=1e-5)))
    out, _, report = _run(mod, target, x, g, b)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * g + b
    _close(out, ref)
    assert list(report.values()) == ["rows"], report


def test_kernels_and_scheduled_functions_are_left_alone(target):
    """PrimFuncs marked bmvcc.kernel (w2a8_cpu.py's) or tirx.is_scheduled keep their exact body."""
    mod = _module({"x": (64, 64)}, lambda bb, x_: bb.emit(relax.op.exp(x_)))
    mod = relax.transform.LegalizeOps()(mod)
    (gv,) = [gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    for attr in (KERNEL_ATTR, "tirx.is_scheduled"):
        marked = mod.clone()
        marked[gv] = mod[gv].with_attr(attr, True)
        report: dict = {}
        out = schedule_cpu_module(marked, target, report)
        tvm.ir.assert_structural_equal(out[gv.name_hint].body, marked[gv].body)  # (fusion may add op_pattern)
        assert report == {}


def test_residual_add_behind_a_reshape_folds_into_the_matmul(target):
    """Two layers of (x w + b), reshaped to (1, M, N), plus a residual: FuseOps leaves each add behind
    the reshape a kernel of its own; schedules/matmul_fold.py folds it into the matmul's write-back (one
    function, no full-size intermediate buffer), the same function for both layers."""
    rng = np.random.default_rng(3)
    x, w, b, r = (rng.standard_normal(s).astype("float32") for s in ((128, 64), (64, 64), (64,), (1, 128, 64)))

    def body(bb, x_, w_, b_, r_):
        for _ in range(2):
            y = bb.emit(relax.op.add(relax.op.matmul(x_, w_), b_))
            x_ = bb.emit(relax.op.reshape(relax.op.add(relax.op.reshape(y, (1, 128, 64)), r_), (128, 64)))
        return x_

    out, scheduled, report = _run(_module({"x": x.shape, "w": w.shape, "b": b.shape, "r": r.shape}, body), target, x, w, b, r)
    ref = x.astype(np.float64)
    for _ in range(2):
        ref = ((ref @ w + b)[None] + r)[0]
    _close(out, ref)
    (name, func), = _funcs_by_rule(scheduled, report, "matmul").items()
    assert "add" in name.split("matmul")[1] and scheduled["main"].script().count(name) == 2, report
    allocs = [line for line in func.script().splitlines() if "sblock_alloc_buffer" in line]
    assert all('scope="local"' in a or "_global" in a for a in allocs), func.script()


def test_mean_over_tokens_sums_vectors_of_columns(target):
    """x[b, n, c].mean(1) (the head's token mean) by the columns rule: vector accumulators over strips of
    `lanes` contiguous columns while n is walked, the division in the write-back."""
    x = np.random.default_rng(4).standard_normal((2, 64, 96)).astype("float32")
    out, scheduled, report = _run(_module({"x": x.shape}, lambda bb, x_: bb.emit(relax.op.mean(x_, axis=[1]))), target, x)
    _close(out, x.astype(np.float64).mean(1))
    (func,) = _funcs_by_rule(scheduled, report, "columns").values()
    lanes = CpuFacts.of(target).lanes("float32")
    assert set(_loop_extents(func, tvm.tirx.ForKind.VECTORIZED)) == {lanes}, func.script()
    assert _loop_extents(func, tvm.tirx.ForKind.PARALLEL) == [2 * 96 // lanes], func.script()
