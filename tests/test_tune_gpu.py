"""bmvcc tune for the Jetson Orin Nano's GPU, without a GPU: a real MetaSchedule search through a real RPC
tracker on 127.0.0.1 (tests/test_tune.py's), whose servers run on this x86 machine and so cannot load
the aarch64 + sm_87 candidates. What can be checked here: the tasks follow the GPU build (W2A8 on its
padded compute definition, in its registered space), candidates are built, shipped and recorded as
failed with a one-line reason, `compile --db` applies nothing from such a database, and a database
record's trace replays on the task to a tensor-core kernel (what compile --db does with a valid one).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bmvcc import tunedb
from bmvcc.targets import get as get_target
from conftest import small_config
from test_tune import KEY, rpc_tracker  # noqa: F401  (the loopback tracker fixture and its key)

TARGET = "jetson-orin-nano"
CFG = small_config(image_size=35, dim=40, mlp_dim=72)  # 25 tokens: every W2A8 GEMM is padded to the tiles
TRIALS = 2


def _fused(ckpt):
    """(lowering.fuse's module of the checkpoint: the tuning tasks, its kernel table)."""
    from bmvcc import frontend, lowering
    from bmvcc.passes.pipeline import run_pipeline

    spec = get_target(TARGET)
    mod, _, _ = run_pipeline(frontend.to_relax(frontend.load_source(ckpt), 1), spec)
    with lowering.pass_context(spec):
        stage = lowering.fuse(mod, spec)
    return stage.mod, stage.kernels


@pytest.fixture(scope="module")
def gpu_tuned(tmp_path_factory, checkpoint, rpc_tracker):  # noqa: F811
    """Tunes the FFN's padded W2A8 GELU kernel: (checkpoint, fused module, kernel table, task name, db,
    finished process)."""
    tracker, _ = rpc_tracker
    ckpt, _ = checkpoint(CFG, seed=3)
    fused, table = _fused(ckpt)
    (task,) = [name for name, e in table.items() if e["kernel"] == "w2a8" and e["config"]["epilogue"] == "gelu"]
    assert table[task]["padded"] != table[task]["config"]  # the kernel's tiles, not the model's shape
    db = tmp_path_factory.mktemp("tune_gpu") / "db"
    done = subprocess.run([sys.executable, "-m", "bmvcc.cli", "tune", str(ckpt), "--target", TARGET, "--db", str(db),
                           "--trials", str(TRIALS), "--per-round", str(TRIALS), "--task", task,
                           "--rpc-tracker", tracker, "--rpc-key", KEY, "--json"],
                          capture_output=True, text=True, timeout=400)
    return ckpt, fused, table, task, db, done


@pytest.mark.slow
def test_w2a8_task_is_tuned_in_its_space_and_candidates_fail_on_a_non_gpu_device(gpu_tuned):
    _, _, _, task, db, done = gpu_tuned
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (row,) = json.loads(done.stdout)["tasks"]
    assert row["name"] == task and row["kind"] == "bmvcc:w2a8"
    # every candidate was built (a build failure reads "build: ...") and sent to the device, which could not
    # load it: recorded as failed, the run finished, nothing measured
    assert row["trials"] == row["failed"] == row["measured_now"] == TRIALS
    assert row["error"].startswith("run: ") and "candidate.so" in row["error"]
    assert row["best_us"] is None and row["default_us"] is None
    records = tunedb.open_database(db).get_all_tuning_records()
    assert len(records) == TRIALS and all(min(float(s) for s in r.run_secs) >= 1e9 for r in records)


@pytest.mark.slow
def test_compile_with_a_database_of_failed_records_applies_nothing(gpu_tuned, tmp_path):
    ckpt, _, _, task, db, _ = gpu_tuned
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bmvcc.cli", "compile", str(ckpt), "--target", TARGET, "-o", str(out),
                           "--db", str(db), "--json"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metadata.json").read_text())["tuning"]["kernels_from_db"] == 0
    kernels = json.loads((out / "device.json").read_text())["bmvcc_kernels"]
    assert "knobs" in kernels[task] and "from_db" not in kernels[task]  # the hand schedule


@pytest.mark.slow
def test_database_record_replays_on_the_task_and_builds_into_the_model(gpu_tuned):
    """What compile --db does with a valid record, on one that failed only for want of a GPU: found by the
    task's workload in the GPU build's fused module, its trace replayed there (bmvcc's intrinsics
    registered by tunedb.open_database), put in place as MetaScheduleApplyDatabase does (marked
    tirx.is_scheduled), left alone by the hand schedules and built with the whole model for sm_87, with the
    W2A8 tensor-core path (IMMA) in the SASS."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from bmvcc import gpu_build, lowering
    from bmvcc.targets import cuda_export

    _, fused, table, task, db, _ = gpu_tuned
    spec = get_target(TARGET)
    (extracted,) = [t for t in ms.relax_integration.extract_tasks(fused, spec.target()) if t.task_name == task]
    workload = extracted.dispatched[0]
    records = [r for r in tunedb.open_database(db).get_all_tuning_records()
               if tunedb.workload_id(r.workload.mod) == tunedb.workload_id(workload)]
    assert len(records) == TRIALS
    sch = s_tir.Schedule(workload)
    records[0].trace.apply_to_schedule(sch, remove_postproc=False)
    tvm.ir.assert_structural_equal(sch.mod, records[0].as_measure_candidate().sch.mod)

    applied = fused.clone()
    applied[task] = sch.mod["main"].with_attrs({"global_symbol": task, "tirx.is_scheduled": True})
    with lowering.pass_context(spec):
        scheduled = lowering.schedule(lowering.Stage(applied, table), spec)
        assert scheduled.kernels[task].get("from_db") and "knobs" not in scheduled.kernels[task]
        tvm.ir.assert_structural_equal(scheduled.mod[task], applied[task])  # not rescheduled by hand or DLight
        lowered, _, _ = gpu_build.lower(scheduled.mod, spec, scheduled.calls)
        executable = tvm.compile(lowered, target=spec.target(), relax_pipeline=None)
    _, cubin = cuda_export.compile_device(executable, "sm_87")
    assert cubin.opcode_counts().get("IMMA.16832.S8.S8", 0) > 0
