"""CUDA 12 toolchain from pip wheels: CUDA C++ -> PTX (NVRTC) -> cubin (ptxas) -> SASS (cuobjdump).

Install with `pip install 'bmvcc[cuda]'`. Everything is found inside the installed `nvidia.*` packages,
never on PATH, so the result does not depend on a system CUDA (JetPack 6.2 ships CUDA 12.6, which
these wheels match):
- nvidia-cuda-nvrtc-cu12: libnvrtc (CUDA C++ -> PTX, in process);
- nvidia-cuda-runtime-cu12 and nvidia-cuda-cccl-cu12: the headers TVM's CUDA source includes;
- nvidia-cuda-nvcc-cu12: ptxas (PTX -> cubin, and the -v resource report) and crt/ headers;
- nvidia-cuda-nvdisasm: nvdisasm (cubin -> SASS; 13.x reads sm_87 cubins, no -cu12 build exists).
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BmvccError

_FIX = "install the CUDA toolchain wheels with: pip install 'bmvcc[cuda]'"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BmvccError(f"CUDA toolchain package {pip_name} is not installed; {_FIX}")
    return Path(list(spec.submodule_search_locations)[0])


def _file(module: str, pip_name: str, rel: str) -> Path:
    path = _package_dir(module, pip_name) / rel
    if not path.exists():
        raise BmvccError(f"{pip_name} has no {rel}; reinstall it: {_FIX}")
    return path


def ptxas() -> Path:
    return _file("nvidia.cuda_nvcc", "nvidia-cuda-nvcc-cu12", "bin/ptxas")


def nvdisasm() -> Path:
    return _file("nvidia.cu13", "nvidia-cuda-nvdisasm", "bin/nvdisasm")


def _include_dirs() -> list[Path]:
    return [_file("nvidia.cuda_runtime", "nvidia-cuda-runtime-cu12", "include"),
            _file("nvidia.cuda_nvcc", "nvidia-cuda-nvcc-cu12", "include"),  # crt/ headers of mma.h
            _file("nvidia.cuda_cccl", "nvidia-cuda-cccl-cu12", "include")]


def _nvrtc():
    lib = ctypes.CDLL(str(_file("nvidia.cuda_nvrtc", "nvidia-cuda-nvrtc-cu12", "lib/libnvrtc.so.12")))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def cuda_to_ptx(source: str, arch: str) -> str:
    """CUDA C++ source -> PTX for `arch` (e.g. "sm_87") with NVRTC; a compile error raises BmvccError."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def check(status, what):
        if status:
            raise BmvccError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(status).decode()}; {_FIX}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None), "create")
    opts = [f"--gpu-architecture=compute_{arch.removeprefix('sm_')}", "--std=c++17", "-default-device"]
    opts += [f"-I{d}" for d in _include_dirs()]
    argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    status = lib.nvrtcCompileProgram(prog, len(opts), argv)
    if status:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise BmvccError(f"NVRTC could not compile the generated CUDA source: {log.value.decode()[:2000]}")
    size = ctypes.c_size_t()
    check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "get PTX size")
    ptx = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetPTX(prog, ptx), "get PTX")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


@dataclass(frozen=True)
class KernelResources:
    """ptxas -v numbers of one kernel."""

    name: str
    registers: int
    shared_bytes: int  # static shared memory
    spill_stores: int
    spill_loads: int
    stack_bytes: int


@dataclass(frozen=True)
class Cubin:
    arch: str
    data: bytes
    resources: tuple[KernelResources, ...]
    ptx: str = ""  # the PTX ptxas compiled (compile_cuda), which bmvcc/ptx emulates

    def sass(self) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernel.cubin"
            path.write_bytes(self.data)
            return _run([str(nvdisasm()), "-c", str(path)])

    def opcodes(self) -> list[str]:
        """The SASS opcodes (first mnemonic, with its modifiers, e.g. "IMMA.16832.S8.S8") in program order."""
        return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", self.sass())

    def opcode_counts(self) -> dict[str, int]:
        """SASS opcode -> occurrences, e.g. {"IMMA.16832.S8.S8": 64}."""
        counts: dict[str, int] = {}
        for op in self.opcodes():
            counts[op] = counts.get(op, 0) + 1
        return counts


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise BmvccError(f"{Path(cmd[0]).name} failed: {(res.stderr or res.stdout).strip()[:2000]}")
    return res.stdout + res.stderr


_RES = re.compile(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                  r"(\d+) bytes spill loads.*?Used (\d+) registers(?:.*?(\d+) bytes smem)?", re.S)


def ptx_to_cubin(ptx: str, arch: str) -> Cubin:
    """PTX -> cubin with ptxas -O3, and each kernel's register, shared-memory and spill report."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        log = _run([str(ptxas()), "-O3", f"-arch={arch}", "-v", "-o", str(out), str(src)])
        entries = ("Compiling entry function" + e for e in log.split("Compiling entry function")[1:])
        res = tuple(KernelResources(name=m[0], stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]),
                                    registers=int(m[4]), shared_bytes=int(m[5] or 0))
                    for m in (_RES.search(e).groups() for e in entries))  # one entry at a time: smem is optional
        return Cubin(arch=arch, data=out.read_bytes(), resources=res)


def compile_cuda(source: str, arch: str) -> Cubin:
    ptx = cuda_to_ptx(source, arch)
    return replace(ptx_to_cubin(ptx, arch), ptx=ptx)
