"""schedules/async_operand_copies.py on fp16 matmuls DLight's tensor-core rule schedules for the Orin (M x 128 x 256:
one CTA, four k tiles, so the three-stage pipeline reaches its steady state; M = 81 pads the tile's rows, which
cp.async zero-fills): which operand copies move to cp.async, and the PTX (NVRTC, as shipped) run by bmvcc's PTX
emulator against numpy."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from tvm import s_tir, te

from bmvcc import targets
from bmvcc.ptx import parse_ptx
from bmvcc.ptx.launches import kernel_launches
from bmvcc.ptx.verify import emulate
from bmvcc.schedules.async_operand_copies import REGISTER_STAGE, async_operand_copies
from bmvcc.schedules.w2a8_cuda import cuda_source
from bmvcc.schedules.wmma_intrinsics import dlight_wmma
from bmvcc.targets import cuda_toolchain as tc

ORIN = targets.get("jetson-orin-nano")
N, K = 128, 256


def _matmul(a_from_float32: bool, weight_nk: bool, m: int, K: int):
    """c = a @ w^T in fp16 with fp32 accumulation; a cast from float32 in the A load or not; the weight stored
    [N, K] (the layout the rule's shared tile has: a plain copy) or [K, N] (transposed on the way: strided)."""
    a = te.placeholder((m, K), "float32" if a_from_float32 else "float16", "a")
    a16 = te.compute((m, K), lambda i, k: a[i, k].astype("float16"), "a16") if a_from_float32 else a
    w = te.placeholder((N, K) if weight_nk else (K, N), "float16", "w")
    k = te.reduce_axis((0, K), "k")
    c = te.compute((m, N), lambda i, j: te.sum(a16[i, k].astype("float32")
                                               * (w[j, k] if weight_nk else w[k, j]).astype("float32"), axis=k), "c")
    return te.create_prim_func([a, w, c])


@functools.cache
def _scheduled(a_from_float32: bool, weight_nk: bool, m: int = 128, k: int = K):
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": _matmul(a_from_float32, weight_nk, m, k)})
    with ORIN.target(), dlight_wmma():
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)["main"]


def _pipeline(func, a_from_float32: bool) -> tuple[dict, list[bool]]:
    """(annotations of the loop that holds the operand copies, [copy of A, of W still staged through registers])."""
    sch = s_tir.Schedule(func)
    a_copy, w_copy = (sch.get_sblock(f"{x}_reindex_shared.dyn") for x in ("a16" if a_from_float32 else "a", "w"))
    k0 = next(loop for loop in sch.get_loops(a_copy) if "software_pipeline_stage" in sch.get(loop).annotations)
    ann = {key: [int(x) for x in value] for key, value in sch.get(k0).annotations.items()}
    return ann, [REGISTER_STAGE in sch.get(b).annotations for b in (a_copy, w_copy)]


# (A cast from float32, weight [N, K]) -> [A's copy, W's copy] brought in by cp.async
CASES = {(False, True): [True, True], (False, False): [True, False], (True, True): [False, True],
         (True, False): [False, False]}


@pytest.mark.parametrize("a_from_float32,weight_nk", CASES, ids=lambda v: str(v))
def test_plain_copies_move_to_cp_async(a_from_float32, weight_nk):
    dlight = _scheduled(a_from_float32, weight_nk)
    assert _pipeline(dlight, a_from_float32) == ({"software_pipeline_order": [0, 3, 1, 4, 5, 2, 6],
                                  "software_pipeline_stage": [0, 0, 0, 0, 0, 1, 1]}, [True, True])
    plain = CASES[(a_from_float32, weight_nk)]
    out = async_operand_copies(dlight, ORIN.facts["max_shared_bytes_per_block"])
    if not any(plain):
        assert out.same_as(dlight)
        return
    ann, registers = _pipeline(out, a_from_float32)
    assert registers == [not p for p in plain]
    # TVM's async arrangement (MetaSchedule's tensor-core rule: stage [0, 0, 1, 2, 2], order [0, 1, 3, 2, 4]), a
    # register copy's load and shared store in stage 1 around the k1 body
    expected = {(True, True): ([0, 0, 1, 2, 2], [0, 1, 3, 2, 4]),
                (True, False): ([0, 1, 1, 1, 2, 2], [0, 1, 3, 4, 2, 5]),
                (False, True): ([1, 1, 0, 1, 2, 2], [0, 3, 1, 4, 2, 5])}[tuple(plain)]
    assert ann == {"software_pipeline_stage": expected[0], "software_pipeline_order": expected[1],
                   "software_pipeline_async_stages": [0]}


def test_a_third_buffer_only_where_the_shared_memory_limit_allows():
    """Both copies plain take 3 x 2 x 128 x 72 x 2 B = 110,592 B of shared memory: above sm_86's 99 KB per block,
    so there only A's copy gets its third buffer (92,160 B); on the Orin (163 KB) both do."""
    dlight = _scheduled(False, True)
    sm86 = targets.get("cuda-sm86").facts["max_shared_bytes_per_block"]
    assert 92_160 <= sm86 < 110_592
    _, registers = _pipeline(async_operand_copies(dlight, sm86), False)
    assert registers == [False, True]
    _, registers = _pipeline(async_operand_copies(dlight, ORIN.facts["max_shared_bytes_per_block"]), False)
    assert registers == [False, False]


@pytest.mark.parametrize("a_from_float32,weight_nk,m,k", [
    (False, True, 128, K), (False, False, 81, K), (True, True, 128, K), (False, True, 256, 128), (False, False, 200, 192)],
    ids=["both-async", "w-through-registers-rows-padded", "a-through-registers", "two-k-tiles-two-ctas",
         "three-k-tiles-rows-padded"])
def test_async_pipeline_computes_the_matmul_in_the_ptx_emulator(a_from_float32, weight_nk, m, k):
    """fp16 products are exact in float32; the kernel and numpy sum the k of them per output in float32 in
    different orders: |error| <= k 2^-24 sum_k |a w| (a first-order bound for each order). As few k tiles (2, 3)
    as the pipeline has stages: its prologue and epilogue alone; more rows than one tile: several CTAs."""
    func = async_operand_copies(_scheduled(a_from_float32, weight_nk, m, k), ORIN.facts["max_shared_bytes_per_block"])
    ptx = tc.cuda_to_ptx(cuda_source(func, ORIN), "sm_87")  # the kernel is named w2a8_kernel there
    assert "cp.async" in ptx
    launches = kernel_launches(tvm.IRModule({"w2a8": func.with_attr("global_symbol", "w2a8")}), ORIN.target())["w2a8"]
    rng = np.random.default_rng(0)
    a = rng.normal(size=(m, k)).astype("float32" if a_from_float32 else "float16")
    w = rng.normal(size=(N, k) if weight_nk else (k, N)).astype("float16")
    out = np.zeros((m, N), np.float32)
    res = emulate(parse_ptx(ptx), launches, [a, w, out])
    assert res.races == 0, res.race_reports
    assert res.ctas_run == res.ctas_total and res.written[-1].all()
    a32, w32 = a.astype("float16").astype(np.float32), (w.T if weight_nk else w).astype(np.float32)
    np.testing.assert_allclose(out, a32 @ w32, rtol=0, atol=k * 2.0**-24 * (np.abs(a32) @ np.abs(w32)).max())
