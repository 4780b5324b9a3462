"""bmvcc bench: latency and throughput of an artifact, on this machine or on a device over TVM RPC.

Both paths time the same thing with TVM's time evaluator (inside the runtime, so no Python or
network overhead is counted): one call of the VM's `main` on a fixed random input with the weights
already on the device, after one untimed warm-up call; `repeat` samples of one call each.
"""

from __future__ import annotations

import platform
import socket
from pathlib import Path

import numpy as np

from . import artifact
from .errors import BmvccError


def parse_tracker(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BmvccError(f"--rpc-tracker '{address}' is not HOST:PORT; e.g. --rpc-tracker 127.0.0.1:9190")
    return host, int(port)


def bench(outdir: Path, repeat: int = 50, tracker: str | None = None, key: str | None = None,
          session_timeout: int = 600) -> dict:
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
        session, where, lib = None, "host", tvm.runtime.load_module(str(outdir / artifact.MODULE))
    else:
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
    samples = np.array(timer("main").results) * 1e3  # ms, one call each
    batch = shape[0]
    return {"artifact": str(outdir), "where": where, "target": target["name"], "batch": batch, "repeat": repeat,
            "latency_ms": {"min": float(samples.min()), "p50": float(np.percentile(samples, 50)),
                           "p90": float(np.percentile(samples, 90))},
            "throughput_images_per_s": float(batch / (np.median(samples) / 1e3))}


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
    return (f"{result['artifact']} on {result['where']} (target {result['target']}, batch {result['batch']}, "
            f"{result['repeat']} runs): latency min {lat['min']:.3f} ms, p50 {lat['p50']:.3f} ms, "
            f"p90 {lat['p90']:.3f} ms; throughput {result['throughput_images_per_s']:.1f} images/s")
