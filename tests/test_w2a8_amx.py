"""The W2A8 kernel on Intel AMX (schedules/w2a8_amx.py): the instructions of its build for Sapphire Rapids,
its results through the AMX emulator (bmvcc/amx_emulator.py) on any CPU, the real build where this machine
runs AMX, and where the backend is chosen.

Exactness argument as in tests/test_w2a8_cpu.py: int32 accumulators (tdpbssd accumulates s8 x s8 products
in int32, |acc| <= 128 * K << 2^31) against numpy's int64, then the same float32 epilogue in the same order
as the reference, so outputs are compared bit for bit (the erf GELU: within its polynomial's error).
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import tvm_ffi  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.target import codegen  # noqa: E402

from bmvcc import amx_emulator, lowering, runtime  # noqa: E402
from bmvcc.driver import CompileOptions, compile_model  # noqa: E402
from bmvcc.errors import AMX_REFUSED  # noqa: E402
from bmvcc.schedules import amx, w2a8_cpu  # noqa: E402
from bmvcc.schedules.w2a8 import (  # noqa: E402
    W2A8Config,
    epilogue_operand,
    unpack_ternary,
    w2a8_compute,
    w2a8_numpy,
)
from bmvcc.schedules.w2a8_cpu import select_backend  # noqa: E402
from bmvcc.targets import cpu, get  # noqa: E402
from bmvcc.targets.isa import record  # noqa: E402

from conftest import cli_error, small_config, with_mattr  # noqa: E402
from test_bench import rpc_device  # noqa: E402, F401 (a fixture)
from test_w2a8_cpu import _check_gelu, _inputs  # noqa: E402

SPR = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
HERE = get("host").target()  # what the emulated kernels are built for and run on
HOST_PLUS_AMX = with_mattr(get("host").tvm_target, "+amx-tile", "+amx-int8")


def _kernel(cfg):
    func = w2a8_cpu.schedule(w2a8_compute(cfg), SPR)
    assert func.attrs[w2a8_cpu.STAGED_ATTR] == "amx"
    return func.with_attr("global_symbol", "main")


def _functions(asm: str) -> dict[str, collections.Counter]:
    """Opcode counts per function of an assembly listing (a call to syscall counted as "<syscall>")."""
    names = set(re.findall(r"\.type\t([^,]+),@function", asm))
    funcs, current = {}, None
    for line in asm.splitlines():
        if line.endswith(":") and line[:-1] in names:
            current = funcs.setdefault(line[:-1], collections.Counter())
        elif current is not None and line.startswith("\t") and not line.lstrip().startswith((".", "#", "/")):
            current["<syscall>" if "syscall@" in line else line.split()[0]] += 1
    return funcs


def test_sapphire_rapids_build_runs_the_dot_on_amx_tiles():
    """Built, not run: the parallel task holds ldtilecfg, the tile loads, tdpbssd, the stores and tilerelease;
    the function that launches the tasks asks for the tile state (one syscall) before; no vector dot product."""
    lib = tvm.compile(tvm.IRModule({"main": _kernel(W2A8Config(64, 256, 1024, "residual"))}), target=SPR)
    funcs = _functions(lib.mod.inspect_source("asm"))
    (task,) = [ops for ops in funcs.values() if ops["tdpbssd"]]
    assert task["ldtilecfg"] == 1 and task["tilerelease"] == 1, task.most_common(20)
    assert task["tilezero"] >= 4 and task["tileloadd"] >= 4 and task["tilestored"] >= 4, task.most_common(20)
    assert task["<syscall>"] == 0 and task["vpdpbusd"] == 0 and task["vpmaddubsw"] == 0, task.most_common(20)
    (launcher,) = [ops for ops in funcs.values() if ops["<syscall>"]]
    assert launcher["<syscall>"] == 1 and launcher["tdpbssd"] == 0
    assert "TVMBackendParallelLaunch" in lib.mod.inspect_source("asm")


def _run(func, cfg, q, packed, xs, ws, res, target=HERE):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [q, packed, xs, ws] + ([res] if epilogue_operand(cfg.epilogue) else [])
    out = tvm.runtime.empty((cfg.m, cfg.n), "float32", tvm.cpu())
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


# M, N padded to the 32 x 32 micro tile or not (M = 1: a GEMV), K = 64 (one tdpbssd step), 192, and not a
# multiple of 64 nor of 4; the last two above w2a8_cpu.MIN_PARALLEL_MACS (parallel tasks: 1 strip in 2 row
# blocks, 8 strips)
SHAPES = [(32, 32, 64), (17, 40, 64), (1, 37, 70), (40, 48, 192), (40, 32, 2000), (64, 256, 128)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_emulated_accumulators_exact(m, n, k):
    cfg = W2A8Config(m, n, k)
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(m * 1000 + k))
    ones = np.ones((cfg.m, 1), np.float32)  # x_scale = w_scale = 1: out = float32(acc), exact below 2^24
    out = _run(amx_emulator.emulate(_kernel(cfg)), cfg, q, packed, ones, np.ones(1, np.float32), res)
    acc = q.astype(np.int64) @ unpack_ternary(packed, cfg.k).astype(np.int64).T
    np.testing.assert_array_equal(out, acc.astype(np.float32))


@pytest.mark.parametrize("epilogue", ["residual", "gelu", "bias_gelu"])
def test_emulated_epilogues(epilogue):
    cfg = W2A8Config(40, 48, 192, epilogue)
    q, packed, xs, ws, res = _inputs(cfg, np.random.default_rng(5))
    bias = res[:1] if epilogue.startswith("bias") else res
    out = _run(amx_emulator.emulate(_kernel(cfg)), cfg, q, packed, xs, ws, bias)
    ref = w2a8_numpy(q, packed, xs, float(ws[0]), cfg.k, epilogue, bias)
    if epilogue == "residual":  # one more fp32 add, in the reference's order
        np.testing.assert_array_equal(out, ref)
    else:
        _check_gelu(out, ref)


def test_tuning_space_samples_the_unroll_step_only():
    """The amx space (w2a8_cpu.space on an amx-staged task): replays draw only the unroll step (the tile kernel is
    fixed); each sample, emulated, gives numpy's sums."""
    from test_tuning_spaces import _decisions, _samples

    cfg = W2A8Config(40, 48, 192)
    staged = w2a8_cpu.stage_w2a8(w2a8_compute(cfg), w2a8_cpu.DEFAULT_KNOBS[select_backend(SPR)], 2)
    distinct = {_decisions(s): s for s in _samples(tvm.IRModule({"main": staged.with_attr("global_symbol", "main")}),
                                                    w2a8_cpu.space, seed=3)}
    assert set(distinct) == {f"[{i}]" for i in range(4)}  # one decision: the index of the unroll step
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(4))
    ones = np.ones((cfg.m, 1), np.float32)
    acc = q.astype(np.int64) @ unpack_ternary(packed, cfg.k).astype(np.int64).T
    for sch in list(distinct.values())[:2]:
        out = _run(amx_emulator.emulate(sch.mod["main"]), cfg, q, packed, ones, np.ones(1, np.float32), res)
        np.testing.assert_array_equal(out, acc.astype(np.float32))


def _mutated(func, intrinsic: str, replace):
    """`func` with every Evaluate of the AMX call `intrinsic` replaced by replace(stmt, its operands)."""
    def evaluate(stmt, mutator):
        call = stmt.value
        if (isinstance(call, tvm.ir.Call) and call.op.name == "tirx.call_llvm_intrin"
                and codegen.llvm_get_intrinsic_name(int(call.args[0].value)) == f"llvm.x86.{intrinsic}"):
            return replace(stmt, call.args[1:])
        return mutator.default_mutate(stmt)

    return func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.Evaluate, evaluate)]))


def _only_second_row_block(func):
    """The kernel with ldtilecfg run by the tasks of row block 1 only (row block 0 relies on theirs)."""
    sch = tvm.s_tir.Schedule(func)
    row_block = sch.get(sch.get_sblock("tilecfg")).iter_vars[1].var
    return _mutated(func, "ldtilecfg", lambda stmt, _: tirx.IfThenElse(row_block == 1, stmt, None))


def _b_stride_doubled(func):
    return _mutated(func, "tileloadd64", lambda stmt, a: tirx.Evaluate(amx.tileloadd(int(a[0]), a[1], a[2] * 2))
                    if int(a[0]) in (6, 7) else stmt)


def _a_stride_64_bytes_short(func):
    return _mutated(func, "tileloadd64", lambda stmt, a: tirx.Evaluate(amx.tileloadd(int(a[0]), a[1], a[2] - 64))
                    if int(a[0]) in (4, 5) else stmt)


@pytest.mark.parametrize("break_it, fault", [
    # parallel tasks: each has its own tile state. The faulting task is task 0, run by the launching thread: a
    # worker task's error TVM's thread pool does not always report (here, 4 of 30 runs passed without one).
    (_only_second_row_block, "tilezero tmm0 without a tile configuration"),
    (_b_stride_doubled, "tileloadd tmm7 reads bytes outside wd"),  # B rows leave the task's decoded panel
    (_a_stride_64_bytes_short, None),  # A rows from the wrong k: wrong sums, in bounds
])
def test_emulator_catches_broken_kernels(break_it, fault):
    """Negative controls: the emulated kernel faults, or its sums differ, when its AMX use is broken."""
    cfg = W2A8Config(40, 32, 2000)  # 1 strip in 2 parallel row blocks (w2a8_cpu.row_blocks)
    q, packed, _, _, res = _inputs(cfg, np.random.default_rng(1))
    ones = np.ones((cfg.m, 1), np.float32)
    emulated = amx_emulator.emulate(break_it(_kernel(cfg)))
    if fault is None:
        out = _run(emulated, cfg, q, packed, ones, np.ones(1, np.float32), res)
        acc = q.astype(np.int64) @ unpack_ternary(packed, cfg.k).astype(np.int64).T
        assert (out != acc).mean() > 0.5
    else:
        with pytest.raises(RuntimeError, match=f"AMX fault: {fault}"):
            _run(emulated, cfg, q, packed, ones, np.ones(1, np.float32), res)


@pytest.mark.skipif(select_backend(HERE) != "amx", reason="the host target does not pick AMX (this machine does not "
                    "run it: no amx_tile/amx_int8 in /proc/cpuinfo, or Linux refuses this process XTILEDATA; or LLVM "
                    "does not know its CPU has it): the emulated tests stand in")
@pytest.mark.parametrize("epilogue", ["none", "residual"])
def test_real_amx_build_equals_numpy(epilogue):
    """Where the host target picks AMX, the real tiles give numpy's outputs bit for bit."""
    cfg = W2A8Config(40, 80, 1000, epilogue)
    q, packed, xs, ws, res = _inputs(cfg, np.random.default_rng(9))
    out = _run(w2a8_cpu.schedule(w2a8_compute(cfg), HERE).with_attr("global_symbol", "main"), cfg, q, packed, xs,
               ws, res)
    np.testing.assert_array_equal(out, w2a8_numpy(q, packed, xs, float(ws[0]), cfg.k, epilogue, res))


# The Sapphire Rapids build's code before its permission check must run here: AVX-512 (with BF16 and VNNI, as
# Zen 4), and no AMX, so that Linux refuses the tile state.
needs_avx512_without_amx = pytest.mark.skipif(
    cpu.machine_runs_amx() or not {"avx512bw", "avx512_vnni", "avx512_bf16"} <= (runtime.cpuinfo_flags() or set()),
    reason="needs a CPU with AVX-512 (BW, VNNI, BF16) that does not run AMX")


@needs_avx512_without_amx
def test_sapphire_rapids_build_on_a_cpu_without_amx_stops_with_the_permission_message():
    """The real build, run here: Linux refuses the tile state, so the kernel's first statement stops it with
    errors.AMX_REFUSED, before any AMX instruction (which would be SIGILL)."""
    cfg = W2A8Config(32, 32, 64)
    q, packed, xs, ws, res = _inputs(cfg, np.random.default_rng(2))
    with pytest.raises(RuntimeError, match=re.escape(AMX_REFUSED)):
        _run(_kernel(cfg), cfg, q, packed, xs, ws, res, target=SPR)


def test_select_backend_amx_only_where_it_runs(monkeypatch):
    """Sapphire Rapids -> amx, without AMX-INT8 -> vnni; the host target picks amx exactly where this machine
    runs AMX; a Sapphire Rapids host that hides AMX (a VM) or where Linux refuses XTILEDATA gets it turned off."""
    assert select_backend(SPR) == "amx"
    no_int8 = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "mattr": ["-amx-int8"]})
    assert select_backend(no_int8) == "vnni"
    assert select_backend(HERE) != "amx" or cpu.machine_runs_amx()  # where LLVM knows the CPU has AMX: exactly then
    monkeypatch.setattr(cpu, "_llvm_cpu", lambda: "sapphirerapids")
    vector = set(record({"kind": "llvm", "mcpu": "sapphirerapids"}, "x86_64")["features"].values())  # AVX-512 & co.
    for flags, xtiledata, backend in [({"amx_tile", "amx_int8"}, True, "amx"), ({"amx_tile"}, True, "vnni"),
                                      ({"amx_tile", "amx_int8"}, False, "vnni")]:
        monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: frozenset(flags | vector))
        monkeypatch.setattr(cpu, "_xtiledata_granted", lambda: xtiledata)
        target = get("host").tvm_target
        assert select_backend(tvm.target.Target(target)) == backend, target
        assert ("mattr" in target) == (backend != "amx")


@pytest.mark.parametrize("m, rows", [(17, 1), (32, 1), (33, 2), (40, 2)])
def test_row_blocks_hold_real_rows(m, rows):
    """1 strip on 2 cores: 2 row blocks of 32-row tiles only where M > 32 (below, the second would be all
    padding)."""
    staged = w2a8_cpu.stage_w2a8(w2a8_compute(W2A8Config(m, 32, 2000)), w2a8_cpu.DEFAULT_KNOBS["amx"], 2)
    assert int(staged.attrs[w2a8_cpu.ROWS_ATTR]) == rows


def test_profile_peak_counts_amx_where_the_artifact_runs_it():
    """bench's int8 peak and its AMX check follow the artifact's target: Sapphire Rapids' runs AMX (tdpbssd's 1024 MACs
    a cycle and core, Intel's figure), Ice Lake's does not (vpdpbusd's 128), the host's where its target picks AMX."""
    from bmvcc import bench

    spr, icl = ({"device": "cpu", "tvm": {"kind": "llvm", "mcpu": cpu}} for cpu in ("sapphirerapids", "icelake-server"))
    assert bench._runs_amx(spr) and not bench._runs_amx(icl)
    assert bench._runs_amx({"device": "cpu", "tvm": get("host").tvm_target}) == (select_backend(HERE) == "amx")
    peaks = bench._host_peak(spr), bench._host_peak(icl)
    assert [(p.family, p.int8_macs_per_cycle, p.amx) for p in peaks] == [("sapphirerapids", 1024, True),
                                                                           ("icelake-server", 128, False)], peaks


def test_amx_knobs_are_fixed():
    with pytest.raises(ValueError, match="the amx tile kernel is fixed"):
        w2a8_cpu.schedule(w2a8_compute(W2A8Config(32, 32, 64)), SPR, w2a8_cpu.CpuKnobs("amx", mr=16, nt=2))


def _cpu_target(name: str, tvm_target: dict):
    """A compile target `name` for this test (x86-64 CPU, 2 cores) building for `tvm_target`."""
    from bmvcc.targets.base import TargetSpec

    return TargetSpec(name=name, description=name, make_tvm_target=lambda: tvm_target, arch="x86_64",
                      facts={"cores": 2})


@pytest.mark.slow
@pytest.mark.skipif(not codegen.target_has_features("avx512bw", HERE),
                    reason="the AMX kernels' decode and epilogue need AVX-512 (BW), which this machine lacks")
def test_whole_model_on_emulated_amx_matches_pytorch(checkpoint, tmp_path, monkeypatch):
    """The small BitMedViT compiled for this CPU plus AMX (every W2A8 layer on the tile kernel, staged and scheduled
    by the real pipeline; the rest runs here natively) with each AMX kernel emulated before the build: PyTorch's logits
    within tests/test_passes_model.py's ATOL (an int8 rounding flip), the same classes. One compile, 5-20 s."""
    import dataclasses

    import torch

    from test_passes_model import ATOL

    spec = _cpu_target("host-amx", HOST_PLUS_AMX)
    emulated, schedule = [], lowering.schedule

    def schedule_then_emulate(stage, spec):
        stage = schedule(stage, spec)
        mod = stage.mod.clone()
        for gv, func in stage.mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None \
                    and func.attrs.get(w2a8_cpu.STAGED_ATTR) == "amx":
                mod[gv] = amx_emulator.emulate(func)
                emulated.append(gv.name_hint)
        return dataclasses.replace(stage, mod=mod)

    monkeypatch.setattr(lowering, "schedule", schedule_then_emulate)
    path, model = checkpoint(small_config())
    compile_model(path, tmp_path / "out", CompileOptions(target=spec))
    assert len(emulated) == 4, emulated  # qkv, out projection + residual, fc1 + GELU, fc2 + residual (both blocks)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    logits = runtime.load(tmp_path / "out")(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref, atol=ATOL)
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))


@pytest.mark.slow
@needs_avx512_without_amx
def test_amx_artifact_where_linux_refuses_amx_stops_with_one_error_line(checkpoint, tmp_path, monkeypatch, capsys,
                                                                         rpc_device):
    """A model compiled for this CPU plus AMX (for Sapphire Rapids, the instruction-set guard would refuse it first:
    this CPU lacks its AVX-512 FP16), run and benched here: `error: AMX refused: ...; ...`, exit 2; benched on an RPC
    device (this machine) the refusal is the device's; its profile is not recorded on this machine.
    One compile, 5-20 s, and an RPC tracker and server."""
    from bmvcc import artifact, bench
    from bmvcc.errors import BmvccError

    spec = _cpu_target("host-amx", HOST_PLUS_AMX)
    out, images = tmp_path / "out", tmp_path / "images.npy"
    compile_model(checkpoint(small_config())[0], out, CompileOptions(target=spec))
    np.save(images, np.zeros((1, 1, 28, 28), np.float32))
    for argv in (["run", str(out), "--input", str(images)], ["bench", str(out), "--repeat", "1"]):
        assert cli_error(capsys, argv) == f"error: {AMX_REFUSED}"
    line = cli_error(capsys, ["bench", str(out), "--repeat", "1", "--rpc-tracker", rpc_device, "--rpc-key",
                              "bmvcc-test"])
    assert line.startswith(f"error: AMX refused on rpc:bmvcc-test@{rpc_device}: Linux there did not grant"), line
    meta = artifact.read_metadata(out)
    with pytest.raises(BmvccError, match="cannot run the artifact's AMX kernels; run bmvcc bench --profile on the "
                                         "device itself"):
        bench._record_locally(out, meta["target"], meta, None, None)
