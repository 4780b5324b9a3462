"""bmvcc.runtime: runs an artifact with the TVM runtime and numpy only, validates its input."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bmvcc.runtime
from bmvcc import artifact
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.errors import BmvccError
from bmvcc.threads import physical_cores

from conftest import small_config

BATCH = 2  # static batch of the module; 3 images exercise chunking and zero padding


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint):
    path, model = checkpoint(small_config())
    out = tmp_path_factory.mktemp("runtime") / "model"
    compile_model(path, out, CompileOptions(batch=BATCH))
    return out, model


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def compiler_side(outdir, x: np.ndarray) -> np.ndarray:
    """The same artifact through the compiler's own Python API (tvm.relax.VirtualMachine)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / artifact.MODULE)), tvm.cpu())
    params = tvm.runtime.load_param_dict_from_file(str(outdir / artifact.WEIGHTS))
    weights = [params[f"w{i}"] for i in range(len(params))]
    out = []
    for start in range(0, len(x), BATCH):
        chunk = np.zeros((BATCH, *x.shape[1:]), np.float32)
        chunk[: len(x[start : start + BATCH])] = x[start : start + BATCH]
        res = vm["main"](tvm.runtime.tensor(chunk), *weights)
        res = res if hasattr(res, "numpy") else res[0]
        out.append(res.numpy()[: len(x[start : start + BATCH])])
    return np.concatenate(out)


def test_runtime_imports_neither_tvm_nor_torch(built, tmp_path):
    outdir, _ = built
    x = images(3)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import bmvcc.runtime
        m = bmvcc.runtime.load({str(outdir)!r})
        np.save({str(tmp_path / 'y.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})))
        print(json.dumps(sorted(sys.modules)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    forbidden = {"torch", "tvm", "tvm.relax", "tvm.tirx", "tvm.s_tir", "tvm.target"}
    assert not forbidden & loaded
    assert not [m for m in loaded if m.startswith(("tvm.", "torch."))]
    assert "tvm_ffi" in loaded  # it did run through the FFI
    # Same .so, same inputs, same machine: the runtime-only path must be bit-identical.
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), compiler_side(outdir, x))


def test_runtime_matches_pytorch_and_pads_the_last_chunk(built):
    from bmvcc.runtime import load

    outdir, model = built
    m = load(outdir)
    x = images(3, seed=1)
    y = m(x)
    assert y.shape == (3, 10) and y.dtype == np.float32
    # Rows do not depend on what else is in the batch (the third image ran with a zero pad row).
    np.testing.assert_array_equal(y[2:], m(x[2:]))
    np.testing.assert_array_equal(y[:1], m(x[0]))  # one CHW image is batched
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    # Independent reference: the PyTorch model. A wrong weight order or padding leak gives O(1)
    # errors; int8 activation rounding flips (scales differing in the last bit) move logits ~1e-2.
    np.testing.assert_allclose(y, ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 28, 28), np.float32), "shape"),
    (np.zeros((2, 1, 32, 32), np.float32), "shape"),
    (np.zeros((0, 1, 28, 28), np.float32), "N >= 1"),
    (np.zeros((2, 1, 28, 28), np.float64), "dtype is float64"),
    ([[0.0]], "not a numpy array"),
])
def test_runtime_rejects_bad_input(built, bad, message):
    from bmvcc.runtime import load

    with pytest.raises(BmvccError, match=message):
        load(built[0])(bad)


def test_runtime_refuses_an_artifact_for_another_cpu(built, tmp_path):
    from bmvcc.runtime import load

    other = tmp_path / "other"
    shutil.copytree(built[0], other)
    meta = artifact.read_metadata(other)
    meta["target"]["arch"] = "riscv64"
    artifact.write_metadata(other, meta)
    with pytest.raises(BmvccError, match=re.escape(
            f"'{other}' was compiled for riscv64 (target {meta['target']['name']}), this machine is "
            f"{platform.machine()}; copy it to a riscv64 device or compile with --target host")):
        load(other)


def test_a_host_build_records_features_this_cpu_reports_and_runs_here(built, tmp_path):
    """The instruction-set guard's negative control: the host build records the CPU features its code may use (every
    x86-64 CI machine has AVX2), each one this CPU's /proc/cpuinfo reports, and `bmvcc run` (a subprocess: a
    wrongful refusal is exit 2, a SIGILL -4) runs it on the machine that built it."""
    from bmvcc.targets.isa import FEATURES

    isa = artifact.read_metadata(built[0])["target"]["isa"]
    flags = bmvcc.runtime.cpuinfo_flags()
    if flags is not None and "avx2" in flags:
        assert "avx2" in isa["features"], isa
    assert all(FEATURES[platform.machine()][name] == flag for name, flag in isa["features"].items())
    assert flags is None or set(isa["features"].values()) <= flags, isa
    np.save(tmp_path / "x.npy", images(1))
    proc = subprocess.run([sys.executable, "-m", "bmvcc.cli", "run", str(built[0]), "--input", str(tmp_path / "x.npy"),
                           "-o", str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "y.npy").shape == (1, 10)


def test_an_artifact_compiled_before_features_were_recorded_loads_as_before(built, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built[0], old)
    meta = artifact.read_metadata(old)
    del meta["target"]["isa"]
    artifact.write_metadata(old, meta)
    x = images(BATCH)
    np.testing.assert_array_equal(bmvcc.runtime.load(old)(x), bmvcc.runtime.load(built[0])(x))


def test_recompiling_into_the_same_outdir_loads_the_new_module(built, checkpoint, tmp_path):
    """The dynamic loader caches libraries by path: a second load of a recompiled OUTDIR in the same
    process must still run the new module, not the first one (which would be silently wrong)."""
    out = tmp_path / "model"
    x = images(BATCH)
    refs = []
    for seed in (1, 2):
        path, model = checkpoint(small_config(depth=1), seed=seed)
        compile_model(path, out, CompileOptions(batch=BATCH))
        with torch.no_grad():
            refs.append(model(torch.from_numpy(x)).numpy())
        # tolerance as in test_runtime_matches_pytorch_and_pads_the_last_chunk
        np.testing.assert_allclose(bmvcc.runtime.load(out)(x), refs[-1], atol=5e-2, rtol=0)
    assert np.abs(refs[0] - refs[1]).max() > 0.5  # the stale module would fail the check above


def test_a_cuda_runtime_that_cannot_load_is_a_one_line_error():
    """Without the NVIDIA driver (this CI) or with a CUDA runtime the device lacks (the PyPI wheel's
    libcudart.so.13 on JetPack 6.2), loading a GPU artifact must say what to build, not raise OSError."""
    import ctypes.util

    try:
        bmvcc.runtime._load_runtime_libraries("cuda")
    except BmvccError as e:
        assert re.search(r"libtvm_runtime_cuda\.so cannot be loaded .*-DUSE_CUDA=ON", str(e)), e
    else:  # it loaded: only possible with a driver
        assert ctypes.util.find_library("cuda") is not None


def test_tvm_thread_pool_has_a_thread_per_physical_core():
    """TVM alone sizes its pool as half the logical CPUs on x86-64 (one thread on a 2-core machine
    without SMT); importing bmvcc makes it one per physical core, and TVM_NUM_THREADS still decides."""
    script = ("import bmvcc.runtime as r; r._load_runtime_libraries('cpu'); "
              "print(r._ffi().get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}

    def threads(**extra):
        proc = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    assert threads() == physical_cores()
    assert threads(TVM_NUM_THREADS="1") == 1
