"""W2A8 CPU schedules (schedules/w2a8_cpu.py): exact results on this CPU, and the instructions each backend emits.

Exactness argument: the kernel accumulates in int32 (|acc| <= 128 * K << 2^31) and the numpy reference in
int64, so accumulators must match exactly. The dequant is one fp32 multiply and one fp32 divide in the same
order as the reference (no fast-math), and float32(acc) is exact for |acc| < 2^24, so the float outputs are
compared bit for bit as well.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from bmvcc.schedules import w2a8_cpu  # noqa: E402
from bmvcc.schedules.dot_intrinsics import I16_CHUNK_K  # noqa: E402
from bmvcc.schedules.w2a8 import W2A8Config, pack_ternary, unpack_ternary, w2a8_compute, w2a8_numpy  # noqa: E402
from bmvcc.schedules.w2a8_cpu import (  # noqa: E402
    DEFAULT_KNOBS,
    CpuKnobs,
    row_blocks,
    select_backend,
    strip_width,
)
from bmvcc.targets import get  # noqa: E402

HOST = get("host").target()
AARCH64 = get("aarch64").target()  # cortex-a78 +dotprod
GENERIC = tvm.target.Target({"kind": "llvm"})  # baseline x86-64 (SSE2): runs here too


def _build(cfg, target, knobs=None):
    func = w2a8_cpu.schedule(w2a8_compute(cfg), target, knobs)
    assert func.attrs["tirx.is_scheduled"]
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _opcodes(lib) -> collections.Counter:
    asm = lib.mod.inspect_source("asm")
    return collections.Counter(line.split()[0] for line in asm.splitlines()
                               if line.startswith("\t") and not line.lstrip().startswith((".", "#", "/")))


def _inputs(cfg, rng, extreme=False):
    if extreme:  # the largest |products|: q = -128 with u = 2 (T = +1) and u = 0 (T = -1)
        q = rng.choice(np.array([-128, 127], np.int8), (cfg.m, cfg.k))
    else:
        q = rng.integers(-128, 128, (cfg.m, cfg.k), dtype=np.int8)
    packed = pack_ternary(rng.integers(-1, 2, (cfg.n, cfg.k)))
    xs = rng.uniform(0.5, 3.0, (cfg.m, 1)).astype(np.float32)
    ws = np.array([rng.uniform(0.01, 0.2)], np.float32)
    res = rng.standard_normal((cfg.m, cfg.n)).astype(np.float32)
    return q, packed, xs, ws, res


def _run(lib, cfg, q, packed, xs, ws, res):
    args = [q, packed, xs, ws] + ([res] if cfg.epilogue == "residual" else [])
    out = tvm.runtime.empty((cfg.m, cfg.n), "float32", tvm.cpu())
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


# M = 1 (GEMV), odd N, K not a multiple of 4 or of 32, M not a multiple of the micro tile
SHAPES = [(1, 37, 70), (5, 64, 130), (13, 33, 96), (32, 80, 255)]


# AVX2 variants run only where the CPU has AVX2; "generic" runs on any x86-64
HOST_VARIANTS = [None] + ([CpuKnobs("avx2_i32", 4, 2), CpuKnobs("avx2_i16", 2, 3)]
                          if select_backend(HOST) in ("avx2", "vnni", "amx") else [])


def _acc_exact(cfg, target, knobs, q, packed, res):
    ones = np.ones((cfg.m, 1), np.float32)  # x_scale = w_scale = 1: out = float32(acc), exact below 2^24
    out = _run(_build(cfg, target, knobs), cfg, q, packed, ones, np.ones(1, np.float32), res)
    acc = q.astype(np.int64) @ unpack_ternary(packed, cfg.k).astype(np.int64).T  # independent int64 reference
    np.testing.assert_array_equal(out, acc.astype(np.float32))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("target", [HOST, GENERIC], ids=["host", "generic"])
def test_accumulators_exact(m, n, k, target):
    cfg = W2A8Config(m, n, k)
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(m * 1000 + k))
    _acc_exact(cfg, target, None, q, packed, res)


@pytest.mark.parametrize("knobs", HOST_VARIANTS[1:], ids=lambda kn: f"{kn.backend}-{kn.mr}x{kn.nt}")
def test_host_variants_exact(knobs):
    cfg = W2A8Config(11, 40, 290)
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(11))
    _acc_exact(cfg, HOST, knobs, q, packed, res)


@pytest.mark.parametrize("q_value,code", [(-128, 1), (127, 1), (-128, -1), (127, -1)])
def test_int16_chunk_bound(q_value, code):
    """Worst case for the int16 partial sums: every product +-256 or +-254 over whole 256-k chunks
    (64 * -512 = -32768 is int16's minimum; the sums must not wrap)."""
    cfg = W2A8Config(4, 16, 768)
    q = np.full((cfg.m, cfg.k), q_value, np.int8)
    packed = pack_ternary(np.full((cfg.n, cfg.k), code))
    for knobs in HOST_VARIANTS:
        _acc_exact(cfg, HOST, knobs, q, packed, None)


@pytest.mark.parametrize("extreme", [False, True])
def test_dequant_bit_exact(extreme):
    cfg = W2A8Config(9, 48, 1001)
    q, packed, xs, ws, res = _inputs(cfg, np.random.default_rng(7), extreme)
    out = _run(_build(cfg, HOST), cfg, q, packed, xs, ws, res)
    np.testing.assert_array_equal(out, w2a8_numpy(q, packed, xs, float(ws[0]), cfg.k))


def test_residual_epilogue_bit_exact():
    cfg = W2A8Config(6, 40, 66, epilogue="residual")
    q, packed, xs, ws, res = _inputs(cfg, np.random.default_rng(3))
    out = _run(_build(cfg, HOST), cfg, q, packed, xs, ws, res)
    # one more fp32 add in the same order as the reference: still exact
    np.testing.assert_array_equal(out, w2a8_numpy(q, packed, xs, float(ws[0]), cfg.k, "residual", res))


def test_gelu_epilogue():
    cfg = W2A8Config(3, 24, 64, epilogue="gelu")
    q, packed, xs, ws, res = _inputs(cfg, np.random.default_rng(4))
    out = _run(_build(cfg, HOST), cfg, q, packed, xs, ws, res)
    _check_gelu(out, w2a8_numpy(q, packed, xs, float(ws[0]), cfg.k, "gelu"))


def _check_gelu(out, ref):
    # TVM's fp32 erf is a polynomial approximation (~1e-7 relative) vs numpy's libm erf in float64
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# the CI machines' CPUs and their backends, built here whatever this machine is: AVX2 only, AVX-512
# without VNNI (the AVX2 code), AVX-512 VNNI (AMX: tests/test_w2a8_amx.py)
X86_BACKENDS = {"znver2": "avx2", "skylake-avx512": "avx2", "icelake-server": "vnni"}


@pytest.mark.parametrize("mcpu", ["host", *X86_BACKENDS])
def test_schedule_uses_int8_dot_instructions_in_parallel(mcpu):
    target = HOST if mcpu == "host" else tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    backend = select_backend(target)
    assert mcpu == "host" or backend == X86_BACKENDS[mcpu]
    lib = _build(W2A8Config(16, 64, 1024), target)  # 1 M MACs: MIN_PARALLEL_MACS
    ops = _opcodes(lib)
    # the instruction each backend is built around; generic hosts get plain vector multiplies
    want = {"amx": ["tdpbssd"], "vnni": ["vpdpbusd"], "avx2": ["vpmaddubsw"], "sdot": ["sdot"],
            "generic": ["pmullw", "pmaddwd", "pmulld", "mul"]}[backend]
    least = 4 if backend == "amx" else DEFAULT_KNOBS[backend].mr  # amx: 2 x 2 accumulator tiles, 4 tdpbssd a k step
    assert sum(ops[w] for w in want) >= least, ops.most_common(20)
    if DEFAULT_KNOBS[backend].backend == "avx2_i16":  # int16 accumulation: no vpmaddwd per step
        assert ops["vpaddw"] >= ops["vpmaddubsw"], ops.most_common(20)
    if backend == "vnni":  # one instruction per step, no AVX2 fallback
        assert ops["vpmaddubsw"] == 0, ops.most_common(20)
    assert "TVMBackendParallelLaunch" in lib.mod.inspect_source("asm")


def test_avx2_i16_widens_each_chunk_with_vpmaddwd():
    """Each int16 chunk is widened by one vpmaddwd by ones per accumulator vector (the pair sums of 8 features),
    not by deinterleaving the pairs (vpackusdw / vpmovsxwd shuffles); the results are exact (test_int16_chunk_bound)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})
    knobs = CpuKnobs("avx2_i16", 4, 2)
    cfg = W2A8Config(knobs.mr, strip_width(knobs), 2 * I16_CHUNK_K)  # one micro tile, two chunks
    ops = _opcodes(_build(cfg, target, knobs))
    assert ops["vpmaddwd"] >= knobs.mr * knobs.nt, ops.most_common(20)
    assert ops["vpackusdw"] + ops["vpmovsxwd"] == 0, ops.most_common(20)


def test_generic_backend_vectorizes():
    assert select_backend(GENERIC) == "generic"
    ops = _opcodes(_build(W2A8Config(8, 32, 64), GENERIC))
    assert ops["pmullw"] + ops["pmaddwd"] + ops["pmulld"] > 0, ops.most_common(20)


def test_aarch64_compiles_to_sdot():
    assert select_backend(AARCH64) == "sdot"
    ops = _opcodes(_build(W2A8Config(8, 32, 100), AARCH64))
    assert ops["sdot"] > 0, ops.most_common(20)


def test_weights_stay_packed_and_decoded_tile_is_small():
    """The kernel reads only the 2-bit bytes; each parallel task decodes one tile (tile width x K4), not N x K."""
    cfg = W2A8Config(4, 256, 1024)
    func = w2a8_cpu.schedule(w2a8_compute(cfg), HOST)
    st = tvm.s_tir.transform
    lowered = tvm.transform.Sequential([st.LowerInitBlock(), st.PlanAndUpdateBufferAllocationLocation(),
                                        st.ConvertBlocksToOpaque(), st.CompactBufferAllocation()])(
        tvm.IRModule({"main": func}))
    lines = lowered["main"].script().splitlines()
    (sig,) = [ln for ln in lines if ln.startswith("def main(")]
    assert 'wp: T.Buffer((T.int64(256), T.int64(256)), "uint8")' in sig  # packed weights in, untouched
    (pos, wd), = [(i, ln) for i, ln in enumerate(lines) if "wd = T.sblock_alloc_buffer(" in ln]
    assert any("T.parallel" in ln for ln in lines[:pos])  # allocated per parallel task
    shape = [int(v) for v in re.findall(r"T\.int64\((\d+)\)", wd)]
    assert int(np.prod(shape)) == strip_width(DEFAULT_KNOBS[select_backend(HOST)]) * cfg.k


def test_row_blocks_only_where_strips_leave_cores_idle():
    assert [row_blocks(17, s, 2) for s in (1, 2, 3, 5, 8, 9)] == [2, 1, 2, 2, 1, 1]
    assert row_blocks(3, 1, 2) == 1  # M <= 4 rows: one block
    assert [row_blocks(17, s, 4) for s in (1, 2, 3, 4, 6)] == [4, 2, 4, 1, 2]
    assert [row_blocks(m, 1, 4) for m in (5, 9, 13)] == [2, 3, 4]  # at most ceil(M / 4): no block all padding
    assert [row_blocks(m, 1, 2, granule=32) for m in (17, 32, 33)] == [1, 1, 2]  # amx: 32-row tiles


@pytest.mark.parametrize("strips", [1, 3])
def test_few_strips_run_as_row_blocks_on_both_cores(strips):
    """A layer of 1 or 3 strips on 2 cores: 2 row blocks per strip (rows padded to 2 x 4, amx: 2 x 32), each
    task decoding its panel; exact, with M, N and K not multiples of any tile (K: above MIN_PARALLEL_MACS).
    The host target on 2 cores (its AMX off where this machine does not run it)."""
    target = tvm.target.Target({**get("host").tvm_target, "num-cores": 2})
    cfg = W2A8Config(37, strips * strip_width(DEFAULT_KNOBS[select_backend(target)]) - 5, 3999)
    sch = tvm.s_tir.Schedule(w2a8_cpu.schedule(w2a8_compute(cfg), target))
    task = sch.get(sch.get_loops(sch.get_sblock("decode"))[0])
    assert (task.kind, int(task.extent)) == (tvm.tirx.ForKind.PARALLEL, 2 * strips)
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(strips))
    _acc_exact(cfg, target, None, q, packed, res)


def test_small_kernels_run_serially():
    """Under MIN_PARALLEL_MACS a kernel does not wake the thread pool (nor split its rows)."""
    cfg = W2A8Config(17, 64, 64)
    sch = tvm.s_tir.Schedule(w2a8_cpu.schedule(w2a8_compute(cfg), HOST))
    assert all(sch.get(loop).kind != tvm.tirx.ForKind.PARALLEL for loop in sch.get_loops(sch.get_sblock("decode")))
    assert "TVMBackendParallelLaunch" not in _build(cfg, HOST).mod.inspect_source("asm")
