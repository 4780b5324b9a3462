"""aarch64 artifacts executed: `--target aarch64` builds (Cortex-A78 code, the W2A8 kernels on `sdot`) run under QEMU
user-mode emulation by Debian's aarch64 Python with the aarch64 wheels of numpy and the TVM runtime, through
bmvcc.runtime as on a device (tests/aarch64_driver.py), their logits compared with PyTorch's.

The emulated CPU is a Cortex-A76: QEMU 7.2 (Debian 12's) has no A78, and both (the Orin's A78AE too) are Armv8.2-A
with dotprod, fp16, RCpc and SSBS, so code using an extension the Orin lacks dies here as it would there. Under
QEMU 7.2 the process reads the x86 host's /proc/cpuinfo, so bmvcc's instruction-set guard does not check
(runtime.cpuinfo_flags is None); QEMU 8.1 on shows it an arm /proc/cpuinfo of the emulated CPU, so the guard checks.
`.ci/aarch64-sysroot` builds the emulation sysroot, .ci/aarch64 (CI does, before the tests); without it these tests
skip, with one built for other wheel versions than the venv's they fail. An emulated run takes about 5 s, most of it
Python's and numpy's start-up.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from conftest import make_model
from test_frontend import CASES, RTOL_LOGITS, _check_logits, _images, compile_case
from test_onnx import torch_logits

REPO = Path(__file__).resolve().parents[1]
SYSROOT = REPO / ".ci" / "aarch64"
QEMU = shutil.which("qemu-aarch64")
PYTHON = next(iter(sorted((SYSROOT / "root" / "usr" / "bin").glob("python3.*"))), None)
STAMP = SYSROOT / "stamp"  # .ci/aarch64-sysroot's record: "NAME==VERSION ... | Debian packages"
CPU = "cortex-a76"
TIMEOUT_S = 120  # a run takes ~5 s; generous for a loaded CI machine
SEEDS = {"mq-bit": 31, "mh-fp": 32}  # W2A8 kernels in attention and MLP; float attention projections

needs_emulation = pytest.mark.skipif(
    QEMU is None or PYTHON is None,
    reason="no aarch64 emulation: run .ci/aarch64-sysroot (installs qemu-user, builds .ci/aarch64)")
pytestmark = needs_emulation


@pytest.fixture(scope="module")
def aarch64_build(checkpoint, tmp_path_factory):
    """aarch64_build(case) -> (artifact directory, reference model); each case compiles once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            cache[case] = compile_case(checkpoint, tmp_path_factory.mktemp("aarch64"), case, SEEDS[case], "aarch64")
        return cache[case]

    return get


def check_sysroot_current(stamp: Path = STAMP) -> None:
    """Fails (not skips: CI always rebuilds the sysroot) unless the wheels `stamp` records are the venv's versions:
    an older aarch64 runtime is not the one under test."""
    recorded = stamp.read_text().split(" | ")[0].split()
    installed = [f"{name}=={version(name)}" for name, _ in (wheel.split("==") for wheel in recorded)]
    if recorded != installed:
        pytest.fail(f"{SYSROOT} holds {' '.join(recorded)}, the venv {' '.join(installed)}: "
                    f"rerun .ci/aarch64-sysroot", pytrace=False)


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGILL'd qemu would write the guest's core


def run_emulated(script: Path, args: list, cwd: Path, cpu: str = CPU) -> subprocess.CompletedProcess:
    """Runs the Python `script` (which first prints platform.machine()) with `args` under qemu-aarch64 on `cpu`, by the
    sysroot's Python with bmvcc importable (check_sysroot_current first): the finished process."""
    check_sysroot_current()
    env = {**os.environ, "PYTHONPATH": f"{SYSROOT / 'site'}:{REPO}", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("TVM_LIBRARY_PATH", None)  # the sysroot's aarch64 runtime, not one of this machine's
    process = subprocess.run([QEMU, "-cpu", cpu, "-L", SYSROOT / "root", PYTHON, script, *args], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=_no_core_dump)
    assert process.stdout.splitlines()[:1] == ["aarch64"], process.stderr  # the emulated Python's platform.machine()
    return process


def emulate(artifact: Path, images: np.ndarray, tmp_path: Path, cpu: str = CPU):
    """Runs tests/aarch64_driver.py on `artifact` under qemu-aarch64: (the finished process, its logits or None)."""
    images_path, out = tmp_path / "images.npy", tmp_path / "logits.npy"
    np.save(images_path, images)
    process = run_emulated(REPO / "tests" / "aarch64_driver.py", [artifact, images_path, out], tmp_path, cpu)
    return process, np.load(out) if process.returncode == 0 else None


@pytest.mark.parametrize("case", list(SEEDS))
def test_aarch64_build_matches_pytorch(aarch64_build, case, tmp_path):
    """5 images through a batch-2 module (the padded last chunk too), within test_frontend's tolerance of PyTorch, and
    outside it of another model's logits (a different seed): the comparison can fail."""
    artifact, model = aarch64_build(case)
    cfg = CASES[case]
    x = _images((cfg.channels, cfg.image_size, cfg.image_size), seed=7)
    process, logits = emulate(artifact, x, tmp_path)
    assert process.returncode == 0, process.stderr
    _check_logits(logits, torch_logits(model, x))
    other = torch_logits(make_model(cfg, seed=SEEDS[case] + 100), x)
    assert np.abs(logits - other).max() > RTOL_LOGITS * np.abs(other).max()


def test_aarch64_build_dies_on_a_cpu_without_dotprod(aarch64_build, tmp_path):
    """A Cortex-A72 (Armv8.0-A) has no sdot. Under QEMU 7.2 (the host's /proc/cpuinfo: no guard) the emulation runs
    the artifact's own W2A8 code, which dies on SIGILL; from QEMU 8.1 (the A72's /proc/cpuinfo) bmvcc's guard refuses
    the artifact first, naming dotprod: either outcome, nothing else."""
    process, _ = emulate(aarch64_build("mq-bit")[0], _images((1, 28, 28), seed=7), tmp_path, cpu="cortex-a72")
    if process.returncode != -signal.SIGILL:
        error = process.stderr.splitlines()[-1]
        assert process.returncode == 1, process.stderr  # the driver's uncaught BmvccError
        assert error.startswith("bmvcc.errors.BmvccError: this model was compiled for cortex-a78 and uses ") and \
            "dotprod" in error and "which this CPU lacks" in error, process.stderr


def test_a_stale_sysroot_fails(tmp_path):
    """A sysroot built for other wheel versions than the venv's fails its tests, saying how to rebuild it."""
    check_sysroot_current()  # the one built: current
    stale = tmp_path / "stamp"
    stale.write_text(STAMP.read_text().replace("numpy==", "numpy==0.", 1))
    with pytest.raises(pytest.fail.Exception, match="rerun .ci/aarch64-sysroot$"):
        check_sysroot_current(stale)
