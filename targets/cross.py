"""Linking a TVM module for another CPU architecture (the `cross_compiler` of a TargetSpec).

A system cross compiler on PATH (aarch64-linux-gnu-gcc) is used when present; otherwise zig's
clang-based C compiler from the `ziglang` wheel (`pip install 'bmvcc[cuda]'`), which carries the
aarch64 glibc stubs and links without a sysroot. TVM's LLVM already compiled the host code for the
target triple (C ABI only, so no C++ runtime is linked: `zig cc`, not `zig c++`, which would build
libc++ on first use); this step only compiles small C files (the packed device blob) and links.
TVM runtime symbols stay undefined in the .so and resolve against the loading process, as usual.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

from ..errors import BmvccError

# TargetSpec.cross_compiler -> (system compiler driver, zig target: triple and minimum glibc)
CROSS = {"aarch64": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu.2.17")}


def compiler_command(cross: str) -> list[str]:
    """The C driver command for `cross`: the system cross compiler, else `python -m ziglang cc`."""
    if cross not in CROSS:
        raise BmvccError(f"no cross compiler known for '{cross}'; use one of: {', '.join(CROSS)}")
    system, triple = CROSS[cross]
    if shutil.which(system):
        return [system]
    if importlib.util.find_spec("ziglang") is None:
        raise BmvccError(f"linking for {cross} needs {system} on PATH or the ziglang wheel; "
                         "install it with: pip install 'bmvcc[cuda]'")
    return [sys.executable, "-m", "ziglang", "cc", "-target", triple]


def fcompile(cross: str):
    """An export_library `fcompile` linking a shared library for `cross`."""
    command = compiler_command(cross)

    def link(output: str, objects: list[str], options=None, **_kwargs):
        opts = options if isinstance(options, (list, tuple)) else ([options] if options else [])
        cmd = [*command, "-shared", "-fPIC", "-O2", "-o", output, *objects, *opts]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise BmvccError(f"linking {output} for {cross} failed: {(res.stderr or res.stdout).strip()[:1500]}")

    link.output_format = "so"
    return link
