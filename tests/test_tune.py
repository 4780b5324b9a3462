"""bmvcc tune: real MetaSchedule search through a real TVM RPC tracker and servers on 127.0.0.1.

Tuning is the slowest thing bmvcc does (each tuning process imports TVM's tensor intrinsics, ~1 min
here), so the search runs twice in this file, on two small tasks with a few trials (a float one in
MetaSchedule's default space, a W2A8 one in bmvcc's space, schedules/w2a8_cpu.py): a run killed after
its first round and its resumption, during which one of the two servers hangs. Every other check
reuses that database. The rest (user errors) needs no search, except the check that a local
one-trial tune, run to the end or interrupted, leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from bmvcc import tunedb
from bmvcc.cli import main
from bmvcc.errors import BmvccError
from bmvcc.targets import get as get_target
from conftest import cli_error, describe, leftover_processes, small_config, tagged_processes

TASK = "fused_matmul_add_reshape3_add1"  # patch embedding (Linear + bias + position add) of small_config(): a float task, default space
W2A8_TASK = "w2a8_m16_n32_k64_residual"  # an MLP down-projection: bmvcc's W2A8 space
TASKS = (TASK, W2A8_TASK)
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
            "--trials", str(TRIALS), "--per-round", str(PER_ROUND), *(a for t in TASKS for a in ("--task", t)),
            "--rpc-tracker", tracker, "--rpc-key", KEY, "--json"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, checkpoint, rpc_tracker):
    """Tune TASKS through the tracker: killed after its first round, then resumed with one server hung.

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
    assert PER_ROUND <= after_kill < len(TASKS) * TRIALS

    # A device that stops answering mid-run: still registered at the tracker, its sessions time out.
    os.killpg(servers[0].pid, signal.SIGSTOP)
    try:
        resumed = subprocess.run(_tune_cmd(ckpt, db, tracker), capture_output=True, text=True, timeout=540)
    finally:
        os.killpg(servers[0].pid, signal.SIGKILL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return ckpt, model, db, json.loads(resumed.stdout), after_kill


def _tasks(report) -> dict:
    return {t["name"]: t for t in report["tasks"]}


@pytest.mark.slow
def test_resume_measures_only_the_missing_trials(tuned):
    _, _, db, report, after_kill = tuned
    tasks = _tasks(report)
    assert sorted(tasks) == sorted(TASKS)
    assert tasks[TASK]["kind"] == "default space" and tasks[W2A8_TASK]["kind"] == "bmvcc:w2a8"
    # nothing measured twice: the resumed run added what the killed one had not; the budget is
    # TRIALS x tasks, spread by the gradient scheduler, whose warm-up gives each task a round
    assert _record_lines(db) == len(TASKS) * TRIALS
    assert sum(t["trials"] for t in tasks.values()) == len(TASKS) * TRIALS
    assert all(t["trials"] >= PER_ROUND for t in tasks.values())
    assert sum(t["measured_now"] for t in tasks.values()) == len(TASKS) * TRIALS - after_kill
    assert all(t["best_us"] is not None and t["best_us"] > 0 for t in tasks.values())


@pytest.mark.slow
def test_hung_device_fails_its_candidates_and_the_run_goes_on(tuned):
    _, _, db, report, _ = tuned
    tasks = _tasks(report).values()
    assert sum(t["failed"] for t in tasks) >= 1  # the hung server's session timed out: a failed candidate
    assert all(t["trials"] - t["failed"] >= 1 for t in tasks)  # the other server measured the rest
    assert "2 device(s)" in report["devices"]
    assert report["skipped"] == {} and report["model_us_before"] is None  # --task; not timed remotely


def test_kernels_without_arithmetic_are_not_tasks(checkpoint):
    """The small model's kernels, as tune extracts them: reshapes and transposes compute nothing,
    the patch embedding and the W2A8 kernel do."""
    from tvm.s_tir import meta_schedule as ms

    from bmvcc import frontend
    from bmvcc.passes.pipeline import run_pipeline
    from bmvcc.schedules.cpu_default import legalize_and_fuse
    from bmvcc.tune import has_arithmetic

    ckpt, _ = checkpoint(small_config(), seed=3)
    spec = get_target("host")
    mod, _, _ = run_pipeline(frontend.to_relax(frontend.load_source(ckpt), 1), spec)
    tasks = {t.task_name: t.dispatched[0] for t in ms.relax_integration.extract_tasks(
        legalize_and_fuse(mod, spec.target()), spec.target())}
    moves = [n for n in tasks if re.fullmatch(r"(reshape|transpose)\d*", n)]
    assert moves and not any(has_arithmetic(tasks[n]) for n in moves)
    assert all(has_arithmetic(tasks[n]) for n in TASKS)


def test_task_selection_by_share_of_model_time():
    from bmvcc.tune import MIN_SHARE, select_tasks, skipped_line

    # name -> (arithmetic, calls, default us); kernel time 90 + 2x2 + 1 = 95 us, 10% of it 9.5 us
    kernels = {"attn": (True, 1, 90.0), "norm": (True, 2, 2.0), "copy": (False, 4, 0.1),
               "bias": (True, 1, 1.0), "broken": (True, 1, None)}
    chosen, skipped = select_tasks(kernels)
    assert MIN_SHARE == 0.10 and chosen == ["attn", "broken"]  # an unmeasured kernel is kept
    assert skipped_line(skipped) == ("skipped 3 kernels: 2 each under 10% of the model's kernel time, "
                                     "1 without arithmetic (reshapes, copies)")
    assert select_tasks(kernels, min_share=0.04)[0] == ["attn", "norm", "broken"]  # 4 us is 4.2%


def _valid_records(db, kernel: str | None) -> list:
    """The database's measured records (read back from its JSON files) of float tasks (kernel None)
    or of bmvcc kernel `kernel`."""
    records = tunedb.open_database(db).get_all_tuning_records()
    return [r for r in records if r.run_secs and max(float(s) for s in r.run_secs) < 1e9
            and (r.workload.mod["main"].attrs or {}).get("bmvcc.kernel") == kernel]


@pytest.mark.slow
def test_recorded_schedules_compute_the_same_function(tuned):
    """Valid float records, replayed on their workload and built, match TVM's unscheduled build."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    _, _, db, _, _ = tuned
    records = _valid_records(db, None)
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


@pytest.mark.slow
def test_recorded_w2a8_schedules_are_exact(tuned):
    """Every valid W2A8 record (different sampled tiles), replayed from the JSON database on its task
    and built, matches numpy bit for bit (int32 accumulators, the reference's fp32 dequant and residual add)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from bmvcc.schedules.w2a8 import pack_ternary, w2a8_numpy

    _, _, db, _, _ = tuned
    records = _valid_records(db, "w2a8")
    decisions = {str([r.trace.decisions[i] for i in r.trace.insts if i in r.trace.decisions]) for r in records}
    assert len(records) >= 2 and len(decisions) >= 2, decisions
    q_info, wp_info = ms.arg_info.ArgInfo.from_prim_func(records[0].workload.mod["main"])[:2]
    (m, k), n = (int(d) for d in q_info.shape), int(wp_info.shape[0])
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (m, k), dtype=np.int8)
    packed = pack_ternary(rng.integers(-1, 2, (n, k)))
    xs, ws = rng.uniform(0.5, 3.0, (m, 1)).astype(np.float32), np.array([0.05], np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    ref = w2a8_numpy(q, packed, xs, float(ws[0]), k, "residual", res)
    for record in records:
        lib = tvm.compile(record.as_measure_candidate().sch.mod, target=get_target("host").target())
        out = tvm.runtime.empty((m, n), "float32", tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a) for a in (q, packed, xs, ws, res)], out)
        np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.slow
def test_compile_with_database_keeps_the_logits(tuned, tmp_path):
    from bmvcc import runtime

    ckpt, model, db, report, _ = tuned
    out_db, out_plain = tmp_path / "tuned", tmp_path / "plain"
    for out, extra in ((out_db, ["--db", str(db)]), (out_plain, [])):
        done = subprocess.run([sys.executable, "-m", "bmvcc.cli", "compile", str(ckpt), "-o", str(out), "--json", *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out_db / "metadata.json").read_text())["tuning"]
    assert meta["kernels_from_db"] == _wins(report)  # applied exactly when tuning beat the default schedule
    assert not meta["shipped"]
    x = np.random.default_rng(5).uniform(-1, 1, size=(3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    tuned_logits, plain_logits = runtime.load(out_db)(x), runtime.load(out_plain)(x)
    scale = float(np.abs(ref).max())
    assert np.abs(tuned_logits - ref).max() <= RTOL_LOGITS * scale
    assert np.abs(tuned_logits - plain_logits).max() <= RTOL_LOGITS * scale


def _wins(report) -> int:
    return sum(int(t["best_us"] < t["default_us"]) if t["default_us"] else 1 for t in report["tasks"])


@pytest.mark.slow
def test_shipped_database_is_applied_for_its_exact_target(tuned, tmp_path):
    """compile without --db applies the database under root/<shipped_name(target)>, and only that one."""
    from bmvcc.driver import CompileOptions, compile_model

    ckpt, _, db, report, _ = tuned
    host, aarch64 = get_target("host"), get_target("aarch64")
    root = tmp_path / "databases"
    shutil.copytree(db, root / tunedb.shipped_name(host), ignore=shutil.ignore_patterns("logs"))
    assert tunedb.shipped_database(host, root) == root / tunedb.shipped_name(host)
    assert tunedb.shipped_database(aarch64, root) is None and tunedb.shipped_name(aarch64) != tunedb.shipped_name(host)
    messages = []
    done = compile_model(ckpt, tmp_path / "out", CompileOptions(shipped_databases=root), progress=messages.append)
    assert done.metadata["tuning"] == {"db": tunedb.shipped_name(host), "shipped": True,
                                       "kernels_from_db": _wins(report)}
    assert f"using the shipped tuning database {tunedb.shipped_name(host)}" in messages


@pytest.mark.slow
def test_forced_tuned_kernels_keep_the_logits(tuned):
    """With the tuned schedules applied even where they are slower, both tuned kernels (float and W2A8)
    are marked scheduled (the default schedules leave them alone) and the whole model still matches PyTorch."""
    import tvm
    from tvm import relax

    from bmvcc import frontend, lowering
    from bmvcc.passes.pipeline import run_pipeline

    ckpt, model, db, _, _ = tuned
    spec = get_target("host")
    mod, weights, _ = run_pipeline(frontend.to_relax(frontend.load_source(ckpt), 1), spec)
    applied, count = tunedb.apply_database(lowering.fuse(mod, spec).mod, spec, db, only_faster=False)
    assert count == len(TASKS) and all(applied[t].attrs["tirx.is_scheduled"] for t in TASKS)
    scheduled = lowering.schedule(lowering.Stage(applied), spec).mod
    for t in TASKS:  # not rescheduled by the default rules
        tvm.ir.assert_structural_equal(scheduled[t].body, applied[t].body)
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
    other = replace(host, make_tvm_target=lambda: {**host.tvm_target, "num-cores": host.tvm_target["num-cores"] + 1})
    assert tunedb.target_key(host) == tunedb.target_key(get_target("host"))
    assert tunedb.target_key(host) != tunedb.target_key(other)


def test_saved_workloads_name_no_installation_path(tmp_path):
    """A database written on one machine is the same on another: the compute definition's span names
    bmvcc/schedules/w2a8.py, not where bmvcc is installed, and the saved workload is still found."""
    import base64

    import tvm

    from bmvcc.schedules import w2a8

    module = tvm.IRModule({"main": w2a8.w2a8_compute(w2a8.W2A8Config(16, 16, 64))})
    def sources(text: str) -> list[str]:
        return [node["data"] for node in json.loads(text)["nodes"] if node["type"] == "ir.SourceName"]

    assert sources(tvm.ir.save_json(module)) == [str(Path(w2a8.__file__).resolve())]  # what TVM itself writes
    tables = tunedb.TuningTables(tmp_path)
    tables.db.commit_workload(module)
    tables.save()
    (_, encoded), = [json.loads(line) for line in (tmp_path / tunedb.TABLES[0]).read_text().splitlines()]
    assert sources(base64.b64decode(encoded)[8:]) == ["bmvcc/schedules/w2a8.py"]
    assert tunedb.open_database(tmp_path).has_workload(module)


def test_portable_json_resolves_the_modules_once_and_sees_new_imports(tmp_path, monkeypatch):
    """portable_json resolves the imported modules' files once while no module is imported (bmvcc tune saves the
    workloads one after another), and names a module imported since."""
    import importlib

    from bmvcc.portable_ir import portable_json

    (tmp_path / "bmvcc_probe.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = str((tmp_path / "bmvcc_probe.py").resolve())
    graph = json.dumps({"nodes": [{"type": "ir.SourceName", "data": path}]})

    def sources(text: str) -> list[str]:
        return [node["data"] for node in json.loads(text)["nodes"]]

    assert sources(portable_json(graph)) == [path]  # not an imported module's file: kept
    resolved, realpath = [], os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: resolved.append(p) or realpath(p))
    assert sources(portable_json(graph)) == [path] and resolved == [path]  # the graph's own path only
    monkeypatch.setitem(sys.modules, "bmvcc_probe", importlib.import_module("bmvcc_probe"))  # removed after
    assert sources(portable_json(graph)) == ["bmvcc_probe.py"]


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


def _small_database(db: Path) -> Path:
    """A database made by MetaSchedule's own JSONDatabase (through bmvcc's tables) without a search: one
    workload (an 8x8 elementwise PrimFunc) and two measured records of it, each table ending in a newline."""
    import tvm
    from tvm import s_tir, te
    from tvm.s_tir import meta_schedule as ms

    spec = get_target("host")
    tables, _ = tunedb.open_for_tuning(db, spec)
    a = te.placeholder((8, 8), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((8, 8), lambda i, j: a[i, j] * 2.0, name="b")])})
    for factor in (2, 4):
        sch = s_tir.Schedule(mod)
        sch.split(sch.get_loops(sch.get_sblock("b"))[1], [None, factor])
        workload = tables.db.commit_workload(mod)
        tables.db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, run_secs=[1e-4 * factor], target=spec.target(),
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    tables.save()
    return db


RECORDS = "database_tuning_record.json"


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys, checkpoint):
    """A run killed while MetaSchedule appended a record leaves half a line: compile --db warns and goes on,
    and the next tuning run's first save writes the table back without it."""
    db = _small_database(tmp_path / "db")
    whole = (db / RECORDS).read_bytes()
    (db / RECORDS).write_bytes(whole + whole[:100])  # a third record, torn
    ckpt, _ = checkpoint(small_config(depth=1))
    main(["compile", str(ckpt), "-o", str(tmp_path / "out"), "--db", str(db)])
    err = capsys.readouterr().err
    assert f"[bmvcc] warning: '{db / RECORDS}' ends in a torn line" in err and "Traceback" not in err
    assert (tmp_path / "out" / "metadata.json").is_file()

    messages = []
    tables, _ = tunedb.open_for_tuning(db, get_target("host"), messages.append)
    assert len(tables.db.get_all_tuning_records()) == 2 and "torn line" in messages[0]
    tables.save()
    assert (db / RECORDS).read_bytes() == whole


def test_corrupt_database_is_one_line(tmp_path, capsys, checkpoint):
    """Damage before the last line (or a bad bmvcc-db.json) cannot be a torn append: compile --db and tune
    refuse it in one line naming the file."""
    ckpt, _ = checkpoint(small_config(depth=1))
    db = _small_database(tmp_path / "db")
    first, second = (db / RECORDS).read_bytes().splitlines()
    (db / RECORDS).write_bytes(first[:50] + b"\n" + second + b"\n")
    expected = f"error: tuning database file '{db / RECORDS}' is damaged at line 1 of 2; tune into a new --db directory"
    assert cli_error(capsys, ["compile", str(ckpt), "-o", str(tmp_path / "out"), "--db", str(db)]) == expected
    assert not (tmp_path / "out").exists()
    assert cli_error(capsys, ["tune", str(ckpt), "--db", str(db), "--trials", "1"]) == expected

    (db / RECORDS).write_bytes(b'[0, [[], [1e-4], {}, []]]\n' + second + b"\n")  # JSON, not a record
    with pytest.raises(BmvccError, match=f"^tuning database '{re.escape(str(db))}' is damaged \\(.*; tune into a new --db directory$"):
        tunedb.open_database(db)

    for key in ('{"target": ', '["not", "a", "key"]', '{"target": {}, "models": {"m": {"tasks": [1]}}}'):
        (db / tunedb.KEY_FILE).write_text(key)
        err = cli_error(capsys, ["compile", str(ckpt), "-o", str(tmp_path / "out"), "--db", str(db)])
        assert err.startswith(f"error: '{db / tunedb.KEY_FILE}' is not a bmvcc tuning database key (")


@pytest.mark.slow
def test_tune_leaves_no_process_behind(tmp_path, checkpoint):
    """`bmvcc tune` measuring on this machine, run to the end, then interrupted (SIGINT, what Ctrl-C
    sends) while its builder's workers build the default schedule: afterwards no process it started is
    alive. Its processes are found by an environment variable they inherit, so orphans count too."""
    ckpt, _ = checkpoint(small_config(), seed=3)
    tag_variable, tag = "BMVCC_TEST_TUNE", uuid.uuid4().hex
    env = {**os.environ, tag_variable: tag}

    def tune(db: str) -> list[str]:
        return [sys.executable, "-m", "bmvcc.cli", "tune", str(ckpt), "--db", str(tmp_path / db),
                "--trials", "1", "--per-round", "1", "--task", TASK]

    done = subprocess.run(tune("finished"), env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = re.search(r"whole model: ([\d.]+) us before, ([\d.]+) us after", done.stdout).groups()
    assert 0 < float(before) and 0 < float(after)
    left = leftover_processes(tagged_processes(tag_variable, tag))
    assert not left, describe(left)

    log = tmp_path / "interrupted.log"
    with open(log, "w") as stderr:
        interrupted = subprocess.Popen(tune("interrupted"), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 300
    # the runner's worker and a builder worker are up, building the default schedule
    while "measuring the default schedule" not in log.read_text() or _popen_workers(tag_variable, tag) < 2:
        assert interrupted.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=120) == 130
    assert "error: interrupted by SIGINT; unfinished output was removed, run the command again" in log.read_text()
    left = leftover_processes(tagged_processes(tag_variable, tag))
    assert not left, describe(left)


def _popen_workers(tag_variable: str, tag: str) -> int:
    count = 0
    for p in tagged_processes(tag_variable, tag):
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            count += "tvm.exec.popen_worker" in p.cmdline()
    return count
