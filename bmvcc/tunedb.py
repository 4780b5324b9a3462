"""Tuning databases: MetaSchedule's JSON database plus bmvcc's key file, and applying one at compile time.

A database directory holds
    database_workload.json, database_tuning_record.json   MetaSchedule's JSONDatabase (one line per entry)
    bmvcc-db.json                                         the key: which exact target, which models
    logs/                                                 MetaSchedule's per-task search logs

Keying. One directory serves exactly one target: `target_key` (bmvcc target name, TVM target with mcpu,
mtriple, mattr, num-cores, and for LLVM targets the CPU feature list LLVM derives from them) is written on
first use and any other target is refused. So an Orin Nano 8 GB, a 4 GB and each host CPU model never share
records. Inside a directory MetaSchedule keys every record by the structural hash of its task's PrimFunc,
so several models (or batch sizes) of the same target can share a directory: identical kernels share
records and each model only finds its own. bmvcc-db.json lists the models tuned into it (checkpoint
sha256 and batch) with each task's default-schedule latency, for the reports.

Tasks are the PrimFuncs of the module after bmvcc's passes and bmvcc/lowering.py's `fuse` stage;
compile with a database applies it to the same fused module (marking tuned PrimFuncs tirx.is_scheduled)
before the `schedule` stage, whose schedules skip those.

Durability. MetaSchedule's JSONDatabase appends each entry with two unsynchronised writes (the line, then
its newline): a run killed in between leaves a torn line, which the next append would run into. So its
JSONDatabase only ever works on scratch copies of the tables (`_load`), and `bmvcc tune` puts them back
after every round (`TuningTables.save`): each table written whole to a temporary file, fsynced and renamed
over the old one, so a run killed at any moment leaves the tables of its last round. Reading, a torn last
line (a database written by MetaSchedule itself) is dropped with a warning; any other damage is an error.

Shipped databases: SHIPPED_DATABASES/<shipped_name(spec)>/ (package data under schedules/databases/,
its JSON files only) is applied by compile when no --db is given; the folder name carries a hash of
the exact target key, so only that target ever finds it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Callable

from . import schedules
from .errors import BmvccError
from .portable_ir import portable_json

KEY_FILE = "bmvcc-db.json"
TABLES = ("database_workload.json", "database_tuning_record.json")  # MetaSchedule's, one JSON entry per line
FORMAT_VERSION = 1
SHIPPED_DATABASES = Path(schedules.__file__).parent / "databases"


def target_key(spec) -> dict:
    """The exact identity of a target: every field that changes generated code or measured speed."""
    import tvm
    from tvm.target import codegen

    target = spec.target()
    key = {"name": spec.name, "tvm": json.loads(str(target))}
    if target.kind.name == "llvm":
        key["llvm_features"] = sorted(str(f) for f in codegen.llvm_get_cpu_features(target))
    key["tvm_version"] = tvm.__version__.split("+")[0]
    return key


def shipped_name(spec) -> str:
    """The folder of spec's shipped database: its name and the first 12 hex digits of sha256(target key)."""
    digest = hashlib.sha256(json.dumps(target_key(spec), sort_keys=True).encode()).hexdigest()
    return f"{spec.name}-{digest[:12]}"


def shipped_database(spec, root: Path = SHIPPED_DATABASES) -> Path | None:
    """The database shipped for exactly this target under `root`, or None."""
    path = Path(root) / shipped_name(spec)
    return path if (path / KEY_FILE).is_file() else None


def _describe(key: dict) -> str:
    tvm_target = key.get("tvm", {})
    return f"'{key.get('name')}' ({tvm_target.get('mcpu') or tvm_target.get('arch') or tvm_target.get('kind')})"


def read_key(db_dir: Path) -> dict | None:
    path = Path(db_dir) / KEY_FILE
    if not path.is_file():
        return None
    try:
        key = json.loads(path.read_bytes())
        _check_key(key)
    except (OSError, ValueError) as e:
        raise BmvccError(f"'{path}' is not a bmvcc tuning database key ({str(e)[:100]}); point --db at a directory "
                         "made by bmvcc tune") from None
    return key


def _check_key(key) -> None:
    """ValueError unless `key` has the structure bmvcc tune writes (what compile and tune read of it)."""
    if not isinstance(key, dict) or not isinstance(key.get("target"), dict) or not isinstance(key.get("models"), dict):
        raise ValueError("not an object with a target and models")
    for model in key["models"].values():
        tasks = model.get("tasks") if isinstance(model, dict) else None
        if not isinstance(tasks, dict) or not all(
                isinstance(t, dict) and isinstance(t.get("workload"), str)
                and all(t.get(k) is None or type(t[k]) in (int, float) for k in ("default_us", "best_us"))
                for t in tasks.values()):
            raise ValueError("a model's tasks are not as bmvcc tune records them")


def write_key(db_dir: Path, key: dict) -> None:
    _replace(Path(db_dir) / KEY_FILE, json.dumps(key, indent=1, sort_keys=True).encode())


def _replace(path: Path, data: bytes) -> None:
    """`path` holds `data`, or (killed at any moment) its old content: a synced temporary file renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_target(db_dir: Path, spec) -> dict:
    """The directory's key, after refusing a database made for another target."""
    stored = read_key(db_dir)
    if stored is None:
        raise BmvccError(f"'{db_dir}' is not a bmvcc tuning database (no {KEY_FILE}); create it with bmvcc tune --db {db_dir}")
    wanted = target_key(spec)  # imports TVM (seconds): after the check above
    if stored.get("target") != wanted:
        raise BmvccError(f"tuning database '{db_dir}' was made for target {_describe(stored.get('target', {}))}, "
                         f"not {_describe(wanted)} ({_first_difference(stored.get('target', {}), wanted)}); "
                         f"use a database tuned for this target or tune one with bmvcc tune --target {spec.name}")
    return stored


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                return f"{k}.{_first_difference(a[k], b[k])}"
            return f"{k} differs"
    return "same"


def check_tuning_dir(db_dir: Path) -> Path:
    """`db_dir` if bmvcc tune can record into it (new, empty, or a bmvcc database), else the error."""
    db_dir = Path(db_dir)
    if db_dir.exists() and not db_dir.is_dir():
        raise BmvccError(f"--db '{db_dir}' is a file; give a directory (created if missing)")
    if db_dir.is_dir() and read_key(db_dir) is None and any(db_dir.iterdir()):
        raise BmvccError(f"--db '{db_dir}' is a non-empty directory without {KEY_FILE}; give a new or bmvcc-made directory")
    return db_dir


def open_for_tuning(db_dir: Path, spec, progress: Callable[[str], None] = lambda msg: None):
    """(TuningTables, key dict); creates the directory and key, or checks the key of an existing one."""
    db_dir = check_tuning_dir(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)  # JSONDatabase does not create it
    key = read_key(db_dir)
    if key is None:
        key = {"format_version": FORMAT_VERSION, "target": target_key(spec), "models": {}}
        write_key(db_dir, key)
    else:
        key = check_target(db_dir, spec)
    return TuningTables(db_dir, progress), key


class TuningTables:
    """A database directory open for tuning: `db`, MetaSchedule's JSONDatabase on scratch copies of the
    tables; `save()` puts them back (see Durability above). The copies go when this object does."""

    def __init__(self, db_dir: Path, progress: Callable[[str], None] = lambda msg: None):
        self.dir = Path(db_dir)
        self._scratch = Path(tempfile.mkdtemp(prefix="bmvcc-db-"))
        weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self.db = _load(self.dir, self._scratch, progress)

    def save(self) -> None:
        for name in TABLES:
            data = (self._scratch / name).read_bytes()
            _replace(self.dir / name, _portable_workloads(data) if name == TABLES[0] else data)


def _portable_workloads(table: bytes) -> bytes:
    """The workload table with no installation path in it: each line is [structural hash, base64 of
    (uint64 little-endian length, tvm.ir.save_json of the task's module)], and the JSON goes through
    portable_json (the hash does not cover spans, so records still match their workloads)."""
    lines = []
    for line in table.splitlines():
        shash, encoded = json.loads(line)
        text = portable_json(base64.b64decode(encoded)[8:].decode()).encode()
        lines.append(json.dumps([shash, base64.b64encode(struct.pack("<Q", len(text)) + text).decode()]))
    return "".join(line + "\n" for line in lines).encode()


def open_database(db_dir: Path, progress: Callable[[str], None] = lambda msg: None):
    """MetaSchedule's JSONDatabase of the directory, read into memory (for reading: it writes nowhere)."""
    with tempfile.TemporaryDirectory(prefix="bmvcc-db-") as scratch:
        return _load(Path(db_dir), Path(scratch), progress)


def _load(db_dir: Path, scratch: Path, progress: Callable[[str], None]):
    """MetaSchedule's JSONDatabase of checked copies of db_dir's tables, made in `scratch`. It decodes every
    record by replaying its trace, so for a CUDA target bmvcc's intrinsics, which W2A8 traces tensorize
    with, are registered first."""
    from tvm.s_tir import meta_schedule as ms

    for name in TABLES:
        (scratch / name).write_bytes(_checked_lines(db_dir / name, progress))
    key = read_key(db_dir)
    from .schedules.intrinsics import ensure_all

    cuda = key is not None and key.get("target", {}).get("tvm", {}).get("kind") == "cuda"
    ensure_all("w2a8_cuda" if cuda else "w2a8_cpu")  # the intrinsics W2A8 traces tensorize with

    try:
        return ms.database.JSONDatabase(work_dir=str(scratch), module_equality="structural")
    except (RuntimeError, ValueError) as e:  # lines that are JSON but not MetaSchedule entries
        raise BmvccError(f"tuning database '{db_dir}' is damaged ({str(e).strip().splitlines()[0][:120]}); "
                         "tune into a new --db directory") from None


def _checked_lines(path: Path, progress: Callable[[str], None]) -> bytes:
    """A table's content with every line JSON: a torn last line is dropped with a warning (its entry was
    never complete), any other line that is not JSON is an error naming the file."""
    if not path.is_file():
        return b""
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            if number < len(lines):
                raise BmvccError(f"tuning database file '{path}' is damaged at line {number} of {len(lines)}; "
                                 "tune into a new --db directory") from None
            progress(f"warning: '{path}' ends in a torn line (a run killed while writing it); ignoring that entry")
            lines.pop()
    return b"".join(line + b"\n" for line in lines)


def apply_database(mod, spec, db_dir: Path, only_faster: bool = True,
                   progress: Callable[[str], None] = lambda msg: None):
    """A module fused for spec (bmvcc/lowering.py's `fuse`, as `bmvcc tune` made its tasks) -> (the module with
    tuned PrimFuncs marked tirx.is_scheduled, number of kernels from the database). only_faster=False
    applies every task's best record, even one slower than the default schedule."""
    from tvm import relax

    key = check_target(db_dir, spec)
    target = spec.target()
    before = _scheduled(mod)
    db = open_database(db_dir, progress)
    with target, (winning_records(db, key) if only_faster else db):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    return mod, len(_scheduled(mod) - before)


def winning_records(db, key: dict):
    """An in-memory database with the records of the workloads whose best tuned schedule beat bmvcc's
    default one when `bmvcc tune` measured both (a short search can lose to the rule-based schedules)."""
    from tvm.s_tir import meta_schedule as ms

    wins = {entry["workload"] for model in key.get("models", {}).values() for entry in model["tasks"].values()
            if entry.get("best_us") is not None and (entry.get("default_us") is None or entry["best_us"] < entry["default_us"])}
    memory = ms.database.MemoryDatabase()
    for record in db.get_all_tuning_records():
        if workload_id(record.workload.mod) in wins:
            memory.commit_workload(record.workload.mod)
            memory.commit_tuning_record(record)
    return memory


def workload_id(mod) -> str:
    """A task's identity across runs: MetaSchedule's structural hash of its one-function module."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):x}"


def _scheduled(mod) -> set[str]:
    import tvm

    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)}
