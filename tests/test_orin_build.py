"""Whole-model Jetson Orin Nano build (static checks; running it needs the device):
`bmvcc compile --target jetson-orin-nano` writes an aarch64 .so that carries the sm_87 cubin saved as
OUTDIR/device.cubin (and no CUDA source), whose SASS has the W2A8 tensor-core path."""

from __future__ import annotations

import json
import struct

import pytest

from bmvcc import artifact
from bmvcc.targets import cuda_export
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.errors import InternalError

from conftest import cli_error, small_config

EM_AARCH64, EM_CUDA = 183, 190  # ELF e_machine values


def _e_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return struct.unpack_from("<H", data, 18)[0]


def test_so_is_aarch64_and_embeds_the_cubin_not_source(orin_build):
    so = (orin_build / "model.so").read_bytes()
    cubin = (orin_build / artifact.DEVICE_BINARY).read_bytes()
    assert _e_machine(so) == EM_AARCH64
    assert _e_machine(cubin) == EM_CUDA
    assert cubin in so  # byte for byte, as TVM's CUDA runtime gets it (fmt "cubin")
    assert b"__global__" not in so and b"cubin" in so


def test_sass_has_tensor_core_w2a8_and_norm_quant(orin_build):
    from bmvcc.device_summary import sass

    text = sass(orin_build)
    for op in ("IMMA.16832.S8.S8", "LDSM", "LDGSTS"):
        assert op in text, op
    info = json.loads((orin_build / artifact.DEVICE_INFO).read_text())
    kinds = {k["kernel"] for k in info["bmvcc_kernels"].values()}
    assert kinds == {"w2a8", "norm_quant", "attention_prefill"} and info["arch"] == "sm_87"
    assert all(r["spill_stores"] == 0 for r in info["resources"].values())


def test_epilogues_run_inside_the_w2a8_kernels(orin_build):
    """small_config's GELUs and residual adds run in the W2A8 kernels' epilogues: no GELU or residual-add
    kernel is launched, and the recorded launches are the lowered module's (reshapes are views, not kernels)."""
    import re

    info = json.loads((orin_build / artifact.DEVICE_INFO).read_text())
    calls, kernels = info["calls"], info["bmvcc_kernels"]
    epilogues = {}
    for name, k in kernels.items():
        if k["kernel"] == "w2a8":
            epilogues[k["config"]["epilogue"]] = epilogues.get(k["config"]["epilogue"], 0) + calls[name]["calls"]
    assert epilogues == {"none": 2, "gelu": 2, "residual": 4}  # per block: Wqkv; FFN1; attention out, FFN2
    assert not [n for n in calls if "gelu" in n and n not in kernels]
    # no add kernel left: matmul biases are their epilogues, and so is the position-embedding add behind the patch
    # embedding's reshape (schedules/matmul_fold.py; the attention kernel scales and masks); the patch embedding is one
    # kernel, its im2col and cast in the matmul's operand loads
    adds = {n: c["calls"] for n, c in calls.items() if re.search(r"(^|_)add\d*(_|$)", n) and "matmul" not in n}
    assert not adds, adds
    patches = r"fused_cast_reshape\d*_transpose\d*(_reshape\d*)*_matmul\d*_add\d*_reshape\d*_add\d*"
    assert [n for n in calls if re.fullmatch(patches, n)], list(calls)
    assert not [n for n in calls if re.fullmatch(r"reshape\d*", n)]


def test_packed_weights_are_relaid_out_at_compile_time(orin_build):
    """The pipeline folds pad_w2a8_to_tiles' relayout of the constant packed weights: weights.bin holds them in
    TC_LAYOUT (uint8[N/16, K/32, 128]) and no launched kernel relays them out (tc_relayout's shifts and take)."""
    packed = [w["shape"] for w in artifact.read_metadata(orin_build)["weights"] if w["dtype"] == "uint8"]
    assert packed and all(len(shape) == 3 and shape[-1] == 128 for shape in packed), packed
    calls = json.loads((orin_build / artifact.DEVICE_INFO).read_text())["calls"]
    assert not [n for n in calls if "shift" in n or "take" in n], list(calls)


def test_attention_is_one_kernel_per_block_and_no_mask_is_stored(orin_build):
    """small_config's causal multi-query attention: one kernel launch per block (schedules/attention_cuda.py, the
    causal condition from indices), no softmax or score kernel beside it, no [16, 16] mask in weights.bin; the
    report counts its MACs from its configuration."""
    info = json.loads((orin_build / artifact.DEVICE_INFO).read_text())
    attention = {n: k["config"] for n, k in info["bmvcc_kernels"].items() if k["kernel"] == "attention_prefill"}
    assert sum(info["calls"][n]["calls"] for n in attention) == 2
    assert [c["causal"] and c["kv_heads"] == 1 and c["heads"] == 4 for c in attention.values()] == [True]
    assert not [n for n in info["calls"] if "softmax" in n or "divide" in n]
    weights = artifact.read_metadata(orin_build)["weights"]
    assert not [w for w in weights if w["shape"][-2:] == [16, 16]]
    from bmvcc.report import report

    (name,) = attention
    macs = {k["kernel"]: k["macs"] for k in report(orin_build)["kernels"]}[name]
    assert macs == 2 * 4 * 16 * 16 * 8  # Q K^T and P V over every key tile of each of the 4 heads (head size 8)


def test_no_file_records_where_bmvcc_or_tvm_is_installed(orin_build):
    """device_definitions.json names the TVMScript of each compute definition by its module
    (bmvcc/schedules/w2a8.py), not by its path: the same bmvcc installed elsewhere writes the same bytes."""
    from pathlib import Path

    import tvm

    from bmvcc import schedules

    installs = {Path(schedules.__file__).resolve().parents[1], Path(tvm.__file__).resolve().parents[1]}
    for path in sorted(orin_build.iterdir()):
        data = path.read_bytes()
        assert not [root for root in installs if str(root).encode() in data], f"{path.name} records an install path"
    graph = json.loads((orin_build / artifact.DEVICE_DEFINITIONS).read_text())
    sources = {node["data"] for node in graph["nodes"] if node["type"] == "ir.SourceName"}
    assert "bmvcc/schedules/w2a8.py" in sources and all(s.startswith("bmvcc/schedules/") for s in sources), sources


def test_embed_cubin_rewrites_only_the_cuda_record():
    source, cubin = "__global__ void k() {}", b"\x7fELF-cubin"
    fmap = struct.pack("<Q", 1) + b"fmap-bytes"
    record = struct.pack("<Q", 4) + b"cuda" + fmap + struct.pack("<Q", len(source)) + source.encode()
    rest = b"head" + struct.pack("<Q", 4) + b"cuda" + struct.pack("<Q", len(record)) + record + b"tail"
    blob = struct.pack("<Q", len(rest)) + rest
    new = cuda_export.embed_cubin(blob, source, cubin)
    new_record = struct.pack("<Q", 5) + b"cubin" + fmap + struct.pack("<Q", len(cubin)) + cubin
    expected = b"head" + struct.pack("<Q", 4) + b"cuda" + struct.pack("<Q", len(new_record)) + new_record + b"tail"
    assert new == struct.pack("<Q", len(expected)) + expected
    with pytest.raises(InternalError, match="layout of TVM's serialized CUDA module; this is a bmvcc bug: please report"):
        cuda_export.embed_cubin(blob[:-1], source, cubin)  # the size field no longer matches


def test_report_totals_and_w2a8_model(orin_build):
    from bmvcc.report import format_text, report
    from bmvcc.schedules.w2a8 import W2A8Config

    r = report(orin_build)
    rows = {k["kernel"]: k for k in r["kernels"]}
    w2a8 = [k for k in r["kernels"] if k["unit"] == "int8 tensor cores"]
    assert w2a8 and all(k["sass_mix"].get("IMMA", 0) > 0 and k["registers"] for k in w2a8)
    # small_config: 2 blocks x 4 BitLinear GEMMs over 16 tokens; MACs = M*N*K of the (padded) GEMM run
    info = json.loads((orin_build / artifact.DEVICE_INFO).read_text())
    for name, k in info["bmvcc_kernels"].items():
        if k["kernel"] == "w2a8":
            cfg = W2A8Config(**k["padded"])
            assert rows[name]["macs"] == cfg.m * cfg.n * cfg.k
    assert sum(k["calls"] for k in w2a8) == 8
    # every kernel's issue time is known (the emulator runs them all); the totals add up, the lower bound below
    assert not r["unknown_issue"] and all(k["estimate"]["issue_s"] > 0 for k in r["kernels"])
    assert r["cuda_graph_launches"] == 1 and r["cuda_graph_launch_s"] == pytest.approx(8e-6)
    total = sum(k["estimate"]["total_s"] for k in r["kernels"]) + r["cuda_graph_launch_s"]
    assert r["estimated_total_s"] == pytest.approx(total) and total > 0
    assert r["lower_bound_total_s"] == pytest.approx(sum(k["lower_bound"]["seconds"] * k["calls"] for k in r["kernels"]))
    assert all(k["estimate"]["kernel_s"] >= k["lower_bound"]["seconds"] for k in r["kernels"])
    lines = format_text(r).splitlines()
    assert lines[-5].startswith("model total: ") and f"lower bound {r['lower_bound_total_s'] * 1e3:.3f} ms" in lines[-5]
    assert lines[-4:] == [f"  assumed: {a}" for a in r["assumptions"]] and "75% of 68.0 GB/s" in lines[-3]


def _hot_sass(text: str, kernel: str) -> list[str]:
    """A kernel's SASS instructions (nvdisasm text) up to its last unpredicated EXIT: the slow paths after it are
    called rarely, the branch to itself and the NOPs never."""
    import re

    section = text.split(f"\t.section\t.text.{kernel},")[1].split("\t.section\t")[0]
    instructions = re.findall(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", section)
    return instructions[:len(instructions) - instructions[::-1].index("EXIT")]


def test_report_estimate_is_the_largest_time_plus_launches(orin_build):
    """The W2A8 FFN-down kernel's estimate recomputed from the artifact alone: its PTX has no branch, so each warp
    executes every PTX instruction once and its SASS up to the last EXIT (counted here from the SASS text);
    tensor-core time at the dense int8 peak, DRAM time of its compulsory bytes at 75% of 68 GB/s, issue time at
    the occupancy its registers and shared memory allow on sm_87; plus 1 us, the kernel being in the CUDA graph."""
    import math
    import re

    from bmvcc.device_summary import sass
    from bmvcc.report import report
    from bmvcc.schedules.w2a8 import W2A8Config

    info = json.loads((orin_build / artifact.DEVICE_INFO).read_text())
    name = next(n for n, k in info["bmvcc_kernels"].items() if k["kernel"] == "w2a8"
                and k["config"]["epilogue"] == "residual" and k["padded"]["k"] == 64)
    (launch,) = info["launches"][name]
    ptx = (orin_build / artifact.DEVICE_PTX).read_text()
    body = re.search(rf"\.entry {launch['kernel']}\((.*?)\n\}}", ptx, re.S).group(1)
    assert not re.search(r"\bbra\b", body)  # straight-line PTX: executed = static, every warp
    sass_per_warp = len(_hot_sass(sass(orin_build), launch["kernel"]))

    cfg = W2A8Config(**info["bmvcc_kernels"][name]["padded"])
    res = info["resources"][launch["kernel"]]
    warps = math.prod(launch["block"]) // 32
    ctas = math.prod(launch["grid"])
    # sm_87: 64 K registers in units of 256 per warp, 164 KB shared + 1 KB reserved per CTA (128 B units),
    # 1536 threads, 16 CTAs
    per_sm = min(65536 // (warps * math.ceil(res["registers"] * 32 / 256) * 256),
                 167936 // (math.ceil((res["shared_bytes"] + launch["dynamic_shared"]) / 128) * 128 + 1024),
                 1536 // (warps * 32), 16)
    busiest = math.ceil(ctas / 8)
    rounds = [per_sm] * (busiest // per_sm) + [busiest % per_sm] * (busiest % per_sm > 0)
    issue = sum(math.ceil(n * warps / 4) * sass_per_warp for n in rounds) / 625e6
    tensor_cores = 2 * cfg.m * cfg.n * cfg.k / (8 * 4 * 512 * 2 * 625e6)
    nbytes = cfg.m * cfg.k + cfg.n * cfg.k // 4 + 4 * cfg.m + 2 * 4 * cfg.m * cfg.n  # q, 2-bit W, scales, res, out
    dram = nbytes / (0.75 * 68e9)
    assert info["calls"][name]["captured"] == info["calls"][name]["calls"]
    expected = max(tensor_cores, issue, dram) + 1e-6

    row = next(k for k in report(orin_build)["kernels"] if k["kernel"] == name)
    assert row["launched"][0]["sass_per_warp"] == pytest.approx(sass_per_warp)
    assert row["launched"][0]["sass_count"] == "straight-line"
    assert row["launched"][0]["ctas_per_sm"] == per_sm
    e = row["estimate"]
    assert (e["tensor_core_s"], e["issue_s"], e["dram_s"]) == pytest.approx((tensor_cores, issue, dram))
    assert e["seconds"] == pytest.approx(expected) and e["total_s"] == pytest.approx(expected * row["calls"])


def _with_ptx_changed(orin_build, copy, old: str, new: str):
    """`copy` of the build with `old` replaced by `new` in its device.ptx (metadata.json still records the PTX compiled)."""
    import shutil

    shutil.copytree(orin_build, copy)
    ptx = copy / artifact.DEVICE_PTX
    ptx.write_text(ptx.read_text().replace(old, new))
    return copy


def test_report_names_the_kernels_whose_issue_time_it_cannot_count(orin_build, tmp_path):
    """A kernel the emulator cannot run (here: an unknown PTX opcode where attention and GELU take a max) has no issue
    time: its estimate is the larger of the other two plus its launch, and the text says which kernels those are."""
    from bmvcc.report import format_text, report

    bad = _with_ptx_changed(orin_build, tmp_path / "bad", "max.f32", "maxx.f32")
    artifact.write_metadata(bad, artifact.read_metadata(orin_build))  # the changed PTX recorded as compiled
    r = report(bad)
    unknown = {k["kernel"]: k["estimate"] for k in r["kernels"] if k["kernel"] in r["unknown_issue"]}
    assert any("attention" in name for name in unknown) and len(unknown) < len(r["kernels"])
    for e in unknown.values():
        assert e["issue_s"] is None and e["kernel_s"] == max(e["tensor_core_s"], e["dram_s"]) > 0
    assert f"issue time unknown (the emulator cannot run them), left out: {', '.join(r['unknown_issue'])}" \
        in format_text(r).splitlines()


def test_w2a8_call_rewrite_matches_pytorch_on_the_host():
    """The GPU build's Relax structure around each W2A8 call (operands, the residual included, padded to
    the tile-aligned shape, the weights relaid out in TC_LAYOUT, the output sliced; GELU / residual inside the
    kernel), with the tensor-core kernel's compute definition (tc_compute) of the same padded shape in its place,
    compiled as written (no CPU schedule) for and run on the host.
    dim 40 (K, N not multiples of 32) and 25 tokens (M not a multiple of 16) force padding on every
    axis. Tolerance 2e-3 as in test_passes_model.py (an int8 code at a .5 tie may round the other way)."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from bmvcc import targets
    from bmvcc.frontend import Source, to_relax
    from bmvcc.passes.pad_w2a8_to_tiles import pad_w2a8_to_tiles
    from bmvcc.passes.pipeline import run_pipeline
    from bmvcc.schedules.cpu_default import schedule_cpu_module
    from bmvcc.schedules.w2a8 import config_of, kernel_of

    from conftest import make_model

    cfg = small_config(image_size=35, dim=40, mlp_dim=72)
    model = make_model(cfg, seed=5)
    x = np.random.RandomState(6).randn(1, 1, 35, 35).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()

    mod, weights, _ = run_pipeline(to_relax(Source(model, (1, 35, 35), 10, None, cfg), 1), None)
    mod = relax.transform.DeadCodeElimination(["main"])(pad_w2a8_to_tiles(mod))  # as the pipeline, weights unfolded
    kernels = [config_of(f) for _, f in mod.functions_items() if kernel_of(f) == "w2a8"]
    assert any(p.k != 40 for p in kernels) and any(p.m != 25 for p in kernels)
    assert {p.epilogue for p in kernels} == {"none", "gelu", "residual"}
    assert "R.nn.gelu" not in mod["main"].script()  # applied by the kernels
    for gv, func in mod.functions_items():
        if kernel_of(func) == "w2a8":
            mod[gv] = func.with_attr("tirx.is_scheduled", True)
    target = targets.get("host").target()
    vm = relax.VirtualMachine(tvm.compile(schedule_cpu_module(mod, target), target=target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *weights)
    out = (out[0] if isinstance(out, tvm.ir.Array) or hasattr(out, "__getitem__") and not hasattr(out, "numpy")
           else out).numpy()
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_cli_inspect_and_report(orin_build, capsys, tmp_path):
    from bmvcc.cli import main

    def run(argv):
        main(argv)
        return capsys.readouterr().out

    assert "IMMA.16832.S8.S8" in run(["inspect", str(orin_build), "--sass"])
    summary = json.loads(run(["inspect", str(orin_build), "--json"]))
    assert summary["arch"] == "sm_87" and summary["bytes"] == len((orin_build / artifact.DEVICE_BINARY).read_bytes())
    report = json.loads(run(["report", str(orin_build), "--json"]))
    assert report["estimated_total_s"] > report["lower_bound_total_s"] > 0 and report["assumptions"]
    assert "not a bmvcc artifact" in cli_error(capsys, ["inspect", str(tmp_path)])  # no metadata.json


def test_cli_verify_emulates_every_launched_kernel(orin_build, capsys, tmp_path):
    """`bmvcc verify` runs every PrimFunc the artifact launches (device.json) through the PTX emulator against its
    compute definition: all agree and race-free; with max.f32 turned into min.f32 in device.ptx (the attention
    kernel's running max, GELU clamps) those kernels disagree and the exit status is 1; a CPU artifact is a user error."""
    from bmvcc.cli import main

    assert set(json.loads((orin_build / artifact.METADATA).read_text())["files"]) == {artifact.MODULE, artifact.WEIGHTS, *artifact.DEVICE_FILES}
    main(["verify", str(orin_build), "--json", "--max-ctas", "8"])
    rows = json.loads(capsys.readouterr().out)
    launched = json.loads((orin_build / artifact.DEVICE_INFO).read_text())["calls"]
    assert {r["primfunc"] for r in rows} == set(launched)
    assert all(r["verdict"] == "ok" and r["races"] == 0 and r["ctas_run"] == min(r["ctas_total"], 8) for r in rows), rows
    assert any(r["ctas_total"] > 8 for r in rows)  # sampled: compared on what the CTAs run wrote
    bad = _with_ptx_changed(orin_build, tmp_path / "bad", "max.f32", "min.f32")
    assert "device.ptx' is damaged or was replaced" in cli_error(capsys, ["verify", str(bad)])
    artifact.write_metadata(bad, artifact.read_metadata(orin_build))  # the changed PTX recorded as compiled
    with pytest.raises(SystemExit) as e:
        main(["verify", str(bad)])
    table = capsys.readouterr().out
    assert e.value.code == 1 and "disagree" in table
    assert any(line.startswith("attention_causal") and line.endswith("mismatch") for line in table.splitlines())
    (bad / artifact.DEVICE_PTX).unlink()
    assert "device.ptx' is missing; compile the model again" in cli_error(capsys, ["verify", str(bad)])
    assert "--max-ctas 0 runs no CTA" in cli_error(capsys, ["verify", str(orin_build), "--max-ctas", "0"])


def _embedded_cubin(so: bytes) -> bytes:
    """The one ELF of e_machine EM_CUDA inside a shared library; TVM's serialized import tree (embedded as
    data) stores it after its u64 length."""
    found = []
    for start in (i for i in range(8, len(so)) if so.startswith(b"\x7fELF", i)):
        if struct.unpack_from("<H", so, start + 18)[0] == EM_CUDA:
            found.append(so[start: start + struct.unpack_from("<Q", so, start - 8)[0]])
    assert len(found) == 1, len(found)
    return found[0]


def test_tune_builds_cuda_candidates_as_aarch64_so_with_the_cubin():
    """`bmvcc tune --target jetson-orin-nano`'s builder (run as MetaSchedule runs it, in its worker pool) turns
    a candidate, here the default schedule of the W2A8 GELU design space, into an aarch64 .so carrying
    the sm_87 cubin (the device has only the TVM runtime: no CUDA source, no compiler). Measuring it needs
    the device over RPC."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from bmvcc.schedules import w2a8_cuda as wc
    from bmvcc.schedules.w2a8 import W2A8Config
    from bmvcc.targets import cuda_toolchain, get
    from bmvcc.tune import _builder

    spec = get("jetson-orin-nano")
    mod = tvm.IRModule({"main": wc.schedule(wc.tc_compute(W2A8Config(16, 128, 64, "gelu")), spec.target()).with_attr("global_symbol", "main")})
    (built,) = _builder(spec).build([ms.builder.BuilderInput(mod, spec.target())])
    assert built.error_msg is None, built.error_msg
    try:
        so = open(built.artifact_path, "rb").read()
    finally:
        ms.utils.remove_build_dir(built.artifact_path)
    assert _e_machine(so) == EM_AARCH64 and b"__global__" not in so and b"cubin" in so
    cubin = cuda_toolchain.Cubin("sm_87", _embedded_cubin(so), ())
    ops = cubin.opcode_counts()
    assert ops.get("IMMA.16832.S8.S8", 0) > 0 and any(o.startswith("LDGSTS") for o in ops), ops
    assert "EF_CUDA_SM87" in cubin.sass()  # the arch in the ELF header flags


def test_bundled_example_orin_build_verifies_in_full(tmp_path):
    """Every kernel the bundled example's Orin build launches, every CTA of its grid, emulated from device.ptx
    against its compute definition: all agree and no race (issue: the example's Orin artifact verifies)."""
    from pathlib import Path

    from bmvcc.ptx.verify import verify_artifact

    example = Path(__file__).parent.parent / "examples" / "bitmedvit_digits.pth"
    out = compile_model(example, tmp_path / "orin", CompileOptions(target="jetson-orin-nano")).outdir
    rows = verify_artifact(out, max_ctas=1 << 20)
    launched = json.loads((out / artifact.DEVICE_INFO).read_text())["calls"]
    assert {r["primfunc"] for r in rows} == set(launched)
    assert all(r["verdict"] == "ok" and r["races"] == 0 and r["ctas_run"] == r["ctas_total"] for r in rows), rows
    assert any(r["primfunc"].startswith("w2a8") for r in rows)
