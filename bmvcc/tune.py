"""bmvcc tune: MetaSchedule search over the kernels of a compiled model, recorded in a tuning database.

Flow: checkpoint -> Relax -> bmvcc passes -> bmvcc/lowering.py's `fuse` (for a GPU, W2A8 on its padded
compute definition) -> one task per distinct PrimFunc.
bmvcc's own kernels (schedules/w2a8.py's kernel_of) search the space their schedule owner registered in
schedules/tuning_spaces.py (tensorization kept, knobs sampled); every other kernel gets
MetaSchedule's default space.

Selection: a kernel without arithmetic (a reshape or copy: no floating-point or integer operation)
is not a task, and neither is one whose calls take under MIN_SHARE of the model's kernel time (the sum
over its arithmetic kernels of calls x default-schedule latency); `--task` names tasks outright.
Search: evolutionary with the XGBoost cost model, all tasks under MetaSchedule's gradient task
scheduler, which gives each round to the task whose weighted latency is expected to drop most; the
budget is `trials` x tasks.

Resume: MetaSchedule's search does not count what a database already holds (it seeds its population
from it, nothing more), so a run measures only the budget minus the tasks' records in the database,
failed ones included. Default latencies are recorded in the key, so a run killed and restarted with
the same --db selects the same tasks and measures only what is missing.

Measurement: locally for a target this machine can run, otherwise through an RPC tracker; builds are
always made here (cross-compiled for remote devices) and shipped as shared libraries, so a device needs
only the TVM runtime. All servers under the key measure in parallel; a device that dies mid-run makes
its candidates fail (recorded as failed), and the run goes on with the others.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BmvccError

BUILD_TIMEOUT_S = 300  # a cold builder worker plus an LLVM build of one fused kernel on a busy 2-core machine
RUN_TIMEOUT_S = 60  # one candidate on a device, including the RPC session; a dead device fails after this
POPULATION = 128  # evolutionary population: MetaSchedule's 512 costs minutes of cost-model time per round on 2 cores
MIN_SHARE = 0.10  # a kernel under this share of the model's kernel time is not worth a task: it bounds the gain
MODEL_REPEATS, MODEL_MIN_REPEAT_MS = 20, 50  # whole-model timing: the fastest of 20 repeats of at least 50 ms each


@dataclass(frozen=True)
class TuneOptions:
    target: str = "host"
    trials: int = 64  # per task on average (budget: trials x tasks), counted over all runs into the same database
    batch: int | None = None  # None: 1, or an ONNX model's own static batch (as compile)
    heads: int | None = None
    image_size: int | None = None
    trust_pickle: bool = False
    rpc_tracker: str | None = None  # "HOST:PORT"
    rpc_key: str | None = None
    tasks: tuple[str, ...] = ()  # only these task names (default: all)
    per_round: int = 8  # candidates built and measured per search round; records are saved after each
    seed: int = 0


@dataclass
class TaskResult:
    name: str
    kind: str  # "bmvcc:<kernel>" or "default space"
    weight: int  # how often the model calls it
    default_us: float | None  # its schedule before tuning, measured like the candidates
    best_us: float | None  # best valid record in the database
    trials: int  # records in the database (all runs)
    failed: int  # of which failed to build or run
    measured_now: int  # trials this run measured
    error: str | None = None  # why this run's last failed candidate failed (one line; full log in DB/logs/)

    @property
    def speedup(self) -> float | None:
        return self.default_us / self.best_us if self.default_us and self.best_us else None


@dataclass
class TuneReport:
    db: Path
    target: str
    devices: str
    tasks: list[TaskResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # kernel -> why it is not a task
    model_us: tuple[float, float] | None = None  # whole model before and after (as compile --db builds it)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        rows = [{**vars(t), "speedup": t.speedup} for t in self.tasks]
        before, after = self.model_us or (None, None)
        return {"db": str(self.db), "target": self.target, "devices": self.devices,
                "seconds": round(self.seconds, 1), "tasks": rows, "skipped": self.skipped,
                "model_us_before": before, "model_us_after": after}

    def table(self) -> str:
        head = f"{'task':<52} {'kind':<24} {'default us':>11} {'tuned us':>10} {'speedup':>8} {'trials':>7} {'failed':>6}"
        lines = [head, "-" * len(head)]
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        for t in self.tasks:
            lines.append(f"{t.name[:52]:<52} {t.kind[:24]:<24} {fmt(t.default_us, '11.1f'):>11} "
                         f"{fmt(t.best_us, '10.1f'):>10} {fmt(t.speedup, '7.2f') + ('x' if t.speedup else ''):>8} "
                         f"{t.trials:>7} {t.failed:>6}")
        lines += [f"{t.name}: {t.failed} of {t.trials} failed; last: {t.error}" for t in self.tasks if t.error]
        if self.skipped:
            lines.append(skipped_line(self.skipped))
        if self.model_us:
            before, after = self.model_us
            lines.append(f"whole model: {before:.1f} us before, {after:.1f} us after ({before / after:.2f}x; "
                         "as bmvcc compile builds it without and with --db)")
        else:
            lines.append("whole model: not timed on a remote device; bmvcc compile --db, then bmvcc bench --rpc-tracker")
        return "\n".join(lines)


def skipped_line(skipped: dict[str, str]) -> str:
    """One line counting the kernels that are not tasks, by reason."""
    reasons: dict[str, int] = {}
    for why in skipped.values():
        reasons[why] = reasons.get(why, 0) + 1
    return f"skipped {len(skipped)} kernels: " + ", ".join(f"{n} {why}" for why, n in reasons.items())


# ---- measurement: builder and runners -------------------------------------------------------------

def _build(mod, target, _params):
    """Builder worker: TVM's default build minus its import of every tensor intrinsic (~40-60 s here),
    with cp.async enabled for a GPU as in `bmvcc compile` (bmvcc/gpu_build.py).

    Candidates arrive already tensorized, so the intrinsics need not be registered in the worker.
    """
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .gpu_build import PASS_CONFIG
    from .schedules.norm_quant import vectorizable_nearbyint

    vectorizable_nearbyint()  # as in the compiling process, or the norm_quant candidates measure scalar code
    with tvm.transform.PassContext(config=PASS_CONFIG if target.kind.name == "cuda" else {}):
        return tvm.compile(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export(cross_compiler: str | None, arch: str | None, rt_mod) -> str:
    """Builder worker: a shared library, linked here (targets/cross.py for another CPU), so the device
    needs only the TVM runtime to load it. For a GPU (`arch`, e.g. "sm_87") the device code is compiled
    here to a cubin and embedded as in `bmvcc compile` (targets/cuda_export.py): TVM would embed CUDA source,
    which a runtime-only device cannot compile."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="bmvcc-tune-"), "candidate.so")
    options = {}
    if cross_compiler is not None:
        from .targets import cross

        options["fcompile"] = cross.fcompile(cross_compiler)
    if arch is not None:
        from .targets import cuda_export

        source, cubin = cuda_export.compile_device(rt_mod, arch)
        options["fpack_imports"] = cuda_export.pack_imports(source, cubin.data)
    rt_mod.export_library(path, **options)
    return path


def _builder(spec):
    from tvm.s_tir import meta_schedule as ms

    arch = spec.facts["arch"] if spec.device == "cuda" else None
    return ms.builder.LocalBuilder(max_workers=max(1, len(os.sched_getaffinity(0))), timeout_sec=BUILD_TIMEOUT_S,
                                   f_build=_build, f_export=functools.partial(_export, spec.cross_compiler, arch))


def _evaluator():
    from tvm.s_tir import meta_schedule as ms

    # min_repeat_ms: a few-microsecond kernel is repeated until one measurement lasts 20 ms (timer noise)
    return ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)


def parse_tracker(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BmvccError(f"--rpc-tracker '{address}' is not HOST:PORT; e.g. --rpc-tracker 127.0.0.1:9190")
    return host, int(port)


def tracker_devices(address: str, key: str) -> int:
    """How many servers are registered under `key`; raises BmvccError when none or when unreachable."""
    from tvm import rpc

    host, port = parse_tracker(address)
    try:  # connect_tracker itself retries for 60 s; fail fast on a wrong address
        socket.create_connection((host, port), timeout=5).close()
        summary = rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError) as e:
        raise BmvccError(f"RPC tracker {address} is unreachable ({e.__class__.__name__}: {e}); start it with "
                         f"python -m tvm.exec.rpc_tracker --host {host} --port {port}, or fix --rpc-tracker") from None
    keys = [item["key"].split(":", 1)[-1] for item in summary.get("server_info", [])]
    count = keys.count(key)
    if count == 0:
        known = ", ".join(sorted(set(keys))) or "none"
        raise BmvccError(f"no device is registered under key '{key}' at tracker {address} (keys there: {known}); "
                         f"start one with python -m tvm.exec.rpc_server --tracker {address} --key {key}, or fix --rpc-key")
    return count


def _add_deadline(runner, workers: int) -> None:
    """Give the RPC runner's worker pool a timeout. MetaSchedule 0.27 creates it without one, so a device
    that hangs (still registered at the tracker, never answering) blocks the whole run; with a timeout
    the worker is killed, RPCRunnerFuture turns the TimeoutError into a failed result, and the run
    goes on with the other devices."""
    from tvm.support.popen_pool import PopenPoolExecutor

    inner = runner._inst  # the Python RPCRunner behind MetaSchedule's derived-object wrapper
    inner.pool.shutdown(wait=False)
    inner.pool = PopenPoolExecutor(max_workers=workers, timeout=RUN_TIMEOUT_S)


@contextlib.contextmanager
def _closing_worker_pools():
    """Within the block, MetaSchedule's builder and runner pools start TVM popen_worker processes (the
    runner's pool lives until its workers are killed; a builder pool interrupted by an error or Ctrl-C
    is never shut down). When the block ends, however it ends, every popen_worker this process
    started in it is killed with its own children: a `bmvcc tune` that ends leaves no process behind."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    try:
        yield
    finally:
        for worker in me.children():
            try:
                if worker.pid in before or "tvm.exec.popen_worker" not in worker.cmdline():
                    continue
                for p in [*worker.children(recursive=True), worker]:
                    p.kill()
                worker.wait(timeout=10)
            except psutil.Error:  # exited meanwhile
                pass


def _runner(spec, options: TuneOptions):
    """(runner, description of where candidates run)."""
    from tvm.s_tir import meta_schedule as ms

    if options.rpc_tracker:  # and rpc_key: tune_model checked that both or neither are given
        n = tracker_devices(options.rpc_tracker, options.rpc_key)
        host, port = parse_tracker(options.rpc_tracker)
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=options.rpc_key,
                                     session_timeout_sec=RUN_TIMEOUT_S)
        runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=_evaluator(), max_workers=n)
        _add_deadline(runner, n)
        return runner, f"{n} device(s) under key '{options.rpc_key}' at {options.rpc_tracker}"
    if spec.device != "cpu" or spec.arch != platform.machine():
        raise BmvccError(f"target '{spec.name}' runs on another machine; measure on it through an RPC tracker with "
                         f"--rpc-tracker HOST:PORT --rpc-key KEY (see the README, tuning section)")
    return ms.runner.LocalRunner(evaluator_config=_evaluator(), timeout_sec=RUN_TIMEOUT_S), "this machine"


def _default_schedule(defaults, name: str, task_mod):
    """The task's PrimFunc as bmvcc compile schedules it without a database, as a one-function module."""
    import tvm

    func = defaults[name] if any(gv.name_hint == name for gv in defaults.functions) else task_mod["main"]
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _measure_defaults(mods: list, target, builder, runner) -> list[float | None]:
    """Seconds of each one-PrimFunc module (None where it failed), built in parallel and measured like
    candidates."""
    from tvm.s_tir import meta_schedule as ms

    built = list(builder.build([ms.builder.BuilderInput(mod, target) for mod in mods]))
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    ok = [i for i, b in enumerate(built) if not b.error_msg]
    seconds: list[float | None] = [None] * len(mods)
    try:
        futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device,
                                                    ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"])) for i in ok])
        for i, future in zip(ok, futures):
            r = future.result()
            if not r.error_msg and r.run_secs:
                seconds[i] = sum(map(float, r.run_secs)) / len(r.run_secs)
    finally:
        for i in ok:
            ms.utils.remove_build_dir(built[i].artifact_path)
    return seconds


def has_arithmetic(mod) -> bool:
    """Whether the one-PrimFunc module computes anything (a reshape, transpose or copy does not)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    return estimate_tir_flops(mod) > 0


def select_tasks(kernels: dict[str, tuple[bool, int, float | None]],
                 min_share: float = MIN_SHARE) -> tuple[list[str], dict[str, str]]:
    """(names worth tuning, {name: why not}) of kernels given as name -> (has arithmetic, calls per
    model, default latency or None when it could not be measured). A kernel's share is its calls x
    latency over the sum of that over every measured arithmetic kernel; an unmeasured one is kept."""
    times = {n: calls * us for n, (arith, calls, us) in kernels.items() if arith and us is not None}
    total = sum(times.values())
    chosen, skipped = [], {}
    for name, (arith, _, _) in kernels.items():
        if not arith:
            skipped[name] = "without arithmetic (reshapes, copies)"
        elif name in times and times[name] < min_share * total:
            skipped[name] = f"each under {min_share:.0%} of the model's kernel time"
        else:
            chosen.append(name)
    return chosen, skipped


def _model_us(mod, weights, target) -> float:
    """Microseconds of one call of a scheduled Relax module (what bmvcc compile builds), built here and
    timed on this machine: the fastest of MODEL_REPEATS repeats, each of at least MODEL_MIN_REPEAT_MS,
    as the least disturbed by other processes (on a shared machine the median moves by 20%)."""
    import numpy as np
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    shape = [int(d) for d in mod["main"].params[0].ty.shape]
    x = tvm.runtime.tensor(np.random.default_rng(0).uniform(-1, 1, shape).astype("float32"))
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=MODEL_REPEATS, min_repeat_ms=MODEL_MIN_REPEAT_MS)
    return float(timer(x, *weights).min) * 1e6


# ---- tasks, spaces and the database ---------------------------------------------------------------

def _space(mod, target):
    """(space generator or None when the kernel keeps its hand schedule, kind label)."""
    from .schedules.tuning_spaces import has_space, space_for
    from .schedules.w2a8 import kernel_of

    kernel = kernel_of(mod["main"])
    if kernel is None:
        return "post-order-apply", "default space"
    if not has_space(kernel, target):
        return None, f"bmvcc:{kernel} (hand)"
    return space_for(kernel, target), f"bmvcc:{kernel}"


def _fused_and_defaults(mod, spec):
    """(bmvcc's Relax module after bmvcc/lowering.py's `fuse`, whose PrimFuncs are the tasks; the same
    module after its `schedule`, as `bmvcc compile` schedules it without a database)."""
    from . import lowering

    with lowering.pass_context(spec):
        fused = lowering.fuse(mod, spec)
        return fused.mod, lowering.schedule(fused, spec).mod


_CPU_INTRINSICS = {"x86_64": "x86", "aarch64": "arm_cpu"}  # the tvm.s_tir.tensor_intrin module of a CPU's default space


def _context_imports(target, arch: str):
    """What a TuneContext for `target` is created within: without TVM's import of every target's
    intrinsics (one to three minutes on 2 cores, mostly CUDA's). For CUDA, schedules/wmma_intrinsics.py;
    for a CPU, only the module of its ISA, which its default space's dot-product rules name (about 1 s
    for x86). bmvcc's own spaces register their own intrinsics."""
    if target.kind.name == "cuda":
        from .schedules.wmma_intrinsics import metaschedule_cuda

        return metaschedule_cuda()
    if arch not in _CPU_INTRINSICS:
        return contextlib.nullcontext()
    return _intrinsics_of(_CPU_INTRINSICS[arch])


@contextlib.contextmanager
def _intrinsics_of(module: str):
    """Within: `import tvm.s_tir.tensor_intrin` (what TuneContext does) gets a stand-in package that has
    imported only `module` of it; the real package is untouched when it was imported already."""
    import importlib
    import types

    import tvm.s_tir

    package = "tvm.s_tir.tensor_intrin"
    if package in sys.modules:
        yield
        return
    stand_in = sys.modules[package] = types.ModuleType(package)
    stand_in.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    try:
        importlib.import_module(f"{package}.{module}")
        yield
    finally:
        if sys.modules.get(package) is stand_in:
            del sys.modules[package]


def _records(db, mod) -> list:
    """All records of this task's workload, failed ones included."""
    from .tunedb import workload_id

    wid = workload_id(mod)
    return [r for r in db.get_all_tuning_records() if workload_id(r.workload.mod) == wid]


def _seconds(record) -> float | None:
    secs = [float(s) for s in record.run_secs] if record.run_secs is not None else []
    return sum(secs) / len(secs) if secs and max(secs) < 1e9 else None  # MetaSchedule writes 1e10 for failures


def _failure(message: str) -> str:
    """The one line that says why a candidate failed: the last line of the error before the IR that
    MetaSchedule appends (a build's or the device's exception message)."""
    lines = [line.strip() for line in message.split("\n# from tvm.script")[0].splitlines() if line.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _progress_callback(on_batch: Callable[[int, int, int, str | None], None]):
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            errors = [f"build: {_failure(b.error_msg)}" if b.error_msg else f"run: {_failure(r.error_msg)}"
                      for b, r in zip(builder_results, runner_results) if b.error_msg or r.error_msg]
            on_batch(task_id, len(measure_candidates), len(errors), errors[-1] if errors else None)

    return _Progress()


def _quiet_console() -> None:
    """MetaSchedule's full log goes to DIR/logs/; keep only its warnings on the console, beside the bars."""
    import logging

    for handler in logging.getLogger("tvm.s_tir.meta_schedule").handlers:
        if type(handler) is logging.StreamHandler:  # noqa: E721 (FileHandler subclasses it)
            handler.setLevel(logging.WARNING)


class _Bar:
    """A progress bar on stderr: trials done of the budget, failures, elapsed."""

    def __init__(self, label: str, done: int, total: int, stream=sys.stderr):
        self.label, self.done, self.total, self.failed, self.stream = label, done, total, 0, stream
        self.start = time.perf_counter()
        self._draw()

    def advance(self, n: int, failed: int) -> None:
        self.done, self.failed = self.done + n, self.failed + failed
        self._draw()

    def _draw(self, end: str = "") -> None:
        width = 24
        filled = width * min(self.done, self.total) // max(self.total, 1)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
                          f" trials, {self.failed} failed, {time.perf_counter() - self.start:.0f} s{end}")
        self.stream.flush()

    def close(self) -> None:
        self._draw("\n")


@_closing_worker_pools()
def tune_model(source_path: Path, db_dir: Path, options: TuneOptions,
               progress: Callable[[str], None] = lambda msg: None, bars: bool = True) -> TuneReport:
    from . import tunedb
    from .sources import check_source
    from .targets import get as get_target

    if options.trials < 1 or options.per_round < 1:
        raise BmvccError(f"--trials {options.trials} and --per-round {options.per_round} must be at least 1")
    if bool(options.rpc_tracker) != bool(options.rpc_key):
        raise BmvccError("--rpc-tracker and --rpc-key go together; give both (or neither, to measure on this machine)")
    if options.rpc_tracker:
        parse_tracker(options.rpc_tracker)  # HOST:PORT, before the tracker is asked
    start = time.perf_counter()
    spec = get_target(options.target)
    db_dir = tunedb.check_tuning_dir(db_dir)
    check_source(source_path, options.heads)  # before the seconds importing torch and TVM take
    from . import frontend
    from .artifact import sha256
    from .passes.pipeline import run_pipeline

    runner, devices = _runner(spec, options)  # fail fast on RPC problems, before minutes of work
    progress(f"loading {source_path}")
    source = frontend.load_source(Path(source_path), heads=options.heads, image_size=options.image_size,
                                  trust_pickle=options.trust_pickle)
    batch = frontend.resolve_batch(source, options.batch, progress)
    progress("importing into Relax and running bmvcc passes")
    relax_mod, weights, _ = run_pipeline(frontend.to_relax(source, batch), spec)
    target = spec.target()
    mod, defaults = _fused_and_defaults(relax_mod, spec)

    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, target)
    known = {t.task_name for t in tasks}
    unknown = [n for n in options.tasks if n not in known]
    if unknown:
        raise BmvccError(f"--task {unknown[0]} is not a task of this model; its tasks are: {', '.join(sorted(known))}")
    if options.tasks:
        tasks = [t for t in tasks if t.task_name in options.tasks]
    tables, key = tunedb.open_for_tuning(db_dir, spec, progress)
    db = tables.db
    model_id = f"{sha256(source.path)}:batch{batch}"
    model_entry = key["models"].setdefault(model_id, {"source": source.path.name, "batch": batch, "tasks": {}})
    builder = _builder(spec)
    report = TuneReport(db_dir, spec.name, devices)

    arithmetic = {t.task_name: has_arithmetic(t.dispatched[0]) for t in tasks}
    spaces = {t.task_name: _space(t.dispatched[0], target) for t in tasks}  # (generator or None, kind)
    entries = {t.task_name: model_entry["tasks"].setdefault(t.task_name, {
        "kind": spaces[t.task_name][1], "weight": int(t.weight), "workload": tunedb.workload_id(t.dispatched[0])})
        for t in tasks if arithmetic[t.task_name] or options.tasks}
    unmeasured = [t for t in tasks if t.task_name in entries and "default_us" not in entries[t.task_name]]
    if unmeasured:
        progress(f"measuring the default schedules of {len(unmeasured)} kernels on {devices}")
        seconds = _measure_defaults([_default_schedule(defaults, t.task_name, t.dispatched[0]) for t in unmeasured],
                                    target, builder, runner)
        for t, sec in zip(unmeasured, seconds):
            entries[t.task_name]["default_us"] = sec * 1e6 if sec else None
        tunedb.write_key(db_dir, key)
    if not options.tasks:  # the defaults are recorded: a resumed run selects the same tasks
        chosen, report.skipped = select_tasks({t.task_name: (arithmetic[t.task_name], int(t.weight),
                                                             entries.get(t.task_name, {}).get("default_us"))
                                               for t in tasks})
        tasks = [t for t in tasks if t.task_name in chosen]
    searched = [t for t in tasks if spaces[t.task_name][0] is not None]
    recorded = {t.task_name: len(_records(db, t.dispatched[0])) for t in tasks}
    budget = options.trials * len(searched)
    remaining = max(0, budget - sum(recorded[t.task_name] for t in searched))
    progress(f"{len(tasks)} tasks for {spec.name}" + (f" ({skipped_line(report.skipped)})" if report.skipped else "")
             + f"; {options.trials} trials x {len(searched)} searched = {budget}, {remaining} to measure, on {devices};"
             f" database {db_dir}")

    last_error: dict[str, str] = {}  # task -> why its last failed candidate failed
    if remaining:
        with contextlib.redirect_stdout(sys.stderr):  # its console handler binds to sys.stdout: keep stdout for results
            loggers = ms.logging.get_loggers_from_work_dir(str(db_dir), [t.task_name for t in searched])
        _quiet_console()
        with _context_imports(target, spec.arch):
            contexts = [ms.TuneContext(mod=t.dispatched[0], target=target, space_generator=spaces[t.task_name][0],
                                       search_strategy=ms.search_strategy.EvolutionarySearch(population_size=POPULATION),
                                       task_name=t.task_name, logger=logger,
                                       rand_state=options.seed + recorded[t.task_name],  # a resumed run explores new samples
                                       num_threads=max(1, len(os.sched_getaffinity(0))))
                        for t, logger in zip(searched, loggers)]
        bar = _Bar(f"tuning {len(searched)} tasks", budget - remaining, budget) if bars else None

        def on_batch(task_id: int, n: int, failed: int, error: str | None) -> None:
            tables.save()  # the round's records, committed to the scratch tables just before
            if error:
                last_error[searched[task_id].task_name] = error
            if bar:
                bar.advance(n, failed)

        ms.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in searched], work_dir=str(db_dir),
                      max_trials_global=remaining, max_trials_per_task=remaining,
                      num_trials_per_iter=min(options.per_round, remaining), builder=builder, runner=runner,
                      database=db, cost_model=ms.cost_model.XGBModel(
                          extractor=ms.feature_extractor.PerStoreFeature(), adaptive_training=True),
                      measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                         _progress_callback(on_batch)],
                      task_scheduler=ms.task_scheduler.GradientBased(seed=options.seed))
        if bar:
            bar.close()
    for t in tasks:
        entry, records = entries[t.task_name], _records(db, t.dispatched[0])
        times = [s for s in map(_seconds, records) if s is not None]
        entry["best_us"] = min(times) * 1e6 if times else None
        report.tasks.append(TaskResult(t.task_name, entry["kind"], int(t.weight), entry["default_us"], entry["best_us"],
                                       len(records), len(records) - len(times), len(records) - recorded[t.task_name],
                                       last_error.get(t.task_name)))
    tunedb.write_key(db_dir, key)  # compile --db applies a task's records only if they beat its default
    if not (options.rpc_tracker or options.rpc_key):
        progress("timing the whole model as bmvcc compile builds it, without and with the database")
        from .schedules.cpu_default import schedule_cpu_module

        tuned, _ = tunedb.apply_database(relax_mod, spec, db_dir)
        report.model_us = (_model_us(defaults, weights, target), _model_us(schedule_cpu_module(tuned, target), weights, target))
    report.seconds = time.perf_counter() - start
    return report
