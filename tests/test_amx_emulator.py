"""bmvcc/amx_emulator.py: hand-written AMX kernels (schedules/amx.py's calls) emulated on any CPU against
numpy int32 matmuls, the faults the CPU would raise, their asm for Sapphire Rapids and, on a host with
AMX, the real kernels against the emulated ones bit for bit."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from bmvcc import amx_emulator
from bmvcc.amx_emulator import emulate
from bmvcc.schedules import amx
from bmvcc.targets.cpu import machine_runs_amx

SAPPHIRE_RAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
FULL = (amx.MAX_ROWS, amx.MAX_COLSB)
TASKS = 4  # parallel tasks of the task kernel


def vnni(b_km: np.ndarray) -> np.ndarray:
    """B[k, n] -> tdpbssd's layout [k // 4, 4 n + k % 4] (schedules/amx.py)."""
    k, n = b_km.shape
    return b_km.reshape(k // 4, 4, n).transpose(0, 2, 1).reshape(k // 4, 4 * n)


def config(shapes: dict) -> np.ndarray:
    return np.array(amx.config_bytes(shapes), np.uint8)


def one_tile_kernel(configure=True, accumulate=False, a_col=0, b_tile=2, c_col=0):
    """C[16, 16] (+)= A[16, 64] . B, B in VNNI layout [16, 64]: tmm0 += tmm1 . tmm2 (the defaults)."""
    @T.prim_func
    def kernel(A: T.Buffer((16, 64), "int8"), B: T.Buffer((16, 64), "int8"), C: T.Buffer((16, 16), "int32"),
               cfg: T.Buffer((64,), "uint8")):
        assert amx.request_permission() == T.int64(0), "AMX refused"
        if configure:
            T.evaluate(amx.ldtilecfg(T.address_of(cfg[0])))
        if accumulate:
            T.evaluate(amx.tileloadd(0, T.address_of(C[0, 0]), 64))
        else:
            T.evaluate(amx.tilezero(0))
        T.evaluate(amx.tileloadd(1, T.address_of(A[0, a_col]), 64))
        T.evaluate(amx.tileloadd(b_tile, B.access_ptr("r"), 64))
        T.evaluate(amx.tdpbssd(0, 1, b_tile))
        T.evaluate(amx.tilestored(0, T.address_of(C[0, c_col]), 64))
        T.evaluate(amx.tilerelease())
    return kernel


# The blocked kernel: 2 x 2 accumulator tiles of MR rows x NC int32, K in KSTEPS steps of KC, every
# tile partial, every operand's rows further apart than the tile's bytes.
MR, NC, KC, KSTEPS = 13, 12, 40, 3
M, N, K = 2 * MR, 2 * NC, KSTEPS * KC
A_COLS, B_COLS, C_COLS = K + 8, 4 * N + 4, N + 5
BLOCKED_CONFIG = {0: (MR, 4 * NC), 1: (MR, 4 * NC), 2: (MR, 4 * NC), 3: (MR, 4 * NC),
                  4: (MR, KC), 5: (MR, KC), 6: (KC // 4, 4 * NC), 7: (KC // 4, 4 * NC)}


@T.prim_func
def blocked_kernel(A: T.Buffer((M, A_COLS), "int8"), B: T.Buffer((K // 4, B_COLS), "int8"),
                   C: T.Buffer((M, C_COLS), "int32"), cfg: T.Buffer((64,), "uint8")):
    assert amx.request_permission() == T.int64(0), "AMX refused"
    T.evaluate(amx.ldtilecfg(T.address_of(cfg[0])))
    T.evaluate(amx.tilezero(0))
    T.evaluate(amx.tilezero(1))
    T.evaluate(amx.tilezero(2))
    T.evaluate(amx.tilezero(3))
    for ks in range(KSTEPS):
        T.evaluate(amx.tileloadd(4, T.address_of(A[0, ks * KC]), A_COLS))
        T.evaluate(amx.tileloadd(5, T.address_of(A[MR, ks * KC]), A_COLS))
        T.evaluate(amx.tileloadd(6, T.address_of(B[ks * (KC // 4), 0]), B_COLS))
        T.evaluate(amx.tileloadd(7, T.address_of(B[ks * (KC // 4), 4 * NC]), B_COLS))
        T.evaluate(amx.tdpbssd(0, 4, 6))
        T.evaluate(amx.tdpbssd(1, 4, 7))
        T.evaluate(amx.tdpbssd(2, 5, 6))
        T.evaluate(amx.tdpbssd(3, 5, 7))
    T.evaluate(amx.tilestored(0, T.address_of(C[0, 0]), C_COLS * 4))
    T.evaluate(amx.tilestored(1, T.address_of(C[0, NC]), C_COLS * 4))
    T.evaluate(amx.tilestored(2, T.address_of(C[MR, 0]), C_COLS * 4))
    T.evaluate(amx.tilestored(3, T.address_of(C[MR, NC]), C_COLS * 4))
    T.evaluate(amx.tilerelease())


def task_kernel(configure_in_task=True, release=True):
    """TASKS parallel tasks, each C[16 p : 16 p + 16] = A[16 p : 16 p + 16] . B with its own tiles."""
    @T.prim_func
    def kernel(A: T.Buffer((TASKS * 16, 64), "int8"), B: T.Buffer((16, 64), "int8"),
               C: T.Buffer((TASKS * 16, 16), "int32"), cfg: T.Buffer((64,), "uint8")):
        assert amx.request_permission() == T.int64(0), "AMX refused"
        if not configure_in_task:
            T.evaluate(amx.ldtilecfg(T.address_of(cfg[0])))
        for p in T.parallel(TASKS):
            if configure_in_task:
                T.evaluate(amx.ldtilecfg(T.address_of(cfg[0])))
            T.evaluate(amx.tilezero(0))
            T.evaluate(amx.tileloadd(1, T.address_of(A[p * 16, 0]), 64))
            T.evaluate(amx.tileloadd(2, T.address_of(B[0, 0]), 64))
            T.evaluate(amx.tdpbssd(0, 1, 2))
            T.evaluate(amx.tilestored(0, T.address_of(C[p * 16, 0]), 64))
            if release:
                T.evaluate(amx.tilerelease())
    return kernel


def tensorized_kernel(a_rows=16):
    """Tensorize's form: AMX calls in a block on match_buffer views (A's of `a_rows` rows), pointers from
    access_ptr."""
    @T.prim_func(s_tir=True)
    def kernel(A: T.Buffer((32, 64), "int8"), B: T.Buffer((16, 64), "int8"), C: T.Buffer((32, 16), "int32"),
               cfg: T.Buffer((64,), "uint8")):
        assert amx.request_permission() == T.int64(0), "AMX refused"
        for i in range(2):
            with T.sblock("tile"):
                vi = T.axis.spatial(2, i)
                T.reads(A[vi * 16:vi * 16 + a_rows, 0:64], B[0:16, 0:64], cfg[0:64])
                T.writes(C[vi * 16:vi * 16 + 16, 0:16])
                a = T.match_buffer(A[vi * 16:vi * 16 + a_rows, 0:64], (a_rows, 64), "int8", offset_factor=1)
                c = T.match_buffer(C[vi * 16:vi * 16 + 16, 0:16], (16, 16), "int32", offset_factor=1)
                T.evaluate(amx.ldtilecfg(cfg.access_ptr("r")))
                T.evaluate(amx.tilezero(0))
                T.evaluate(amx.tileloadd(1, a.access_ptr("r"), 64))
                T.evaluate(amx.tileloadd(2, B.access_ptr("r"), 64))
                T.evaluate(amx.tdpbssd(0, 1, 2))
                T.evaluate(amx.tilestored(0, c.access_ptr("w"), 64))
    return kernel


def run(kernel, *arrays, target="llvm", emulated=True):
    """The kernel built (emulated unless told) and run on copies of `arrays`; the outputs as numpy."""
    lib = tvm.tirx.build(emulate(kernel) if emulated else kernel, target=target)
    tensors = [tvm.runtime.tensor(a.copy()) for a in arrays]
    lib(*tensors)
    return [t.numpy() for t in tensors]


def int8s(rng, shape):
    return rng.integers(-128, 128, shape, dtype=np.int8)  # both extremes: the products' signs matter


def one_tile_inputs(seed=0):
    rng = np.random.default_rng(seed)
    a, b_km = int8s(rng, (16, 64)), int8s(rng, (64, 16))
    c = rng.integers(-2**31, 2**31, (16, 16)).astype(np.int32)
    c[0] = np.iinfo(np.int32).max - 5  # row 0 wraps around when its products are positive
    return a, b_km, c


@pytest.mark.parametrize("accumulate", [False, True], ids=["tilezero", "accumulate"])
def test_one_tile_against_numpy(accumulate):
    a, b_km, c = one_tile_inputs()
    product = a.astype(np.int32) @ b_km.astype(np.int32)  # |.| <= 64 * 2^14: exact in int32
    expected = c + product if accumulate else product  # numpy int32 adds wrap around as the CPU's
    if accumulate:
        assert (c.astype(np.int64) + product != expected).any()  # the case does test wrap-around
    out = run(one_tile_kernel(accumulate=accumulate), a, vnni(b_km), c, config({0: FULL, 1: FULL, 2: FULL}))[2]
    np.testing.assert_array_equal(out, expected)


def test_k_major_b_gives_other_numbers():
    """Negative control: B as plain [k, n] bytes instead of the VNNI layout."""
    a, b_km, c = one_tile_inputs()
    out = run(one_tile_kernel(), a, b_km.reshape(16, 64), c, config({0: FULL, 1: FULL, 2: FULL}))[2]
    assert (out != a.astype(np.int32) @ b_km.astype(np.int32)).mean() > 0.9


def test_blocked_partial_tiles_against_numpy():
    rng = np.random.default_rng(1)
    a, b_km = int8s(rng, (M, A_COLS)), int8s(rng, (K, N))
    b = int8s(rng, (K // 4, B_COLS))  # the columns past 4 N are padding the kernel must not read
    b[:, :4 * N] = vnni(b_km)
    c = np.full((M, C_COLS), -7, np.int32)
    out = run(blocked_kernel, a, b, c, config(BLOCKED_CONFIG))[2]
    np.testing.assert_array_equal(out[:, :N], a[:, :K].astype(np.int32) @ b_km.astype(np.int32))
    assert (out[:, N:] == -7).all()  # the padding columns of C untouched


def test_parallel_tasks_against_numpy():
    rng = np.random.default_rng(2)
    a, b_km = int8s(rng, (TASKS * 16, 64)), int8s(rng, (64, 16))
    c = np.zeros((TASKS * 16, 16), np.int32)
    out = run(task_kernel(), a, vnni(b_km), c, config({0: FULL, 1: FULL, 2: FULL}))[2]
    np.testing.assert_array_equal(out, a.astype(np.int32) @ b_km.astype(np.int32))


def bad_config(byte: int, value: int, palette: int = amx.PALETTE) -> np.ndarray:
    cfg = config({0: FULL, 1: FULL, 2: FULL})
    cfg[0], cfg[byte] = palette, value
    return cfg


@pytest.mark.parametrize("kernel, cfg, fault", [
    (one_tile_kernel(configure=False), config({0: FULL, 1: FULL, 2: FULL}),
     "tilezero tmm0 without a tile configuration"),
    # without tilerelease, so that only each task's own state (not one shared) makes it fault (task 0 included)
    (task_kernel(configure_in_task=False, release=False), config({0: FULL, 1: FULL, 2: FULL}),
     "tilezero tmm0 without a tile configuration"),
    (one_tile_kernel(), config({0: FULL, 1: FULL, 2: (16, 60)}), r"tdpbssd tmm0, tmm1, tmm2: shapes disagree"),
    (one_tile_kernel(), config({0: FULL, 1: (16, 60), 2: FULL}), r"tdpbssd tmm0, tmm1, tmm2: shapes disagree"),
    (one_tile_kernel(), config({0: (8, 64), 1: FULL, 2: FULL}), r"tdpbssd tmm0, tmm1, tmm2: shapes disagree"),
    # C and B agree, but 50 bytes are not whole int32 columns
    (one_tile_kernel(), config({0: (16, 50), 1: FULL, 2: (16, 50)}), r"tdpbssd tmm0, tmm1, tmm2: shapes disagree"),
    (one_tile_kernel(), config({0: FULL, 1: FULL}), "tileloadd tmm2: tmm2 is not configured"),
    (one_tile_kernel(a_col=1), config({0: FULL, 1: FULL, 2: FULL}),  # the last row's last byte
     r"tileloadd tmm1 reads bytes outside A \(1024 B\)"),
    (one_tile_kernel(c_col=1), config({0: FULL, 1: FULL, 2: FULL}),  # the last row's last int32
     r"tilestored tmm0 writes bytes outside C \(1024 B\)"),
    (one_tile_kernel(b_tile=1), config({0: FULL, 1: FULL, 2: FULL}), "tdpbssd tmm0, tmm1, tmm1: the tiles are not"),
    # palette 0 releases the state, whatever its other bytes (a reserved one set here)
    (one_tile_kernel(), bad_config(2, 1, palette=0), "tilezero tmm0 without a tile configuration"),
    (one_tile_kernel(), bad_config(0, 2), "ldtilecfg: palette above 1"),
    (one_tile_kernel(), bad_config(48, 17), "ldtilecfg: tmm0 exceeds 16 rows x 64 bytes"),
    (one_tile_kernel(), bad_config(18, 65), "ldtilecfg: tmm1 exceeds 16 rows x 64 bytes"),
    (one_tile_kernel(), bad_config(48 + 3, 4), "ldtilecfg: tmm3 has rows or colsb 0, not both"),
    (one_tile_kernel(), bad_config(2, 1), "ldtilecfg: reserved bytes are not zero"),
    (one_tile_kernel(), bad_config(1, 1), "ldtilecfg: start_row is not 0"),
], ids=["no-ldtilecfg", "task-without-ldtilecfg", "colsb-b", "colsb-a", "rows-c", "colsb-not-int32",
        "tile-unconfigured", "load-past-end", "store-past-end", "same-tile-twice", "palette-0-releases", "palette-2",
        "17-rows", "65-colsb", "rows-without-colsb", "reserved", "start-row"])
def test_faults(kernel, cfg, fault):
    """Negative controls: each run faults, naming the fault; the CPU would raise #UD, #GP or a page fault."""
    a, b_km, c = one_tile_inputs()
    if kernel.params[0].shape[0] != 16:  # the task kernel
        a, c = np.tile(a, (TASKS, 1)), np.tile(c, (TASKS, 1))
    with pytest.raises(RuntimeError, match=f"AMX fault: {fault}"):
        run(kernel, a, vnni(b_km), c, cfg)


def test_access_ptr_region_is_bounds_checked():
    """Negative control: a tile load of 16 rows through a match_buffer view of 8 reads the next view's rows,
    inside A but outside the extent of its tvm_access_ptr."""
    rng = np.random.default_rng(5)
    with pytest.raises(RuntimeError, match=r"AMX fault: tileloadd tmm1 reads bytes outside the 512 elements of A "
                                           r"\(2048 B\) its tvm_access_ptr covers"):
        run(tensorized_kernel(a_rows=8), int8s(rng, (32, 64)), int8s(rng, (16, 64)), np.zeros((32, 16), np.int32),
            config({0: FULL, 1: FULL, 2: FULL}))


# AMX-INT8's other forms, AMX-TF32, AMX-MOVRS, AMX-AVX512, AMX-FP8 (as TVM's LLVM knows them)
@pytest.mark.parametrize("name", ["tdpbusd", "tmmultf32ps", "tileloaddrs64", "tcvtrowd2ps", "tilemovrow", "tdpbf8ps"])
def test_unknown_amx_instruction_is_refused(name):
    @T.prim_func
    def kernel():
        T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", T.uint8(0), T.uint8(1), T.uint8(2)))

    with pytest.raises(ValueError, match=f"llvm.x86.{name} is not emulated"):
        emulate(kernel)


def test_lowering_is_tvm_s_tir_pipeline_up_to_flatten_buffer():
    """_LOWERING is a copy of the head of TVM's default s_tir pipeline: a TVM that changes it fails here."""
    source = inspect.getsource(tvm.s_tir.pipeline.default_s_tir_pipeline)
    passes = re.findall(r"\b(?:s_tir|tirx)\.transform\.(\w+)\(", source)
    assert tuple(passes[:passes.index("FlattenBuffer")]) == amx_emulator._LOWERING


def test_sapphire_rapids_asm_has_the_amx_instructions():
    """The real kernel compiles to AMX for Sapphire Rapids; its emulation to none."""
    kernel = one_tile_kernel(accumulate=True)
    mnemonics = ("ldtilecfg", "tileloadd", "tdpbssd", "tilestored", "tilerelease")

    def instructions(func):
        asm = tvm.tirx.build(func, target=SAPPHIRE_RAPIDS).inspect_source("asm")
        return {m for m in mnemonics if re.search(rf"^\s+{m}\b", asm, re.MULTILINE)}

    assert instructions(kernel) == set(mnemonics)
    assert instructions(emulate(kernel)) == set()


@pytest.mark.skipif(not machine_runs_amx(), reason="this machine does not run AMX (targets/cpu.py machine_runs_amx)")
@pytest.mark.parametrize("case", ["accumulate", "blocked", "tasks", "tensorized"])
def test_real_amx_equals_emulation(case):
    rng = np.random.default_rng(3)
    full = config({0: FULL, 1: FULL, 2: FULL})
    kernel, arrays = {
        "accumulate": (one_tile_kernel(accumulate=True), (int8s(rng, (16, 64)), int8s(rng, (16, 64)),
                                                          one_tile_inputs()[2], full)),  # C wraps around
        "blocked": (blocked_kernel, (int8s(rng, (M, A_COLS)), int8s(rng, (K // 4, B_COLS)),
                                     np.full((M, C_COLS), -7, np.int32), config(BLOCKED_CONFIG))),
        "tasks": (task_kernel(), (int8s(rng, (TASKS * 16, 64)), int8s(rng, (16, 64)),
                                  np.zeros((TASKS * 16, 16), np.int32), full)),
        "tensorized": (tensorized_kernel(), (int8s(rng, (32, 64)), int8s(rng, (16, 64)), np.zeros((32, 16), np.int32),
                                           full)),
    }[case]
    real = run(kernel, *arrays, target=SAPPHIRE_RAPIDS, emulated=False)[2]
    np.testing.assert_array_equal(real, run(kernel, *arrays)[2])


def test_tensorized_blocks_against_numpy():
    rng = np.random.default_rng(4)
    a, b_km = int8s(rng, (32, 64)), int8s(rng, (64, 16))
    out = run(tensorized_kernel(), a, vnni(b_km), np.zeros((32, 16), np.int32), config({0: FULL, 1: FULL, 2: FULL}))[2]
    np.testing.assert_array_equal(out, a.astype(np.int32) @ b_km.astype(np.int32))
