"""bmvcc bench: latency and throughput on the host and over a real TVM RPC tracker and server.

Only the shape of the report is checked (no timed assertions): speed belongs to benchmarks/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bmvcc.cli import main
from bmvcc.driver import CompileOptions, compile_model

from conftest import cli_error, small_config


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint):
    path, _ = checkpoint(small_config())
    out = tmp_path_factory.mktemp("bench") / "model"
    compile_model(path, out, CompileOptions(batch=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_device():
    """A real tracker and one server registered as key 'bmvcc-test', on loopback; yields the tracker address."""
    from tvm import rpc

    tracker_port, server_port = free_port(), free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = None
    try:
        deadline = time.monotonic() + 120  # both import tvm: tens of seconds on a loaded 2-core CI machine
        while True:
            try:
                socket.create_connection(("127.0.0.1", tracker_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and tracker.poll() is None, "RPC tracker did not start"
                time.sleep(0.5)
        server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tracker_port}",
                                   "--key", "bmvcc-test", "--host", "127.0.0.1",
                                   "--port", str(server_port), "--port-end", str(server_port + 1)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while "bmvcc-test" not in rpc.connect_tracker("127.0.0.1", tracker_port).summary()["queue_info"]:
            assert time.monotonic() < deadline and server.poll() is None, "RPC server did not register"
            time.sleep(0.5)
        yield f"127.0.0.1:{tracker_port}"
    finally:
        for proc in (server, tracker):  # each runs its server in a popen_worker child: stop the whole group
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def check_report(result: dict, repeat: int, batch: int) -> None:
    lat = result["latency_ms"]
    assert result["repeat"] == repeat and result["batch"] == batch
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"]
    assert result["throughput_images_per_s"] == pytest.approx(batch / (lat["p50"] / 1e3), rel=1e-9)


def check_profile(result: dict, built) -> None:
    """Every BitLinear layer shows up as one W2A8 call with an int8 op rate; the shares add up to the call."""
    import math

    from bmvcc import artifact

    kernels = result["profile"]["kernels"]
    layers = artifact.read_metadata(built)["passes"]["bitlinear"]["rewritten"]
    w2a8 = [k for k in kernels if k["name"].startswith("w2a8_")]
    assert layers > 0 and sum(k["calls"] for k in w2a8) == layers
    assert all(k["ops_kind"] == "int8" and k["gop_per_s"] > 0 for k in w2a8)
    assert math.isclose(sum(k["percent"] for k in kernels), 100, rel_tol=1e-6)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)


def test_bench_on_the_host(built, capsys):
    main(["bench", str(built), "--repeat", "5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["where"] == "host"
    check_report(result, repeat=5, batch=2)
    main(["bench", str(built), "--repeat", "2"])
    assert "latency min" in capsys.readouterr().out


def test_bench_profile_on_the_host(built, capsys):
    main(["bench", str(built), "--repeat", "3", "--profile", "--json"])
    result = json.loads(capsys.readouterr().out)
    check_report(result, repeat=3, batch=2)
    check_profile(result, built)
    main(["bench", str(built), "--repeat", "2", "--profile"])
    text = capsys.readouterr().out
    assert "peak:" in text and "w2a8_" in text and "GOP/s" in text


def test_bench_over_rpc(built, rpc_device, capsys):
    main(["bench", str(built), "--repeat", "3", "--rpc-tracker", rpc_device, "--rpc-key", "bmvcc-test", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["where"] == f"rpc:bmvcc-test@{rpc_device}"
    check_report(result, repeat=3, batch=2)
    main(["bench", str(built), "--repeat", "2", "--profile", "--rpc-tracker", rpc_device, "--rpc-key", "bmvcc-test", "--json"])
    result = json.loads(capsys.readouterr().out)
    check_profile(result, built)
    assert result["profile"]["peak"] is None  # the device's clock is not known here


def test_bench_rpc_user_errors(built, rpc_device, capsys):
    line = cli_error(capsys, ["bench", str(built), "--rpc-tracker", rpc_device, "--rpc-key", "jetson"])
    assert "no device with key 'jetson'" in line and "bmvcc-test" in line
    assert "go together" in cli_error(capsys, ["bench", str(built), "--rpc-key", "jetson"])
    assert "not HOST:PORT" in cli_error(capsys, ["bench", str(built), "--rpc-tracker", "nowhere", "--rpc-key", "k"])
    assert "at least 1" in cli_error(capsys, ["bench", str(built), "--repeat", "0"])
