"""How fast the CLI answers: help, version, the target list and usage errors, each in a fresh process.

    python benchmarks/bench_cli_startup.py [--repeat 3] [--json]

Runs the `bmvcc` script beside this Python, each command --repeat times, and prints the best and median
wall time and whether the command imported torch or TVM (PYTHONPROFILEIMPORTTIME, which -X importtime sets,
lists every module a process imports). None of these commands needs either: they should answer in well
under a second. Arguments name the bundled example checkpoint, files in a temporary folder that do not
exist, a plain file, and damaged files (random bytes named .pth and .onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BMVCC = str(Path(sys.executable).with_name("bmvcc"))
CKPT = str(Path(__file__).resolve().parent.parent / "examples" / "bitmedvit_digits.pth")


def commands(tmp: Path) -> dict[str, list[str]]:
    missing = str(tmp / "missing.pth")
    for name in ("damaged.pth", "damaged.onnx"):
        (tmp / name).write_bytes(b"\x07" + os.urandom(999))
    (tmp / "plain").write_text("a file")
    damaged_pth, damaged_onnx, out = str(tmp / "damaged.pth"), str(tmp / "damaged.onnx"), str(tmp / "out")
    return {
        "--help": ["--help"],
        "--version": ["--version"],
        "targets": ["targets"],
        "compile --help": ["compile", "--help"],
        "unknown option": ["targets", "--bogus"],
        "compile: missing checkpoint": ["compile", missing, "-o", str(tmp / "out")],
        "compile: unknown target": ["compile", missing, "-o", str(tmp / "out"), "--target", "nope"],
        "compile: --heads 0": ["compile", CKPT, "-o", out, "--heads", "0"],
        "compile: unknown --dataset": ["compile", CKPT, "-o", out, "--dataset", "digits"],
        "compile: damaged .pth": ["compile", damaged_pth, "-o", out],
        "compile: damaged .onnx": ["compile", damaged_onnx, "-o", out],
        "compile: --heads with .onnx": ["compile", damaged_onnx, "-o", out, "--heads", "2"],
        "compile: --db not a database": ["compile", CKPT, "-o", out, "--db", str(tmp)],
        "tune: missing checkpoint": ["tune", missing, "--db", str(tmp / "db")],
        "tune: --db a file": ["tune", CKPT, "--db", str(tmp / "plain")],
        "tune: --rpc-key alone": ["tune", CKPT, "--db", str(tmp / "db"), "--rpc-key", "orin"],
        "export-onnx: missing checkpoint": ["export-onnx", missing, "-o", str(tmp / "m.onnx")],
        "export-onnx: .onnx source": ["export-onnx", damaged_onnx, "-o", str(tmp / "m.onnx")],
        "export-onnx: -o not .onnx": ["export-onnx", CKPT, "-o", str(tmp / "m.txt")],
        "export-onnx: --opset 13": ["export-onnx", CKPT, "-o", str(tmp / "m.onnx"), "--opset", "13"],
        "run: missing artifact": ["run", str(tmp / "none"), "-i", str(tmp / "x.npy")],
        "run: -o not .npy": ["run", str(tmp / "none"), "-i", str(tmp / "x.npy"), "-o", str(tmp / "y.txt")],
        "predict: missing artifact": ["predict", str(tmp / "none"), str(tmp / "x.png")],
        "bench: missing artifact": ["bench", str(tmp / "none")],
        "report: missing artifact": ["report", str(tmp / "none")],
        "verify: missing artifact": ["verify", str(tmp / "none")],
    }


def imported_heavy(argv: list[str]) -> str:
    """'torch', 'tvm', both or '-': what running `bmvcc ARGV` imports of the two."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    lines = subprocess.run([BMVCC, *argv], capture_output=True, text=True, env=env).stderr.splitlines()
    tops = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    return ", ".join(m for m in ("torch", "tvm") if m in tops) or "-"


def time_command(argv: list[str], repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([BMVCC, *argv], capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": statistics.median(times), "imports": imported_heavy(argv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: time_command(argv, args.repeat) for name, argv in commands(Path(tmp)).items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'command':<34} {'best s':>7} {'median s':>9}  imports")
    for name, r in results.items():
        print(f"{name:<34} {r['best_s']:>7.2f} {r['median_s']:>9.2f}  {r['imports']}")
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
