"""Load and run a compiled artifact with the TVM runtime and numpy only: what a device runs.

This module never imports `tvm` (whose package import pulls in the whole compiler, LLVM and, through
tvm_ffi, torch). It drives the artifact through the FFI layer directly:

    libtvm_runtime.so (+ _extra: sort/topk kernels, + _cuda for GPU artifacts), loaded with ctypes
    tvm_ffi.load_module(model.so)["vm_load_executable"]() -> Relax VM module
    vm["vm_initialization"](device_type, device_id, allocator, ...)   (as tvm.relax.VirtualMachine does)
    runtime.LoadParamsFromFile(weights.bin) -> {"w0": Tensor, ...}
    vm["main"](image, w0, w1, ...) -> logits (or a 1-tuple of logits)

The shared libraries are looked up where `pip install apache-tvm` puts them (tvm/lib, found without
importing tvm) or in TVM_LIBRARY_PATH, TVM's own variable for a runtime-only install.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

from . import artifact
from .errors import BmvccError, amx_refusal

_POOLED_ALLOCATOR = 2  # tvm.relax.VirtualMachine.POOLED_ALLOCATOR
_DEVICE_TYPES = {"cpu": 1, "cuda": 2}  # DLPack device types
# TVM allocates every tensor 64-byte aligned (kAllocAlignment) and compiled kernels rely on it: their
# vector loads of the image are aligned loads, which fault on numpy's 16-byte aligned buffers.
_ALIGNMENT = 64


def _ffi():
    """tvm_ffi, imported without torch unless torch is already loaded.

    tvm_ffi's __init__ imports torch whenever it is installed (a Windows symbol workaround and an
    optional DLPack speed-up); a device has no torch and the host runtime must not pay seconds for
    it. Hiding torch for the duration of the import only turns off tvm_ffi's torch.dtype argument
    conversion in this process; torch tensors still convert through DLPack.
    """
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import tvm_ffi
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm_ffi


def _library_dirs() -> list[Path]:
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    spec = importlib.util.find_spec("tvm")  # locates the package without running tvm/__init__.py
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "lib" for p in spec.submodule_search_locations]
    return dirs


def _load_runtime_libraries(device: str) -> None:
    """dlopen the TVM runtime so its global functions register with tvm_ffi (idempotent)."""
    _ffi()  # libtvm_ffi.so first: the runtime libraries link against it

    def find(name):
        return next((d / name for d in _library_dirs() if (d / name).is_file()), None)

    runtime = find("libtvm_runtime.so")
    if runtime is None:
        raise BmvccError("the TVM runtime (libtvm_runtime.so) was not found; pip install apache-tvm, "
                         "or set TVM_LIBRARY_PATH to the directory holding libtvm_runtime.so")
    ctypes.CDLL(str(runtime), ctypes.RTLD_GLOBAL)
    extra = find("libtvm_runtime_extra.so")  # sort/topk and other contrib kernels the VM calls
    if extra is not None:
        ctypes.CDLL(str(extra), ctypes.RTLD_LOCAL)
    if device == "cuda":
        cuda = find("libtvm_runtime_cuda.so")
        if cuda is None:
            raise BmvccError("this artifact runs on CUDA but libtvm_runtime_cuda.so was not found; "
                             "install a CUDA-enabled TVM runtime")
        try:
            ctypes.CDLL(str(cuda), ctypes.RTLD_GLOBAL)
        except OSError as e:  # e.g. the PyPI wheel's libcudart.so.13 on JetPack 6 (CUDA 12.6), or no driver
            raise BmvccError(f"{cuda} cannot be loaded ({e}); it needs the NVIDIA driver and the CUDA runtime "
                             f"it was built against: build TVM's runtime with -DUSE_CUDA=ON on the device and "
                             f"set TVM_LIBRARY_PATH (README: Deploying to a device)") from None


CPUINFO_FLAGS_LINE = {"x86_64": "flags", "aarch64": "Features"}  # where /proc/cpuinfo lists them, per architecture


def cpuinfo_flags() -> frozenset[str] | None:
    """The CPU's flags as Linux reports them in /proc/cpuinfo; None where there is no such file (not Linux) or it does
    not describe this process's architecture (an aarch64 program under qemu-user on x86 reads the x86 host's)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    key = CPUINFO_FLAGS_LINE.get(platform.machine())
    lines = [line.split(":", 1) for line in text.splitlines() if ":" in line]
    flags = [value.split() for name, value in lines if name.strip() == key]
    return frozenset(f for words in flags for f in words) if flags else None


def missing_cpu_features(target: dict, cpu_flags: frozenset[str] | None) -> list[str]:
    """The features code compiled for `target` (metadata.json's, of this machine's arch) may use (target.isa,
    targets/isa.py) that a CPU reporting `cpu_flags` lacks: running it there would die on SIGILL. None where either is
    unknown (an artifact compiled before bmvcc recorded them; no /proc/cpuinfo)."""
    isa = target.get("isa")
    if not isa or cpu_flags is None:
        return []
    return [name for name, flag in isa["features"].items() if flag not in cpu_flags]


def check_cpu_features(target: dict, cpu_flags: frozenset[str] | None) -> None:
    """A BmvccError if the CPU reporting `cpu_flags` lacks a feature of `target` (missing_cpu_features)."""
    lacking = missing_cpu_features(target, cpu_flags)
    if lacking:
        raise BmvccError(f"this model was compiled for {target['isa']['mcpu']} and uses {', '.join(lacking)}, which "
                         f"this CPU lacks; compile it with --target host on this machine (or for a target without "
                         f"{'them' if len(lacking) > 1 else 'it'})")


class CompiledModel:
    """Callable: float32 images [B', C, H, W] (any B', or one [C, H, W]) -> logits [B', classes].

    The module has a static batch (metadata input.shape[0]); images run in chunks of it, the last
    chunk zero-padded and its padding rows dropped.
    """

    def __init__(self, outdir: Path, device: str | None = None):
        self.outdir = Path(outdir)
        self.metadata = artifact.read_metadata(self.outdir)
        self.input_shape = tuple(self.metadata["input"]["shape"])
        self.input_dtype = self.metadata["input"]["dtype"]
        target = self.metadata["target"]
        self.device = device or target["device"]
        if self.device not in _DEVICE_TYPES:
            raise BmvccError(f"device '{self.device}' is not supported; use one of {', '.join(_DEVICE_TYPES)}")
        if target["arch"] != platform.machine():
            raise BmvccError(f"'{outdir}' was compiled for {target['arch']} (target {target['name']}), this machine "
                             f"is {platform.machine()}; copy it to a {target['arch']} device or compile with --target host")
        check_cpu_features(target, cpuinfo_flags())
        _load_runtime_libraries(self.device)
        ffi = self._ffi = _ffi()
        self.dev = ffi.device(self.device, 0)
        self._cpu = ffi.device("cpu", 0)
        lib = _load_private_copy(ffi, self.outdir / artifact.MODULE)
        self.vm = lib["vm_load_executable"]()
        init = [_DEVICE_TYPES[self.device], 0, _POOLED_ALLOCATOR]
        if self.device != "cpu":
            init += [_DEVICE_TYPES["cpu"], 0, _POOLED_ALLOCATOR]  # the VM runs shape code on the CPU
        self.vm["vm_initialization"](*init)
        self._main = self.vm["main"]
        params = ffi.get_global_func("runtime.LoadParamsFromFile")(str(self.outdir / artifact.WEIGHTS))
        artifact.check_weights(params, self.metadata, self.outdir)
        self.weights = [self._to_device(params[f"w{i}"]) for i in range(self.metadata["num_weights"])]

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def num_classes(self) -> int:
        return self.metadata["num_classes"]

    def _to_device(self, tensor):
        if self.device == "cpu":
            return tensor
        ffi = self._ffi
        out = ffi.get_global_func("runtime.TVMTensorAllocWithScope")(tensor.shape, tensor.dtype, self.dev, None)
        ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, out)
        return out

    def _to_numpy(self, tensor) -> np.ndarray:
        if self.device != "cpu":
            ffi = self._ffi
            host = ffi.get_global_func("runtime.TVMTensorAllocWithScope")(tensor.shape, tensor.dtype, self._cpu, None)
            ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, host)
            tensor = host
        return np.array(np.from_dlpack(tensor))  # a copy: the VM's pooled allocator reuses its buffers

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return in_batches(self.validate(images), self.batch, self._run_batch)

    def _run_batch(self, chunk: np.ndarray) -> np.ndarray:
        image = self._ffi.from_dlpack(_aligned(chunk), require_alignment=_ALIGNMENT)
        with amx_refusal():
            res = self._main(self._to_device(image), *self.weights)
        if not hasattr(res, "__dlpack__"):  # main returns a 1-tuple (logits,)
            res = res[0]
        return self._to_numpy(res)

    def validate(self, images) -> np.ndarray:
        """[N, C, H, W] float32 (a single [C, H, W] image is batched); anything else is a BmvccError."""
        if not isinstance(images, np.ndarray):
            raise BmvccError(f"input is a {type(images).__name__}, not a numpy array; pass float32 NCHW images")
        per_image, given = self.input_shape[1:], images.shape
        if images.ndim == len(per_image):
            images = images[None]
        if images.shape[1:] != per_image or images.shape[0] == 0:
            raise BmvccError(
                f"input has shape {given}, the model takes (N, {', '.join(map(str, per_image))}) float32 images "
                "with N >= 1; resize or reorder to NCHW"
            )
        if images.dtype != np.dtype(self.input_dtype):
            raise BmvccError(f"input dtype is {images.dtype}, the model takes {self.input_dtype}; "
                             f"convert with .astype(np.{self.input_dtype})")
        return images


def _aligned(array: np.ndarray) -> np.ndarray:
    """`array` C-contiguous at a _ALIGNMENT-byte aligned address; copied only when it is not."""
    if array.flags.c_contiguous and array.ctypes.data % _ALIGNMENT == 0:
        return array
    buffer = np.empty(array.nbytes + _ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % _ALIGNMENT
    out = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _load_private_copy(ffi, path: Path):
    """Load `path` through a fresh copy: the dynamic loader returns an already-loaded library for a
    path it has seen, so a module recompiled into the same OUTDIR would silently run the old code."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bmvcc-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        return ffi.load_module(str(copy))  # stays mapped after the file is removed


def in_batches(images: np.ndarray, batch: int, run) -> np.ndarray:
    """run(chunk) over `images` in chunks of exactly `batch` (a static-batch model takes no other), the last chunk
    padded with zero images whose outputs are dropped."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(run(chunk)[:n])
    return np.concatenate(out)


def load(outdir, device: str | None = None) -> CompiledModel:
    """Load an artifact directory for inference; `device` defaults to the one it was compiled for."""
    return CompiledModel(Path(outdir), device)


def load_npy(path: Path) -> np.ndarray:
    """A .npy array whose header is checked against the file's length before anything is allocated."""
    from .resources import human, npy_claim

    path = Path(path)
    if not path.is_file():
        raise BmvccError(f"input '{path}' does not exist; check the path")
    try:
        with open(path, "rb") as f:
            shape, dtype, claimed = npy_claim(f)
            held = path.stat().st_size - f.tell()
            if claimed != held and not dtype.hasobject:  # object arrays: np.load refuses them (no pickles)
                raise BmvccError(f"input '{path}' claims {dtype} {shape} ({human(claimed)}) but holds {human(held)} "
                                 "of data; it is truncated or damaged: save the images again with numpy.save")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BmvccError(f"input '{path}' is not a .npy array ({str(e)[:80]}); save images with numpy.save") from None
