"""bmvcc tune: real MetaSchedule search through a real TVM RPC tracker and servers on 127.0.0.1.

Tuning is the slowest thing bmvcc does (each tuning process imports TVM's tensor intrinsics, ~1 min
here), so the search runs twice in this file, on one small task with a few trials: a run killed after
its first round and its resumption, during which one of the two servers hangs. Every other check
reuses that database. The rest (user errors) needs no search.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bmvcc import tunedb
from bmvcc.targets import get as get_target
from conftest import cli_error, small_config

TASK = "fused_matmul_add"  # patch embedding (Linear + bias) of small_config(): a float task, default space
TRIALS, PER_ROUND = 8, 4  # two rounds: the first is recorded before the kill, the second after the resume
KEY = "bmvcc-test"
# Same reasoning and bound as tests/test_frontend.py: a different float summation order moves logits
# by ~1e-5 relative, and an int8 quantizer flip at a rounding boundary by ~1e-3; bugs move them by O(1).
RTOL_LOGITS = 5e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _servers_under_key(port: int) -> int:
    from tvm import rpc

    summary = rpc.connect_tracker("127.0.0.1", port).summary()
    return sum(item["key"].split(":", 1)[-1] == KEY for item in summary["server_info"])


@pytest.fixture(scope="module")
def rpc_tracker():
    """A tracker and two servers under KEY on loopback: (address, [server processes])."""
    port = _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)])]
    time.sleep(2)
    for _ in range(2):
        sport = _free_port()
        procs.append(_start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                             "--host", "127.0.0.1", "--port", str(sport), "--port-end", str(sport + 1)]))
    deadline = time.time() + 120
    while _servers_under_key(port) < 2:
        assert time.time() < deadline, "RPC servers did not register with the tracker"
        time.sleep(1)
    yield f"127.0.0.1:{port}", procs[1:]
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _record_lines(db: Path) -> int:
    path = db / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def _tune_cmd(ckpt: Path, db: Path, tracker: str) -> list[str]:
    return [sys.executable, "-m", "bmvcc.cli", "tune", str(ckpt), "--target", "host", "--db", str(db),
            "--trials", str(TRIALS), "--per-round", str(PER_ROUND), "--task", TASK,
            "--rpc-tracker", tracker, "--rpc-key", KEY, "--json"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, checkpoint, rpc_tracker):
    """Tune TASK through the tracker: killed after its first round, then resumed with one server hung.

    Returns (checkpoint path, model, db, JSON report of the resumed run, records after the kill).
    """
    tracker, servers = rpc_tracker
    ckpt, model = checkpoint(small_config(), seed=3)
    db = tmp_path_factory.mktemp("tune") / "db"
    first = subprocess.Popen(_tune_cmd(ckpt, db, tracker), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    deadline = time.time() + 540
    while _record_lines(db) < PER_ROUND:  # the first round is committed to the database
        assert first.poll() is None, first.communicate()[1].decode()[-3000:]
        assert time.time() < deadline, "no tuning records after 9 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    after_kill = _record_lines(db)
    assert PER_ROUND <= after_kill < TRIALS

    # A device that stops answering mid-run: still registered at the tracker, its sessions time out.
    os.killpg(servers[0].pid, signal.SIGSTOP)
    try:
        resumed = subprocess.run(_tune_cmd(ckpt, db, tracker), capture_output=True, text=True, timeout=540)
    finally:
        os.killpg(servers[0].pid, signal.SIGKILL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return ckpt, model, db, json.loads(resumed.stdout), after_kill


def test_resume_measures_only_the_missing_trials(tuned):
    _, _, db, report, after_kill = tuned
    (task,) = report["tasks"]
    assert task["name"] == TASK and task["kind"] == "default space"
    assert _record_lines(db) == TRIALS  # nothing measured twice: the resumed run added TRIALS - after_kill
    assert task["trials"] == TRIALS and task["measured_now"] == TRIALS - after_kill
    assert task["best_us"] is not None and task["best_us"] > 0


def test_hung_device_fails_its_candidates_and_the_run_goes_on(tuned):
    _, _, db, report, _ = tuned
    (task,) = report["tasks"]
    assert task["failed"] >= 1  # the hung server's session timed out: recorded as a failed candidate
    assert task["trials"] - task["failed"] >= 1  # the other server measured the rest
    assert "2 device(s)" in report["devices"]


def test_recorded_schedules_compute_the_same_function(tuned):
    """Every valid record, replayed on its workload and built, matches numpy on random inputs."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    _, _, db, _, _ = tuned
    records = [r for r in tunedb.open_database(db).get_all_tuning_records() if r.run_secs and max(float(s) for s in r.run_secs) < 1e9]
    assert records
    target = get_target("host").target()
    rng = np.random.default_rng(0)
    for record in records[:2]:
        workload = record.workload.mod
        sch = record.as_measure_candidate().sch
        args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(a.dtype))
                for a in ms.arg_info.ArgInfo.from_prim_func(workload["main"])]
        ref_args = [tvm.runtime.tensor(a.numpy()) for a in args]
        tvm.compile(workload, target=target)["main"](*ref_args)  # TVM's unscheduled lowering: the reference
        tvm.compile(sch.mod, target=target)["main"](*args)
        # same float32 sums, possibly reordered by the schedule: a few ulps of the largest term
        np.testing.assert_allclose(args[-1].numpy(), ref_args[-1].numpy(), rtol=1e-5, atol=1e-5)


def test_compile_with_database_keeps_the_logits(tuned, tmp_path):
    from bmvcc import runtime

    ckpt, model, db, report, _ = tuned
    out_db, out_plain = tmp_path / "tuned", tmp_path / "plain"
    for out, extra in ((out_db, ["--db", str(db)]), (out_plain, [])):
        done = subprocess.run([sys.executable, "-m", "bmvcc.cli", "compile", str(ckpt), "-o", str(out), "--json", *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out_db / "metadata.json").read_text())["tuning"]
    (task,) = report["tasks"]
    wins = int(task["best_us"] < task["default_us"]) if task["default_us"] else 1
    assert meta["kernels_from_db"] == wins  # applied exactly when tuning beat the default schedule
    x = np.random.default_rng(5).uniform(-1, 1, size=(3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    tuned_logits, plain_logits = runtime.load(out_db)(x), runtime.load(out_plain)(x)
    scale = float(np.abs(ref).max())
    assert np.abs(tuned_logits - ref).max() <= RTOL_LOGITS * scale
    assert np.abs(tuned_logits - plain_logits).max() <= RTOL_LOGITS * scale


def test_forced_tuned_kernels_keep_the_logits(tuned):
    """With the tuned schedule applied even where it is slower, the tuned kernel is marked scheduled
    (the default schedules leave it alone) and the whole model still matches PyTorch."""
    import tvm
    from tvm import relax

    from bmvcc import frontend
    from bmvcc.passes.pipeline import run_pipeline
    from bmvcc.schedules.cpu_default import schedule_cpu_module

    ckpt, model, db, _, _ = tuned
    spec = get_target("host")
    mod, weights, _ = run_pipeline(frontend.to_relax(frontend.load_source(ckpt), 1), spec)
    applied, count = tunedb.apply_database(mod, spec, db, only_faster=False)
    assert count == 1 and applied[TASK].attrs["tirx.is_scheduled"]
    tuned_func = applied[TASK]
    scheduled = schedule_cpu_module(applied, spec.target())
    tvm.ir.assert_structural_equal(scheduled[TASK].body, tuned_func.body)  # not rescheduled by the default rules
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=spec.target()), tvm.cpu())
    x = np.random.default_rng(6).uniform(-1, 1, size=(1, 1, 28, 28)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), *weights).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() <= RTOL_LOGITS * float(np.abs(ref).max())


def test_database_for_another_target_is_refused(tmp_path, capsys, checkpoint):
    ckpt, _ = checkpoint(small_config(), seed=3)
    db = tmp_path / "db"
    tunedb.open_for_tuning(db, get_target("aarch64"))
    err = cli_error(capsys, ["compile", str(ckpt), "-o", str(tmp_path / "out"), "--db", str(db)])
    assert "made for target 'aarch64'" in err and "host" in err
    assert not (tmp_path / "out").exists()
    err = cli_error(capsys, ["tune", str(ckpt), "--db", str(db), "--trials", "1"])
    assert "made for target 'aarch64'" in err


def test_key_changes_with_any_target_detail():
    from dataclasses import replace

    host = get_target("host")
    other = replace(host, tvm_target={**host.tvm_target, "num-cores": host.tvm_target["num-cores"] + 1})
    assert tunedb.target_key(host) == tunedb.target_key(get_target("host"))
    assert tunedb.target_key(host) != tunedb.target_key(other)


def test_unreachable_tracker_and_unknown_key(capsys, tmp_path, checkpoint, rpc_tracker):
    ckpt, _ = checkpoint(small_config(), seed=3)
    dead = f"127.0.0.1:{_free_port()}"
    err = cli_error(capsys, ["tune", str(ckpt), "--db", str(tmp_path / "db"), "--rpc-tracker", dead, "--rpc-key", KEY])
    assert "unreachable" in err and "rpc_tracker" in err
    tracker, _ = rpc_tracker
    err = cli_error(capsys, ["tune", str(ckpt), "--db", str(tmp_path / "db"), "--rpc-tracker", tracker, "--rpc-key", "nokey"])
    assert "no device is registered under key 'nokey'" in err and KEY in err
    err = cli_error(capsys, ["tune", str(ckpt), "--db", str(tmp_path / "db"), "--target", "aarch64"])
    assert "--rpc-tracker" in err
    assert not (tmp_path / "db").exists()  # nothing written before the checks
