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

import numpy as np
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


def test_bench_profile_plot_shows_the_measured_kernels(built, capsys, tmp_path):
    """`bench --profile --plot`: one point per kernel with counted arithmetic at (ops/byte, ops/s) of its
    measurement, the CPU's int8 and fp32 peaks as roofs (when targets/cpu_peak.py knows this CPU), and
    bars that add up to the profiled time of one call; --plot without --profile is a user error."""
    from bmvcc import bench

    main(["bench", str(built), "--repeat", "2", "--profile", "--json", "--plot", str(tmp_path / "p.png")])
    result = json.loads(capsys.readouterr().out)
    assert (tmp_path / "p.png").stat().st_size > 10_000
    fig = bench.plot(result, tmp_path / "p.svg")
    roofline, bar = fig.axes[:2]
    counted = [k for k in result["profile"]["kernels"] if "gop_per_s" in k]
    assert any(k["name"].startswith("w2a8_") for k in counted)
    points = sorted(tuple(p) for c in roofline.collections for p in c.get_offsets())
    expected = sorted((k["gop_per_s"] / k["gb_per_s"], k["gop_per_s"]) for k in counted)
    np.testing.assert_allclose(points, expected, rtol=1e-9)
    peaks = sorted(v / 1e9 for v in result["profile"]["peak_ops_per_s"].values())
    flat = sorted(line.get_ydata()[0] for line in roofline.get_lines() if line.get_ydata()[0] == line.get_ydata()[1])
    assert flat == pytest.approx(peaks)
    assert sum(p.get_width() for p in bar.patches) == pytest.approx(
        sum(k["ms"] for k in result["profile"]["kernels"]) * 1e3)  # microseconds per call
    assert "pass --profile with it" in cli_error(capsys, ["bench", str(built), "--plot", str(tmp_path / "q.png")])


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


def test_profile_rates_attention_by_its_operands():
    """The attention kernel's operations (Q K^T and P V over the causal half) against the fp32 peak, or bf16's for a
    --float-precision bf16 build's kernel (..._bf16: vdpbf16ps), by the names AttentionConfig gives them."""
    from bmvcc.bench import _ops
    from bmvcc.schedules.attention_cpu import AttentionConfig

    ops = 2.0 * 8 * 64 * 1024 * 1025
    assert _ops(AttentionConfig(8, 1, 1024, 64, 0.125).name, []) == (ops, "fp32")
    assert _ops(AttentionConfig(8, 1, 1024, 64, 0.125, bf16=True).name, []) == (ops, "bf16")
