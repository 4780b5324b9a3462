"""The device code of a CUDA build, compiled here and embedded in the exported .so as a cubin.

TVM 0.27 keeps the device module as CUDA source, compiled at load time by a Python callback that a
device running only the TVM runtime does not have; so the source is compiled here with the pip CUDA 12.6
toolchain (targets/cuda_toolchain.py) to a cubin for the target's arch. At export, the serialized import
tree (the blob export_library embeds) has the CUDA module's record rewritten from (fmt "cuda", function
table, source) to (fmt "cubin", same table, cubin), which is exactly what TVM's CUDA runtime loads with
cuModuleLoadData. The blob goes into an LLVM object linked with the host object by targets/cross.py.
Used by `bmvcc compile` (bmvcc/lowering.py) and by `bmvcc tune`'s builder (bmvcc/tune.py).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from ..errors import InternalError


def compile_device(executable, arch: str):
    """The CUDA module of `executable` compiled to a cubin (and its source); exactly one is expected."""
    from . import cuda_toolchain

    cuda = executable.mod._collect_from_import_tree(lambda m: m.kind == "cuda")
    if len(cuda) != 1:
        raise InternalError(f"expected one CUDA device module in the build, found {len(cuda)}")
    source = cuda[0].inspect_source("cuda")
    return source, cuda_toolchain.compile_cuda(source, arch)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def embed_cubin(blob: bytes, source: str, cubin: bytes) -> bytes:
    """The serialized import tree `blob` with its CUDA record turned from source into `cubin`.

    Layout (TVM's ModuleSerializer; strings are u64 length + bytes): u64 size of the rest | ... |
    "cuda" | u64 record size | record = fmt "cuda" | function table | data (the CUDA source)."""
    src = source.encode()
    head = _u64(4) + b"cuda"
    starts = [m.start() for m in re.finditer(re.escape(head), blob)
              if blob[m.end() + 8: m.end() + 20] == head]  # kind "cuda", record size, fmt "cuda"
    if len(starts) != 1 or struct.unpack_from("<Q", blob)[0] != len(blob) - 8:
        raise InternalError("unexpected layout of TVM's serialized CUDA module")
    size_at = starts[0] + len(head)
    record = size_at + 8
    end = record + struct.unpack_from("<Q", blob, size_at)[0]
    data_at = end - len(src) - 8
    if struct.unpack_from("<Q", blob, data_at)[0] != len(src) or blob[data_at + 8: end] != src:
        raise InternalError("the serialized CUDA module does not end with its source")
    fmap = blob[record + len(head): data_at]
    new_record = _u64(5) + b"cubin" + fmap + _u64(len(cubin)) + cubin
    rest = blob[8:size_at] + _u64(len(new_record)) + new_record + blob[end:]
    return _u64(len(rest)) + rest


def pack_imports(source: str, cubin: bytes):
    """An export_library `fpack_imports`: TVM's LLVM packing of the import tree (the object export_library
    makes without one), with the cubin embedded. An object, not C: a C compiler would record the build's
    directories (debug info names the source file and the cwd) in the .so."""
    import tvm_ffi

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        host = next(m for m in mod._collect_dso_modules() if m.kind == "llvm")
        obj = tvm_ffi.get_global_func("codegen.codegen_blob")(
            embed_cubin(blob, source, cubin), is_system_lib, host.get_function("_get_target_string")(), prefix)
        path = Path(workspace_dir) / f"{prefix}devc.o"
        obj.write_to_file(str(path))
        return str(path)

    return fpack
