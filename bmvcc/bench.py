"""bmvcc bench: latency and throughput of an artifact, on this machine or on a device over TVM RPC.

Both paths time the same thing with TVM's time evaluator (inside the runtime, so no Python or
network overhead is counted): one call of the VM's `main` on a fixed random input with the weights
already on the device, after one untimed warm-up call; `repeat` samples of one call each.

With `profile`, each kernel's share of one call comes from the Relax VM's instrument hook (TVM
0.27 has no VM profiler): it is called before and after every call instruction, and the wall time
between the two is the kernel's (CPU kernels run synchronously), the mean over `repeat` calls.
The hook cannot cross RPC, so on a device the calls are recorded by running the artifact here
(same module, same shapes) and each kernel is run alone there and timed here (each sample then
holds one network round trip: on a LAN a fraction of a millisecond).
"""

from __future__ import annotations

import math
import os
import platform
import re
import socket
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import artifact
from .errors import BmvccError, amx_refusal
from .runtime import check_cpu_features, cpuinfo_flags, missing_cpu_features
from .targets.cpu import machine_runs_amx


def parse_tracker(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BmvccError(f"--rpc-tracker '{address}' is not HOST:PORT; e.g. --rpc-tracker 127.0.0.1:9190")
    return host, int(port)


def bench(outdir: Path, repeat: int = 50, tracker: str | None = None, key: str | None = None,
          session_timeout: int = 600, profile: bool = False) -> dict:
    meta = artifact.read_metadata(outdir)
    if repeat < 1:
        raise BmvccError(f"--repeat {repeat} must be at least 1")
    if (tracker is None) != (key is None):
        raise BmvccError("--rpc-tracker and --rpc-key go together; pass both to bench on a device, neither for this machine")
    import tvm
    from tvm import relax

    outdir = Path(outdir)
    target = meta["target"]
    if tracker is None:
        if target["arch"] != platform.machine():
            raise BmvccError(f"'{outdir}' was compiled for {target['arch']}; bench it on the device with "
                             "--rpc-tracker HOST:PORT --rpc-key KEY")
        check_cpu_features(target, cpuinfo_flags())
        session, where, lib = None, "host", tvm.runtime.load_module(str(outdir / artifact.MODULE))
    else:
        if profile:
            _check_profile_here(target)  # before the device's work
        session = _connect(tracker, key, session_timeout)
        where = f"rpc:{key}@{tracker}"
        session.upload(str(outdir / artifact.MODULE), "bmvcc_model.so")
        lib = session.load_module("bmvcc_model.so")
    dev = (session.device(target["device"]) if session else tvm.device(target["device"]))
    vm = relax.VirtualMachine(lib, dev)
    params = tvm.runtime.load_param_dict_from_file(str(outdir / artifact.WEIGHTS))
    artifact.check_weights(params, meta, outdir)
    weights = [tvm.runtime.tensor(params[f"w{i}"].numpy(), dev) for i in range(meta["num_weights"])]
    shape = meta["input"]["shape"]
    x = np.random.default_rng(0).standard_normal(shape).astype(meta["input"]["dtype"])
    vm.set_input("main", tvm.runtime.tensor(x, dev), *weights)
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat, min_repeat_ms=0)
    with amx_refusal(None if session is None else where):
        samples = np.array(timer("main").results) * 1e3  # ms, one call each
    batch = shape[0]
    result = {"artifact": str(outdir), "where": where, "target": target["name"], "batch": batch, "repeat": repeat,
              "latency_ms": {"min": float(samples.min()), "p50": float(np.percentile(samples, 50)),
                             "p90": float(np.percentile(samples, 90))},
              "throughput_images_per_s": float(batch / (np.median(samples) / 1e3))}
    if profile:
        if session is None:
            calls = _record(vm, dev, repeat)
        else:  # TVM cannot pass the instrument callback over RPC: record here, time each kernel there
            calls = _time_remotely(_record_locally(outdir, target, meta, x, params), lib, dev, repeat)
        peak = _host_peak(target) if session is None else None
        runs = repeat if session is None else 1
        result["profile"] = {"peak": peak.describe() if peak else None, "kernels": _kernel_table(calls, runs, peak),
                             "peak_ops_per_s": {"int8": peak.int8_ops_per_s(), "fp32": peak.fp32_ops_per_s()} if peak else {}}
    return result


def plot(result: dict, path: Path):
    """Writes a profiled bench `result` as a roofline chart of measured times beside a bar of where the
    time goes (bmvcc/roofline_plot.py; compute roofs from targets/cpu_peak.py, no memory roof: bmvcc has
    no bandwidth facts for CPUs); returns the matplotlib Figure."""
    from .roofline_plot import plot_roofline

    kernels = []
    for k in result["profile"]["kernels"]:
        seconds = k["ms"] / 1e3 / max(k["calls"], 1)  # per call
        kernels.append({"name": k["name"], "calls": k["calls"], "seconds": seconds,
                        "ops": k["gop_per_s"] * 1e9 * seconds if "gop_per_s" in k else None,
                        "bytes": k["gb_per_s"] * 1e9 * seconds if "gb_per_s" in k else None, "unit": k.get("ops_kind")})
    title = (f"{Path(result['artifact']).name} (batch {result['batch']}) on {result['target']} ({result['where']}): "
             f"measured times, {result['repeat']} runs")
    return plot_roofline(kernels, {"compute": result["profile"]["peak_ops_per_s"], "memory": {}}, title, path)


def _record(vm, dev, repeat: int) -> list[tuple[str, float, list]]:
    """(symbol, seconds, [(shape, dtype) of each tensor argument]) of every VM call in `repeat` calls of `main`."""
    calls, started = [], [0.0]

    def instrument(func, symbol, before, ret, *args):
        dev.sync()  # a GPU kernel is only launched by its call: wait for it (a no-op on the CPU)
        now = time.perf_counter()
        if before:
            started[0] = now
        else:
            calls.append((symbol, now - started[0],
                          [(tuple(a.shape), str(a.dtype)) for a in args if hasattr(a, "shape") and hasattr(a, "dtype")]))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    vm.set_instrument(instrument)
    for _ in range(repeat):
        vm.invoke_stateful("main")
    vm.set_instrument(None)
    return calls


def _check_profile_here(target: dict) -> None:
    """--profile over RPC records the kernel calls on this machine: a BmvccError where it cannot run the artifact."""
    if target["arch"] != platform.machine():
        why = f"which cannot run a {target['arch']} artifact"
    elif _runs_amx(target) and not machine_runs_amx():
        why = "which cannot run the artifact's AMX kernels"
    elif lacking := missing_cpu_features(target, cpuinfo_flags()):
        why = f"whose CPU lacks {', '.join(lacking)} (used by the artifact)"
    else:
        return
    raise BmvccError(f"--profile over RPC records the kernel calls on this machine, {why}; run bmvcc bench --profile "
                     "on the device itself")


def _record_locally(outdir: Path, target: dict, meta: dict, x: np.ndarray, params) -> list:
    """The call sequence of one call of `main` run on this machine (same module, same shapes)."""
    import tvm
    from tvm import relax

    _check_profile_here(target)
    dev = tvm.device(target["device"])
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / artifact.MODULE)), dev)
    weights = [tvm.runtime.tensor(params[f"w{i}"].numpy(), dev) for i in range(meta["num_weights"])]
    vm.set_input("main", tvm.runtime.tensor(x, dev), *weights)
    return _record(vm, dev, 1)


def _time_remotely(calls: list, lib, dev, repeat: int) -> list:
    """Each kernel call run alone on the device `repeat` times on zero-filled arguments of the recorded shapes,
    timed here: every sample holds one network round trip (TVM's time evaluator cannot reach the VM's kernels)."""
    import tvm

    timed, cache = [], {}
    for symbol, _, shapes in calls:
        if symbol.startswith("vm.builtin."):
            continue
        key = (symbol, tuple(shapes))
        if key not in cache:
            kernel = lib.get_function(symbol, query_imports=True)
            args = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in shapes]
            kernel(*args)  # warm-up
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                kernel(*args)
                dev.sync()
                samples.append(time.perf_counter() - t0)
            cache[key] = float(np.median(samples))
        timed.append((symbol, cache[key], shapes))
    return timed


def _kernel_table(calls: list, runs: int, peak) -> list[dict]:
    """Per kernel (VM call symbol): calls and ms in one call of `main` (`calls` spans `runs` calls), %, GB/s, GOP/s."""
    count, seconds, ops, nbytes = defaultdict(int), defaultdict(float), defaultdict(float), defaultdict(float)
    kinds = {}
    for symbol, s, shapes in calls:
        count[symbol] += 1
        seconds[symbol] += s
        n, kinds[symbol] = _ops(symbol, shapes)
        ops[symbol] += n
        nbytes[symbol] += sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in shapes)
    total = sum(seconds.values())
    rows = []
    for symbol in sorted(seconds, key=seconds.get, reverse=True):
        s = seconds[symbol]
        row = {"name": symbol, "calls": count[symbol] // runs, "ms": 1e3 * s / runs, "percent": 100 * s / total}
        if not symbol.startswith("vm.builtin."):  # the VM's own bookkeeping moves no tensor data
            row["gb_per_s"] = nbytes[symbol] / s / 1e9  # every argument's bytes once: what the kernel must read or write
        kind = kinds[symbol]
        if ops[symbol]:
            row.update({"ops_kind": kind, "gop_per_s": ops[symbol] / s / 1e9})
            if peak is not None:
                rate = {"int8": peak.int8_ops_per_s, "bf16": peak.bf16_ops_per_s}.get(kind, peak.fp32_ops_per_s)()
                row["percent_of_peak"] = 100 * ops[symbol] / s / rate
        rows.append(row)
    return rows


_W2A8 = re.compile(r"w2a8_(?:tc_)?m(\d+)_n(\d+)_k(\d+)")  # tc: the GPU's tensor-core kernel
# schedules/attention_cpu.py AttentionConfig.name's format; _bf16: on vdpbf16ps
_ATTENTION = re.compile(r"causal_attention_g(\d+)_kv\d+_n(\d+)_d(\d+)(_bf16)?")


def _ops(symbol: str, shapes: list) -> tuple[float, str]:
    """(arithmetic operations of one call, "int8", "bf16" or "fp32") for the kernels with a known op count,
    else (0, "")."""
    if m := _W2A8.search(symbol):
        mm, n, k = map(int, m.groups())
        return 2.0 * mm * n * k, "int8"
    if m := _ATTENTION.search(symbol):  # Q K^T and P V over the causal half (the diagonal included)
        g, n, d = map(int, m.groups()[:3])
        return 2.0 * g * d * n * (n + 1), "bf16" if m.group(4) else "fp32"
    if "matmul" in symbol:  # A[.., K] x B -> out (the last argument): 2 K operations per output
        kind = "bf16" if shapes and shapes[0][1] == "bfloat16" else "fp32"  # --float-precision bf16: vdpbf16ps
        return (2.0 * shapes[0][0][-1] * math.prod(shapes[-1][0]) if shapes else 0.0), kind
    return 0.0, ""


def _host_peak(target: dict):
    """This machine's peak for an artifact of metadata `target` (targets/cpu_peak.py target_peak)."""
    import tvm

    from .targets.cpu_peak import target_peak

    if target["device"] != "cpu":
        return None
    return target_peak(len(os.sched_getaffinity(0)), tvm.target.Target(target["tvm"]))


def _runs_amx(target: dict) -> bool:
    """Whether the W2A8 kernels of an artifact of metadata `target` run on AMX tiles."""
    import tvm

    from .schedules.w2a8_cpu import uses_amx

    return target["device"] == "cpu" and uses_amx(tvm.target.Target(target["tvm"]))


def _connect(tracker: str, key: str, session_timeout: int):
    from tvm import rpc

    host, port = parse_tracker(tracker)
    try:
        socket.create_connection((host, port), timeout=10).close()  # TVM's client retries for a minute
        client = rpc.connect_tracker(host, port)
        keys = client.summary()["queue_info"]
        if key not in keys:  # a request for an unknown key would wait forever
            raise BmvccError(f"no device with key '{key}' is registered at tracker {tracker} (keys: "
                             f"{', '.join(keys) or 'none'}); start the device's rpc_server with --key {key}")
        return client.request(key, priority=1, session_timeout=session_timeout)
    except (RuntimeError, OSError, TimeoutError) as e:
        raise BmvccError(f"no RPC session for key '{key}' from tracker {tracker} ({str(e).splitlines()[0][:100]}); "
                         "check that the tracker runs and a server registered with that key") from None


def format_text(result: dict) -> str:
    lat = result["latency_ms"]
    text = (f"{result['artifact']} on {result['where']} (target {result['target']}, batch {result['batch']}, "
            f"{result['repeat']} runs): latency min {lat['min']:.3f} ms, p50 {lat['p50']:.3f} ms, "
            f"p90 {lat['p90']:.3f} ms; throughput {result['throughput_images_per_s']:.1f} images/s")
    if "profile" in result:
        text += "\n" + format_profile(result["profile"])
    return text


def format_profile(profile: dict) -> str:
    lines = [f"peak: {profile['peak'] or 'unknown for this CPU (targets/cpu_peak.py)'}",
             f"{'kernel':<56} {'calls':>5} {'ms':>9} {'%':>6} {'GB/s':>7} {'GOP/s':>7} {'% peak':>6}"]
    for k in profile["kernels"]:
        gbs = f"{k['gb_per_s']:7.1f}" if "gb_per_s" in k else " " * 7
        gops = f"{k['gop_per_s']:7.1f}" if "gop_per_s" in k else " " * 7
        pct = f"{k['percent_of_peak']:6.1f}" if "percent_of_peak" in k else ""
        lines.append(f"{k['name'][:56]:<56} {k['calls']:>5} {k['ms']:9.3f} {k['percent']:6.1f} {gbs} {gops} {pct}")
    return "\n".join(lines)
